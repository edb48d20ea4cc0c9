//! Client sockets: the local source addresses sessions are spread over (so
//! that ephemeral ports never run out), resolving the server's address once,
//! and opening a WebSocket from a chosen source address with a small read
//! buffer.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::error::BenchError;

/// A client WebSocket.
pub type Ws = WebSocketStream<TcpStream>;

/// Read buffer of a client connection (tungstenite's default is 128 KiB,
/// eagerly allocated: 19,000 of them would be 2.4 GiB). 16 KiB takes a
/// busy room's merged frame (100–200 messages) in one read instead of
/// several; 19,000 of them are 300 MiB of generator memory.
pub const READ_BUFFER: usize = 16 * 1024;

/// Parses `127.0.0.2-127.0.0.20`, `127.0.0.2,127.0.0.5` or one address.
pub fn parse_source_ips(s: &str) -> Result<Vec<Ipv4Addr>, BenchError> {
    let bad = |what: &str| BenchError::config(format!("--source-ips: {what} in {s:?}"));
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a.trim().parse().map_err(|_| bad("bad address"))?;
            let b: Ipv4Addr = b.trim().parse().map_err(|_| bad("bad address"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || b - a > 65_535 {
                return Err(bad("range must go up and hold at most 65536 addresses"));
            }
            out.extend((a..=b).map(Ipv4Addr::from));
        } else {
            out.push(part.parse().map_err(|_| bad("bad address"))?);
        }
    }
    if out.is_empty() {
        return Err(bad("no address"));
    }
    Ok(out)
}

/// The source address for connection `i`: round-robin over `ips`.
pub fn source_for(ips: &[Ipv4Addr], i: u64) -> Option<Ipv4Addr> {
    if ips.is_empty() {
        None
    } else {
        Some(ips[(i % ips.len() as u64) as usize])
    }
}

/// A server endpoint: its URL and the socket address it resolved to.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub url: String,
    pub addr: SocketAddr,
}

/// Resolves the host of a `ws://` or `http://` URL once.
pub async fn resolve(url: &str) -> Result<Endpoint, BenchError> {
    let uri: Uri = url
        .parse()
        .map_err(|e| BenchError::config(format!("bad URL {url}: {e}")))?;
    let host = uri
        .host()
        .ok_or_else(|| BenchError::config(format!("no host in {url}")))?;
    let port = uri.port_u16().unwrap_or(80);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addr = tokio::net::lookup_host((host, port))
        .await?
        .next()
        .ok_or_else(|| BenchError::config(format!("{host} resolves to no address")))?;
    Ok(Endpoint {
        url: url.to_string(),
        addr,
    })
}

/// Resolves every URL of a list, in order.
pub async fn resolve_all(urls: &[String]) -> Result<Vec<Endpoint>, BenchError> {
    let mut eps = Vec::with_capacity(urls.len());
    for u in urls {
        eps.push(resolve(u).await?);
    }
    if eps.is_empty() {
        return Err(BenchError::config("no server URL"));
    }
    Ok(eps)
}

/// Connects to `addr`, from `source` if given (port chosen by the OS).
pub async fn connect_tcp(
    addr: SocketAddr,
    source: Option<Ipv4Addr>,
) -> Result<TcpStream, BenchError> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// tungstenite settings for a client: small read buffer, writes sent at once.
pub fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20))
}

/// Opens a WebSocket to `ep` from `source`.
pub async fn open_ws(ep: &Endpoint, source: Option<Ipv4Addr>) -> Result<Ws, BenchError> {
    let tcp = connect_tcp(ep.addr, source).await?;
    let (ws, _resp) =
        tokio_tungstenite::client_async_with_config(ep.url.as_str(), tcp, Some(client_config()))
            .await?;
    Ok(ws)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ip_forms() {
        let r = parse_source_ips("127.0.0.2-127.0.0.4").unwrap();
        assert_eq!(
            r,
            vec![
                Ipv4Addr::new(127, 0, 0, 2),
                Ipv4Addr::new(127, 0, 0, 3),
                Ipv4Addr::new(127, 0, 0, 4)
            ]
        );
        let r = parse_source_ips("127.0.0.9, 127.0.1.255-127.0.2.0").unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[2], Ipv4Addr::new(127, 0, 2, 0));
        assert!(parse_source_ips("127.0.0.5-127.0.0.1").is_err());
        assert!(parse_source_ips("localhost").is_err());
        assert!(parse_source_ips("").is_err());
        assert_eq!(source_for(&r, 4), Some(r[1]));
        assert_eq!(source_for(&[], 4), None);
    }

    #[tokio::test]
    async fn resolves_and_binds_source() {
        let ep = resolve("ws://127.0.0.1:9/room").await.unwrap();
        assert_eq!(ep.addr, "127.0.0.1:9".parse().unwrap());
        assert_eq!(resolve("http://127.0.0.1").await.unwrap().addr.port(), 80);
        assert!(resolve("not a url").await.is_err());
        let two = resolve_all(&[
            "ws://127.0.0.1:9/room".into(),
            "ws://127.0.0.1:10/room".into(),
        ])
        .await
        .unwrap();
        assert_eq!(two[1].addr.port(), 10);
        assert!(resolve_all(&[]).await.is_err());

        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let src = Ipv4Addr::new(127, 0, 0, 3);
        let (c, a) = tokio::join!(connect_tcp(addr, Some(src)), l.accept());
        assert_eq!(c.unwrap().local_addr().unwrap().ip(), IpAddr::V4(src));
        assert_eq!(a.unwrap().1.ip(), IpAddr::V4(src));
    }
}
