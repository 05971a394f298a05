//! ByteStream: Read with offset and limit, Write (resumable), QueryWriteStatus.

use crate::resource::{parse_read, parse_write};
use crate::{Gateway, observe, recent};
use bazel_remote_apis::google::bytestream as bs;
use bs::byte_stream_server::ByteStream;
use futures::StreamExt;
use motorpool_cas_client::ApiError;
use motorpool_cas_client::WriteData;
use motorpool_messages::cas::DATA_PUT_MAX;
use std::pin::Pin;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

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

    async fn open_read(&self, req: bs::ReadRequest) -> Result<ReadStream, ApiError> {
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
                let _ = tx.send(Ok(bs::ReadResponse { data: Vec::new() })).await;
                return;
            }
            while let Some(c) = reader.next_chunk(chunk).await {
                let item = c.map(|data| {
                    bytes_out.increment(data.len() as u64);
                    bs::ReadResponse { data }
                });
                let failed = item.is_err();
                if tx.send(item.map_err(Status::from)).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl ByteStream for Gateway {
    type ReadStream = ReadStream;

    async fn read(
        &self,
        request: Request<bs::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        observe("Read", self.open_read(request.into_inner())).await
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
