//! `deploy/docker-compose.yml` checked without a container engine: every
//! container has a health check and waits for healthy dependencies; every
//! chatroom service runs a real binary with a config file the image ships,
//! and with its environment that binary's `--check-config` accepts the
//! config — each `CHATROOM__*` variable names a real key, each published
//! and health-checked port is one the service binds; Prometheus scrapes
//! every chatroom node on its metrics port.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use chatroom_tests::cluster::bin;
use serde_yaml_ng::Value;

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn compose() -> Value {
    let text = std::fs::read_to_string(deploy().join("docker-compose.yml")).unwrap();
    let mut v: Value = serde_yaml_ng::from_str(&text).expect("docker-compose.yml is YAML");
    v.apply_merge().expect("merge keys resolve");
    v
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

fn list(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("expected a list, got {v:?}"))
        .iter()
        .map(s)
        .collect()
}

/// The port of a `host:port` / `http://host:port/...` string.
fn port_of(addr: &str) -> Option<u16> {
    let rest = addr.split("://").last()?;
    let hostport = rest.split('/').next()?;
    hostport.rsplit_once(':')?.1.parse().ok()
}

struct Service {
    name: String,
    v: Value,
}

fn services() -> Vec<Service> {
    let c = compose();
    let m = c["services"].as_mapping().expect("services").clone();
    m.into_iter()
        .map(|(k, v)| Service { name: s(&k), v })
        .collect()
}

/// Runs `binary --config <file> --check-config` with `env`; the printed config.
fn check_config(binary: &str, file: &PathBuf, env: &BTreeMap<String, String>) -> String {
    let out = Command::new(bin(binary).unwrap())
        .arg("--config")
        .arg(file)
        .arg("--check-config")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .output()
        .expect("running --check-config");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{binary} --check-config refused the compose environment {env:?}:\n{text}"
    );
    assert!(text.contains("config OK"), "{text}");
    text
}

#[test]
fn every_container_is_health_checked_and_waits_for_healthy_dependencies() {
    let all = services();
    let names: BTreeSet<String> = all.iter().map(|s| s.name.clone()).collect();
    for svc in &all {
        let hc = &svc.v["healthcheck"]["test"];
        let test = list(hc);
        assert_eq!(
            test.first().map(String::as_str),
            Some("CMD"),
            "{}: {test:?}",
            svc.name
        );
        if let Some(deps) = svc.v.get("depends_on") {
            let deps = deps
                .as_mapping()
                .unwrap_or_else(|| panic!("{}: depends_on must name conditions", svc.name));
            for (dep, cond) in deps {
                let dep = s(dep);
                assert!(
                    names.contains(&dep),
                    "{}: depends on unknown {dep}",
                    svc.name
                );
                assert_eq!(
                    s(&cond["condition"]),
                    "service_healthy",
                    "{} -> {dep}",
                    svc.name
                );
            }
        }
    }
    // Two of each chatroom service, nsqadmin and Prometheus.
    for prefix in ["logic-", "conn-", "job-"] {
        assert_eq!(
            names.iter().filter(|n| n.starts_with(prefix)).count(),
            2,
            "two {prefix}* services"
        );
    }
    for n in [
        "nsqadmin",
        "prometheus",
        "nsqd",
        "nsqlookupd",
        "etcd",
        "redis",
        "postgres",
    ] {
        assert!(names.contains(n), "{n} missing");
    }
    // Named volumes for PostgreSQL and uploads.
    let c = compose();
    let vols = c["volumes"].as_mapping().expect("named volumes");
    for v in ["pgdata", "uploads"] {
        assert!(vols.contains_key(Value::String(v.into())), "volume {v}");
    }
    let pg = all.iter().find(|s| s.name == "postgres").unwrap();
    assert!(
        list(&pg.v["volumes"])
            .iter()
            .any(|m| m.starts_with("pgdata:"))
    );
    for svc in all.iter().filter(|s| s.name.starts_with("logic-")) {
        assert!(
            list(&svc.v["volumes"])
                .iter()
                .any(|m| m.starts_with("uploads:")),
            "{} shares the uploads volume",
            svc.name
        );
    }
}

#[test]
fn chatroom_services_match_what_the_binaries_accept() {
    let dockerfile = std::fs::read_to_string(deploy().join("Dockerfile")).unwrap();
    let mut metrics_targets = BTreeSet::new();
    let mut checked = 0;
    for svc in services() {
        let Some(cmd) = svc.v.get("command") else {
            continue;
        };
        let cmd = list(cmd);
        if !cmd[0].starts_with("chatroom") {
            continue;
        }
        checked += 1;
        let binary = cmd[0].as_str();
        assert!(
            dockerfile.contains(&format!("/src/target/release/{binary}")),
            "{}: the image does not ship {binary}",
            svc.name
        );
        assert_eq!(cmd.len(), 3, "{}: {cmd:?}", svc.name);
        assert_eq!(cmd[1], "--config", "{}: {cmd:?}", svc.name);
        let in_image = PathBuf::from(&cmd[2]);
        let file_name = in_image.file_name().unwrap().to_string_lossy().to_string();
        assert_eq!(
            in_image.parent().unwrap(),
            std::path::Path::new("/etc/chatroom"),
            "{}",
            svc.name
        );
        assert!(
            dockerfile.contains(&format!("deploy/{file_name}")),
            "{}: the image does not ship {file_name}",
            svc.name
        );
        let file = deploy().join(&file_name);
        let env: BTreeMap<String, String> = svc.v["environment"]
            .as_mapping()
            .unwrap_or_else(|| panic!("{}: environment", svc.name))
            .iter()
            .map(|(k, v)| (s(k), s(v)))
            .collect();
        let printed = check_config(binary, &file, &env);
        // Each CHATROOM__* variable names a key the config has (the
        // discovery and queue sections tolerate unknown keys, so look).
        for (k, v) in &env {
            let Some(path) = k.strip_prefix("CHATROOM__") else {
                continue;
            };
            let key = path.rsplit("__").next().unwrap().to_ascii_lowercase();
            assert!(
                printed.contains(&format!("{key}: ")),
                "{}: {k} names no config key ({key}):\n{printed}",
                svc.name
            );
            let shown = v.split(',').next().unwrap();
            assert!(
                printed.contains(shown),
                "{}: {k}={v} not in the loaded config:\n{printed}",
                svc.name
            );
        }
        // The ports it publishes and health-checks are ones it binds.
        let bound: BTreeSet<u16> = printed
            .lines()
            .filter(|l| l.trim_start().starts_with("addr: "))
            .filter_map(|l| {
                port_of(
                    l.trim()
                        .trim_end_matches(',')
                        .trim_start_matches("addr: ")
                        .trim_matches('"'),
                )
            })
            .collect();
        if let Some(ports) = svc.v.get("ports") {
            for p in list(ports) {
                let container: u16 = p.rsplit(':').next().unwrap().parse().unwrap();
                assert!(
                    bound.contains(&container),
                    "{}: publishes {p} but binds {bound:?}",
                    svc.name
                );
            }
        }
        let test = list(&svc.v["healthcheck"]["test"]);
        let url = test
            .iter()
            .find(|a| a.starts_with("http://"))
            .unwrap_or_else(|| panic!("{}: health check must ask a URL: {test:?}", svc.name));
        assert!(url.ends_with("/readyz"), "{}: {url}", svc.name);
        let hp = port_of(url).unwrap();
        assert!(
            bound.contains(&hp),
            "{}: health check on {hp}, binds {bound:?}",
            svc.name
        );
        metrics_targets.insert(format!("{}:{hp}", svc.name));
    }
    assert_eq!(checked, 6, "two logic, two conn, two job");

    // Prometheus scrapes exactly those nodes, on the ports serving /metrics.
    let prom: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(deploy().join("prometheus.yml")).unwrap())
            .unwrap();
    let mut scraped = BTreeSet::new();
    for job in prom["scrape_configs"].as_sequence().unwrap() {
        for sc in job["static_configs"].as_sequence().unwrap() {
            scraped.extend(list(&sc["targets"]));
        }
    }
    assert_eq!(scraped, metrics_targets, "prometheus.yml targets");
}

#[test]
fn check_config_refuses_unknown_keys_and_bad_values() {
    let file = deploy().join("conn.toml");
    for (k, v) in [
        ("CHATROOM__WS__NO_SUCH_KEY", "1"),
        ("CHATROOM__ADMIN__ADDR", "not an address"),
    ] {
        let out = Command::new(bin("chatroom-conn").unwrap())
            .arg("--config")
            .arg(&file)
            .arg("--check-config")
            .env(k, v)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{k}={v} accepted");
    }
}
