//! Runs chatroom services as separate OS processes for the cluster tests:
//! picks free loopback ports, passes config through `CHATROOM__*`
//! environment variables, waits for readiness, and kills on drop.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use chatroom_discovery::DiscoveryConfig;
use chatroom_discovery::{Discovery, NodesRx, Service};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::nsq_broker::TestNsqd;

/// Folder of the built service binaries: `CHATROOM_BIN_DIR`, else the
/// workspace's `target/debug`. The test script builds them first.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("CHATROOM_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug"))
}

/// Path of one service binary, failing clearly when it was not built.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!(
            "{} is missing: build the binaries first (`cargo build --workspace --bins`, done by scripts/test.sh)",
            p.display()
        );
    }
    Ok(p)
}

/// A free port on 127.0.0.1, never one this process handed out before (a
/// port released by the probe can come straight back from the next probe).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("binding 127.0.0.1:0");
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A required test service address from the environment; a missing one is a
/// failure with instructions, never a silent skip.
pub fn required_env(var: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{var} is not set: run the suite with scripts/test.sh, which starts etcd and Redis and sets it"
        ),
    }
}

/// A unique name for keys and prefixes of one test run.
pub fn unique(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{tag}-{}-{nanos}", std::process::id())
}

/// One running service process.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log_dir: PathBuf,
}

impl Proc {
    /// Starts `bin` with `env` (on top of a log folder in `work`).
    pub fn spawn(
        name: &str,
        bin_name: &str,
        work: &std::path::Path,
        env: &[(String, String)],
    ) -> anyhow::Result<Proc> {
        let log_dir = work.join(name);
        std::fs::create_dir_all(&log_dir)?;
        let out = std::fs::File::create(log_dir.join("stdout.log"))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(bin(bin_name)?);
        cmd.env("CHATROOM__LOG__DIR", &log_dir)
            .env("NO_COLOR", "1")
            .env_remove("CHATROOM_CONFIG")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            name: name.into(),
            child,
            log_dir,
        })
    }

    /// Wraps a process started elsewhere (e.g. a real nsqd).
    pub fn adopt(name: &str, child: Child, log_dir: PathBuf) -> Proc {
        Proc {
            name: name.into(),
            child,
            log_dir,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// What the process printed so far (for failure messages).
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.log_dir.join("stdout.log")).unwrap_or_default()
    }

    /// SIGKILL: the process dies without deregistering.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, then wait up to `within` for the exit status.
    pub async fn terminate(
        &mut self,
        within: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.pid().context("already exited")?;
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?
            .success();
        if !ok {
            bail!("kill -TERM {pid} failed");
        }
        tokio::time::timeout(within, self.child.wait())
            .await
            .with_context(|| format!("{} did not exit within {within:?} of SIGTERM", self.name))?
            .map_err(Into::into)
    }

    /// Fails if the process has already exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("{} exited ({st}):\n{}", self.name, self.output());
        }
        Ok(())
    }
}

/// Waits until `addr` accepts TCP connections, or the process dies.
pub async fn wait_listening(
    p: &mut Proc,
    addr: SocketAddr,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        p.check_alive()?;
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "{} not listening on {addr} after {within:?}:\n{}",
                p.name,
                p.output()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `(key, value)` pairs from string slices.
pub fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Lease TTL of the test cluster's etcd registrations.
pub const LEASE_TTL: u64 = 3;
/// Deadline for one step of a cluster test.
pub const T: Duration = Duration::from_secs(15);

/// Where the services find the queue.
#[allow(clippy::large_enum_variant)] // one per test run
pub enum Queue {
    Broker(TestNsqd),
    /// A real nsqd registered with a real nsqlookupd; job finds nsqd only
    /// through nsqlookupd.
    Real {
        tcp: SocketAddr,
        http: SocketAddr,
        lookupd_http: SocketAddr,
        /// nsqd, then nsqlookupd.
        procs: Vec<Proc>,
        /// nsqd's program and arguments, to start it again on the same
        /// ports and data folder.
        nsqd_cmd: (PathBuf, Vec<String>),
        _dir: TempDir,
    },
}

impl Queue {
    /// Restarts the broker. A real nsqd gets SIGTERM — it writes what it
    /// holds in memory (queued and in flight) to its data folder before
    /// exiting — and is started again on the same ports and folder. The
    /// test broker, which keeps no disk queue, drops every connection and
    /// keeps its queues: what a restart with a durable queue looks like
    /// to its clients.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        match self {
            Queue::Broker(b) => {
                b.drop_connections();
                Ok(())
            }
            Queue::Real {
                tcp,
                procs,
                nsqd_cmd,
                ..
            } => {
                let st = procs[0].terminate(T).await?;
                anyhow::ensure!(st.success(), "nsqd exit status {st}");
                let mut p = spawn_quiet("nsqd", &nsqd_cmd.0, &nsqd_cmd.1);
                wait_listening(&mut p, *tcp, T).await?;
                procs[0] = p;
                Ok(())
            }
        }
    }
}

fn spawn_quiet(name: &str, bin: &std::path::Path, args: &[String]) -> Proc {
    let mut c = Command::new(bin);
    c.args(args)
        .kill_on_drop(true)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = c.spawn().unwrap_or_else(|e| panic!("starting {name}: {e}"));
    Proc::adopt(name, child, std::env::temp_dir())
}

/// How one node was started: name, binary, environment.
type NodeSpec = (String, &'static str, Vec<(String, String)>);

/// Two logic, two conn and two job processes on etcd, Redis, PostgreSQL
/// and a queue.
pub struct Cluster {
    _work: TempDir,
    pub prefix: String,
    /// The etcd endpoint the nodes register with.
    pub etcd: String,
    /// How each node was started (name, binary, environment), to start it
    /// again the same way.
    specs: Vec<NodeSpec>,
    /// HTTP API of every logic node.
    pub https: Vec<String>,
    /// HTTP API of the first logic node.
    pub http: String,
    pub ws_a: String,
    pub ws_b: String,
    pub conn_a: Proc,
    pub conn_b: Proc,
    pub others: Vec<Proc>,
    /// `http://addr` of every node's `/metrics` + `/readyz`: logic's HTTP
    /// listener, conn's and job's admin listener, by node name.
    pub admin: Vec<(String, String)>,
    pub queue: Queue,
}

/// A temporary folder, removed on drop unless a test is failing (kept for
/// the logs).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(unique(tag));
        std::fs::create_dir_all(&p).expect("creating temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A fresh PostgreSQL database on the server of `CHATROOM_TEST_PG`; its URL.
pub async fn fresh_pg_database(tag: &str) -> String {
    create_pg_database(&required_env("CHATROOM_TEST_PG"), tag).await
}

/// A fresh database on the server `base` (`postgres://…/<database>`)
/// points at; its URL.
pub async fn create_pg_database(base: &str, tag: &str) -> String {
    use sqlx::Connection;
    let name: String = unique(tag)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let mut conn = sqlx::PgConnection::connect(base)
        .await
        .unwrap_or_else(|e| panic!("connecting to {base}: {e}"));
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut conn)
        .await
        .expect("creating a test database");
    let _ = conn.close().await;
    match base.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{name}"),
        None => panic!("CHATROOM_TEST_PG must end in /<database>"),
    }
}

/// The nsqlookupd binary: `NSQLOOKUPD_BIN`, else `nsqlookupd` beside nsqd.
fn nsqlookupd_bin(nsqd: &std::path::Path) -> PathBuf {
    if let Some(p) = std::env::var_os("NSQLOOKUPD_BIN") {
        return PathBuf::from(p);
    }
    let sibling = nsqd.with_file_name("nsqlookupd");
    if sibling.exists() {
        return sibling;
    }
    panic!(
        "NSQD_BIN is set but NSQLOOKUPD_BIN is not, and there is no nsqlookupd beside {}: \
         the real-NSQ test needs both (nsq release archives ship them together)",
        nsqd.display()
    );
}

/// A real nsqlookupd + nsqd from `NSQD_BIN` / `NSQLOOKUPD_BIN`, or `None`
/// (with a notice) when `NSQD_BIN` is unset.
pub async fn start_nsqd() -> Option<Queue> {
    start_nsqd_with(&[]).await
}

/// [`start_nsqd`] with more nsqd flags (e.g. `--msg-timeout=3s`).
pub async fn start_nsqd_with(flags: &[&str]) -> Option<Queue> {
    let Some(bin) = std::env::var_os("NSQD_BIN").map(PathBuf::from) else {
        eprintln!(
            "NOTICE: NSQD_BIN is not set; the real-nsqd cluster test did not run (set NSQD_BIN=/path/to/nsqd)"
        );
        return None;
    };
    let lookupd_bin = nsqlookupd_bin(&bin);
    let work = TempDir::new("nsqd");
    let lookupd_tcp = free_addr();
    let lookupd_http = free_addr();
    let mut lookupd = spawn_quiet(
        "nsqlookupd",
        &lookupd_bin,
        &[
            format!("--tcp-address={lookupd_tcp}"),
            format!("--http-address={lookupd_http}"),
            "--broadcast-address=127.0.0.1".into(),
        ],
    );
    wait_listening(&mut lookupd, lookupd_http, T)
        .await
        .expect("nsqlookupd listening");
    let tcp = free_addr();
    let http_addr = free_addr();
    let mut args = vec![
        format!("--tcp-address={tcp}"),
        format!("--http-address={http_addr}"),
        format!("--data-path={}", work.0.display()),
        format!("--lookupd-tcp-address={lookupd_tcp}"),
        "--broadcast-address=127.0.0.1".into(),
    ];
    args.extend(flags.iter().map(|f| f.to_string()));
    let mut proc_ = spawn_quiet("nsqd", &bin, &args);
    wait_listening(&mut proc_, tcp, T)
        .await
        .expect("nsqd listening");
    Some(Queue::Real {
        tcp,
        http: http_addr,
        lookupd_http,
        procs: vec![proc_, lookupd],
        nsqd_cmd: (bin, args),
        _dir: work,
    })
}

/// What a test may change about the cluster it starts.
#[derive(Debug, Clone, Default)]
pub struct ClusterOpts {
    /// etcd endpoint; default `CHATROOM_TEST_ETCD`.
    pub etcd: Option<String>,
    /// Redis URL; default `CHATROOM_TEST_REDIS`.
    pub redis: Option<String>,
    /// logic's store URL; default a fresh database on `CHATROOM_TEST_PG`.
    pub store: Option<String>,
    /// Extra `CHATROOM__*` variables for every node.
    pub env: Vec<(String, String)>,
    /// Extra `CHATROOM__*` variables for the conn nodes only.
    pub conn_env: Vec<(String, String)>,
}

/// Starts the cluster: logic-0/1, conn-a/b, job-0/1.
pub async fn start_cluster(queue: Queue) -> Cluster {
    start_cluster_with(queue, ClusterOpts::default()).await
}

/// [`start_cluster`] on the services and settings of `opts`.
pub async fn start_cluster_with(queue: Queue, opts: ClusterOpts) -> Cluster {
    let etcd = opts
        .etcd
        .clone()
        .unwrap_or_else(|| required_env("CHATROOM_TEST_ETCD"));
    let redis = opts
        .redis
        .clone()
        .unwrap_or_else(|| required_env("CHATROOM_TEST_REDIS"));
    let work = TempDir::new("cluster");
    let store = match opts.store.clone() {
        Some(s) => s,
        None => fresh_pg_database("cluster").await,
    };
    let uploads = work.0.join("uploads");
    let id = unique("c");
    let prefix = format!("/test-{id}");
    let topic = format!("room-{}", id.replace(['/', ':'], "-"));
    let topic = &topic[..topic.len().min(60)];
    let ttl = format!("{LEASE_TTL}s");
    let common = env(&[
        ("CHATROOM__DISCOVERY__KIND", "etcd"),
        ("CHATROOM__DISCOVERY__ENDPOINTS", &etcd),
        ("CHATROOM__DISCOVERY__PREFIX", &prefix),
        ("CHATROOM__DISCOVERY__LEASE_TTL", &ttl),
        ("CHATROOM__SHUTDOWN_GRACE", "3s"),
        ("RUST_LOG", "info"),
    ]);
    let common: Vec<(String, String)> = common.into_iter().chain(opts.env.clone()).collect();
    let nsqd_tcp = match &queue {
        Queue::Broker(b) => b.tcp_addr().to_string(),
        Queue::Real { tcp, .. } => tcp.to_string(),
    };
    // job is never told where nsqd is: it asks nsqlookupd (the test
    // broker's built-in one, or a real nsqlookupd).
    let consumer_env = match &queue {
        Queue::Broker(b) => env(&[(
            "CHATROOM__QUEUE__LOOKUPD_HTTP_ADDRESSES",
            &format!("http://{}", b.http_addr()),
        )]),
        // Nobody creates the topic: job subscribes to every nsqd nsqlookupd
        // lists, and its SUB creates it (issue 13: no first-use delay).
        Queue::Real { lookupd_http, .. } => env(&[(
            "CHATROOM__QUEUE__LOOKUPD_HTTP_ADDRESSES",
            &format!("http://{lookupd_http}"),
        )]),
    };
    let mut admin = vec![];
    let mut specs = vec![];
    let mut others = vec![];
    let mut http_addrs = vec![];
    for i in 0..2 {
        let grpc = free_addr();
        let http_addr = free_addr();
        let mut e = common.clone();
        e.extend(env(&[
            ("CHATROOM__NODE__ID", &format!("logic-{i}")),
            ("CHATROOM__ID_NODE", &i.to_string()),
            ("CHATROOM__GRPC__ADDR", &grpc.to_string()),
            ("CHATROOM__HTTP__ADDR", &http_addr.to_string()),
            ("CHATROOM__QUEUE__KIND", "nsq"),
            ("CHATROOM__QUEUE__TOPIC", topic),
            ("CHATROOM__QUEUE__NSQD_TCP_ADDRESSES", &nsqd_tcp),
            ("CHATROOM__PRESENCE__KIND", "redis"),
            ("CHATROOM__PRESENCE__URL", &redis),
            ("CHATROOM__PRESENCE__PREFIX", &format!("{id}:")),
            ("CHATROOM__PRESENCE__ONLINE_TTL", "3s"),
            ("CHATROOM__TOKEN__SECRET", "cluster-test-secret-0123456789"),
            ("CHATROOM__STORE__URL", &store),
            ("CHATROOM__IM__UPLOAD_DIR", &uploads.to_string_lossy()),
            // Tests send faster than a person; the limiter has its own tests.
            ("CHATROOM__IM__CHAT_RATE_PER_SEC", "1000"),
            ("CHATROOM__IM__CHAT_BURST", "1000"),
        ]));
        let mut p = Proc::spawn(&format!("logic-{i}"), "chatroom-logic", &work.0, &e).unwrap();
        specs.push((format!("logic-{i}"), "chatroom-logic", e));
        wait_listening(&mut p, http_addr, T).await.unwrap();
        wait_listening(&mut p, grpc, T).await.unwrap();
        admin.push((format!("logic-{i}"), format!("http://{http_addr}")));
        http_addrs.push(http_addr);
        others.push(p);
    }
    let mut conns = vec![];
    let mut ws = vec![];
    for name in ["conn-a", "conn-b"] {
        let ws_addr = free_addr();
        let admin_addr = free_addr();
        let mut e = common.clone();
        e.extend(env(&[
            ("CHATROOM__NODE__ID", name),
            ("CHATROOM__ADMIN__ADDR", &admin_addr.to_string()),
            ("CHATROOM__WS__ADDR", &ws_addr.to_string()),
            ("CHATROOM__GRPC__ADDR", &free_addr().to_string()),
            ("CHATROOM__REPORT_ONLINE", "300ms"),
        ]));
        e.extend(opts.conn_env.clone());
        let mut p = Proc::spawn(name, "chatroom-conn", &work.0, &e).unwrap();
        specs.push((name.to_string(), "chatroom-conn", e));
        wait_listening(&mut p, ws_addr, T).await.unwrap();
        admin.push((name.to_string(), format!("http://{admin_addr}")));
        ws.push(format!("ws://{ws_addr}/room"));
        conns.push(p);
    }
    for i in 0..2 {
        let admin_addr = free_addr();
        admin.push((format!("job-{i}"), format!("http://{admin_addr}")));
        let mut e = common.clone();
        e.extend(consumer_env.clone());
        e.extend(env(&[
            ("CHATROOM__NODE__ID", &format!("job-{i}")),
            ("CHATROOM__ADMIN__ADDR", &admin_addr.to_string()),
            ("CHATROOM__QUEUE__KIND", "nsq"),
            ("CHATROOM__QUEUE__TOPIC", topic),
            ("CHATROOM__QUEUE__CHANNEL", "job"),
        ]));
        others.push(Proc::spawn(&format!("job-{i}"), "chatroom-job", &work.0, &e).unwrap());
        specs.push((format!("job-{i}"), "chatroom-job", e));
    }
    // Every node ready (registered, queue connected, store answering),
    // not merely listening.
    for (name, base) in &admin {
        if let Err(e) = crate::http::wait_ok(&format!("{base}/readyz"), T).await {
            let out: String = conns
                .iter()
                .chain(others.iter())
                .filter(|p| &p.name == name)
                .map(|p| p.output())
                .collect();
            panic!("{name}: {e:#}\n{out}");
        }
    }
    let conn_b = conns.pop().unwrap();
    let conn_a = conns.pop().unwrap();
    Cluster {
        _work: work,
        prefix,
        etcd,
        specs,
        https: http_addrs.iter().map(|a| format!("http://{a}")).collect(),
        http: format!("http://{}", http_addrs[0]),
        ws_a: ws[0].clone(),
        ws_b: ws[1].clone(),
        conn_a,
        conn_b,
        others,
        admin,
        queue,
    }
}

impl Cluster {
    /// The admin base URL (`http://addr`) of node `name`.
    pub fn admin_url(&self, name: &str) -> &str {
        self.admin
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, u)| u.as_str())
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// `GET /metrics` of node `name`.
    pub async fn scrape(&self, name: &str) -> anyhow::Result<String> {
        let url = format!("{}/metrics", self.admin_url(name));
        let (s, body) = crate::http::get_text(&url).await?;
        anyhow::ensure!(s == 200, "{url}: HTTP {s}: {body}");
        Ok(body)
    }

    /// The live conn nodes in etcd, kept current until `stop`.
    pub async fn watch_conns(&self, tracker: &TaskTracker, stop: CancellationToken) -> NodesRx {
        let cfg = DiscoveryConfig::Etcd {
            endpoints: vec![self.etcd.clone()],
            prefix: self.prefix.clone(),
            lease_ttl: Duration::from_secs(LEASE_TTL),
        };
        let d = Discovery::connect(&cfg).await.unwrap();
        d.watch(Service::Conn, tracker, stop).await.unwrap()
    }

    /// The process of node `name`.
    pub fn node_mut(&mut self, name: &str) -> &mut Proc {
        if self.conn_a.name == name {
            return &mut self.conn_a;
        }
        if self.conn_b.name == name {
            return &mut self.conn_b;
        }
        self.others
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Names of every node, logic first, then conn, then job.
    pub fn node_names(&self) -> Vec<String> {
        self.specs.iter().map(|s| s.0.clone()).collect()
    }

    /// Starts node `name` again as it was first started (same ports and
    /// settings; its log is appended to) and waits for its `/readyz`.
    pub async fn respawn(&mut self, name: &str) -> anyhow::Result<()> {
        let (_, bin_name, e) = self
            .specs
            .iter()
            .find(|s| s.0 == name)
            .cloned()
            .with_context(|| format!("no node {name}"))?;
        let old = self.node_mut(name).output();
        let p = Proc::spawn(&format!("{name}-again"), bin_name, &self._work.0, &e)?;
        let slot = self.node_mut(name);
        *slot = p;
        slot.name = name.to_string();
        let url = format!("{}/readyz", self.admin_url(name));
        if let Err(e) = crate::http::wait_ok(&url, T).await {
            bail!(
                "{name} restarted: {e:#}\n{old}\n{}",
                self.node_mut(name).output()
            );
        }
        Ok(())
    }

    /// The tail of every process's output, for failure messages.
    pub fn dump(&self) -> String {
        let mut s = String::new();
        for p in [&self.conn_a, &self.conn_b]
            .into_iter()
            .chain(self.others.iter())
        {
            s.push_str(&format!(
                "\n===== {} =====\n{}",
                p.name,
                tail(&p.output(), 40)
            ));
        }
        s
    }
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}
