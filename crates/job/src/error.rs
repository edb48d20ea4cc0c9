//! Why `run` can fail: only start-up problems (bad config, discovery or queue
//! unreachable) and a crashed internal task. Push failures are never errors
//! here; they are counted, logged and settled per batch (see `ack`).

use chatroom_common::config::ConfigError;
use chatroom_discovery::DiscoveryError;
use chatroom_queue::QueueError;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("discovery: {0}")]
    Discovery(#[from] DiscoveryError),
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
    #[error("job task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}
