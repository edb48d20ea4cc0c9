//! The WebSocket upgrade of a new connection, and which endpoint it asked
//! for (`/room`, or `/chat?id=&token=`).

use std::time::Duration;

use tokio::net::TcpStream;

use crate::Ctx;
use crate::ws::{self, WsError};

/// Which endpoint the client opened.
pub(super) enum Endpoint {
    Room,
    Chat { id: String, token: String },
}

pub(super) async fn handshake(
    mut stream: TcpStream,
    ctx: &Ctx,
) -> Result<(ws::Reader, ws::Writer, Endpoint), WsError> {
    let _ = stream.set_nodelay(true);
    let timeout = Duration::from_millis(ctx.cfg.ws.sign_in_timeout_ms);
    let (up, leftover) =
        match tokio::time::timeout(timeout, ws::accept(&mut stream, &["/room", "/chat"])).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(WsError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "handshake timed out",
                )));
            }
        };
    let endpoint = if up.path == "/chat" {
        Endpoint::Chat {
            id: query_param(&up.query, "id"),
            token: query_param(&up.query, "token"),
        }
    } else {
        Endpoint::Room
    };
    let w = &ctx.cfg.ws;
    let (reader, writer) = ws::split(stream, leftover, w.max_frame_bytes, w.read_buffer_bytes);
    Ok((reader, writer, endpoint))
}

fn query_param(query: &str, name: &str) -> String {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| percent_decode(v))
        .unwrap_or_default()
}

/// Decodes `%XX` and `+` in a query value; bad escapes are kept as they are.
fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(x) => {
                        out.push(x);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_decoded() {
        let q = "id=12&token=a%2Eb+c&x";
        assert_eq!(query_param(q, "id"), "12");
        assert_eq!(query_param(q, "token"), "a.b c");
        assert_eq!(query_param(q, "missing"), "");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%41%"), "A%");
    }
}
