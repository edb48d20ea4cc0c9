//! chatroom-bench: parses the command line and runs the library.

use std::io::Write;

use anyhow::Context;
use chatroom_bench::cli::{Cli, Cmd};
use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Worker => chatroom_bench::worker::serve_stdio().context("worker"),
        Cmd::FloorWriter(a) => {
            // One thread: the floor is what one core's writes cost.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(chatroom_bench::floor::writer(
                a.sessions,
                a.messages,
                std::time::Duration::from_micros(a.interval_us),
                a.size,
            ))
            .context("floor writer")
        }
        Cmd::Floor(a) => {
            let sources = if a.source_ips.is_empty() {
                Vec::new()
            } else {
                chatroom_bench::net::parse_source_ips(&a.source_ips)?
            };
            // The readers on both cores, as the generator's workers are.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let r = rt
                .block_on(chatroom_bench::floor::run(
                    a.sessions, a.rate, a.duration, a.size, &sources,
                ))
                .context("floor")?;
            let mut out = std::io::stdout().lock();
            out.write_all(r.table().as_bytes())?;
            if a.json {
                writeln!(out, "{}", serde_json::to_string(&r)?)?;
            }
            Ok(())
        }
        Cmd::Run(args) => {
            let cfg = args.to_config()?;
            // Single process: sessions and publishers share both cores.
            // Several: the parent only publishes and coordinates.
            let rt = if cfg.processes == 1 {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?
            } else {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
            };
            let report = rt
                .block_on(chatroom_bench::run(cfg))
                .context("benchmark run")?;
            let mut out = std::io::stdout().lock();
            out.write_all(report.table().as_bytes())?;
            if args.json {
                writeln!(out, "{}", report.json())?;
            }
            out.flush()?;
            // Sessions and worker processes end with the runtime.
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
            Ok(())
        }
    }
}
