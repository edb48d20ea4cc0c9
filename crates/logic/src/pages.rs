//! The web pages, served by logic itself so that they share an origin with
//! the HTTP API (no CORS set-up): `GET /` redirects to the IM page,
//! `GET /web/<path>` serves files under `http.web_dir`, `GET /api/<name>.proto`
//! serves the `.proto` files of the `api/` folder beside it (the room page
//! loads `../api/protocol.proto`). An empty `http.web_dir` turns all of this
//! off.
//!
//! Only known file types are served (by extension, with their content
//! type), never a directory listing, never a hidden file, never anything
//! outside the folder: a path whose decoded form has `..`/`.` segments,
//! empty segments, backslashes, colons or control characters is refused
//! before the file system is asked, and what the file system answers must
//! still lie inside the folder once symbolic links are resolved. Nothing
//! under `node_modules` or `test` is served.
//!
//! protobuf.js's browser build, which the room page needs, is compiled into
//! the binary (`web/vendor/protobuf.min.js`, vendored with its licence) and
//! served from memory at `/web/vendor/protobuf.min.js`: the page works from
//! `cargo run --release` on a fresh clone, with no `npm install` in `web/`,
//! and a binary can never be without it.
//!
//! `GET /chat/index.shtml?id=<id>&token=<token>` is the IM seed's entry (its
//! log-in page sends the browser there): it redirects to the chat page,
//! which signs in with that id and token.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::{HeaderValue, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use tracing::{debug, info, warn};

use crate::error::ApiError;

/// The page `GET /` leads to.
pub const HOME: &str = "/web/chat.html";

/// Files larger than this are not served (ours are a few hundred KiB).
const MAX_FILE_BYTES: u64 = 8 << 20;

/// Longest path accepted after `/web/` or `/api/`, in bytes.
const MAX_PATH_BYTES: usize = 512;

/// protobuf.js 7's browser build (full: it parses `.proto` files).
const PROTOBUF_JS: &[u8] = include_bytes!("../../../web/vendor/protobuf.min.js");

/// Where the room page loads [`PROTOBUF_JS`] from.
pub const PROTOBUF_JS_PATH: &str = "/web/vendor/protobuf.min.js";

/// The IM seed's chat entry.
pub const SEED_CHAT_ENTRY: &str = "/chat/index.shtml";

/// Top-level folders of `web_dir` that are never served (dependencies, tests).
const PRIVATE_DIRS: &[&str] = &["node_modules", "test"];

/// The content type of each extension served from `web_dir`.
fn web_type(ext: &str) -> Option<&'static str> {
    Some(match ext {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "ico" => "image/x-icon",
        // Our own files only: an uploaded SVG is never served from here.
        "svg" => "image/svg+xml",
        "proto" => "text/plain; charset=utf-8",
        _ => return None,
    })
}

struct Pages {
    web: PathBuf,
    api: PathBuf,
}

/// The page routes for `web_dir` (relative to the working directory);
/// empty: none. A folder that does not exist is logged and answered 404.
pub fn router(web_dir: &str) -> Router {
    if web_dir.is_empty() {
        return Router::new();
    }
    let web = PathBuf::from(web_dir);
    // `api/` sits beside the web folder (web/ and api/ of the repository).
    let api = match std::fs::canonicalize(&web) {
        Ok(real) => real
            .parent()
            .map(|p| p.join("api"))
            .unwrap_or_else(|| web.join("../api")),
        Err(e) => {
            warn!(web_dir, error = %e, "http.web_dir is not readable; the web pages will answer 404");
            web.join("../api")
        }
    };
    info!(web_dir, api_dir = %api.display(), "serving web pages at /web/ (home {HOME})");
    let pages = Arc::new(Pages { web, api });
    Router::new()
        .route("/", get(|| async { Redirect::to(HOME) }))
        .route("/web", get(|| async { Redirect::to(HOME) }))
        .route("/web/", get(|| async { Redirect::to(HOME) }))
        .route(PROTOBUF_JS_PATH, get(protobuf_js))
        .route(SEED_CHAT_ENTRY, get(seed_chat_entry))
        .route("/web/{*path}", get(web_file))
        .route("/api/{*path}", get(api_file))
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(pages)
}

async fn web_file(State(p): State<Arc<Pages>>, uri: Uri) -> Response {
    let Some(rel) = relative(uri.path(), "/web/") else {
        return not_found(uri.path());
    };
    let top = rel.split('/').next().unwrap_or("");
    if PRIVATE_DIRS.contains(&top) {
        return not_found(uri.path());
    }
    serve(&p.web, &rel, uri.path()).await
}

async fn protobuf_js() -> Response {
    (
        [
            (
                CONTENT_TYPE,
                HeaderValue::from_static("text/javascript; charset=utf-8"),
            ),
            (X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        PROTOBUF_JS,
    )
        .into_response()
}

/// `/chat/index.shtml?<query>` -> `/web/chat.html?<query>`: the query (the
/// seed's `id` and `token`) is passed on as it came.
async fn seed_chat_entry(uri: Uri) -> Response {
    let target = match uri.query() {
        Some(q) if !q.is_empty() => format!("{HOME}?{q}"),
        _ => HOME.to_string(),
    };
    // Never cached: the address carries a token.
    let mut resp = Redirect::to(&target).into_response();
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

async fn api_file(State(p): State<Arc<Pages>>, uri: Uri) -> Response {
    // Only the .proto files at the top of api/.
    match relative(uri.path(), "/api/") {
        Some(rel) if !rel.contains('/') && rel.ends_with(".proto") => {
            serve(&p.api, &rel, uri.path()).await
        }
        _ => not_found(uri.path()),
    }
}

/// The decoded, checked path after `prefix`, or `None` if it is not one we
/// would ever serve.
fn relative(path: &str, prefix: &str) -> Option<String> {
    let raw = path.strip_prefix(prefix)?;
    // `%XX` only: paths have no `+` rule. A bad escape stays a literal '%',
    // refused below with the other characters no page name has.
    let rel = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()?
        .into_owned();
    if rel.is_empty() || rel.len() > MAX_PATH_BYTES {
        return None;
    }
    if rel.chars().any(|c| {
        c.is_control() || matches!(c, '\\' | ':' | '*' | '?' | '"' | '<' | '>' | '|' | '%')
    }) {
        return None;
    }
    // Leading '/' (absolute), '//' (empty segment), '.', '..' and hidden files.
    if rel
        .split('/')
        .any(|seg| seg.is_empty() || seg.starts_with('.'))
    {
        return None;
    }
    let ext = rel.rsplit_once('.')?.1;
    web_type(ext)?;
    Some(rel)
}

/// Reads `root/rel` (already checked by [`relative`]) if it is a regular
/// file inside `root` once links are resolved.
async fn serve(root: &Path, rel: &str, shown: &str) -> Response {
    let Some(ext) = rel.rsplit_once('.').map(|(_, e)| e) else {
        return not_found(shown);
    };
    let Some(mime) = web_type(ext) else {
        return not_found(shown);
    };
    let (Ok(real_root), Ok(real)) = (
        tokio::fs::canonicalize(root).await,
        tokio::fs::canonicalize(root.join(rel)).await,
    ) else {
        return not_found(shown);
    };
    if !real.starts_with(&real_root) {
        warn!(
            path = shown,
            "a web file resolves outside its folder; refused"
        );
        return not_found(shown);
    }
    match tokio::fs::metadata(&real).await {
        Ok(m) if m.is_file() && m.len() <= MAX_FILE_BYTES => {}
        _ => return not_found(shown),
    }
    let bytes = match tokio::fs::read(&real).await {
        Ok(b) => b,
        Err(_) => return not_found(shown),
    };
    let mut resp = (
        [
            (CONTENT_TYPE, HeaderValue::from_static(mime)),
            (X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            // Pages change with the code: always revalidate.
            (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        Body::from(bytes),
    )
        .into_response();
    if ext == "html" {
        let h = resp.headers_mut();
        h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        h.insert(
            CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("frame-ancestors 'none'; object-src 'none'; base-uri 'self'"),
        );
    }
    resp
}

fn not_found(path: &str) -> Response {
    debug!(path, "no such web file");
    ApiError::NotFound.into_im_response()
}

async fn method_not_allowed() -> Response {
    ApiError::MethodNotAllowed.into_im_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_are_served() {
        for (p, want) in [
            ("/web/chat.html", "chat.html"),
            ("/web/lib/im.mjs", "lib/im.mjs"),
            ("/web/a%20b.css", "a b.css"),
            ("/web/%E4%BD%A0.png", "你.png"),
        ] {
            assert_eq!(relative(p, "/web/").as_deref(), Some(want), "{p}");
        }
    }

    #[test]
    fn paths_that_are_refused() {
        for p in [
            "/web/",
            "/web/../Cargo.toml",
            "/web/lib/../../Cargo.toml",
            "/web/%2e%2e/Cargo.toml",
            "/web/%2E%2E%2FCargo.toml",
            "/web/..%2f..%2fetc%2fpasswd.html",
            "/web//etc/passwd.html",
            "/web/%2fetc%2fhosts.html",
            "/web/lib\\..\\x.html",
            "/web/lib%5c..%5cx.html",
            "/web/x.html%00.png",
            "/web/C:/x.html",
            "/web/.hidden.html",
            "/web/./chat.html",
            "/web/lib/",
            "/web/lib",
            "/web/package.json",
            "/web/Cargo.toml",
            "/web/x.rs",
            "/web/%zz.html",
            "/web/%ff.html",
            "/web/%e4.html",
        ] {
            assert_eq!(relative(p, "/web/"), None, "{p}");
        }
        let long = format!("/web/{}.html", "a".repeat(MAX_PATH_BYTES));
        assert_eq!(relative(&long, "/web/"), None);
    }
}
