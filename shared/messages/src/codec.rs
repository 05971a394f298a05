//! The one codec: a 6-byte header followed by a bincode 2 (serde) body.
//!
//! ```text
//! +------+------+-----------+--------------+----------------------+
//! | 'M'  | 'P'  | kind: u16 | version: u16 | bincode body ...     |
//! +------+------+-----------+--------------+----------------------+
//! ```
//!
//! `kind` names the message type (unique per type across the workspace, checked by a test);
//! `version` is that type's schema version. A decoder rejects a frame whose kind or version is
//! not the one it expects, so a mis-routed or differently-versioned message is an error that
//! names both sides, never a silently wrong value.

use serde::{Serialize, de::DeserializeOwned};

/// Header magic.
pub const MAGIC: [u8; 2] = *b"MP";
/// Header length in bytes.
pub const HEADER_LEN: usize = 6;

/// A message that travels on the bus.
pub trait Message: Serialize + DeserializeOwned + Send + 'static {
    /// Unique id of this message type on the wire.
    const KIND: u16;
    /// Schema version; bump it whenever the serialized shape changes.
    const VERSION: u16;
    /// Human-readable name used in errors and logs.
    const NAME: &'static str;
}

/// A message that expects a reply of type [`Request::Reply`].
pub trait Request: Message {
    /// The reply type.
    type Reply: Message;
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {len} bytes is shorter than the {HEADER_LEN}-byte header")]
    Short { len: usize },
    #[error("frame does not start with the Motorpool magic")]
    Magic,
    #[error("expected a {expected} message (kind {expected_kind}), got kind {got}")]
    Kind {
        expected: &'static str,
        expected_kind: u16,
        got: u16,
    },
    #[error("{name} message has schema version {got}; this build speaks version {expected}")]
    Version {
        name: &'static str,
        got: u16,
        expected: u16,
    },
    #[error("malformed {name} body: {source}")]
    Body {
        name: &'static str,
        #[source]
        source: bincode::error::DecodeError,
    },
    #[error("{name} body has {extra} trailing bytes")]
    Trailing { name: &'static str, extra: usize },
    #[error("cannot encode {name}: {source}")]
    Encode {
        name: &'static str,
        #[source]
        source: bincode::error::EncodeError,
    },
}

fn config() -> impl bincode::config::Config {
    // Varint integers keep digests' sizes and small counts compact; a hard limit protects
    // decoders from a hostile length prefix.
    bincode::config::standard().with_limit::<{ 256 * 1024 * 1024 }>()
}

/// Encodes `msg` into a new frame.
pub fn encode<M: Message>(msg: &M) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(64);
    encode_into(msg, &mut out)?;
    Ok(out)
}

/// Appends the frame of `msg` to `out`.
pub fn encode_into<M: Message>(msg: &M, out: &mut Vec<u8>) -> Result<(), CodecError> {
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&M::KIND.to_be_bytes());
    out.extend_from_slice(&M::VERSION.to_be_bytes());
    bincode::serde::encode_into_std_write(msg, out, config())
        .map(|_| ())
        .map_err(|source| CodecError::Encode {
            name: M::NAME,
            source,
        })
}

/// Reads only the header: `(kind, version)`.
pub fn peek(frame: &[u8]) -> Result<(u16, u16), CodecError> {
    if frame.len() < HEADER_LEN {
        return Err(CodecError::Short { len: frame.len() });
    }
    if frame[..2] != MAGIC {
        return Err(CodecError::Magic);
    }
    let kind = u16::from_be_bytes([frame[2], frame[3]]);
    let version = u16::from_be_bytes([frame[4], frame[5]]);
    Ok((kind, version))
}

/// Decodes a frame that must hold an `M`.
pub fn decode<M: Message>(frame: &[u8]) -> Result<M, CodecError> {
    let (kind, version) = peek(frame)?;
    if kind != M::KIND {
        return Err(CodecError::Kind {
            expected: M::NAME,
            expected_kind: M::KIND,
            got: kind,
        });
    }
    if version != M::VERSION {
        return Err(CodecError::Version {
            name: M::NAME,
            got: version,
            expected: M::VERSION,
        });
    }
    let body = &frame[HEADER_LEN..];
    let (msg, used) =
        bincode::serde::decode_from_slice(body, config()).map_err(|source| CodecError::Body {
            name: M::NAME,
            source,
        })?;
    if used != body.len() {
        return Err(CodecError::Trailing {
            name: M::NAME,
            extra: body.len() - used,
        });
    }
    Ok(msg)
}

/// Declares [`Message`] for a type: `message!(Type, kind, version);`.
#[macro_export]
macro_rules! message {
    ($ty:ty, $kind:expr, $version:expr) => {
        impl $crate::codec::Message for $ty {
            const KIND: u16 = $kind;
            const VERSION: u16 = $version;
            const NAME: &'static str = stringify!($ty);
        }
    };
    ($ty:ty, $kind:expr, $version:expr, reply = $reply:ty) => {
        $crate::message!($ty, $kind, $version);
        impl $crate::codec::Request for $ty {
            type Reply = $reply;
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct V1 {
        a: u32,
        b: String,
    }
    crate::message!(V1, 60001, 1);

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct V2 {
        a: u32,
        b: String,
    }
    crate::message!(V2, 60001, 2);

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Other {
        a: u32,
    }
    crate::message!(Other, 60002, 1);

    #[test]
    fn round_trip() {
        let m = V1 {
            a: 7,
            b: "x".into(),
        };
        let frame = encode(&m).unwrap();
        assert_eq!(&frame[..2], b"MP");
        assert_eq!(decode::<V1>(&frame).unwrap(), m);
    }

    #[test]
    fn newer_reader_tells_older_message_apart() {
        let frame = encode(&V1 {
            a: 1,
            b: "old".into(),
        })
        .unwrap();
        let err = decode::<V2>(&frame).unwrap_err();
        assert!(
            matches!(
                err,
                CodecError::Version {
                    got: 1,
                    expected: 2,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn wrong_kind_short_magic_trailing_and_garbage_are_errors() {
        let frame = encode(&Other { a: 1 }).unwrap();
        assert!(matches!(
            decode::<V1>(&frame),
            Err(CodecError::Kind { got: 60002, .. })
        ));
        assert!(matches!(
            decode::<V1>(b"MP"),
            Err(CodecError::Short { len: 2 })
        ));
        assert!(matches!(
            decode::<V1>(b"XX\0\0\0\0"),
            Err(CodecError::Magic)
        ));
        let mut long = encode(&Other { a: 1 }).unwrap();
        long.push(0);
        assert!(matches!(
            decode::<Other>(&long),
            Err(CodecError::Trailing { extra: 1, .. })
        ));
        let mut bad = encode(&V1 {
            a: 1,
            b: "abc".into(),
        })
        .unwrap();
        bad.truncate(bad.len() - 2);
        assert!(matches!(decode::<V1>(&bad), Err(CodecError::Body { .. })));
    }
}
