//! Test doubles and helpers for the cluster tests.
