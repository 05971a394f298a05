//! ActionCache: GetActionResult with a completeness check, UpdateActionResult.
//!
//! Invariant: a result is returned only while every blob it references (output files, output
//! directory trees and the files in them, stdout, stderr) is in the CAS. Otherwise the client
//! gets NOT_FOUND and runs the action again, instead of failing later on a missing digest. A
//! result found complete is remembered (see [`crate::hits`]) and served again without asking the
//! shards until one of them announces that something it references is gone.

use crate::hits::Ticket;
use crate::resource::{check_instance, digest, digest_function};
use crate::{Gateway, observe};
use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use motorpool_cas_client::ApiError;
use motorpool_messages::exec::{OpState, Operation};
use motorpool_messages::{BlobDigest, DigestFunction};
use prost::Message as _;
use re::action_cache_server::ActionCache;
use tonic::{Request, Response, Status};

/// Largest stdout/stderr/output file inlined on request.
const MAX_INLINE: u64 = 1 << 20;

impl Gateway {
    /// Every CAS blob an ActionResult references (reading output-directory trees), and whether
    /// every tree could be read (one that could not is among the blobs, and its files are not).
    pub(crate) async fn referenced_blobs(
        &self,
        instance: &str,
        f: DigestFunction,
        r: &re::ActionResult,
    ) -> Result<(Vec<BlobDigest>, bool), ApiError> {
        let mut whole = true;
        let mut out = direct_refs(f, r)?;
        for dir in &r.output_directories {
            let tree_digest = digest(f, dir.tree_digest.as_ref())?;
            let Ok(data) = self.shards.read_blob(instance, &tree_digest).await else {
                whole = false;
                continue;
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
        Ok((out, whole))
    }

    /// The blobs `r` references, and which of them no live shard holds.
    async fn missing_of(
        &self,
        instance: &str,
        f: DigestFunction,
        r: &re::ActionResult,
    ) -> Result<(Vec<BlobDigest>, Vec<BlobDigest>), ApiError> {
        // A tree that could not be read is itself among the blobs, and found missing.
        let (refs, _) = self.referenced_blobs(instance, f, r).await?;
        let missing = self.shards.find_missing(instance, &refs).await?;
        let gone = refs
            .iter()
            .zip(missing)
            .filter(|(_, m)| *m)
            .map(|(d, _)| *d)
            .collect();
        Ok((refs, gone))
    }

    pub(crate) async fn get_action_result(
        &self,
        req: re::GetActionResultRequest,
    ) -> Result<re::ActionResult, ApiError> {
        check_instance(&req.instance_name, &self.config.instance_names)?;
        let f = digest_function(req.digest_function)?;
        let action = digest(f, req.action_digest.as_ref())?;
        // Verified complete before, and nothing it rests on gone since (see `hits`).
        if let Some(bytes) = self.hits.get(&req.instance_name, &action)
            && let Ok(mut result) = re::ActionResult::decode(bytes)
        {
            metrics::counter!(crate::metric_names::GATEWAY_ACTION_CACHE_TOTAL, "outcome" => "hit")
                .increment(1);
            self.inline(&req, f, &mut result).await?;
            return Ok(result);
        }
        let ticket = self.hits.ticket();
        let Some(bytes) = self.shards.ac_get(&req.instance_name, &action).await? else {
            metrics::counter!(crate::metric_names::GATEWAY_ACTION_CACHE_TOTAL, "outcome" => "miss")
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
        let (refs, missing) = self.missing_of(&req.instance_name, f, &result).await?;
        if !missing.is_empty() {
            metrics::counter!(crate::metric_names::GATEWAY_ACTION_CACHE_TOTAL, "outcome" => "incomplete")
                .increment(1);
            tracing::info!(%action, missing = missing.len(), first = %missing[0], "Action result references evicted blobs; answering NOT_FOUND");
            return Err(ApiError::NotFound(format!(
                "action result for {action} references {} blob(s) no longer in the CAS, for example {}",
                missing.len(),
                missing[0]
            )));
        }
        metrics::counter!(crate::metric_names::GATEWAY_ACTION_CACHE_TOTAL, "outcome" => "hit")
            .increment(1);
        self.remember(ticket, &req.instance_name, &action, bytes.into(), &refs);
        self.inline(&req, f, &mut result).await?;
        Ok(result)
    }

    /// Hands a result found complete to [`crate::hits`], if news comes from every live shard
    /// (a shard not heard from could drop its blobs unheard).
    fn remember(
        &self,
        ticket: Ticket,
        instance: &str,
        action: &BlobDigest,
        entry: bytes::Bytes,
        refs: &[BlobDigest],
    ) {
        let live = self.shards.live();
        if self
            .hits
            .hears_all(live.iter().map(|s| s.shard_id.as_str()))
        {
            self.hits.remember(ticket, instance, action, entry, refs);
        }
    }

    /// Remembers the result of an action a worker just ran, as [`crate::hits`] would after
    /// checking it: the worker stored every output (the shards verified each) before it wrote
    /// the entry, and `ticket`, taken when the action was queued, rules out any removal heard
    /// since. A result with output directories has their trees read in the background, off the
    /// client's path; any other is remembered before the client hears that it finished.
    pub(crate) fn remember_executed(&self, ticket: Ticket, op: &Operation) {
        let OpState::Completed(outcome) = &op.state else {
            return;
        };
        let Some(bytes) = &outcome.result else {
            return;
        };
        if outcome.error.is_some() || outcome.cached || op.do_not_cache {
            return;
        }
        let Ok(result) = re::ActionResult::decode(bytes.as_slice()) else {
            return;
        };
        if result.exit_code != 0 {
            return; // not cached by the worker either
        }
        let (instance, action, f) = (&op.instance, op.action, op.digest_function);
        if result.output_directories.is_empty() {
            if let Ok(refs) = direct_refs(f, &result) {
                self.remember(ticket, instance, &action, bytes.clone().into(), &refs);
            }
            return;
        }
        let (gateway, bytes, instance) = (self.clone(), bytes.clone(), instance.clone());
        tokio::spawn(async move {
            if let Ok((refs, true)) = gateway.referenced_blobs(&instance, f, &result).await {
                gateway.remember(ticket, &instance, &action, bytes.into(), &refs);
            }
        });
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
        let ticket = self.hits.ticket();
        let (refs, missing) = self.missing_of(&req.instance_name, f, &result).await?;
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
        let entry = result.encode_to_vec();
        self.shards
            .ac_put(&req.instance_name, &action, entry.clone())
            .await?;
        self.remember(ticket, &req.instance_name, &action, entry.into(), &refs);
        Ok(result)
    }
}

/// The blobs a result names itself: output files, stdout, stderr and output directory trees
/// (not the files in those trees).
fn direct_refs(f: DigestFunction, r: &re::ActionResult) -> Result<Vec<BlobDigest>, ApiError> {
    let files = r.output_files.iter().map(|o| o.digest.as_ref());
    let streams = [&r.stdout_digest, &r.stderr_digest].map(Option::as_ref);
    let trees = r.output_directories.iter().map(|d| d.tree_digest.as_ref());
    files
        .chain(streams.into_iter().flatten().map(Some))
        .chain(trees)
        .map(|d| digest(f, d))
        .collect()
}

#[tonic::async_trait]
impl ActionCache for Gateway {
    async fn get_action_result(
        &self,
        request: Request<re::GetActionResultRequest>,
    ) -> Result<Response<re::ActionResult>, Status> {
        let who = crate::auth::caller(&request);
        if let (Some(bes), Ok(who)) = (&self.bes, &who) {
            bes.claim(
                &crate::execution::invocation_of(request.metadata()),
                &who.id,
            );
        }
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
