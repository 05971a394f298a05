//! Telemetry for every Motorpool service: `tracing` logs (text or JSON), OpenTelemetry trace
//! export over OTLP/gRPC when an endpoint is configured, and a Prometheus recorder whose text is
//! served on `/metrics`. How a trace crosses the bus from service to service is
//! `motorpool_bus::trace`'s part.
//!
//! Metric names follow `motorpool_<subsystem>_<name>_<unit>[_total]` with low-cardinality labels.
//! Call [`init`] once per process, first thing in `main`.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use motorpool_config::{LogFormat, TelemetryConfig};
use opentelemetry::trace::TracerProvider as _;
use std::sync::OnceLock;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Keeps the exporters alive; flushes traces when dropped.
#[derive(Debug)]
pub struct Telemetry {
    prometheus: PrometheusHandle,
    tracer_provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// The Prometheus text exposition of every metric recorded in this process.
    pub fn render_metrics(&self) -> String {
        self.prometheus.render()
    }

    /// A handle that renders the metrics (cheap to clone).
    pub fn prometheus(&self) -> PrometheusHandle {
        self.prometheus.clone()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.tracer_provider.take() {
            let _ = p.shutdown();
        }
    }
}

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use (tests that run several services
/// in one process share it).
pub fn prometheus() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ])
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (a test harness); keep ours rendering.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Installs logging, optional OTLP trace export, and the Prometheus recorder.
///
/// The log filter applies to log lines only. Traces take every `info` span of the platform's
/// own crates whatever the log level, so turning logs down never cuts a trace in two.
pub fn init(service: &'static str, config: &TelemetryConfig) -> anyhow::Result<Telemetry> {
    let filter =
        EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(&config.log_filter))?;
    let fmt = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(true)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let endpoint = config
        .otlp_endpoint
        .clone()
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok());
    let tracer_provider = match endpoint {
        Some(endpoint) => Some(tracer_provider(
            service,
            &endpoint,
            config.trace_sample_ratio,
        )?),
        None => None,
    };
    let otel = tracer_provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service))
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("motorpool", tracing::Level::INFO),
            )
    });
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()?;
    Ok(Telemetry {
        prometheus: prometheus(),
        tracer_provider,
    })
}

/// Spans batched and sent over OTLP/gRPC to `endpoint`, as service `motorpool-<service>`.
fn tracer_provider(
    service: &str,
    endpoint: &str,
    ratio: Option<f64>,
) -> anyhow::Result<opentelemetry_sdk::trace::SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::trace::Sampler;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| anyhow::anyhow!("OTLP exporter for {endpoint}: {e}"))?;
    let mut builder = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(format!("motorpool-{service}"))
                .build(),
        );
    if let Some(ratio) = ratio {
        anyhow::ensure!(
            (0.0..=1.0).contains(&ratio),
            "telemetry.trace_sample_ratio must be between 0 and 1, not {ratio}"
        );
        builder = builder.with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))));
    }
    Ok(builder.build())
}

/// `GET /metrics`: Prometheus text exposition.
pub async fn metrics_handler() -> actix_web::HttpResponse {
    actix_web::HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(prometheus().render())
}

/// Runs `work` while serving `/metrics` and `/healthz` on `addr` (when set), for a service
/// without an HTTP API of its own; a port that cannot be bound fails before `work` starts.
pub async fn with_metrics<T>(
    addr: Option<std::net::SocketAddr>,
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let http = addr.map(serve_metrics).transpose()?;
    let out = work.await;
    if let Some(h) = http {
        h.stop(true).await;
    }
    out
}

/// Serves `/metrics` and `/healthz` on `addr` for a service without an HTTP API of its own.
pub fn serve_metrics(addr: std::net::SocketAddr) -> anyhow::Result<actix_web::dev::ServerHandle> {
    use actix_web::{App, HttpResponse, HttpServer, web};
    let server = HttpServer::new(|| {
        App::new()
            .route("/metrics", web::get().to(metrics_handler))
            .route(
                "/healthz",
                web::get().to(|| async { HttpResponse::Ok().body("ok\n") }),
            )
    })
    .workers(1)
    .disable_signals()
    .bind(addr)
    .map_err(|e| anyhow::anyhow!("bind HTTP on {addr}: {e}"))?
    .run();
    let handle = server.handle();
    tokio::spawn(server);
    Ok(handle)
}
