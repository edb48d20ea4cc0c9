//! logic's operator endpoints after real traffic: `GET /metrics` on the
//! HTTP listener (every logic family moves), `/healthz`, `/readyz`, and the
//! standard gRPC health service.

mod support;

use chatroom_common::metrics::{sample, sample_sum};
use chatroom_common::proto::logic::SignInReq;
use chatroom_logic::metrics::LOGIC;
use chatroom_logic::presence::Presence;
use chatroom_tests::wait::eventually;
use support::{DEADLINE, Db, Node, TestStore};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn scrape(node: &Node) -> String {
    let (status, headers, body) = node.get_raw("/metrics").await;
    assert_eq!(status.as_u16(), 200);
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    String::from_utf8(body.to_vec()).expect("utf-8 metrics")
}

fn v(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(text, name, labels).unwrap_or(0.0)
}

#[tokio::test]
async fn every_logic_family_moves_with_traffic_and_health_answers() {
    // A tight IM rate limit (2 requests, no refill to speak of) to see refusals.
    let node = Node::start(
        &[
            ("CHATROOM__IM__API_RATE_PER_SEC", "0.001"),
            ("CHATROOM__IM__API_BURST", "2"),
        ],
        64,
    )
    .await;

    let (status, _, body) = node.get_raw("/healthz").await;
    assert_eq!(status.as_u16(), 200, "{body:?}");
    eventually(DEADLINE, "logic /readyz answers 200", || async {
        let (s, _, _) = node.get_raw("/readyz").await;
        (s.as_u16() == 200).then_some(())
    })
    .await
    .unwrap();

    let before = scrape(&node).await;

    // HTTP: /tk, /msg (publishes to the queue), an unknown route.
    let (s, r) = node.form("/tk", None, &[("uid", "alice")]).await;
    assert_eq!(s.as_u16(), 200, "{r}");
    let token = r["data"].as_str().expect("token").to_string();
    let (s, r) = node
        .form("/msg", Some(&token), &[("room_id", "lobby"), ("msg", "hi")])
        .await;
    assert_eq!((s.as_u16(), r["code"].as_i64()), (200, Some(1)), "{r}");
    let (s, _) = node.form("/no/such/route", None, &[]).await;
    assert_eq!(s.as_u16(), 404);
    // Store: register + login; then a third request on the same key is refused.
    node.user("13900000001").await;
    let (_, r) = node
        .form(
            "/user/login",
            None,
            &[("mobile", "13900000001"), ("passwd", "secret-pw")],
        )
        .await;
    assert_eq!(r["code"], 429, "{r}");

    // gRPC: a sign-in, and the health service.
    let mut grpc = node.grpc().await;
    let reply = grpc
        .sign_in(SignInReq {
            server: "conn-test".into(),
            token: token.clone(),
            room_id: "lobby".into(),
            uid: String::new(),
        })
        .await
        .expect("SignIn")
        .into_inner();
    assert_eq!(reply.code, 0, "{}", reply.msg);
    let channel = tonic::transport::Endpoint::from_shared(node.grpc_uri.clone())
        .unwrap()
        .connect()
        .await
        .expect("connect for health");
    let mut health = HealthClient::new(channel);
    for service in ["", "chatroom.logic.Logic"] {
        let st = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status;
        assert_eq!(st, ServingStatus::Serving as i32, "service {service:?}");
    }

    let after = scrape(&node).await;
    let moved = |name: &str, labels: &[(&str, &str)]| {
        let (a, b) = (v(&before, name, labels), v(&after, name, labels));
        assert!(
            b > a,
            "{name}{labels:?} did not move ({a} -> {b}) in\n{after}"
        );
    };
    moved(
        "chatroom_logic_http_requests_total",
        &[("route", "/tk"), ("code", "200")],
    );
    moved(
        "chatroom_logic_http_requests_total",
        &[("route", "/msg"), ("code", "200")],
    );
    moved(
        "chatroom_logic_http_requests_total",
        &[("route", "unmatched"), ("code", "404")],
    );
    moved(
        "chatroom_logic_http_request_seconds_count",
        &[("route", "/msg")],
    );
    moved("chatroom_logic_grpc_calls_total", &[("method", "SignIn")]);
    moved(
        "chatroom_logic_grpc_call_seconds_count",
        &[("method", "SignIn")],
    );
    moved("chatroom_logic_sign_ins_total", &[]);
    moved("chatroom_logic_rate_limited_total", &[]);
    moved("chatroom_logic_store_queries_total", &[]);
    moved("chatroom_logic_store_query_seconds_count", &[]);
    moved("chatroom_queue_published_total", &[]);
    moved("chatroom_queue_publish_latency_seconds_count", &[]);
    // Discovery (static) is followed: the process knows its nodes gauge.
    assert!(
        after.contains("# TYPE chatroom_discovery_nodes gauge"),
        "{after}"
    );
    assert!(
        after.contains("# TYPE chatroom_nsq_connections gauge"),
        "{after}"
    );
    assert!(sample_sum(&after, "chatroom_logic_http_request_seconds_bucket") > 0.0);
    assert!(after.ends_with("# EOF\n"));
    node.stop().await;
}

#[tokio::test]
async fn store_errors_are_counted() {
    let t = TestStore::open(Db::Sqlite).await;
    let before = LOGIC.store_errors.get();
    t.store.close().await;
    let r = t.store.user(1).await;
    assert!(r.is_err(), "a closed pool must fail");
    assert!(LOGIC.store_errors.get() > before);
    let text = chatroom_common::metrics::render(&[]);
    assert!(
        v(&text, "chatroom_logic_store_errors_total", &[]) >= 1.0,
        "{text}"
    );
}

#[tokio::test]
async fn presence_backend_errors_are_counted() {
    let url = std::env::var("CHATROOM_TEST_REDIS").unwrap_or_else(|_| {
        panic!(
            "CHATROOM_TEST_REDIS is not set: this test needs a Redis (scripts/test.sh starts one)"
        )
    });
    let prefix = format!("chatroom-test:metrics:{}:", std::process::id());
    let cfg = chatroom_logic::config::PresenceConfig {
        kind: chatroom_logic::config::PresenceKind::Redis,
        url: url.clone(),
        prefix: prefix.clone(),
        session_ttl: std::time::Duration::from_secs(90),
        online_ttl: std::time::Duration::from_secs(10),
    };
    let presence = Presence::connect(&cfg).await.expect("redis presence");
    let Presence::Redis(r) = &presence else {
        panic!("redis presence expected")
    };
    // A user key of the wrong type: Redis answers WRONGTYPE.
    let key = r.user_key("bob");
    let client = redis::Client::open(url).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("not a hash")
        .query_async(&mut raw)
        .await
        .unwrap();
    let before = LOGIC.presence_errors.get();
    assert!(presence.sessions("bob").await.is_err());
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(LOGIC.presence_errors.get() > before);
    let text = chatroom_common::metrics::render(&[]);
    assert!(
        v(&text, "chatroom_logic_presence_errors_total", &[]) >= 1.0,
        "{text}"
    );
}
