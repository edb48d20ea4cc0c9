//! Service discovery: who the live conn and logic nodes are.
//!
//! With etcd, a node puts `<prefix>/<service>/<id>` = `<uri>` under a lease it
//! keeps alive; when the process dies the lease ends and the key disappears,
//! and every watcher drops the node. With static discovery the addresses come
//! from config and never change (standalone).
//!
//! Its own crate, so that what needs only the wire types (bench, the
//! cluster tests' clients) does not compile etcd-client.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use chatroom_backoff::Backoff;
use chatroom_common::metrics::Gauge;

pub mod config;
pub mod metrics;

pub use config::DiscoveryConfig;

/// Retries of etcd registration and listing after a failure: the first
/// within a second (as before), then slower while etcd stays away.
const RETRY_INITIAL: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// At start-up: names the configured endpoints.
    #[error("discovery.endpoints = {endpoints}: etcd unreachable")]
    Unreachable {
        endpoints: String,
        #[source]
        source: Option<etcd_client::Error>,
    },
}

/// The kinds of node that register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    Conn,
    Logic,
}

impl Service {
    pub fn as_str(self) -> &'static str {
        match self {
            Service::Conn => "conn",
            Service::Logic => "logic",
        }
    }
}

/// One live node: its id and the URI (`http://host:port`) of its gRPC server.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Node {
    pub id: String,
    pub uri: String,
}

/// The set of live nodes of one service, kept current in the background.
pub type NodesRx = watch::Receiver<Vec<Node>>;

/// Discovery backend chosen by config.
#[derive(Clone)]
pub enum Discovery {
    Static {
        logic: Vec<String>,
        conn: Vec<String>,
    },
    Etcd(Box<EtcdDiscovery>),
}

#[derive(Clone)]
pub struct EtcdDiscovery {
    client: Client,
    prefix: String,
    ttl: i64,
}

impl Discovery {
    pub async fn connect(cfg: &DiscoveryConfig) -> Result<Self, DiscoveryError> {
        metrics::init();
        match cfg {
            DiscoveryConfig::Static { logic, conn } => Ok(Discovery::Static {
                logic: logic.clone(),
                conn: conn.clone(),
            }),
            DiscoveryConfig::Etcd {
                endpoints,
                prefix,
                lease_ttl,
            } => {
                let opts = etcd_client::ConnectOptions::new()
                    .with_connect_timeout(Duration::from_secs(3))
                    .with_timeout(Duration::from_secs(5));
                let unreachable = |source| DiscoveryError::Unreachable {
                    endpoints: endpoints.join(","),
                    source,
                };
                let client = Client::connect(endpoints.clone(), Some(opts))
                    .await
                    .map_err(|e| unreachable(Some(e)))?;
                // Fail at start-up, not at first use, when etcd is down.
                let mut probe = client.clone();
                tokio::time::timeout(Duration::from_secs(5), probe.status())
                    .await
                    .map_err(|_| unreachable(None))?
                    .map_err(|e| unreachable(Some(e)))?;
                Ok(Discovery::Etcd(Box::new(EtcdDiscovery {
                    client,
                    prefix: prefix.trim_end_matches('/').to_string(),
                    ttl: i64::try_from(lease_ttl.as_secs()).unwrap_or(i64::MAX),
                })))
            }
        }
    }

    /// Announces this node until `shutdown` fires or [`Registration::deregister`].
    /// Static discovery has nothing to announce.
    pub async fn register(
        &self,
        service: Service,
        node: Node,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Registration, DiscoveryError> {
        match self {
            Discovery::Static { .. } => Ok(Registration { inner: None }),
            Discovery::Etcd(e) => e.register(service, node, tracker, shutdown).await,
        }
    }

    /// The live nodes of `service`, updated until `shutdown`.
    pub async fn watch(
        &self,
        service: Service,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<NodesRx, DiscoveryError> {
        match self {
            Discovery::Static { logic, conn } => {
                let list = match service {
                    Service::Logic => logic,
                    Service::Conn => conn,
                };
                let nodes: Vec<Node> = list.iter().map(|entry| static_node(entry)).collect();
                crate::metrics::DISCOVERY
                    .nodes_of(service.as_str())
                    .set(nodes.len() as i64);
                let (tx, rx) = watch::channel(nodes);
                // Keep the sender alive for as long as the service runs, so
                // receivers never see a closed channel.
                tracker.spawn(async move {
                    shutdown.cancelled().await;
                    drop(tx);
                });
                Ok(rx)
            }
            Discovery::Etcd(e) => e.watch(service, tracker, shutdown).await,
        }
    }
}

/// A static entry is `uri` or `id=uri` (so nodes can be addressed by the
/// same id they report, as in etcd).
fn static_node(entry: &str) -> Node {
    match entry.split_once('=') {
        Some((id, uri)) if !id.contains("://") => Node {
            id: id.to_string(),
            uri: normalize_uri(uri),
        },
        _ => Node {
            id: entry.to_string(),
            uri: normalize_uri(entry),
        },
    }
}

fn normalize_uri(u: &str) -> String {
    if u.starts_with("http://") || u.starts_with("https://") {
        u.to_string()
    } else {
        format!("http://{u}")
    }
}

/// A live registration; dropping it without `deregister` leaves the key to
/// expire with its lease.
pub struct Registration {
    inner: Option<(CancellationToken, tokio::sync::oneshot::Receiver<()>)>,
}

impl Registration {
    /// Removes the key now (revokes the lease) and waits until that is done.
    pub async fn deregister(self) {
        if let Some((stop, done)) = self.inner {
            stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(3), done).await;
        }
    }
}

impl EtcdDiscovery {
    fn key_prefix(&self, service: Service) -> String {
        format!("{}/{}/", self.prefix, service.as_str())
    }

    async fn register(
        &self,
        service: Service,
        node: Node,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Registration, DiscoveryError> {
        let key = format!("{}{}", self.key_prefix(service), node.id);
        let mut client = self.client.clone();
        let lease = put_with_lease(&mut client, &key, &node.uri, self.ttl).await?;
        info!(%key, uri = %node.uri, lease, ttl = self.ttl, "registered in etcd");
        crate::metrics::DISCOVERY.registered.inc();
        let stop = shutdown.child_token();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let ttl = self.ttl;
        let stop2 = stop.clone();
        tracker.spawn(async move {
            keep_alive(client, key, node.uri, ttl, lease, stop2).await;
            crate::metrics::DISCOVERY.registered.dec();
            let _ = done_tx.send(());
        });
        Ok(Registration {
            inner: Some((stop, done_rx)),
        })
    }

    async fn watch(
        &self,
        service: Service,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<NodesRx, DiscoveryError> {
        let prefix = self.key_prefix(service);
        let mut client = self.client.clone();
        let (nodes, rev) = list(&mut client, &prefix).await?;
        let gauge = crate::metrics::DISCOVERY.nodes_of(service.as_str()).clone();
        gauge.set(nodes.len() as i64);
        let (tx, rx) = watch::channel(to_vec(&nodes));
        tracker.spawn(watch_loop(client, prefix, nodes, rev, tx, gauge, shutdown));
        Ok(rx)
    }
}

async fn put_with_lease(
    client: &mut Client,
    key: &str,
    value: &str,
    ttl: i64,
) -> Result<i64, DiscoveryError> {
    let lease = client.lease_grant(ttl, None).await?.id();
    client
        .put(key, value, Some(PutOptions::new().with_lease(lease)))
        .await?;
    Ok(lease)
}

/// Renews the lease every ttl/3; if the lease is lost (etcd restarted, a long
/// pause), registers again. Revokes the lease when stopped.
async fn keep_alive(
    mut client: Client,
    key: String,
    uri: String,
    ttl: i64,
    mut lease: i64,
    stop: CancellationToken,
) {
    let period = Duration::from_millis((ttl as u64 * 1000 / 3).max(500));
    loop {
        match client.lease_keep_alive(lease).await {
            Ok((mut keeper, mut stream)) => loop {
                tokio::select! {
                    _ = stop.cancelled() => {
                        match client.lease_revoke(lease).await {
                            Ok(_) => info!(%key, "deregistered from etcd"),
                            Err(e) => warn!(%key, error = %e, "lease revoke failed; key expires with its lease"),
                        }
                        return;
                    }
                    _ = tokio::time::sleep(period) => {}
                }
                if let Err(e) = keeper.keep_alive().await {
                    crate::metrics::DISCOVERY.lease_renewals_failed.inc();
                    warn!(%key, error = %e, "lease keep-alive send failed");
                    break;
                }
                match stream.message().await {
                    Ok(Some(resp)) if resp.ttl() > 0 => {
                        crate::metrics::DISCOVERY.lease_renewals.inc();
                        debug!(%key, ttl = resp.ttl(), "lease renewed")
                    }
                    Ok(_) => {
                        crate::metrics::DISCOVERY.lease_renewals_failed.inc();
                        warn!(%key, "lease expired; registering again");
                        break;
                    }
                    Err(e) => {
                        crate::metrics::DISCOVERY.lease_renewals_failed.inc();
                        warn!(%key, error = %e, "lease keep-alive failed");
                        break;
                    }
                }
            },
            Err(e) => warn!(%key, error = %e, "lease keep-alive could not start"),
        }
        // Re-register with a fresh lease at once — when etcd comes back
        // after a partition every lease has expired, and the sooner each
        // node is back the shorter the others' pools are missing it (see
        // `GONE_GRACE`) — then retrying with backoff until stopped.
        let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
        loop {
            match put_with_lease(&mut client, &key, &uri, ttl).await {
                Ok(l) => {
                    lease = l;
                    info!(%key, lease, "registered in etcd again");
                    break;
                }
                Err(e) => warn!(%key, error = %e, "etcd registration failed; retrying"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }
}

async fn list(
    client: &mut Client,
    prefix: &str,
) -> Result<(BTreeMap<String, String>, i64), DiscoveryError> {
    let resp = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await?;
    let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
    let mut nodes = BTreeMap::new();
    for kv in resp.kvs() {
        if let (Ok(k), Ok(v)) = (kv.key_str(), kv.value_str()) {
            nodes.insert(k.trim_start_matches(prefix).to_string(), v.to_string());
        }
    }
    Ok((nodes, rev))
}

fn to_vec(nodes: &BTreeMap<String, String>) -> Vec<Node> {
    nodes
        .iter()
        .map(|(id, uri)| Node {
            id: id.clone(),
            uri: uri.clone(),
        })
        .collect()
}

/// How long a node whose key disappeared stays in the pool in case it
/// registers again. When etcd returns after being unreachable for longer
/// than the lease TTL it expires every lease at once, and every node
/// registers again within moments: without this grace each pool would be
/// empty in between (conn refusing sign-ins, job pushing to no one). A node
/// that really died leaves the pool this much after its lease ends.
pub const GONE_GRACE: Duration = Duration::from_secs(1);

/// etcd's view of one service plus the nodes that left it less than
/// [`GONE_GRACE`] ago.
struct View {
    nodes: BTreeMap<String, String>,
    gone: BTreeMap<String, (String, Instant)>,
}

impl View {
    fn put(&mut self, id: String, uri: String) {
        self.gone.remove(&id);
        self.nodes.insert(id, uri);
    }

    fn delete(&mut self, id: &str, now: Instant) {
        if let Some(uri) = self.nodes.remove(id) {
            self.gone.insert(id.to_string(), (uri, now + GONE_GRACE));
        }
    }

    /// Replaces etcd's view by a fresh listing (after a watch failure).
    fn relist(&mut self, fresh: BTreeMap<String, String>, now: Instant) {
        let old: Vec<String> = self.nodes.keys().cloned().collect();
        for id in old {
            if !fresh.contains_key(&id) {
                self.delete(&id, now);
            }
        }
        for (id, uri) in fresh {
            self.put(id, uri);
        }
    }

    /// Drops the nodes whose grace ended; true if any was dropped.
    fn expire(&mut self, prefix: &str, now: Instant) -> bool {
        let before = self.gone.len();
        self.gone.retain(|id, (_, until)| {
            let keep = *until > now;
            if !keep {
                info!(%prefix, %id, "node gone");
            }
            keep
        });
        before != self.gone.len()
    }

    fn next_expiry(&self) -> Option<Instant> {
        self.gone.values().map(|(_, t)| *t).min()
    }

    fn publish(&self, tx: &watch::Sender<Vec<Node>>, known: &Gauge) {
        let mut all = self.nodes.clone();
        for (id, (uri, _)) in &self.gone {
            all.entry(id.clone()).or_insert_with(|| uri.clone());
        }
        known.set(all.len() as i64);
        let _ = tx.send(to_vec(&all));
    }
}

/// Follows the prefix; on any watch failure lists again and resumes, so a
/// flaky etcd never leaves a stale view for long.
async fn watch_loop(
    mut client: Client,
    prefix: String,
    nodes: BTreeMap<String, String>,
    mut rev: i64,
    tx: watch::Sender<Vec<Node>>,
    known: Gauge,
    shutdown: CancellationToken,
) {
    let mut view = View {
        nodes,
        gone: BTreeMap::new(),
    };
    loop {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(rev + 1);
        match client.watch(prefix.as_str(), Some(opts)).await {
            Ok(mut stream) => loop {
                let expiry = view.next_expiry();
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = sleep_until(expiry) => {
                        if view.expire(&prefix, Instant::now()) {
                            view.publish(&tx, &known);
                        }
                        continue;
                    }
                    m = stream.message() => m,
                };
                match msg {
                    Ok(Some(resp)) => {
                        if resp.canceled() {
                            warn!(%prefix, reason = resp.cancel_reason(), "etcd watch cancelled");
                            break;
                        }
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            rev = rev.max(kv.mod_revision());
                            let id = kv
                                .key_str()
                                .unwrap_or_default()
                                .trim_start_matches(prefix.as_str())
                                .to_string();
                            match ev.event_type() {
                                EventType::Put => {
                                    let uri = kv.value_str().unwrap_or_default().to_string();
                                    info!(%prefix, %id, %uri, "node up");
                                    view.put(id, uri);
                                }
                                EventType::Delete => {
                                    info!(%prefix, %id, grace = ?GONE_GRACE, "node's key deleted");
                                    view.delete(&id, Instant::now());
                                }
                            }
                        }
                        view.publish(&tx, &known);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        warn!(%prefix, error = %e, "etcd watch failed");
                        break;
                    }
                }
            },
            Err(e) => warn!(%prefix, error = %e, "etcd watch could not start"),
        }
        // Resync from a fresh listing.
        let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
            match list(&mut client, &prefix).await {
                Ok((n, r)) => {
                    view.relist(n, Instant::now());
                    rev = r;
                    view.publish(&tx, &known);
                    break;
                }
                Err(e) => warn!(%prefix, error = %e, "etcd list failed; retrying"),
            }
        }
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deleted_node_stays_for_the_grace_unless_it_returns() {
        let t0 = Instant::now();
        let mut v = View {
            nodes: BTreeMap::from([
                ("a".into(), "http://a".into()),
                ("b".into(), "http://b".into()),
            ]),
            gone: BTreeMap::new(),
        };
        v.delete("a", t0);
        v.delete("b", t0);
        // Both still served; "a" registers again, "b" does not.
        assert_eq!(v.next_expiry(), Some(t0 + GONE_GRACE));
        v.put("a".into(), "http://a2".into());
        assert!(!v.expire("p", t0 + GONE_GRACE / 2));
        assert!(v.expire("p", t0 + GONE_GRACE));
        assert_eq!(v.nodes.keys().collect::<Vec<_>>(), ["a"]);
        assert!(v.gone.is_empty());
        // A relisting that lacks a node starts its grace too.
        v.relist(BTreeMap::new(), t0);
        assert_eq!(v.gone.len(), 1);
    }

    #[test]
    fn static_entries() {
        assert_eq!(
            static_node("conn-1=127.0.0.1:9000"),
            Node {
                id: "conn-1".into(),
                uri: "http://127.0.0.1:9000".into()
            }
        );
        let n = static_node("http://h:1/?a=b");
        assert_eq!(
            (n.id.as_str(), n.uri.as_str()),
            ("http://h:1/?a=b", "http://h:1/?a=b")
        );
    }
}
