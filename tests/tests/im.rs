//! The IM layer end to end, on standalone (one process, SQLite) and on the
//! cluster (separate processes, PostgreSQL, Redis, etcd, the test NSQ
//! broker): accounts, friends, every media type 1:1 across conn nodes,
//! a community of three on two nodes, offline delivery, acks, history
//! paging, uploads and the refusals.

use chatroom_common::config::Load;
use std::time::Duration;

use chatroom_tests::chat::{ChatClient, call, call_raw, get, register, text, upload};
use chatroom_tests::cluster::{Queue, TempDir, start_cluster, unique};
use chatroom_tests::nsq_broker::TestNsqd;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Where the scenario runs: an HTTP API and two WebSocket endpoints (the
/// same node twice on standalone).
struct Target {
    http: String,
    ws_a: String,
    ws_b: String,
}

/// A 1x1 PNG.
const PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4,
    0x89, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0x00, 0x01, 0x00, 0x00,
    0x05, 0x00, 0x01, 0x0d, 0x0a, 0x2d, 0xb4, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae,
    0x42, 0x60, 0x82,
];

fn media_messages(dst: i64, img: &str) -> Vec<Value> {
    let m = |cid: i64, media: i64, extra: Value| {
        let mut v = json!({"id": cid, "dstid": dst, "cmd": 10, "media": media});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    vec![
        m(1, 1, json!({"content": "hello"})),
        m(
            2,
            2,
            json!({"content": "Title", "pic": img, "url": "https://example.org/a", "memo": "desc"}),
        ),
        m(
            3,
            3,
            json!({"url": "https://example.org/v.mp3", "amount": 40}),
        ),
        m(4, 4, json!({"url": img})),
        m(
            5,
            5,
            json!({"amount": 300, "memo": "恭喜发财", "url": "https://example.org/rp?id=1"}),
        ),
        m(6, 6, json!({"content": "cry"})),
        m(7, 7, json!({"url": "https://example.org/page.html"})),
        m(
            8,
            8,
            json!({"url": "https://example.org/a.mp4", "pic": img}),
        ),
        m(
            9,
            9,
            json!({"content": "10086", "pic": img, "memo": "胡大力"}),
        ),
        m(10, 100, json!({"content": "{\"custom\":true}"})),
    ]
}

async fn scenario(t: &Target) -> anyhow::Result<()> {
    let tag = unique("im").replace('-', "");
    let tag = &tag[tag.len() - 9..];
    let alice = register(&t.http, &format!("1{tag}1")).await?;
    let bob = register(&t.http, &format!("1{tag}2")).await?;
    let carol = register(&t.http, &format!("1{tag}3")).await?;

    // Friends: both directions, one call; refusals for self, duplicate, unknown.
    call(
        &t.http,
        "/contact/addfriend",
        Some(&alice.token),
        &[("dstid", &bob.id.to_string())],
    )
    .await?;
    let friends = call(&t.http, "/contact/friend", Some(&bob.token), &[]).await?;
    anyhow::ensure!(
        friends["rows"][0]["id"] == alice.id,
        "bob's friends: {friends}"
    );
    for (dst, why) in [
        (bob.id, "duplicate"),
        (alice.id, "self"),
        (999_999_999, "unknown"),
    ] {
        let r = call_raw(
            &t.http,
            "/contact/addfriend",
            Some(&alice.token),
            &[("dstid", &dst.to_string())],
        )
        .await?;
        anyhow::ensure!(r["code"] != 0, "{why} friend accepted: {r}");
    }
    // The acting user comes from the token, not a disagreeing userid.
    let r = call_raw(
        &t.http,
        "/contact/friend",
        Some(&alice.token),
        &[("userid", &bob.id.to_string())],
    )
    .await?;
    anyhow::ensure!(r["code"] != 0, "token/userid mismatch accepted: {r}");

    // An upload, served back byte for byte.
    let up = upload(&t.http, &alice.token, "pixel.png", PNG).await?;
    anyhow::ensure!(up["code"] == 0, "upload: {up}");
    let img = up["data"].as_str().unwrap_or_default().to_string();
    let (status, body) = get(&t.http, &img).await?;
    anyhow::ensure!(
        status == 200 && &body[..] == PNG,
        "download of {img}: {status}"
    );
    let r = upload(&t.http, &alice.token, "../../etc/evil.png", PNG).await?;
    anyhow::ensure!(
        r["code"] == 0 && !r["data"].as_str().unwrap_or("").contains(".."),
        "path trick: {r}"
    );
    let r = upload(
        &t.http,
        &alice.token,
        "page.html",
        b"<script>alert(1)</script>",
    )
    .await?;
    anyhow::ensure!(r["code"] != 0, "html upload accepted: {r}");

    // Every media type 1:1, alice on node A to bob on node B.
    let mut a = ChatClient::connect(&t.ws_a, &alice).await?;
    let mut b = ChatClient::connect(&t.ws_b, &bob).await?;
    let msgs = media_messages(bob.id, &img);
    let mut ids = vec![];
    for m in &msgs {
        let (ack, _) = a.send_msg(m.clone()).await?;
        anyhow::ensure!(ack["cmd"] == 20, "no ack for {m}: {ack}");
        anyhow::ensure!(
            ack["content"] == "success send" && ack["status"] == "delivered",
            "{ack}"
        );
        anyhow::ensure!(
            ack["dstid"] == bob.id && ack["id"].as_i64().unwrap_or(0) > 0,
            "{ack}"
        );
        ids.push(ack["id"].as_i64().unwrap_or(0));
    }
    anyhow::ensure!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids not time-ordered: {ids:?}"
    );
    let got = b.messages(msgs.len()).await?;
    for ((sent, recv), id) in msgs.iter().zip(&got).zip(&ids) {
        anyhow::ensure!(
            recv["id"] == *id && recv["userid"] == alice.id && recv["media"] == sent["media"],
            "{sent} -> {recv}"
        );
        for k in ["content", "url", "pic", "memo", "amount"] {
            if !sent[k].is_null() {
                anyhow::ensure!(recv[k] == sent[k], "{k}: {sent} -> {recv}");
            }
        }
    }

    // Refusals over the socket: a non-friend, bad media, unknown cmd, spoofed sender.
    let mut c = ChatClient::connect(&t.ws_a, &carol).await?;
    let (e, _) = c.send_msg(text(1, bob.id, 10, "hi")).await?;
    anyhow::ensure!(e["cmd"] == 21 && e["code"] == 403, "non-friend: {e}");
    for bad in [
        json!({"id": 2, "dstid": bob.id, "cmd": 10, "media": 4}),
        json!({"id": 3, "dstid": bob.id, "cmd": 10, "media": 3, "url": "https://x/v.mp3"}),
        json!({"id": 4, "dstid": bob.id, "cmd": 10, "media": 77, "content": "?"}),
        json!({"id": 5, "dstid": bob.id, "cmd": 10, "media": 1, "content": "x".repeat(5000)}),
    ] {
        let (e, _) = a.send_msg(bad.clone()).await?;
        anyhow::ensure!(
            e["cmd"] == 21 && e["code"] != 0,
            "bad message accepted: {bad} -> {e}"
        );
    }
    let (ack, _) = a.send_msg(json!({"id": 6, "userid": carol.id, "dstid": bob.id, "cmd": 10, "media": 1, "content": "me"})).await?;
    anyhow::ensure!(ack["cmd"] == 20, "{ack}");
    let spoof = b.messages(1).await?;
    anyhow::ensure!(
        spoof[0]["userid"] == alice.id,
        "sender taken from the client: {}",
        spoof[0]
    );

    // A community of three on two nodes; joining adds the room live.
    let com = call(
        &t.http,
        "/contact/createcommunity",
        Some(&alice.token),
        &[("name", "friends")],
    )
    .await?;
    let cid = com["data"]["id"].as_i64().unwrap_or(0);
    let (e, _) = c.send_msg(text(7, cid, 11, "let me in")).await?;
    anyhow::ensure!(e["code"] == 403, "non-member posted: {e}");
    for u in [&bob, &carol] {
        call(
            &t.http,
            "/contact/joincommunity",
            Some(&u.token),
            &[("dstid", &cid.to_string())],
        )
        .await?;
        call(
            &t.http,
            "/contact/joincommunity",
            Some(&u.token),
            &[("dstid", &cid.to_string())],
        )
        .await?;
    }
    let list = call(&t.http, "/contact/community", Some(&carol.token), &[]).await?;
    anyhow::ensure!(list["rows"][0]["id"] == cid, "carol's communities: {list}");
    // The joins reach the live sessions through the queue: retry the first
    // post until both members hear it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut n = 100;
    loop {
        n += 1;
        let (ack, _) = a.send_msg(text(n, cid, 11, "hello group")).await?;
        anyhow::ensure!(ack["cmd"] == 20, "group post: {ack}");
        let heard_b = b
            .next_within(Duration::from_millis(700))
            .await
            .map(|v| v["cmd"] == 11)
            .unwrap_or(false);
        let heard_c = c
            .next_within(Duration::from_millis(700))
            .await
            .map(|v| v["cmd"] == 11)
            .unwrap_or(false);
        if heard_b && heard_c {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "group messages never reached both members"
        );
    }
    let (ack, _) = c.send_msg(text(200, cid, 11, "carol here")).await?;
    anyhow::ensure!(ack["cmd"] == 20, "{ack}");
    for cl in [&mut a, &mut b] {
        loop {
            let m = cl.messages(1).await?;
            if m[0]["content"] == "carol here" {
                anyhow::ensure!(
                    m[0]["userid"] == carol.id && m[0]["dstid"] == cid,
                    "{}",
                    m[0]
                );
                break;
            }
        }
    }

    // Offline delivery: bob leaves; what alice sends is stored, in order,
    // and delivered once when bob comes back (on the other node). Probes
    // acked "delivered" while bob's sign-out was still on its way were
    // routed to the node he left, which reports them back to be stored: they
    // may come too, before the rest, but never twice.
    drop(b);
    let mut stored = vec![];
    let mut probes = vec![];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut k = 300;
    while stored.is_empty() {
        k += 1;
        let content = format!("probe {k}");
        let (ack, _) = a.send_msg(text(k, bob.id, 10, &content)).await?;
        if ack["status"] == "stored" {
            anyhow::ensure!(ack["content"] == "not online", "{ack}");
            stored.push(content);
        } else {
            probes.push(content);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "bob never counted as offline"
        );
    }
    for i in 0..3 {
        let content = format!("while away {i}");
        let (ack, _) = a.send_msg(text(400 + i, bob.id, 10, &content)).await?;
        anyhow::ensure!(ack["status"] == "stored", "{ack}");
        stored.push(content);
    }
    let mut seen: Vec<String> = vec![];
    let mut b = ChatClient::connect(&t.ws_a, &bob).await?;
    while !stored.iter().all(|m| seen.contains(m)) {
        let m = b.messages(1).await?;
        seen.push(m[0]["content"].as_str().unwrap_or("").to_string());
    }
    let (early, late): (Vec<&String>, Vec<&String>) = seen.iter().partition(|m| probes.contains(m));
    anyhow::ensure!(
        late.iter()
            .map(|s| s.as_str())
            .eq(stored.iter().map(|s| s.as_str())),
        "offline delivery out of order or incomplete: {seen:?}, stored {stored:?}"
    );
    anyhow::ensure!(
        seen.starts_with(&early.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
        "reported probes must come before the rest: {seen:?}"
    );
    // Nothing twice, on this connection or the next (a late report may
    // still bring a probe not seen yet; nothing else).
    let check_quiet = |m: Value, seen: &mut Vec<String>| -> anyhow::Result<()> {
        let c = m["content"].as_str().unwrap_or("").to_string();
        anyhow::ensure!(
            probes.contains(&c) && !seen.contains(&c),
            "delivered twice or unexpected: {c} after {seen:?}"
        );
        seen.push(c);
        Ok(())
    };
    while let Ok(m) = b.next_within(Duration::from_millis(500)).await {
        check_quiet(m, &mut seen)?;
    }
    drop(b);
    let mut b = ChatClient::connect(&t.ws_b, &bob).await?;
    while let Ok(m) = b.next_within(Duration::from_millis(500)).await {
        check_quiet(m, &mut seen)?;
    }

    // History: newest first, paged by `before`, participants only.
    let page1 = call(
        &t.http,
        "/chat/history",
        Some(&bob.token),
        &[
            ("dstid", &alice.id.to_string()),
            ("cmd", "10"),
            ("limit", "3"),
        ],
    )
    .await?;
    let rows = page1["rows"].as_array().cloned().unwrap_or_default();
    anyhow::ensure!(
        rows.len() == 3 && rows[0]["content"] == "while away 2",
        "history page 1: {page1}"
    );
    let last = rows[2]["id"].to_string();
    let page2 = call(
        &t.http,
        "/chat/history",
        Some(&bob.token),
        &[
            ("dstid", &alice.id.to_string()),
            ("cmd", "10"),
            ("limit", "3"),
            ("before", &last),
        ],
    )
    .await?;
    let rows2 = page2["rows"].as_array().cloned().unwrap_or_default();
    anyhow::ensure!(rows2.len() == 3, "history page 2: {page2}");
    anyhow::ensure!(
        rows2[0]["id"].as_i64() < rows[2]["id"].as_i64(),
        "pages overlap"
    );
    let r = call_raw(
        &t.http,
        "/chat/history",
        Some(&carol.token),
        &[("dstid", &alice.id.to_string()), ("cmd", "10")],
    )
    .await?;
    // carol's own conversation with alice is empty; she cannot read bob's.
    anyhow::ensure!(
        r["rows"].as_array().is_none_or(|v| v.is_empty()),
        "carol read others' history: {r}"
    );
    let r = call_raw(
        &t.http,
        "/chat/history",
        Some(&carol.token),
        &[("dstid", &cid.to_string()), ("cmd", "11")],
    )
    .await?;
    anyhow::ensure!(
        r["code"] == 0 && !r["rows"].as_array().is_none_or(|v| v.is_empty()),
        "member history: {r}"
    );

    // Sixth community refused.
    for i in 0..4 {
        call(
            &t.http,
            "/contact/createcommunity",
            Some(&alice.token),
            &[("name", &format!("c{i}"))],
        )
        .await?;
    }
    let r = call_raw(
        &t.http,
        "/contact/createcommunity",
        Some(&alice.token),
        &[("name", "sixth")],
    )
    .await?;
    anyhow::ensure!(r["code"] != 0, "sixth community accepted: {r}");
    b.send(json!({"cmd": 0})).await?;
    anyhow::ensure!(b.next().await?["content"] == "pong");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn im_on_standalone() {
    let dir = TempDir::new("im-standalone");
    let db = format!("sqlite://{}/im.db?mode=rwc", dir.0.display());
    let uploads = dir.0.join("uploads").display().to_string();
    let cfg = chatroom::StandaloneConfig::from_overrides([
        ("CHATROOM__LOG__DIR", ""),
        ("CHATROOM__CONN__WS__ADDR", "127.0.0.1:0"),
        ("CHATROOM__LOGIC__HTTP__ADDR", "127.0.0.1:0"),
        ("CHATROOM__LOGIC__STORE__URL", db.as_str()),
        ("CHATROOM__LOGIC__IM__UPLOAD_DIR", uploads.as_str()),
        // The scenario sends faster than a person; the limiter has its own tests.
        ("CHATROOM__LOGIC__IM__CHAT_RATE_PER_SEC", "1000"),
        ("CHATROOM__LOGIC__IM__CHAT_BURST", "1000"),
    ])
    .unwrap();
    let listeners = chatroom::Listeners::bind(&cfg).await.unwrap();
    let ws = format!("ws://{}/room", listeners.ws.local_addr().unwrap());
    let http = format!("http://{}", listeners.http.local_addr().unwrap());
    let stop = CancellationToken::new();
    let server = tokio::spawn(chatroom::run(cfg, listeners, stop.clone()));
    let t = Target {
        http,
        ws_a: ws.clone(),
        ws_b: ws,
    };
    let r = scenario(&t).await;
    stop.cancel();
    r.unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn im_on_cluster() {
    let c = start_cluster(Queue::Broker(TestNsqd::start().await)).await;
    let t = Target {
        http: c.http.clone(),
        ws_a: c.ws_a.clone(),
        ws_b: c.ws_b.clone(),
    };
    if let Err(e) = scenario(&t).await {
        panic!("{e:#}\n{}", c.dump());
    }
}
