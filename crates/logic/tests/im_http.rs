//! The IM HTTP routes end to end (a real node, SQLite and PostgreSQL):
//! accounts, friends, communities, who may act, uploads, rate limits and the
//! operator broadcast. Replies are `{code: 0 ok | non-zero, msg, data | rows,
//! total}`.

mod support;

use chatroom_common::proto::queue::queue_msg::Body;
use serde_json::json;
use support::{Db, Node, multipart};

fn ok(r: &serde_json::Value) {
    assert_eq!(r["code"], 0, "{r}");
    assert_eq!(r["msg"], "ok", "{r}");
}

async fn accounts(db: Db) {
    let node = Node::start_db(db, &[], 16).await;
    let (status, r) = node
        .form(
            "/user/register",
            None,
            &[
                ("mobile", "13800000001"),
                ("passwd", "pass-1234"),
                ("nickname", "小明"),
                ("avatar", "https://x.io/a.png"),
            ],
        )
        .await;
    assert_eq!(status, 200);
    ok(&r);
    let id = r["data"]["id"].as_i64().expect("id");
    assert_eq!(id, 10001);
    assert_eq!(r["data"]["nickname"], "小明");
    assert!(r["data"].get("passwd").is_none(), "{r}");

    // Duplicates, and bad input, each with a reason.
    let cases = [
        (
            json!({"mobile": "13800000001", "passwd": "another-1"}),
            409,
            409,
            "already registered",
        ),
        (
            json!({"mobile": "", "passwd": "another-1"}),
            400,
            400,
            "mobile",
        ),
        (
            json!({"mobile": "1380000 0002", "passwd": "another-1"}),
            400,
            400,
            "mobile",
        ),
        (
            json!({"mobile": "13800000002", "passwd": "short"}),
            400,
            400,
            "passwd",
        ),
        (
            json!({"mobile": "13800000002", "passwd": "another-1", "avatar": "javascript:x"}),
            400,
            400,
            "avatar",
        ),
        (
            json!({"mobile": "13800000002", "passwd": "another-1", "nickname": "n".repeat(40)}),
            413,
            413,
            "nickname",
        ),
    ];
    for (body, status, code, msg) in cases {
        let (s, r) = node.post_json("/user/register", None, body.clone()).await;
        assert_eq!(
            (s.as_u16(), r["code"].as_i64()),
            (status, Some(code)),
            "{body}: {r}"
        );
        assert!(r["msg"].as_str().unwrap().contains(msg), "{body}: {r}");
    }

    // The hash is argon2, never the password.
    let pool = {
        sqlx::any::install_default_drivers();
        sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect(&node.cfg.store.url)
            .await
            .unwrap()
    };
    let row: (String,) = sqlx::query_as("SELECT passwd FROM users WHERE id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        row.0.starts_with("$argon2id$") && !row.0.contains("pass-1234"),
        "{}",
        row.0
    );
    pool.close().await;

    // Login: JSON or form; the token's subject is the id.
    let (_, r) = node
        .post_json(
            "/user/login",
            None,
            json!({"mobile": "13800000001", "passwd": "pass-1234"}),
        )
        .await;
    ok(&r);
    assert_eq!(r["data"]["id"], id);
    assert_eq!(r["data"]["mobile"], "13800000001");
    let token = r["data"]["token"].as_str().expect("token").to_string();
    assert_eq!(node.tokens.verify(&token).unwrap().sub, id.to_string());
    for (mobile, passwd) in [
        ("13800000001", "pass-12345"),
        ("13800000001", "PASS-1234"),
        ("13899999999", "pass-1234"),
    ] {
        let (s, r) = node
            .form(
                "/user/login",
                None,
                &[("mobile", mobile), ("passwd", passwd)],
            )
            .await;
        assert_eq!((s.as_u16(), r["code"].as_i64()), (401, Some(401)), "{r}");
        assert_eq!(r["msg"], "wrong mobile number or password");
        assert!(r.get("data").is_none());
    }

    // Find by id or mobile: the public profile only.
    let (b, _) = node.user("13800000002").await;
    for fields in [
        vec![("id", id.to_string())],
        vec![("mobile", "13800000001".to_string())],
    ] {
        let f: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (_, r) = node.form("/user/find", Some(&token), &f).await;
        ok(&r);
        assert_eq!(r["data"]["id"], id);
        assert_eq!(r["data"]["nickname"], "小明");
        assert!(
            r["data"].get("passwd").is_none() && r["data"].get("mobile").is_none(),
            "{r}"
        );
    }
    let (s, r) = node
        .form("/user/find", Some(&token), &[("id", "777")])
        .await;
    assert_eq!((s.as_u16(), r["code"].as_i64()), (404, Some(404)), "{r}");
    let (s, r) = node
        .form("/user/find", None, &[("id", &b.to_string())])
        .await;
    assert_eq!(
        (s.as_u16(), r["code"].as_i64()),
        (401, Some(100)),
        "a token is needed: {r}"
    );
    node.stop().await;
}
both!(accounts);

async fn contacts(db: Db) {
    let node = Node::start_db(db, &[("CHATROOM__IM__API_BURST", "200")], 16).await;
    let (a, ta) = node.user("13800000001").await;
    let (b, tb) = node.user("13800000002").await;
    let (c, tc) = node.user("13800000003").await;

    // JSON and form bodies alike; the acting user comes from the token.
    let (_, r) = node
        .post_json("/contact/addfriend", Some(&ta), json!({"dstid": b}))
        .await;
    ok(&r);
    assert_eq!(r["data"]["id"], b);
    let (_, r) = node
        .form(
            "/contact/addfriend",
            Some(&tc),
            &[("dstid", &a.to_string())],
        )
        .await;
    ok(&r);
    for (token, dst, status, msg) in [
        (&ta, b, 409u16, "already friends"),
        (&tb, a, 409, "already friends"),
        (&ta, a, 400, "yourself"),
        (&ta, 424242, 404, "no such user"),
    ] {
        let (s, r) = node
            .form(
                "/contact/addfriend",
                Some(token),
                &[("dstid", &dst.to_string())],
            )
            .await;
        assert_eq!(
            (s.as_u16(), r["code"].as_i64()),
            (status, Some(i64::from(status))),
            "{r}"
        );
        assert!(r["msg"].as_str().unwrap().contains(msg), "{r}");
    }
    let (_, r) = node
        .form("/contact/addfriend", Some(&ta), &[("dstid", "abc")])
        .await;
    assert_eq!(r["code"], 400, "{r}");

    // Both directions are listed, under both route names.
    for path in ["/contact/friend", "/contact/loadfriend"] {
        let (_, r) = node.form(path, Some(&ta), &[]).await;
        ok(&r);
        assert_eq!(r["total"], 2, "{r}");
        let ids: Vec<i64> = r["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["id"].as_i64().unwrap())
            .collect();
        assert_eq!(ids, vec![b, c]);
    }
    let (_, r) = node.form("/contact/friend", Some(&tb), &[]).await;
    assert_eq!(r["rows"][0]["id"], a, "{r}");

    // Communities: a name is required, five per owner, the creator joins.
    let (s, r) = node
        .form("/contact/createcommunity", Some(&ta), &[("name", "  ")])
        .await;
    assert_eq!((s.as_u16(), r["code"].as_i64()), (400, Some(400)), "{r}");
    let mut ids = Vec::new();
    for i in 0..5 {
        let (_, r) = node
            .form(
                "/contact/createcommunity",
                Some(&ta),
                &[
                    ("name", &format!("g{i}")),
                    ("pic", "https://x.io/i.png"),
                    ("memo", "m"),
                ],
            )
            .await;
        ok(&r);
        assert_eq!(r["data"]["owner"], a);
        assert_eq!(r["data"]["icon"], "https://x.io/i.png");
        ids.push(r["data"]["id"].as_i64().unwrap());
    }
    let (s, r) = node
        .form("/contact/createcommunity", Some(&ta), &[("name", "sixth")])
        .await;
    assert_eq!((s.as_u16(), r["code"].as_i64()), (403, Some(403)), "{r}");
    assert!(r["msg"].as_str().unwrap().contains("at most 5"), "{r}");
    for path in ["/contact/community", "/contact/loadcommunity"] {
        let (_, r) = node.form(path, Some(&ta), &[]).await;
        assert_eq!(r["total"], 5, "{r}");
        assert_eq!(r["rows"][0]["name"], "g0");
    }

    // Joining: idempotent; unknown communities refused.
    for _ in 0..2 {
        let (_, r) = node
            .form(
                "/contact/joincommunity",
                Some(&tb),
                &[("dstid", &ids[1].to_string())],
            )
            .await;
        ok(&r);
        assert_eq!(r["data"]["id"], ids[1]);
    }
    let (_, r) = node.form("/contact/community", Some(&tb), &[]).await;
    assert_eq!(r["total"], 1, "joined once: {r}");
    let (s, r) = node
        .form("/contact/joincommunity", Some(&tb), &[("dstid", "99999")])
        .await;
    assert_eq!((s.as_u16(), r["code"].as_i64()), (404, Some(404)), "{r}");

    // History of a community is for its members only.
    let (s, r) = node
        .form(
            "/chat/history",
            Some(&tc),
            &[("dstid", &ids[1].to_string()), ("cmd", "11")],
        )
        .await;
    assert_eq!((s.as_u16(), r["code"].as_i64()), (403, Some(403)), "{r}");
    let (_, r) = node
        .form(
            "/chat/history",
            Some(&tb),
            &[("dstid", &ids[1].to_string()), ("cmd", "11")],
        )
        .await;
    assert_eq!(
        (r["code"].as_i64(), r["total"].as_i64()),
        (Some(0), Some(0)),
        "{r}"
    );
    let (_, r) = node
        .form(
            "/chat/history",
            Some(&tb),
            &[("dstid", &a.to_string()), ("cmd", "12")],
        )
        .await;
    assert_eq!(r["code"], 400, "{r}");
    node.stop().await;
}
both!(contacts);

#[tokio::test]
async fn the_token_decides_who_acts() {
    let node = Node::start(&[], 16).await;
    let (a, ta) = node.user("13800000001").await;
    let (b, _) = node.user("13800000002").await;

    // The seed's pages send the token as a form or query field, and userid.
    let (_, r) = node
        .form(
            "/contact/friend",
            None,
            &[("token", &ta), ("userid", &a.to_string())],
        )
        .await;
    ok(&r);
    let (_, r) = node
        .post(&format!("/contact/friend?token={ta}"), &[], "")
        .await;
    ok(&r);
    // userid 0 is what the seed sends when it has none.
    let (_, r) = node
        .form("/contact/friend", Some(&ta), &[("userid", "0")])
        .await;
    ok(&r);
    // A userid that is not the token's is refused, and nothing happens.
    let (s, r) = node
        .form(
            "/contact/addfriend",
            Some(&ta),
            &[("userid", &b.to_string()), ("dstid", &a.to_string())],
        )
        .await;
    assert_eq!((s.as_u16(), r["code"].as_i64()), (403, Some(403)), "{r}");
    assert_eq!(r["msg"], "id does not match token");

    // No token, a bad one, or one that is not an IM account's.
    let alice = node.token("alice");
    for (auth, code) in [
        (None, 100),
        (Some("garbage"), 100),
        (Some(alice.as_str()), 100),
    ] {
        let (s, r) = node.form("/contact/friend", auth, &[]).await;
        assert_eq!(
            (s.as_u16(), r["code"].as_i64()),
            (401, Some(code)),
            "{auth:?}: {r}"
        );
        assert!(r.get("rows").is_none());
    }
    node.stop().await;
}

#[tokio::test]
async fn im_routes_are_rate_limited_per_user() {
    let node = Node::start(
        &[
            ("CHATROOM__IM__API_RATE_PER_SEC", "0.001"),
            ("CHATROOM__IM__API_BURST", "3"),
        ],
        16,
    )
    .await;
    let (_, ta) = node.user("13800000001").await;
    let (_, tb) = node.user("13800000002").await;
    for _ in 0..3 {
        let (_, r) = node.form("/contact/friend", Some(&ta), &[]).await;
        ok(&r);
    }
    let (s, r) = node.form("/contact/friend", Some(&ta), &[]).await;
    assert_eq!((s.as_u16(), r["code"].as_i64()), (429, Some(429)), "{r}");
    assert_eq!(r["msg"], "too many requests, slow down");
    let (_, r) = node.form("/contact/friend", Some(&tb), &[]).await;
    ok(&r);
    node.stop().await;
}

#[tokio::test]
async fn admin_broadcast() {
    // Disabled unless a token is configured.
    let node = Node::start(&[], 16).await;
    let (s, r) = node
        .post_json(
            "/admin/broadcast",
            Some("anything"),
            json!({"content": "hi"}),
        )
        .await;
    assert_eq!(s, 404, "{r}");
    node.stop().await;

    let mut node = Node::start(&[("CHATROOM__HTTP__ADMIN_TOKEN", "op-secret-123")], 16).await;
    let (_, user_token) = node.user("13800000001").await;
    for auth in [None, Some("wrong"), Some(user_token.as_str())] {
        let (s, r) = node
            .post_json("/admin/broadcast", auth, json!({"content": "hi"}))
            .await;
        assert_eq!(
            (s.as_u16(), r["code"].as_i64()),
            (401, Some(401)),
            "{auth:?}: {r}"
        );
    }
    let (s, r) = node
        .post_json(
            "/admin/broadcast",
            Some("op-secret-123"),
            json!({"media": 4}),
        )
        .await;
    assert_eq!((s.as_u16(), r["code"].as_i64()), (400, Some(400)), "{r}");
    assert_eq!(node.queued(), 0, "nothing published for refused broadcasts");

    let (_, r) = node
        .form(
            "/admin/broadcast",
            Some("Bearer op-secret-123"),
            &[("content", "maintenance at 10")],
        )
        .await;
    ok(&r);
    let id = r["data"]["id"].as_i64().expect("id");
    match node.next_queue_msg().await.body {
        Some(Body::Broadcast(b)) => {
            let m = b.msg.expect("msg");
            assert_eq!(
                (m.id, m.cmd, m.media, m.userid, m.content.as_str()),
                (id, 12, 1, 0, "maintenance at 10")
            );
        }
        other => panic!("expected a broadcast, got {other:?}"),
    }
    node.stop().await;
}

fn png() -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    v.extend((0..300u32).map(|i| (i * 7) as u8));
    v
}

async fn upload(
    node: &Node,
    token: Option<&str>,
    parts: &[(&str, Option<&str>, &[u8])],
) -> (u16, serde_json::Value) {
    let (ct, body) = multipart(parts);
    let mut h = vec![("content-type", ct.as_str())];
    if let Some(t) = token {
        h.push(("authorization", t));
    }
    let (s, r) = node.post("/attach/upload", &h, body).await;
    (s.as_u16(), r)
}

#[tokio::test]
async fn uploads() {
    let node = Node::start(&[("CHATROOM__IM__MAX_UPLOAD_BYTES", "4096")], 16).await;
    let (_, t) = node.user("13800000001").await;
    let dir = std::path::PathBuf::from(&node.cfg.im.upload_dir);

    // Round trip: the URL serves the same bytes, with the right type.
    let data = png();
    let (s, r) = upload(&node, Some(&t), &[("file", Some("photo.png"), &data)]).await;
    assert_eq!(s, 200, "{r}");
    ok(&r);
    let url = r["data"].as_str().expect("url").to_string();
    assert!(
        url.starts_with("/attach/files/") && url.ends_with(".png"),
        "{url}"
    );
    let (s, h, body) = node.get_raw(&url).await;
    assert_eq!(s, 200);
    assert_eq!(body.as_ref(), data.as_slice());
    assert_eq!(h["content-type"], "image/png");
    assert_eq!(h["x-content-type-options"], "nosniff");

    // The token may come as a form field, the type as `filetype` (the seed's
    // voice recorder sends a blob); a JPEG named .png is stored as what it is.
    let jpeg = b"\xff\xd8\xff\xe0\0\x10JFIF\0rest-of-jpeg".to_vec();
    let (_, r) = upload(
        &node,
        None,
        &[
            ("token", None, t.as_bytes()),
            ("filetype", None, b".png"),
            ("file", Some("blob"), &jpeg),
        ],
    )
    .await;
    ok(&r);
    assert!(r["data"].as_str().unwrap().ends_with(".jpg"), "{r}");

    // Too large: 413 with a reason.
    let big = [png(), vec![0u8; 5000]].concat();
    let (s, r) = upload(&node, Some(&t), &[("file", Some("big.png"), &big)]).await;
    assert_eq!((s, r["code"].as_i64()), (413, Some(413)), "{r}");
    assert!(
        r["msg"].as_str().unwrap().contains("larger than 4096"),
        "{r}"
    );

    // Types: by extension AND by content.
    let cases: [(&str, &[u8], &str); 5] = [
        (
            "page.html",
            b"<html><script>alert(1)</script></html>",
            "not allowed",
        ),
        (
            "x.svg",
            b"<svg xmlns='http://www.w3.org/2000/svg'/>",
            "not allowed",
        ),
        (
            "fake.png",
            b"this is just text, not a picture",
            "not a known image",
        ),
        ("noext", &data, "name the file type"),
        ("voice.mp3", &data, "was named .mp3"),
    ];
    for (name, bytes, msg) in cases {
        let (s, r) = upload(&node, Some(&t), &[("file", Some(name), bytes)]).await;
        assert_eq!((s, r["code"].as_i64()), (415, Some(415)), "{name}: {r}");
        assert!(r["msg"].as_str().unwrap().contains(msg), "{name}: {r}");
    }

    // Path tricks in the file name never pick the stored path.
    for name in [
        "../../evil.png",
        "/etc/evil.png",
        "..\\..\\evil.png",
        "a\0b.png",
        "C:\\evil.png",
    ] {
        let (s, r) = upload(&node, Some(&t), &[("file", Some(name), &data)]).await;
        if s == 200 {
            let url = r["data"].as_str().unwrap();
            let stored = url.strip_prefix("/attach/files/").expect("our prefix");
            assert!(
                stored.len() == 36
                    && !stored.contains(['/', '\\', '\0'])
                    && !stored.contains("evil"),
                "{name:?} -> {url}"
            );
            assert!(dir.join(stored).is_file());
        } else {
            assert_eq!(r["code"].as_i64(), Some(s as i64), "{name:?}: {r}");
        }
    }
    assert!(!dir.parent().unwrap().join("evil.png").exists());
    assert!(!std::path::Path::new("/etc/evil.png").exists());
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            chatroom_logic::im::upload::valid_stored_name(&name),
            "unexpected file {name}"
        );
    }
    for path in [
        "/attach/files/..%2F..%2Fetc%2Fpasswd",
        "/attach/files/..%2Fdata%2Fim.db",
        "/attach/files/0123456789abcdef0123456789abcdef.png",
    ] {
        let (s, _, _) = node.get_raw(path).await;
        assert_eq!(s, 404, "{path}");
    }

    // A token is needed; and a multipart body.
    let (s, r) = upload(&node, None, &[("file", Some("photo.png"), &data)]).await;
    assert_eq!((s, r["code"].as_i64()), (401, Some(100)), "{r}");
    let (s, r) = node
        .post(
            "/attach/upload",
            &[("content-type", "application/json"), ("authorization", &t)],
            "{}",
        )
        .await;
    assert_eq!(s, 400, "{r}");
    node.stop().await;
}
