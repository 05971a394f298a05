//! The Build Event Service: `google.devtools.build.v1.PublishBuildEvent`, so that
//! `bazel build --bes_backend=grpc://HOST:8980` has somewhere to go.
//!
//! Each event is kept as received in JetStream (stream `MP_V1_BES`, one subject per invocation)
//! and acknowledged only once JetStream stored it, in the order it came. Bazel resends what it
//! saw no acknowledgement for, on the same stream or a new one after a broken connection: an
//! event at or below the last one kept is acknowledged again and not stored twice (its message
//! id is the invocation, component and sequence number, which JetStream deduplicates across
//! gateways too); one that skips ahead is refused with FAILED_PRECONDITION. An event that is not
//! what it says (no stream id, an invocation id that is not one, a Bazel event that does not
//! decode) is refused with INVALID_ARGUMENT and nothing of it is kept.
//!
//! The invocation's summary (command, patterns, status, target and test counts) is folded from
//! the events as they pass ([`crate::invocations::fold`]) and written to the KV bucket
//! `mp_v1_bes_invocations` at the first event, at most every second while the build runs, and
//! when the stream ends. An invocation belongs to the API key that streamed it first: another
//! key's events for it are refused. Beyond `max_events_per_invocation` (or its bytes) events
//! are acknowledged but not kept, and the invocation is marked truncated: the build goes on,
//! and the gateway's storage stays bounded.

use crate::auth::{self, Identity};
use crate::invocations::{self, Fold};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use googleapis_tonic_google_devtools_build_v1::google::devtools::build::v1 as bes;
use motorpool_bus::{Bus, BusError, subjects};
use motorpool_config::BesConfig;
use motorpool_messages::bes::{BesEvent, InvocationSummary};
use motorpool_messages::{codec, now_ms};
use parking_lot::Mutex;
use prost::Message as _;
use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::{Request, Response, Status};

const SERVICE: &str = "google.devtools.build.v1.PublishBuildEvent";
/// Events stored but not yet acknowledged, per stream: JetStream's acknowledgements overlap.
const IN_FLIGHT: usize = 256;
/// Invocations followed at once before those quiet for an hour are let go.
const MAX_FOLLOWING: usize = 10_000;

/// One invocation as this gateway follows it.
struct Following {
    owner: String,
    /// The last sequence number kept, per stream component.
    last: HashMap<i32, i64>,
    events: u64,
    bytes: u64,
    fold: Fold,
    written_ms: u64,
    /// Whether the summary changed since it was last written.
    dirty: bool,
}

/// The service's state: the bus, the summaries' bucket and the invocations being streamed.
pub struct Bes {
    bus: Bus,
    stream: async_nats::jetstream::stream::Stream,
    summaries: async_nats::jetstream::kv::Store,
    config: BesConfig,
    following: Mutex<HashMap<String, Following>>,
    /// Invocations whose cache or execution calls named their key before their first event
    /// reached this gateway: invocation -> (key id, when).
    claims: Mutex<HashMap<String, (String, u64)>>,
}

/// What became of one event.
enum Taken {
    /// To be stored; acknowledged once it is.
    Store(BesEvent),
    /// Already kept, or past the invocation's cap: acknowledged at once.
    Ack,
}

impl Bes {
    pub async fn open(bus: Bus, config: BesConfig) -> Result<Arc<Bes>, BusError> {
        let age = Duration::from_secs(config.retention_days.max(1) * 24 * 3600);
        let stream = bus
            .ensure_stream(subjects::bes::stream_config(age, config.max_bytes))
            .await?;
        let summaries = bus
            .ensure_kv(subjects::bes::invocations_config(age))
            .await?;
        let bes = Arc::new(Bes {
            bus,
            stream,
            summaries,
            config,
            following: Mutex::new(HashMap::new()),
            claims: Mutex::new(HashMap::new()),
        });
        // The count bound, swept while the service lives.
        let weak = Arc::downgrade(&bes);
        let period = Duration::from_secs(bes.config.sweep_interval_s.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(bes) = weak.upgrade() else { break };
                match bes.sweep().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(removed = n, "Swept the oldest invocations"),
                    Err(error) => tracing::warn!(%error, "Cannot sweep invocations"),
                }
            }
        });
        Ok(bes)
    }

    /// Removes the oldest invocations beyond `max_invocations`: their events, actions and
    /// summary. Returns how many.
    pub async fn sweep(&self) -> Result<usize, String> {
        let mut all = invocations::list(&self.summaries).await?;
        if all.len() <= self.config.max_invocations {
            return Ok(0);
        }
        let old = all.split_off(self.config.max_invocations);
        for s in &old {
            let id = &s.invocation_id;
            for subject in [subjects::bes::event(id), subjects::bes::action(id)] {
                self.stream
                    .purge()
                    .filter(subject.as_str())
                    .await
                    .map_err(|e| format!("purge {}: {e}", subject.as_str()))?;
            }
            self.summaries
                .purge(id)
                .await
                .map_err(|e| format!("purge the summary of {id}: {e}"))?;
            self.following.lock().remove(id);
        }
        metrics::counter!(crate::metric_names::BES_INVOCATIONS_SWEPT_TOTAL)
            .increment(old.len() as u64);
        Ok(old.len())
    }

    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    pub fn summaries(&self) -> &async_nats::jetstream::kv::Store {
        &self.summaries
    }

    /// Checks one event and folds it into its invocation's summary.
    async fn take(
        &self,
        who: &Identity,
        ordered: Option<bes::OrderedBuildEvent>,
    ) -> Result<(Taken, bes::StreamId, i64), Status> {
        let ordered = ordered.ok_or_else(|| Status::invalid_argument("no ordered_build_event"))?;
        let stream = ordered
            .stream_id
            .clone()
            .ok_or_else(|| Status::invalid_argument("the event has no stream_id"))?;
        let inv = stream.invocation_id.clone();
        if !subjects::valid_id(&inv) {
            return Err(Status::invalid_argument(format!(
                "invocation id {:?} is not 1-64 of [A-Za-z0-9_-]",
                invocations::clip(&inv, 80)
            )));
        }
        let seq = ordered.sequence_number;
        if seq < 1 {
            return Err(Status::invalid_argument(format!(
                "sequence number {seq}: they start at 1"
            )));
        }
        let mut event = ordered
            .event
            .ok_or_else(|| Status::invalid_argument(format!("event {seq} is empty")))?;
        // Decoded before anything is kept: an event that is not what it says is refused whole.
        let decoded = invocations::decode(&event)
            .map_err(|e| Status::invalid_argument(format!("event {seq} of {inv}: {e}")))?;
        // Bazel's command line carries the API key it sends: never kept.
        invocations::redacted(&mut event, &decoded);
        if !self.following.lock().contains_key(&inv) {
            // First seen here: another gateway, or this one before a restart, may have begun it.
            let before = match self.summaries.get(&inv).await {
                Ok(Some(b)) => codec::decode::<InvocationSummary>(&b).ok(),
                _ => None,
            };
            let claimed = self.claims.lock().remove(&inv).map(|(owner, _)| owner);
            let mut following = self.following.lock();
            if following.len() >= MAX_FOLLOWING {
                // Invocations whose Bazel went away before the build finished: their summaries
                // are written; an event of theirs arriving later resumes from it.
                let now = now_ms();
                following.retain(|_, f| now < f.written_ms + 3_600_000);
            }
            following.entry(inv.clone()).or_insert_with(|| Following {
                owner: before
                    .as_ref()
                    .map(|b| b.owner.clone())
                    .filter(|o| !o.is_empty())
                    .or(claimed)
                    .unwrap_or_else(|| who.id.clone()),
                last: HashMap::new(),
                events: before.as_ref().map_or(0, |b| b.events),
                bytes: 0,
                fold: Fold::resume(before.unwrap_or_default()),
                written_ms: 0,
                dirty: true,
            });
        }
        let mut following = self.following.lock();
        let f = following.get_mut(&inv).expect("inserted above");
        if f.owner.is_empty() {
            f.owner = who.id.clone();
        }
        // A keyless sender (Bazel 4) adds to whatever invocation it names; a key only to its own.
        if !who.id.is_empty() && f.owner != who.id && !who.may(auth::Role::Admin) {
            return Err(Status::permission_denied(format!(
                "invocation {inv} was streamed by another key"
            )));
        }
        let last = f.last.get(&stream.component).copied();
        match last {
            Some(l) if seq <= l => {
                metrics::counter!(crate::metric_names::BES_EVENTS_TOTAL, "outcome" => "duplicate")
                    .increment(1);
                return Ok((Taken::Ack, stream, seq));
            }
            Some(l) if seq > l + 1 => {
                return Err(Status::failed_precondition(format!(
                    "event {seq} of {inv} arrived after event {l}: send {} first",
                    l + 1
                )));
            }
            // A stream this gateway has not seen may begin anywhere (a retry after a restart, or
            // of a stream another gateway acknowledged in part): JetStream drops what it holds.
            _ => {}
        }
        f.last.insert(stream.component, seq);
        f.events += 1;
        let bytes = event.encoded_len() as u64;
        f.bytes += bytes;
        if f.fold.summary.invocation_id.is_empty() {
            f.fold.summary.invocation_id = inv.clone();
            f.fold.summary.build_id = stream.build_id.clone();
        }
        f.fold.summary.owner = f.owner.clone();
        f.fold.apply(&decoded, now_ms());
        f.fold.summary.events = f.events;
        f.dirty = true;
        let over = f.events > self.config.max_events_per_invocation
            || f.bytes > self.config.max_bytes_per_invocation;
        if over {
            f.fold.summary.truncated = true;
            metrics::counter!(crate::metric_names::BES_EVENTS_TOTAL, "outcome" => "over_cap")
                .increment(1);
            return Ok((Taken::Ack, stream, seq));
        }
        metrics::counter!(crate::metric_names::BES_EVENTS_TOTAL, "outcome" => "kept").increment(1);
        Ok((
            Taken::Store(BesEvent {
                invocation_id: inv,
                build_id: stream.build_id.clone(),
                component: stream.component,
                sequence: seq,
                event: event.encode_to_vec(),
                received_ms: now_ms(),
            }),
            stream,
            seq,
        ))
    }

    async fn store(&self, e: &BesEvent) -> Result<(), Status> {
        let id = format!("{}/{}/{}", e.invocation_id, e.component, e.sequence);
        self.bus
            .enqueue_once(&subjects::bes::event(&e.invocation_id), e, &id)
            .await
            .map_err(|e| Status::unavailable(format!("the event could not be kept: {e}")))
    }

    /// Forgets where a stream of `invocation` was, so that its next event is taken wherever it
    /// starts (after an event could not be kept).
    fn forget_position(&self, invocation: &str, component: i32) {
        if let Some(f) = self.following.lock().get_mut(invocation) {
            f.last.remove(&component);
        }
    }

    /// Writes the invocation's summary if it changed and `force` or a second passed since.
    async fn write_summary(&self, inv: &str, force: bool) {
        let summary = {
            let mut following = self.following.lock();
            let Some(f) = following.get_mut(inv) else {
                return;
            };
            let now = now_ms();
            if !f.dirty || (!force && now < f.written_ms + 1000) {
                return;
            }
            f.dirty = false;
            f.written_ms = now;
            let mut s = f.fold.summary.clone();
            s.updated_ms = now;
            s
        };
        match codec::encode(&summary) {
            Ok(bytes) => {
                if let Err(error) = self.summaries.put(inv, bytes.into()).await {
                    tracing::warn!(invocation = %inv, %error, "Cannot write an invocation's summary");
                }
            }
            Err(error) => tracing::warn!(%error, "Cannot encode an invocation's summary"),
        }
    }

    /// Forgets an invocation that finished (its summary written for good).
    async fn finish(&self, inv: &str) {
        self.write_summary(inv, true).await;
        let done = self
            .following
            .lock()
            .get(inv)
            .is_some_and(|f| f.fold.finished());
        if done {
            self.following.lock().remove(inv);
        }
    }

    async fn lifecycle(
        &self,
        who: &Identity,
        req: bes::PublishLifecycleEventRequest,
    ) -> Result<(), Status> {
        // The build's own events (enqueued, finished) name no invocation: nothing to keep.
        let invocation = req
            .build_event
            .as_ref()
            .and_then(|e| e.stream_id.as_ref())
            .map(|s| s.invocation_id.as_str());
        if invocation.is_some_and(str::is_empty) {
            return Ok(());
        }
        let (taken, stream, _) = self.take(who, req.build_event).await.inspect_err(|status| {
            tracing::warn!(code = ?status.code(), message = status.message(), "Refused a lifecycle event");
        })?;
        if let Taken::Store(e) = &taken {
            self.store(e).await?;
        }
        self.write_summary(&stream.invocation_id, false).await;
        Ok(())
    }

    /// Serves one `PublishBuildToolEventStream`: each event kept, then acknowledged, in order.
    fn tool_stream(
        self: Arc<Self>,
        who: Arc<Identity>,
        mut input: tonic::Streaming<bes::PublishBuildToolEventStreamRequest>,
    ) -> AckStream {
        let (tx, rx) = tokio::sync::mpsc::channel(IN_FLIGHT);
        tokio::spawn(async move {
            let mut pending: FuturesOrdered<AckFuture> = FuturesOrdered::new();
            let mut invocation: Option<String> = None;
            // Reading stops at the client's end, a refused event or a broken stream; every event
            // taken is stored all the same (it was folded and counted as kept), and acknowledged
            // while the client listens.
            let (mut open, mut listening) = (true, true);
            let mut refused: Option<Status> = None;
            loop {
                tokio::select! {
                    next = input.message(), if open && pending.len() < IN_FLIGHT => {
                        match next {
                            Ok(Some(req)) => match self.take(&who, req.ordered_build_event).await {
                                Ok((taken, stream, seq)) => {
                                    let ack = bes::PublishBuildToolEventStreamResponse {
                                        sequence_number: seq,
                                        stream_id: Some(stream.clone()),
                                    };
                                    invocation.get_or_insert_with(|| stream.invocation_id.clone());
                                    let me = self.clone();
                                    pending.push_back(Box::pin(async move {
                                        if let Taken::Store(e) = &taken
                                            && let Err(status) = me.store(e).await
                                        {
                                            // Not kept: the resend must be taken, not seen as a duplicate.
                                            me.forget_position(&e.invocation_id, e.component);
                                            return Err(status);
                                        }
                                        Ok(ack)
                                    }));
                                }
                                Err(status) => {
                                    tracing::warn!(code = ?status.code(), message = status.message(), "Refused a build event");
                                    refused = Some(status);
                                    open = false;
                                }
                            },
                            Ok(None) => open = false,
                            Err(status) => {
                                tracing::debug!(%status, "A build event stream broke");
                                (open, listening) = (false, false);
                            }
                        }
                    }
                    Some(r) = pending.next(), if !pending.is_empty() => {
                        let failed = r.is_err();
                        if listening && tx.send(r).await.is_err() {
                            listening = false;
                        }
                        // After an error the client starts again from the first event it has
                        // no acknowledgement for: later acknowledgements would mislead it.
                        if failed {
                            listening = false;
                        }
                        if let Some(inv) = &invocation {
                            self.write_summary(inv, false).await;
                        }
                    }
                    else => break,
                }
                if !open && pending.is_empty() {
                    break;
                }
            }
            if let (Some(status), true) = (refused, listening) {
                let _ = tx.send(Err(status)).await;
            }
            if let Some(inv) = invocation {
                self.finish(&inv).await;
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

type Ack = Result<bes::PublishBuildToolEventStreamResponse, Status>;
type AckFuture = Pin<Box<dyn std::future::Future<Output = Ack> + Send>>;
type AckStream = Pin<Box<dyn futures::Stream<Item = Ack> + Send>>;

/// The gRPC service (tonic's generated crate for these protos has only the client).
#[derive(Clone)]
pub struct BesServer {
    bes: Arc<Bes>,
    max_message_bytes: usize,
}

impl BesServer {
    pub fn new(bes: Arc<Bes>, max_message_bytes: usize) -> BesServer {
        BesServer {
            bes,
            max_message_bytes,
        }
    }
}

impl tonic::server::NamedService for BesServer {
    const NAME: &'static str = SERVICE;
}

struct Lifecycle(Arc<Bes>);

impl tonic::server::UnaryService<bes::PublishLifecycleEventRequest> for Lifecycle {
    type Response = ();
    type Future = BoxFuture<Response<()>, Status>;
    fn call(&mut self, request: Request<bes::PublishLifecycleEventRequest>) -> Self::Future {
        let bes = self.0.clone();
        Box::pin(async move {
            let who = auth::caller(&request).map_err(Status::from)?;
            bes.lifecycle(&who, request.into_inner()).await?;
            Ok(Response::new(()))
        })
    }
}

struct ToolStream(Arc<Bes>);

impl tonic::server::StreamingService<bes::PublishBuildToolEventStreamRequest> for ToolStream {
    type Response = bes::PublishBuildToolEventStreamResponse;
    type ResponseStream = AckStream;
    type Future = BoxFuture<Response<AckStream>, Status>;
    fn call(
        &mut self,
        request: Request<tonic::Streaming<bes::PublishBuildToolEventStreamRequest>>,
    ) -> Self::Future {
        let bes = self.0.clone();
        Box::pin(async move {
            let who = auth::caller(&request).map_err(Status::from)?;
            Ok(Response::new(bes.tool_stream(who, request.into_inner())))
        })
    }
}

impl Service<http::Request<tonic::body::Body>> for BesServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let bes = self.bes.clone();
        let max = Some(self.max_message_bytes);
        match req.uri().path().strip_prefix(&format!("/{SERVICE}/")) {
            Some("PublishLifecycleEvent") => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
                    .apply_max_message_size_config(max, None);
                Ok(grpc.unary(Lifecycle(bes), req).await)
            }),
            Some("PublishBuildToolEventStream") => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
                    .apply_max_message_size_config(max, None);
                Ok(grpc.streaming(ToolStream(bes), req).await)
            }),
            _ => Box::pin(async move {
                Ok(Status::unimplemented("no such method of PublishBuildEvent").into_http())
            }),
        }
    }
}

/// Milliseconds since the epoch of a protobuf timestamp (0 for none).
fn ms(t: &Option<bazel_remote_apis::google::protobuf::Timestamp>) -> u64 {
    t.as_ref().map_or(0, |t| {
        (t.seconds.max(0) as u64) * 1000 + (t.nanos.max(0) as u64) / 1_000_000
    })
}

/// What an action does, read off its command as Bazel's progress messages say it: `(kind,
/// subject)`, for example `("Compiling", "lib/a.cc")`, `("Linking", "lib/a_test")`,
/// `("Testing", "lib/a_test")`, else the tool's name and the first output.
pub fn describe(
    c: &bazel_remote_apis::build::bazel::remote::execution::v2::Command,
) -> (String, String) {
    // Outputs under `bazel-out/<config>/bin/` are named as Bazel names them, from the package.
    let strip = |p: &str| -> String {
        match p.find("/bin/") {
            Some(i) if p.starts_with("bazel-out/") => p[i + 5..].to_string(),
            _ => p.to_string(),
        }
    };
    let args = &c.arguments;
    let tool = args
        .first()
        .and_then(|a| a.rsplit('/').next())
        .unwrap_or_default();
    #[allow(deprecated)] // Bazel 4 fills output_files, later ones output_paths.
    let first_output = c
        .output_paths
        .first()
        .or(c.output_files.first())
        .map(|p| strip(p))
        .unwrap_or_default();
    if let Some(i) = args.iter().position(|a| a == "-c")
        && let Some(source) = args.get(i + 1)
    {
        return ("Compiling".into(), source.clone());
    }
    if tool == "test-setup.sh" {
        let test = args.get(1).map(|a| strip(a)).unwrap_or(first_output);
        return ("Testing".into(), test);
    }
    // `ar` makes static libraries: Bazel calls that linking too.
    let linker = [
        "gcc",
        "g++",
        "cc",
        "c++",
        "clang",
        "clang++",
        "ld",
        "ar",
        "cc_wrapper.sh",
    ];
    if linker.contains(&tool) {
        return ("Linking".into(), first_output);
    }
    (tool.to_string(), first_output)
}

/// The platform's record of an operation `invocation` had it run, from its final state.
pub fn remote_action(
    invocation: &str,
    owner: &str,
    mnemonic: &str,
    (kind, subject): &(String, String),
    op: &motorpool_messages::exec::Operation,
) -> Option<motorpool_messages::bes::RemoteAction> {
    use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
    let motorpool_messages::exec::OpState::Completed(outcome) = &op.state else {
        return None;
    };
    let result = outcome
        .result
        .as_deref()
        .and_then(|b| re::ActionResult::decode(b).ok())
        .unwrap_or_default();
    let m = result.execution_metadata.clone().unwrap_or_default();
    let output_bytes = result
        .output_files
        .iter()
        .filter_map(|f| f.digest.as_ref())
        .map(|d| d.size_bytes.max(0) as u64)
        .sum();
    Some(motorpool_messages::bes::RemoteAction {
        invocation_id: invocation.to_string(),
        owner: owner.to_string(),
        operation: op.id.clone(),
        action: format!("{}/{}", hex::encode(op.action.hash), op.action.size),
        mnemonic: if mnemonic.is_empty() {
            kind.clone()
        } else {
            mnemonic.to_string()
        },
        description: format!("{kind} {subject}").trim().to_string(),
        lane: op.lane.name().to_string(),
        pool: op.pool.to_string(),
        worker: m.worker.clone(),
        cached: outcome.cached,
        exit_code: result.exit_code,
        attempts: op.attempts,
        queued_ms: op.queued_ms,
        worker_start_ms: ms(&m.worker_start_timestamp),
        fetch_start_ms: ms(&m.input_fetch_start_timestamp),
        fetch_end_ms: ms(&m.input_fetch_completed_timestamp),
        exec_start_ms: ms(&m.execution_start_timestamp),
        exec_end_ms: ms(&m.execution_completed_timestamp),
        upload_start_ms: ms(&m.output_upload_start_timestamp),
        upload_end_ms: ms(&m.output_upload_completed_timestamp),
        done_ms: now_ms(),
        output_bytes,
        error: outcome
            .error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_default(),
    })
}

impl Bes {
    /// Notes that `owner`'s key made a cache or execution call for `invocation`: an invocation
    /// whose events came without a key becomes that key's.
    pub fn claim(&self, invocation: &str, owner: &str) {
        if owner.is_empty() || invocation.is_empty() {
            return;
        }
        if let Some(f) = self.following.lock().get_mut(invocation) {
            if f.owner.is_empty() {
                f.owner = owner.to_string();
                f.fold.summary.owner = f.owner.clone();
                f.dirty = true;
            }
            return;
        }
        let mut claims = self.claims.lock();
        if claims.contains_key(invocation) {
            return;
        }
        let now = now_ms();
        // Claims of invocations whose events never came are dropped after ten minutes.
        if claims.len() >= 10_000 {
            claims.retain(|_, (_, at)| now < *at + 600_000);
        }
        claims.insert(invocation.to_string(), (owner.to_string(), now));
    }

    /// Keeps the platform's record of one of an invocation's actions (in the background: the
    /// client's answer does not wait for it).
    pub fn record(self: &Arc<Self>, action: motorpool_messages::bes::RemoteAction) {
        self.claim(&action.invocation_id, &action.owner);
        let bes = self.clone();
        tokio::spawn(async move {
            let id = format!(
                "{}/action/{}/{}",
                action.invocation_id, action.operation, action.cached
            );
            if let Err(error) = bes
                .bus
                .enqueue_once(&subjects::bes::action(&action.invocation_id), &action, &id)
                .await
            {
                tracing::debug!(%error, "Cannot record an invocation's action");
            }
        });
    }
}
