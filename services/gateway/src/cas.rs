//! ContentAddressableStorage: FindMissingBlobs, BatchUpdateBlobs, BatchReadBlobs, GetTree.

use crate::find_missing::{WireRequest, WireResponse};
use crate::resource::{check_instance, digest, digest_function, to_proto};
use crate::{Gateway, observe};
use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::rpc::Status as RpcStatus;
use motorpool_cas_client::ApiError;
use motorpool_messages::cas::BlobPut;
use motorpool_messages::{BlobDigest, DigestFunction, WireError};
use prost::Message as _;
use re::content_addressable_storage_server::ContentAddressableStorage;
use std::collections::HashSet;
use std::pin::Pin;
use tonic::{Request, Response, Status};

fn rpc_status(e: Option<WireError>) -> Option<RpcStatus> {
    Some(match e {
        None => RpcStatus {
            code: 0,
            message: String::new(),
            details: vec![],
        },
        Some(e) => {
            let s: Status = ApiError::from(e).into();
            RpcStatus {
                code: s.code() as i32,
                message: s.message().to_string(),
                details: vec![],
            }
        }
    })
}

/// Largest GetTree page.
const MAX_TREE_PAGE: usize = 10_000;

impl Gateway {
    fn check_batch_total(&self, total: u64) -> Result<(), ApiError> {
        if total > self.config.max_batch_total_bytes {
            return Err(ApiError::Invalid(format!(
                "batch of {total} bytes exceeds max_batch_total_size_bytes {}; send large blobs with ByteStream",
                self.config.max_batch_total_bytes
            )));
        }
        Ok(())
    }

    /// FindMissingBlobs as the server receives it (see [`crate::find_missing`]).
    pub(crate) async fn find_missing_wire(
        &self,
        req: WireRequest,
    ) -> Result<WireResponse, ApiError> {
        check_instance(&req.instance_name, &self.config.instance_names)?;
        let digests = req.digests()?;
        let missing = self
            .shards
            .find_missing(&req.instance_name, &digests)
            .await?;
        Ok(req.respond(&missing))
    }

    async fn batch_update(
        &self,
        req: re::BatchUpdateBlobsRequest,
    ) -> Result<re::BatchUpdateBlobsResponse, ApiError> {
        check_instance(&req.instance_name, &self.config.instance_names)?;
        let f = digest_function(req.digest_function)?;
        self.check_batch_total(req.requests.iter().map(|r| r.data.len() as u64).sum())?;
        let mut digests = Vec::with_capacity(req.requests.len());
        let mut puts = Vec::with_capacity(req.requests.len());
        let mut errors: Vec<Option<WireError>> = Vec::with_capacity(req.requests.len());
        for r in req.requests {
            if r.compressor != 0 {
                return Err(ApiError::Invalid(
                    "compressed batch uploads are not supported".into(),
                ));
            }
            let d = digest(f, r.digest.as_ref())?;
            digests.push(d);
            if d.size != r.data.len() as u64 {
                errors.push(Some(WireError::invalid(format!(
                    "blob {d} has {} bytes, but its digest says {}",
                    r.data.len(),
                    d.size
                ))));
            } else {
                errors.push(None);
                puts.push(BlobPut {
                    digest: d,
                    data: r.data,
                });
            }
        }
        // Copies of the small ones, kept once a shard has accepted them (see `recent`).
        let copies: Vec<Option<Vec<u8>>> = puts
            .iter()
            .map(|p| (p.data.len() <= crate::recent::BLOB_MAX).then(|| p.data.clone()))
            .collect();
        let names: Vec<_> = puts.iter().map(|p| p.digest).collect();
        let results = self.shards.batch_write(&req.instance_name, puts).await?;
        for ((d, copy), r) in names.iter().zip(copies).zip(&results) {
            if let (Some(data), None) = (copy, r) {
                self.recent.keep_blob(&req.instance_name, d, &data);
            }
        }
        let mut results = results.into_iter();
        let responses = digests
            .iter()
            .zip(errors)
            .map(|(d, e)| re::batch_update_blobs_response::Response {
                digest: Some(to_proto(d)),
                status: rpc_status(e.or_else(|| results.next().flatten())),
            })
            .collect();
        Ok(re::BatchUpdateBlobsResponse { responses })
    }

    async fn batch_read(
        &self,
        req: re::BatchReadBlobsRequest,
    ) -> Result<re::BatchReadBlobsResponse, ApiError> {
        check_instance(&req.instance_name, &self.config.instance_names)?;
        let f = digest_function(req.digest_function)?;
        let digests = req
            .digests
            .iter()
            .map(|d| digest(f, Some(d)))
            .collect::<Result<Vec<_>, _>>()?;
        self.check_batch_total(digests.iter().map(|d| d.size).sum())?;
        let blobs = self.shards.batch_read(&req.instance_name, &digests).await?;
        Ok(re::BatchReadBlobsResponse {
            responses: digests
                .iter()
                .zip(blobs)
                .map(|(d, r)| {
                    let (data, err) = match r {
                        Ok(data) => (data, None),
                        Err(e) => {
                            if e.code == motorpool_messages::ErrorCode::NotFound {
                                self.hits.forget(&d.hash);
                            }
                            (Vec::new(), Some(e))
                        }
                    };
                    re::batch_read_blobs_response::Response {
                        digest: Some(to_proto(d)),
                        data,
                        compressor: 0,
                        status: rpc_status(err),
                    }
                })
                .collect(),
        })
    }

    /// Directories under `root` in breadth-first order, each once, from `skip` on, at most `take`.
    /// Returns them and whether more follow.
    async fn tree_page(
        &self,
        instance: &str,
        f: DigestFunction,
        root: BlobDigest,
        skip: usize,
        take: usize,
    ) -> Result<(Vec<re::Directory>, bool), ApiError> {
        let mut seen = HashSet::from([root]);
        let mut level = vec![root];
        let mut index = 0usize;
        let mut out = Vec::new();
        while !level.is_empty() {
            let blobs = self.shards.batch_read(instance, &level).await?;
            let mut next = Vec::new();
            for (d, blob) in level.iter().zip(blobs) {
                let data = blob.map_err(|e| {
                    ApiError::NotFound(format!("directory {d} of the tree: {}", e.message))
                })?;
                let dir = re::Directory::decode(data.as_slice()).map_err(|e| {
                    ApiError::Invalid(format!("directory {d} is not a Directory message: {e}"))
                })?;
                for child in &dir.directories {
                    let cd = digest(f, child.digest.as_ref())?;
                    if seen.insert(cd) {
                        next.push(cd);
                    }
                }
                if index >= skip {
                    if out.len() == take {
                        return Ok((out, true));
                    }
                    out.push(dir);
                }
                index += 1;
            }
            level = next;
        }
        Ok((out, false))
    }
}

type TreeStream = Pin<Box<dyn futures::Stream<Item = Result<re::GetTreeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ContentAddressableStorage for Gateway {
    /// Served by [`crate::find_missing::cas_service`] off the wire; this typed form (for callers of
    /// the trait) goes through the same code.
    async fn find_missing_blobs(
        &self,
        request: Request<re::FindMissingBlobsRequest>,
    ) -> Result<Response<re::FindMissingBlobsResponse>, Status> {
        let who = crate::auth::caller(&request);
        let raw = bytes::Bytes::from(request.into_inner().encode_to_vec());
        let req = WireRequest::parse(raw).map_err(|e| Status::internal(e.to_string()))?;
        let resp = observe("FindMissingBlobs", async move {
            who?.check_instance(&req.instance_name)?;
            self.find_missing_wire(req).await
        })
        .await?;
        re::FindMissingBlobsResponse::decode(resp.get_ref().as_bytes())
            .map(Response::new)
            .map_err(|e| Status::internal(e.to_string()))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<re::BatchUpdateBlobsRequest>,
    ) -> Result<Response<re::BatchUpdateBlobsResponse>, Status> {
        let who = crate::auth::caller(&request);
        let req = request.into_inner();
        observe("BatchUpdateBlobs", async move {
            who?.check_instance(&req.instance_name)?;
            self.batch_update(req).await
        })
        .await
    }

    async fn batch_read_blobs(
        &self,
        request: Request<re::BatchReadBlobsRequest>,
    ) -> Result<Response<re::BatchReadBlobsResponse>, Status> {
        let who = crate::auth::caller(&request);
        let req = request.into_inner();
        observe("BatchReadBlobs", async move {
            who?.check_instance(&req.instance_name)?;
            self.batch_read(req).await
        })
        .await
    }

    type GetTreeStream = TreeStream;

    async fn get_tree(
        &self,
        request: Request<re::GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        let who = crate::auth::caller(&request);
        let req = request.into_inner();
        let gw = self.clone();
        let page = async move {
            who?.check_instance(&req.instance_name)?;
            check_instance(&req.instance_name, &gw.config.instance_names)?;
            let f = digest_function(req.digest_function)?;
            let root = digest(f, req.root_digest.as_ref())?;
            let skip: usize = if req.page_token.is_empty() {
                0
            } else {
                req.page_token.parse().map_err(|_| {
                    ApiError::Invalid(format!("invalid page token {:?}", req.page_token))
                })?
            };
            let take = match req.page_size {
                n if n <= 0 => MAX_TREE_PAGE,
                n => (n as usize).min(MAX_TREE_PAGE),
            };
            let (directories, more) = gw
                .tree_page(&req.instance_name, f, root, skip, take)
                .await?;
            let next_page_token = if more {
                (skip + directories.len()).to_string()
            } else {
                String::new()
            };
            Ok::<_, ApiError>(re::GetTreeResponse {
                directories,
                next_page_token,
            })
        };
        let response = observe("GetTree", page).await?.into_inner();
        let stream: TreeStream = Box::pin(futures::stream::iter([Ok(response)]));
        Ok(Response::new(stream))
    }

    async fn split_blob(
        &self,
        _: Request<re::SplitBlobRequest>,
    ) -> Result<Response<re::SplitBlobResponse>, Status> {
        Err(Status::unimplemented(
            "SplitBlob is not supported (Capabilities says so)",
        ))
    }

    async fn splice_blob(
        &self,
        _: Request<re::SpliceBlobRequest>,
    ) -> Result<Response<re::SpliceBlobResponse>, Status> {
        Err(Status::unimplemented(
            "SpliceBlob is not supported (Capabilities says so)",
        ))
    }

    type GetChunkMappingStream =
        Pin<Box<dyn futures::Stream<Item = Result<re::GetChunkMappingResponse, Status>> + Send>>;

    async fn get_chunk_mapping(
        &self,
        _: Request<re::GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        Err(Status::unimplemented("chunk mappings are not supported"))
    }

    async fn register_chunk_mapping(
        &self,
        _: Request<tonic::Streaming<re::RegisterChunkMappingRequest>>,
    ) -> Result<Response<re::RegisterChunkMappingResponse>, Status> {
        Err(Status::unimplemented("chunk mappings are not supported"))
    }
}
