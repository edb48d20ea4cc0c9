//! Online counts: this node reports its per-room session counts to logic on
//! a timer and caches the cluster totals logic answers, which is what
//! MEMBERS replies with.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chatroom_common::proto::logic::ReportOnlineReq;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::bucket::Buckets;
use crate::logic_pool::LogicPool;

#[derive(Debug, Default)]
pub struct Online {
    totals: RwLock<HashMap<String, u64>>,
}

impl Online {
    /// The cluster total for `room` as of the last report, or `local` when
    /// logic has not answered for that room yet.
    pub fn total(&self, room: &str, local: u32) -> u64 {
        let totals = self.totals.read().unwrap_or_else(|p| p.into_inner());
        totals.get(room).copied().unwrap_or(local as u64)
    }

    fn set(&self, totals: HashMap<String, u64>) {
        *self.totals.write().unwrap_or_else(|p| p.into_inner()) = totals;
    }
}

/// Reports every `period` until `shutdown`.
pub async fn report_loop(
    server: String,
    buckets: Arc<Buckets>,
    pool: Arc<LogicPool>,
    online: Arc<Online>,
    period: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let rooms = buckets.counts();
        let req = ReportOnlineReq {
            server: server.clone(),
            rooms,
        };
        match pool.report_online(req).await {
            Ok(reply) => {
                debug!(rooms = reply.rooms.len(), "online totals updated");
                online.set(reply.rooms);
            }
            Err(e) => warn!(error = %e.message(), "reporting online counts failed"),
        }
    }
}
