//! ByteStream: Read with offset and limit, Write (resumable), QueryWriteStatus.
//!
//! Read and Write are served below the generated code ([`byte_stream_service`]): a blob's chunks
//! go from the shard's socket to the client's without passing through a protobuf encoder, and
//! from the client's to the shard's without prost copying each into a new `Vec`; either would
//! copy every byte once more on the gateway's busiest paths.

use crate::resource::{parse_read, parse_write};
use crate::wire::{Fields, Malformed, Value, put_varint};
use crate::{Gateway, RawMethods, observe};
use bazel_remote_apis::google::bytestream as bs;
use bs::byte_stream_server::{ByteStream, ByteStreamServer};
use bytes::{Buf, Bytes};
use futures::{Stream, StreamExt};
use motorpool_cas_client::ApiError;
use motorpool_cas_client::WriteData;
use motorpool_messages::cas::DATA_PUT_MAX;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, http};
use tonic::server::{ClientStreamingService, Grpc};
use tonic::{Request, Response, Status, Streaming};

const READ_PATH: &str = "/google.bytestream.ByteStream/Read";
const WRITE_PATH: &str = "/google.bytestream.ByteStream/Write";

type ReadStream = Pin<Box<dyn futures::Stream<Item = Result<bs::ReadResponse, Status>> + Send>>;

impl Gateway {
    async fn write<S>(&self, mut stream: S) -> Result<bs::WriteResponse, ApiError>
    where
        S: Stream<Item = Result<WriteMessage, Status>> + Send + Unpin + 'static,
    {
        let first = stream
            .next()
            .await
            .transpose()
            .map_err(|s| {
                ApiError::Invalid(format!(
                    "write stream failed before its first message: {}",
                    s.message()
                ))
            })?
            .ok_or_else(|| ApiError::Invalid("empty write stream".into()))?;
        let res = parse_write(&first.resource_name, &self.config.instance_names)?;
        let upload_id = res
            .upload_id
            .clone()
            .expect("write resources carry an upload id");
        if first.write_offset < 0 || first.write_offset as u64 > res.digest.size {
            return Err(ApiError::Invalid(format!(
                "write offset {} is outside blob {}",
                first.write_offset, res.digest
            )));
        }
        let start = first.write_offset as u64;
        if start == 0
            && first.finish_write
            && first.data.len() as u64 == res.digest.size
            && res.digest.size <= DATA_PUT_MAX
        {
            // The whole blob in one message, as clients send small blobs: one round trip to
            // each replica instead of a resumable upload session.
            metrics::counter!("motorpool_gateway_bytestream_written_bytes_total")
                .increment(res.digest.size);
            let committed = self
                .shards
                .put_whole(&res.instance, &res.digest, first.data.clone())
                .await?;
            self.recent
                .keep_blob(&res.instance, &res.digest, &first.data);
            return Ok(bs::WriteResponse {
                committed_size: committed as i64,
            });
        }
        let name = first.resource_name.clone();
        // Each message must continue exactly where the previous one ended; resource names after
        // the first may be empty or must repeat the first.
        let mut expected = start + first.data.len() as u64;
        let bytes_in = metrics::counter!("motorpool_gateway_bytestream_written_bytes_total");
        bytes_in.increment(first.data.len() as u64);
        let first_item = Ok(WriteData {
            data: first.data,
            finish: first.finish_write,
        });
        let rest = stream.map(move |m| {
            let m =
                m.map_err(|s| ApiError::Invalid(format!("write stream broke: {}", s.message())))?;
            if !m.resource_name.is_empty() && m.resource_name != name {
                return Err(ApiError::Invalid(
                    "resource name changed within one write".into(),
                ));
            }
            if m.write_offset as u64 != expected {
                return Err(ApiError::Invalid(format!(
                    "write offset {} does not follow the {} bytes sent so far",
                    m.write_offset, expected
                )));
            }
            expected += m.data.len() as u64;
            bytes_in.increment(m.data.len() as u64);
            Ok(WriteData {
                data: m.data,
                finish: m.finish_write,
            })
        });
        let chunks = futures::stream::iter([first_item]).chain(rest);
        let committed = self
            .shards
            .write_stream(
                &res.instance,
                &res.digest,
                &upload_id,
                start,
                Box::pin(chunks),
            )
            .await?;
        Ok(bs::WriteResponse {
            committed_size: committed as i64,
        })
    }

    async fn query_write(
        &self,
        req: bs::QueryWriteStatusRequest,
    ) -> Result<bs::QueryWriteStatusResponse, ApiError> {
        let res = parse_write(&req.resource_name, &self.config.instance_names)?;
        let (committed, complete) = self
            .shards
            .query_write(
                &res.instance,
                &res.digest,
                res.upload_id.as_deref().unwrap_or_default(),
            )
            .await?;
        Ok(bs::QueryWriteStatusResponse {
            committed_size: committed as i64,
            complete,
        })
    }

    /// Opens a read and starts fetching its chunks ahead of the client.
    async fn open_read(&self, req: bs::ReadRequest) -> Result<ReadAhead, ApiError> {
        let res = parse_read(&req.resource_name, &self.config.instance_names)?;
        if req.read_offset < 0 || req.read_limit < 0 {
            return Err(ApiError::Invalid(
                "read offset and limit must not be negative".into(),
            ));
        }
        if req.read_offset as u64 > res.digest.size {
            return Err(ApiError::Invalid(format!(
                "read offset {} is past the end of {}",
                req.read_offset, res.digest
            )));
        }
        let mut reader = self
            .shards
            .open_read(
                &res.instance,
                &res.digest,
                req.read_offset as u64,
                req.read_limit as u64,
            )
            .await?;
        let chunk = self.config.read_chunk_bytes.max(4096);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let bytes_out = metrics::counter!("motorpool_gateway_bytestream_read_bytes_total");
        tokio::spawn(async move {
            if reader.is_empty() {
                // One empty message, so that the client sees a reply before the end.
                if tx.send(Piece::Data(Vec::new())).await.is_ok() {
                    let _ = tx.send(Piece::End).await;
                }
                return;
            }
            loop {
                let piece = match reader.next_chunk(chunk).await {
                    Some(Ok(data)) => {
                        bytes_out.increment(data.len() as u64);
                        Piece::Data(data)
                    }
                    Some(Err(e)) => Piece::Failed(e.into()),
                    None => Piece::End,
                };
                let last = !matches!(piece, Piece::Data(_));
                if tx.send(piece).await.is_err() || last {
                    break;
                }
            }
        });
        Ok(ReadAhead { rx, done: false })
    }
}

/// One step of a read: a chunk of the blob, or how the read ended.
enum Piece {
    Data(Vec<u8>),
    End,
    Failed(Status),
}

/// The chunks of one read, fetched by a task one to four chunks ahead of the client, so that the
/// next chunk comes off the shard while the current one goes out. A stream of the chunks that
/// ends with the read: an error when the reader failed, or stopped without saying it had reached
/// the end (a short read is never passed off as the whole blob).
pub(crate) struct ReadAhead {
    rx: tokio::sync::mpsc::Receiver<Piece>,
    done: bool,
}

impl Stream for ReadAhead {
    type Item = Result<Vec<u8>, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let item = match ready!(self.rx.poll_recv(cx)) {
            Some(Piece::Data(data)) => return Poll::Ready(Some(Ok(data))),
            Some(Piece::End) => None,
            Some(Piece::Failed(status)) => Some(Err(status)),
            None => Some(Err(Status::internal(
                "the blob's reader stopped before the end of the read",
            ))),
        };
        self.done = true;
        Poll::Ready(item)
    }
}

/// The gRPC message prefix of a `ReadResponse` carrying `n` bytes of data: the frame header
/// (uncompressed flag, message length) and the protobuf key and length of `data` (field 10).
fn read_response_prefix(n: usize) -> Bytes {
    let mut field = Vec::with_capacity(11);
    if n > 0 {
        // proto3 leaves an empty `data` out.
        field.push(0x52);
        put_varint(&mut field, n as u64);
    }
    let len = u32::try_from(field.len() + n).expect("read chunks are far below 4 GiB");
    let mut out = Vec::with_capacity(5 + field.len());
    out.push(0);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&field);
    Bytes::from(out)
}

/// The HTTP/2 body of a Read: each chunk goes out as a message prefix and then the chunk's own
/// buffer, never copied into an encoding buffer; the trailers carry the read's status.
struct ReadBody {
    chunks: ReadAhead,
    /// The chunk whose prefix went out last.
    queued: Option<Bytes>,
    ended: bool,
}

impl http_body::Body for ReadBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if let Some(data) = this.queued.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        let status = match ready!(Pin::new(&mut this.chunks).poll_next(cx)) {
            Some(Ok(data)) => {
                let prefix = read_response_prefix(data.len());
                if !data.is_empty() {
                    this.queued = Some(Bytes::from(data));
                }
                return Poll::Ready(Some(Ok(http_body::Frame::data(prefix))));
            }
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        this.ended = true;
        let mut trailers = http::HeaderMap::new();
        if let Err(unsendable) = status.add_header(&mut trailers) {
            trailers.clear();
            let _ = unsendable.add_header(&mut trailers);
        }
        Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.queued.is_none()
    }
}

/// Decodes the one `ReadRequest` of a Read call.
struct ReadRequestDecoder;

impl Decoder for ReadRequestDecoder {
    type Item = bs::ReadRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<bs::ReadRequest>, Status> {
        prost::Message::decode(src)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("malformed ReadRequest: {e}")))
    }
}

impl Gateway {
    /// A whole Read call, from the HTTP/2 request to the response whose body streams the blob.
    async fn serve_read(
        self,
        req: http::Request<tonic::body::Body>,
        max_message_bytes: usize,
    ) -> http::Response<tonic::body::Body> {
        let opened = observe("Read", async {
            let mut messages = Streaming::new_request(
                ReadRequestDecoder,
                req.into_body(),
                None,
                Some(max_message_bytes),
            );
            let request = messages
                .message()
                .await
                .map_err(|s| ApiError::Invalid(s.message().to_string()))?
                .ok_or_else(|| ApiError::Invalid("Read call without a ReadRequest".into()))?;
            self.open_read(request).await
        })
        .await;
        match opened {
            Ok(chunks) => {
                let body = ReadBody {
                    chunks: chunks.into_inner(),
                    queued: None,
                    ended: false,
                };
                let mut response = http::Response::new(tonic::body::Body::new(body));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/grpc"),
                );
                response
            }
            Err(status) => status.into_http(),
        }
    }
}

/// The ByteStream service: Read answered by [`ReadBody`] (each chunk's bytes go out as they came
/// from the shard, where the generated server would copy every chunk into a protobuf encoding
/// buffer first), Write read off the wire by [`WriteCodec`] (each chunk's `data` a slice of the
/// buffer it arrived in, where prost would copy it into a new `Vec`), QueryWriteStatus by the
/// generated server.
pub fn byte_stream_service(
    gateway: Gateway,
    max_message_bytes: usize,
) -> RawMethods<ByteStreamServer<Gateway>> {
    RawMethods {
        generated: ByteStreamServer::new(gateway.clone())
            .max_decoding_message_size(max_message_bytes),
        methods: &[
            (READ_PATH, |gateway, req, max| {
                Box::pin(async move { Ok(gateway.serve_read(req, max).await) })
            }),
            (WRITE_PATH, |gateway, req, max| {
                Box::pin(async move {
                    let mut grpc =
                        Grpc::new(WriteCodec).apply_max_message_size_config(Some(max), Some(max));
                    Ok(grpc.client_streaming(WriteMethod(gateway), req).await)
                })
            }),
        ],
        gateway,
        max_message_bytes,
    }
}

/// A `WriteRequest` read off the wire: `data` is a slice of the buffer the message arrived in.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WriteMessage {
    pub resource_name: String,
    pub write_offset: i64,
    pub finish_write: bool,
    pub data: Bytes,
}

impl WriteMessage {
    /// Reads a `WriteRequest`'s fields from its encoding (unknown fields skipped, a repeated
    /// field's last value kept, as protobuf requires).
    pub fn parse(raw: Bytes) -> Result<WriteMessage, Malformed> {
        let mut m = WriteMessage::default();
        let mut fields = Fields::new(&raw);
        while let Some((field, value)) = fields.next()? {
            match (field, value) {
                (1, Value::Bytes(b)) => {
                    m.resource_name = std::str::from_utf8(b)
                        .map_err(|_| Malformed("resource_name is not UTF-8"))?
                        .to_string();
                }
                (2, Value::Varint(v)) => m.write_offset = v as i64,
                (3, Value::Varint(v)) => m.finish_write = v != 0,
                (10, Value::Bytes(b)) => m.data = raw.slice_ref(b),
                (1..=3 | 10, _) => return Err(Malformed("a known field has the wrong wire type")),
                _ => {}
            }
        }
        Ok(m)
    }
}

impl From<bs::WriteRequest> for WriteMessage {
    fn from(r: bs::WriteRequest) -> WriteMessage {
        WriteMessage {
            resource_name: r.resource_name,
            write_offset: r.write_offset,
            finish_write: r.finish_write,
            data: r.data.into(),
        }
    }
}

/// The codec of the Write method: [`WriteMessage`]s in, a prost-encoded `WriteResponse` out.
#[derive(Debug, Default, Clone, Copy)]
struct WriteCodec;

impl Codec for WriteCodec {
    type Encode = bs::WriteResponse;
    type Decode = WriteMessage;
    type Encoder = WriteCodec;
    type Decoder = WriteCodec;

    fn encoder(&mut self) -> WriteCodec {
        WriteCodec
    }

    fn decoder(&mut self) -> WriteCodec {
        WriteCodec
    }
}

impl Encoder for WriteCodec {
    type Item = bs::WriteResponse;
    type Error = Status;

    fn encode(&mut self, item: bs::WriteResponse, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        prost::Message::encode(&item, dst)
            .map_err(|e| Status::internal(format!("encoding a WriteResponse: {e}")))
    }
}

impl Decoder for WriteCodec {
    type Item = WriteMessage;
    type Error = Status;

    /// Room for many 16 KiB messages at once: tonic's 8 KiB default made it grow (and copy) its
    /// receive buffer for every message.
    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(256 * 1024, 32 * 1024)
    }

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<WriteMessage>, Status> {
        // Splits the message off tonic's receive buffer without copying it.
        let raw = src.copy_to_bytes(src.remaining());
        WriteMessage::parse(raw)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("malformed WriteRequest: {e}")))
    }
}

struct WriteMethod(Gateway);

impl ClientStreamingService<WriteMessage> for WriteMethod {
    type Response = bs::WriteResponse;
    type Future = BoxFuture<Response<bs::WriteResponse>, Status>;

    fn call(&mut self, request: Request<Streaming<WriteMessage>>) -> Self::Future {
        let gateway = self.0.clone();
        Box::pin(async move { observe("Write", gateway.write(request.into_inner())).await })
    }
}

#[tonic::async_trait]
impl ByteStream for Gateway {
    type ReadStream = ReadStream;

    async fn read(
        &self,
        request: Request<bs::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        // Calls arrive through [`byte_stream_service`], which serves Read itself; this is the
        // generated server's path, kept equivalent.
        let chunks = observe("Read", self.open_read(request.into_inner())).await?;
        Ok(chunks.map(|ahead| -> Self::ReadStream {
            Box::pin(ahead.map(|r| r.map(|data| bs::ReadResponse { data })))
        }))
    }

    async fn write(
        &self,
        request: Request<Streaming<bs::WriteRequest>>,
    ) -> Result<Response<bs::WriteResponse>, Status> {
        // Calls arrive through [`byte_stream_service`], which reads Write off the wire itself;
        // this is the generated server's path, kept equivalent.
        let messages = request.into_inner().map(|m| m.map(WriteMessage::from));
        observe("Write", self.write(messages)).await
    }

    async fn query_write_status(
        &self,
        request: Request<bs::QueryWriteStatusRequest>,
    ) -> Result<Response<bs::QueryWriteStatusResponse>, Status> {
        observe("QueryWriteStatus", self.query_write(request.into_inner())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use prost::Message;

    #[test]
    fn write_requests_read_off_the_wire_match_prost_and_keep_their_data_in_place() {
        let requests = [
            bs::WriteRequest {
                resource_name: "uploads/u/blobs/ab/3".into(),
                write_offset: 0,
                finish_write: false,
                data: b"abc".to_vec(),
            },
            bs::WriteRequest {
                resource_name: String::new(),
                write_offset: 1 << 40,
                finish_write: true,
                data: vec![9u8; 20_000],
            },
            // Everything at its default: an empty message.
            bs::WriteRequest::default(),
        ];
        for r in requests {
            let raw = Bytes::from(r.encode_to_vec());
            let m = WriteMessage::parse(raw.clone()).unwrap();
            assert_eq!(m, WriteMessage::from(r.clone()));
            if !m.data.is_empty() {
                let inside = raw.as_ptr_range();
                assert!(
                    inside.contains(&m.data.as_ptr()),
                    "data is a slice of the message"
                );
            }
        }

        // Fields out of order, an unknown field, a repeated field (the last wins).
        let mut raw = vec![0x52, 2, b'h', b'i']; // data "hi"
        raw.extend_from_slice(&[0x18, 1]); // finish_write
        raw.extend_from_slice(&[0xA0, 0x06, 5]); // field 100, unknown
        raw.extend_from_slice(&[0x10, 7, 0x10, 8]); // write_offset 7, then 8
        raw.extend_from_slice(&[0x0A, 1, b'n']); // resource_name "n"
        let m = WriteMessage::parse(Bytes::from(raw.clone())).unwrap();
        let want = bs::WriteRequest::decode(&raw[..]).unwrap();
        assert_eq!(m, WriteMessage::from(want));
        assert_eq!((m.write_offset, m.finish_write), (8, true));

        // Wrong wire types, bad UTF-8 and truncation are errors, never a guess.
        for bad in [
            &[0x50, 1][..],        // data as a varint
            &[0x0A, 1, 0xFF][..],  // resource_name not UTF-8
            &[0x52, 10, 1, 2][..], // data longer than the message
            &[0x12, 0][..],        // write_offset length-delimited
            &[0x10, 0x80][..],     // truncated varint
            &[0x0B][..],           // wire type 3 (a group)
        ] {
            assert!(
                WriteMessage::parse(Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn message_prefixes_match_protobuf_encoding() {
        for n in [0usize, 1, 127, 128, 16_383, 16_384, 1 << 20, (1 << 21) + 3] {
            let data = vec![7u8; n];
            let mut wire = read_response_prefix(n).to_vec();
            wire.extend_from_slice(&data);
            let encoded = bs::ReadResponse { data: data.clone() }.encode_to_vec();
            assert_eq!(wire[0], 0, "uncompressed");
            let len = u32::from_be_bytes(wire[1..5].try_into().unwrap()) as usize;
            assert_eq!(len, encoded.len(), "{n} bytes");
            assert_eq!(&wire[5..], &encoded[..], "{n} bytes");
        }
    }

    async fn frames(pieces: Vec<Piece>) -> (Vec<u8>, http::HeaderMap) {
        let (tx, rx) = tokio::sync::mpsc::channel(pieces.len().max(1));
        for p in pieces {
            tx.try_send(p).ok().unwrap();
        }
        drop(tx);
        let mut body = ReadBody {
            chunks: ReadAhead { rx, done: false },
            queued: None,
            ended: false,
        };
        let (mut data, mut trailers) = (Vec::new(), None);
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            match frame.unwrap().into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(f) => trailers = Some(f.into_trailers().unwrap()),
            }
        }
        assert!(body.is_end_stream());
        (data, trailers.expect("every read ends with trailers"))
    }

    fn decode_all(mut wire: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while !wire.is_empty() {
            let len = u32::from_be_bytes(wire[1..5].try_into().unwrap()) as usize;
            out.push(bs::ReadResponse::decode(&wire[5..5 + len]).unwrap().data);
            wire = &wire[5 + len..];
        }
        out
    }

    #[tokio::test]
    async fn a_read_ends_with_its_status_and_a_reader_that_vanished_is_an_error() {
        let (wire, trailers) = frames(vec![
            Piece::Data(b"hello ".to_vec()),
            Piece::Data(b"world".to_vec()),
            Piece::End,
        ])
        .await;
        assert_eq!(
            decode_all(&wire),
            vec![b"hello ".to_vec(), b"world".to_vec()]
        );
        assert_eq!(trailers["grpc-status"], "0");

        // An empty blob is one empty message.
        let (wire, trailers) = frames(vec![Piece::Data(Vec::new()), Piece::End]).await;
        assert_eq!(decode_all(&wire), vec![Vec::<u8>::new()]);
        assert_eq!(trailers["grpc-status"], "0");

        let (wire, trailers) = frames(vec![
            Piece::Data(b"part".to_vec()),
            Piece::Failed(Status::unavailable("shard data stream broke")),
        ])
        .await;
        assert_eq!(decode_all(&wire), vec![b"part".to_vec()]);
        assert_eq!(
            trailers["grpc-status"],
            (tonic::Code::Unavailable as i32).to_string()
        );

        // The reading task went away without saying the read was over: never a short success.
        let (_, trailers) = frames(vec![Piece::Data(b"part".to_vec())]).await;
        assert_eq!(
            trailers["grpc-status"],
            (tonic::Code::Internal as i32).to_string()
        );
    }
}
