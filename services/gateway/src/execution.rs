//! Execution (Execute, WaitExecution) and google.longrunning Operations.
//!
//! The gateway validates an Execute request, answers from the action cache when it can, and
//! otherwise creates the operation record in the operations bucket (JetStream KV), where the
//! scheduler picks it up. Progress streams back from one watch over the bucket per gateway, so an
//! operation outlives the gateway that created it: any gateway answers WaitExecution for it.
//!
//! **Lanes.** The lane of an execution comes from, in order:
//! 1. the `x-motorpool-lane` request header (`release`, `build`, `test`, `lint`; from Bazel:
//!    `--remote_header=x-motorpool-lane=release`); with several, the lowest (a CI runner sets
//!    its job's lane, and a repository's own `.bazelrc` may only lower it);
//! 2. `execution_policy.priority`: below 0 is release, 1..=99 test, 100 and above lint;
//! 3. the default priority 0: test for Bazel's test actions (mnemonic `TestRunner`), else build.
//!
//! **API clients.** A request with `x-motorpool-trigger: api` is API-triggered; its client id is
//! the `x-motorpool-client` header (else the tool invocation id). The scheduler rate-limits such
//! clients; over the limit a request waits in its lane or gets RESOURCE_EXHAUSTED.

use crate::auth::{self, Identity};
use crate::resource::{check_instance, digest, digest_function, to_proto};
use crate::{Gateway, observe};
use async_nats::jetstream::kv;
use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::longrunning as lr;
use bazel_remote_apis::google::protobuf::{Any, Empty};
use bazel_remote_apis::google::rpc::Status as RpcStatus;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use motorpool_bus::{Bus, subjects};
use motorpool_cas_client::ApiError;
use motorpool_messages::exec::*;
use motorpool_messages::{DigestFunction, WireError, codec, now_ms};
use parking_lot::Mutex;
use prost::Message as _;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

const METADATA_TYPE: &str =
    "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteOperationMetadata";
const RESPONSE_TYPE: &str = "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteResponse";
const REQUEST_METADATA: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";

/// The operations bucket and the waiters on it.
#[derive(Clone)]
pub struct Operations {
    kv: kv::Store,
    bus: Bus,
    waiters: Arc<Mutex<HashMap<String, Vec<mpsc::Sender<Operation>>>>>,
}

impl Operations {
    /// Opens the bucket and starts the one watch that feeds every waiter.
    pub async fn open(bus: Bus) -> Result<Operations, motorpool_bus::BusError> {
        let kv = bus.ensure_kv(subjects::exec::operations_config()).await?;
        let ops = Operations {
            kv,
            bus,
            waiters: Arc::default(),
        };
        let kv = ops.kv.clone();
        let waiters = ops.waiters.clone();
        tokio::spawn(async move {
            loop {
                match kv.watch_all().await {
                    Ok(mut watch) => {
                        // Changes made while no watch ran (a NATS restart) are not replayed:
                        // give every waiter its operation's current state.
                        let waiting: Vec<String> = waiters.lock().keys().cloned().collect();
                        for id in waiting {
                            if let Ok(Some(v)) = kv.get(&id).await
                                && let Ok(op) = codec::decode::<Operation>(&v)
                                && let Some(list) = waiters.lock().get(&id)
                            {
                                for tx in list {
                                    let _ = tx.try_send(op.clone());
                                }
                            }
                        }
                        while let Some(Ok(entry)) = watch.next().await {
                            if entry.operation != kv::Operation::Put {
                                continue;
                            }
                            let Ok(op) = codec::decode::<Operation>(&entry.value) else {
                                continue;
                            };
                            let mut w = waiters.lock();
                            if let Some(list) = w.get_mut(&op.id) {
                                list.retain(|tx| {
                                    tx.try_send(op.clone()).is_ok() || !tx.is_closed()
                                });
                                if list.is_empty() || op.is_done() {
                                    w.remove(&op.id);
                                }
                            }
                        }
                    }
                    Err(error) => tracing::warn!(%error, "Cannot watch operations; retrying"),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Ok(ops)
    }

    /// The current record of `id`.
    pub async fn get(&self, id: &str) -> Result<Option<Operation>, ApiError> {
        if !subjects::valid_id(id) {
            return Err(ApiError::Invalid(format!(
                "{id:?} is not an operation name"
            )));
        }
        let entry = self
            .kv
            .get(id)
            .await
            .map_err(|e| ApiError::Unavailable(format!("operations bucket: {e}")))?;
        entry
            .map(|b| {
                codec::decode::<Operation>(&b)
                    .map_err(|e| ApiError::Internal(format!("operation {id}: {e}")))
            })
            .transpose()
    }

    /// Updates of `id` from now on.
    fn subscribe(&self, id: &str) -> mpsc::Receiver<Operation> {
        let (tx, rx) = mpsc::channel(16);
        self.waiters
            .lock()
            .entry(id.to_string())
            .or_default()
            .push(tx);
        rx
    }

    /// Updates of `id` from now on, then its current state: nothing is missed in between.
    async fn follow(&self, id: &str) -> Result<(mpsc::Receiver<Operation>, Operation), ApiError> {
        let rx = self.subscribe(id);
        match self.get(id).await {
            Ok(Some(op)) => Ok((rx, op)),
            Ok(None) => Err(ApiError::NotFound(format!("no operation {id}"))),
            Err(e) => Err(e),
        }
    }
}

/// The longrunning form of an operation record.
fn to_longrunning(op: &Operation) -> lr::Operation {
    let stage = match op.state {
        OpState::Queued { .. } => re::execution_stage::Value::Queued,
        OpState::Executing { .. } => re::execution_stage::Value::Executing,
        OpState::Completed(_) => re::execution_stage::Value::Completed,
    };
    let digest_function = match op.digest_function {
        DigestFunction::Sha256 => re::digest_function::Value::Sha256,
        DigestFunction::Blake3 => re::digest_function::Value::Blake3,
    };
    let metadata = re::ExecuteOperationMetadata {
        stage: stage as i32,
        action_digest: Some(to_proto(&op.action)),
        digest_function: digest_function as i32,
        ..Default::default()
    };
    let result = match &op.state {
        OpState::Completed(outcome) => Some(lr::operation::Result::Response(Any {
            type_url: RESPONSE_TYPE.into(),
            value: execute_response(outcome).encode_to_vec(),
        })),
        _ => None,
    };
    lr::Operation {
        name: op.id.clone(),
        metadata: Some(Any {
            type_url: METADATA_TYPE.into(),
            value: metadata.encode_to_vec(),
        }),
        done: result.is_some(),
        result,
    }
}

/// An operation's error as REAPI carries it; an input no shard holds is named in a
/// `PreconditionFailure` (MISSING), so the client uploads it and executes again.
fn rpc_status(e: &WireError) -> RpcStatus {
    let details = e
        .missing_blob()
        .map(|d| {
            let failure = tonic_types::pb::PreconditionFailure {
                violations: vec![tonic_types::pb::precondition_failure::Violation {
                    r#type: "MISSING".into(),
                    subject: motorpool_cas_client::missing_subject(&d),
                    description: "not in the CAS".into(),
                }],
            };
            bazel_remote_apis::google::protobuf::Any {
                type_url: "type.googleapis.com/google.rpc.PreconditionFailure".into(),
                value: failure.encode_to_vec(),
            }
        })
        .into_iter()
        .collect();
    RpcStatus {
        code: tonic::Status::from(ApiError::from(e.clone())).code() as i32,
        message: e.message.clone(),
        details,
    }
}

fn execute_response(o: &Outcome) -> re::ExecuteResponse {
    re::ExecuteResponse {
        result: o
            .result
            .as_deref()
            .and_then(|b| re::ActionResult::decode(b).ok()),
        cached_result: o.cached,
        status: o.error.as_ref().map(rpc_status),
        server_logs: HashMap::new(),
        message: o.message.clone(),
    }
}

type OpStream = Pin<Box<dyn Stream<Item = Result<lr::Operation, Status>> + Send>>;

fn stage_of(op: &Operation) -> u8 {
    match op.state {
        OpState::Queued { .. } => 2,
        OpState::Executing { .. } => 3,
        OpState::Completed(_) => 4,
    }
}

/// What sees an operation's final state before its client does.
type OnDone = Box<dyn FnOnce(&Operation) + Send>;

/// Streams `first`, then every change of stage, ending with the done operation, which `on_done`
/// sees first. A client that goes away ends the forwarding; the operation itself goes on.
fn stream_from(
    first: Operation,
    mut updates: mpsc::Receiver<Operation>,
    on_done: Option<OnDone>,
) -> OpStream {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut on_done = on_done;
        let mut last = stage_of(&first);
        let mut done = first.is_done();
        if tx.send(Ok(to_longrunning(&first))).await.is_err() {
            return;
        }
        while !done {
            let Some(op) = updates.recv().await else {
                let _ = tx
                    .send(Err(Status::unavailable(
                        "lost the operation's updates; call WaitExecution to resume",
                    )))
                    .await;
                return;
            };
            let stage = stage_of(&op);
            if stage <= last {
                continue; // an older or repeated state
            }
            last = stage;
            done = op.is_done();
            if done && let Some(f) = on_done.take() {
                f(&op);
            }
            if tx.send(Ok(to_longrunning(&op))).await.is_err() {
                return;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// A call's `RequestMetadata` (Bazel's invocation and action ids, the mnemonic); empty when
/// it sent none, or none that decodes.
fn request_metadata(meta: &tonic::metadata::MetadataMap) -> re::RequestMetadata {
    meta.get_bin(REQUEST_METADATA)
        .and_then(|v| v.to_bytes().ok())
        .and_then(|b| re::RequestMetadata::decode(b.as_ref()).ok())
        .unwrap_or_default()
}

/// Bazel's invocation id in a call's `RequestMetadata` (empty when it sent none).
pub fn invocation_of(meta: &tonic::metadata::MetadataMap) -> String {
    Some(request_metadata(meta).tool_invocation_id)
        .filter(|id| motorpool_bus::subjects::valid_id(id))
        .unwrap_or_default()
}

/// Request headers that steer scheduling.
struct Steering {
    lane_header: Option<Lane>,
    client: String,
    api: bool,
    mnemonic: String,
    /// Bazel's invocation id (`RequestMetadata.tool_invocation_id`): what the build-event view
    /// joins the platform's records to.
    invocation: String,
    /// What the action does (`crate::bes::describe`), once its command is read.
    what: (String, String),
}

fn steering(meta: &tonic::metadata::MetadataMap) -> Result<Steering, ApiError> {
    let text = |k: &str| {
        meta.get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    // Several values (a CI runner's, and one from the repository's own .bazelrc) ask for the
    // lowest of them: a header added later can lower a lane, never raise it.
    let mut lane_header: Option<Lane> = None;
    for v in meta.get_all("x-motorpool-lane") {
        let l = v.to_str().unwrap_or("");
        let lane = Lane::from_name(l).ok_or_else(|| {
            ApiError::Invalid(format!(
                "x-motorpool-lane {l:?} is not a lane; use release, build, test or lint"
            ))
        })?;
        if lane_header.is_none_or(|h| lane.rank() < h.rank()) {
            lane_header = Some(lane);
        }
    }
    let rm = request_metadata(meta);
    let api = text("x-motorpool-trigger").is_some_and(|t| t.eq_ignore_ascii_case("api"));
    let client = text("x-motorpool-client")
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| rm.tool_invocation_id.clone());
    Ok(Steering {
        lane_header,
        client,
        api,
        mnemonic: rm.action_mnemonic,
        invocation: rm.tool_invocation_id,
        what: (String::new(), String::new()),
    })
}

/// The lane rule of this module's documentation.
pub fn lane_for(header: Option<Lane>, priority: i32, mnemonic: &str) -> Lane {
    if let Some(l) = header {
        return l;
    }
    match priority {
        p if p < 0 => Lane::Release,
        0 if mnemonic == "TestRunner" => Lane::Test,
        0 => Lane::Build,
        1..=99 => Lane::Test,
        _ => Lane::Lint,
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("no operation {name}"))
}

fn new_operation_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl Gateway {
    fn operations(&self) -> Result<&Operations, ApiError> {
        self.operations
            .as_ref()
            .ok_or_else(|| ApiError::Unimplemented("remote execution is not enabled".into()))
    }

    async fn execute_inner(
        &self,
        who: Result<Arc<Identity>, ApiError>,
        meta: &tonic::metadata::MetadataMap,
        req: re::ExecuteRequest,
    ) -> Result<OpStream, ApiError> {
        let ops = self.operations()?;
        let who = who?;
        who.check_instance(&req.instance_name)?;
        check_instance(&req.instance_name, &self.config.instance_names)?;
        let f = digest_function(req.digest_function)?;
        let action_digest = digest(f, req.action_digest.as_ref())?;
        let mut steer = steering(meta)?;
        let instance = req.instance_name.clone();
        let action: re::Action = self
            .read_message(&instance, "action", &action_digest)
            .await?;
        let command_digest = digest(f, action.command_digest.as_ref())?;
        digest(f, action.input_root_digest.as_ref())?;
        let command: re::Command = self
            .read_message(&instance, "command", &command_digest)
            .await?;
        if self.bes.is_some() && !steer.invocation.is_empty() {
            steer.what = crate::bes::describe(&command);
        }
        // REAPI 2.2 moved the platform to the Action; Bazel 4 sets it on the Command.
        #[allow(deprecated)]
        let platform_msg = action
            .platform
            .clone()
            .or(command.platform.clone())
            .unwrap_or_default();
        let mut platform: Vec<(String, String)> = platform_msg
            .properties
            .into_iter()
            .map(|p| (p.name, p.value))
            .collect();
        platform.sort();
        let priority = req.execution_policy.as_ref().map_or(0, |p| p.priority);
        // A header or a priority may lower the lane; the caller's key caps how high it goes.
        let lane = who.cap_lane(lane_for(steer.lane_header, priority, &steer.mnemonic));
        let timeout_ms = action.timeout.as_ref().map_or(0, |t| {
            (t.seconds.max(0) as u64) * 1000 + (t.nanos.max(0) as u64) / 1_000_000
        });

        let now = now_ms();
        let mut op = Operation {
            id: new_operation_id(),
            instance,
            digest_function: f,
            action: action_digest,
            lane,
            pool: Pool::of(&platform),
            platform,
            do_not_cache: action.do_not_cache,
            timeout_ms,
            client: who.client_id(&steer.client),
            // A key may be API-triggered by itself; any caller may also submit to the limit.
            api: who.api || steer.api,
            created_ms: now,
            not_before_ms: 0,
            attempts: 0,
            failures: Vec::new(),
            state: OpState::Queued { follows: None },
            queued_ms: now,
            trace: motorpool_bus::trace::traceparent(),
        };
        // A miss this gateway answered a moment ago stands for the lookup (see `recent`).
        if !req.skip_cache_lookup
            && !action.do_not_cache
            && !self.recent.take_miss(&op.instance, &action_digest)
        {
            let lookup = re::GetActionResultRequest {
                instance_name: op.instance.clone(),
                action_digest: req.action_digest.clone(),
                inline_stdout: false,
                inline_stderr: false,
                inline_output_files: Vec::new(),
                digest_function: req.digest_function,
            };
            match self.get_action_result(lookup).await {
                Ok(result) => {
                    op.state = OpState::Completed(Outcome {
                        error: None,
                        result: Some(result.encode_to_vec()),
                        cached: true,
                        message: String::new(),
                    });
                    metrics::counter!(crate::metric_names::GATEWAY_EXECUTIONS_TOTAL, "lane" => lane.name(), "outcome" => "cached").increment(1);
                    self.record_for_invocation(&steer, &who, &op);
                    let (_tx, rx) = mpsc::channel(1);
                    return Ok(stream_from(op, rx, None));
                }
                Err(ApiError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }

        if op.api {
            let admission = ops
                .bus
                .request(
                    &subjects::exec::admit(),
                    &Admit {
                        client: op.client.clone(),
                    },
                )
                .await
                .map_err(ApiError::from)?;
            op.not_before_ms = admission.not_before_ms;
        }
        // Before the action is queued: a removal heard after this keeps its result out of the
        // gateway's memory (see `hits`).
        let ticket = self.hits.ticket();
        let frame = codec::encode(&op).map_err(|e| ApiError::Internal(e.to_string()))?;
        let rx = ops.subscribe(&op.id);
        // A NATS server lost from a cluster leaves the bucket without a leader for a few seconds:
        // the action waits that out rather than failing the build. A try that timed out may have
        // created the record after all; the operation id is this gateway's own, so finding it
        // there on a later try means it is queued.
        let tries = std::sync::atomic::AtomicU32::new(0);
        let created = motorpool_bus::through_elections(Duration::from_secs(15), true, || {
            tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            ops.kv.create(&op.id, Bytes::from(frame.clone()))
        })
        .await;
        match created {
            Ok(_) => {}
            Err(e)
                if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists
                    && tries.load(std::sync::atomic::Ordering::Relaxed) > 1 => {}
            Err(e) => {
                ops.waiters.lock().remove(&op.id);
                return Err(ApiError::Unavailable(format!(
                    "cannot queue the operation: {e}"
                )));
            }
        }
        metrics::counter!(crate::metric_names::GATEWAY_EXECUTIONS_TOTAL, "lane" => lane.name(), "outcome" => "queued").increment(1);
        tracing::debug!(op = %op.id, action = %op.action, %lane, pool = %op.pool, "Queued an execution");
        let gateway = self.clone();
        let remember = move |done: &Operation| {
            gateway.record_for_invocation(&steer, &who, done);
            gateway.remember_executed(ticket, done);
        };
        Ok(stream_from(op, rx, Some(Box::new(remember))))
    }

    /// Gives the build-event view the platform's record of an action an invocation ran.
    fn record_for_invocation(&self, steer: &Steering, who: &Identity, op: &Operation) {
        let Some(bes) = &self.bes else { return };
        if !motorpool_bus::subjects::valid_id(&steer.invocation) {
            return;
        }
        if let Some(a) =
            crate::bes::remote_action(&steer.invocation, &who.id, &steer.mnemonic, &steer.what, op)
        {
            bes.record(a);
        }
    }

    /// Reads and decodes a message the client must have uploaded before Execute.
    async fn read_message<M: prost::Message + Default>(
        &self,
        instance: &str,
        what: &str,
        d: &motorpool_messages::BlobDigest,
    ) -> Result<M, ApiError> {
        let blob = match self.recent.blob(instance, d) {
            Some(b) => b,
            None => self
                .shards
                .read_blob(instance, d)
                .await
                .map_err(|e| match e {
                    ApiError::NotFound(_) => {
                        ApiError::FailedPrecondition(WireError::missing_input(what, d).message)
                    }
                    other => other,
                })?,
        };
        M::decode(blob.as_slice()).map_err(|e| {
            ApiError::Invalid(format!("{what} {d} is not a valid {what} message: {e}"))
        })
    }

    async fn wait_inner(
        &self,
        who: Result<Arc<Identity>, ApiError>,
        name: &str,
    ) -> Result<OpStream, ApiError> {
        let who = who?;
        let (rx, op) = self.operations()?.follow(name).await?;
        if !who.owns(&op.client) {
            return Err(not_found(name));
        }
        Ok(stream_from(op, rx, None))
    }

    /// The operation `name`, if the caller may see it (others' are reported missing, as if they
    /// did not exist).
    async fn visible(&self, who: &Identity, name: &str) -> Result<Operation, ApiError> {
        match self.operations()?.get(name).await? {
            Some(op) if who.owns(&op.client) => Ok(op),
            _ => Err(not_found(name)),
        }
    }
}

#[tonic::async_trait]
impl re::execution_server::Execution for Gateway {
    type ExecuteStream = OpStream;
    type WaitExecutionStream = OpStream;

    async fn execute(
        &self,
        request: Request<re::ExecuteRequest>,
    ) -> Result<Response<OpStream>, Status> {
        let meta = request.metadata().clone();
        let who = auth::caller(&request);
        let req = request.into_inner();
        observe("Execute", self.execute_inner(who, &meta, req)).await
    }

    async fn wait_execution(
        &self,
        request: Request<re::WaitExecutionRequest>,
    ) -> Result<Response<OpStream>, Status> {
        let who = auth::caller(&request);
        let name = request.into_inner().name;
        observe("WaitExecution", self.wait_inner(who, &name)).await
    }
}

#[tonic::async_trait]
impl lr::operations_server::Operations for Gateway {
    async fn list_operations(
        &self,
        request: Request<lr::ListOperationsRequest>,
    ) -> Result<Response<lr::ListOperationsResponse>, Status> {
        let who = auth::caller(&request);
        let req = request.into_inner();
        observe("ListOperations", async move {
            let who = who?;
            let ops = self.operations()?;
            let only_done = match req.filter.trim() {
                "" => None,
                "done=true" => Some(true),
                "done=false" => Some(false),
                other => {
                    return Err(ApiError::Invalid(format!(
                        "unsupported filter {other:?}; use done=true or done=false"
                    )));
                }
            };
            let page = match req.page_size {
                n if n <= 0 => 100,
                n => (n as usize).min(1000),
            };
            let mut keys: Vec<String> = ops
                .kv
                .keys()
                .await
                .map_err(|e| ApiError::Unavailable(format!("operations bucket: {e}")))?
                .filter_map(|k| async move { k.ok() })
                .collect()
                .await;
            keys.sort();
            let mut out = Vec::new();
            let mut next = String::new();
            for k in keys
                .into_iter()
                .filter(|k| k.as_str() > req.page_token.as_str())
            {
                if out.len() == page {
                    next = out
                        .last()
                        .map(|o: &lr::Operation| o.name.clone())
                        .unwrap_or_default();
                    break;
                }
                if let Some(op) = ops.get(&k).await?
                    && who.owns(&op.client)
                    && only_done.is_none_or(|d| d == op.is_done())
                {
                    out.push(to_longrunning(&op));
                }
            }
            Ok(lr::ListOperationsResponse {
                operations: out,
                next_page_token: next,
                unreachable: Vec::new(),
            })
        })
        .await
    }

    async fn get_operation(
        &self,
        request: Request<lr::GetOperationRequest>,
    ) -> Result<Response<lr::Operation>, Status> {
        let who = auth::caller(&request);
        let name = request.into_inner().name;
        observe("GetOperation", async move {
            Ok(to_longrunning(&self.visible(&*who?, &name).await?))
        })
        .await
    }

    async fn delete_operation(
        &self,
        request: Request<lr::DeleteOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        let who = auth::caller(&request);
        let name = request.into_inner().name;
        observe("DeleteOperation", async move {
            let ops = self.operations()?;
            match self.visible(&*who?, &name).await? {
                op if !op.is_done() => Err(ApiError::FailedPrecondition(format!(
                    "operation {name} is not done; cancel it first"
                ))),
                _ => {
                    ops.kv
                        .delete(&name)
                        .await
                        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
                    Ok(Empty {})
                }
            }
        })
        .await
    }

    async fn cancel_operation(
        &self,
        request: Request<lr::CancelOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        let who = auth::caller(&request);
        let name = request.into_inner().name;
        observe("CancelOperation", async move {
            let ops = self.operations()?;
            if !subjects::valid_id(&name) {
                return Err(ApiError::Invalid(format!(
                    "{name:?} is not an operation name"
                )));
            }
            self.visible(&*who?, &name).await?;
            ops.bus
                .request(
                    &subjects::exec::cancel(),
                    &Cancel {
                        operation_id: name.clone(),
                    },
                )
                .await
                .map_err(ApiError::from)?;
            Ok(Empty {})
        })
        .await
    }

    async fn wait_operation(
        &self,
        request: Request<lr::WaitOperationRequest>,
    ) -> Result<Response<lr::Operation>, Status> {
        let who = auth::caller(&request);
        let req = request.into_inner();
        observe("WaitOperation", async move {
            let who = who?;
            let timeout = req.timeout.map_or(Duration::from_secs(60), |t| {
                Duration::from_secs(t.seconds.max(0) as u64)
                    + Duration::from_nanos(t.nanos.max(0) as u64)
            });
            let (mut rx, mut op) = self.operations()?.follow(&req.name).await?;
            if !who.owns(&op.client) {
                return Err(not_found(&req.name));
            }
            let deadline = tokio::time::Instant::now() + timeout;
            while !op.is_done() {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(o)) => op = o,
                    _ => break,
                }
            }
            Ok(to_longrunning(&op))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use motorpool_messages::ErrorCode;

    #[test]
    fn lane_rule() {
        assert_eq!(
            lane_for(Some(Lane::Lint), -5, ""),
            Lane::Lint,
            "header wins"
        );
        assert_eq!(lane_for(None, -1, ""), Lane::Release);
        assert_eq!(lane_for(None, 0, "CppCompile"), Lane::Build);
        assert_eq!(lane_for(None, 0, "TestRunner"), Lane::Test);
        assert_eq!(lane_for(None, 50, "CppCompile"), Lane::Test);
        assert_eq!(lane_for(None, 100, ""), Lane::Lint);
    }

    #[test]
    fn unknown_lane_header_is_a_clear_error() {
        let mut m = tonic::metadata::MetadataMap::new();
        m.insert("x-motorpool-lane", "urgent".parse().unwrap());
        let err = steering(&m).err().unwrap();
        assert!(err.to_string().contains("urgent"), "{err}");
    }

    #[test]
    fn of_several_lane_headers_the_lowest_counts() {
        for order in [["release", "lint"], ["lint", "release"]] {
            let mut m = tonic::metadata::MetadataMap::new();
            for l in order {
                m.append("x-motorpool-lane", l.parse().unwrap());
            }
            assert_eq!(
                steering(&m).unwrap().lane_header,
                Some(Lane::Lint),
                "{order:?}"
            );
        }
    }

    #[test]
    fn completed_operations_carry_the_response() {
        let op = Operation {
            id: "0".repeat(32),
            instance: String::new(),
            digest_function: DigestFunction::Sha256,
            action: DigestFunction::Sha256.digest_of(b"a"),
            lane: Lane::Build,
            pool: Pool::Cpu,
            platform: vec![],
            do_not_cache: false,
            timeout_ms: 0,
            client: String::new(),
            api: false,
            created_ms: 0,
            not_before_ms: 0,
            attempts: 1,
            failures: vec![],
            state: OpState::Completed(Outcome {
                error: Some(WireError::new(ErrorCode::Unavailable, "gave up")),
                result: None,
                cached: false,
                message: "gave up".into(),
            }),
            queued_ms: 0,
            trace: String::new(),
        };
        let lro = to_longrunning(&op);
        assert!(lro.done);
        let Some(lr::operation::Result::Response(any)) = lro.result else {
            panic!("a response")
        };
        assert_eq!(any.type_url, RESPONSE_TYPE);
        let resp = re::ExecuteResponse::decode(any.value.as_slice()).unwrap();
        assert_eq!(resp.status.unwrap().code, tonic::Code::Unavailable as i32);
    }
}
