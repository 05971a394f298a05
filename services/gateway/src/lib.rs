//! The REAPI v2 gateway: the gRPC front that Bazel talks to.
//!
//! Layout (one file per gRPC service, as the protocol is laid out):
//! - [`capabilities`] (in this file): what the server supports, truthfully.
//! - [`cas`]: ContentAddressableStorage (FindMissingBlobs, Batch*, GetTree); [`find_missing`]
//!   serves FindMissingBlobs straight off the wire.
//! - [`bytestream`]: ByteStream Read / Write / QueryWriteStatus; Read's chunks leave without a
//!   protobuf copy.
//! - [`ac`]: ActionCache with the completeness check; [`hits`] remembers results found complete
//!   until a shard announces that something they reference is gone.
//! - [`execution`]: Execution (Execute, WaitExecution) and google.longrunning Operations, over the
//!   operation records the scheduler works from.
//! - [`resource`]: validation of instance names, digests and resource names.
//! - [`recent`]: small blobs just written or read and action-cache misses just answered, kept
//!   briefly so that Execute and ByteStream reads save round trips.
//!
//! The shard registry, placement and the calls to shards live in `motorpool-cas-client`, which
//! workers share; its [`ApiError`] maps once to `tonic::Status`.
//!
//! The gateway keeps no blob state of its own: everything lives on CAS shards (what [`recent`]
//! and [`hits`] hold are copies, never the only one), so gateways can be added or restarted
//! freely.

pub mod ac;
pub mod auth;
pub mod bes;
pub mod bounds;
pub mod bytestream;
pub mod cas;
pub mod execution;
pub mod find_missing;
pub mod hits;
pub mod invocations;
pub mod metric_names;
pub mod recent;
pub mod resource;
pub mod tls;
pub mod ui;
mod wire;

use anyhow::Context;
use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::build::bazel::semver::SemVer;
use bazel_remote_apis::google::longrunning::operations_server::OperationsServer;
use futures::StreamExt;
use motorpool_bus::Bus;
pub use motorpool_cas_client::ApiError;
use motorpool_cas_client::Shards;
use motorpool_config::GatewayConfig;
use re::action_cache_server::ActionCacheServer;
use re::capabilities_server::{Capabilities, CapabilitiesServer};
use re::execution_server::ExecutionServer;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

/// The gateway's shared state; cloned into every gRPC service.
#[derive(Clone)]
pub struct Gateway {
    pub(crate) config: Arc<GatewayConfig>,
    pub(crate) shards: Shards,
    /// The operation records; `None` when remote execution is switched off.
    pub(crate) operations: Option<execution::Operations>,
    pub(crate) recent: Arc<recent::Recent>,
    pub(crate) hits: Arc<hits::Hits>,
    /// The Build Event Service; `None` when switched off.
    pub(crate) bes: Option<Arc<bes::Bes>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

/// Runs a handler in its span (where a trace starts: what it asks of other services over the bus
/// joins it), counts it by method and status code, and times it.
pub(crate) async fn observe<T>(
    method: &'static str,
    fut: impl Future<Output = Result<T, ApiError>>,
) -> Result<Response<T>, Status> {
    let start = Instant::now();
    let span = tracing::info_span!(
        "gateway.rpc",
        otel.name = method,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.method = method,
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    let result = tracing::Instrument::instrument(fut, span.clone())
        .await
        .map_err(Status::from);
    span.record(
        "rpc.grpc.status_code",
        result.as_ref().map_or_else(|s| s.code() as i64, |_| 0),
    );
    if result.is_err() {
        span.record("otel.status_code", "ERROR");
    }
    let code = match &result {
        Ok(_) => "OK".to_string(),
        Err(s) => format!("{:?}", s.code()),
    };
    if let Err(s) = &result {
        tracing::debug!(method, code = %code, message = s.message(), "Request failed");
    }
    metrics::counter!(crate::metric_names::GATEWAY_REQUESTS_TOTAL, "method" => method, "code" => code)
        .increment(1);
    metrics::histogram!(crate::metric_names::GATEWAY_REQUEST_DURATION_SECONDS, "method" => method)
        .record(start.elapsed().as_secs_f64());
    result.map(Response::new)
}

/// How a method served below the generated code answers a call: the gateway, the HTTP/2
/// request and the largest message accepted.
type RawMethod = fn(
    Gateway,
    http::Request<tonic::body::Body>,
    usize,
) -> BoxFuture<http::Response<tonic::body::Body>, Infallible>;

/// A gRPC service some of whose methods the gateway serves from the wire itself (where the
/// generated code's copies or allocations cost too much); every other method goes to the
/// generated server `G`.
#[derive(Clone)]
pub struct RawMethods<G> {
    generated: G,
    /// Each method's path and how it is served.
    methods: &'static [(&'static str, RawMethod)],
    gateway: Gateway,
    max_message_bytes: usize,
}

impl<G: NamedService> NamedService for RawMethods<G> {
    const NAME: &'static str = G::NAME;
}

impl<G> Service<http::Request<tonic::body::Body>> for RawMethods<G>
where
    G: Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
            Future = BoxFuture<http::Response<tonic::body::Body>, Infallible>,
        >,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let path = req.uri().path();
        match self.methods.iter().find(|(p, _)| *p == path) {
            Some((_, serve)) => serve(self.gateway.clone(), req, self.max_message_bytes),
            None => self.generated.call(req),
        }
    }
}

#[tonic::async_trait]
impl Capabilities for Gateway {
    async fn get_capabilities(
        &self,
        request: Request<re::GetCapabilitiesRequest>,
    ) -> Result<Response<re::ServerCapabilities>, Status> {
        let who = auth::caller(&request);
        let req = request.into_inner();
        observe("GetCapabilities", async move {
            who?.check_instance(&req.instance_name)?;
            resource::check_instance(&req.instance_name, &self.config.instance_names)?;
            Ok(self.capabilities())
        })
        .await
    }
}

impl Gateway {
    fn capabilities(&self) -> re::ServerCapabilities {
        use re::digest_function::Value as F;
        re::ServerCapabilities {
            cache_capabilities: Some(re::CacheCapabilities {
                digest_functions: vec![F::Sha256 as i32, F::Blake3 as i32],
                action_cache_update_capabilities: Some(re::ActionCacheUpdateCapabilities {
                    update_enabled: true,
                }),
                cache_priority_capabilities: None,
                max_batch_total_size_bytes: self.config.max_batch_total_bytes as i64,
                symlink_absolute_path_strategy: re::symlink_absolute_path_strategy::Value::Allowed
                    as i32,
                supported_compressors: vec![],
                supported_batch_update_compressors: vec![],
                max_cas_blob_size_bytes: 0,
                split_blob_support: false,
                ..Default::default()
            }),
            execution_capabilities: self.operations.as_ref().map(|_| re::ExecutionCapabilities {
                digest_function: F::Sha256 as i32,
                exec_enabled: true,
                execution_priority_capabilities: Some(re::PriorityCapabilities {
                    priorities: vec![re::priority_capabilities::PriorityRange {
                        min_priority: -1000,
                        max_priority: 1000,
                    }],
                }),
                supported_node_properties: Vec::new(),
                digest_functions: vec![F::Sha256 as i32, F::Blake3 as i32],
            }),
            deprecated_api_version: None,
            low_api_version: Some(SemVer {
                major: 2,
                minor: 0,
                patch: 0,
                prerelease: String::new(),
            }),
            high_api_version: Some(SemVer {
                major: 2,
                minor: 3,
                patch: 0,
                prerelease: String::new(),
            }),
        }
    }
}

/// A started gateway: its bound addresses.
#[derive(Debug)]
pub struct Started {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    grpc: tokio::task::JoinHandle<()>,
    http: actix_web::dev::ServerHandle,
}

impl Started {
    /// Waits for the servers to finish after shutdown fired.
    pub async fn join(self) {
        self.http.stop(true).await;
        let _ = self.grpc.await;
    }
}

/// Binds the gRPC and HTTP listeners and serves until `shutdown` fires.
pub async fn start(config: GatewayConfig, shutdown: CancellationToken) -> anyhow::Result<Started> {
    let bus = Bus::connect_service(
        &config.nats_url,
        "gateway",
        config.nats_nkey_file.as_deref(),
        config.nats_tls_ca_file.as_deref(),
        Duration::from_millis(config.bus_timeout_ms),
    )
    .await?;
    let shards = Shards::watch(
        bus.clone(),
        Duration::from_millis(config.bus_timeout_ms),
        Duration::from_millis(config.shard_timeout_ms),
        config.blob_transport,
    )
    .await?
    .with_data_key(
        motorpool_messages::cas::load_data_key(config.data_key_file.as_deref())
            .map_err(anyhow::Error::msg)?,
    )
    .with_replicas(config.replicas);
    let operations = if config.execution {
        Some(execution::Operations::open(bus.clone()).await?)
    } else {
        None
    };
    let hits = hits::Hits::new(
        config.hit_memory_bytes,
        Duration::from_secs(config.hit_memory_max_age_s),
        Duration::from_millis(config.shard_timeout_ms),
    )
    .listen(&bus, shutdown.clone())
    .await?;
    let bes = if config.bes.enabled {
        Some(bes::Bes::open(bus.clone(), config.bes.clone()).await?)
    } else {
        None
    };
    let gateway = Gateway {
        config: Arc::new(config.clone()),
        shards: shards.clone(),
        operations,
        recent: Arc::new(recent::Recent::with_budget(config.blob_memory_bytes)),
        hits,
        bes: bes.clone(),
    };
    let auth = auth::Auth::open(&config.auth)?;
    auth.allow_keyless_build_events(config.bes.enabled && config.bes.keyless);
    let http_auth = auth.clone();
    let reload = auth.clone();
    let stop_reload = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => reload.reload_if_changed(),
                _ = stop_reload.cancelled() => break,
            }
        }
    });
    let max = config.max_grpc_message_bytes;
    let listener = tokio::net::TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("bind gRPC on {}", config.grpc_addr))?;
    let grpc_addr = listener.local_addr()?;
    // Small replies must not wait for Nagle's algorithm (40 ms stalls against delayed ACKs).
    let b = &config.bounds;
    let connections = bounds::Connections::new(b.max_connections);
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)))
        .filter_map(move |accepted| {
            let admitted = accepted.map(|s| connections.admit(s)).transpose();
            std::future::ready(admitted)
        });
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls::grpc(&config.tls)? {
        server = server.tls_config(tls).context("gateway TLS")?;
    }
    let router = server
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(8 * 1024 * 1024))
        .initial_connection_window_size(Some(16 * 1024 * 1024))
        .max_frame_size(Some(1024 * 1024))
        .max_concurrent_streams(Some(b.max_concurrent_streams))
        .http2_keepalive_interval(Some(Duration::from_millis(b.keepalive_interval_ms.max(1))))
        .http2_keepalive_timeout(Some(Duration::from_millis(b.keepalive_timeout_ms.max(1))))
        .layer(bounds::BoundsLayer {
            idle: Duration::from_millis(b.idle_timeout_ms.max(1)),
        })
        .layer(auth::AuthLayer(auth))
        .add_service(CapabilitiesServer::new(gateway.clone()).max_decoding_message_size(max))
        .add_service(find_missing::cas_service(gateway.clone(), max))
        .add_service(bytestream::byte_stream_service(gateway.clone(), max))
        .add_service(ActionCacheServer::new(gateway.clone()).max_decoding_message_size(max))
        .add_service(ExecutionServer::new(gateway.clone()).max_decoding_message_size(max))
        .add_service(OperationsServer::new(gateway.clone()).max_decoding_message_size(max))
        .add_optional_service(bes.clone().map(|b| bes::BesServer::new(b, max)));
    let stop = shutdown.clone();
    let grpc = tokio::spawn(async move {
        if let Err(error) = router
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
        {
            tracing::error!(%error, "gRPC server failed");
        }
    });
    let http_tls = tls::http(&config.tls)?;
    let ui = ui::Ui::new(
        bes,
        http_auth,
        shards.clone(),
        bus.clone(),
        config.labels_dir.clone(),
        shutdown.clone(),
    )
    .await?;
    let (http, http_addr) = http_server(config.http_addr, http_tls, shards, bus, ui)?;
    tracing::info!(%grpc_addr, %http_addr, "Gateway is serving");
    Ok(Started {
        grpc_addr,
        http_addr,
        grpc,
        http,
    })
}

fn http_server(
    addr: SocketAddr,
    tls: Option<rustls::ServerConfig>,
    shards: Shards,
    bus: Bus,
    ui: ui::Ui,
) -> anyhow::Result<(actix_web::dev::ServerHandle, SocketAddr)> {
    use actix_web::{App, HttpResponse, HttpServer, web};
    let data = web::Data::new(shards);
    let bus = web::Data::new(bus);
    let ui = web::Data::new(ui);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(bus.clone())
            .app_data(ui.clone())
            .configure(ui::routes)
            .route("/api/v1/queues", web::get().to(queues))
            .route("/metrics", web::get().to(metrics))
            .route(
                "/healthz",
                web::get().to(|| async { HttpResponse::Ok().body("ok\n") }),
            )
            .route("/readyz", web::get().to(readyz))
            .route("/api/v1/shards", web::get().to(shard_list))
    })
    .workers(2)
    .disable_signals();
    let server = match tls {
        Some(tls) => server.bind_rustls_0_23(addr, tls),
        None => server.bind(addr),
    }
    .with_context(|| format!("bind HTTP on {addr}"))?;
    let bound = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    tokio::spawn(server);
    Ok((handle, bound))
}

async fn metrics(
    shards: actix_web::web::Data<Shards>,
    bus: actix_web::web::Data<Bus>,
) -> actix_web::HttpResponse {
    let _ = queue_stats(&bus).await;
    let live = shards.live();
    metrics::gauge!(crate::metric_names::GATEWAY_LIVE_SHARDS).set(live.len() as f64);
    for s in &live {
        metrics::gauge!(crate::metric_names::CAS_USED_BYTES, "shard" => s.shard_id.clone())
            .set(s.used_bytes as f64);
        metrics::gauge!(crate::metric_names::CAS_BLOBS, "shard" => s.shard_id.clone())
            .set(s.blob_count as f64);
    }
    motorpool_telemetry::metrics_handler().await
}

async fn readyz(shards: actix_web::web::Data<Shards>) -> actix_web::HttpResponse {
    let n = shards.live().len();
    if n == 0 {
        actix_web::HttpResponse::ServiceUnavailable().body("no live CAS shard\n")
    } else {
        actix_web::HttpResponse::Ok().body(format!("ready: {n} live CAS shard(s)\n"))
    }
}

async fn shard_list(shards: actix_web::web::Data<Shards>) -> actix_web::HttpResponse {
    let body: Vec<serde_json::Value> = shards
        .live()
        .iter()
        .map(|s| {
            serde_json::json!({
                "shard_id": s.shard_id,
                "data_addr": s.data_addr,
                "used_bytes": s.used_bytes,
                "capacity_bytes": s.capacity_bytes,
                "blobs": s.blob_count,
            })
        })
        .collect();
    actix_web::HttpResponse::Ok().json(body)
}

/// The scheduler's queues, asked over the bus; also refreshes the queue gauges on `/metrics`.
pub(crate) async fn queue_stats(bus: &Bus) -> Result<motorpool_messages::exec::QueueStats, String> {
    let stats = bus
        .request_with_timeout(
            &motorpool_bus::subjects::exec::queue_stats(),
            &motorpool_messages::exec::GetQueueStats,
            Duration::from_secs(2),
        )
        .await
        .map_err(|e| format!("no answer from a scheduler: {e}"))?;
    for (pool, lane, depth) in &stats.depth {
        metrics::gauge!(crate::metric_names::QUEUE_DEPTH, "pool" => pool.name(), "lane" => lane.name())
            .set(*depth as f64);
    }
    metrics::gauge!(crate::metric_names::EXECUTING).set(stats.executing as f64);
    metrics::gauge!(crate::metric_names::WORKERS).set(stats.workers as f64);
    Ok(stats)
}

async fn queues(bus: actix_web::web::Data<Bus>) -> actix_web::HttpResponse {
    match queue_stats(&bus).await {
        Ok(s) => actix_web::HttpResponse::Ok().json(serde_json::json!({
            "scheduler": {"active": s.scheduler, "term": s.term},
            "workers": s.workers,
            "executing": s.executing,
            "free_slots": s.free_slots,
            "queues": s.depth.iter().map(|(pool, lane, depth)| serde_json::json!({
                "pool": pool.name(), "lane": lane.name(), "depth": depth,
            })).collect::<Vec<_>>(),
        })),
        Err(e) => actix_web::HttpResponse::ServiceUnavailable().body(format!("{e}\n")),
    }
}

/// Runs the gateway until `shutdown` fires.
pub async fn run(config: GatewayConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let started = start(config, shutdown.clone()).await?;
    shutdown.cancelled().await;
    started.join().await;
    Ok(())
}
