//! Runs chatroom services as separate OS processes for the cluster tests:
//! picks free loopback ports, passes config through `CHATROOM__*`
//! environment variables, waits for readiness, and kills on drop.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

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

/// A free port on 127.0.0.1 (bound and released; the OS does not hand it
/// out again straight away).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
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
