//! ByteStream: Read with offset and limit, Write (resumable), QueryWriteStatus.
//!
//! Read and Write are served below the generated code ([`byte_stream_service`]): a blob's chunks
//! go from the shard's socket to the client's without passing through a protobuf encoder, and
//! from the client's to the shard's without prost copying each into a new `Vec`; either would
//! copy every byte once more on the gateway's busiest paths.

use crate::auth::Identity;
use crate::resource::{parse_read, parse_write};
use crate::wire::{Fields, Malformed, Value, put_varint};
use crate::{Gateway, RawMethods, observe};
use bazel_remote_apis::google::bytestream as bs;
use bs::byte_stream_server::{ByteStream, ByteStreamServer};
use bytes::{Buf, Bytes};
use futures::{Stream, StreamExt};
use http_body::Body as _;
use motorpool_cas_client::ApiError;
use motorpool_cas_client::WriteData;
use motorpool_messages::cas::DATA_PUT_MAX;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tonic::codec::{DecodeBuf, Decoder};
use tonic::codegen::http;
use tonic::{Request, Response, Status, Streaming};

const READ_PATH: &str = "/google.bytestream.ByteStream/Read";
const WRITE_PATH: &str = "/google.bytestream.ByteStream/Write";

type ReadStream = Pin<Box<dyn futures::Stream<Item = Result<bs::ReadResponse, Status>> + Send>>;

impl Gateway {
    async fn write<S>(
        &self,
        who: Result<Arc<Identity>, ApiError>,
        mut stream: S,
    ) -> Result<bs::WriteResponse, ApiError>
    where
        S: Stream<Item = Result<WriteMessage, Status>> + Send + Unpin + 'static,
    {
        let first = stream
            .next()
            .await
            .transpose()
            .map_err(|s| stream_error("write stream failed before its first message", &s))?
            .ok_or_else(|| ApiError::Invalid("empty write stream".into()))?;
        let res = parse_write(&first.resource_name, &self.config.instance_names)?;
        who?.check_instance(&res.instance)?;
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
            metrics::counter!(crate::metric_names::GATEWAY_BYTESTREAM_WRITTEN_BYTES_TOTAL)
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
        let bytes_in =
            metrics::counter!(crate::metric_names::GATEWAY_BYTESTREAM_WRITTEN_BYTES_TOTAL);
        bytes_in.increment(first.data.len() as u64);
        let first_item = Ok(WriteData {
            data: first.data,
            finish: first.finish_write,
        });
        let rest = stream.map(move |m| {
            let m = m.map_err(|s| stream_error("write stream broke", &s))?;
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
        who: Result<Arc<Identity>, ApiError>,
        req: bs::QueryWriteStatusRequest,
    ) -> Result<bs::QueryWriteStatusResponse, ApiError> {
        let res = parse_write(&req.resource_name, &self.config.instance_names)?;
        who?.check_instance(&res.instance)?;
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
    async fn open_read(
        &self,
        who: Result<Arc<Identity>, ApiError>,
        req: bs::ReadRequest,
    ) -> Result<ReadAhead, ApiError> {
        let res = parse_read(&req.resource_name, &self.config.instance_names)?;
        who?.check_instance(&res.instance)?;
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
        let bytes_out = metrics::counter!(crate::metric_names::GATEWAY_BYTESTREAM_READ_BYTES_TOTAL);
        // A small blob this gateway wrote or served lately is answered from its memory.
        if let Some(data) = self.recent.blob(&res.instance, &res.digest) {
            let start = req.read_offset as usize;
            let end = match req.read_limit as usize {
                0 => data.len(),
                limit => (start + limit).min(data.len()),
            };
            let piece = data[start..end].to_vec();
            bytes_out.increment(piece.len() as u64);
            metrics::counter!(crate::metric_names::GATEWAY_BYTESTREAM_READS_FROM_MEMORY_TOTAL)
                .increment(1);
            let (tx, rx) = tokio::sync::mpsc::channel(2);
            let _ = tx.try_send(Piece::Data(piece));
            let _ = tx.try_send(Piece::End);
            return Ok(ReadAhead { rx, done: false });
        }
        let mut reader = self
            .shards
            .open_read(
                &res.instance,
                &res.digest,
                req.read_offset as u64,
                req.read_limit as u64,
            )
            .await
            .inspect_err(|e| {
                if matches!(e, ApiError::NotFound(_)) {
                    // A client that found an output gone checks its result again next.
                    self.hits.forget(&res.digest.hash);
                }
            })?;
        let chunk = self.config.read_chunk_bytes.max(4096);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        // A small blob read whole (one chunk) is kept for the next reader.
        let keep = (req.read_offset == 0
            && (req.read_limit == 0 || req.read_limit as u64 >= res.digest.size)
            && res.digest.size as usize <= crate::recent::BLOB_MAX.min(chunk))
        .then(|| (self.recent.clone(), res.instance.clone(), res.digest));
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
                        if let Some((recent, instance, digest)) = &keep {
                            recent.keep_blob(instance, digest, &data);
                        }
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
        Poll::Ready(Some(Ok(http_body::Frame::trailers(status_trailers(
            status,
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.queued.is_none()
    }
}

/// The trailers that carry a call's final status.
fn status_trailers(status: Status) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    if let Err(unsendable) = status.add_header(&mut trailers) {
        trailers.clear();
        let _ = unsendable.add_header(&mut trailers);
    }
    trailers
}

/// The HTTP/2 answer to a call with one reply message: the message, then the OK trailers; or a
/// trailers-only answer carrying the error.
fn unary_answer<M: prost::Message>(
    result: Result<Response<M>, Status>,
) -> http::Response<tonic::body::Body> {
    let message = match result {
        Ok(r) => r.into_inner(),
        Err(status) => return status.into_http(),
    };
    let len = message.encoded_len();
    let mut data = Vec::with_capacity(5 + len);
    data.push(0);
    data.extend_from_slice(&(len as u32).to_be_bytes());
    message.encode(&mut data).expect("a Vec grows");
    let body = UnaryBody {
        data: Some(data.into()),
        trailers: Some(status_trailers(Status::ok(""))),
    };
    let mut response = http::Response::new(tonic::body::Body::new(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// One message, then the trailers.
struct UnaryBody {
    data: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl http_body::Body for UnaryBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let frame = match self.data.take() {
            Some(data) => Some(http_body::Frame::data(data)),
            None => self.trailers.take().map(http_body::Frame::trailers),
        };
        Poll::Ready(frame.map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}

/// The gRPC messages of a request body, each split off the HTTP/2 DATA frame it arrived in without
/// a copy (h2 hands each frame over as a slice of its read buffer; tonic's decoder would copy
/// every frame into a receive buffer of its own first). Only a message that spans frames is
/// gathered into a buffer of its own. Compressed messages are refused: no `grpc-encoding` is
/// accepted.
struct GrpcMessages {
    body: tonic::body::Body,
    frames: std::collections::VecDeque<Bytes>,
    /// Bytes held in `frames`.
    buffered: usize,
    max_message_bytes: usize,
    ended: bool,
}

impl GrpcMessages {
    fn new(body: tonic::body::Body, max_message_bytes: usize) -> GrpcMessages {
        GrpcMessages {
            body,
            frames: Default::default(),
            buffered: 0,
            max_message_bytes,
            ended: false,
        }
    }

    /// The next whole message, if the frames so far hold one.
    fn next_message(&mut self) -> Result<Option<Bytes>, Status> {
        if self.buffered < 5 {
            return Ok(None);
        }
        let mut head = [0u8; 5];
        let mut at = 0;
        for frame in &self.frames {
            let n = (head.len() - at).min(frame.len());
            head[at..at + n].copy_from_slice(&frame[..n]);
            at += n;
            if at == head.len() {
                break;
            }
        }
        match head[0] {
            0 => {}
            1 => {
                return Err(Status::unimplemented(
                    "compressed gRPC messages are not accepted (no grpc-encoding is)",
                ));
            }
            flag => {
                return Err(Status::invalid_argument(format!(
                    "gRPC message flag {flag} is neither 0 nor 1"
                )));
            }
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > self.max_message_bytes {
            return Err(Status::out_of_range(format!(
                "a {len}-byte message exceeds the {} bytes accepted",
                self.max_message_bytes
            )));
        }
        if self.buffered < 5 + len {
            return Ok(None);
        }
        self.take(5);
        Ok(Some(self.take(len)))
    }

    /// Takes the next `len` buffered bytes: a slice of the first frame when it holds them all.
    fn take(&mut self, len: usize) -> Bytes {
        self.buffered -= len;
        let Some(front) = self.frames.front_mut() else {
            return Bytes::new();
        };
        if front.len() >= len {
            let taken = front.split_to(len);
            if front.is_empty() {
                self.frames.pop_front();
            }
            return taken;
        }
        let mut gathered = bytes::BytesMut::with_capacity(len);
        while gathered.len() < len {
            let front = self.frames.front_mut().expect("len bytes are buffered");
            let n = (len - gathered.len()).min(front.len());
            gathered.extend_from_slice(&front[..n]);
            front.advance(n);
            if front.is_empty() {
                self.frames.pop_front();
            }
        }
        gathered.freeze()
    }

    fn fail(&mut self, status: Status) -> Poll<Option<Result<Bytes, Status>>> {
        self.ended = true;
        self.frames.clear();
        self.buffered = 0;
        Poll::Ready(Some(Err(status)))
    }
}

impl Stream for GrpcMessages {
    type Item = Result<Bytes, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match this.next_message() {
                Ok(Some(message)) => return Poll::Ready(Some(Ok(message))),
                Ok(None) => {}
                Err(status) => return this.fail(status),
            }
            if this.ended {
                if this.buffered > 0 {
                    return this.fail(Status::invalid_argument(
                        "the request ended inside a gRPC message",
                    ));
                }
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        this.buffered += data.len();
                        this.frames.push_back(data);
                    }
                }
                Some(Err(status)) => return this.fail(status),
                None => this.ended = true,
            }
        }
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
        let who = crate::auth::identity(req.extensions());
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
            self.open_read(who, request).await
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
/// buffer first), Write's messages split off their HTTP/2 frames by [`GrpcMessages`] and read
/// in place by [`WriteMessage::parse`] (each chunk's `data` a slice of the frame it arrived in,
/// where tonic would copy every frame into its buffer and prost every chunk into a new `Vec`),
/// QueryWriteStatus by the generated server.
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
                    let who = crate::auth::identity(req.extensions());
                    let messages = GrpcMessages::new(req.into_body(), max).map(|raw| {
                        WriteMessage::parse(raw?).map_err(|e| {
                            Status::invalid_argument(format!("malformed WriteRequest: {e}"))
                        })
                    });
                    Ok(unary_answer(
                        observe("Write", gateway.write(who, messages)).await,
                    ))
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

#[tonic::async_trait]
impl ByteStream for Gateway {
    type ReadStream = ReadStream;

    async fn read(
        &self,
        request: Request<bs::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        // Calls arrive through [`byte_stream_service`], which serves Read itself; this is the
        // generated server's path, kept equivalent.
        let who = crate::auth::caller(&request);
        let chunks = observe("Read", self.open_read(who, request.into_inner())).await?;
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
        let who = crate::auth::caller(&request);
        let messages = request.into_inner().map(|m| m.map(WriteMessage::from));
        observe("Write", self.write(who, messages)).await
    }

    async fn query_write_status(
        &self,
        request: Request<bs::QueryWriteStatusRequest>,
    ) -> Result<Response<bs::QueryWriteStatusResponse>, Status> {
        let who = crate::auth::caller(&request);
        observe(
            "QueryWriteStatus",
            self.query_write(who, request.into_inner()),
        )
        .await
    }
}

/// A client's write stream that failed: a stall the gateway cut off is DEADLINE_EXCEEDED (its
/// idle bound), anything else (a message too large, a broken frame) the client's bad input.
fn stream_error(what: &str, s: &tonic::Status) -> ApiError {
    let m = format!("{what}: {}", s.message());
    if s.code() == tonic::Code::DeadlineExceeded {
        ApiError::DeadlineExceeded(m)
    } else {
        ApiError::Invalid(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    /// A request body that hands over the given DATA frames (or errors) one by one.
    struct Frames(std::collections::VecDeque<Result<Bytes, Status>>);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
            Poll::Ready(self.0.pop_front().map(|f| f.map(http_body::Frame::data)))
        }
    }

    async fn messages_of(
        frames: Vec<Result<Bytes, Status>>,
        max: usize,
    ) -> Vec<Result<Bytes, Status>> {
        let body = tonic::body::Body::new(Frames(frames.into()));
        GrpcMessages::new(body, max).collect().await
    }

    fn grpc_message(flag: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![flag];
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[tokio::test]
    async fn grpc_messages_are_split_off_their_frames_and_only_those_spanning_frames_are_copied() {
        let payloads: Vec<Vec<u8>> = [0usize, 16 * 1024, 100, 3, 16 * 1024 + 17, 1]
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (i * 31 + j) as u8).collect())
            .collect();
        let wire: Vec<u8> = payloads.iter().flat_map(|p| grpc_message(0, p)).collect();
        // Cuts inside a message prefix, inside a message, and a frame holding several messages.
        let cuts = [
            2,
            3,
            16 * 1024 + 5,
            16 * 1024 + 5 + 105 + 8 + 100,
            wire.len(),
        ];
        let mut frames = Vec::new();
        let mut start = 0;
        for &end in &cuts {
            frames.push(Bytes::copy_from_slice(&wire[start..end]));
            start = end;
        }
        let got = messages_of(frames.iter().cloned().map(Ok).collect(), 1 << 20).await;
        let got: Vec<Bytes> = got.into_iter().map(Result::unwrap).collect();
        assert_eq!(got, payloads);
        // The 100- and 3-byte messages lie within the fourth frame: slices of it, not copies.
        let fourth = frames[3].as_ptr_range();
        for m in &got[2..4] {
            assert!(
                fourth.contains(&m.as_ptr()),
                "a message within one frame is a slice of it"
            );
        }

        // Compressed (no grpc-encoding is accepted), an unknown flag, too large, cut short, and a
        // body that failed: each an error that says so, and nothing after it.
        let cases = [
            (
                vec![Ok(Bytes::from(grpc_message(1, b"x")))],
                tonic::Code::Unimplemented,
            ),
            (
                vec![Ok(Bytes::from(grpc_message(7, b"x")))],
                tonic::Code::InvalidArgument,
            ),
            (
                vec![Ok(Bytes::from(grpc_message(0, &[0; 65])))],
                tonic::Code::OutOfRange,
            ),
            (
                vec![Ok(Bytes::from(grpc_message(0, b"cut")[..6].to_vec()))],
                tonic::Code::InvalidArgument,
            ),
            (
                vec![Ok(Bytes::from_static(&[0, 0]))],
                tonic::Code::InvalidArgument,
            ),
            (
                vec![
                    Ok(Bytes::from(grpc_message(0, b"ok"))),
                    Err(Status::cancelled("client went away")),
                ],
                tonic::Code::Cancelled,
            ),
        ];
        for (frames, code) in cases {
            let got = messages_of(frames, 64).await;
            let last = got.last().expect("an error");
            assert_eq!(last.as_ref().unwrap_err().code(), code, "{got:?}");
            assert!(got[..got.len() - 1].iter().all(Result::is_ok));
        }
    }

    #[tokio::test]
    async fn a_unary_answer_is_the_message_then_ok_trailers_or_the_error_alone() {
        let mut body =
            unary_answer(Ok(Response::new(bs::WriteResponse { committed_size: 42 }))).into_body();
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            match frame.unwrap().into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        assert_eq!(decode_all_writes(&data), vec![42]);
        assert_eq!(trailers.expect("trailers")["grpc-status"], "0");

        let answer = unary_answer::<bs::WriteResponse>(Err(Status::invalid_argument("bad digest")));
        assert_eq!(
            answer.headers()["grpc-status"],
            (tonic::Code::InvalidArgument as i32).to_string()
        );
    }

    fn decode_all_writes(mut wire: &[u8]) -> Vec<i64> {
        let mut out = Vec::new();
        while !wire.is_empty() {
            let len = u32::from_be_bytes(wire[1..5].try_into().unwrap()) as usize;
            out.push(
                bs::WriteResponse::decode(&wire[5..5 + len])
                    .unwrap()
                    .committed_size,
            );
            wire = &wire[5 + len..];
        }
        out
    }
}
