//! The web pages served by logic (`http.web_dir`): `GET /` redirects to the
//! IM page, `/web/<path>` serves known file types with their content types,
//! `/api/<name>.proto` the protocol files beside it; 404 (JSON, like every
//! other logic error) for everything else, traversal attempts included.

mod support;

use std::path::Path;

use hyper::StatusCode;
use support::{DEADLINE, Node, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "TOP-SECRET-OUTSIDE-WEB";

/// `site/web/...`, `site/api/...` and secrets beside and above them.
fn site(dir: &Path) -> String {
    let files: &[(&str, &[u8])] = &[
        ("web/chat.html", b"<!doctype html><title>chat</title>"),
        ("web/lib/im.mjs", b"export const x = 1;"),
        ("web/lib/old.js", b"var y = 2;"),
        ("web/style.css", b"body { color: red }"),
        ("web/logo.png", b"\x89PNG\r\n\x1a\nfake"),
        ("web/icon.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>"),
        ("web/copy.proto", b"syntax = \"proto3\";"),
        ("web/a b.css", b"/* spaced */"),
        (
            "web/node_modules/protobufjs/dist/protobuf.min.js",
            b"/* protobuf.js */",
        ),
        ("web/node_modules/ws/index.js", b"/* not for browsers */"),
        ("web/test/im.test.mjs", b"/* tests */"),
        ("web/.hidden.html", SECRET.as_bytes()),
        ("web/package.json", b"{}"),
        ("web/serve.rs", SECRET.as_bytes()),
        ("web/sub/inner.html", b"inner"),
        ("api/protocol.proto", b"message Req {}"),
        ("api/notes.txt", SECRET.as_bytes()),
        ("api/deep/other.proto", SECRET.as_bytes()),
        ("secret.html", SECRET.as_bytes()),
        ("Cargo.toml", SECRET.as_bytes()),
    ];
    let site = dir.join("site");
    for (rel, body) in files {
        let p = site.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(site.join("secret.html"), site.join("web/escape.html")).unwrap();
        std::os::unix::fs::symlink(site.join("api"), site.join("web/apilink")).unwrap();
    }
    site.join("web").display().to_string()
}

async fn get(node: &Node, path: &str) -> (StatusCode, hyper::HeaderMap, String) {
    let (s, h, b) = node.get_raw(path).await;
    (s, h, String::from_utf8_lossy(&b).into_owned())
}

fn header<'a>(h: &'a hyper::HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// A request written byte for byte (for targets a URI type would refuse or
/// tidy); the status and the whole answer.
async fn raw_get(node: &Node, target: &[u8]) -> (u16, String) {
    raw(node, "GET", target).await
}

async fn raw(node: &Node, method: &str, target: &[u8]) -> (u16, String) {
    let mut s = tokio::time::timeout(DEADLINE, tokio::net::TcpStream::connect(node.http_addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    let mut req = format!("{method} ").into_bytes();
    req.extend_from_slice(target);
    req.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(&req).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .expect("read timed out")
        .expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test]
async fn pages_are_served_with_their_content_types() {
    let dir = TempDir::new("pages");
    let web = site(dir.path());
    let node = Node::start(&[("CHATROOM__HTTP__WEB_DIR", web.as_str())], 16).await;

    let (s, h, _) = get(&node, "/").await;
    assert!(s.is_redirection(), "{s}");
    assert_eq!(header(&h, "location"), "/web/chat.html");
    for p in ["/web", "/web/"] {
        let (s, h, _) = get(&node, p).await;
        assert!(s.is_redirection(), "{p}: {s}");
        assert_eq!(header(&h, "location"), "/web/chat.html", "{p}");
    }

    let cases = [
        (
            "/web/chat.html",
            "text/html; charset=utf-8",
            "<title>chat</title>",
        ),
        (
            "/web/lib/im.mjs",
            "text/javascript; charset=utf-8",
            "export const x",
        ),
        ("/web/lib/old.js", "text/javascript; charset=utf-8", "var y"),
        ("/web/style.css", "text/css; charset=utf-8", "color: red"),
        ("/web/logo.png", "image/png", "PNG"),
        ("/web/icon.svg", "image/svg+xml", "<svg"),
        ("/web/copy.proto", "text/plain; charset=utf-8", "proto3"),
        ("/web/a%20b.css", "text/css; charset=utf-8", "spaced"),
        ("/web/sub/inner.html", "text/html; charset=utf-8", "inner"),
        // Compiled in: the site has no vendor/ folder (nor node_modules with it).
        (
            "/web/vendor/protobuf.min.js",
            "text/javascript; charset=utf-8",
            "protobuf.js v7",
        ),
        (
            "/api/protocol.proto",
            "text/plain; charset=utf-8",
            "message Req",
        ),
    ];
    for (path, ctype, needle) in cases {
        let (s, h, body) = get(&node, path).await;
        assert_eq!(s, StatusCode::OK, "{path}: {body}");
        assert_eq!(header(&h, "content-type"), ctype, "{path}");
        assert_eq!(header(&h, "x-content-type-options"), "nosniff", "{path}");
        assert!(body.contains(needle), "{path}: {body}");
    }
    // The IM seed's entry leads to the chat page with its id and token.
    let (s, h, _) = get(&node, "/chat/index.shtml?id=7&token=a.b-c_d").await;
    assert!(s.is_redirection(), "{s}");
    assert_eq!(header(&h, "location"), "/web/chat.html?id=7&token=a.b-c_d");
    assert_eq!(header(&h, "cache-control"), "no-store");
    let (s, h, _) = get(&node, "/chat/index.shtml").await;
    assert!(s.is_redirection(), "{s}");
    assert_eq!(header(&h, "location"), "/web/chat.html");

    let (_, h, _) = get(&node, "/web/chat.html").await;
    assert!(
        header(&h, "content-security-policy").contains("frame-ancestors 'none'"),
        "{h:?}"
    );

    // HEAD works like GET, without a body.
    let (status, text) = raw(&node, "HEAD", b"/web/style.css").await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("text/css"), "{text}");
    assert!(!text.contains("color: red"), "HEAD has no body: {text}");

    // Writes are not a thing here.
    let (s, body) = node
        .post(
            "/web/chat.html",
            &[("content-type", "application/json")],
            "{}",
        )
        .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{body}");
    assert_eq!(body["code"], 405, "{body}");
    node.stop().await;
}

#[tokio::test]
async fn missing_private_and_unknown_files_are_404_json() {
    let dir = TempDir::new("pages");
    let web = site(dir.path());
    let node = Node::start(&[("CHATROOM__HTTP__WEB_DIR", web.as_str())], 16).await;
    for path in [
        "/web/nope.html",
        "/web/lib/nope.mjs",
        "/web/sub",
        "/web/sub/",
        "/web/lib/",
        "/web/.hidden.html",
        "/web/package.json",
        "/web/serve.rs",
        "/web/node_modules/ws/index.js",
        "/web/node_modules/protobufjs/dist/protobuf.min.js",
        "/web/node_modules/protobufjs/dist/",
        "/web/test/im.test.mjs",
        "/web/escape.html",
        "/web/apilink/protocol.proto",
        "/api/notes.txt",
        "/api/deep/other.proto",
        "/api/",
        "/api/nope.proto",
    ] {
        // `request` insists on a JSON answer: errors are JSON here too.
        let (s, body) = node.request("GET", path, &[], bytes::Bytes::new()).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}: {body}");
        assert_eq!(body["msg"], "not found", "{path}: {body}");
    }
    node.stop().await;
}

#[tokio::test]
async fn traversal_attempts_never_leave_the_folder() {
    let dir = TempDir::new("pages");
    let web = site(dir.path());
    let node = Node::start(&[("CHATROOM__HTTP__WEB_DIR", web.as_str())], 16).await;
    let targets: &[&[u8]] = &[
        b"/web/../secret.html",
        b"/web/../Cargo.toml",
        b"/web/lib/../../secret.html",
        b"/web/%2e%2e/secret.html",
        b"/web/%2E%2E/secret.html",
        b"/web/..%2fsecret.html",
        b"/web/%2e%2e%2fsecret.html",
        b"/web/lib/%2e%2e/%2e%2e/secret.html",
        b"/web/.%2e/secret.html",
        b"/web//etc/passwd",
        b"/web/%2fetc%2fpasswd",
        b"/web/%2f..%2fsecret.html",
        b"/web/..\\secret.html",
        b"/web/..%5csecret.html",
        b"/web/lib%5c..%5c..%5csecret.html",
        b"/web/chat.html%00.png",
        b"/web/%00",
        b"/web/C:%5cWindows%5cwin.ini",
        b"/web/%252e%252e/secret.html",
        b"/web/%c0%ae%c0%ae/secret.html",
        b"/api/../secret.html",
        b"/api/%2e%2e/secret.html",
        b"/api/..%2fCargo.toml",
        b"/api/%2e%2e%2fweb%2fchat.html",
        b"/web/../api/notes.txt",
    ];
    for t in targets {
        let shown = String::from_utf8_lossy(t);
        let (status, text) = raw_get(&node, t).await;
        assert_ne!(status, 200, "{shown} was served: {text}");
        assert!(
            (400..500).contains(&status),
            "{shown}: expected a 4xx, got {text}"
        );
        assert!(!text.contains(SECRET), "{shown} leaked: {text}");
    }
    // An absolute path given as the target itself.
    let abs = dir.path().join("site/secret.html").display().to_string();
    let (status, text) = raw_get(&node, abs.as_bytes()).await;
    assert!(!text.contains(SECRET) && status != 200, "{text}");
    node.stop().await;
}

#[tokio::test]
async fn the_repository_pages_are_found_and_empty_web_dir_turns_pages_off() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web");
    let repo = repo.display().to_string();
    let node = Node::start(&[("CHATROOM__HTTP__WEB_DIR", repo.as_str())], 16).await;
    for (path, needle) in [
        ("/web/chat.html", "<html"),
        ("/web/room.html", "<html"),
        ("/web/lib/im.mjs", "export"),
        ("/web/lib/chatroom.mjs", "export"),
        ("/web/vendor/protobuf.min.js", "protobuf.js v7"),
        ("/api/protocol.proto", "BroadcastRoomReq"),
    ] {
        let (s, _, body) = get(&node, path).await;
        assert_eq!(s, StatusCode::OK, "{path}");
        assert!(body.contains(needle), "{path}");
    }
    node.stop().await;

    let off = Node::start(&[("CHATROOM__HTTP__WEB_DIR", "")], 16).await;
    for path in ["/", "/web/chat.html", "/api/protocol.proto"] {
        let (s, body) = off.request("GET", path, &[], bytes::Bytes::new()).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}: {body}");
    }
    // The API is unaffected.
    let (s, body) = off
        .post_json("/user/login", None, serde_json::json!({}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    off.stop().await;
}
