//! The admin listeners of conn and job (and logic's HTTP listener) in one
//! standalone process, after real traffic: `/metrics` families move,
//! `/healthz` and `/readyz` answer, conn's gRPC health service serves, and
//! a job without its queue is not ready.

use std::time::Duration;

use chatroom_common::config::Load;
use chatroom_common::metrics::sample;
use chatroom_common::proto::protocol::MsgLevel;
use chatroom_tests::client::Client;
use chatroom_tests::cluster::free_addr;
use chatroom_tests::http;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const T: Duration = Duration::from_secs(15);

fn v(t: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(t, name, labels).unwrap_or(0.0)
}

async fn scrape(base: &str) -> String {
    let (s, body) = http::get_text(&format!("{base}/metrics")).await.unwrap();
    assert_eq!(s, 200, "{body}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_admin_listeners_after_traffic() {
    let dir = std::env::temp_dir().join(chatroom_tests::cluster::unique("admin"));
    std::fs::create_dir_all(&dir).unwrap();
    let db = format!("sqlite://{}/im.db?mode=rwc", dir.display());
    let uploads = dir.join("uploads").display().to_string();
    let (conn_admin, job_admin) = (free_addr().to_string(), free_addr().to_string());
    let cfg = chatroom::StandaloneConfig::from_overrides([
        ("CHATROOM__LOG__DIR", ""),
        ("CHATROOM__CONN__WS__ADDR", "127.0.0.1:0"),
        ("CHATROOM__CONN__ADMIN__ADDR", conn_admin.as_str()),
        ("CHATROOM__JOB__ADMIN__ADDR", job_admin.as_str()),
        ("CHATROOM__CONN__NODE__ID", "conn-admin-test"),
        ("CHATROOM__JOB__NODE__ID", "job-admin-test"),
        ("CHATROOM__LOGIC__HTTP__ADDR", "127.0.0.1:0"),
        ("CHATROOM__LOGIC__STORE__URL", db.as_str()),
        ("CHATROOM__LOGIC__IM__UPLOAD_DIR", uploads.as_str()),
    ])
    .unwrap();
    let listeners = chatroom::Listeners::bind(&cfg).await.unwrap();
    let ws = format!("ws://{}/room", listeners.ws.local_addr().unwrap());
    let logic = format!("http://{}", listeners.http.local_addr().unwrap());
    let stop = CancellationToken::new();
    let server = tokio::spawn(chatroom::run(cfg, listeners, stop.clone()));
    let (conn, job) = (
        format!("http://{conn_admin}"),
        format!("http://{job_admin}"),
    );

    for base in [&logic, &conn, &job] {
        http::wait_ok(&format!("{base}/readyz"), T).await.unwrap();
        let (s, body) = http::get_text(&format!("{base}/healthz")).await.unwrap();
        assert_eq!(s, 200, "{base}: {body}");
    }
    let conn_before = scrape(&conn).await;
    let job_before = scrape(&job).await;

    // Traffic: two sessions in a room, messages between them, a bad frame.
    let tok_a = http::token(&logic, "alice").await.unwrap();
    let tok_b = http::token(&logic, "bob").await.unwrap();
    let mut a = Client::signed_in(&ws, &tok_a, "lobby").await.unwrap();
    let mut b = Client::signed_in(&ws, &tok_b, "lobby").await.unwrap();
    for i in 0..5 {
        a.send_message("lobby", MsgLevel::Normal, format!("m{i}").as_bytes())
            .await
            .unwrap();
    }
    let mut got = 0;
    while got < 5 {
        got += b.recv_messages(1, T).await.unwrap().len();
    }
    let mut bad = Client::connect(&ws).await.unwrap();
    bad.send_raw(vec![0xff, 0x00, 0x13]).await.unwrap();
    let _ = bad.expect_err().await;

    let after = chatroom_tests::client::eventually(T, "conn counters after traffic", || {
        let conn = conn.clone();
        let before = conn_before.clone();
        async move {
            let t = scrape(&conn).await;
            let moved = |f: &str| v(&t, f, &[]) > v(&before, f, &[]);
            (moved("chatroom_conn_deliveries_total")
                && moved("chatroom_conn_pushes_total")
                && moved("chatroom_conn_accepted_total")
                && v(
                    &t,
                    "chatroom_conn_bad_frames_total",
                    &[("kind", "malformed")],
                ) > 0.0
                && v(
                    &t,
                    "chatroom_conn_sign_ins_refused_total",
                    &[("reason", "bad_frame")],
                ) > 0.0
                && moved("chatroom_conn_sign_ins_total")
                && moved("chatroom_conn_messages_written_total")
                && moved("chatroom_conn_stream_appended_total"))
            .then_some(t)
        }
    })
    .await
    .unwrap();
    assert!(
        v(
            &after,
            "chatroom_conn_connections",
            &[("node", "conn-admin-test")]
        ) >= 2.0,
        "{after}"
    );
    assert!(
        after.contains("# TYPE chatroom_conn_logic_call_seconds histogram"),
        "{after}"
    );
    assert!(
        after.contains("# TYPE chatroom_conn_outbox_depth histogram"),
        "{after}"
    );

    let job_after = chatroom_tests::client::eventually(T, "job counters after traffic", || {
        let job = job.clone();
        let before = job_before.clone();
        async move {
            let t = scrape(&job).await;
            let moved = |f: &str, l: &[(&str, &str)]| v(&t, f, l) > v(&before, f, l);
            (moved("chatroom_job_messages_consumed_total", &[])
                && moved("chatroom_job_batches_total", &[])
                && moved("chatroom_job_batch_messages_count", &[])
                && moved("chatroom_job_pushes_total", &[])
                && moved("chatroom_job_acks_total", &[("kind", "fin")]))
            .then_some(t)
        }
    })
    .await
    .unwrap();
    assert_eq!(
        v(&job_after, "chatroom_job_conn_nodes", &[]),
        1.0,
        "{job_after}"
    );
    assert!(
        job_after.contains("chatroom_job_dropped_total{"),
        "{job_after}"
    );

    // Every family the Grafana dashboard asks for is one the services export.
    let logic_after = scrape(&logic).await;
    let exported: std::collections::BTreeSet<String> = [&after, &job_after, &logic_after]
        .iter()
        .flat_map(|t| chatroom_common::metrics::family_names(t))
        .collect();
    check_dashboard(&exported);

    stop.cancel();
    server.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Families the dashboard shows that appear once the delivery path records
/// them (a labelled family with no series yet is not listed).
const RECORDED_LATER: &[&str] = &["chatroom_job_push_seconds"];

fn check_dashboard(exported: &std::collections::BTreeSet<String>) {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/chatroom.json");
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("dashboard is JSON");
    let mut asked = std::collections::BTreeSet::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(i) = rest.find("chatroom_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                let family = ["_total", "_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(&name)
                    .to_string();
                asked.insert(family);
            }
        }
    }
    assert!(asked.len() > 10, "{asked:?}");
    for f in &asked {
        assert!(
            exported.contains(f) || RECORDED_LATER.contains(&f.as_str()),
            "the dashboard asks for {f}, which no service exports; exported: {exported:?}"
        );
    }
}

#[tokio::test]
async fn conn_answers_grpc_health_once_registered() {
    let cfg = chatroom_conn::ConnConfig::from_overrides([
        ("CHATROOM__WS__ADDR", "127.0.0.1:0"),
        ("CHATROOM__GRPC__ADDR", "127.0.0.1:0"),
        ("CHATROOM__ADMIN__ADDR", "127.0.0.1:0"),
        ("CHATROOM__LOG__DIR", ""),
        ("CHATROOM__DISCOVERY__LOGIC", "http://127.0.0.1:1"),
    ])
    .unwrap();
    let listeners = chatroom_conn::Listeners::bind(&cfg).await.unwrap();
    let grpc = listeners.grpc.local_addr().unwrap();
    let admin = listeners.admin.as_ref().unwrap().local_addr().unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(chatroom_conn::run(cfg, listeners, stop.clone()));
    http::wait_ok(&format!("http://{admin}/readyz"), T)
        .await
        .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = HealthClient::new(channel);
    for service in ["", "chatroom.conn.Conn"] {
        let st = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(st, ServingStatus::Serving as i32, "{service:?}");
    }
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn job_without_its_queue_is_alive_but_not_ready() {
    // nsqd on a port nobody listens on.
    let dead = free_addr().to_string();
    let cfg = chatroom_job::JobConfig::from_overrides([
        ("CHATROOM__LOG__DIR", ""),
        ("CHATROOM__QUEUE__KIND", "nsq"),
        ("CHATROOM__QUEUE__NSQD_TCP_ADDRESSES", dead.as_str()),
    ])
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(chatroom_job::run_with_admin(
        cfg,
        None,
        stop.clone(),
        Default::default(),
        Some(listener),
    ));
    http::wait_ok(&format!("http://{admin}/healthz"), T)
        .await
        .unwrap();
    let (s, body) = http::get_text(&format!("http://{admin}/readyz"))
        .await
        .unwrap();
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("queue"), "{body}");
    stop.cancel();
    task.await.unwrap().unwrap();
}
