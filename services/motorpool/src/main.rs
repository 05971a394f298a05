//! `motorpool`: one binary for the whole platform.
//!
//! - `motorpool up` starts the stack on one machine (nats-server, CAS shards, gateway) as child
//!   processes, prints the URLs and the Bazel flags, and stops everything on Ctrl-C.
//! - `motorpool gateway ...`, `motorpool cas-shard ...` run one service each, to deploy and scale
//!   them separately.

mod up;

use clap::{Args, Parser, Subcommand};
use motorpool_config::{GatewayConfig, ServiceConfig, ShardConfig, TelemetryConfig};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "motorpool",
    version,
    about = "Motorpool: build platform, fleet images and auto-labeling on a NATS bus"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole stack on this machine (development, demos, CI).
    Up(up::UpArgs),
    /// Run the REAPI v2 gateway (Capabilities, CAS, ByteStream, ActionCache).
    Gateway(GatewayArgs),
    /// Run one CAS shard.
    CasShard(ShardArgs),
}

/// Flags shared by every service.
#[derive(Args, Serialize, Default)]
struct Common {
    /// TOML configuration file; flags and MOTORPOOL_* environment variables override it.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// NATS server URL.
    #[arg(long, env = "MOTORPOOL_NATS_URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    nats_url: Option<String>,
}

#[derive(Args, Serialize)]
struct GatewayArgs {
    #[command(flatten)]
    #[serde(flatten)]
    common: Common,
    /// gRPC listen address [default: 127.0.0.1:8980].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    grpc_addr: Option<SocketAddr>,
    /// HTTP listen address for health and metrics [default: 127.0.0.1:8080].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    http_addr: Option<SocketAddr>,
    /// Large-blob transport to shards: direct or nats [default: direct].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    blob_transport: Option<String>,
}

#[derive(Args, Serialize)]
struct ShardArgs {
    #[command(flatten)]
    #[serde(flatten)]
    common: Common,
    /// Shard id [default: stored in the data dir].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    shard_id: Option<String>,
    /// Data directory [default: motorpool-data/cas-0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    /// Capacity in bytes before LRU eviction [default: 10 GiB].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    capacity_bytes: Option<u64>,
    /// Data-stream listen address [default: 127.0.0.1:0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_addr: Option<SocketAddr>,
    /// HTTP address for /metrics and /healthz [default: none].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    http_addr: Option<SocketAddr>,
}

/// A token cancelled by SIGINT or SIGTERM.
fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        tracing::info!("Shutting down");
        t.cancel();
    });
    token
}

fn load<T: ServiceConfig>(common: &Common, flags: &impl Serialize) -> anyhow::Result<T> {
    Ok(motorpool_config::load::<T>(
        common.config.as_deref(),
        flags,
    )?)
}

fn telemetry(
    service: &'static str,
    config: &TelemetryConfig,
) -> anyhow::Result<motorpool_telemetry::Telemetry> {
    motorpool_telemetry::init(service, config)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Up(args) => up::run(args).await,
        Command::Gateway(args) => {
            let config: GatewayConfig = load(&args.common, &args)?;
            let _telemetry = telemetry("gateway", &config.telemetry)?;
            motorpool_gateway::run(config, shutdown_on_signals()).await
        }
        Command::CasShard(args) => {
            let config: ShardConfig = load(&args.common, &args)?;
            let _telemetry = telemetry("cas-shard", &config.telemetry)?;
            motorpool_cas_shard::run(config, shutdown_on_signals()).await
        }
    }
}
