//! Private instances of the backing services (etcd, Redis, PostgreSQL) that
//! a chaos scenario may stop, freeze and restart on the same port and data
//! folder — never the shared ones named by `CHATROOM_TEST_*`, which other
//! tests are using at the same time.

use anyhow::{Context, bail};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::process::Command;

use crate::cluster::{Proc, T, TempDir, free_addr, wait_listening};

/// A program the scenario needs, found on `PATH`; missing is a failure with
/// instructions, never a skip.
fn program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not on PATH: the chaos suite starts its own instance \
                 (scripts/test.sh apt-installs it; or `apt-get install {name}`)"
            )
        })
}

/// Sends `sig` (`-STOP`, `-CONT`, `-TERM`) to `pid`.
pub fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()?
        .success();
    anyhow::ensure!(ok, "kill {sig} {pid} failed");
    Ok(())
}

/// A single-member etcd on its own data folder.
pub struct OwnEtcd {
    pub url: String,
    client: SocketAddr,
    peer: SocketAddr,
    dir: TempDir,
    proc_: Option<Proc>,
}

impl OwnEtcd {
    pub async fn start() -> OwnEtcd {
        let mut e = OwnEtcd {
            url: String::new(),
            client: free_addr(),
            peer: free_addr(),
            dir: TempDir::new("etcd"),
            proc_: None,
        };
        e.url = format!("http://{}", e.client);
        e.spawn().await.expect("starting a private etcd");
        e
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let (c, p) = (self.client, self.peer);
        let mut cmd = Command::new(program("etcd"));
        cmd.args([
            "--name".to_string(),
            "chaos".into(),
            "--data-dir".into(),
            self.dir.0.join("data").display().to_string(),
            "--listen-client-urls".into(),
            format!("http://{c}"),
            "--advertise-client-urls".into(),
            format!("http://{c}"),
            "--listen-peer-urls".into(),
            format!("http://{p}"),
            "--initial-advertise-peer-urls".into(),
            format!("http://{p}"),
            "--initial-cluster".into(),
            format!("chaos=http://{p}"),
        ]);
        let mut proc_ = adopt("etcd", cmd, &self.dir.0)?;
        wait_listening(&mut proc_, c, T).await?;
        crate::http::wait_ok(&format!("{}/health", self.url), T).await?;
        self.proc_ = Some(proc_);
        Ok(())
    }

    fn pid(&self) -> anyhow::Result<u32> {
        self.proc_
            .as_ref()
            .and_then(|p| p.pid())
            .context("etcd is not running")
    }

    /// SIGSTOP: the process stays, every request to it hangs — a network
    /// partition as the nodes see it, with no connection refused.
    pub fn freeze(&self) -> anyhow::Result<()> {
        signal(self.pid()?, "-STOP")
    }

    pub async fn thaw(&self) -> anyhow::Result<()> {
        signal(self.pid()?, "-CONT")?;
        crate::http::wait_ok(&format!("{}/health", self.url), T).await
    }
}

/// A Redis with nothing persisted: a restart loses every key, so presence
/// must be rebuilt by the nodes.
pub struct OwnRedis {
    pub url: String,
    addr: SocketAddr,
    dir: TempDir,
    proc_: Option<Proc>,
}

impl OwnRedis {
    pub async fn start() -> OwnRedis {
        let addr = free_addr();
        let mut r = OwnRedis {
            url: format!("redis://{addr}/"),
            addr,
            dir: TempDir::new("redis"),
            proc_: None,
        };
        r.spawn().await.expect("starting a private redis");
        r
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(program("redis-server"));
        cmd.args([
            "--port".to_string(),
            self.addr.port().to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
            "--dir".into(),
            self.dir.0.display().to_string(),
        ]);
        let mut proc_ = adopt("redis", cmd, &self.dir.0)?;
        wait_listening(&mut proc_, self.addr, T).await?;
        self.proc_ = Some(proc_);
        Ok(())
    }

    /// SIGKILL and start again on the same port: every key is gone.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(mut p) = self.proc_.take() {
            p.kill().await;
        }
        self.spawn().await
    }
}

/// A PostgreSQL cluster of its own (initdb), run as the `postgres` user
/// when the tests run as root (PostgreSQL refuses root).
pub struct OwnPg {
    /// `postgres://postgres@127.0.0.1:port/postgres`.
    pub url: String,
    port: u16,
    bin: PathBuf,
    dir: TempDir,
}

fn pg_bin() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("pg_ctl").is_file())
        .collect();
    // Newest major version last (directory names are the version numbers).
    dirs.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop().unwrap_or_else(|| {
        panic!(
            "no PostgreSQL in /usr/lib/postgresql/*/bin: the chaos suite starts its own \
             (scripts/test.sh apt-installs it; or `apt-get install postgresql`)"
        )
    })
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

impl OwnPg {
    pub async fn start() -> OwnPg {
        let port = free_addr().port();
        let pg = OwnPg {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            port,
            bin: pg_bin(),
            dir: TempDir::new("pg"),
        };
        // The folder must be the postgres user's before initdb.
        let _ = std::fs::set_permissions(
            &pg.dir.0,
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        );
        let data = pg.dir.0.join("data");
        pg.run(&format!(
            "'{}' -D '{}' -A trust -U postgres >'{}/initdb.log' 2>&1",
            pg.bin.join("initdb").display(),
            data.display(),
            pg.dir.0.display()
        ))
        .await
        .expect("initdb of a private PostgreSQL");
        pg.up().await.expect("starting a private PostgreSQL");
        pg
    }

    async fn run(&self, sh: &str) -> anyhow::Result<()> {
        let mut cmd = if is_root() {
            let mut c = Command::new("su");
            c.args(["postgres", "-s", "/bin/sh", "-c", sh]);
            c
        } else {
            let mut c = Command::new("sh");
            c.args(["-c", sh]);
            c
        };
        let out = cmd.stdin(Stdio::null()).output().await?;
        if !out.status.success() {
            bail!(
                "`{sh}` failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn pg_ctl(&self, action: &str) -> String {
        let d = &self.dir.0;
        format!(
            "'{}' -D '{}/data' -l '{}/server.log' -w -t 30 -o \"-p {} -k '{}' -c listen_addresses=127.0.0.1 -c fsync=off\" {action}",
            self.bin.join("pg_ctl").display(),
            d.display(),
            d.display(),
            self.port,
            d.display()
        )
    }

    /// Starts the server on its port and data folder.
    pub async fn up(&self) -> anyhow::Result<()> {
        self.run(&self.pg_ctl("start")).await
    }

    /// Stops it the way a crash would (`-m immediate`: no checkpoint, open
    /// connections cut); what was committed survives.
    pub async fn down(&self) -> anyhow::Result<()> {
        self.run(&self.pg_ctl("-m immediate stop")).await
    }

    /// A fresh database on this server; its URL.
    pub async fn database(&self, tag: &str) -> String {
        crate::cluster::create_pg_database(&self.url, tag).await
    }
}

impl Drop for OwnPg {
    fn drop(&mut self) {
        let sh = self.pg_ctl("-m immediate stop");
        let _ = if is_root() {
            std::process::Command::new("su")
                .args(["postgres", "-s", "/bin/sh", "-c", &sh])
                .output()
        } else {
            std::process::Command::new("sh").args(["-c", &sh]).output()
        };
    }
}

/// Spawns `cmd` with its output in `dir/<name>-log/stdout.log`, killed on drop.
fn adopt(name: &str, mut cmd: Command, dir: &Path) -> anyhow::Result<Proc> {
    let log_dir = dir.join(format!("{name}-log"));
    std::fs::create_dir_all(&log_dir)?;
    let out = std::fs::File::create(log_dir.join("stdout.log"))?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .kill_on_drop(true);
    let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    Ok(Proc::adopt(name, child, log_dir))
}
