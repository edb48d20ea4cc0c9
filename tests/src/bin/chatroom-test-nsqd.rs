//! chatroom-test-nsqd: the test NSQ broker ([`TestNsqd`]) as a process of
//! its own, for running the cluster by hand or in the benchmark script where
//! the real nsqd cannot be installed. It speaks nsqd's TCP protocol on
//! `--tcp-address` and answers nsqlookupd's `/lookup` (naming itself) on
//! `--http-address`, so logic publishes with
//! `CHATROOM__QUEUE__NSQD_TCP_ADDRESSES=<tcp>` and job subscribes with
//! `CHATROOM__QUEUE__LOOKUPD_HTTP_ADDRESSES=http://<http>`. Logs go to
//! stdout; it runs until SIGTERM or ctrl-c and then logs what it carried.
//! A test double: everything is in memory, nothing survives a restart.
//!
//! ```text
//! chatroom-test-nsqd [--tcp-address 127.0.0.1:4150] [--http-address 127.0.0.1:4161]
//!                    [--max-queue-depth 100000] [--max-connections 1024]
//! ```

use std::net::SocketAddr;

use anyhow::{Context, bail};
use chatroom_common::config::LogConfig;
use chatroom_tests::nsq_broker::{TestNsqd, TestNsqdConfig};

const USAGE: &str = "usage: chatroom-test-nsqd [--tcp-address HOST:PORT] [--http-address HOST:PORT] \
                     [--max-queue-depth N] [--max-connections N]";

/// The broker's settings from the command line (`--key value` or `--key=value`).
fn parse_args(args: impl IntoIterator<Item = String>) -> anyhow::Result<TestNsqdConfig> {
    let mut cfg = TestNsqdConfig {
        tcp_addr: SocketAddr::from(([127, 0, 0, 1], 4150)),
        http_addr: SocketAddr::from(([127, 0, 0, 1], 4161)),
        ..TestNsqdConfig::default()
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (arg, None),
        };
        if key == "-h" || key == "--help" {
            bail!("{USAGE}");
        }
        let value = match inline {
            Some(v) => v,
            None => args
                .next()
                .with_context(|| format!("{key} needs a value\n{USAGE}"))?,
        };
        let bad = || format!("{key}: bad value {value:?}\n{USAGE}");
        match key.as_str() {
            "--tcp-address" => cfg.tcp_addr = value.parse().with_context(bad)?,
            "--http-address" => cfg.http_addr = value.parse().with_context(bad)?,
            "--max-queue-depth" => cfg.max_queue_depth = value.parse().with_context(bad)?,
            "--max-connections" => cfg.max_connections = value.parse().with_context(bad)?,
            _ => bail!("unknown option {key}\n{USAGE}"),
        }
    }
    Ok(cfg)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = parse_args(std::env::args().skip(1))?;
    let _log = chatroom_common::telemetry::init(
        "test-nsqd",
        &LogConfig {
            dir: "".into(),
            level: "info".into(),
        },
    )?;
    let (tcp, http) = (cfg.tcp_addr, cfg.http_addr);
    // The broker logs its addresses itself once both listeners are bound.
    let broker = TestNsqd::try_start_with(cfg)
        .await
        .with_context(|| format!("binding {tcp} / {http}"))?;
    chatroom_common::stop_signal().await;
    tracing::info!(
        delivered = broker.delivered(),
        finished = broker.finished(),
        requeued = broker.requeued(),
        timed_out = broker.timed_out(),
        in_flight = broker.in_flight(),
        connections = broker.connections(),
        "test nsqd stopping"
    );
    broker.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<TestNsqdConfig> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn addresses_and_limits() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.tcp_addr.port(), 4150);
        assert_eq!(c.http_addr.port(), 4161);
        let c = parse(&[
            "--tcp-address",
            "127.0.0.1:5150",
            "--http-address=127.0.0.1:5161",
            "--max-queue-depth",
            "7",
        ])
        .unwrap();
        assert_eq!(c.tcp_addr, "127.0.0.1:5150".parse().unwrap());
        assert_eq!(c.http_addr, "127.0.0.1:5161".parse().unwrap());
        assert_eq!(c.max_queue_depth, 7);
        assert!(parse(&["--tcp-address"]).is_err());
        assert!(parse(&["--tcp-address", "nowhere"]).is_err());
        assert!(parse(&["--verbose", "1"]).is_err());
    }
}
