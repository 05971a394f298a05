//! Byte strings on the wire as one length and one copy.
//!
//! serde sees a `Vec<u8>` as a sequence, so without help every byte of a blob is encoded and
//! decoded as a separate element. These `#[serde(with = ...)]` helpers hand the bytes over as a
//! byte string instead. bincode writes both forms identically (a length, then the raw bytes),
//! so this changes the speed, not the wire format (tested below).

use crate::WireError;
use serde::de::{Error, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Borrowed bytes that serialize as a byte string.
struct Bytes<'a>(&'a [u8]);

impl Serialize for Bytes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// Owned bytes that deserialize from a byte string (or, from other formats, a sequence).
struct ByteBuf(Vec<u8>);

impl<'de> Deserialize<'de> for ByteBuf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ByteBuf;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<ByteBuf, E> {
                Ok(ByteBuf(v.to_vec()))
            }
            fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<ByteBuf, E> {
                Ok(ByteBuf(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ByteBuf, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(ByteBuf(out))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

/// For `Vec<u8>` fields.
pub mod vec {
    use super::*;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        ByteBuf::deserialize(d).map(|b| b.0)
    }
}

/// For `Option<Vec<u8>>` fields.
pub mod option {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        v.as_deref().map(Bytes).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<ByteBuf>::deserialize(d).map(|o| o.map(|b| b.0))
    }
}

/// For `Vec<Result<Vec<u8>, WireError>>` fields (batch read replies).
pub mod results {
    use super::*;

    pub fn serialize<S: Serializer>(
        v: &[Result<Vec<u8>, WireError>],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|r| r.as_deref().map(Bytes)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<Result<Vec<u8>, WireError>>, D::Error> {
        Vec::<Result<ByteBuf, WireError>>::deserialize(d)
            .map(|v| v.into_iter().map(|r| r.map(|b| b.0)).collect())
    }
}

#[cfg(test)]
mod tests {
    use crate::ErrorCode;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Plain {
        data: Vec<u8>,
        some: Option<Vec<u8>>,
        none: Option<Vec<u8>>,
        results: Vec<Result<Vec<u8>, crate::WireError>>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Fast {
        #[serde(with = "super::vec")]
        data: Vec<u8>,
        #[serde(with = "super::option")]
        some: Option<Vec<u8>>,
        #[serde(with = "super::option")]
        none: Option<Vec<u8>>,
        #[serde(with = "super::results")]
        results: Vec<Result<Vec<u8>, crate::WireError>>,
    }

    #[test]
    fn byte_strings_keep_the_wire_format_of_sequences() {
        let data: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let results = vec![
            Ok(b"blob".to_vec()),
            Err(crate::WireError::new(ErrorCode::NotFound, "gone")),
            Ok(Vec::new()),
        ];
        let plain = Plain {
            data: data.clone(),
            some: Some(b"x".to_vec()),
            none: None,
            results: results.clone(),
        };
        let fast = Fast {
            data,
            some: Some(b"x".to_vec()),
            none: None,
            results,
        };
        let cfg = bincode::config::standard();
        let a = bincode::serde::encode_to_vec(&plain, cfg).unwrap();
        let b = bincode::serde::encode_to_vec(&fast, cfg).unwrap();
        assert_eq!(a, b);
        // Each side reads the other's bytes.
        let (back, _): (Fast, usize) = bincode::serde::decode_from_slice(&a, cfg).unwrap();
        assert_eq!(back, fast);
        let (back, _): (Plain, usize) = bincode::serde::decode_from_slice(&b, cfg).unwrap();
        assert_eq!(back, plain);
    }
}
