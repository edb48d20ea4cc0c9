//! Discovery's families against a real etcd (`CHATROOM_TEST_ETCD`): nodes
//! known follow registrations, renewals are counted, and a lease lost under
//! a registration (revoked behind its back) counts a failed renewal and is
//! registered again.

use std::time::Duration;

use chatroom_common::metrics::{render, sample};
use chatroom_discovery::DiscoveryConfig;
use chatroom_discovery::metrics::DISCOVERY;
use chatroom_discovery::{Discovery, Node, Service};
use chatroom_tests::cluster::{required_env, unique};
use etcd_client::GetOptions;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const T: Duration = Duration::from_secs(15);

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + T;
    while !f() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_renewals_and_failures_and_nodes_known() {
    let endpoint = required_env("CHATROOM_TEST_ETCD");
    let prefix = format!("/{}", unique("disc-metrics"));
    let cfg = DiscoveryConfig::Etcd {
        endpoints: vec![endpoint.clone()],
        prefix: prefix.clone(),
        lease_ttl: Duration::from_secs(2),
    };
    let d = Discovery::connect(&cfg).await.unwrap();
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let mut conns = d
        .watch(Service::Conn, &tracker, stop.clone())
        .await
        .unwrap();
    let reg = d
        .register(
            Service::Conn,
            Node {
                id: "conn-m".into(),
                uri: "http://127.0.0.1:1".into(),
            },
            &tracker,
            stop.clone(),
        )
        .await
        .unwrap();
    let end = tokio::time::Instant::now() + T;
    while conns.borrow_and_update().is_empty() {
        tokio::time::timeout_at(end, conns.changed())
            .await
            .expect("the node shows in the watch")
            .unwrap();
    }
    until("nodes known = 1", || DISCOVERY.conn_nodes.get() == 1).await;
    assert!(DISCOVERY.registered.get() >= 1);
    let renewed = DISCOVERY.lease_renewals.get();
    until("a lease renewal", || {
        DISCOVERY.lease_renewals.get() > renewed
    })
    .await;

    // Revoke the lease under the registration: the next keep-alive fails.
    let failed = DISCOVERY.lease_renewals_failed.get();
    let mut etcd = etcd_client::Client::connect([endpoint.as_str()], None)
        .await
        .unwrap();
    let key = format!("{prefix}/conn/conn-m");
    let kv = etcd.get(key.as_str(), None).await.unwrap();
    let lease = kv.kvs()[0].lease();
    etcd.lease_revoke(lease).await.unwrap();
    until("a failed renewal", || {
        DISCOVERY.lease_renewals_failed.get() > failed
    })
    .await;
    // ... and the node registers again under a new lease.
    let end = tokio::time::Instant::now() + T;
    loop {
        let kv = etcd
            .get(key.as_str(), Some(GetOptions::new()))
            .await
            .unwrap();
        if kv.kvs().first().is_some_and(|k| k.lease() != lease) {
            break;
        }
        assert!(tokio::time::Instant::now() < end, "not registered again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = render(&[]);
    for (name, labels) in [
        ("chatroom_discovery_lease_renewals_failed_total", &[][..]),
        ("chatroom_discovery_lease_renewals_total", &[][..]),
        ("chatroom_discovery_nodes", &[("service", "conn")][..]),
    ] {
        assert!(
            sample(&text, name, labels).unwrap_or(0.0) >= 1.0,
            "{name} in\n{text}"
        );
    }
    reg.deregister().await;
    until("nodes known = 0", || DISCOVERY.conn_nodes.get() == 0).await;
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}
