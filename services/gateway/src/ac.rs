//! ActionCache: GetActionResult with a completeness check, UpdateActionResult.
//!
//! Invariant: a result is returned only while every blob it references (output files, output
//! directory trees and the files in them, stdout, stderr) is in the CAS. Otherwise the client
//! gets NOT_FOUND and runs the action again, instead of failing later on a missing digest.

use crate::resource::{check_instance, digest, digest_function};
use crate::{Gateway, observe};
use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use motorpool_cas_client::ApiError;
use motorpool_messages::{BlobDigest, DigestFunction};
use prost::Message as _;
use re::action_cache_server::ActionCache;
use tonic::{Request, Response, Status};

/// Largest stdout/stderr/output file inlined on request.
const MAX_INLINE: u64 = 1 << 20;

impl Gateway {
    /// Every CAS blob an ActionResult references (reading output-directory trees).
    async fn referenced_blobs(
        &self,
        instance: &str,
        f: DigestFunction,
        r: &re::ActionResult,
    ) -> Result<Vec<BlobDigest>, ApiError> {
        let mut out = Vec::new();
        for file in &r.output_files {
            out.push(digest(f, file.digest.as_ref())?);
        }
        for d in [&r.stdout_digest, &r.stderr_digest].into_iter().flatten() {
            out.push(digest(f, Some(d))?);
        }
        for dir in &r.output_directories {
            let tree_digest = digest(f, dir.tree_digest.as_ref())?;
            out.push(tree_digest);
            let Ok(data) = self.shards.read_blob(instance, &tree_digest).await else {
                continue; // reported missing by the caller's FindMissing
            };
            let tree = re::Tree::decode(data.as_slice()).map_err(|e| {
                ApiError::Invalid(format!(
                    "output directory tree {tree_digest} is not a Tree: {e}"
                ))
            })?;
            for d in tree.root.iter().chain(tree.children.iter()) {
                for file in &d.files {
                    out.push(digest(f, file.digest.as_ref())?);
                }
            }
        }
        Ok(out)
    }

    async fn missing_of(
        &self,
        instance: &str,
        f: DigestFunction,
        r: &re::ActionResult,
    ) -> Result<Vec<BlobDigest>, ApiError> {
        let refs = self.referenced_blobs(instance, f, r).await?;
        let missing = self.shards.find_missing(instance, &refs).await?;
        Ok(refs
            .into_iter()
            .zip(missing)
            .filter(|(_, m)| *m)
            .map(|(d, _)| d)
            .collect())
    }

    pub(crate) async fn get_action_result(
        &self,
        req: re::GetActionResultRequest,
    ) -> Result<re::ActionResult, ApiError> {
        check_instance(&req.instance_name, &self.config.instance_names)?;
        let f = digest_function(req.digest_function)?;
        let action = digest(f, req.action_digest.as_ref())?;
        let Some(bytes) = self.shards.ac_get(&req.instance_name, &action).await? else {
            metrics::counter!("motorpool_gateway_action_cache_total", "outcome" => "miss")
                .increment(1);
            return Err(ApiError::NotFound(format!("no action result for {action}")));
        };
        let mut result = match re::ActionResult::decode(bytes.as_slice()) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%action, error = %e, "Dropped an undecodable action-cache entry");
                self.shards.ac_delete(&req.instance_name, &action).await?;
                return Err(ApiError::NotFound(format!(
                    "no usable action result for {action}"
                )));
            }
        };
        let missing = self.missing_of(&req.instance_name, f, &result).await?;
        if !missing.is_empty() {
            metrics::counter!("motorpool_gateway_action_cache_total", "outcome" => "incomplete")
                .increment(1);
            tracing::info!(%action, missing = missing.len(), first = %missing[0], "Action result references evicted blobs; answering NOT_FOUND");
            return Err(ApiError::NotFound(format!(
                "action result for {action} references {} blob(s) no longer in the CAS, for example {}",
                missing.len(),
                missing[0]
            )));
        }
        metrics::counter!("motorpool_gateway_action_cache_total", "outcome" => "hit").increment(1);
        self.inline(&req, f, &mut result).await?;
        Ok(result)
    }

    async fn inline(
        &self,
        req: &re::GetActionResultRequest,
        f: DigestFunction,
        r: &mut re::ActionResult,
    ) -> Result<(), ApiError> {
        let instance = &req.instance_name;
        if req.inline_stdout
            && r.stdout_raw.is_empty()
            && let Some(d) = &r.stdout_digest
        {
            let d = digest(f, Some(d))?;
            if d.size <= MAX_INLINE {
                r.stdout_raw = self.shards.read_blob(instance, &d).await?;
            }
        }
        if req.inline_stderr
            && r.stderr_raw.is_empty()
            && let Some(d) = &r.stderr_digest
        {
            let d = digest(f, Some(d))?;
            if d.size <= MAX_INLINE {
                r.stderr_raw = self.shards.read_blob(instance, &d).await?;
            }
        }
        for file in r.output_files.iter_mut() {
            if req.inline_output_files.contains(&file.path)
                && let Some(d) = &file.digest
            {
                let d = digest(f, Some(d))?;
                if d.size <= MAX_INLINE {
                    file.contents = self.shards.read_blob(instance, &d).await?;
                }
            }
        }
        Ok(())
    }

    async fn update_action_result(
        &self,
        req: re::UpdateActionResultRequest,
    ) -> Result<re::ActionResult, ApiError> {
        check_instance(&req.instance_name, &self.config.instance_names)?;
        let f = digest_function(req.digest_function)?;
        let action = digest(f, req.action_digest.as_ref())?;
        let mut result = req.action_result.ok_or_else(|| {
            ApiError::Invalid("UpdateActionResult without an action_result".into())
        })?;
        let missing = self.missing_of(&req.instance_name, f, &result).await?;
        if !missing.is_empty() {
            return Err(ApiError::FailedPrecondition(format!(
                "action result references {} blob(s) that are not in the CAS, for example {}; upload outputs first",
                missing.len(),
                missing[0]
            )));
        }
        // Inlined contents are not stored: the CAS holds them.
        result.stdout_raw.clear();
        result.stderr_raw.clear();
        for file in result.output_files.iter_mut() {
            file.contents.clear();
        }
        self.shards
            .ac_put(&req.instance_name, &action, result.encode_to_vec())
            .await?;
        Ok(result)
    }
}

#[tonic::async_trait]
impl ActionCache for Gateway {
    async fn get_action_result(
        &self,
        request: Request<re::GetActionResultRequest>,
    ) -> Result<Response<re::ActionResult>, Status> {
        let who = crate::auth::caller(&request);
        let req = request.into_inner();
        observe("GetActionResult", async move {
            who?.check_instance(&req.instance_name)?;
            let instance = req.instance_name.clone();
            let action = digest_function(req.digest_function)
                .and_then(|f| digest(f, req.action_digest.as_ref()));
            let r = self.get_action_result(req).await;
            if let (Err(ApiError::NotFound(_)), Ok(action)) = (&r, action) {
                // Execute of this action usually follows at once; see `recent`.
                self.recent.note_miss(&instance, &action);
            }
            r
        })
        .await
    }

    async fn update_action_result(
        &self,
        request: Request<re::UpdateActionResultRequest>,
    ) -> Result<Response<re::ActionResult>, Status> {
        let who = crate::auth::caller(&request);
        let req = request.into_inner();
        observe("UpdateActionResult", async move {
            who?.check_instance(&req.instance_name)?;
            self.update_action_result(req).await
        })
        .await
    }
}
