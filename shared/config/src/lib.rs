//! Configuration of every Motorpool service. These structs are the configuration reference: each
//! field's doc comment says what it does and its default.
//!
//! A service's configuration is layered, later layers winning:
//! 1. the defaults below;
//! 2. a TOML file (`--config FILE`), whose keys are the field names;
//! 3. environment variables `MOTORPOOL_<SERVICE>_<FIELD>` (nested fields with `__`, for example
//!    `MOTORPOOL_GATEWAY_TELEMETRY__LOG_FILTER=debug`);
//! 4. command-line flags.
//!
//! Example files under `docs/config/` are deserialized by this crate's tests.

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Error while loading configuration.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(#[from] Box<figment::Error>);

/// A service configuration with an environment prefix.
pub trait ServiceConfig: Serialize + DeserializeOwned + Default {
    /// `MOTORPOOL_GATEWAY_`, ...
    const ENV_PREFIX: &'static str;
}

/// Loads `T` from defaults, an optional TOML file, the environment and `overrides` (usually the
/// command-line flags that were given; fields set to `None` are skipped by `serde`).
pub fn load<T: ServiceConfig>(
    file: Option<&Path>,
    overrides: &impl Serialize,
) -> Result<T, ConfigError> {
    let mut fig = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        fig = fig.merge(Toml::file_exact(path));
    }
    fig.merge(Env::prefixed(T::ENV_PREFIX).split("__"))
        .merge(Serialized::defaults(overrides))
        .extract()
        .map_err(|e| ConfigError(Box::new(e)))
}

/// Logging, tracing and metrics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `tracing` filter directives, as in `RUST_LOG` (which wins when set). Default `info`.
    pub log_filter: String,
    /// Log line format: `text` (default) or `json`.
    pub log_format: LogFormat,
    /// OTLP/gRPC endpoint (for example `http://127.0.0.1:4317`) to export traces to. Default: none,
    /// no export. The standard `OTEL_EXPORTER_OTLP_ENDPOINT` is honoured when this is unset.
    pub otlp_endpoint: Option<String>,
    /// Share of new traces kept (0 to 1), decided where a trace starts (a gateway call, a burn);
    /// every service downstream follows that decision, so a trace is whole or absent. Default:
    /// unset, which follows the standard `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG`, else
    /// keeps every trace.
    pub trace_sample_ratio: Option<f64>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            log_filter: "info".into(),
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            trace_sample_ratio: None,
        }
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `motorpool gateway`: the REAPI v2 front end.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// NATS server URL. Default `nats://127.0.0.1:4222`.
    pub nats_url: String,
    /// The nkey seed file this service connects to NATS with (`motorpool keys bus add`);
    /// none = connect without credentials, for a bus that lets anyone in.
    pub nats_nkey_file: Option<PathBuf>,
    /// PEM CA of a NATS that speaks TLS: the connection is encrypted and the server's
    /// certificate must chain to it. None: plain, unless the URL is `tls://` (system roots).
    pub nats_tls_ca_file: Option<PathBuf>,
    /// The deployment's data key (64 hex digits; `motorpool up` makes `bus/data.key`): shards
    /// serve their direct data stream only to peers that prove they hold it. None: open.
    pub data_key_file: Option<PathBuf>,
    /// gRPC listen address (REAPI, ByteStream). Default `127.0.0.1:8980`.
    pub grpc_addr: SocketAddr,
    /// HTTP listen address: `/healthz`, `/readyz`, `/metrics`. Default `127.0.0.1:8080`.
    pub http_addr: SocketAddr,
    /// Largest total of blob bytes in one BatchUpdateBlobs/BatchReadBlobs request, as reported in
    /// Capabilities. Clients send bigger blobs through ByteStream. Default 4 MiB.
    pub max_batch_total_bytes: u64,
    /// Largest gRPC message the gateway decodes (FindMissingBlobs of 100k digests is ~7 MB);
    /// a bigger one gets RESOURCE_EXHAUSTED, and blobs bigger than a batch go through
    /// ByteStream in chunks anyway. Default 16 MiB.
    pub max_grpc_message_bytes: usize,
    /// Size of each ByteStream ReadResponse chunk. Default 1 MiB.
    pub read_chunk_bytes: usize,
    /// Timeout of one bus request to a shard, in milliseconds. Default 30000.
    pub bus_timeout_ms: u64,
    /// A shard whose last heartbeat is older than this is treated as gone, in milliseconds.
    /// Default 5000.
    pub shard_timeout_ms: u64,
    /// How large blob bodies travel between gateway and shards: `direct` (default; the shard's TCP
    /// data stream) or `nats` (chunked request/reply over NATS, for networks where only NATS
    /// reaches the shards). See `docs/adr/0002-large-blobs-direct-stream.md`.
    pub blob_transport: BlobTransport,
    /// Instance names clients may use; each is an isolated cache (production, a grey release, a
    /// test environment). Empty (the default) accepts any well-formed instance name.
    pub instance_names: Vec<String>,
    /// Offer remote execution (Execution and Operations services; a scheduler and workers must
    /// run). Default `true`.
    pub execution: bool,
    /// Shards each written blob is stored on: the owner and `replicas - 1` more in placement
    /// order, so losing one shard (a worker) loses no blob. Default 2.
    pub replicas: usize,
    /// Memory for action results found complete (every blob they reference present), served
    /// again without asking the shards until a shard announces that one of those blobs is gone.
    /// 0 checks every hit on the shards. Bytes; default 64 MiB (about 100k results).
    pub hit_memory_bytes: usize,
    /// A remembered result is checked on the shards again after this many seconds. Default 3600.
    pub hit_memory_max_age_s: u64,
    /// Memory for copies of small blobs (64 KiB at most) this gateway wrote or read whole:
    /// Execute's Action and Command, and ByteStream reads of them, are answered from it. Bytes;
    /// default 32 MiB.
    pub blob_memory_bytes: usize,
    /// Who may call the gateway, and for what.
    pub auth: AuthConfig,
    /// What one client may hold of the gateway: connections, streams, silence.
    pub bounds: BoundsConfig,
    /// TLS on the gRPC port (and, with a client CA, mutual TLS).
    pub tls: TlsConfig,
    /// The Build Event Service: what is kept of Bazel's build events.
    pub bes: BesConfig,
    /// Where the labeling stages write their outputs, when this host sees it too (a shared
    /// volume, or `motorpool up`'s data dir): the labels page then shows each clip's report
    /// picture. Only files under it are served. Default: none.
    pub labels_dir: Option<PathBuf>,
    /// Logging, tracing, metrics.
    pub telemetry: TelemetryConfig,
}

/// What the gateway keeps of the builds Bazel streams to it (`--bes_backend`). Everything lives
/// in JetStream (stream `MP_V1_BES`, KV `mp_v1_bes_invocations`), so every gateway serves every
/// invocation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BesConfig {
    /// Serve `google.devtools.build.v1.PublishBuildEvent`. Default true.
    pub enabled: bool,
    /// Invocations are kept this many days. Default 14.
    pub retention_days: u64,
    /// All invocations' events together are kept within this many bytes; the oldest go first.
    /// Default 4 GiB.
    pub max_bytes: i64,
    /// Events of one invocation beyond this many are acknowledged (the build goes on) but not
    /// kept; the invocation is marked truncated. Default 200000.
    pub max_events_per_invocation: u64,
    /// The same in bytes of event payloads. Default 256 MiB.
    pub max_bytes_per_invocation: u64,
    /// Invocations kept: beyond this many, the oldest (by start) are removed, events, actions
    /// and summary, by a sweep every `sweep_interval_s`. Default 10000.
    pub max_invocations: usize,
    /// Seconds between sweeps. Default 300.
    pub sweep_interval_s: u64,
    /// Take build events that come without an API key. Bazel before 5 has no `--bes_header`
    /// and sends its `--remote_header`s only to the cache and executor, so its events carry no
    /// key; such an invocation belongs to the key of the cache or execution calls that name it
    /// (their `tool_invocation_id`), and until one does only admins see it. Default true.
    pub keyless: bool,
}

impl Default for BesConfig {
    fn default() -> Self {
        BesConfig {
            enabled: true,
            retention_days: 14,
            max_bytes: 4 << 30,
            max_events_per_invocation: 200_000,
            max_bytes_per_invocation: 256 << 20,
            max_invocations: 10_000,
            sweep_interval_s: 300,
            keyless: true,
        }
    }
}

/// The gateway's resource bounds. Each answers with a clear status when it bites.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BoundsConfig {
    /// Connections served at once; up to 64 more are accepted only to get RESOURCE_EXHAUSTED on
    /// every call, and beyond those new connections are closed. Default 4096.
    pub max_connections: usize,
    /// Concurrent calls (HTTP/2 streams) per connection; Bazel opens up to
    /// `--remote_max_connections` connections and multiplexes on each. Default 1024.
    pub max_concurrent_streams: u32,
    /// A call whose client sends nothing of its request for this long fails with
    /// DEADLINE_EXCEEDED (a stalled upload frees its memory). Milliseconds; default 60000.
    pub idle_timeout_ms: u64,
    /// HTTP/2 PING interval on idle connections, to find dead peers. Milliseconds; default 30000.
    pub keepalive_interval_ms: u64,
    /// A PING unanswered this long closes the connection. Milliseconds; default 20000.
    pub keepalive_timeout_ms: u64,
}

impl Default for BoundsConfig {
    fn default() -> Self {
        BoundsConfig {
            max_connections: 4096,
            max_concurrent_streams: 1024,
            idle_timeout_ms: 60_000,
            keepalive_interval_ms: 30_000,
            keepalive_timeout_ms: 20_000,
        }
    }
}

/// TLS for the gateway's ports. With `cert_file` and `key_file` the gRPC port speaks only TLS
/// (`grpcs://` for Bazel, with `--tls_certificate=<CA>` when the CA is not a system one), and so
/// does the HTTP port (`https://`) unless `http = false`; with `client_ca_file` too, only gRPC
/// clients with a certificate that CA signed get in (mutual TLS; Bazel:
/// `--tls_client_certificate`, `--tls_client_key`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the gateway. Default: none (plain gRPC and HTTP).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of that certificate.
    pub key_file: Option<PathBuf>,
    /// PEM CA whose client certificates the gRPC port requires. Default: none (no client
    /// certificates). The HTTP port never asks for one: health probes and Prometheus need only
    /// the CA that signed the gateway's certificate.
    pub client_ca_file: Option<PathBuf>,
    /// Serve the HTTP port over TLS too, with the same certificate. Default: true; false keeps
    /// it plain (for example behind a proxy that terminates TLS on a private interface).
    pub http: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            http: true,
        }
    }
}

/// What a caller that presents no API key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Anonymous {
    /// Nothing: every call needs a key.
    None,
    /// Read the CAS and the action cache (FindMissing, reads, GetActionResult, GetTree).
    Read,
    /// Everything, as before keys existed: only where every client on the network is trusted.
    All,
}

/// API keys and anonymous access. A caller presents its key as `authorization: Bearer <key>`
/// (Bazel: `--remote_header=authorization=Bearer <key>`) or `x-api-key: <key>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// TOML file of API keys, re-read when it changes (keys rotate without a restart): a
    /// `[[keys]]` table each with `id`, `sha256` (of the key, hex), `roles` (any of `read`,
    /// `write-cas`, `write-ac`, `execute`, `admin`), `instances` (instance names the key may use;
    /// empty: all), `max_lane` (the highest lane its executions may ride; default `release`) and
    /// `api` (its executions are API-triggered, rate-limited under its id). `motorpool keys add`
    /// writes it. Default: none.
    pub keys_file: Option<PathBuf>,
    /// What a caller without a key may do: `none`, `read` or `all`. Default `none`; a gateway
    /// with neither keys nor anonymous access refuses to start.
    pub anonymous: Anonymous,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            keys_file: None,
            anonymous: Anonymous::None,
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_nkey_file: None,
            nats_tls_ca_file: None,
            data_key_file: None,
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 8980)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_batch_total_bytes: 4 * 1024 * 1024,
            max_grpc_message_bytes: 16 * 1024 * 1024,
            read_chunk_bytes: 1024 * 1024,
            bus_timeout_ms: 30_000,
            shard_timeout_ms: 5_000,
            blob_transport: BlobTransport::Direct,
            instance_names: Vec::new(),
            execution: true,
            replicas: 2,
            hit_memory_bytes: 64 << 20,
            hit_memory_max_age_s: 3600,
            blob_memory_bytes: 32 << 20,
            bounds: BoundsConfig::default(),
            tls: TlsConfig::default(),
            bes: BesConfig::default(),
            labels_dir: None,
            auth: AuthConfig::default(),
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl ServiceConfig for GatewayConfig {
    const ENV_PREFIX: &'static str = "MOTORPOOL_GATEWAY_";
}

/// How large blob bodies travel between gateway and shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlobTransport {
    Direct,
    Nats,
}

/// `motorpool cas-shard`: one CAS shard (blob files + sled metadata).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShardConfig {
    /// NATS server URL. Default `nats://127.0.0.1:4222`.
    pub nats_url: String,
    /// The nkey seed file this service connects to NATS with (`motorpool keys bus add`);
    /// none = connect without credentials, for a bus that lets anyone in.
    pub nats_nkey_file: Option<PathBuf>,
    /// PEM CA of a NATS that speaks TLS: the connection is encrypted and the server's
    /// certificate must chain to it. None: plain, unless the URL is `tls://` (system roots).
    pub nats_tls_ca_file: Option<PathBuf>,
    /// The deployment's data key (64 hex digits; `motorpool up` makes `bus/data.key`): shards
    /// serve their direct data stream only to peers that prove they hold it. None: open.
    pub data_key_file: Option<PathBuf>,
    /// Shard id: a subject token (letters, digits, `-`, `_`). Default: the id stored in
    /// `data_dir/shard-id`, created at first start from the host name and a random suffix, so a
    /// restarted shard keeps its identity and its blobs.
    pub shard_id: Option<String>,
    /// Directory of blob files and the sled metadata. Default `./motorpool-data/cas-0`.
    pub data_dir: PathBuf,
    /// Bytes of blob data and action-cache entries kept before the least recently used are
    /// evicted. Default 10 GiB.
    pub capacity_bytes: u64,
    /// The share of `capacity_bytes` the action cache may take (above 0, at most 1); past it its
    /// oldest entries are evicted first. Default 0.1.
    pub action_cache_share: f64,
    /// Listen address of the direct data stream for large blobs. Default `127.0.0.1:0` (any port).
    pub data_addr: SocketAddr,
    /// Address other services dial for the data stream when it differs from the bound one (a
    /// container's or host's reachable name). Default: the bound address.
    pub advertise_addr: Option<String>,
    /// Heartbeat period in milliseconds. Default 1000.
    pub heartbeat_ms: u64,
    /// `fsync` each pack append and large blob file before it becomes visible. Default `false`: a
    /// cache may lose recent blobs in a power cut; after an unclean stop the shard drops any blob
    /// whose bytes are short or no longer hash to its digest. See `docs/adr/0003-blob-storage.md`.
    pub fsync: bool,
    /// Optional HTTP address for this shard's `/metrics` and `/healthz`. Default: none.
    pub http_addr: Option<SocketAddr>,
    /// An object store behind this shard (`[object_store]`): blobs and action-cache entries are
    /// written to it too, and read back from it when this shard does not hold them. Default:
    /// none, the shard's disk is all there is.
    pub object_store: Option<ObjectStoreConfig>,
    /// Logging, tracing, metrics.
    pub telemetry: TelemetryConfig,
}

/// The object-store tier behind the CAS shards (ADR 0017): one bucket shared by every shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObjectStoreConfig {
    /// Where: `s3://bucket/prefix` (or any S3-compatible server: set `endpoint`),
    /// `gs://bucket/prefix`, `az://container/prefix`, or `file:///path` (a shared file system).
    pub url: String,
    /// `through`: a write is acknowledged once the bucket holds it too. `behind`: once the
    /// shard's disk holds it; the shard uploads it soon after (the blobs still to upload are
    /// remembered across restarts). Default `through`.
    pub write: TierWrite,
    /// Options of the store's client, by the names `object_store` gives them (for S3:
    /// `endpoint`, `region`, `allow_http`, `access_key_id`, `secret_access_key`, ...). The
    /// usual environment variables (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT`, ...) are read too;
    /// keep secrets there rather than in a file.
    pub options: std::collections::BTreeMap<String, String>,
}

impl Default for ObjectStoreConfig {
    fn default() -> Self {
        ObjectStoreConfig {
            url: String::new(),
            write: TierWrite::Through,
            options: Default::default(),
        }
    }
}

/// When a write reaches the object store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TierWrite {
    Through,
    Behind,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_nkey_file: None,
            nats_tls_ca_file: None,
            data_key_file: None,
            shard_id: None,
            data_dir: PathBuf::from("motorpool-data/cas-0"),
            capacity_bytes: 10 * 1024 * 1024 * 1024,
            action_cache_share: 0.1,
            data_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise_addr: None,
            heartbeat_ms: 1000,
            fsync: false,
            http_addr: None,
            object_store: None,
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl ServiceConfig for ShardConfig {
    const ENV_PREFIX: &'static str = "MOTORPOOL_CAS_SHARD_";
}

/// `motorpool scheduler`: the scheduler actor (queues, lanes, dispatch, retries).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// NATS server URL. Default `nats://127.0.0.1:4222`.
    pub nats_url: String,
    /// The nkey seed file this service connects to NATS with (`motorpool keys bus add`);
    /// none = connect without credentials, for a bus that lets anyone in.
    pub nats_nkey_file: Option<PathBuf>,
    /// PEM CA of a NATS that speaks TLS: the connection is encrypted and the server's
    /// certificate must chain to it. None: plain, unless the URL is `tls://` (system roots).
    pub nats_tls_ca_file: Option<PathBuf>,
    /// A worker whose heartbeat is older than this (milliseconds) is lost: its jobs are retried
    /// elsewhere. Default 5000.
    pub worker_timeout_ms: u64,
    /// Attempts an operation gets when the platform fails it (worker lost, exec dir, input fetch,
    /// upload); after the last one the operation fails and an alert is raised. Default 3.
    pub max_attempts: u32,
    /// Aging: a queued job rises one lane for every this many milliseconds it has waited, up to
    /// the release lane's rank, so no lane starves. Default 10000.
    pub aging_step_ms: u64,
    /// How long (milliseconds) a worker has to accept an assignment. Default 2000.
    pub assign_timeout_ms: u64,
    /// API-triggered executions per second each API client may start (token bucket rate).
    /// Default 2.
    pub api_rate_per_s: f64,
    /// Token bucket size: executions an API client may start at once after being idle. Default 4.
    pub api_burst: f64,
    /// Longest wait (milliseconds) an API-triggered execution may be given in its lane; beyond it
    /// the request is refused with RESOURCE_EXHAUSTED. Default 60000.
    pub api_max_wait_ms: u64,
    /// Optional HTTP address for the scheduler's `/metrics` and `/healthz`. Default: none (the
    /// gateway's `/metrics` and `/api/v1/queues` show the queue depths anyway).
    pub http_addr: Option<SocketAddr>,
    /// This scheduler's name in the lease that picks the active one of several schedulers,
    /// unique among them. Default: `scheduler@<host>`.
    pub scheduler_id: Option<String>,
    /// The lease (milliseconds): a standby takes over when the active scheduler has not renewed
    /// it for this long. The active one renews it every third of it. Default 3000.
    pub lease_ms: u64,
    /// Logging, tracing, metrics.
    pub telemetry: TelemetryConfig,
}

impl SchedulerConfig {
    /// [`SchedulerConfig::scheduler_id`], or the default made from the host's name.
    pub fn scheduler_id(&self) -> String {
        self.scheduler_id.clone().unwrap_or_else(|| {
            let host = hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "localhost".into());
            format!("scheduler@{host}")
        })
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_nkey_file: None,
            nats_tls_ca_file: None,
            worker_timeout_ms: 5000,
            max_attempts: 3,
            aging_step_ms: 10_000,
            assign_timeout_ms: 2000,
            api_rate_per_s: 2.0,
            api_burst: 4.0,
            api_max_wait_ms: 60_000,
            http_addr: None,
            scheduler_id: None,
            lease_ms: 3000,
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl ServiceConfig for SchedulerConfig {
    const ENV_PREFIX: &'static str = "MOTORPOOL_SCHEDULER_";
}

/// `motorpool reindexer`: keeps the shard registry true and every blob replicated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReindexerConfig {
    /// NATS server URL. Default `nats://127.0.0.1:4222`.
    pub nats_url: String,
    /// The nkey seed file this service connects to NATS with (`motorpool keys bus add`);
    /// none = connect without credentials, for a bus that lets anyone in.
    pub nats_nkey_file: Option<PathBuf>,
    /// PEM CA of a NATS that speaks TLS: the connection is encrypted and the server's
    /// certificate must chain to it. None: plain, unless the URL is `tls://` (system roots).
    pub nats_tls_ca_file: Option<PathBuf>,
    /// The deployment's data key (64 hex digits; `motorpool up` makes `bus/data.key`): shards
    /// serve their direct data stream only to peers that prove they hold it. None: open.
    pub data_key_file: Option<PathBuf>,
    /// Time (milliseconds) between passes over the registries. Default 10000.
    pub period_ms: u64,
    /// A shard or worker whose last heartbeat is older than this (milliseconds) is dead: its
    /// registry entries are dropped. Default 60000.
    pub dead_after_ms: u64,
    /// A shard silent this long (milliseconds) no longer counts as live for placement. Default
    /// 5000 (as the gateway's `shard_timeout_ms`).
    pub shard_timeout_ms: u64,
    /// Shards each blob should be on (as the gateway's `replicas`). Default 2.
    pub replicas: usize,
    /// Time (milliseconds) between full re-replication sweeps when membership does not change.
    /// Default 3600000 (hourly). A change of the live shards starts a sweep at once.
    pub sweep_ms: u64,
    /// Optional HTTP address for `/metrics` and `/healthz`. Default: none.
    pub http_addr: Option<SocketAddr>,
    /// Logging, tracing, metrics.
    pub telemetry: TelemetryConfig,
}

impl Default for ReindexerConfig {
    fn default() -> Self {
        ReindexerConfig {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_nkey_file: None,
            nats_tls_ca_file: None,
            data_key_file: None,
            period_ms: 10_000,
            dead_after_ms: 60_000,
            shard_timeout_ms: 5_000,
            replicas: 2,
            sweep_ms: 3_600_000,
            http_addr: None,
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl ServiceConfig for ReindexerConfig {
    const ENV_PREFIX: &'static str = "MOTORPOOL_REINDEXER_";
}

/// `motorpool worker`: a worker (the execution pipeline) that also holds a CAS shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// NATS server URL. Default `nats://127.0.0.1:4222`.
    pub nats_url: String,
    /// The nkey seed file this service connects to NATS with (`motorpool keys bus add`);
    /// none = connect without credentials, for a bus that lets anyone in.
    pub nats_nkey_file: Option<PathBuf>,
    /// PEM CA of a NATS that speaks TLS: the connection is encrypted and the server's
    /// certificate must chain to it. None: plain, unless the URL is `tls://` (system roots).
    pub nats_tls_ca_file: Option<PathBuf>,
    /// The deployment's data key (64 hex digits; `motorpool up` makes `bus/data.key`): shards
    /// serve their direct data stream only to peers that prove they hold it. None: open.
    pub data_key_file: Option<PathBuf>,
    /// Worker id (also its CAS shard's id), unique among the deployment's live workers: a worker
    /// whose id another live worker holds refuses to start. Default: stored in
    /// `data_dir/cas/shard-id`, created at first start from the host name and a random suffix.
    pub worker_id: Option<String>,
    /// Directory of the worker's CAS shard (`cas/`), input cache (`cache/`) and exec dirs
    /// (`exec/`), one worker's only: a second worker given it refuses to start. Relative paths
    /// are taken from the directory the worker starts in. Default `./motorpool-data/<worker
    /// id>` with a worker id, else `./motorpool-data/worker-0`.
    pub data_dir: Option<PathBuf>,
    /// Where exec roots (`exec/`) and the input cache (`cache/`) live; emptied at start. Default:
    /// the data dir, unless the sandbox user cannot reach it (a parent directory without `o+x`,
    /// as a 0700 home is): then `/var/tmp/motorpool/<worker id>-<data dir hash>`.
    pub scratch_dir: Option<PathBuf>,
    /// Actions run at once. Default: the number of CPUs.
    pub slots: Option<u32>,
    /// Jobs whose inputs are fetched at once. Default 4.
    pub fetch_concurrency: u32,
    /// Jobs whose outputs are uploaded at once. Default 4.
    pub upload_concurrency: u32,
    /// Platform properties this worker offers (`OSFamily = "linux"`, `cores = "8"`, `gpu = "1"`,
    /// `pool = "gpu"`, ...). Labels must match a job's exactly; numbers are minimums. A worker
    /// offering `pool = "gpu"` or `gpu >= 1` serves the GPU queues. Default `OSFamily = "linux"`.
    pub platform: std::collections::BTreeMap<String, String>,
    /// How far below the worker's CPU priority actions run (`nice -n`; 0 runs them at the
    /// worker's). A worker is also a CAS shard: its compilers must not keep it from serving
    /// other workers' fetches and the gateway's writes. Default 10.
    pub action_nice: i32,
    /// Timeout (milliseconds) of an action that sets none. Default 900000 (15 minutes).
    pub default_timeout_ms: u64,
    /// Longest timeout (milliseconds) an action may ask for. Default 3600000 (one hour).
    pub max_timeout_ms: u64,
    /// Bytes of the worker's CAS shard before LRU eviction. Default 10 GiB.
    pub cas_capacity_bytes: u64,
    /// The share of the shard's capacity its action cache may take, as a shard's
    /// `action_cache_share`. Default 0.1.
    pub cas_action_cache_share: f64,
    /// The object store behind the worker's CAS shard, as a shard's `[object_store]`.
    pub object_store: Option<ObjectStoreConfig>,
    /// Bytes of the local input cache (hard-link source) before eviction. Default 4 GiB.
    pub input_cache_bytes: u64,
    /// Listen address of the CAS shard's data stream. Default `127.0.0.1:0`.
    pub data_addr: SocketAddr,
    /// Address other services dial for the data stream. Default: the bound address.
    pub advertise_addr: Option<String>,
    /// Heartbeat period in milliseconds. Default 1000.
    pub heartbeat_ms: u64,
    /// Optional HTTP address for the worker's `/metrics` and `/healthz`. Default: none.
    pub http_addr: Option<SocketAddr>,
    /// How actions are isolated from the worker and from each other.
    pub sandbox: SandboxConfig,
    /// Logging, tracing, metrics.
    pub telemetry: TelemetryConfig,
}

/// Whether actions run in the sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxMode {
    /// Every action runs as `uid`/`gid` in new user, mount, pid, ipc, uts, cgroup and network
    /// namespaces (bubblewrap), in a cgroup with the limits below. Needs root (to switch to the
    /// sandbox user and to create cgroups) and `bwrap`; the worker refuses to start without them.
    Strict,
    /// Actions run as the worker's own user, in its namespaces, with no limits but the timeout:
    /// only for pools whose every action is trusted. Logged as a warning at start.
    Off,
}

/// The action sandbox. Platform properties an action may set, within these limits:
/// `memory-mb` (its memory limit, at most `max_memory_bytes`), `cores` (a CPU quota in cores),
/// `network = "on"` (keep the host network; only where `allow_network`, which makes the worker
/// offer `network = "on"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    /// `strict` or `off`. Default `strict`.
    pub mode: SandboxMode,
    /// The unprivileged user actions run as: no file of the worker's (its CAS, its input cache,
    /// its configuration and credentials) may belong to it. Default 65534 (`nobody`).
    pub uid: u32,
    /// The group actions run as (supplementary groups are dropped). Default 65534.
    pub gid: u32,
    /// Memory (RSS and page cache, no swap) an action's processes may use together before the
    /// kernel kills them; the action then fails with a note saying so. Default 4 GiB.
    pub memory_bytes: u64,
    /// The most an action may ask for with `memory-mb`. Default 16 GiB.
    pub max_memory_bytes: u64,
    /// Processes and threads an action may have at once. Default 4096.
    pub max_processes: u64,
    /// CPU quota of an action, in cores, when it asks for none (`cores`). Default 0: no quota
    /// (actions share the worker's CPUs under `action_nice`).
    pub cpu_cores: f64,
    /// Bytes of stdout, and of stderr, kept from an action; the rest is dropped (a note says
    /// how much) without ever being held in memory. Default 16 MiB.
    pub max_stream_bytes: u64,
    /// Bytes an action's outputs may total, and the largest file it may write. Default 16 GiB.
    pub max_output_bytes: u64,
    /// Whether actions asking for `network = "on"` keep the host's network. Default false:
    /// every action gets a network namespace with only its own loopback.
    pub allow_network: bool,
    /// Host paths shown read-only inside the sandbox, beside `/usr`, `/etc` and the
    /// `/bin`, `/sbin`, `/lib*` links or directories (toolchains installed elsewhere, for
    /// example `/opt/toolchains`). Default none.
    pub read_only_paths: Vec<PathBuf>,
    /// `bwrap` to run. Default: from `PATH`.
    pub bwrap: Option<PathBuf>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            mode: SandboxMode::Strict,
            uid: 65534,
            gid: 65534,
            memory_bytes: 4 << 30,
            max_memory_bytes: 16 << 30,
            max_processes: 4096,
            cpu_cores: 0.0,
            max_stream_bytes: 16 << 20,
            max_output_bytes: 16 << 30,
            allow_network: false,
            read_only_paths: Vec::new(),
            bwrap: None,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_nkey_file: None,
            nats_tls_ca_file: None,
            data_key_file: None,
            worker_id: None,
            data_dir: None,
            scratch_dir: None,
            slots: None,
            fetch_concurrency: 4,
            upload_concurrency: 4,
            action_nice: 10,
            platform: [("OSFamily".to_string(), "linux".to_string())].into(),
            default_timeout_ms: 900_000,
            max_timeout_ms: 3_600_000,
            cas_capacity_bytes: 10 * 1024 * 1024 * 1024,
            cas_action_cache_share: 0.1,
            object_store: None,
            input_cache_bytes: 4 * 1024 * 1024 * 1024,
            data_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise_addr: None,
            heartbeat_ms: 1000,
            http_addr: None,
            sandbox: SandboxConfig::default(),
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl WorkerConfig {
    /// The data dir as configured, or its default (see `data_dir`); relative as given.
    pub fn data_dir(&self) -> PathBuf {
        match (&self.data_dir, &self.worker_id) {
            (Some(d), _) => d.clone(),
            (None, Some(id)) => PathBuf::from("motorpool-data").join(id),
            (None, None) => PathBuf::from("motorpool-data/worker-0"),
        }
    }
}

impl ServiceConfig for WorkerConfig {
    const ENV_PREFIX: &'static str = "MOTORPOOL_WORKER_";
}

/// `motorpool mapping`, `motorpool prelabel`, `motorpool annotate`: a stage of the BevSlots
/// labeling pipeline. The three stages share this configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LabelConfig {
    /// NATS server URL. Default `nats://127.0.0.1:4222`.
    pub nats_url: String,
    /// The nkey seed file this service connects to NATS with (`motorpool keys bus add`);
    /// none = connect without credentials, for a bus that lets anyone in.
    pub nats_nkey_file: Option<PathBuf>,
    /// PEM CA of a NATS that speaks TLS: the connection is encrypted and the server's
    /// certificate must chain to it. None: plain, unless the URL is `tls://` (system roots).
    pub nats_tls_ca_file: Option<PathBuf>,
    /// Root of the label store: every stage writes its versioned outputs under
    /// `<data_dir>/<clip id>/<stage>/v<version>-<input hash>/`. Stages on different hosts need
    /// it on shared storage. Clips are read where their job says. Default
    /// `./motorpool-data/labels`.
    pub data_dir: PathBuf,
    /// Where this stage sees the clips of jobs submitted relative to a clips directory
    /// (`motorpool label run --clips-root`): a container's mount, a shared volume's path on
    /// this host. Default: none (such jobs fail, saying so; clips named by an absolute path are
    /// read there).
    pub clips_dir: Option<PathBuf>,
    /// Name of this instance in clip statuses. Default: the host name and the stage.
    pub worker_id: Option<String>,
    /// Clips worked on at once. Default 1 (each stage's work is single-threaded; run more
    /// instances, or raise this, to use more cores).
    pub concurrency: usize,
    /// Milliseconds of waiting that raise a queued clip one lane (the platform's aging rule).
    /// Default 10000.
    pub aging_step_ms: u64,
    /// Milliseconds a taken clip may go without a keep-alive before it is redelivered to another
    /// instance (the holder died). Default 120000.
    pub ack_wait_ms: u64,
    /// HTTP address for the stage's `/metrics` and `/healthz`. Default: none.
    pub http_addr: Option<SocketAddr>,
    /// Logging, tracing, metrics.
    pub telemetry: TelemetryConfig,
}

impl Default for LabelConfig {
    fn default() -> Self {
        LabelConfig {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_nkey_file: None,
            nats_tls_ca_file: None,
            data_dir: PathBuf::from("motorpool-data/labels"),
            clips_dir: None,
            worker_id: None,
            concurrency: 1,
            aging_step_ms: 10_000,
            ack_wait_ms: 120_000,
            http_addr: None,
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl ServiceConfig for LabelConfig {
    const ENV_PREFIX: &'static str = "MOTORPOOL_LABEL_";
}

/// Where the disk burner finds its drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriveSource {
    /// A directory of raw disk files or block devices: a drive is plugged by appearing there.
    Bays,
    /// The host's block devices, with netlink uevents for hot-plug.
    Udev,
}

/// The burner's layout for drives of at least `min_drive_gib` GiB.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveLayout {
    pub min_drive_gib: u64,
    /// Image slots, 1 to 12.
    pub slots: usize,
    /// The overlay's share of the drive, percent.
    pub overlay_percent: u64,
}

/// `motorpool image-builder` and `motorpool disk-burner`: fleet image deployment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// NATS server URL. Default `nats://127.0.0.1:4222`.
    pub nats_url: String,
    /// The nkey seed file this service connects to NATS with (`motorpool keys bus add`);
    /// none = connect without credentials, for a bus that lets anyone in.
    pub nats_nkey_file: Option<PathBuf>,
    /// PEM CA of a NATS that speaks TLS: the connection is encrypted and the server's
    /// certificate must chain to it. None: plain, unless the URL is `tls://` (system roots).
    pub nats_tls_ca_file: Option<PathBuf>,
    /// The image store: `<store_dir>/<channel>/<image id>/{image.ext4,manifest.json}`. The
    /// builder writes it, the burner reads it. Default `./motorpool-data/images`.
    pub store_dir: PathBuf,
    /// Images kept per channel by the builder. Default 5.
    pub keep: usize,
    /// Builds run at once. Default 1.
    pub concurrency: usize,
    /// Burner: where drives come from. `bays` (default): the `bays_dir` directory. `udev`: the
    /// host's block devices, woken by the kernel's netlink uevents (hot-plug), filtered by
    /// `udev_match`.
    pub drive_source: DriveSource,
    /// Burner: the drive bays, a directory of block devices or raw disk files (hot-plug: a drive
    /// appears and disappears there). Default `./motorpool-data/bays`.
    pub bays_dir: PathBuf,
    /// Burner, `udev` source: kernel names of the whole disks to consider (`*` matches any run of
    /// characters). The interlock still refuses every disk not marked as a Motorpool drive, and
    /// disks in use (mounted, swap, holders) or read-only are refused without being opened for
    /// writing. Default `["sd*", "nvme*", "vd*", "xvd*", "mmcblk*"]`.
    pub udev_match: Vec<String>,
    /// Burner: the ledmon `ledctl` that shows drive states on the chassis LEDs (block devices
    /// only). Default: `ledctl` when it is on PATH, else no LEDs.
    pub ledctl: Option<PathBuf>,
    /// Burner: the channel whose images go onto every inserted drive. Default `stable`.
    pub channel: String,
    /// Burner: how many of the channel's newest images each drive gets (at most 12; the newest
    /// boots by default). Default 3.
    pub images_per_drive: usize,
    /// Burner: milliseconds between scans of the bays. Default 1000.
    pub scan_ms: u64,
    /// Burner: its name in drive states. Default: the host name.
    pub burner_id: Option<String>,
    /// Burner: image slots on a drive it lays out (1 to 12). Default 12.
    pub slots: usize,
    /// Burner: the overlay's share of a drive it lays out, percent. Default 20.
    pub overlay_percent: u64,
    /// Burner: slots and overlay share by drive size (`[[layouts]] min_drive_gib = 1000
    /// slots = 4 overlay_percent = 10`); the largest `min_drive_gib` a drive reaches wins.
    pub layouts: Vec<DriveLayout>,
    /// Builder: the ed25519 key that signs every image manifest (`motorpool image keygen`).
    /// None: manifests are not signed.
    pub signing_key_file: Option<PathBuf>,
    /// Burner: the platform's gateway to fetch the channel's images from (`grpc://HOST:8980` or
    /// `grpcs://`), by content, into `store_dir`, each only as far as the store lacks it.
    /// None: the store is filled by other means (a builder on this host, a copy).
    pub depot_url: Option<String>,
    /// Burner: the API key file for `depot_url` (a key with `read`).
    pub depot_api_key_file: Option<PathBuf>,
    /// Burner: PEM CA of the gateway's certificate, for `grpcs://`.
    pub depot_tls_ca_file: Option<PathBuf>,
    /// Burner: the REAPI instance name images are published under. Default "".
    pub depot_instance: String,
    /// Burner: seconds between looks at the depot's channel. Default 60.
    pub depot_sync_s: u64,
    /// Burner: public keys (one `motorpool-ed25519 <hex>` line each, `motorpool image keygen`
    /// writes them) whose signatures it accepts. Set, an image without a valid signature by one
    /// of them is refused; unset, manifests are checked for integrity only.
    pub trusted_keys_file: Option<PathBuf>,
    /// Milliseconds of waiting that raise a queued build one lane. Default 10000.
    pub aging_step_ms: u64,
    /// HTTP address for the service's `/metrics` and `/healthz`. Default: none.
    pub http_addr: Option<SocketAddr>,
    /// Logging, tracing, metrics.
    pub telemetry: TelemetryConfig,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_nkey_file: None,
            nats_tls_ca_file: None,
            store_dir: PathBuf::from("motorpool-data/images"),
            keep: 5,
            concurrency: 1,
            drive_source: DriveSource::Bays,
            bays_dir: PathBuf::from("motorpool-data/bays"),
            udev_match: ["sd*", "nvme*", "vd*", "xvd*", "mmcblk*"]
                .map(String::from)
                .to_vec(),
            ledctl: None,
            channel: "stable".into(),
            images_per_drive: 3,
            scan_ms: 1000,
            burner_id: None,
            slots: 12,
            overlay_percent: 20,
            layouts: Vec::new(),
            signing_key_file: None,
            trusted_keys_file: None,
            depot_url: None,
            depot_api_key_file: None,
            depot_tls_ca_file: None,
            depot_instance: String::new(),
            depot_sync_s: 60,
            aging_step_ms: 10_000,
            http_addr: None,
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl ServiceConfig for FleetConfig {
    const ENV_PREFIX: &'static str = "MOTORPOOL_FLEET_";
}

/// `motorpool webhook`: forge events (GitLab, GitHub) in, CI jobs out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// NATS server URL. Default `nats://127.0.0.1:4222`.
    pub nats_url: String,
    /// The nkey seed file this service connects to NATS with (`motorpool keys bus add`);
    /// none = connect without credentials, for a bus that lets anyone in.
    pub nats_nkey_file: Option<PathBuf>,
    /// PEM CA of a NATS that speaks TLS: the connection is encrypted and the server's
    /// certificate must chain to it. None: plain, unless the URL is `tls://` (system roots).
    pub nats_tls_ca_file: Option<PathBuf>,
    /// Timeout (milliseconds) of one bus operation. Default 5000.
    pub bus_timeout_ms: u64,
    /// HTTP listen address: forges post to `/hooks/<project>`. Default `127.0.0.1:8090`.
    pub http_addr: SocketAddr,
    /// The projects file (TOML: each project's forge, secret, jobs and lane rules; see
    /// `docs/config/projects.toml`), re-read when it changes. Default: none, no project (every
    /// event gets 404).
    pub projects_file: Option<PathBuf>,
    /// Largest event body accepted (bytes); a larger one gets 413. Default 4 MiB.
    pub max_body_bytes: usize,
    /// Logging, tracing, metrics.
    pub telemetry: TelemetryConfig,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_nkey_file: None,
            nats_tls_ca_file: None,
            bus_timeout_ms: 5_000,
            http_addr: "127.0.0.1:8090".parse().unwrap(),
            projects_file: None,
            max_body_bytes: 4 << 20,
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl ServiceConfig for WebhookConfig {
    const ENV_PREFIX: &'static str = "MOTORPOOL_WEBHOOK_";
}

/// `motorpool runner`: takes CI jobs in lane order and runs them with Bazel in warm workspaces.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunnerConfig {
    /// NATS server URL. Default `nats://127.0.0.1:4222`.
    pub nats_url: String,
    /// The nkey seed file this service connects to NATS with (`motorpool keys bus add --role
    /// runner:<id>`); none = connect without credentials, for a bus that lets anyone in.
    pub nats_nkey_file: Option<PathBuf>,
    /// PEM CA of a NATS that speaks TLS. None: plain, unless the URL is `tls://`.
    pub nats_tls_ca_file: Option<PathBuf>,
    /// Timeout (milliseconds) of one bus operation. Default 5000.
    pub bus_timeout_ms: u64,
    /// This runner's id (letters, digits, `-`, `_`). Default: the host name.
    pub runner_id: String,
    /// Where the workspace pool lives: one directory per workspace (a checkout, its LFS
    /// objects, a Bazel output base). Runners sharing it share the pool. Default
    /// `motorpool-data/runner/workspaces`.
    pub workspaces_dir: PathBuf,
    /// The pool's name in the workspace registry; runners with the same name share its
    /// workspaces (they must see the same `workspaces_dir`). Default `default`.
    pub pool: String,
    /// Workspaces in the pool at most. Default 4.
    pub pool_size: usize,
    /// Jobs this runner runs at once. Default 1.
    pub concurrency: usize,
    /// A workspace larger than this (bytes) is cleaned before reuse: `bazel clean`, then
    /// `git gc` and `git lfs prune`, then removed if still too big. Default 50 GiB.
    pub max_workspace_bytes: u64,
    /// A workspace's Bazel server stays alive this long (seconds) after a job, so the next job
    /// there finds its build graph in memory (`--max_idle_secs`). 0: no server kept
    /// (`--batch`). Default 10800.
    pub warm_server_idle_secs: u64,
    /// A workspace lease not renewed for this long (milliseconds) has lost its runner: the
    /// workspace is reset before reuse, and the job runs again elsewhere. Default 30000.
    pub lease_ms: u64,
    /// Runs of one job before its infrastructure failures (checkout, a lost runner, Bazel's
    /// own crashes) raise an alert and fail it. A failing build or test is a result, not
    /// retried. Default 3.
    pub max_attempts: u32,
    /// The Bazel binary. Default `bazel`.
    pub bazel: PathBuf,
    /// Bazel startup options before every command (for example
    /// `--host_jvm_args=-Djava.library.path=...` for Debian's Bazel over TLS).
    pub bazel_startup_flags: Vec<String>,
    /// Flags added to every job's command, after the job's own.
    pub bazel_flags: Vec<String>,
    /// The platform's gRPC endpoint, given to Bazel as `--remote_executor`
    /// (`grpc://` or `grpcs://`). Default `grpc://127.0.0.1:8980`.
    pub remote_executor: String,
    /// `--remote_instance_name`. Default: none.
    pub remote_instance_name: String,
    /// CA for a `grpcs://` endpoint (`--tls_certificate`).
    pub tls_certificate: Option<PathBuf>,
    /// Stream every job's build events to the platform (`--bes_backend`, the same endpoint),
    /// with the job, commit, branch and merge request as `--build_metadata`, so each job's
    /// build has its page. Default true.
    pub build_events: bool,
    /// The pages' base, given to Bazel as `--bes_results_url` (the job's log then links its
    /// build's page), for example `http://gateway:8080/invocation/`. Default: none.
    pub bes_results_url: Option<String>,
    /// API key file for trusted jobs (pushes to protected branches, tags): its key may write
    /// the action cache.
    pub trusted_key_file: Option<PathBuf>,
    /// API key file for merge-request jobs, whose code nobody has reviewed yet: its key must
    /// not have `write-ac`.
    pub untrusted_key_file: Option<PathBuf>,
    /// Where each project's commit statuses go.
    pub forges: ForgesConfig,
    /// HTTP address for `/api/v1/workspaces`, job logs, `/metrics` and `/healthz`. Default
    /// `127.0.0.1:8091`.
    pub http_addr: SocketAddr,
    /// Logging, tracing, metrics.
    pub telemetry: TelemetryConfig,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_nkey_file: None,
            nats_tls_ca_file: None,
            bus_timeout_ms: 5_000,
            runner_id: hostname(),
            workspaces_dir: PathBuf::from("motorpool-data/runner/workspaces"),
            pool: "default".into(),
            pool_size: 4,
            concurrency: 1,
            max_workspace_bytes: 50 << 30,
            warm_server_idle_secs: 10_800,
            lease_ms: 30_000,
            max_attempts: 3,
            bazel: PathBuf::from("bazel"),
            bazel_startup_flags: Vec::new(),
            bazel_flags: Vec::new(),
            remote_executor: "grpc://127.0.0.1:8980".into(),
            remote_instance_name: String::new(),
            tls_certificate: None,
            build_events: true,
            bes_results_url: None,
            trusted_key_file: None,
            untrusted_key_file: None,
            forges: ForgesConfig::default(),
            http_addr: "127.0.0.1:8091".parse().unwrap(),
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl ServiceConfig for RunnerConfig {
    const ENV_PREFIX: &'static str = "MOTORPOOL_RUNNER_";
}

/// `motorpool alert-relay`: delivers the platform's alerts (the `MP_V1_ALERTS` stream) to the
/// places people look: an Alertmanager, a chat room's webhook.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertRelayConfig {
    /// NATS server URL. Default `nats://127.0.0.1:4222`.
    pub nats_url: String,
    /// The nkey seed file this service connects to NATS with (`motorpool keys bus add --role
    /// alert-relay`); none = connect without credentials, for a bus that lets anyone in.
    pub nats_nkey_file: Option<PathBuf>,
    /// PEM CA of a NATS that speaks TLS. None: plain, unless the URL is `tls://`.
    pub nats_tls_ca_file: Option<PathBuf>,
    /// Where alerts go (`[[sinks]]`); at least one.
    pub sinks: Vec<AlertSink>,
    /// Seconds within which an alert of the same kind about the same thing (a worker, an
    /// operation, a CI job) reaches each sink once. Default 600.
    pub dedupe_s: u64,
    /// Alerts a chat sink gets per minute; the rest are counted, and the count goes out with
    /// the next message (Alertmanager groups and throttles by itself). Default 10.
    pub chat_per_minute: u32,
    /// HTTP address for `/metrics` and `/healthz`. Default: none.
    pub http_addr: Option<SocketAddr>,
    /// Logging, tracing, metrics.
    pub telemetry: TelemetryConfig,
}

impl Default for AlertRelayConfig {
    fn default() -> Self {
        AlertRelayConfig {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_nkey_file: None,
            nats_tls_ca_file: None,
            sinks: Vec::new(),
            dedupe_s: 600,
            chat_per_minute: 10,
            http_addr: None,
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl ServiceConfig for AlertRelayConfig {
    const ENV_PREFIX: &'static str = "MOTORPOOL_ALERT_RELAY_";
}

/// One place alerts go.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertSink {
    /// `alertmanager` (its base URL: alerts are posted to `/api/v2/alerts`), `slack` (an
    /// incoming webhook: `{"text": ...}`) or `feishu` (a custom bot's webhook: `{"msg_type":
    /// "text", ...}`).
    pub kind: AlertSinkKind,
    pub url: String,
    /// Only alerts of these kinds (`retries_exhausted`, `worker_lost`, ...). Default: every kind.
    #[serde(default)]
    pub kinds: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertSinkKind {
    Alertmanager,
    Slack,
    Feishu,
}

/// The forges a runner reports commit statuses to. A forge left unset gets no statuses.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForgesConfig {
    pub gitlab: Option<ForgeConfig>,
    pub github: Option<ForgeConfig>,
}

/// One forge's API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForgeConfig {
    /// API base URL: `https://gitlab.example.com/api/v4`, `https://api.github.com`.
    pub api_url: String,
    /// File holding the token (GitLab: `PRIVATE-TOKEN`; GitHub: a bearer token) with the right
    /// to set commit statuses.
    pub token_file: PathBuf,
    /// Link shown beside each status (the job's page); `{job}` is replaced by the job id.
    #[serde(default)]
    pub target_url: Option<String>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| {
            h.trim()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '-'
                    }
                })
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "runner".into())
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment's own large error
mod tests {
    use super::*;

    #[derive(Serialize, Default)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        grpc_addr: Option<SocketAddr>,
    }

    #[test]
    fn layers_apply_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "gw.toml",
                "grpc_addr = \"0.0.0.0:1\"\nhttp_addr = \"0.0.0.0:2\"\n[telemetry]\nlog_filter = \"warn\"\n",
            )?;
            jail.set_env("MOTORPOOL_GATEWAY_HTTP_ADDR", "0.0.0.0:3");
            jail.set_env("MOTORPOOL_GATEWAY_TELEMETRY__LOG_FORMAT", "json");
            let flags = Flags {
                grpc_addr: Some("127.0.0.1:4".parse().unwrap()),
            };
            let c: GatewayConfig = load(Some(Path::new("gw.toml")), &flags).unwrap();
            assert_eq!(c.grpc_addr.port(), 4, "flag wins over file");
            assert_eq!(c.http_addr.port(), 3, "env wins over file");
            assert_eq!(c.telemetry.log_filter, "warn", "file wins over default");
            assert_eq!(c.telemetry.log_format, LogFormat::Json);
            assert_eq!(c.max_batch_total_bytes, 4 * 1024 * 1024, "default kept");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("a.toml", "grpc_adr = \"0.0.0.0:1\"\n")?;
            let e =
                load::<GatewayConfig>(Some(Path::new("a.toml")), &Flags::default()).unwrap_err();
            assert!(e.to_string().contains("grpc_adr"), "{e}");
            jail.create_file("b.toml", "capacity_bytes = \"lots\"\n")?;
            let e = load::<ShardConfig>(Some(Path::new("b.toml")), &Flags::default()).unwrap_err();
            assert!(e.to_string().contains("capacity_bytes"), "{e}");
            assert!(
                load::<ShardConfig>(Some(Path::new("missing.toml")), &Flags::default()).is_err()
            );
            Ok(())
        });
    }

    #[test]
    fn example_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/config");
        let gw: GatewayConfig = load(Some(&dir.join("gateway.toml")), &Flags::default()).unwrap();
        assert_eq!(gw.grpc_addr.port(), 8980);
        assert_eq!(gw.auth.anonymous, Anonymous::Read);
        let shard: ShardConfig =
            load(Some(&dir.join("cas-shard.toml")), &Flags::default()).unwrap();
        assert!(shard.capacity_bytes > 0);
        let sched: SchedulerConfig =
            load(Some(&dir.join("scheduler.toml")), &Flags::default()).unwrap();
        assert_eq!(sched.max_attempts, 3);
        let worker: WorkerConfig = load(Some(&dir.join("worker.toml")), &Flags::default()).unwrap();
        assert_eq!(worker.platform.get("pool").map(String::as_str), Some("gpu"));
        assert_eq!(worker.slots, Some(16));
        assert_eq!(worker.sandbox.mode, SandboxMode::Strict);
        assert_eq!(worker.sandbox.memory_bytes, 8 << 30);
        let reindexer: ReindexerConfig =
            load(Some(&dir.join("reindexer.toml")), &Flags::default()).unwrap();
        assert_eq!(reindexer.replicas, 2);
        let label: LabelConfig = load(Some(&dir.join("label.toml")), &Flags::default()).unwrap();
        assert_eq!(label.concurrency, 2);
        let fleet: FleetConfig = load(Some(&dir.join("fleet.toml")), &Flags::default()).unwrap();
        assert_eq!(fleet.images_per_drive, 3);
        assert_eq!(fleet.drive_source, DriveSource::Udev);
        assert_eq!(fleet.udev_match, ["sd*", "nvme*"]);
        let webhook: WebhookConfig =
            load(Some(&dir.join("webhook.toml")), &Flags::default()).unwrap();
        assert_eq!(webhook.http_addr.port(), 8090);
        assert!(webhook.projects_file.is_some());
        let runner: RunnerConfig = load(Some(&dir.join("runner.toml")), &Flags::default()).unwrap();
        assert_eq!(runner.runner_id, "ci-1");
        assert_eq!(runner.max_attempts, 3);
        assert!(runner.forges.gitlab.is_some() && runner.forges.github.is_some());
        let relay: AlertRelayConfig =
            load(Some(&dir.join("alert-relay.toml")), &Flags::default()).unwrap();
        assert_eq!(relay.sinks.len(), 3);
        assert_eq!(relay.sinks[0].kind, AlertSinkKind::Alertmanager);
        assert_eq!(relay.sinks[2].kinds, ["ci_retries_exhausted"]);
    }
}
