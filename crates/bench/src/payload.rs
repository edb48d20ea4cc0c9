//! The benchmark message: every published payload starts with a fixed
//! 29-byte ASCII header — `b`, the send time (ns since the Unix epoch,
//! `SystemTime`, 16 hex digits), the publisher id (4 hex digits) and its
//! sequence number (8 hex digits) — padded with `.` to the requested size.
//! ASCII so that the same payload travels as a WebSocket `bytes` field, a
//! JSON string in `POST /msg`, or a NATS message body.

use std::time::{SystemTime, UNIX_EPOCH};

/// First byte of every benchmark payload.
pub const MAGIC: u8 = b'b';
/// Bytes of the header; the smallest payload.
pub const HEADER_LEN: usize = 1 + 16 + 4 + 8;
/// Padding after the header.
pub const PAD: u8 = b'.';
/// Largest publisher id the header can carry.
pub const MAX_PUBLISHERS: u32 = 0xFFFF + 1;

/// What a payload's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Send time, ns since the Unix epoch.
    pub sent_ns: u64,
    pub publisher: u32,
    pub seq: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload of {0} bytes is shorter than the {HEADER_LEN}-byte header")]
    TooShort(usize),
    #[error("payload does not start with the benchmark magic byte")]
    BadMagic,
    #[error("payload header has a non-hex digit")]
    BadHex,
}

/// Nanoseconds since the Unix epoch (the clock every process here shares).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn put_hex(out: &mut Vec<u8>, v: u64, digits: u32) {
    for i in (0..digits).rev() {
        out.push(HEX[((v >> (i * 4)) & 0xF) as usize]);
    }
}

/// Value of each byte as a hex digit; 0xFF for bytes that are not one.
const HEX_VALUE: [u8; 256] = {
    let mut t = [0xFFu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// Branch-free: the generator decodes millions of these per second.
fn get_hex(b: &[u8]) -> Result<u64, PayloadError> {
    let mut v = 0u64;
    let mut bad = 0u8;
    for &c in b {
        let d = HEX_VALUE[c as usize];
        bad |= d;
        v = (v << 4) | u64::from(d & 0x0F);
    }
    if bad & 0xF0 != 0 {
        Err(PayloadError::BadHex)
    } else {
        Ok(v)
    }
}

/// Writes the payload for `stamp`, `size` bytes long (at least the header),
/// into `out` (cleared first).
pub fn encode(stamp: Stamp, size: usize, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(size.max(HEADER_LEN));
    out.push(MAGIC);
    put_hex(out, stamp.sent_ns, 16);
    put_hex(out, u64::from(stamp.publisher & 0xFFFF), 4);
    put_hex(out, u64::from(stamp.seq), 8);
    out.resize(size.max(HEADER_LEN), PAD);
}

/// The payload for `stamp` as a new buffer.
pub fn encode_vec(stamp: Stamp, size: usize) -> Vec<u8> {
    let mut v = Vec::new();
    encode(stamp, size, &mut v);
    v
}

/// Reads the header of a received payload; the padding is not checked.
pub fn decode(data: &[u8]) -> Result<Stamp, PayloadError> {
    if data.len() < HEADER_LEN {
        return Err(PayloadError::TooShort(data.len()));
    }
    if data[0] != MAGIC {
        return Err(PayloadError::BadMagic);
    }
    Ok(Stamp {
        sent_ns: get_hex(&data[1..17])?,
        publisher: get_hex(&data[17..21])? as u32,
        seq: get_hex(&data[21..29])? as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_padding() {
        let s = Stamp {
            sent_ns: 1_700_000_000_123_456_789,
            publisher: 513,
            seq: 0xdead_beef,
        };
        let p = encode_vec(s, 64);
        assert_eq!(p.len(), 64);
        assert!(p.is_ascii());
        assert!(p[HEADER_LEN..].iter().all(|&c| c == PAD));
        assert_eq!(decode(&p), Ok(s));
        // Smaller than the header: the header alone.
        let p = encode_vec(s, 1);
        assert_eq!(p.len(), HEADER_LEN);
        assert_eq!(decode(&p), Ok(s));
        assert_eq!(&p[..1], b"b");
        assert_eq!(&p[17..21], b"0201");
    }

    #[test]
    fn buffer_is_reused() {
        let mut buf = Vec::new();
        encode(
            Stamp {
                sent_ns: 1,
                publisher: 1,
                seq: 1,
            },
            100,
            &mut buf,
        );
        encode(
            Stamp {
                sent_ns: 2,
                publisher: 2,
                seq: 2,
            },
            40,
            &mut buf,
        );
        assert_eq!(buf.len(), 40);
        assert_eq!(decode(&buf).map(|s| s.seq), Ok(2));
    }

    #[test]
    fn rejects_foreign_payloads() {
        assert_eq!(decode(b"hello"), Err(PayloadError::TooShort(5)));
        assert_eq!(decode(&[b'x'; 40]), Err(PayloadError::BadMagic));
        let mut p = encode_vec(
            Stamp {
                sent_ns: 5,
                publisher: 0,
                seq: 9,
            },
            32,
        );
        p[3] = b'G';
        assert_eq!(decode(&p), Err(PayloadError::BadHex));
        p[3] = b'A'; // upper case is not what we write
        assert_eq!(decode(&p), Err(PayloadError::BadHex));
    }

    #[test]
    fn clock_is_sane() {
        let a = now_ns();
        let b = now_ns();
        assert!(a > 1_600_000_000_000_000_000 && b >= a);
    }
}
