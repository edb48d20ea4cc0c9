//! chatroom-bench: the load generator that measures a push server with the
//! real client protocol — how many connections it holds per GiB, how many
//! deliveries per second it makes, and how late.
//!
//! [`run`] is the entry point: give it a [`RunConfig`], get a [`Report`].
//! With `processes > 1` it re-executes the binary as `chatroom-bench worker`
//! (see [`worker::serve_stdio`]); with 1 everything runs in this process.

pub mod auth;
pub mod cli;
pub mod config;
pub mod coordinator;
pub mod error;
pub mod floor;
pub mod http;
pub mod latency;
pub mod loss;
pub mod nats;
pub mod net;
pub mod payload;
pub mod procfs;
pub mod publish;
pub mod report;
pub mod rooms;
pub mod session;
pub mod stats;
pub mod worker;

pub use config::{Level, PublishVia, RunConfig, Target, TokenSource};
pub use coordinator::run;
pub use error::BenchError;
pub use report::Report;
pub use rooms::RoomDist;
