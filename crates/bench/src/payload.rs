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

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// Eight lower-case hex digits at once (SWAR: the generator decodes
/// millions of these per second, and a lookup per digit was a quarter of
/// its CPU).
fn hex8(b: &[u8; 8]) -> Result<u32, PayloadError> {
    let x = u64::from_be_bytes(*b);
    // Per byte, for bytes below 0x80: high bit set where the byte >= c.
    let ge = |c: u64| ((x | HIGH) - c * ONES) & HIGH;
    let digit = ge(b'0' as u64) & !ge(b'9' as u64 + 1);
    let af = ge(b'a' as u64) & !ge(b'f' as u64 + 1);
    if x & HIGH != 0 || (digit | af) != HIGH {
        return Err(PayloadError::BadHex);
    }
    // '0'..'9' -> 0..9, 'a'..'f' -> 10..15 (bit 6 marks letters).
    let v = (x & 0x0F0F_0F0F_0F0F_0F0F) + ((x >> 6) & ONES) * 9;
    // Pack nibbles: 8 bytes -> 4 -> 2 -> 1 value (first digit highest).
    let v = ((v >> 4) | v) & 0x00FF_00FF_00FF_00FF;
    let v = ((v >> 8) | v) & 0x0000_FFFF_0000_FFFF;
    let v = ((v >> 16) | v) & 0x0000_0000_FFFF_FFFF;
    Ok(v as u32)
}

fn hex4(b: &[u8]) -> Result<u32, PayloadError> {
    let mut w = *b"00000000";
    w[4..].copy_from_slice(&b[..4]);
    hex8(&w)
}

fn field8(data: &[u8], at: usize) -> &[u8; 8] {
    data[at..at + 8].try_into().expect("8 bytes")
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

/// Who sent a payload: its publisher and sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    pub publisher: u32,
    pub seq: u32,
}

/// Reads the publisher and sequence of a received payload (what loss and
/// duplicate counting need for every message); the send time is read only
/// for the messages whose latency is recorded ([`sent_ns`]).
pub fn decode_ids(data: &[u8]) -> Result<Ids, PayloadError> {
    if data.len() < HEADER_LEN {
        return Err(PayloadError::TooShort(data.len()));
    }
    if data[0] != MAGIC {
        return Err(PayloadError::BadMagic);
    }
    Ok(Ids {
        publisher: hex4(&data[17..21])?,
        seq: hex8(field8(data, 21))?,
    })
}

/// The send time of a payload [`decode_ids`] accepted.
pub fn sent_ns(data: &[u8]) -> Result<u64, PayloadError> {
    if data.len() < HEADER_LEN {
        return Err(PayloadError::TooShort(data.len()));
    }
    Ok(u64::from(hex8(field8(data, 1))?) << 32 | u64::from(hex8(field8(data, 9))?))
}

/// Reads the header of a received payload; the padding is not checked.
pub fn decode(data: &[u8]) -> Result<Stamp, PayloadError> {
    let ids = decode_ids(data)?;
    Ok(Stamp {
        sent_ns: sent_ns(data)?,
        publisher: ids.publisher,
        seq: ids.seq,
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
    fn swar_hex_matches_every_digit_and_refuses_the_rest() {
        for v in [
            0u32,
            1,
            0x9,
            0xa,
            0xf,
            0x10,
            0xdead_beef,
            0x0123_4567,
            0x89ab_cdef,
            u32::MAX,
        ] {
            let s = format!("{v:08x}");
            assert_eq!(hex8(s.as_bytes().try_into().unwrap()), Ok(v), "{s}");
        }
        for bad in [
            b'/', b':', b'`', b'g', b'A', b'F', b' ', 0x80, 0xb0, 0xe1, 0xff,
        ] {
            for at in 0..8 {
                let mut w = *b"01234567";
                w[at] = bad;
                assert_eq!(hex8(&w), Err(PayloadError::BadHex), "{bad:#x} at {at}");
            }
        }
    }

    #[test]
    fn clock_is_sane() {
        let a = now_ns();
        let b = now_ns();
        assert!(a > 1_600_000_000_000_000_000 && b >= a);
    }
}
