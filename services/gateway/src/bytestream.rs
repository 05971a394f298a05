//! ByteStream: Read with offset and limit, Write (resumable), QueryWriteStatus.
//!
//! Read is served below the generated code ([`byte_stream_service`]): a blob's chunks go from the
//! shard's socket to the client's without passing through a protobuf encoder, which would copy
//! every byte once more on the gateway's busiest path.

use crate::resource::{parse_read, parse_write};
use crate::{Gateway, OneMethodRaw, observe, recent};
use bazel_remote_apis::google::bytestream as bs;
use bs::byte_stream_server::{ByteStream, ByteStreamServer};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use motorpool_cas_client::ApiError;
use motorpool_cas_client::WriteData;
use motorpool_messages::cas::DATA_PUT_MAX;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tonic::codec::{DecodeBuf, Decoder};
use tonic::codegen::http;
use tonic::{Request, Response, Status, Streaming};

const READ_PATH: &str = "/google.bytestream.ByteStream/Read";

type ReadStream = Pin<Box<dyn futures::Stream<Item = Result<bs::ReadResponse, Status>> + Send>>;

impl Gateway {
    async fn write(
        &self,
        mut stream: Streaming<bs::WriteRequest>,
    ) -> Result<bs::WriteResponse, ApiError> {
        let first = stream
            .message()
            .await
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
            let copy = (first.data.len() <= recent::BLOB_MAX).then(|| first.data.clone());
            let committed = self
                .shards
                .put_whole(&res.instance, &res.digest, first.data)
                .await?;
            if let Some(data) = copy {
                self.recent.keep_blob(&res.instance, &res.digest, &data);
            }
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
        let mut v = n as u64;
        while v >= 0x80 {
            field.push((v as u8) | 0x80);
            v >>= 7;
        }
        field.push(v as u8);
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
/// buffer first), Write and QueryWriteStatus by the generated server.
pub fn byte_stream_service(
    gateway: Gateway,
    max_message_bytes: usize,
) -> OneMethodRaw<ByteStreamServer<Gateway>> {
    OneMethodRaw {
        generated: ByteStreamServer::new(gateway.clone())
            .max_decoding_message_size(max_message_bytes),
        path: READ_PATH,
        serve: |gateway, req, max| Box::pin(async move { Ok(gateway.serve_read(req, max).await) }),
        gateway,
        max_message_bytes,
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
        observe("Write", self.write(request.into_inner())).await
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
