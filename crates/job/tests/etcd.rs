//! Discovery through a real etcd (`CHATROOM_TEST_ETCD`, e.g.
//! `http://127.0.0.1:23790`): job pushes to the conn nodes registered there
//! and stops pushing to one once it deregisters.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chatroom_discovery::DiscoveryConfig;
use chatroom_discovery::{Discovery, Node, Service};
use common::*;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn etcd_endpoint() -> String {
    std::env::var("CHATROOM_TEST_ETCD").unwrap_or_else(|_| {
        panic!(
            "CHATROOM_TEST_ETCD is not set: this test needs a real etcd \
             (e.g. CHATROOM_TEST_ETCD=http://127.0.0.1:23790); it does not skip"
        )
    })
}

#[tokio::test]
async fn pushes_to_registered_nodes_and_stops_when_one_leaves() {
    init_tracing();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let discovery_cfg = DiscoveryConfig::Etcd {
        endpoints: vec![etcd_endpoint()],
        prefix: format!("/chatroom-test/job-{}-{nanos}", std::process::id()),
        lease_ttl: Duration::from_secs(2),
    };
    let discovery = Discovery::connect(&discovery_cfg)
        .await
        .expect("etcd at CHATROOM_TEST_ETCD is reachable");
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();

    let (a, b) = (
        FakeConn::start(Mode::Ok).await,
        FakeConn::start(Mode::Ok).await,
    );
    let _reg_a = discovery
        .register(
            Service::Conn,
            Node {
                id: "conn-a".into(),
                uri: a.uri.clone(),
            },
            &tracker,
            stop.clone(),
        )
        .await
        .unwrap();
    let reg_b = discovery
        .register(
            Service::Conn,
            Node {
                id: "conn-b".into(),
                uri: b.uri.clone(),
            },
            &tracker,
            stop.clone(),
        )
        .await
        .unwrap();

    let mut cfg = config(Vec::new());
    cfg.discovery = discovery_cfg;
    cfg.batch.max_messages = 1;
    let job = Job::start(cfg).await;

    job.publish("r", N, "both").await;
    until(SECS5, "both nodes got the first message", || {
        a.msgs() == ["both"] && b.msgs() == ["both"]
    })
    .await;

    reg_b.deregister().await;
    // Probe until one reaches A but not B: job has dropped B.
    let mut i = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "job kept pushing to the node that left"
        );
        let probe = format!("probe{i}");
        job.publish("r", N, &probe).await;
        until(SECS5, "A got the probe", || a.msgs().contains(&probe)).await;
        if !b.msgs().contains(&probe) {
            break;
        }
        i += 1;
    }
    // From now on only A receives: it keeps getting everything, B nothing.
    let b_before = b.msgs();
    let after: Vec<String> = (0..5).map(|k| format!("after{k}")).collect();
    for m in &after {
        job.publish("r", N, m).await;
    }
    until(SECS5, "A got the later messages", || {
        a.msgs().ends_with(&after)
    })
    .await;
    assert_eq!(b.msgs(), b_before, "B received after it left discovery");
    assert!(
        b_before
            .iter()
            .all(|m| m == "both" || m.starts_with("probe"))
    );

    // A node that appears gets pushes too.
    let c = FakeConn::start(Mode::Ok).await;
    let _reg_c = discovery
        .register(
            Service::Conn,
            Node {
                id: "conn-c".into(),
                uri: c.uri.clone(),
            },
            &tracker,
            stop.clone(),
        )
        .await
        .unwrap();
    let mut k = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while c.msgs().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "job never pushed to the node that joined"
        );
        let probe = format!("join{k}");
        job.publish("r", N, &probe).await;
        until(SECS5, "A got the join probe", || a.msgs().contains(&probe)).await;
        k += 1;
    }
    assert!(c.msgs().iter().all(|m| m.starts_with("join")));
    assert_eq!(b.msgs(), b_before, "B still gets nothing");

    let metrics = job.metrics.clone();
    job.stop(SECS5).await;
    stop.cancel();
    tracker.close();
    tracker.wait().await;
    let m = metrics.snapshot();
    assert_eq!(m.requeued, 0);
    assert_eq!(
        m.push_failures, 0,
        "B was dropped, not pushed to and failed"
    );
}
