//! FindMissingBlobs straight off the wire.
//!
//! Bazel asks FindMissingBlobs before every upload, often about tens of thousands of digests at
//! once. Decoding such a request into prost types allocates a `String` per hash and checks it as
//! UTF-8, and the hashes are then parsed again; that was most of the gateway's time on the call.
//! Here the request is read once from its bytes: each `Digest` is parsed in place (hex straight
//! into the 32-byte hash), and the reply repeats the request's own bytes for the missing ones, so
//! the client gets back exactly the digests it sent.
//!
//! [`cas_service`] serves the ContentAddressableStorage service: FindMissingBlobs through this
//! codec, every other method through the generated server.

use crate::resource::digest_function;
use crate::wire::{Fields, Malformed, Value, put_varint};
use crate::{Gateway, RawMethods};
use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bytes::{Buf, BufMut, Bytes};
use motorpool_cas_client::ApiError;
use motorpool_messages::BlobDigest;
use re::content_addressable_storage_server::ContentAddressableStorageServer;
use std::ops::Range;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::BoxFuture;
use tonic::server::{Grpc, UnaryService};
use tonic::{Request, Response, Status};

const PATH: &str = "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";

/// A FindMissingBlobsRequest as it came: its bytes and where each digest lies in them.
#[derive(Debug)]
pub struct WireRequest {
    raw: Bytes,
    pub instance_name: String,
    pub digest_function: i32,
    /// The byte range of each `Digest` message in `raw`, in request order.
    digests: Vec<Range<usize>>,
}

/// A FindMissingBlobsResponse, already encoded.
#[derive(Debug)]
pub struct WireResponse(Vec<u8>);

impl WireRequest {
    /// Splits a request into its fields; digests are only located here, parsed by
    /// [`WireRequest::digests`].
    pub fn parse(raw: Bytes) -> Result<WireRequest, Malformed> {
        let mut instance_name = String::new();
        let mut digest_function = 0;
        let mut digests = Vec::new();
        let base = raw.as_ptr() as usize;
        let mut fields = Fields::new(&raw);
        while let Some((field, value)) = fields.next()? {
            match (field, value) {
                (1, Value::Bytes(b)) => {
                    instance_name = std::str::from_utf8(b)
                        .map_err(|_| Malformed("instance_name is not UTF-8"))?
                        .to_string();
                }
                (2, Value::Bytes(b)) => {
                    let start = b.as_ptr() as usize - base;
                    digests.push(start..start + b.len());
                }
                (3, Value::Varint(v)) => digest_function = v as i32,
                (1..=3, _) => return Err(Malformed("a known field has the wrong wire type")),
                _ => {} // unknown fields are skipped, as protobuf requires
            }
        }
        Ok(WireRequest {
            raw,
            instance_name,
            digest_function,
            digests,
        })
    }

    /// Number of digests asked about.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// True when no digest is asked about.
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Each digest, validated under the request's digest function.
    pub fn digests(&self) -> Result<Vec<BlobDigest>, ApiError> {
        let function = digest_function(self.digest_function)?;
        let mut out = Vec::with_capacity(self.digests.len());
        for r in &self.digests {
            let (hash, size) = digest_fields(&self.raw[r.clone()])
                .map_err(|e| ApiError::Invalid(format!("invalid digest: {e}")))?;
            out.push(
                BlobDigest::parse_bytes(function, hash, size)
                    .map_err(|e| ApiError::Invalid(format!("invalid digest: {e}")))?,
            );
        }
        Ok(out)
    }

    /// The response naming the digests whose flag in `missing` is set, each as the request's
    /// own bytes.
    pub fn respond(&self, missing: &[bool]) -> WireResponse {
        let mut out = Vec::new();
        for (r, _) in self.digests.iter().zip(missing).filter(|(_, m)| **m) {
            out.push(0x12); // field 2, length-delimited: missing_blob_digests
            put_varint(&mut out, r.len() as u64);
            out.extend_from_slice(&self.raw[r.clone()]);
        }
        WireResponse(out)
    }
}

impl WireResponse {
    /// The encoded FindMissingBlobsResponse.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// The hash and size fields of one `Digest` message.
fn digest_fields(b: &[u8]) -> Result<(&[u8], i64), Malformed> {
    // As every client lays it out: hash (field 1, 64 bytes), then size (field 2) unless zero.
    if let [0x0A, 64, rest @ ..] = b
        && rest.len() >= 64
    {
        let (hash, tail) = rest.split_at(64);
        match tail {
            [] => return Ok((hash, 0)),
            [0x10, size @ ..] => {
                let mut f = Fields::new(size);
                let size = f.varint()? as i64;
                if f.is_empty() {
                    return Ok((hash, size));
                }
            }
            _ => {}
        }
    }
    // Anything else a valid encoder may write: fields in any order, repeated (the last wins),
    // unknown ones skipped.
    let mut hash: &[u8] = &[];
    let mut size = 0i64;
    let mut fields = Fields::new(b);
    while let Some((field, value)) = fields.next()? {
        match (field, value) {
            (1, Value::Bytes(h)) => hash = h,
            (2, Value::Varint(v)) => size = v as i64,
            (1 | 2, _) => return Err(Malformed("a digest field has the wrong wire type")),
            _ => {}
        }
    }
    Ok((hash, size))
}

/// The codec of the FindMissingBlobs method: bytes in, bytes out.
#[derive(Debug, Default, Clone, Copy)]
struct WireCodec;

impl Codec for WireCodec {
    type Encode = WireResponse;
    type Decode = WireRequest;
    type Encoder = WireCodec;
    type Decoder = WireCodec;

    fn encoder(&mut self) -> WireCodec {
        WireCodec
    }

    fn decoder(&mut self) -> WireCodec {
        WireCodec
    }
}

impl Encoder for WireCodec {
    type Item = WireResponse;
    type Error = Status;

    fn encode(&mut self, item: WireResponse, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item.0);
        Ok(())
    }
}

impl Decoder for WireCodec {
    type Item = WireRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<WireRequest>, Status> {
        let raw = src.copy_to_bytes(src.remaining());
        WireRequest::parse(raw).map(Some).map_err(|e| {
            Status::invalid_argument(format!("malformed FindMissingBlobsRequest: {e}"))
        })
    }
}

struct FindMissingMethod(Gateway);

impl UnaryService<WireRequest> for FindMissingMethod {
    type Response = WireResponse;
    type Future = BoxFuture<Response<WireResponse>, Status>;

    fn call(&mut self, request: Request<WireRequest>) -> Self::Future {
        let gateway = self.0.clone();
        let who = crate::auth::caller(&request);
        Box::pin(async move {
            let req = request.into_inner();
            crate::observe("FindMissingBlobs", async move {
                who?.check_instance(&req.instance_name)?;
                gateway.find_missing_wire(req).await
            })
            .await
        })
    }
}

/// The ContentAddressableStorage service: FindMissingBlobs read off the wire, the other methods
/// by the generated server.
pub fn cas_service(
    gateway: Gateway,
    max_message_bytes: usize,
) -> RawMethods<ContentAddressableStorageServer<Gateway>> {
    RawMethods {
        generated: ContentAddressableStorageServer::new(gateway.clone())
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes),
        methods: &[(PATH, |gateway, req, max| {
            Box::pin(async move {
                let mut grpc =
                    Grpc::new(WireCodec).apply_max_message_size_config(Some(max), Some(max));
                Ok(grpc.unary(FindMissingMethod(gateway), req).await)
            })
        })],
        gateway,
        max_message_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use motorpool_messages::DigestFunction;
    use prost::Message;

    fn proto(d: &BlobDigest) -> re::Digest {
        re::Digest {
            hash: d.hex(),
            size_bytes: d.size as i64,
        }
    }

    #[test]
    fn requests_read_off_the_wire_match_prost_and_replies_repeat_the_request() {
        let ds: Vec<BlobDigest> = (0..300u32)
            .map(|i| DigestFunction::Blake3.digest_of(&i.to_le_bytes()))
            .collect();
        let req = re::FindMissingBlobsRequest {
            instance_name: "ci/grey".into(),
            blob_digests: ds.iter().map(proto).collect(),
            digest_function: re::digest_function::Value::Blake3 as i32,
        };
        let mut raw = req.encode_to_vec();
        // An unknown field of every wire type (a newer client's), which must be skipped.
        raw.extend_from_slice(&[0x78, 0x96, 0x01]); // field 15, varint
        raw.extend_from_slice(&[0x81, 0x01, 1, 2, 3, 4, 5, 6, 7, 8]); // field 16, fixed64
        raw.extend_from_slice(&[0x8A, 0x01, 2, b'h', b'i']); // field 17, bytes
        raw.extend_from_slice(&[0x95, 0x01, 1, 2, 3, 4]); // field 18, fixed32
        let wire = WireRequest::parse(Bytes::from(raw)).unwrap();
        assert_eq!(wire.instance_name, "ci/grey");
        assert_eq!(wire.len(), 300);
        assert_eq!(wire.digests().unwrap(), ds);

        let missing: Vec<bool> = (0..300).map(|i| i % 3 == 1).collect();
        let resp = re::FindMissingBlobsResponse::decode(wire.respond(&missing).as_bytes()).unwrap();
        let want: Vec<re::Digest> = ds
            .iter()
            .zip(&missing)
            .filter(|(_, m)| **m)
            .map(|(d, _)| proto(d))
            .collect();
        assert_eq!(resp.missing_blob_digests, want);

        // Fields in any order, a repeated scalar (the last wins), unset digest function = SHA-256.
        let d = DigestFunction::Sha256.digest_of(b"x");
        let mut digest = vec![0x10, 9]; // size 9 first
        digest.extend_from_slice(&[0x0A, 64]);
        digest.extend_from_slice(d.hex().as_bytes());
        digest.extend_from_slice(&[0x10, 1]); // size again: 1
        let mut raw = vec![0x12, digest.len() as u8];
        raw.extend_from_slice(&digest);
        let wire = WireRequest::parse(Bytes::from(raw)).unwrap();
        assert_eq!(wire.digests().unwrap(), vec![d]);
    }

    #[test]
    fn malformed_requests_and_digests_are_refused_with_a_reason() {
        let d = DigestFunction::Sha256.digest_of(b"x");
        let good = re::FindMissingBlobsRequest {
            blob_digests: vec![proto(&d)],
            ..Default::default()
        }
        .encode_to_vec();
        // Cut anywhere inside: a truncated field, never a silently shorter request.
        for cut in 1..good.len() {
            let r = WireRequest::parse(Bytes::copy_from_slice(&good[..cut]));
            assert!(r.is_err(), "cut at {cut} was accepted");
        }
        for (bytes, why) in [
            (&[0x0B][..], "unsupported wire type"),  // field 1 as a group
            (&[0x12, 0x05, 1][..], "past the end"),  // length beyond the message
            (&[0x08, 0xFF][..], "truncated varint"), // varint cut
            (&[0x00][..], "field number 0"),         // field 0
            (&[0x10, 0x01][..], "wrong wire type"),  // digests as a varint
            (&[0x0A, 0x02, 0xFF, 0xFE][..], "not UTF-8"), // instance name
            (&[0xFF; 11][..], "varint longer than 10"), // key varint never ends
        ] {
            let e = WireRequest::parse(Bytes::copy_from_slice(bytes)).unwrap_err();
            assert!(e.to_string().contains(why), "{e} for {bytes:?}");
        }
        // Digests that parse as protobuf but not as digests: INVALID_ARGUMENT naming the fault.
        for (digest, why) in [
            (
                re::Digest {
                    hash: d.hex().to_uppercase(),
                    size_bytes: 1,
                },
                "hex",
            ),
            (
                re::Digest {
                    hash: d.hex(),
                    size_bytes: -1,
                },
                "negative",
            ),
            (re::Digest::default(), "hex"),
        ] {
            let raw = re::FindMissingBlobsRequest {
                blob_digests: vec![proto(&d), digest],
                ..Default::default()
            }
            .encode_to_vec();
            match WireRequest::parse(Bytes::from(raw)).unwrap().digests() {
                Err(ApiError::Invalid(m)) => assert!(m.contains(why), "{m}"),
                other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
            }
        }
        let raw = re::FindMissingBlobsRequest {
            digest_function: re::digest_function::Value::Md5 as i32,
            ..Default::default()
        }
        .encode_to_vec();
        assert!(matches!(
            WireRequest::parse(Bytes::from(raw)).unwrap().digests(),
            Err(ApiError::Invalid(_))
        ));
    }
}
