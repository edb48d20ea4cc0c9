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
    /// Per room: the cluster total logic answered, and this node's own
    /// count that went into it.
    totals: RwLock<HashMap<String, (u64, u32)>>,
}

impl Online {
    /// The cluster total for `room`: the last answer from logic, corrected
    /// by how this node's own count moved since (so a session that just
    /// joined counts itself); `local` alone before logic has answered.
    pub fn total(&self, room: &str, local: u32) -> u64 {
        let totals = self.totals.read().unwrap_or_else(|p| p.into_inner());
        match totals.get(room) {
            Some(&(total, reported)) => (total + local as u64)
                .saturating_sub(reported as u64)
                .max(local as u64),
            None => local as u64,
        }
    }

    fn set(&self, reported: &HashMap<String, u32>, totals: HashMap<String, u64>) {
        let merged = totals
            .into_iter()
            .map(|(room, total)| {
                let mine = reported.get(&room).copied().unwrap_or(0);
                (room, (total, mine))
            })
            .collect();
        *self.totals.write().unwrap_or_else(|p| p.into_inner()) = merged;
    }
}

/// Reports every `period` until `shutdown`.
pub async fn report_loop(
    server: String,
    buckets: Arc<Buckets>,
    pool: Arc<LogicPool>,
    online: Arc<Online>,
    stats: Arc<crate::stats::Stats>,
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
        stats.set_rooms(rooms.len());
        let req = ReportOnlineReq {
            server: server.clone(),
            rooms: rooms.clone(),
        };
        match pool.report_online(req).await {
            Ok(reply) => {
                debug!(rooms = reply.rooms.len(), "online totals updated");
                online.set(&rooms, reply.rooms);
            }
            Err(e) => warn!(error = %e.message(), "reporting online counts failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn total_follows_local_changes_between_reports() {
        let o = Online::default();
        assert_eq!(o.total("r", 2), 2, "before any report: local only");
        let reported = HashMap::from([("r".to_string(), 2u32)]);
        o.set(&reported, HashMap::from([("r".to_string(), 5u64)]));
        assert_eq!(o.total("r", 2), 5);
        assert_eq!(
            o.total("r", 3),
            6,
            "a session that just joined counts itself"
        );
        assert_eq!(o.total("r", 0), 3);
    }
}
