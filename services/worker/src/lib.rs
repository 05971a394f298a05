//! The worker actor: runs actions, and holds a CAS shard.
//!
//! Layout:
//! - this file: start-up (the embedded CAS shard, the mailboxes, the heartbeat) and the pipeline.
//! - [`inputs`]: input fetch (materialise the input tree through a hard-link cache).
//! - [`run`]: execute (timeout, cancellation, stdout/stderr kept up to their limit).
//! - [`sandbox`]: the action sandbox (bubblewrap namespaces, the sandbox user, a cgroup per action).
//! - [`outputs`]: report (collect and check outputs, upload, ActionResult).
//!
//! **The pipeline.** An assignment passes four stages: *match* (the assign mailbox checks the
//! platform and that the worker has room), *input fetch*, *execute*, *report*. Each stage has a
//! bounded number of jobs in work and a bounded queue in front of it, and takes a new job only
//! once the next stage's queue has a place reserved for its result (backpressure end to end). The
//! execute stage runs at most `slots` actions, and never two of the same action digest at once.
//! A job stays listed in the worker's heartbeat until the scheduler has acknowledged its
//! `JobDone`, so a scheduler never mistakes a finished job for a lost one.

pub mod inputs;
pub mod metric_names;
pub mod outputs;
pub mod run;
pub mod sandbox;

use anyhow::Context;
use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use futures::future::BoxFuture;
use motorpool_bus::{Bus, BusError, MailboxOptions, serve, subjects};
use motorpool_cas_client::{Shards, proto};
use motorpool_cas_shard::store::{Store, namespace};
use motorpool_config::{ShardConfig, WorkerConfig};
use motorpool_messages::exec::*;
use motorpool_messages::{BlobDigest, ErrorCode, WireError, now_ms};
use parking_lot::Mutex;
use prost::Message as _;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

/// Why a job could not produce its result.
#[derive(Debug)]
pub enum JobError {
    /// The action's fault (a missing input, a bad path): final, not retried.
    Action(WireError),
    /// The platform's fault (I/O, the bus, a shard): the scheduler retries elsewhere.
    Infra(String),
}

impl JobError {
    pub fn action(code: ErrorCode, message: impl Into<String>) -> Self {
        JobError::Action(WireError::new(code, message))
    }
    pub fn infra(message: impl Into<String>) -> Self {
        JobError::Infra(message.into())
    }
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobError::Action(e) => write!(f, "{}", e.message),
            JobError::Infra(m) => write!(f, "{m}"),
        }
    }
}

/// What every stage uses.
pub struct Services {
    pub worker_id: String,
    pub bus: Bus,
    pub shards: Shards,
    /// The worker's own CAS shard, read directly when it holds an input.
    pub store: Arc<Store>,
    pub cache: inputs::InputCache,
    /// Empty directories for exec roots.
    stash: Arc<inputs::DirStash>,
    pub config: WorkerConfig,
    /// `None` where the configuration turns the sandbox off.
    pub sandbox: Option<Arc<sandbox::Sandbox>>,
    exec_dir: PathBuf,
    /// Exec dirs whose jobs ended, kept for the next jobs (their roots are reconciled with the
    /// next input tree instead of being built from nothing; see `inputs`).
    spare_dirs: Mutex<Vec<PathBuf>>,
    /// How many spare exec dirs are kept; the rest are removed.
    spare_cap: usize,
    next_dir: std::sync::atomic::AtomicU64,
    /// Names the actions' cgroups.
    next_cgroup: std::sync::atomic::AtomicU64,
}

impl Services {
    /// An exec dir for a new job: a spare one, or a new name.
    fn take_exec_dir(&self) -> PathBuf {
        if let Some(d) = self.spare_dirs.lock().pop() {
            return d;
        }
        let n = self
            .next_dir
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.exec_dir.join(format!("job-{n}"))
    }

    /// Hands back the exec dir of an ended job: kept for reuse while there is room, else removed.
    async fn return_exec_dir(&self, dir: PathBuf) {
        {
            let mut spare = self.spare_dirs.lock();
            if spare.len() < self.spare_cap {
                spare.push(dir);
                return;
            }
        }
        let _ = tokio::task::spawn_blocking(move || make_writable_and_remove(&dir)).await;
    }

    /// Reads blobs whole: from the local shard when it has them, else from the cluster. A blob
    /// no live shard holds is the client's to upload again (FAILED_PRECONDITION), once a second
    /// look a few heartbeats later agrees: while the bus fails over, shards that hold it may
    /// miss a heartbeat and look gone for a moment.
    pub async fn read_many(
        &self,
        instance: &str,
        digests: &[BlobDigest],
    ) -> Result<Vec<Vec<u8>>, JobError> {
        match self.read_many_once(instance, digests).await {
            Err(JobError::Action(e)) if e.code == ErrorCode::FailedPrecondition => {
                tracing::info!(%instance, error = %e.message, "An input looks missing; looking again");
                tokio::time::sleep(Duration::from_millis(3 * self.config.heartbeat_ms.max(100)))
                    .await;
                self.read_many_once(instance, digests).await
            }
            other => other,
        }
    }

    async fn read_many_once(
        &self,
        instance: &str,
        digests: &[BlobDigest],
    ) -> Result<Vec<Vec<u8>>, JobError> {
        let mut out: Vec<Option<Vec<u8>>> = vec![None; digests.len()];
        let ns = namespace(instance);
        let store = self.store.clone();
        let ds = digests.to_vec();
        let local: Vec<Option<Vec<u8>>> = tokio::task::spawn_blocking(move || {
            // Whatever the local shard cannot give (absent, or unreadable) comes from the cluster.
            ds.iter().map(|d| store.read(ns, d, 0, 0).ok()).collect()
        })
        .await
        .map_err(|e| JobError::infra(format!("local read: {e}")))?;
        let mut small = Vec::new();
        let mut large = Vec::new();
        let mut fetched = std::collections::HashSet::new();
        for (i, b) in local.into_iter().enumerate() {
            match b {
                Some(b) => out[i] = Some(b),
                None if digests[i].size <= self.shards.payload_budget() as u64 / 2 => {
                    fetched.insert(digests[i]);
                    small.push(i)
                }
                None => {
                    fetched.insert(digests[i]);
                    large.push(i)
                }
            }
        }
        if !small.is_empty() {
            let want: Vec<BlobDigest> = small.iter().map(|&i| digests[i]).collect();
            let got = self
                .shards
                .batch_read(instance, &want)
                .await
                .map_err(|e| JobError::infra(format!("read inputs: {e}")))?;
            for (i, r) in small.into_iter().zip(got) {
                out[i] = Some(r.map_err(|e| missing_or_infra(&digests[i], e))?);
            }
        }
        for i in large {
            let b = self
                .shards
                .read_blob(instance, &digests[i])
                .await
                .map_err(|e| missing_or_infra(&digests[i], WireError::from(e)))?;
            out[i] = Some(b);
        }
        let out: Vec<Vec<u8>> = out
            .into_iter()
            .map(|b| b.expect("every blob read"))
            .collect();
        // What came over the network is hashed before an action sees it (the local shard
        // verified its own): a shard or a link that changed a byte is an infrastructure fault,
        // retried elsewhere, never an input.
        for (d, b) in digests
            .iter()
            .zip(&out)
            .filter(|(d, _)| fetched.contains(*d))
        {
            if let Err(e) = motorpool_cas_shard::store::verify(d, b) {
                metrics::counter!(crate::metric_names::WORKER_CORRUPT_INPUTS_TOTAL).increment(1);
                return Err(JobError::infra(format!("input {d} arrived corrupt: {e}")));
            }
        }
        Ok(out)
    }

    pub async fn read_one(&self, instance: &str, d: &BlobDigest) -> Result<Vec<u8>, JobError> {
        Ok(self
            .read_many(instance, std::slice::from_ref(d))
            .await?
            .pop()
            .expect("one blob"))
    }
}

fn missing_or_infra(d: &BlobDigest, e: WireError) -> JobError {
    if e.code == ErrorCode::NotFound {
        JobError::Action(WireError::missing_input("input blob", d))
    } else {
        JobError::infra(format!("read input {d}: {e}"))
    }
}

/// A job moving through the pipeline.
struct Job {
    op: Operation,
    cancel: CancellationToken,
    meta: re::ExecutedActionMetadata,
    exec_root: PathBuf,
    action: re::Action,
    command: re::Command,
    run: Option<run::RunOutcome>,
    stdout: PathBuf,
    stderr: PathBuf,
    /// The job's span in the trace of the Execute call behind it, if that call has one.
    span: tracing::Span,
}

impl Job {
    /// A span for one of the job's stages, under the job's; none outside a trace.
    fn stage_span(&self, stage: &'static str) -> tracing::Span {
        if self.span.is_none() {
            return tracing::Span::none();
        }
        tracing::info_span!(parent: &self.span, "worker.stage", otel.name = stage, op = %self.op.id)
    }
}

fn timestamp(t: SystemTime) -> Option<bazel_remote_apis::google::protobuf::Timestamp> {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Some(bazel_remote_apis::google::protobuf::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    })
}

/// The worker's shared state.
struct Worker {
    svc: Services,
    /// Jobs held (any stage, until the scheduler acknowledged their end), by operation id.
    held: Mutex<HashMap<String, Held>>,
    /// Action digests being executed here, to never run one twice at once.
    running_actions: Mutex<HashMap<(String, BlobDigest), Arc<Semaphore>>>,
    slots: u32,
    pool: Pool,
    platform: Vec<(String, String)>,
    started_at_ms: u64,
    draining: std::sync::atomic::AtomicBool,
    /// The data dir's token, in every heartbeat.
    instance: String,
}

/// A started worker.
pub struct Started {
    pub worker_id: String,
    /// The data dir's lock, held while the worker runs.
    _lock: nix::fcntl::Flock<std::fs::File>,
    shard: motorpool_cas_shard::Shard,
    shard_shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    worker: Arc<Worker>,
}

impl Started {
    /// Waits for shutdown, lets held jobs finish (bounded), then stops the shard.
    pub async fn join(self, shutdown: CancellationToken) {
        shutdown.cancelled().await;
        self.worker
            .draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !self.worker.held.lock().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for t in self.tasks {
            t.abort();
        }
        self.shard_shutdown.cancel();
        self.shard.stop().await;
        tracing::info!(worker = %self.worker_id, "Worker stopped");
    }
}

/// Starts the worker's CAS shard, pipeline, mailboxes and heartbeat.
pub async fn start(
    mut config: WorkerConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<Started> {
    if let Some(id) = &config.worker_id {
        anyhow::ensure!(
            subjects::valid_id(id),
            "worker id {id:?} must be 1-64 letters, digits, '-' or '_'"
        );
    }
    // Absolute from here on: actions are handed paths inside it, whatever their working dir.
    let data_dir = config.data_dir();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("create the data dir {}", data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&data_dir)?;
    let lock = lock_data_dir(&data_dir)?;
    let instance = data_dir_token(&data_dir)?;
    config.data_dir = Some(data_dir.clone());
    let shard_config = ShardConfig {
        nats_url: config.nats_url.clone(),
        nats_nkey_file: config.nats_nkey_file.clone(),
        nats_tls_ca_file: config.nats_tls_ca_file.clone(),
        data_key_file: config.data_key_file.clone(),
        shard_id: config.worker_id.clone(),
        data_dir: data_dir.join("cas"),
        capacity_bytes: config.cas_capacity_bytes,
        action_cache_share: config.cas_action_cache_share,
        data_addr: config.data_addr,
        advertise_addr: config.advertise_addr.clone(),
        heartbeat_ms: config.heartbeat_ms,
        fsync: false,
        http_addr: None,
        object_store: config.object_store.clone(),
        telemetry: config.telemetry.clone(),
    };
    std::fs::create_dir_all(&shard_config.data_dir)
        .with_context(|| format!("create {}", shard_config.data_dir.display()))?;
    let id = motorpool_cas_shard::resolve_shard_id(&shard_config)?;
    let shard_config = ShardConfig {
        shard_id: Some(id.clone()),
        ..shard_config
    };
    let bus = Bus::connect_service(
        &config.nats_url,
        &format!("worker-{id}"),
        config.nats_nkey_file.as_deref(),
        config.nats_tls_ca_file.as_deref(),
        Duration::from_secs(30),
    )
    .await?;
    let registry = bus.ensure_kv(subjects::exec::workers_config()).await?;
    refuse_a_live_namesake(&registry, &id, &instance, config.heartbeat_ms).await?;
    // The shard stops on its own token, after the pipeline has drained.
    let shard_shutdown = CancellationToken::new();
    let shard = motorpool_cas_shard::start(&shard_config, shard_shutdown.clone()).await?;
    let shards = Shards::watch(
        bus.clone(),
        Duration::from_secs(30),
        Duration::from_millis(config.heartbeat_ms * 5),
        motorpool_config::BlobTransport::Direct,
    )
    .await?
    .with_data_key(
        motorpool_messages::cas::load_data_key(config.data_key_file.as_deref())
            .map_err(anyhow::Error::msg)?,
    );
    let scratch = scratch_dir(&config, &id)?;
    let exec_dir = scratch.join("exec");
    if exec_dir.exists() {
        // Exec dirs of a previous run belong to jobs that are gone: they were retried elsewhere.
        let _ = make_writable_and_remove(&exec_dir);
    }
    std::fs::create_dir_all(&exec_dir)?;
    let cache = inputs::InputCache::open(scratch.join("cache"), config.input_cache_bytes)?;
    let sandbox = open_sandbox(&config, &id, &scratch).await?;
    let slots = config
        .slots
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get() as u32));
    let mut platform: Vec<(String, String)> = config
        .platform
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    platform.sort();
    if let Some(sb) = &sandbox {
        // What the sandbox lets an action ask for (numbers are maxima the scheduler matches).
        let (max_memory_mb, allow_network) = (
            config.sandbox.max_memory_bytes >> 20,
            config.sandbox.allow_network,
        );
        let mut offer = |k: &str, v: String| {
            if !platform.iter().any(|(pk, _)| pk == k) {
                platform.push((k.to_string(), v));
            }
        };
        offer("memory-mb", max_memory_mb.to_string());
        if allow_network {
            offer("network", "on".to_string());
        }
        platform.sort();
        tracing::info!(
            uid = config.sandbox.uid,
            cgroup = sb.cgroup_version(),
            "Actions run sandboxed"
        );
    }
    let pool = Pool::of(&platform);
    let owner = sandbox.as_ref().map(|s| s.owner());
    let worker = Arc::new(Worker {
        svc: Services {
            worker_id: id.clone(),
            bus: bus.clone(),
            shards,
            store: shard.store.clone(),
            cache,
            stash: Arc::new(inputs::DirStash::open(
                exec_dir.join("stash"),
                20_000,
                owner,
            )?),
            config: config.clone(),
            sandbox,
            exec_dir,
            spare_dirs: Mutex::default(),
            spare_cap: (slots + config.fetch_concurrency.max(1)) as usize,
            next_dir: Default::default(),
            next_cgroup: Default::default(),
        },
        held: Mutex::default(),
        running_actions: Mutex::default(),
        slots,
        pool,
        platform,
        started_at_ms: now_ms(),
        draining: Default::default(),
        instance,
    });

    // The pipeline: fetch -> execute -> report, each with a bounded queue in front.
    let cap = slots as usize;
    let (fetch_tx, fetch_rx) = mpsc::channel::<Job>(cap);
    let (exec_tx, exec_rx) = mpsc::channel::<Job>(cap);
    let (report_tx, report_rx) = mpsc::channel::<Job>(cap);
    let mut tasks = Vec::new();
    let w = worker.clone();
    tasks.push(stage(
        fetch_rx,
        Some(exec_tx),
        config.fetch_concurrency.max(1) as usize,
        move |job| {
            let w = w.clone();
            Box::pin(async move { w.fetch(job).await })
        },
    ));
    let w = worker.clone();
    tasks.push(stage(exec_rx, Some(report_tx), cap, move |job| {
        let w = w.clone();
        Box::pin(async move { w.execute(job).await })
    }));
    let w = worker.clone();
    tasks.push(stage(
        report_rx,
        None,
        config.upload_concurrency.max(1) as usize,
        move |job| {
            let w = w.clone();
            Box::pin(async move {
                w.report(job).await;
                None
            })
        },
    ));

    // Mailboxes.
    let w = worker.clone();
    tasks.push(
        serve(
            &bus,
            subjects::exec::assign(&id),
            MailboxOptions {
                queue_group: None,
                concurrency: 64,
            },
            shutdown.clone(),
            move |req: Assign| {
                let w = w.clone();
                let tx = fetch_tx.clone();
                async move { Ok(w.accept(req.operation, &tx)) }
            },
        )
        .await?,
    );
    let w = worker.clone();
    let mut stops = bus.subscribe::<Cancel>(&subjects::exec::stop(&id)).await?;
    tasks.push(tokio::spawn(async move {
        while let Some(c) = stops.next().await {
            if let Some(h) = w.held.lock().get(&c.operation_id) {
                tracing::info!(op = %c.operation_id, "Stopping a cancelled job");
                h.cancel.cancel();
            }
        }
    }));

    // Heartbeat.
    let w = worker.clone();
    let period = Duration::from_millis(config.heartbeat_ms.max(100));
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let info = w.info();
            if let Err(error) = w
                .svc
                .bus
                .publish(&subjects::exec::heartbeat(&info.worker_id), &info)
                .await
            {
                tracing::warn!(%error, "Heartbeat failed");
            }
            if let Ok(frame) = motorpool_messages::encode(&info) {
                let _ = registry.put(&info.worker_id, frame.into()).await;
            }
        }
    }));
    tracing::info!(worker = %id, slots, pool = %pool, "Worker is running");
    Ok(Started {
        worker_id: id,
        _lock: lock,
        shard,
        shard_shutdown,
        tasks,
        worker,
    })
}

/// Takes the data dir for this process: two workers never share one (their CAS, input cache and
/// exec dirs would trample each other). The lock goes with the process, however it ends.
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::io::{Read, Seek, Write};
    let path = dir.join("worker.lock");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    let mut lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
    {
        Ok(l) => l,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            anyhow::bail!(
                "the data dir {} is in use by another worker (pid {}): give each worker its own \
                 --data-dir",
                dir.display(),
                holder.trim()
            );
        }
        Err((_, e)) => anyhow::bail!("lock {}: {e}", path.display()),
    };
    lock.set_len(0)?;
    lock.rewind()?;
    write!(lock, "{}", std::process::id())?;
    Ok(lock)
}

/// The data dir's token (made at its first use): what the registry entry of a worker on this
/// data dir carries.
fn data_dir_token(dir: &std::path::Path) -> anyhow::Result<String> {
    let path = dir.join("worker-instance");
    if let Ok(t) = std::fs::read_to_string(&path)
        && !t.trim().is_empty()
    {
        return Ok(t.trim().to_string());
    }
    let token = format!("{:032x}", rand::random::<u128>());
    std::fs::write(&path, &token).with_context(|| format!("write {}", path.display()))?;
    Ok(token)
}

/// Refuses to start as `id` while another live worker holds it: its registry entry is still
/// being refreshed. An entry whose heartbeat is old, or that stops changing (this worker's own
/// previous run, killed and restarted at once), is taken over.
async fn refuse_a_live_namesake(
    registry: &async_nats::jetstream::kv::Store,
    id: &str,
    instance: &str,
    heartbeat_ms: u64,
) -> anyhow::Result<()> {
    let period = heartbeat_ms.max(100);
    let Some(first) = registry.entry(id).await? else {
        return Ok(());
    };
    let Ok(info) = motorpool_messages::decode::<WorkerInfo>(&first.value) else {
        return Ok(());
    };
    // Our own data dir's entry: its writer is dead, since we hold the data dir's lock.
    if info.instance == instance || now_ms().saturating_sub(info.heartbeat_at_ms) > 3 * period {
        return Ok(());
    }
    tokio::time::sleep(Duration::from_millis(3 * period)).await;
    let again = registry.entry(id).await?;
    if again.is_some_and(|e| e.revision != first.revision) {
        anyhow::bail!(
            "worker id {id} is in use: a live worker with it (started {} s ago) still sends \
             heartbeats; give each worker its own --worker-id",
            now_ms().saturating_sub(info.started_at_ms) / 1000
        );
    }
    Ok(())
}

/// Where exec roots and the input cache live (absolute: actions are handed paths inside it). In
/// the data dir unless `scratch_dir` says otherwise, or the sandbox user could not reach the data
/// dir (a parent without `o+x`, as a 0700 home directory is): then in
/// `/var/tmp/motorpool/<worker id>-<hash of the data dir>`, which only root may write.
fn scratch_dir(config: &WorkerConfig, id: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let absolute = |p: &std::path::Path| -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(p).with_context(|| format!("create {}", p.display()))?;
        Ok(std::fs::canonicalize(p)?)
    };
    if let Some(dir) = &config.scratch_dir {
        return absolute(dir);
    }
    let data = absolute(&config.data_dir())?;
    if config.sandbox.mode == motorpool_config::SandboxMode::Off {
        return Ok(data);
    }
    let uid = config.sandbox.uid;
    let blocked = data
        .ancestors()
        .find(|a| std::fs::metadata(a).is_ok_and(|m| m.mode() & 0o001 == 0 && m.uid() != uid));
    let Some(blocked) = blocked else {
        return Ok(data);
    };
    let shared = std::path::Path::new("/var/tmp/motorpool");
    // Named after the worker and its data dir: two stacks on one host may both have a worker-0.
    let own = shared.join(format!(
        "{id}-{:016x}",
        namespace(&data.display().to_string())
    ));
    for (dir, mode) in [(shared.to_path_buf(), 0o711), (own.clone(), 0o711)] {
        if !dir.exists() {
            std::fs::create_dir_all(&dir)?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))?;
        }
        let m = std::fs::symlink_metadata(&dir)?;
        anyhow::ensure!(
            m.is_dir() && m.uid() == 0 && m.mode() & 0o022 == 0,
            "{} must be a directory that only root can write",
            dir.display()
        );
    }
    tracing::info!(
        data_dir = %data.display(),
        blocked = %blocked.display(),
        scratch = %own.display(),
        "The sandbox user cannot reach the data dir: exec roots and the input cache go to the scratch dir"
    );
    Ok(own)
}

/// Opens the action sandbox (unless the configuration turns it off) and proves it with a probe
/// action, so that a host that cannot sandbox (no bwrap, no user namespaces, no cgroups, an exec
/// dir the sandbox user cannot reach) fails at start with the reason, not job by job. Also
/// closes the worker's own files (CAS, input cache) to every other user.
async fn open_sandbox(
    config: &WorkerConfig,
    id: &str,
    scratch: &std::path::Path,
) -> anyhow::Result<Option<Arc<sandbox::Sandbox>>> {
    let exec_dir = scratch.join("exec");
    use std::os::unix::fs::PermissionsExt;
    let Some(sb) = sandbox::Sandbox::open(&config.sandbox, id)? else {
        tracing::warn!(
            "The action sandbox is off (sandbox.mode = \"off\"): actions run as the worker's \
             user, with its rights, files and network"
        );
        return Ok(None);
    };
    for (dir, mode) in [
        (config.data_dir().join("cas"), 0o700),
        (scratch.join("cache"), 0o700),
        (exec_dir.clone(), 0o711),
    ] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("restrict {}", dir.display()))?;
    }
    let probe = exec_dir.join("probe");
    std::fs::create_dir_all(probe.join("root"))?;
    let uid = sb.owner().0;
    sandbox::give(&probe.join("root"), sb.owner())?;
    let command = re::Command {
        arguments: vec![
            "/bin/sh".into(),
            "-c".into(),
            "touch probe && test ! -r /etc/shadow".into(),
        ],
        ..Default::default()
    };
    let limits = sb.limits(&[]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let spec = run::RunSpec {
        command: &command,
        exec_root: &probe.join("root"),
        stdout: &probe.join("stdout"),
        stderr: &probe.join("stderr"),
        timeout: Duration::from_secs(30),
        nice: 0,
        max_stream_bytes: 64 * 1024,
        sandbox: Some((&sb, &limits, "probe")),
        max_file_bytes: config.sandbox.max_output_bytes,
    };
    let outcome = run::run(&spec, &CancellationToken::new())
        .await
        .map_err(|e| anyhow::anyhow!("the action sandbox cannot start: {e}"))?;
    let stderr = std::fs::read_to_string(probe.join("stderr")).unwrap_or_default();
    if outcome.exit_code != 0 || !probe.join("root/probe").exists() {
        anyhow::bail!(
            "the action sandbox cannot start: a probe action in {} exited {}: {} (every parent \
             of the exec dir must be searchable by uid {uid}; bwrap needs user namespaces)",
            probe.display(),
            outcome.exit_code,
            stderr.trim()
        );
    }
    let _ = make_writable_and_remove(&probe);
    Ok(Some(Arc::new(sb)))
}

/// Runs a worker until `shutdown` fires (the `motorpool worker` command).
pub async fn run(config: WorkerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    motorpool_telemetry::with_metrics(config.http_addr, async move {
        start(config, shutdown.clone()).await?.join(shutdown).await;
        Ok(())
    })
    .await
}

/// One pipeline stage: takes a job only when `concurrency` allows and the next stage's queue has a
/// place reserved for it.
fn stage(
    mut rx: mpsc::Receiver<Job>,
    next: Option<mpsc::Sender<Job>>,
    concurrency: usize,
    f: impl Fn(Job) -> BoxFuture<'static, Option<Job>> + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    let permits = Arc::new(Semaphore::new(concurrency));
    tokio::spawn(async move {
        loop {
            let slot = match &next {
                Some(tx) => match tx.clone().reserve_owned().await {
                    Ok(p) => Some(p),
                    Err(_) => break,
                },
                None => None,
            };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let Some(job) = rx.recv().await else { break };
            let fut = f(job);
            tokio::spawn(async move {
                let _permit = permit;
                if let (Some(job), Some(slot)) = (fut.await, slot) {
                    slot.send(job);
                }
            });
        }
    })
}

pub(crate) fn make_writable_and_remove(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fn walk(p: &std::path::Path) {
        if let Ok(meta) = std::fs::symlink_metadata(p)
            && meta.is_dir()
        {
            let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755));
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.flatten() {
                    walk(&e.path());
                }
            }
        }
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(_) => {
            walk(dir);
            std::fs::remove_dir_all(dir)
        }
    }
}

/// A job the worker holds: its attempt, how to cancel it, and its pipeline stage.
struct Held {
    attempt: u32,
    cancel: CancellationToken,
    stage: JobStage,
    since_ms: u64,
}

impl Worker {
    /// Records that `job` entered `stage` (shown in the heartbeat and the queues page).
    fn enter(&self, job: &Job, stage: JobStage) {
        if let Some(h) = self.held.lock().get_mut(&job.op.id) {
            h.stage = stage;
            h.since_ms = now_ms();
        }
    }

    fn info(&self) -> WorkerInfo {
        let mut running: Vec<HeldJob> = self
            .held
            .lock()
            .iter()
            .map(|(id, h)| HeldJob {
                operation_id: id.clone(),
                attempt: h.attempt,
                stage: h.stage,
                since_ms: h.since_ms,
            })
            .collect();
        running.sort_by(|a, b| a.operation_id.cmp(&b.operation_id));
        WorkerInfo {
            worker_id: self.svc.worker_id.clone(),
            pool: self.pool,
            platform: self.platform.clone(),
            slots: self.slots,
            running,
            started_at_ms: self.started_at_ms,
            heartbeat_at_ms: now_ms(),
            draining: self.draining.load(std::sync::atomic::Ordering::SeqCst),
            instance: self.instance.clone(),
        }
    }

    /// Stage 1, match: take the job if it fits this worker and the pipeline has room.
    fn accept(&self, op: Operation, fetch: &mpsc::Sender<Job>) -> AssignReply {
        let refuse = |reason: String| AssignReply {
            accepted: false,
            reason,
        };
        if self.draining.load(std::sync::atomic::Ordering::SeqCst) {
            return refuse("the worker is draining".into());
        }
        if op.pool != self.pool || !platform_matches(&op.platform, &self.platform) {
            return refuse(format!(
                "platform {:?} does not match this worker's {:?}",
                op.platform, self.platform
            ));
        }
        let mut held = self.held.lock();
        if held.contains_key(&op.id) {
            return AssignReply {
                accepted: true,
                reason: "already held".into(),
            };
        }
        let Ok(slot) = fetch.try_reserve() else {
            return refuse("the input-fetch queue is full".into());
        };
        let cancel = CancellationToken::new();
        held.insert(
            op.id.clone(),
            Held {
                attempt: op.attempts,
                cancel: cancel.clone(),
                stage: JobStage::Accepted,
                since_ms: now_ms(),
            },
        );
        let now = SystemTime::now();
        let meta = re::ExecutedActionMetadata {
            worker: self.svc.worker_id.clone(),
            queued_timestamp: timestamp(
                SystemTime::UNIX_EPOCH + Duration::from_millis(op.queued_ms),
            ),
            worker_start_timestamp: timestamp(now),
            ..Default::default()
        };
        let dir = self.svc.take_exec_dir();
        // Inside the Assign request's span when the scheduler sent one with the trace.
        let span = motorpool_bus::trace::in_current(|| {
            tracing::info_span!(
                "worker.job",
                op = %op.id,
                attempt = op.attempts,
                worker = %self.svc.worker_id,
            )
        });
        slot.send(Job {
            span,
            stdout: dir.join("stdout"),
            stderr: dir.join("stderr"),
            exec_root: dir.join("root"),
            op,
            cancel,
            meta,
            action: re::Action::default(),
            command: re::Command::default(),
            run: None,
        });
        AssignReply {
            accepted: true,
            reason: String::new(),
        }
    }

    /// Stage 2, input fetch.
    async fn fetch(&self, job: Job) -> Option<Job> {
        let span = job.stage_span("worker.fetch");
        tracing::Instrument::instrument(self.fetch_in_span(job), span).await
    }

    async fn fetch_in_span(&self, mut job: Job) -> Option<Job> {
        self.enter(&job, JobStage::Fetching);
        job.meta.input_fetch_start_timestamp = timestamp(SystemTime::now());
        match self.prepare(&mut job).await {
            Ok(()) => {
                job.meta.input_fetch_completed_timestamp = timestamp(SystemTime::now());
                self.enter(&job, JobStage::Ready);
                Some(job)
            }
            Err(e) => {
                self.finish(job, Err(e)).await;
                None
            }
        }
    }

    // Bazel 4 names outputs in the (deprecated) output_files and output_directories.
    #[allow(deprecated)]
    async fn prepare(&self, job: &mut Job) -> Result<(), JobError> {
        let op = &job.op;
        let f = op.digest_function;
        let action_blob = self.svc.read_one(&op.instance, &op.action).await?;
        job.action = re::Action::decode(action_blob.as_slice()).map_err(|e| {
            JobError::action(
                ErrorCode::InvalidArgument,
                format!("action {}: {e}", op.action),
            )
        })?;
        let command_digest = proto::digest(f, job.action.command_digest.as_ref())
            .map_err(|e| JobError::action(ErrorCode::InvalidArgument, format!("command: {e}")))?;
        let command_blob = self.svc.read_one(&op.instance, &command_digest).await?;
        job.command = re::Command::decode(command_blob.as_slice()).map_err(|e| {
            JobError::action(
                ErrorCode::InvalidArgument,
                format!("command {command_digest}: {e}"),
            )
        })?;
        let root = proto::digest(f, job.action.input_root_digest.as_ref()).map_err(|e| {
            JobError::action(ErrorCode::InvalidArgument, format!("input root: {e}"))
        })?;
        // The server creates the working directory and the parent directories of every output.
        let workdir = run::relative_path(&job.command.working_directory, "working directory")?;
        let mut dirs = vec![workdir.clone()];
        let outs = job
            .command
            .output_files
            .iter()
            .chain(&job.command.output_directories)
            .chain(&job.command.output_paths);
        for p in outs {
            let rel = run::relative_path(p, "output")?;
            if let Some(parent) = workdir.join(rel).parent() {
                dirs.push(parent.to_path_buf());
            }
        }
        if !job.exec_root.exists() {
            let parent = job
                .exec_root
                .parent()
                .expect("the root is inside its job dir");
            std::fs::create_dir_all(parent)
                .and_then(|()| self.svc.stash.make(&job.exec_root))
                .map_err(|e| JobError::infra(format!("create exec dir: {e}")))?;
        }
        inputs::materialize(&self.svc, &op.instance, f, root, &job.exec_root, &dirs).await
    }

    /// Stage 3, execute.
    async fn execute(&self, job: Job) -> Option<Job> {
        let span = job.stage_span("worker.execute");
        tracing::Instrument::instrument(self.execute_in_span(job), span).await
    }

    async fn execute_in_span(&self, mut job: Job) -> Option<Job> {
        let key = (job.op.instance.clone(), job.op.action);
        let gate = self
            .running_actions
            .lock()
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(1)))
            .clone();
        let Ok(_one) = gate.acquire().await else {
            self.finish(job, Err(JobError::infra("the action gate closed")))
                .await;
            return None;
        };
        let cfg = &self.svc.config;
        let timeout = match job.op.timeout_ms {
            0 => cfg.default_timeout_ms,
            t => t.min(cfg.max_timeout_ms),
        };
        let sandbox = self.svc.sandbox.as_deref();
        let limits = match sandbox.map(|s| s.limits(&job.op.platform)).transpose() {
            Ok(l) => l,
            Err(e) => {
                self.finish(job, Err(e)).await;
                return None;
            }
        };
        let cgroup = format!(
            "a{}",
            self.svc
                .next_cgroup
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        self.enter(&job, JobStage::Executing);
        job.meta.execution_start_timestamp = timestamp(SystemTime::now());
        let spec = run::RunSpec {
            command: &job.command,
            exec_root: &job.exec_root,
            stdout: &job.stdout,
            stderr: &job.stderr,
            timeout: Duration::from_millis(timeout),
            nice: cfg.action_nice,
            max_stream_bytes: cfg.sandbox.max_stream_bytes,
            sandbox: sandbox
                .zip(limits.as_ref())
                .map(|(s, l)| (s, l, cgroup.as_str())),
            max_file_bytes: cfg.sandbox.max_output_bytes,
        };
        let r = run::run(&spec, &job.cancel).await;
        job.meta.execution_completed_timestamp = timestamp(SystemTime::now());
        {
            let mut ra = self.running_actions.lock();
            if Arc::strong_count(&gate) <= 2 {
                ra.remove(&key);
            }
        }
        match r {
            Ok(outcome) => {
                job.run = Some(outcome);
                Some(job)
            }
            Err(e) => {
                self.finish(job, Err(e)).await;
                None
            }
        }
    }

    /// Stage 4, report.
    async fn report(&self, mut job: Job) {
        let span = job.stage_span("worker.upload");
        self.enter(&job, JobStage::Uploading);
        job.meta.output_upload_start_timestamp = timestamp(SystemTime::now());
        let r = tracing::Instrument::instrument(self.collect_and_upload(&mut job), span).await;
        let span = job.stage_span("worker.report");
        tracing::Instrument::instrument(self.finish(job, r), span).await;
    }

    async fn collect_and_upload(&self, job: &mut Job) -> Result<Outcome, JobError> {
        let run = job.run.as_ref().expect("executed");
        let f = job.op.digest_function;
        let mut result = re::ActionResult {
            exit_code: run.exit_code,
            ..Default::default()
        };
        let mut uploads = outputs::Uploads::default();
        outputs::std_streams(f, &job.stdout, &job.stderr, &mut result, &mut uploads)?;
        if !run.timed_out && !run.cancelled {
            let max = self.svc.config.sandbox.max_output_bytes;
            outputs::collect(
                &job.command,
                &job.exec_root,
                f,
                max,
                &mut result,
                &mut uploads,
            )?;
        }
        outputs::upload(&self.svc, &job.op.instance, uploads).await?;
        job.meta.output_upload_completed_timestamp = timestamp(SystemTime::now());
        job.meta.worker_completed_timestamp = timestamp(SystemTime::now());
        result.execution_metadata = Some(job.meta.clone());
        let encoded = result.encode_to_vec();
        let (error, message) = if run.cancelled {
            (
                Some(WireError::new(
                    ErrorCode::Cancelled,
                    "the operation was cancelled",
                )),
                "cancelled".to_string(),
            )
        } else if run.timed_out {
            (
                Some(WireError::new(
                    ErrorCode::DeadlineExceeded,
                    format!("the action exceeded its timeout after {:?}", run.elapsed),
                )),
                "timed out".to_string(),
            )
        } else if run.oom_killed {
            (
                None,
                "killed for going over its memory limit (see its stderr)".to_string(),
            )
        } else {
            (None, String::new())
        };
        let cacheable = error.is_none() && run.exit_code == 0 && !job.action.do_not_cache;
        if cacheable {
            self.svc
                .shards
                .ac_put(&job.op.instance, &job.op.action, encoded.clone())
                .await
                .map_err(|e| JobError::infra(format!("store the action result: {e}")))?;
        }
        Ok(Outcome {
            error,
            result: Some(encoded),
            cached: false,
            message,
        })
    }

    /// Ends a job: hand back its dir, report it until the scheduler acknowledges, release it.
    async fn finish(&self, job: Job, result: Result<Outcome, JobError>) {
        if let Some(dir) = job.exec_root.parent() {
            self.svc.return_exec_dir(dir.to_path_buf()).await;
        }
        let result = match result {
            Ok(o) => JobResult::Finished(o),
            Err(JobError::Action(e)) => JobResult::Finished(Outcome {
                message: e.message.clone(),
                error: Some(e),
                result: None,
                cached: false,
            }),
            Err(JobError::Infra(m)) => {
                tracing::warn!(op = %job.op.id, error = %m, "Job failed for an infrastructure reason");
                metrics::counter!(crate::metric_names::WORKER_INFRASTRUCTURE_FAILURES_TOTAL)
                    .increment(1);
                JobResult::Infrastructure(m)
            }
        };
        let kind = match &result {
            JobResult::Finished(o) if o.error.is_none() => "ok",
            JobResult::Finished(_) => "error",
            JobResult::Infrastructure(_) => "infrastructure",
        };
        metrics::counter!(crate::metric_names::WORKER_JOBS_TOTAL, "result" => kind).increment(1);
        let done = JobDone {
            operation_id: job.op.id.clone(),
            attempt: job.op.attempts,
            worker: self.svc.worker_id.clone(),
            result,
        };
        self.enter(&job, JobStage::Reporting);
        let mut backoff = Duration::from_millis(50);
        let give_up = tokio::time::Instant::now() + Duration::from_secs(600);
        loop {
            match self
                .svc
                .bus
                .request_with_timeout(
                    &subjects::exec::job_done(&done.worker),
                    &done,
                    Duration::from_secs(5),
                )
                .await
            {
                Ok(Ack) => break,
                Err(BusError::Remote(error)) if error.code != ErrorCode::Unavailable => {
                    // The scheduler answered and refused: asking again changes nothing.
                    tracing::error!(op = %done.operation_id, %error, "The scheduler refused a job report");
                    break;
                }
                Err(error) => {
                    if tokio::time::Instant::now() > give_up {
                        tracing::error!(op = %done.operation_id, %error, "Gave up reporting a job");
                        break;
                    }
                    tracing::debug!(op = %done.operation_id, %error, "Scheduler not reachable; retrying the report");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        self.held.lock().remove(&done.operation_id);
    }
}
