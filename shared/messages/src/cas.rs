//! Messages between the gateway and CAS shards.
//!
//! Small things (digest lists, small-blob batches, action-cache entries, chunked reads) travel as
//! NATS request/reply; the kind ids live in 100..200. Large blob bodies travel on the shard's direct
//! data stream (a TCP connection whose control frames are [`DataRequest`] / [`DataReply`]); see
//! `docs/adr/0002-large-blobs-direct-stream.md`.

use crate::{BlobDigest, WireError, message};
use serde::{Deserialize, Serialize};

/// A shard's registration, refreshed every heartbeat. Stored in the shard registry (a JetStream
/// KV bucket keyed by shard id) and published on the heartbeat subject.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub shard_id: String,
    /// `host:port` of the shard's direct data stream.
    pub data_addr: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub blob_count: u64,
    /// Milliseconds since the Unix epoch when this shard process started.
    pub started_at_ms: u64,
    /// Milliseconds since the Unix epoch of this heartbeat.
    pub heartbeat_at_ms: u64,
    /// Whether the shard is leaving (clean shutdown): readers stop routing to it at once.
    pub draining: bool,
}
message!(ShardInfo, 100, 1);

/// Which of these digests does the shard not hold?
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindMissing {
    pub instance: String,
    pub digests: Vec<BlobDigest>,
}
message!(FindMissing, 101, 1, reply = FindMissingReply);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindMissingReply {
    /// Indices into the request's `digests` of the blobs this shard does not hold.
    pub missing: Vec<u32>,
}
message!(FindMissingReply, 102, 1);

/// One blob of a batch write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobPut {
    pub digest: BlobDigest,
    #[serde(with = "crate::bytes::vec")]
    pub data: Vec<u8>,
}

/// Store these small blobs (each is verified against its digest first).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchWrite {
    pub instance: String,
    pub blobs: Vec<BlobPut>,
}
message!(BatchWrite, 103, 1, reply = BatchWriteReply);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchWriteReply {
    /// One entry per request blob, in order: `None` when stored (or already present).
    pub results: Vec<Option<WireError>>,
}
message!(BatchWriteReply, 104, 1);

/// Read these small blobs whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRead {
    pub instance: String,
    pub digests: Vec<BlobDigest>,
}
message!(BatchRead, 105, 1, reply = BatchReadReply);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchReadReply {
    /// One entry per request digest, in order.
    #[serde(with = "crate::bytes::results")]
    pub blobs: Vec<Result<Vec<u8>, WireError>>,
}
message!(BatchReadReply, 106, 1);

/// Read `limit` bytes (0 = to the end) of one blob from `offset`: the chunked-over-NATS read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadChunk {
    pub instance: String,
    pub digest: BlobDigest,
    pub offset: u64,
    pub limit: u64,
}
message!(ReadChunk, 107, 1, reply = ChunkData);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkData {
    #[serde(with = "crate::bytes::vec")]
    pub data: Vec<u8>,
}
message!(ChunkData, 108, 1);

/// Append a chunk to an upload session: the chunked-over-NATS write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteChunk {
    pub instance: String,
    pub digest: BlobDigest,
    pub upload_id: String,
    pub offset: u64,
    #[serde(with = "crate::bytes::vec")]
    pub data: Vec<u8>,
    pub finish: bool,
}
message!(WriteChunk, 109, 1, reply = WriteStatus);

/// How far an upload got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryWrite {
    pub instance: String,
    pub digest: BlobDigest,
    pub upload_id: String,
}
message!(QueryWrite, 110, 1, reply = WriteStatus);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteStatus {
    /// Bytes durably received (for a complete blob: its size).
    pub committed: u64,
    /// The blob is stored and verified.
    pub complete: bool,
}
message!(WriteStatus, 111, 1);

/// Look up an action-cache entry (an encoded `ActionResult`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcGet {
    pub instance: String,
    pub action: BlobDigest,
}
message!(AcGet, 112, 1, reply = AcEntry);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcEntry {
    /// The encoded `ActionResult`, or `None` when there is no entry.
    #[serde(with = "crate::bytes::option")]
    pub result: Option<Vec<u8>>,
}
message!(AcEntry, 113, 1);

/// Store (or replace) an action-cache entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcPut {
    pub instance: String,
    pub action: BlobDigest,
    #[serde(with = "crate::bytes::vec")]
    pub result: Vec<u8>,
}
message!(AcPut, 114, 1, reply = AcEntry);

/// Drop an action-cache entry (used when its outputs turned out to be gone).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcDelete {
    pub instance: String,
    pub action: BlobDigest,
}
message!(AcDelete, 115, 1, reply = AcEntry);

/// The abstract Unix socket address (Linux) at which a shard whose data stream is bound to
/// `data_addr` also serves it. Abstract names belong to a network namespace, as loopback
/// addresses do: a client that can reach `data_addr` on this host's loopback finds the same
/// shard at this address, and one in another namespace (another host, another container's
/// network) finds nothing and uses TCP.
pub fn data_socket_addr(data_addr: &str) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(format!("motorpool-cas-data/{data_addr}"))
}

/// Opening frame on a shard's direct data stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataRequest {
    /// Write (or resume writing) a blob from `offset`. After [`DataReply::WriteReady`], the client
    /// sends chunks as `u32` little-endian length + bytes, and a zero-length chunk to finish; the
    /// shard answers [`DataReply::Committed`] or [`DataReply::Error`]. A connection that closes
    /// before the zero-length chunk leaves the upload resumable at its committed offset.
    Write {
        instance: String,
        digest: BlobDigest,
        upload_id: String,
        offset: u64,
    },
    /// Read `limit` bytes (0 = to the end) from `offset`. After [`DataReply::ReadReady`] exactly
    /// `len` raw bytes follow.
    Read {
        instance: String,
        digest: BlobDigest,
        offset: u64,
        limit: u64,
    },
    /// Store a whole blob of at most [`DATA_PUT_MAX`] bytes in one round trip: exactly
    /// `digest.size` raw bytes follow this frame at once, and the shard answers
    /// [`DataReply::Committed`] or [`DataReply::Error`]. For the many small blobs a build uploads
    /// one ByteStream write each; a connection cut inside the bytes stores nothing.
    Put {
        instance: String,
        digest: BlobDigest,
    },
    /// The first frame of every connection, answering the shard's [`DataReply::Challenge`]:
    /// `proof` = BLAKE3 keyed with the deployment's data key, of the challenge's nonce. A
    /// shard with a data key serves nothing else before a right proof.
    Hello { proof: [u8; 32] },
}
message!(DataRequest, 120, 3);

/// Largest blob a [`DataRequest::Put`] carries; larger blobs are streamed with `Write`.
pub const DATA_PUT_MAX: u64 = 1 << 20;

/// Control replies on the direct data stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataReply {
    /// Send data from `committed` on.
    WriteReady {
        committed: u64,
    },
    /// The blob is stored and verified (also the answer when it already was).
    Committed {
        size: u64,
    },
    /// `len` raw bytes follow.
    ReadReady {
        len: u64,
    },
    Error(WireError),
    /// The shard's first frame on every connection: prove you hold the data key.
    Challenge {
        nonce: [u8; 32],
    },
}
message!(DataReply, 121, 2);

/// The proof a data-stream client sends for `nonce` (no key: the all-zero key, which only a
/// shard without a key accepts).
pub fn data_proof(key: Option<&[u8; 32]>, nonce: &[u8; 32]) -> [u8; 32] {
    *blake3::keyed_hash(key.unwrap_or(&[0; 32]), nonce).as_bytes()
}

/// Reads a data key file: 64 hex digits (`motorpool up` writes `<data dir>/bus/data.key`).
pub fn read_data_key(path: &std::path::Path) -> Result<[u8; 32], String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let bytes = hex_decode(text.trim())
        .filter(|b| b.len() == 32)
        .ok_or_else(|| format!("{}: not 64 hex digits", path.display()))?;
    Ok(bytes.try_into().expect("32 bytes"))
}

/// [`read_data_key`] of a configured file, if any.
pub fn load_data_key(path: Option<&std::path::Path>) -> Result<Option<[u8; 32]>, String> {
    path.map(read_data_key).transpose()
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A page of the blobs a shard holds (for the reindexer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListBlobs {
    /// Empty for the first page, else the previous page's `next`.
    pub cursor: Vec<u8>,
    pub limit: u32,
}
message!(ListBlobs, 122, 1, reply = BlobList);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobList {
    /// `(instance name, digest)` of each blob.
    pub blobs: Vec<(String, BlobDigest)>,
    /// Cursor of the next page; `None` after the last.
    pub next: Option<Vec<u8>>,
}
message!(BlobList, 123, 1);

/// What a shard tells everyone who keeps conclusions drawn from what it holds (the gateways'
/// verified action results): that blobs or action-cache entries are gone from it, or, with both
/// lists empty, only that it is alive and how many removals it has announced. A shard publishes
/// these on one subject, in order, so a reader that finds `seq` ahead of what it has seen knows
/// it lost one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardNews {
    pub shard_id: String,
    /// The shard process's start (ms since the epoch); a new one starts `seq` again at 0.
    pub started_at_ms: u64,
    /// Removal announcements published by this process so far, this one included.
    pub seq: u64,
    /// Hashes of blobs no longer on this shard (evicted, found corrupt), in any namespace.
    pub blobs: Vec<[u8; 32]>,
    /// Hashes of actions whose action-cache entries were deleted, in any namespace.
    pub actions: Vec<[u8; 32]>,
    /// The shard is stopping: everything it holds is about to be out of reach.
    pub leaving: bool,
}
message!(ShardNews, 124, 1);

impl ShardNews {
    /// True when this is a heartbeat (nothing removed).
    pub fn is_beat(&self) -> bool {
        self.blobs.is_empty() && self.actions.is_empty()
    }
}

impl<R: crate::Message> crate::Message for Result<R, WireError> {
    const KIND: u16 = R::KIND;
    const VERSION: u16 = R::VERSION;
    const NAME: &'static str = R::NAME;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DigestFunction, decode, encode};

    #[test]
    fn replies_round_trip_with_errors() {
        let ok: Result<FindMissingReply, WireError> = Ok(FindMissingReply {
            missing: vec![1, 5],
        });
        let frame = encode(&ok).unwrap();
        assert_eq!(
            decode::<Result<FindMissingReply, WireError>>(&frame).unwrap(),
            ok
        );
        let err: Result<FindMissingReply, WireError> = Err(WireError::invalid("nope"));
        let frame = encode(&err).unwrap();
        assert_eq!(
            decode::<Result<FindMissingReply, WireError>>(&frame).unwrap(),
            err
        );
    }

    #[test]
    fn digest_list_is_compact() {
        let digests: Vec<_> = (0..1000u32)
            .map(|i| DigestFunction::Sha256.digest_of(&i.to_le_bytes()))
            .collect();
        let frame = encode(&FindMissing {
            instance: String::new(),
            digests,
        })
        .unwrap();
        // 32-byte hash + 1-byte function + varint size: NATS's default 1 MiB payload holds ~30k.
        assert!(frame.len() < 1000 * 36, "{}", frame.len());
    }
}
