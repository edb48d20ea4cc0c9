//! The WebSocket upgrade of a new connection, and which endpoint it asked
//! for (`/room`, or `/chat?id=&token=`).

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
    let timeout = ctx.cfg.ws.sign_in_timeout;
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

/// `name`'s value in a query string, `application/x-www-form-urlencoded`
/// decoded (`%XX` and `+`; a bad escape is kept as it is).
fn query_param(query: &str, name: &str) -> String {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
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
        assert_eq!(query_param("t=%zz%4", "t"), "%zz%4");
        assert_eq!(query_param("t=%41%", "t"), "A%");
        assert_eq!(query_param("t=%+1", "t"), "% 1", "not an escape");
    }
}
