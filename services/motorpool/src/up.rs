//! `motorpool up`: the whole stack on one machine, as child processes under a small supervisor.
//!
//! Children: one `nats-server` (JetStream, store under the data dir) or, with `--nats-cluster N`,
//! N routed to each other, N CAS shards, the scheduler (or, with `--schedulers N`, one active and
//! the others standing by), the reindexer, the three labeling stages
//! (mapping, prelabel, annotate), M workers (each also a CAS shard), one gateway, the webhook
//! service, the CI runners and, when a sink is named, the alert relay. A child (or a NATS server)
//! that exits unexpectedly is restarted after a short back-off. Every service's `/metrics` is
//! listed for Prometheus under `<data dir>/prometheus`. Ctrl-C (or SIGTERM) stops them in reverse
//! order (gateway, workers, scheduler, shards), then NATS, each with SIGTERM and a grace period.

use clap::Args;
use motorpool_bus::{NatsCluster, NatsServer, NatsServerOptions, Role};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The labeling stages, in pipeline order.
const STAGES: [&str; 3] = ["mapping", "prelabel", "annotate"];

/// Set on every child: the supervisor's pid, so a child stops when the supervisor is gone.
pub const SUPERVISOR_ENV: &str = "MOTORPOOL_SUPERVISOR_PID";

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Directory for all state (NATS store, CAS shards).
    #[arg(long, default_value = "motorpool-data")]
    data_dir: PathBuf,
    /// gRPC address Bazel connects to.
    #[arg(long, default_value = "127.0.0.1:8980")]
    grpc_addr: SocketAddr,
    /// HTTP address: /healthz, /readyz, /metrics.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_addr: SocketAddr,
    /// NATS client port (0 = any free port); with --nats-cluster, the first member's.
    #[arg(long, default_value_t = 4222)]
    nats_port: u16,
    /// Run NATS as a JetStream cluster of this many servers (3 or more: every stream and KV
    /// bucket is then kept three times, and the stack rides the loss of a server). `motorpool
    /// up` restarts a member that dies. Default 1, a single server.
    #[arg(long, default_value_t = 1)]
    nats_cluster: usize,
    /// Schedulers: one is active, the others stand by and take over within a few seconds when
    /// it dies (`motorpool up` restarts the dead one, which then stands by).
    #[arg(long, default_value_t = 1)]
    schedulers: usize,
    /// An object store behind every CAS shard, workers' included (`s3://bucket/prefix` with
    /// AWS_ENDPOINT for an S3-compatible server, `gs://`, `az://`, `file:///path`; credentials
    /// from the environment): blobs and action results are kept there too, and shards that
    /// lost theirs read them back.
    #[arg(long)]
    object_store_url: Option<String>,
    /// `through` or `behind` (see `motorpool cas-shard --help`).
    #[arg(long, value_parser = ["through", "behind"], default_value = "through")]
    object_store_write: String,
    /// Number of dedicated CAS shards (workers hold CAS shards too).
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Number of workers (separate processes; each runs actions and holds a CAS shard).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Action slots per worker [default: the number of CPUs].
    #[arg(long)]
    worker_slots: Option<u32>,
    /// How many of the workers serve the GPU pool (they advertise `pool=gpu`, `gpu=1`; on a
    /// machine without GPUs this exercises the GPU queues with CPU workers).
    #[arg(long, default_value_t = 0)]
    gpu_workers: usize,
    /// Capacity of each CAS shard in bytes.
    #[arg(long, default_value_t = 10 * 1024 * 1024 * 1024)]
    shard_capacity_bytes: u64,
    /// How large blobs travel between gateway and shards: direct or nats.
    #[arg(long, default_value = "direct")]
    blob_transport: String,
    /// Run actions unsandboxed, as this user (for a machine where the sandbox cannot run: not
    /// root, or no bubblewrap). Actions then have every right this user has.
    #[arg(long)]
    no_sandbox: bool,
    /// Let callers without a key read the cache (CAS and action-cache reads only).
    #[arg(long)]
    anonymous_read: bool,
    /// Serve gRPC over TLS with a certificate from a private CA made at the first start
    /// (`<data dir>/tls/ca.pem`; Bazel: `grpcs://` and `--tls_certificate`).
    #[arg(long)]
    tls: bool,
    /// Webhook address: forges post merge-request, push and tag events to
    /// `/hooks/<project>` (projects in `<data dir>/webhook/projects.toml`).
    #[arg(long, default_value = "127.0.0.1:8090")]
    webhook_addr: SocketAddr,
    /// The CI runners' first HTTP address (`/api/v1/workspaces`, job logs); runner N listens
    /// N ports above it.
    #[arg(long, default_value = "127.0.0.1:8091")]
    runner_addr: SocketAddr,
    /// CI runners (each takes CI jobs and keeps warm workspaces under `<data dir>/runner`).
    #[arg(long, default_value_t = 1)]
    runners: usize,
    /// A Bazel startup option for the runners' Bazel (repeat; for example
    /// `--host_jvm_args=...`).
    #[arg(long = "runner-bazel-startup-flag", allow_hyphen_values = true)]
    runner_bazel_startup_flags: Vec<String>,
    /// Where the services without an HTTP port of their own (the scheduler, reindexer, shards,
    /// workers, labeling stages) serve /metrics and /healthz: this address, then the ports
    /// above it; port 0 takes any free ports. Every service's address, the gateway's, webhook's
    /// and runners' included, is listed in `<data dir>/prometheus/targets.json`.
    #[arg(long, default_value = "127.0.0.1:9400")]
    metrics_addr: SocketAddr,
    /// Deliver the platform's alerts to this Alertmanager (its base URL) through an alert relay.
    #[arg(long)]
    alertmanager_url: Option<String>,
    /// Deliver the platform's alerts to this Slack incoming webhook through an alert relay.
    #[arg(long)]
    slack_webhook_url: Option<String>,
    /// Deliver the platform's alerts to this Feishu bot webhook through an alert relay.
    #[arg(long)]
    feishu_webhook_url: Option<String>,
    /// Instance name to print in the suggested Bazel flags.
    #[arg(long, default_value = "")]
    instance_name: String,
}

struct Supervised {
    name: String,
    args: Vec<String>,
    /// Environment variables of its own.
    env: Vec<(String, String)>,
    child: Option<Child>,
    restarts: u32,
    next_start: Instant,
    started_at: Instant,
}

impl Supervised {
    fn new(name: &str, args: Vec<String>) -> Supervised {
        Supervised {
            name: name.to_string(),
            args,
            env: Vec::new(),
            child: None,
            restarts: 0,
            next_start: Instant::now(),
            started_at: Instant::now(),
        }
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let exe = std::env::current_exe()?;
        let child = Command::new(exe)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env(SUPERVISOR_ENV, std::process::id().to_string())
            .stdin(Stdio::null())
            .spawn()?;
        tracing::info!(service = %self.name, pid = child.id(), "Started");
        self.child = Some(child);
        self.started_at = Instant::now();
        Ok(())
    }
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let _telemetry = motorpool_telemetry::init("up", &Default::default())?;
    std::fs::create_dir_all(&args.data_dir)?;
    anyhow::ensure!(
        args.no_sandbox || args.workers == 0 || nix::unistd::geteuid().is_root(),
        "workers run every action in a sandbox (its own user, namespaces and cgroup), which \
         needs root: run `motorpool up` as root, or pass --no-sandbox to run actions as uid {} \
         with all of its rights",
        nix::unistd::geteuid()
    );
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let (keys_file, keys) = crate::keys::stack_keys(&data_dir)?;
    anyhow::ensure!(
        args.shards + args.workers > 0,
        "the stack needs a CAS: ask for at least one shard or worker"
    );
    // Alerts go to people when a sink is named.
    let sinks: Vec<String> = [
        ("--alertmanager-url", &args.alertmanager_url),
        ("--slack-webhook-url", &args.slack_webhook_url),
        ("--feishu-webhook-url", &args.feishu_webhook_url),
    ]
    .into_iter()
    .filter_map(|(flag, url)| url.as_ref().map(|u| [flag.to_string(), u.clone()]))
    .flatten()
    .collect();
    let relay = !sinks.is_empty();
    // Every service is its own bus user, allowed only its own subjects.
    let mut users: Vec<(String, Role)> = (0..args.shards)
        .map(|i| format!("cas-{i}"))
        .map(|id| (id.clone(), Role::Shard(id)))
        .collect();
    users.extend((0..args.workers).map(|i| {
        let id = format!("worker-{i}");
        (id.clone(), Role::Worker(id))
    }));
    users.extend(
        [
            Role::Gateway,
            Role::Scheduler,
            Role::Reindexer,
            Role::Webhook,
        ]
        .into_iter()
        .chain(STAGES.map(|s| Role::Stage(s.into())))
        .chain((0..args.runners).map(|i| Role::Runner(format!("runner-{i}"))))
        .chain(relay.then_some(Role::AlertRelay))
        .map(|r| (r.default_name(), r)),
    );
    let (realm, seeds) = crate::keys::stack_bus(&data_dir, &users)?;
    // Runners need Bazel (and git, git-lfs, setpriv); a stack without them still serves the
    // cache, execution and webhooks, and says why it runs no runner.
    let missing = motorpool_runner::missing_tools(std::path::Path::new("bazel"));
    let runners = if missing.is_empty() { args.runners } else { 0 };
    let tls = if args.tls {
        Some(crate::tls::stack_tls(
            &data_dir,
            &[args.grpc_addr.ip(), args.http_addr.ip()],
        )?)
    } else {
        None
    };
    let https = tls
        .as_ref()
        .map(|t| crate::tls::connector(&t.ca))
        .transpose()?;
    anyhow::ensure!(
        args.schedulers >= 1,
        "--schedulers 0: the stack needs a scheduler"
    );
    anyhow::ensure!(
        args.nats_cluster == 1 || args.nats_cluster >= 3,
        "--nats-cluster {}: a JetStream cluster needs at least 3 servers (or 1, no cluster)",
        args.nats_cluster
    );
    let options = NatsServerOptions {
        port: args.nats_port,
        store_dir: Some(data_dir.join("nats")),
        log_file: Some(data_dir.join("nats.log")),
        realm: Some(realm),
        tls: tls
            .as_ref()
            .map(|t| (t.nats_cert.clone(), t.nats_key.clone())),
        ..Default::default()
    };
    let mut nats: Vec<NatsServer> = if args.nats_cluster > 1 {
        NatsCluster::start(args.nats_cluster, options)?.servers
    } else {
        vec![NatsServer::start_with(options)?]
    };
    let nats_url = nats
        .iter()
        .map(NatsServer::url)
        .collect::<Vec<_>>()
        .join(",");
    wait_for_jetstream(
        &nats_url,
        &seeds["admin"],
        tls.as_ref().map(|t| t.ca.as_path()),
    )
    .await?;
    let data_key = crate::keys::stack_data_key(&data_dir)?;
    let bus_args = |name: &str| -> Vec<String> {
        let mut a = vec![
            "--nats-url".into(),
            nats_url.clone(),
            "--nats-nkey-file".into(),
            seeds[name].display().to_string(),
        ];
        if let Some(t) = &tls {
            a.extend(["--nats-tls-ca-file".into(), t.ca.display().to_string()]);
        }
        a
    };
    // Everyone on the shards' data streams (shards, workers, the gateway, the reindexer)
    // proves the data key.
    let data_args = || {
        vec![
            "--data-key-file".to_string(),
            data_key.display().to_string(),
        ]
    };
    let tier_args: Vec<String> = match &args.object_store_url {
        Some(url) => vec![
            "--object-store-url".into(),
            url.clone(),
            "--object-store-write".into(),
            args.object_store_write.clone(),
        ],
        None => Vec::new(),
    };
    let mut children = Vec::new();
    for i in 0..args.shards {
        children.push(Supervised::new(
            &format!("cas-{i}"),
            [
                vec!["cas-shard".into()],
                bus_args(&format!("cas-{i}")),
                data_args(),
                vec![
                    "--shard-id".into(),
                    format!("cas-{i}"),
                    "--data-dir".into(),
                    data_dir.join(format!("cas-{i}")).display().to_string(),
                    "--capacity-bytes".into(),
                    args.shard_capacity_bytes.to_string(),
                ],
                tier_args.clone(),
            ]
            .concat(),
        ));
    }
    // Several schedulers share the scheduler's bus user; the lease tells them apart by id.
    for i in 0..args.schedulers {
        let name = if args.schedulers == 1 {
            "scheduler".to_string()
        } else {
            format!("scheduler-{i}")
        };
        children.push(Supervised::new(
            &name,
            [
                vec!["scheduler".to_string()],
                bus_args("scheduler"),
                vec!["--scheduler-id".into(), name.clone()],
            ]
            .concat(),
        ));
    }
    children.push(Supervised::new(
        "reindexer",
        [
            vec!["reindexer".to_string()],
            bus_args("reindexer"),
            data_args(),
        ]
        .concat(),
    ));
    for stage in STAGES {
        children.push(Supervised::new(
            stage,
            [
                vec![stage.to_string()],
                bus_args(stage),
                vec![
                    "--data-dir".into(),
                    data_dir.join("labels").display().to_string(),
                    "--worker-id".into(),
                    format!("{stage}-0"),
                ],
            ]
            .concat(),
        ));
    }
    for i in 0..args.workers {
        let mut a = [
            vec!["worker".to_string()],
            bus_args(&format!("worker-{i}")),
            data_args(),
        ]
        .concat();
        a.extend([
            "--worker-id".into(),
            format!("worker-{i}"),
            "--data-dir".into(),
            data_dir.join(format!("worker-{i}")).display().to_string(),
            "--cas-capacity-bytes".into(),
            args.shard_capacity_bytes.to_string(),
        ]);
        a.extend(tier_args.iter().cloned());
        if let Some(n) = args.worker_slots {
            a.extend(["--slots".to_string(), n.to_string()]);
        }
        if args.no_sandbox {
            a.extend(["--sandbox".to_string(), "off".to_string()]);
        }
        if i >= args.workers.saturating_sub(args.gpu_workers) {
            a.extend(["--platform", "pool=gpu", "--platform", "gpu=1"].map(String::from));
        }
        children.push(Supervised::new(&format!("worker-{i}"), a));
    }
    children.push(Supervised::new(
        "gateway",
        [
            vec!["gateway".to_string()],
            bus_args("gateway"),
            data_args(),
            vec![
                "--grpc-addr".into(),
                args.grpc_addr.to_string(),
                "--http-addr".into(),
                args.http_addr.to_string(),
                "--blob-transport".into(),
                args.blob_transport.clone(),
                "--keys-file".into(),
                keys_file.display().to_string(),
                "--anonymous".into(),
                if args.anonymous_read { "read" } else { "none" }.into(),
            ],
            tls.as_ref()
                .map(|t| {
                    vec![
                        "--tls-cert-file".into(),
                        t.cert.display().to_string(),
                        "--tls-key-file".into(),
                        t.key.display().to_string(),
                    ]
                })
                .unwrap_or_default(),
        ]
        .concat(),
    ));
    if let Some(gateway) = children.last_mut() {
        // The labels page shows the stages' report pictures from the shared data dir.
        gateway.env.push((
            "MOTORPOOL_GATEWAY_LABELS_DIR".into(),
            data_dir.join("labels").display().to_string(),
        ));
    }
    if relay {
        children.push(Supervised::new(
            "alert-relay",
            [
                vec!["alert-relay".to_string()],
                bus_args("alert-relay"),
                sinks,
            ]
            .concat(),
        ));
    }
    let projects = webhook_projects(&data_dir)?;
    children.push(Supervised::new(
        "webhook",
        [
            vec!["webhook".to_string()],
            bus_args("webhook"),
            vec![
                "--http-addr".into(),
                args.webhook_addr.to_string(),
                "--projects-file".into(),
                projects.display().to_string(),
            ],
        ]
        .concat(),
    ));
    let (trusted_key, untrusted_key) = crate::keys::stack_runner_keys(&data_dir, &keys_file)?;
    for i in 0..runners {
        let name = format!("runner-{i}");
        let mut a = [
            vec!["runner".to_string()],
            bus_args(&name),
            vec![
                "--runner-id".into(),
                name.clone(),
                "--workspaces-dir".into(),
                data_dir.join("runner/workspaces").display().to_string(),
                "--remote-executor".into(),
                format!(
                    "{}://{}",
                    if tls.is_some() { "grpcs" } else { "grpc" },
                    args.grpc_addr
                ),
                "--trusted-key-file".into(),
                trusted_key.display().to_string(),
                "--untrusted-key-file".into(),
                untrusted_key.display().to_string(),
                "--http-addr".into(),
                SocketAddr::new(args.runner_addr.ip(), args.runner_addr.port() + i as u16)
                    .to_string(),
            ],
        ]
        .concat();
        if let Some(t) = &tls {
            a.extend(["--tls-certificate".into(), t.ca.display().to_string()]);
        }
        let mut runner = Supervised::new(&name, a);
        // Each job's build gets its page; the job's log links it.
        runner.env.push((
            "MOTORPOOL_RUNNER_BES_RESULTS_URL".into(),
            format!(
                "{}://{}/invocation/",
                if https.is_some() { "https" } else { "http" },
                args.http_addr
            ),
        ));
        if !args.runner_bazel_startup_flags.is_empty() {
            // A list: the configuration's environment layer reads it as TOML.
            runner.env.push((
                "MOTORPOOL_RUNNER_BAZEL_STARTUP_FLAGS".into(),
                toml::Value::from(args.runner_bazel_startup_flags.clone()).to_string(),
            ));
        }
        children.push(runner);
    }
    // Every service's /metrics, listed where Prometheus finds them.
    let mut ports = crate::prometheus::Ports::new(args.metrics_addr);
    let mut targets = Vec::new();
    for c in &mut children {
        let own = c.args.iter().position(|a| a == "--http-addr");
        let addr = match own.and_then(|i| c.args.get(i + 1)) {
            Some(a) => a.parse()?,
            None => {
                let a = ports.next()?;
                c.args.extend(["--http-addr".into(), a.to_string()]);
                a
            }
        };
        targets.push(crate::prometheus::Target {
            service: c.name.clone(),
            addr,
            https: c.name == "gateway" && https.is_some(),
        });
    }
    let prometheus = crate::prometheus::write(
        &data_dir.join("prometheus"),
        &targets,
        tls.as_ref().map(|t| t.ca.as_path()),
    )?;
    if nats.len() > 1 {
        // Every stream and bucket three times, decided here rather than by what each service
        // sees of a cluster that may still be forming when it connects.
        for c in &mut children {
            c.env.push(("MOTORPOOL_NATS_REPLICAS".into(), "3".into()));
        }
    }
    for c in &mut children {
        c.spawn()?;
    }
    if let Err(e) = wait_ready(
        args.http_addr,
        https.as_ref(),
        args.webhook_addr,
        args.workers,
        &mut children,
        Duration::from_secs(60),
    )
    .await
    {
        stop_all(&mut children);
        return Err(e);
    }
    let instance = if args.instance_name.is_empty() {
        String::new()
    } else {
        format!(" --remote_instance_name={}", args.instance_name)
    };
    let instance = format!(
        "{instance} \\\n      --remote_header=authorization=Bearer {}",
        keys.developer
    );
    let (scheme, instance) = match &tls {
        Some(t) => (
            "grpcs",
            format!("{instance} \\\n      --tls_certificate={}", t.ca.display()),
        ),
        None => ("grpc", instance),
    };
    println!(
        "\nMotorpool is up.\n  NATS     {nats_url}  (each service its own nkey user: {dir}/bus/realm.toml)\n  gRPC     {scheme}://{grpc}\n  HTTP     {http_scheme}://{http}  (builds: /invocations; /readyz, /metrics, /api/v1/shards, /api/v1/queues)\n  Webhooks http://{webhook}/hooks/<project>  (projects: {dir}/webhook/projects.toml)\n  Runners  {runners}  (workspaces: http://{runner_addr}/api/v1/workspaces)\n  workers  {workers}\n  Metrics  {n_targets} services' /metrics in {dir}/prometheus/targets.json  (prometheus --config.file={prometheus})\n  data     {dir}\n\nAPI keys (kept in {dir}/credentials.toml, mode 0600; more with `motorpool keys add --keys-file {keys}`):\n  developer  {dev}  (read, write the CAS, execute up to the build lane)\n  ci         {ci}  (also write the action cache; any lane)\n  admin      {admin}  (everything; every caller's operations)\n\nBuild with the remote cache:\n  bazel build //... --remote_cache={scheme}://{grpc}{instance} \\\n      --noremote_upload_local_results   # results come from CI (its key may write them)\n{exec}\nSee each build (its events streamed to the gateway; add to either command):\n  --bes_backend={scheme}://{grpc} --bes_results_url={http_scheme}://{http}/invocation/\n\nLabel a parking clip (BevSlots):\n  motorpool label run <clip-dir> --nats-url {nats_url} --nats-nkey-file {dir}/bus/operator.nk{label_tls}\n\nPress Ctrl-C to stop.\n",
        workers = args.workers,
        n_targets = targets.len(),
        prometheus = prometheus.display(),
        label_tls = tls
            .as_ref()
            .map(|t| format!(" --nats-tls-ca-file {}", t.ca.display()))
            .unwrap_or_default(),
        exec = if args.workers > 0 {
            format!(
                "Build and test with remote execution:\n  bazel test //... --remote_executor={scheme}://{grpc}{instance}\n",
                grpc = args.grpc_addr
            )
        } else {
            String::new()
        },
        grpc = args.grpc_addr,
        http = args.http_addr,
        http_scheme = if https.is_some() { "https" } else { "http" },
        webhook = args.webhook_addr,
        runners = if runners == 0 && args.runners > 0 {
            format!(
                "0 (no {} on PATH: CI jobs wait for a runner)",
                missing.join(", ")
            )
        } else {
            runners.to_string()
        },
        runner_addr = args.runner_addr,
        dir = data_dir.display(),
        keys = keys_file.display(),
        dev = keys.developer,
        ci = keys.ci,
        admin = keys.admin,
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut realm = RealmWatch::new(data_dir.join("bus/realm.toml"));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tick.tick() => {
                supervise(&mut children);
                realm.reload_if_changed(&mut nats);
                restart_dead(&mut nats);
            }
        }
    }
    println!("Stopping Motorpool...");
    stop_all(&mut children);
    drop(nats);
    println!("Stopped.");
    Ok(())
}

/// The realm file as last loaded: `motorpool keys bus add|remove` change it, and the stack's
/// NATS re-reads it within a tick (users added, rotated or removed without a restart).
struct RealmWatch {
    path: PathBuf,
    seen: Option<std::time::SystemTime>,
}

impl RealmWatch {
    fn new(path: PathBuf) -> RealmWatch {
        let seen = Self::mtime(&path);
        RealmWatch { path, seen }
    }

    fn mtime(path: &std::path::Path) -> Option<std::time::SystemTime> {
        std::fs::metadata(path).and_then(|m| m.modified()).ok()
    }

    fn reload_if_changed(&mut self, nats: &mut [NatsServer]) {
        let now = Self::mtime(&self.path);
        if now == self.seen {
            return;
        }
        self.seen = now;
        match motorpool_bus::Realm::load(&self.path) {
            Ok(realm) => {
                for server in nats.iter_mut() {
                    match server.reload(realm.clone()) {
                        Ok(()) => {
                            tracing::info!(realm = %self.path.display(), port = server.port(), "Reloaded the bus's users")
                        }
                        Err(error) => tracing::error!(%error, "Cannot reload NATS"),
                    }
                }
            }
            // A realm that does not parse keeps the one in force.
            Err(error) => {
                tracing::error!(%error, "Kept the bus's users: the realm file is invalid")
            }
        }
    }
}

/// Starts again, on its port and store, a NATS server that died (a cluster member killed: the
/// others carried on meanwhile).
fn restart_dead(nats: &mut [NatsServer]) {
    for server in nats.iter_mut() {
        if server.exited() {
            tracing::warn!(port = server.port(), "NATS exited; restarting it");
            if let Err(error) = server.restart() {
                tracing::error!(%error, "Cannot restart NATS");
            }
        }
    }
}

/// Waits (up to 30 s) until JetStream answers: a cluster elects its leader after its routes are
/// up, and the services create their streams at start.
async fn wait_for_jetstream(
    url: &str,
    admin: &std::path::Path,
    tls_ca: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let bus = motorpool_bus::Bus::connect_service(
        url,
        "motorpool-up",
        Some(admin),
        tls_ca,
        Duration::from_secs(5),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match bus.jetstream().query_account().await {
            Ok(_) => return Ok(()),
            Err(error) if Instant::now() > deadline => {
                anyhow::bail!("JetStream did not answer within 30 s: {error}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Stops the children in reverse start order: gateway, workers, reindexer, scheduler, shards.
fn stop_all(children: &mut [Supervised]) {
    for c in children.iter_mut().rev() {
        if let Some(mut child) = c.child.take() {
            motorpool_bus::server::terminate(&mut child, Duration::from_secs(10));
            tracing::info!(service = %c.name, "Stopped");
        }
    }
}

fn supervise(children: &mut [Supervised]) {
    for c in children.iter_mut() {
        let exited = match c.child.as_mut() {
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => Some(status),
                _ => None,
            },
            None => None,
        };
        if let Some(status) = exited {
            // A child that ran a while before it died starts over with a short back-off.
            if c.started_at.elapsed() > Duration::from_secs(30) {
                c.restarts = 0;
            }
            c.restarts += 1;
            let backoff = Duration::from_millis(250 * 2u64.pow(c.restarts.min(6)));
            tracing::warn!(service = %c.name, %status, restarts = c.restarts, ?backoff, "Exited; restarting");
            c.child = None;
            c.next_start = Instant::now() + backoff;
        }
        if c.child.is_none()
            && Instant::now() >= c.next_start
            && let Err(error) = c.spawn()
        {
            tracing::error!(service = %c.name, %error, "Cannot restart");
        }
    }
}

/// The webhook service's projects file under the data dir, written with a commented example at
/// the first start (no project: every event gets 404 until one is added; the service re-reads
/// the file when it changes).
fn webhook_projects(data_dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    let dir = data_dir.join("webhook");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("projects.toml");
    if !file.exists() {
        std::fs::write(&file, PROJECTS_EXAMPLE)?;
    }
    Ok(file)
}

const PROJECTS_EXAMPLE: &str = r#"# Projects whose merge requests, pushes and tags start CI jobs (docs/config/projects.toml
# describes every key). The webhook service re-reads this file when it changes. A forge posts
# to http://<webhook address>/hooks/<name> with the project's secret token (GitLab) or secret
# (GitHub), kept in `secret_file` (mode 0600, at least 16 characters).
#
# [[project]]
# name = "av/monorepo"
# forge = "gitlab"
# secret_file = "monorepo.secret"
# labels = { "priority::release" = "release", "priority::low" = "lint" }
"#;

/// Waits until the gateway reports a live shard. A service that exits during start-up (an
/// address in use, a bad data dir) fails the whole start with its name, instead of being
/// restarted forever.
async fn wait_ready(
    http: SocketAddr,
    https: Option<&tokio_rustls::TlsConnector>,
    webhook: SocketAddr,
    workers: usize,
    children: &mut [Supervised],
    limit: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        // A service that exits during start-up is started again (a NATS cluster electing its
        // leaders can time its first calls out); one that keeps exiting stops the stack.
        for c in children.iter() {
            if c.restarts >= 3 {
                anyhow::bail!(
                    "{} exited {} times during start-up; see its log above",
                    c.name,
                    c.restarts
                );
            }
        }
        supervise(children);
        let webhook_up = http_get(webhook, None, "/healthz")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"));
        if let Some(ready) = http_get(http, https, "/readyz").await
            && ready.starts_with("HTTP/1.1 200")
            && webhook_up
        {
            if workers == 0 {
                return Ok(());
            }
            // Every worker is known to the scheduler.
            if let Some(q) = http_get(http, https, "/api/v1/queues").await
                && let Some(body) = q.split("\r\n\r\n").nth(1)
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(body)
                && v["workers"].as_u64() >= Some(workers as u64)
            {
                return Ok(());
            }
        }
        anyhow::ensure!(
            start.elapsed() < limit,
            "the stack was not ready within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An HTTP/1.1 GET on the stack's own HTTP port, over TLS where the port speaks it (trusting
/// only the stack's CA, for the name `localhost` its certificate carries): the whole response,
/// or `None`.
async fn http_get(
    addr: SocketAddr,
    https: Option<&tokio_rustls::TlsConnector>,
    path: &str,
) -> Option<String> {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    async fn exchange(mut s: impl AsyncRead + AsyncWrite + Unpin, req: String) -> Option<Vec<u8>> {
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        // A TLS peer may close without a close_notify once it has answered: keep what came.
        let _ = s.read_to_end(&mut buf).await;
        Some(buf).filter(|b| !b.is_empty())
    }
    let s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let buf = match https {
        None => exchange(s, req).await?,
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from("localhost").ok()?;
            exchange(tls.connect(name, s).await.ok()?, req).await?
        }
    };
    String::from_utf8(buf).ok()
}
