//! What the binaries say when start-up fails: one line naming the path, port
//! or key that failed and why, exit status 1, and no backtrace unless
//! `RUST_BACKTRACE` asks for one.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use chatroom_tests::cluster::{bin, free_addr, unique};

/// A scratch working directory, removed afterwards.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(unique(tag));
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `name` in `cwd` with `env`, without any backtrace variable, and
/// waits (bounded) for it to exit.
fn run(name: &str, cwd: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin(name).unwrap());
    cmd.current_dir(cwd)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .env_remove("RUST_LOG")
        .envs(env.iter().copied());
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            panic!("{name} did not exit within 30 s on a failed start-up");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_file_where_the_log_folder_should_be_is_named() {
    let dir = Dir::new("startup-log");
    std::fs::write(dir.0.join("log"), b"").unwrap();
    let ws = free_addr().to_string();
    let http = free_addr().to_string();
    let o = run(
        "chatroom",
        &dir.0,
        &[
            ("CHATROOM__CONN__WS__ADDR", ws.as_str()),
            ("CHATROOM__LOGIC__HTTP__ADDR", http.as_str()),
        ],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("chatroom: error: log.dir = log: cannot create the folder: File exists"),
        "{err}"
    );
    assert!(!err.to_lowercase().contains("backtrace"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn a_busy_port_is_named_with_its_key() {
    let dir = Dir::new("startup-port");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let http = free_addr().to_string();
    let o = run(
        "chatroom",
        &dir.0,
        &[
            ("CHATROOM__LOG__DIR", ""),
            ("CHATROOM__CONN__WS__ADDR", busy_addr.as_str()),
            ("CHATROOM__LOGIC__HTTP__ADDR", http.as_str()),
        ],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("conn.ws.addr = {busy_addr}: ")),
        "{err}"
    );
    assert!(err.contains("in use"), "{err}");
}

#[test]
fn an_unreachable_database_is_named_without_its_password() {
    let dir = Dir::new("startup-db");
    let dead = free_addr();
    let url = format!("postgres://app:s3cret@{dead}/chat");
    let o = run(
        "chatroom-logic",
        &dir.0,
        &[
            ("CHATROOM__LOG__DIR", ""),
            ("CHATROOM__HTTP__ADDR", "127.0.0.1:0"),
            ("CHATROOM__GRPC__ADDR", "127.0.0.1:0"),
            ("CHATROOM__STORE__URL", url.as_str()),
        ],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let line = err.lines().last().unwrap_or_default();
    assert!(
        line.contains(&format!("store.url = postgres://app:***@{dead}/chat")),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
}

#[test]
fn a_key_the_standalone_process_would_ignore_is_refused() {
    let dir = Dir::new("startup-ignored");
    let o = run(
        "chatroom",
        &dir.0,
        &[("CHATROOM__JOB__LOG__DIR", "elsewhere")],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("job.log.dir") && err.contains("not used"),
        "{err}"
    );
}
