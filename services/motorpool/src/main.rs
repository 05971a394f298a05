//! `motorpool`: one binary for the whole platform.
//!
//! - `motorpool up` starts the stack on one machine (nats-server, CAS shards, scheduler, workers,
//!   gateway) as child processes, prints the URLs and the Bazel flags, and stops everything on
//!   Ctrl-C.
//! - `motorpool gateway ...`, `motorpool cas-shard ...`, `motorpool scheduler ...`,
//!   `motorpool worker ...`, `motorpool reindexer ...` run one service each, to deploy and scale
//!   them separately.
//! - `motorpool mapping|prelabel|annotate ...` run one stage of the BevSlots labeling pipeline;
//!   `motorpool label run|synth|bench` label a clip, write a synthetic one, measure.
//! - `motorpool webhook ...` runs the CI front door (forge events in, CI jobs out);
//!   `motorpool runner ...` runs CI jobs in warm workspaces.
//! - `motorpool image-builder ...`, `motorpool disk-burner ...` run the fleet actors;
//!   `motorpool image build|list` build fleet images from git + Dockerfile;
//!   `motorpool drives list|images|menu|burn` look at boot drives and burn images onto them.

mod drives;
mod image;
mod keys;
mod label;
mod prometheus;
mod tls;
mod up;

use clap::{Args, Parser, Subcommand};
use motorpool_config::{
    AlertRelayConfig, AlertSink, AlertSinkKind, FleetConfig, GatewayConfig, LabelConfig,
    ReindexerConfig, RunnerConfig, SchedulerConfig, ServiceConfig, ShardConfig, TelemetryConfig,
    WebhookConfig, WorkerConfig,
};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc's malloc: the services allocate and free megabyte buffers (request
/// bodies, batches, chunks) all the time, and glibc hands such memory back to the kernel and
/// faults it in again, zeroed, on the next request — a tenth of a CAS shard's CPU under
/// BatchUpdateBlobs. mimalloc keeps it for reuse.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Run the scheduler (lane queues, dispatch, retries, rate limits).
    Scheduler(SchedulerArgs),
    /// Run one worker (execution pipeline + CAS shard).
    ///
    /// In a deployment, set at least: --nats-url and --nats-nkey-file (a bus user with the role
    /// `worker:<id>`), --worker-id (that id, unique among live workers: a second worker with it
    /// refuses to start), --data-key-file, --data-dir (this worker's only: a second worker given
    /// it refuses to start; relative paths are taken from the current directory), and, when
    /// other hosts must reach its CAS shard, --data-addr 0.0.0.0:PORT with --advertise-addr
    /// HOST:PORT (the address they dial). --platform says what it offers (pool=gpu, cores=16),
    /// --http-addr serves its /metrics. The sandbox needs root and bubblewrap. Every setting
    /// also reads from --config (TOML) and MOTORPOOL_WORKER_* variables.
    Worker(WorkerArgs),
    /// Run the reindexer (drops dead registry entries, re-replicates blobs).
    Reindexer(ReindexerArgs),
    /// Run the mapping stage of BevSlots labeling (local map, BEV raster).
    Mapping(LabelArgs),
    /// Run the prelabel stage of BevSlots labeling (detection, temporal fusion).
    Prelabel(LabelArgs),
    /// Run the annotate stage of BevSlots labeling (projection, AVM filter, label files).
    Annotate(LabelArgs),
    /// Label clips, make synthetic ones, measure the pipeline.
    #[command(subcommand)]
    Label(label::LabelCommand),
    /// Run the image builder (build jobs from the lane queues).
    ImageBuilder(FleetArgs),
    /// Run the disk burner (watches the bays, burns the channel's newest images).
    DiskBurner(FleetArgs),
    /// Fleet images: build them from a git repository with a Dockerfile, list them.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Boot drives: list them, their images and menus; burn images onto them.
    #[command(subcommand)]
    Drives(drives::DrivesCommand),
    /// Run the webhook service (GitLab and GitHub events become CI jobs on the lane queues).
    Webhook(WebhookArgs),
    /// Run a CI runner (CI jobs in lane order, in warm workspaces, built on the platform).
    Runner(RunnerArgs),
    /// Run the alert relay (the platform's alerts to an Alertmanager and chat webhooks).
    ///
    /// Sinks come from the configuration file's [[sinks]] entries (kind = "alertmanager",
    /// "slack" or "feishu"; url; optional kinds = [...]) and from the flags below. Its bus user
    /// has the role `alert-relay`.
    AlertRelay(AlertRelayArgs),
    /// The gateway's API keys: add (prints the key once), list, remove.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Sweep the object store behind the CAS shards: keep what was written or used in the last
    /// --keep-days days and every blob a kept action result references; remove the rest.
    ///
    /// Prints what it kept and removed per instance. Run it daily (a cron job, a Kubernetes
    /// CronJob); --dry-run only reports. Credentials come from the environment as for the shards.
    SweepObjectStore(SweepArgs),
}

#[derive(Args)]
struct SweepArgs {
    /// The object store: as the shards' --object-store-url.
    #[arg(long)]
    object_store_url: String,
    /// Keep what was written or used within this many days.
    #[arg(long, default_value_t = 30)]
    keep_days: u64,
    /// Report only; remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// A client option (repeat): `endpoint=https://s3.internal:9000`, `region=eu-central-1`.
    #[arg(long = "option", value_parser = parse_option)]
    options: Vec<(String, String)>,
    /// Also write the usage per instance as Prometheus text to this file (for node_exporter's
    /// textfile collector): `motorpool_object_store_{blobs,bytes}{instance}` as kept, and what
    /// this sweep removed.
    #[arg(long)]
    textfile: Option<PathBuf>,
}

/// The sweep's report as Prometheus text.
fn sweep_metrics(report: &motorpool_cas_shard::tier::SweepReport, dry_run: bool) -> String {
    let mut out = String::new();
    let series = [
        (
            "motorpool_object_store_blobs",
            "Blobs the object store keeps, per instance, after the last sweep.",
        ),
        (
            "motorpool_object_store_bytes",
            "Bytes of blobs the object store keeps, per instance, after the last sweep.",
        ),
        (
            "motorpool_object_store_action_results",
            "Action results the object store keeps, per instance.",
        ),
        (
            "motorpool_object_store_swept_blobs",
            "Blobs the last sweep removed (or would remove, in a dry run).",
        ),
        (
            "motorpool_object_store_swept_bytes",
            "Bytes the last sweep removed (or would remove, in a dry run).",
        ),
    ];
    for (i, (name, help)) in series.iter().enumerate() {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
        for (instance, u) in &report.instances {
            let v = [
                u.blobs_kept,
                u.bytes_kept,
                u.entries_kept,
                u.blobs_removed,
                u.bytes_removed,
            ][i];
            let instance = instance.replace('\\', "\\\\").replace('"', "\\\"");
            out.push_str(&format!("{name}{{instance_name=\"{instance}\"}} {v}\n"));
        }
    }
    out.push_str(&format!(
        "# HELP motorpool_object_store_last_sweep_timestamp_seconds When the last sweep ended.\n\
         # TYPE motorpool_object_store_last_sweep_timestamp_seconds gauge\n\
         motorpool_object_store_last_sweep_timestamp_seconds{{dry_run=\"{dry_run}\"}} {}\n",
        motorpool_messages::now_ms() / 1000
    ));
    out
}

fn parse_option(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

#[derive(Args, Serialize)]
struct FleetArgs {
    #[command(flatten)]
    #[serde(flatten)]
    common: Common,
    /// Image store [default: motorpool-data/images].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    store_dir: Option<PathBuf>,
    /// Where the burner finds drives: `bays` (the bays directory) or `udev` (the host's block
    /// devices, hot-plug by netlink uevents) [default: bays].
    #[arg(long, value_parser = ["bays", "udev"])]
    #[serde(skip_serializing_if = "Option::is_none")]
    drive_source: Option<String>,
    /// Drive bays directory (burner) [default: motorpool-data/bays].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    bays_dir: Option<PathBuf>,
    /// Kernel names of the disks the `udev` source considers, `*` as wildcard; repeat or
    /// comma-separate [default: sd*,nvme*,vd*,xvd*,mmcblk*].
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    udev_match: Option<Vec<String>>,
    /// ledmon's `ledctl`, to show drive states on the chassis LEDs [default: from PATH].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    ledctl: Option<PathBuf>,
    /// Channel whose images the burner puts on drives [default: stable].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<String>,
    /// Newest images per drive [default: 3].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    images_per_drive: Option<usize>,
    /// Images kept per channel by the builder [default: 5].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    keep: Option<usize>,
    /// The burner's name in drive states [default: the host name].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    burner_id: Option<String>,
    /// The builder's manifest signing key (`motorpool image keygen`) [default: none, unsigned].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    signing_key_file: Option<PathBuf>,
    /// The burner's trusted public keys: only images they signed are burned [default: none,
    /// integrity checked only].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    trusted_keys_file: Option<PathBuf>,
    /// The burner fetches its channel's images from this gateway (grpc:// or grpcs://)
    /// [default: none].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    depot_url: Option<String>,
    /// The API key file for --depot-url.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    depot_api_key_file: Option<PathBuf>,
    /// HTTP address for /metrics and /healthz [default: none].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    http_addr: Option<SocketAddr>,
}

#[derive(Args, Serialize)]
struct LabelArgs {
    #[command(flatten)]
    #[serde(flatten)]
    common: Common,
    /// Label store root [default: motorpool-data/labels].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    /// Where this stage sees the clips that `label run --clips-root` names relative to that
    /// root (a container's mount, a shared volume) [default: none].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    clips_dir: Option<PathBuf>,
    /// Clips worked on at once [default: 1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    concurrency: Option<usize>,
    /// Name of this instance in clip statuses [default: host-stage-pid].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    worker_id: Option<String>,
    /// HTTP address for /metrics and /healthz [default: none].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    http_addr: Option<SocketAddr>,
}

#[derive(Args, Serialize)]
struct ReindexerArgs {
    #[command(flatten)]
    #[serde(flatten)]
    common: Common,
    /// The deployment's data key file (shards serve their data stream only to its holders)
    /// [default: none, an open data stream].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_key_file: Option<PathBuf>,
    /// Milliseconds between passes [default: 10000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    period_ms: Option<u64>,
    /// Milliseconds without a heartbeat before a member is dead [default: 60000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    dead_after_ms: Option<u64>,
    /// HTTP address for /metrics and /healthz [default: none].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    http_addr: Option<SocketAddr>,
}

#[derive(Args, Serialize)]
struct WebhookArgs {
    #[command(flatten)]
    #[serde(flatten)]
    common: Common,
    /// HTTP listen address; forges post to `/hooks/<project>` [default: 127.0.0.1:8090].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    http_addr: Option<SocketAddr>,
    /// The projects file: each project's forge, secret, jobs and lane rules (re-read when it
    /// changes) [default: none, every event gets 404].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    projects_file: Option<PathBuf>,
    /// Largest event body accepted, in bytes [default: 4194304].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_body_bytes: Option<usize>,
}

#[derive(Args, Serialize)]
struct RunnerArgs {
    #[command(flatten)]
    #[serde(flatten)]
    common: Common,
    /// This runner's id [default: the host name].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    runner_id: Option<String>,
    /// The workspace pool's directory [default: motorpool-data/runner/workspaces].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    workspaces_dir: Option<PathBuf>,
    /// Workspaces in the pool at most [default: 4].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pool_size: Option<usize>,
    /// The platform's gRPC endpoint for Bazel's `--remote_executor` [default:
    /// grpc://127.0.0.1:8980].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_executor: Option<String>,
    /// CA for a `grpcs://` endpoint (Bazel's `--tls_certificate`).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_certificate: Option<PathBuf>,
    /// API key file for trusted jobs (may write the action cache).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    trusted_key_file: Option<PathBuf>,
    /// API key file for merge-request jobs (must not write the action cache).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    untrusted_key_file: Option<PathBuf>,
    /// HTTP address: /api/v1/workspaces, job logs, /metrics [default: 127.0.0.1:8091].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    http_addr: Option<SocketAddr>,
}

#[derive(Args, Serialize)]
struct AlertRelayArgs {
    #[command(flatten)]
    #[serde(flatten)]
    common: Common,
    /// An Alertmanager's base URL: alerts are posted to its /api/v2/alerts (repeatable).
    #[arg(long)]
    #[serde(skip)]
    alertmanager_url: Vec<String>,
    /// A Slack incoming webhook's URL (repeatable).
    #[arg(long)]
    #[serde(skip)]
    slack_webhook_url: Vec<String>,
    /// A Feishu custom bot's webhook URL (repeatable).
    #[arg(long)]
    #[serde(skip)]
    feishu_webhook_url: Vec<String>,
    /// Seconds within which the same alert reaches each sink once [default: 600].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    dedupe_s: Option<u64>,
    /// Alerts a chat sink gets per minute; the rest are counted and reported [default: 10].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    chat_per_minute: Option<u32>,
    /// HTTP address for /metrics and /healthz [default: none].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    http_addr: Option<SocketAddr>,
}

#[derive(Args, Serialize)]
struct SchedulerArgs {
    #[command(flatten)]
    #[serde(flatten)]
    common: Common,
    /// Milliseconds without a heartbeat before a worker is lost [default: 5000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    worker_timeout_ms: Option<u64>,
    /// Attempts per operation on infrastructure failures [default: 3].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_attempts: Option<u32>,
    /// Milliseconds of waiting that raise a job one lane [default: 10000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    aging_step_ms: Option<u64>,
    /// HTTP address for /metrics and /healthz [default: none].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    http_addr: Option<SocketAddr>,
    /// This scheduler's name, unique among the schedulers sharing a bus: one is active, the
    /// others stand by [default: scheduler@<host>].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    scheduler_id: Option<String>,
    /// Milliseconds without a lease renewal before a standby takes over [default: 3000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_ms: Option<u64>,
}

#[derive(Args, Serialize)]
struct WorkerArgs {
    #[command(flatten)]
    #[serde(flatten)]
    common: Common,
    #[command(flatten)]
    #[serde(skip)]
    tier: TierArgs,
    /// The deployment's data key file (shards serve their data stream only to its holders)
    /// [default: none, an open data stream].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_key_file: Option<PathBuf>,
    /// Worker id (also its CAS shard id), unique among live workers [default: stored in the
    /// data dir, made from the host name at first start].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    worker_id: Option<String>,
    /// Data directory, one worker's only [default: motorpool-data/<worker id>, or
    /// motorpool-data/worker-0 without --worker-id].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    /// Actions run at once [default: number of CPUs].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    slots: Option<u32>,
    /// Platform properties offered, as NAME=VALUE (repeatable) [default: OSFamily=linux].
    #[arg(long = "platform", value_parser = parse_property)]
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "as_map")]
    platform: Vec<(String, String)>,
    /// Capacity of the worker's CAS shard in bytes [default: 10 GiB].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    cas_capacity_bytes: Option<u64>,
    /// Share of the CAS shard's capacity its action cache may take, above 0, at most 1
    /// [default: 0.1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    cas_action_cache_share: Option<f64>,
    /// Listen address of the worker's CAS data stream [default: 127.0.0.1:0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_addr: Option<SocketAddr>,
    /// The address other hosts dial for the data stream, HOST:PORT [default: the bound
    /// address, which only this host can reach when it is 127.0.0.1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    advertise_addr: Option<String>,
    /// HTTP address for /metrics and /healthz [default: none].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    http_addr: Option<SocketAddr>,
    /// The action sandbox: `strict` (needs root and bubblewrap) or `off` (actions run as the
    /// worker's user, with its rights: only for pools whose every action is trusted)
    /// [default: strict].
    #[arg(long, value_parser = ["strict", "off"])]
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "as_sandbox_mode"
    )]
    sandbox: Option<String>,
}

fn as_sandbox_mode<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(v.iter().map(|m| ("mode", m)))
}

/// A command whose output is piped into `head` ends quietly when the pipe closes, as Unix
/// tools do, instead of panicking in `println!`. Only for one-shot commands: services keep
/// Rust's default (SIGPIPE ignored), so a closed socket is an error, not a death.
pub(crate) fn quiet_broken_pipe() {
    // SAFETY: restores the default disposition of one signal, before any output is written and
    // with no handler of ours installed for it.
    #[allow(unsafe_code)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))
}

fn as_map<S: serde::Serializer>(v: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(v.iter().map(|(k, v)| (k, v)))
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
    /// The nkey seed file to connect to NATS with (`motorpool keys bus add`) [default: none,
    /// for a bus that lets anyone in].
    #[arg(long, env = "MOTORPOOL_NATS_NKEY_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    nats_nkey_file: Option<PathBuf>,
    /// PEM CA of a NATS that speaks TLS [default: plain].
    #[arg(long, env = "MOTORPOOL_NATS_TLS_CA_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    nats_tls_ca_file: Option<PathBuf>,
}

#[derive(Args, Serialize)]
struct GatewayArgs {
    #[command(flatten)]
    #[serde(flatten)]
    common: Common,
    /// The deployment's data key file (shards serve their data stream only to its holders)
    /// [default: none, an open data stream].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_key_file: Option<PathBuf>,
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
    #[command(flatten)]
    #[serde(skip_serializing_if = "AuthFlags::is_empty")]
    auth: AuthFlags,
    #[command(flatten)]
    #[serde(skip_serializing_if = "TlsFlags::is_empty")]
    tls: TlsFlags,
}

/// The gateway's `auth` settings as flags.
#[derive(Args, Serialize)]
struct AuthFlags {
    /// API keys file (`motorpool keys add` writes it) [default: none].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    keys_file: Option<PathBuf>,
    /// What a caller without a key may do: none, read or all [default: none].
    #[arg(long, value_parser = ["none", "read", "all"])]
    #[serde(skip_serializing_if = "Option::is_none")]
    anonymous: Option<String>,
}

#[derive(Args, Serialize)]
struct TlsFlags {
    /// PEM certificate chain: the gRPC port speaks TLS only (`grpcs://`) [default: plain].
    #[arg(long = "tls-cert-file")]
    #[serde(rename = "cert_file", skip_serializing_if = "Option::is_none")]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-cert-file.
    #[arg(long = "tls-key-file")]
    #[serde(rename = "key_file", skip_serializing_if = "Option::is_none")]
    tls_key_file: Option<PathBuf>,
    /// PEM CA: only clients with a certificate it signed get in (mutual TLS).
    #[arg(long = "tls-client-ca-file")]
    #[serde(rename = "client_ca_file", skip_serializing_if = "Option::is_none")]
    tls_client_ca_file: Option<PathBuf>,
}

impl TlsFlags {
    fn is_empty(&self) -> bool {
        self.tls_cert_file.is_none()
            && self.tls_key_file.is_none()
            && self.tls_client_ca_file.is_none()
    }
}

impl AuthFlags {
    fn is_empty(&self) -> bool {
        self.keys_file.is_none() && self.anonymous.is_none()
    }
}

/// The object store behind a CAS shard (a worker's too).
#[derive(Args, Default)]
struct TierArgs {
    /// An object store behind the shard: `s3://bucket/prefix` (S3 or an S3-compatible server:
    /// set AWS_ENDPOINT), `gs://bucket/prefix`, `az://container/prefix` or `file:///path`.
    /// Credentials come from the environment (AWS_ACCESS_KEY_ID, ...) [default: none].
    #[arg(long)]
    object_store_url: Option<String>,
    /// When writes reach the object store: `through` (before they are acknowledged) or
    /// `behind` (soon after) [default: through].
    #[arg(long, value_parser = ["through", "behind"])]
    object_store_write: Option<String>,
}

impl TierArgs {
    /// Flags over what the file and environment said.
    fn apply(&self, to: &mut Option<motorpool_config::ObjectStoreConfig>) {
        if let Some(url) = &self.object_store_url {
            to.get_or_insert_with(Default::default).url = url.clone();
        }
        if let (Some(write), Some(tier)) = (&self.object_store_write, to.as_mut()) {
            tier.write = if write == "behind" {
                motorpool_config::TierWrite::Behind
            } else {
                motorpool_config::TierWrite::Through
            };
        }
    }
}

#[derive(Args, Serialize)]
struct ShardArgs {
    #[command(flatten)]
    #[serde(flatten)]
    common: Common,
    #[command(flatten)]
    #[serde(skip)]
    tier: TierArgs,
    /// The deployment's data key file (shards serve their data stream only to its holders)
    /// [default: none, an open data stream].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_key_file: Option<PathBuf>,
    /// Shard id [default: stored in the data dir].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    shard_id: Option<String>,
    /// Data directory [default: motorpool-data/cas-0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    /// Capacity in bytes (blobs and action-cache entries) before LRU eviction [default: 10 GiB].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    capacity_bytes: Option<u64>,
    /// Share of the capacity the action cache may take, above 0, at most 1; past it its oldest
    /// entries go first [default: 0.1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    action_cache_share: Option<f64>,
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
    // Under `motorpool up`: stop when the supervisor is gone (killed without a chance to stop its
    // children), instead of living on as an orphan.
    if let Some(supervisor) = std::env::var(up::SUPERVISOR_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    {
        let t = token.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
            loop {
                tick.tick().await;
                if nix::unistd::getppid().as_raw() != supervisor {
                    tracing::warn!("The supervisor is gone; shutting down");
                    t.cancel();
                    break;
                }
            }
        });
    }
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
    let telemetry = motorpool_telemetry::init(service, config)?;
    describe_metrics();
    Ok(telemetry)
}

/// Gives every metric its help text on `/metrics` (each crate names its metrics in one module).
fn describe_metrics() {
    motorpool_alert_relay::metric_names::describe();
    motorpool_bus::metric_names::describe();
    motorpool_cas_client::metric_names::describe();
    motorpool_cas_shard::metric_names::describe();
    motorpool_disk_burner::metric_names::describe();
    motorpool_gateway::metric_names::describe();
    motorpool_image_builder::metric_names::describe();
    motorpool_labeling::metric_names::describe();
    motorpool_reindexer::metric_names::describe();
    motorpool_runner::metric_names::describe();
    motorpool_scheduler::metric_names::describe();
    motorpool_webhook::metric_names::describe();
    motorpool_worker::metric_names::describe();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // One TLS provider for every client that takes the process default (see the function).
    motorpool_bus::ensure_crypto_provider();
    let cli = Cli::parse();
    match cli.command {
        Command::Up(args) => up::run(args).await,
        Command::Gateway(args) => {
            let config: GatewayConfig = load(&args.common, &args)?;
            let _telemetry = telemetry("gateway", &config.telemetry)?;
            motorpool_gateway::run(config, shutdown_on_signals()).await
        }
        Command::CasShard(args) => {
            let mut config: ShardConfig = load(&args.common, &args)?;
            args.tier.apply(&mut config.object_store);
            let _telemetry = telemetry("cas-shard", &config.telemetry)?;
            motorpool_cas_shard::run(config, shutdown_on_signals()).await
        }
        Command::Scheduler(args) => {
            let config: SchedulerConfig = load(&args.common, &args)?;
            let _telemetry = telemetry("scheduler", &config.telemetry)?;
            motorpool_scheduler::run(config, shutdown_on_signals()).await
        }
        Command::Reindexer(args) => {
            let config: ReindexerConfig = load(&args.common, &args)?;
            let _telemetry = telemetry("reindexer", &config.telemetry)?;
            motorpool_reindexer::run(config, shutdown_on_signals()).await
        }
        Command::Mapping(args) => {
            let config: LabelConfig = load(&args.common, &args)?;
            let _telemetry = telemetry("mapping", &config.telemetry)?;
            motorpool_mapping::run(config, shutdown_on_signals()).await
        }
        Command::Prelabel(args) => {
            let config: LabelConfig = load(&args.common, &args)?;
            let _telemetry = telemetry("prelabel", &config.telemetry)?;
            motorpool_prelabel::run(config, shutdown_on_signals()).await
        }
        Command::Annotate(args) => {
            let config: LabelConfig = load(&args.common, &args)?;
            let _telemetry = telemetry("annotate", &config.telemetry)?;
            motorpool_annotate::run(config, shutdown_on_signals()).await
        }
        Command::Label(cmd) => {
            let _telemetry = telemetry(
                "label",
                &TelemetryConfig {
                    log_filter: "warn".into(),
                    ..Default::default()
                },
            )?;
            label::main(cmd).await
        }
        Command::ImageBuilder(args) => {
            let config: FleetConfig = load(&args.common, &args)?;
            let _telemetry = telemetry("image-builder", &config.telemetry)?;
            motorpool_image_builder::actor::run(config, shutdown_on_signals()).await
        }
        Command::DiskBurner(args) => {
            let config: FleetConfig = load(&args.common, &args)?;
            let _telemetry = telemetry("disk-burner", &config.telemetry)?;
            motorpool_disk_burner::actor::run(config, shutdown_on_signals()).await
        }
        Command::AlertRelay(args) => {
            let mut config: AlertRelayConfig = load(&args.common, &args)?;
            for (kind, urls) in [
                (AlertSinkKind::Alertmanager, &args.alertmanager_url),
                (AlertSinkKind::Slack, &args.slack_webhook_url),
                (AlertSinkKind::Feishu, &args.feishu_webhook_url),
            ] {
                config.sinks.extend(urls.iter().map(|url| AlertSink {
                    kind,
                    url: url.clone(),
                    kinds: Vec::new(),
                }));
            }
            let _telemetry = telemetry("alert-relay", &config.telemetry)?;
            motorpool_alert_relay::run(config, shutdown_on_signals()).await
        }
        Command::Webhook(args) => {
            let config: WebhookConfig = load(&args.common, &args)?;
            let _telemetry = telemetry("webhook", &config.telemetry)?;
            motorpool_webhook::run(config, shutdown_on_signals()).await
        }
        Command::Runner(args) => {
            let config: RunnerConfig = load(&args.common, &args)?;
            let _telemetry = telemetry("runner", &config.telemetry)?;
            motorpool_runner::run(config, shutdown_on_signals()).await
        }
        Command::Drives(cmd) => tokio::task::spawn_blocking(move || drives::main(cmd)).await?,
        Command::Keys(cmd) => keys::main(cmd),
        Command::Image(cmd) => tokio::task::spawn_blocking(move || image::main(cmd)).await?,
        Command::SweepObjectStore(args) => {
            let tier = motorpool_cas_shard::tier::ObjectTier::open(
                &motorpool_config::ObjectStoreConfig {
                    url: args.object_store_url.clone(),
                    write: motorpool_config::TierWrite::Through,
                    options: args.options.iter().cloned().collect(),
                },
            )?;
            let keep = std::time::Duration::from_secs(args.keep_days * 86_400);
            let dry_run = args.dry_run;
            let report = tokio::task::spawn_blocking(move || {
                tier.sweep(keep, motorpool_messages::now_ms(), dry_run)
            })
            .await??;
            if let Some(path) = &args.textfile {
                // Written whole, then renamed: the collector never reads half a file.
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, sweep_metrics(&report, dry_run))?;
                std::fs::rename(&tmp, path)?;
            }
            println!(
                "{:<32} {:>12} {:>14} {:>12} {:>14} {:>10} {:>10}",
                "instance",
                "blobs kept",
                "bytes kept",
                "removed",
                "bytes removed",
                "results",
                "removed"
            );
            for (name, u) in &report.instances {
                println!(
                    "{:<32} {:>12} {:>14} {:>12} {:>14} {:>10} {:>10}",
                    if name.is_empty() { "(default)" } else { name },
                    u.blobs_kept,
                    u.bytes_kept,
                    u.blobs_removed,
                    u.bytes_removed,
                    u.entries_kept,
                    u.entries_removed
                );
            }
            println!(
                "{} use record(s) read, {} old one(s) {}.",
                report.use_records,
                report.use_records_removed,
                if args.dry_run {
                    "to remove (dry run: nothing removed)"
                } else {
                    "removed"
                }
            );
            Ok(())
        }
        Command::Worker(args) => {
            let mut config: WorkerConfig = load(&args.common, &args)?;
            args.tier.apply(&mut config.object_store);
            let _telemetry = telemetry("worker", &config.telemetry)?;
            motorpool_worker::run(config, shutdown_on_signals()).await
        }
    }
}
