//! Test doubles and helpers for the cluster tests.
pub mod chaos;
pub mod chat;
pub mod client;
pub mod cluster;
pub mod http;
pub mod nsq_broker;
pub mod services;
pub mod wait;
