//! The merged-sending codec: several messages in one `BroadcastRoomReq.data`,
//! each prefixed by its length as a 4-byte little-endian integer:
//! `|len1|data1|len2|data2|...`.

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes of the length prefix.
pub const HEAD_LEN: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("truncated length prefix at offset {0}")]
    TruncatedHead(usize),
    #[error("message at offset {offset} claims {len} bytes but {left} remain")]
    TruncatedBody {
        offset: usize,
        len: usize,
        left: usize,
    },
}

/// Accumulates messages into one merged buffer.
#[derive(Debug, Default)]
pub struct BatchBuilder {
    buf: BytesMut,
    count: usize,
}

impl BatchBuilder {
    pub fn with_capacity(bytes: usize) -> Self {
        BatchBuilder {
            buf: BytesMut::with_capacity(bytes),
            count: 0,
        }
    }

    pub fn push(&mut self, msg: &[u8]) {
        // Messages are bounded far below 4 GiB by every ingress limit.
        self.buf.put_u32_le(msg.len() as u32);
        self.buf.put_slice(msg);
        self.count += 1;
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Encoded size so far.
    pub fn bytes_len(&self) -> usize {
        self.buf.len()
    }

    /// The merged bytes; the builder is left empty for reuse.
    pub fn take(&mut self) -> Bytes {
        self.count = 0;
        self.buf.split().freeze()
    }
}

/// Encodes `msgs` as one merged buffer.
pub fn encode<'a>(msgs: impl IntoIterator<Item = &'a [u8]>) -> Bytes {
    let mut b = BatchBuilder::default();
    for m in msgs {
        b.push(m);
    }
    b.take()
}

/// Iterates the messages of a merged buffer.
pub fn decode(data: &[u8]) -> Decode<'_> {
    Decode { data, offset: 0 }
}

/// Iterator returned by [`decode`]; stops after the first error.
pub struct Decode<'a> {
    data: &'a [u8],
    offset: usize,
}

impl<'a> Iterator for Decode<'a> {
    type Item = Result<&'a [u8], BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        let left = self.data.len() - self.offset;
        if left == 0 {
            return None;
        }
        if left < HEAD_LEN {
            let at = self.offset;
            self.offset = self.data.len();
            return Some(Err(BatchError::TruncatedHead(at)));
        }
        let head: [u8; HEAD_LEN] = self.data[self.offset..self.offset + HEAD_LEN]
            .try_into()
            .expect("slice has HEAD_LEN bytes");
        let len = u32::from_le_bytes(head) as usize;
        let start = self.offset + HEAD_LEN;
        if self.data.len() - start < len {
            let err = BatchError::TruncatedBody {
                offset: self.offset,
                len,
                left: self.data.len() - start,
            };
            self.offset = self.data.len();
            return Some(Err(err));
        }
        self.offset = start + len;
        Some(Ok(&self.data[start..start + len]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_example() {
        // The seed's worked example: "pack1" then "i am pack2".
        let b = encode([&b"pack1"[..], b"i am pack2"]);
        assert_eq!(&b[..9], &[5, 0, 0, 0, 112, 97, 99, 107, 49]);
        assert_eq!(&b[9..13], &[10, 0, 0, 0]);
        let out: Vec<_> = decode(&b).map(Result::unwrap).collect();
        assert_eq!(out, vec![&b"pack1"[..], b"i am pack2"]);
    }

    #[test]
    fn empty_messages_and_truncation() {
        let b = encode([&b""[..], b"x"]);
        let out: Vec<_> = decode(&b).map(Result::unwrap).collect();
        assert_eq!(out, vec![&b""[..], b"x"]);
        assert_eq!(
            decode(&b[..2]).next(),
            Some(Err(BatchError::TruncatedHead(0)))
        );
        let mut d = decode(&b[..b.len() - 1]);
        assert_eq!(d.next(), Some(Ok(&b""[..])));
        assert!(matches!(
            d.next(),
            Some(Err(BatchError::TruncatedBody { .. }))
        ));
        assert_eq!(d.next(), None);
    }

    #[test]
    fn builder_reuse() {
        let mut b = BatchBuilder::with_capacity(64);
        b.push(b"a");
        assert_eq!(b.len(), 1);
        let first = b.take();
        assert!(b.is_empty());
        b.push(b"bc");
        let second = b.take();
        assert_eq!(&first[..], &[1, 0, 0, 0, b'a']);
        assert_eq!(&second[..], &[2, 0, 0, 0, b'b', b'c']);
    }
}
