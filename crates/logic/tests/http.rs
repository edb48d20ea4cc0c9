//! The HTTP API end to end (`POST /msg`, `POST /tk`): replies are always the
//! seed's JSON `{code, msg[, data]}`, whatever the client sends.

mod support;

use std::time::Duration;

use bytes::Bytes;
use chatroom_common::proto::protocol::MsgLevel;
use hyper::StatusCode;
use serde_json::json;
use support::Node;

const JSON: (&str, &str) = ("content-type", "application/json");
const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

#[tokio::test]
async fn msg_publishes_important_messages_from_json_and_forms() {
    let mut node = Node::start(&[], 16).await;
    let token = node.token("alice");

    let (status, body) = node
        .post_json(
            "/msg",
            Some(&token),
            json!({"room_id": "room-1", "msg": "{\"type\":1}"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["code"].as_i64(), body["msg"].as_str()),
        (Some(1), Some("ok"))
    );
    let id: u64 = body["data"]["id"]
        .as_str()
        .expect("id string")
        .parse()
        .expect("id number");
    let m = node.next_published().await;
    assert_eq!(m.id, id);
    assert_eq!((m.uid.as_str(), m.room_id.as_str()), ("alice", "room-1"));
    assert_eq!(m.level, MsgLevel::Important as i32);
    assert_eq!(&m.data[..], b"{\"type\":1}");

    // A form, a "Bearer " token and a numeric room id work too.
    let bearer = format!("Bearer {}", node.token("bob"));
    let (status, body) = node
        .post(
            "/msg",
            &[FORM, ("authorization", &bearer)],
            "room_id=room+2&msg=hello%20%26%20bye",
        )
        .await;
    assert_eq!(
        (status, body["code"].as_i64()),
        (StatusCode::OK, Some(1)),
        "{body}"
    );
    let m = node.next_published().await;
    assert_eq!((m.uid.as_str(), m.room_id.as_str()), ("bob", "room 2"));
    assert_eq!(&m.data[..], b"hello & bye");
    assert_eq!(m.level, MsgLevel::Important as i32);

    let (_, body) = node
        .post_json("/msg", Some(&token), json!({"room_id": 42, "msg": "n"}))
        .await;
    assert_eq!(body["code"], 1, "{body}");
    assert_eq!(node.next_published().await.room_id, "42");

    node.stop().await;
}

#[tokio::test]
async fn msg_needs_a_valid_token() {
    let node = Node::start(&[], 16).await;
    let body = json!({"room_id": "r", "msg": "hi"});
    let expired = node.tokens.issue_for("alice", Duration::ZERO).unwrap();
    let cases: [(Option<&str>, &str); 5] = [
        (None, "token is empty"),
        (Some(""), "token is empty"),
        (Some("Bearer "), "token is empty"),
        (Some("not-a-token"), "token is invalid"),
        (Some(&expired), "token has expired"),
    ];
    for (auth, why) in cases {
        let (status, reply) = node.post_json("/msg", auth, body.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?}: {reply}");
        assert_eq!(reply["code"], 1001, "{reply}");
        let msg = reply["msg"].as_str().unwrap_or_default();
        assert!(
            msg.starts_with("login needed") && msg.contains(why),
            "{msg}"
        );
    }
    assert_eq!(node.queue.depth(), 0);
    node.stop().await;
}

#[tokio::test]
async fn msg_explains_bad_bodies_in_json() {
    let node = Node::start(&[], 16).await;
    let token = node.token("alice");
    let auth = ("authorization", token.as_str());

    let big_msg = "a".repeat(16 * 1024 + 1);
    let big_body = format!(
        "{{\"room_id\":\"r\",\"msg\":\"{}\"}}",
        "a".repeat(70 * 1024)
    );
    // (headers, body, expected status, expected start of msg)
    type Case<'a> = (Vec<(&'a str, &'a str)>, String, StatusCode, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![JSON, auth],
            "{\"room_id\": \"r\", \"msg\": ".into(),
            StatusCode::BAD_REQUEST,
            "invalid request body",
        ),
        (
            vec![JSON, auth],
            "[1,2]".into(),
            StatusCode::BAD_REQUEST,
            "invalid request body",
        ),
        (
            vec![JSON, auth],
            "{\"room_id\":\"r\",\"msg\":{\"a\":1}}".into(),
            StatusCode::BAD_REQUEST,
            "invalid request body",
        ),
        (
            vec![JSON, auth],
            "{\"room_id\":\"r\"}".into(),
            StatusCode::BAD_REQUEST,
            "msg is missing",
        ),
        (
            vec![JSON, auth],
            "{\"room_id\":\"\",\"msg\":\"x\"}".into(),
            StatusCode::BAD_REQUEST,
            "room id is empty",
        ),
        (
            vec![JSON, auth],
            "{\"msg\":\"x\"}".into(),
            StatusCode::BAD_REQUEST,
            "room id is empty",
        ),
        (
            vec![JSON, auth],
            format!("{{\"room_id\":\"{}\",\"msg\":\"x\"}}", "r".repeat(65)),
            StatusCode::BAD_REQUEST,
            "room id is longer than 64",
        ),
        (
            vec![JSON, auth],
            format!("{{\"room_id\":\"r\",\"msg\":\"{big_msg}\"}}"),
            StatusCode::BAD_REQUEST,
            "message is larger than 16384",
        ),
        (
            vec![FORM, auth],
            "room_id=a&room_id=b&msg=x".into(),
            StatusCode::BAD_REQUEST,
            "invalid request body",
        ),
        (
            vec![FORM, auth],
            "room_id=r".into(),
            StatusCode::BAD_REQUEST,
            "msg is missing",
        ),
        (
            vec![FORM, auth],
            "room_id=r&msg=".into(),
            StatusCode::BAD_REQUEST,
            "msg is missing",
        ),
        (
            vec![("content-type", "text/plain"), auth],
            "hi".into(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported content type",
        ),
        (
            vec![auth],
            "{}".into(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported content type",
        ),
        (
            vec![JSON, auth],
            big_body,
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body is larger than 65536 bytes",
        ),
    ];
    for (headers, body, status, why) in cases {
        let shown = body.chars().take(60).collect::<String>();
        let (got, reply) = node.post("/msg", &headers, body).await;
        assert_eq!(got, status, "{shown}: {reply}");
        assert_eq!(reply["code"], 0, "{shown}: {reply}");
        let msg = reply["msg"].as_str().unwrap_or_default();
        assert!(
            msg.starts_with(why),
            "{shown}: {msg:?} should start with {why:?}"
        );
    }
    assert_eq!(node.queue.depth(), 0, "nothing refused may be published");
    node.stop().await;
}

#[tokio::test]
async fn msg_says_try_again_when_the_queue_is_full() {
    let node = Node::start(&[], 1).await;
    let token = node.token("alice");
    let body = json!({"room_id": "r", "msg": "hi"});
    let (status, _) = node.post_json("/msg", Some(&token), body.clone()).await;
    assert_eq!(status, StatusCode::OK);
    let (status, reply) = node.post_json("/msg", Some(&token), body).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply, json!({"code": 0, "msg": "server busy, try again"}));
    node.stop().await;
}

#[tokio::test]
async fn tk_issues_tokens_that_logic_accepts() {
    let mut node = Node::start(&[], 16).await;
    let (status, reply) = node.post_json("/tk", None, json!({"uid": "carol"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (reply["code"].as_i64(), reply["msg"].as_str()),
        (Some(1), Some("ok"))
    );
    let token = reply["data"].as_str().expect("token string").to_string();
    assert_eq!(
        node.tokens.verify(&token).expect("a valid token").sub,
        "carol"
    );

    // ... and /msg takes it.
    let (_, r) = node
        .post_json(
            "/msg",
            Some(&token),
            json!({"room_id": "r", "msg": "from carol"}),
        )
        .await;
    assert_eq!(r["code"], 1, "{r}");
    assert_eq!(node.next_published().await.uid, "carol");

    let (_, reply) = node.post("/tk", &[FORM], "uid=dave").await;
    let token = reply["data"].as_str().expect("token from a form");
    assert_eq!(node.tokens.verify(token).unwrap().sub, "dave");
    // Numeric uids are IM accounts: /tk must not hand out their tokens.
    let (status, reply) = node.post_json("/tk", None, json!({"uid": 12345})).await;
    assert_eq!(
        (status.as_u16(), reply["code"].as_i64()),
        (403, Some(0)),
        "{reply}"
    );
    assert!(reply.get("data").is_none(), "{reply}");
    let (_, reply) = node.post("/tk", &[FORM], "uid=u12345").await;
    let token = reply["data"].as_str().expect("token for a non-numeric uid");
    assert_eq!(node.tokens.verify(token).unwrap().sub, "u12345");

    for body in [
        json!({}),
        json!({"uid": ""}),
        json!({"uid": "has space"}),
        json!({"uid": "x".repeat(65)}),
    ] {
        let (status, reply) = node.post_json("/tk", None, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(reply["code"], 0);
        assert_eq!(reply["msg"], "uid must be 1-64 printable characters");
        assert!(reply.get("data").is_none());
    }
    let (status, reply) = node.post("/tk", &[JSON], "{uid}").await;
    assert_eq!(
        (status, reply["code"].as_i64()),
        (StatusCode::BAD_REQUEST, Some(0))
    );
    node.stop().await;
}

#[tokio::test]
async fn tk_can_be_switched_off() {
    let node = Node::start(&[("CHATROOM__HTTP__TEST_TOKEN", "false")], 16).await;
    let (status, reply) = node.post_json("/tk", None, json!({"uid": "carol"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(reply, json!({"code": 0, "msg": "test tokens are disabled"}));
    node.stop().await;
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let node = Node::start(&[], 16).await;
    let (status, reply) = node.post("/nope", &[JSON], "{}").await;
    assert_eq!(
        (status, reply["code"].as_i64()),
        (StatusCode::NOT_FOUND, Some(404))
    );
    let (status, reply) = node.request("GET", "/msg", &[], Bytes::new()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply, json!({"code": 405, "msg": "method not allowed"}));
    node.stop().await;
}
