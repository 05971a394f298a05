//! Content digests. Motorpool stores blobs under SHA-256 (what Bazel 4 sends) or BLAKE3 (newer
//! clients); both are 32-byte hashes, so one fixed-size key type serves both.

use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use std::fmt;

/// A hash function the CAS accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DigestFunction {
    Sha256,
    Blake3,
}

impl DigestFunction {
    /// Every function the CAS accepts, in the order Capabilities reports them.
    pub const ALL: [DigestFunction; 2] = [DigestFunction::Sha256, DigestFunction::Blake3];

    /// Lower-case name, as used in ByteStream resource names (`blobs/blake3/...`).
    pub fn name(self) -> &'static str {
        match self {
            DigestFunction::Sha256 => "sha256",
            DigestFunction::Blake3 => "blake3",
        }
    }

    /// Parses a resource-name segment (case-insensitive).
    pub fn from_name(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "sha256" => Some(DigestFunction::Sha256),
            "blake3" => Some(DigestFunction::Blake3),
            _ => None,
        }
    }

    /// A one-byte tag, stable on disk.
    pub fn tag(self) -> u8 {
        match self {
            DigestFunction::Sha256 => 1,
            DigestFunction::Blake3 => 9,
        }
    }

    /// Inverse of [`DigestFunction::tag`].
    pub fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            1 => Some(DigestFunction::Sha256),
            9 => Some(DigestFunction::Blake3),
            _ => None,
        }
    }

    /// A streaming hasher for this function.
    pub fn hasher(self) -> Hasher {
        Hasher::new(self)
    }

    /// Hashes `data` in one go.
    pub fn digest_of(self, data: &[u8]) -> BlobDigest {
        let mut h = self.hasher();
        h.update(data);
        h.finish()
    }
}

impl fmt::Display for DigestFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The address of a blob: function, 32-byte hash and size.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlobDigest {
    pub function: DigestFunction,
    #[serde(with = "hash_bytes")]
    pub hash: [u8; 32],
    pub size: u64,
}

/// Why a textual digest was rejected.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DigestParseError {
    #[error("hash `{0}` is not 64 lower-case hex characters")]
    Hash(String),
    #[error("size {0} is negative")]
    NegativeSize(i64),
}

impl BlobDigest {
    /// Parses a 64-character hex hash (lower-case, as REAPI requires) and a size.
    pub fn parse(
        function: DigestFunction,
        hex_hash: &str,
        size: i64,
    ) -> Result<Self, DigestParseError> {
        BlobDigest::parse_bytes(function, hex_hash.as_bytes(), size)
    }

    /// [`BlobDigest::parse`] of a hash given as raw bytes off the wire (any bytes; only 64
    /// lower-case hex digits pass).
    pub fn parse_bytes(
        function: DigestFunction,
        hex_hash: &[u8],
        size: i64,
    ) -> Result<Self, DigestParseError> {
        if size < 0 {
            return Err(DigestParseError::NegativeSize(size));
        }
        let hash = decode_hex32(hex_hash).ok_or_else(|| {
            DigestParseError::Hash(truncate(&String::from_utf8_lossy(hex_hash), 80))
        })?;
        Ok(BlobDigest {
            function,
            hash,
            size: size as u64,
        })
    }

    /// Lower-case hex of the hash.
    pub fn hex(&self) -> String {
        hex::encode(self.hash)
    }

    /// True for the digest of the empty blob under its function.
    pub fn is_empty_blob(&self) -> bool {
        self.size == 0 && *self == self.function.digest_of(&[])
    }
}

/// Value of each byte as a lower-case hex digit; `0xFF` for every other byte.
const HEX_VALUE: [u8; 256] = {
    let mut t = [0xFFu8; 256];
    let mut c = 0;
    while c < 10 {
        t[b'0' as usize + c] = c as u8;
        c += 1;
    }
    let mut c = 0;
    while c < 6 {
        t[b'a' as usize + c] = 10 + c as u8;
        c += 1;
    }
    t
};

/// Decodes exactly 64 lower-case hex digits. Branch-free over the digits (a table lookup each,
/// one validity check at the end): FindMissingBlobs parses a hundred thousand of these per call.
fn decode_hex32(s: &[u8]) -> Option<[u8; 32]> {
    let s: &[u8; 64] = s.try_into().ok()?;
    let mut out = [0u8; 32];
    let mut bad = 0u8;
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        let (hi, lo) = (HEX_VALUE[pair[0] as usize], HEX_VALUE[pair[1] as usize]);
        bad |= hi | lo;
        *o = (hi << 4) | (lo & 0x0F);
    }
    (bad & 0xF0 == 0).then_some(out)
}

/// Serializes a hash as one byte string (a length and a copy) instead of 32 separate integers.
mod hash_bytes {
    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(h)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = [u8; 32];
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("32 hash bytes")
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<[u8; 32], E> {
                v.try_into().map_err(|_| E::invalid_length(v.len(), &self))
            }
            fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<[u8; 32], E> {
                self.visit_bytes(&v)
            }
        }
        d.deserialize_bytes(V)
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        s.to_string()
    } else {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    }
}

impl fmt::Display for BlobDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.function, self.hex(), self.size)
    }
}

impl fmt::Debug for BlobDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A streaming hasher that also counts the bytes it saw.
#[derive(Clone)]
pub struct Hasher {
    inner: HasherImpl,
    len: u64,
}

#[derive(Clone)]
enum HasherImpl {
    Sha256(Box<sha2::Sha256>),
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    fn new(function: DigestFunction) -> Self {
        let inner = match function {
            DigestFunction::Sha256 => HasherImpl::Sha256(Box::default()),
            DigestFunction::Blake3 => HasherImpl::Blake3(Box::default()),
        };
        Hasher { inner, len: 0 }
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.len += data.len() as u64;
        match &mut self.inner {
            HasherImpl::Sha256(h) => h.update(data),
            HasherImpl::Blake3(h) => {
                h.update(data);
            }
        }
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing was fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of everything fed.
    pub fn finish(self) -> BlobDigest {
        let (function, hash) = match self.inner {
            HasherImpl::Sha256(h) => (DigestFunction::Sha256, h.finalize().into()),
            HasherImpl::Blake3(h) => (DigestFunction::Blake3, *h.finalize().as_bytes()),
        };
        BlobDigest {
            function,
            hash,
            size: self.len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        let d = DigestFunction::Sha256.digest_of(b"abc");
        assert_eq!(
            d.hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.size, 3);
        let e = DigestFunction::Blake3.digest_of(b"");
        assert_eq!(
            e.hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert!(e.is_empty_blob());
        assert!(!d.is_empty_blob());
    }

    #[test]
    fn parse_rejects_bad_hashes_and_sizes() {
        let ok = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert!(BlobDigest::parse(DigestFunction::Sha256, ok, 3).is_ok());
        assert_eq!(
            BlobDigest::parse(DigestFunction::Sha256, ok, -1),
            Err(DigestParseError::NegativeSize(-1))
        );
        for bad in [
            "",
            "abc",
            &ok.to_uppercase(),
            &format!("{ok}00"),
            &ok.replace('a', "g"),
        ] {
            assert!(
                matches!(
                    BlobDigest::parse(DigestFunction::Sha256, bad, 3),
                    Err(DigestParseError::Hash(_))
                ),
                "{bad}"
            );
        }
        // Every byte that is not a lower-case hex digit, at every position, is refused; every
        // digit decodes to its value.
        let d = DigestFunction::Sha256.digest_of(b"abc");
        assert_eq!(
            BlobDigest::parse(DigestFunction::Sha256, &d.hex(), 3)
                .unwrap()
                .hash,
            d.hash
        );
        for pos in 0..64 {
            for c in 0..=255u8 {
                let mut s = ok.as_bytes().to_vec();
                s[pos] = c;
                let want = (c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
                    .then(|| hex::decode(&s).unwrap());
                let got = decode_hex32(&s).map(|h| h.to_vec());
                assert_eq!(got, want, "byte {c:#x} at {pos}");
            }
        }
    }

    #[test]
    fn streaming_equals_one_shot() {
        for f in DigestFunction::ALL {
            let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
            let mut h = f.hasher();
            for c in data.chunks(999) {
                h.update(c);
            }
            assert_eq!(h.finish(), f.digest_of(&data));
        }
    }
}
