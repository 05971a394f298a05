//! The stage actor every labeling service runs, and the client side: submit a clip, watch it.
//!
//! A stage actor takes [`LabelJob`]s from its lane queue (one durable JetStream consumer per lane,
//! [`motorpool_bus::LaneQueue`]), at most `concurrency` at a time, and for each:
//! 1. records `Running` in the status bucket;
//! 2. computes its input key; when `v<version>-<key>` exists it is reused (`cached`);
//! 3. otherwise runs the stage's work on a blocking thread into a temporary directory, reporting
//!    progress, and commits it ([`crate::store::commit`]);
//! 4. records `Done`, marks the next stage `Queued` and queues the job (with this output
//!    appended) for it in the same lane, and only then acknowledges the job.
//!
//! A failure in the input (a malformed clip, a missing file) is final: `Failed` with the reason,
//! and the job leaves the queue. An I/O failure is retried twice (redelivery), then final too.
//! An actor that dies mid-job leaves it to be redelivered; outputs are idempotent.

use crate::LabelError;
use crate::clip::Clip;
use crate::store::{self, OutputManifest};
use motorpool_bus::{Bus, BusError, Delivery, LaneQueue, LaneQueueOptions, subjects};
use motorpool_messages::exec::Lane;
use motorpool_messages::label::{
    LabelJob, LabelParams, Stage, StageOutput, StageState, StageStatus,
};
use motorpool_messages::{codec, now_ms};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Work units done so far, shared between a stage's blocking work and its status reporter.
#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
    }
    pub fn advance(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }
}

/// What a stage does; the actor does the rest.
pub trait StageWork: Send + Sync + 'static {
    const STAGE: Stage;
    /// Bump when the output changes for the same inputs (algorithm, format).
    const VERSION: u32;
    /// A hash of everything the output depends on.
    fn input_key(&self, job: &LabelJob) -> Result<String, LabelError>;
    /// Writes the output into `out`, an empty directory; `dir` is where it will be once
    /// committed (for outputs that name their own files, such as Label Studio's image URLs).
    fn run(
        &self,
        job: &LabelJob,
        out: &Path,
        dir: &Path,
        progress: &Progress,
    ) -> Result<(), LabelError>;
}

/// How a stage actor runs.
#[derive(Clone, Debug)]
pub struct StageOptions {
    /// Root of the label store (outputs of every clip).
    pub data_dir: PathBuf,
    /// This instance's name in statuses.
    pub worker_id: String,
    /// Jobs worked on at once.
    pub concurrency: usize,
    /// Aging step of the lane rule.
    pub aging_step_ms: u64,
    /// A held job not kept alive for this long is redelivered.
    pub ack_wait: Duration,
    /// Where this stage sees the clips that jobs name by a relative path (`--clips-dir`).
    pub clips_dir: Option<PathBuf>,
}

/// The directory of a job's clip as this stage sees it: an absolute path as it is; a relative
/// one (a clip submitted with `--clips-root`) under the stage's `clips_dir`, which it may not
/// leave.
pub fn clip_path(clip_dir: &str, clips_dir: Option<&Path>) -> Result<PathBuf, LabelError> {
    let p = Path::new(clip_dir);
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    if clip_dir.is_empty()
        || p.components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(LabelError::Input(format!(
            "clip path {clip_dir:?} is not a path inside the clips directory"
        )));
    }
    let root = clips_dir.ok_or_else(|| {
        LabelError::Input(format!(
            "clip {clip_dir:?} was submitted relative to a clips directory, and this stage was given none (--clips-dir)"
        ))
    })?;
    Ok(root.join(p))
}

/// Runs the stage as a single job, without the bus: computes the key, reuses or produces the
/// output. What the actor does for each job, and what `motorpool label bench` times.
pub fn run_once<W: StageWork>(
    work: &W,
    job: &LabelJob,
    data_dir: &Path,
    progress: &Progress,
) -> Result<StageOutput, LabelError> {
    let started = Instant::now();
    job.params.check().map_err(|e| {
        LabelError::Input(format!("clip {}: the labeling settings: {e}", job.clip_id))
    })?;
    let key = work.input_key(job)?;
    let dir = store::output_dir(data_dir, &job.clip_id, W::STAGE, W::VERSION, &key);
    let output = |cached: bool, elapsed_ms: u64| StageOutput {
        stage: W::STAGE,
        key: format!("v{}-{key}", W::VERSION),
        dir: dir.display().to_string(),
        cached,
        elapsed_ms,
    };
    if store::read_manifest(&dir).is_some() {
        return Ok(output(true, started.elapsed().as_millis() as u64));
    }
    let tmp = dir.with_file_name(format!(
        ".tmp-v{}-{key}-{}",
        W::VERSION,
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&tmp)
        .map_err(|e| LabelError::io(format!("create {}", tmp.display()), e))?;
    if let Err(e) = work.run(job, &tmp, &dir, progress) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let manifest = OutputManifest {
        clip_id: job.clip_id.clone(),
        stage: W::STAGE,
        version: W::VERSION,
        key: key.clone(),
        job_id: job.job_id.clone(),
        created_ms: now_ms(),
        elapsed_ms,
        files: vec![],
        params: Some(job.params.clone()),
    };
    let fresh = store::commit(&tmp, &dir, &manifest)
        .map_err(|e| LabelError::io(format!("commit {}", dir.display()), e))?;
    Ok(output(!fresh, elapsed_ms))
}

/// Serves one stage until `shutdown`.
pub async fn serve_stage<W: StageWork>(
    bus: Bus,
    work: Arc<W>,
    options: StageOptions,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let status = bus.ensure_kv(subjects::label::status_config()).await?;
    let stage = W::STAGE;
    let queue = LaneQueue::<LabelJob>::open(
        &bus,
        subjects::label::jobs_stream_config(),
        LaneQueueOptions {
            consumer: match stage {
                Stage::Mapping => |l| subjects::label::consumer(Stage::Mapping, l),
                Stage::Prelabel => |l| subjects::label::consumer(Stage::Prelabel, l),
                Stage::Annotate => |l| subjects::label::consumer(Stage::Annotate, l),
            },
            subject: match stage {
                Stage::Mapping => |l| subjects::label::run(Stage::Mapping, l),
                Stage::Prelabel => |l| subjects::label::run(Stage::Prelabel, l),
                Stage::Annotate => |l| subjects::label::run(Stage::Annotate, l),
            },
            aging_step_ms: options.aging_step_ms,
            ack_wait: options.ack_wait,
            max_deliver: 5,
        },
    )
    .await?;
    tracing::info!(%stage, worker = %options.worker_id, "Labeling stage ready");
    let concurrency = options.concurrency;
    let options = Arc::new(options);
    queue
        .serve(concurrency, shutdown, move |delivery| {
            let (bus, status, work, options) =
                (bus.clone(), status.clone(), work.clone(), options.clone());
            async move { handle(&bus, &status, work, &options, delivery).await }
        })
        .await;
    Ok(())
}

async fn handle<W: StageWork>(
    bus: &Bus,
    status: &async_nats::jetstream::kv::Store,
    work: Arc<W>,
    options: &StageOptions,
    delivery: Delivery<LabelJob>,
) {
    let stage = W::STAGE;
    let job = delivery.msg.clone();
    let started_ms = now_ms();
    let mut record = StageStatus {
        job_id: job.job_id.clone(),
        clip_id: job.clip_id.clone(),
        stage,
        lane: job.lane,
        state: StageState::Running { done: 0, total: 0 },
        worker: options.worker_id.clone(),
        queued_ms: delivery.queued_ms,
        started_ms,
        updated_ms: started_ms,
    };
    put_status(status, &record).await;
    tracing::info!(%stage, job = %job.job_id, clip = %job.clip_id, lane = %job.lane, "Started a clip");

    let progress = Arc::new(Progress::default());
    let done = CancellationToken::new();
    let reporter = {
        let (status, progress, done, mut record) = (
            status.clone(),
            progress.clone(),
            done.clone(),
            record.clone(),
        );
        tokio::spawn(async move {
            let mut last = (u64::MAX, u64::MAX);
            loop {
                tokio::select! {
                    _ = done.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
                let (d, t) = progress.get();
                if (d, t) != last {
                    last = (d, t);
                    record.state = StageState::Running { done: d, total: t };
                    record.updated_ms = now_ms();
                    put_status(&status, &record).await;
                }
            }
        })
    };
    // Under the job's span when it was queued within a trace (`label run` against a traced
    // stack, the stage before this one).
    let span = motorpool_bus::trace::in_current(
        || tracing::info_span!("label.stage", otel.name = stage.name(), job = %job.job_id, clip = %job.clip_id),
    );
    // The clip as this stage sees it; the job forwarded to the next stage keeps the path it
    // was submitted with, for that stage to resolve on its own host.
    let local = clip_path(&job.clip_dir, options.clips_dir.as_deref()).map(|dir| LabelJob {
        clip_dir: dir.display().to_string(),
        ..job.clone()
    });
    let result = {
        let (work, data_dir, progress) = (work.clone(), options.data_dir.clone(), progress.clone());
        let run =
            tokio::task::spawn_blocking(move || run_once(&*work, &local?, &data_dir, &progress));
        tracing::Instrument::instrument(run, span)
            .await
            .unwrap_or_else(|e| Err(LabelError::Internal(format!("the stage panicked: {e}"))))
    };
    done.cancel();
    let _ = reporter.await;
    record.updated_ms = now_ms();
    metrics::histogram!(crate::metric_names::LABEL_STAGE_SECONDS, "stage" => stage.name())
        .record((record.updated_ms - started_ms) as f64 / 1000.0);

    let output = match result {
        Ok(output) => output,
        Err(error) => {
            let retry = error.is_retryable() && delivery.delivered < 3;
            tracing::warn!(%stage, job = %job.job_id, clip = %job.clip_id, %error, retry, "A clip failed");
            metrics::counter!(crate::metric_names::LABEL_FAILURES_TOTAL, "stage" => stage.name())
                .increment(1);
            if retry {
                record.state = StageState::Queued;
                put_status(status, &record).await;
                let _ = delivery.nak(Duration::from_secs(2)).await;
            } else {
                record.state = StageState::Failed {
                    reason: error.to_string(),
                };
                put_status(status, &record).await;
                let _ = delivery.term().await;
            }
            return;
        }
    };
    tracing::info!(%stage, job = %job.job_id, clip = %job.clip_id, cached = output.cached, ms = output.elapsed_ms, "Finished a clip");
    // Done first (the output exists whatever happens next), then the next stage.
    record.state = StageState::Done(output.clone());
    record.updated_ms = now_ms();
    put_status(status, &record).await;
    if let Some(next) = stage.next() {
        let mut forwarded = job.clone();
        forwarded.outputs.retain(|o| o.stage != stage);
        forwarded.outputs.push(output);
        let queued = StageStatus {
            stage: next,
            state: StageState::Queued,
            worker: String::new(),
            queued_ms: now_ms(),
            started_ms: 0,
            updated_ms: now_ms(),
            ..record.clone()
        };
        put_status(status, &queued).await;
        if let Err(error) = bus
            .enqueue(&subjects::label::run(next, job.lane), &forwarded)
            .await
        {
            // Not forwarded: leave the job to be redelivered (the output is reused then).
            tracing::warn!(%stage, job = %job.job_id, %error, "Cannot queue the next stage; will retry");
            let _ = delivery.nak(Duration::from_secs(1)).await;
            return;
        }
    }
    if let Err(error) = delivery.ack().await {
        tracing::warn!(%stage, job = %job.job_id, %error, "Cannot acknowledge a finished job");
    }
}

async fn put_status(kv: &async_nats::jetstream::kv::Store, s: &StageStatus) {
    let key = subjects::label::status_key(&s.job_id, s.stage);
    match codec::encode(s) {
        Ok(bytes) => {
            if let Err(error) = kv.put(key, bytes.into()).await {
                tracing::warn!(%error, "Cannot record a labeling status");
            }
        }
        Err(error) => tracing::warn!(%error, "Cannot encode a labeling status"),
    }
}

/// Queues a clip for the pipeline: checks the clip, records `Queued` for mapping and puts the
/// job on the mapping queue of `lane`. With `clips_root` (the directory the stages see as their
/// `--clips-dir`, on another host or in containers) the clip must lie under it and the job names
/// it relative to it; without, by its absolute path.
pub async fn submit(
    bus: &Bus,
    clip_dir: &Path,
    clips_root: Option<&Path>,
    lane: Lane,
    params: LabelParams,
) -> Result<LabelJob, LabelError> {
    let dir = std::fs::canonicalize(clip_dir)
        .map_err(|e| LabelError::io(format!("clip directory {}", clip_dir.display()), e))?;
    let clip = Clip::open(&dir)?;
    let named = match clips_root {
        None => dir.display().to_string(),
        Some(root) => {
            let root = std::fs::canonicalize(root)
                .map_err(|e| LabelError::io(format!("clips root {}", root.display()), e))?;
            match dir.strip_prefix(&root) {
                Ok(rel) if !rel.as_os_str().is_empty() => rel.display().to_string(),
                _ => {
                    return Err(LabelError::Input(format!(
                        "clip {} is not inside the clips root {}",
                        dir.display(),
                        root.display()
                    )));
                }
            }
        }
    };
    params.check().map_err(|e| {
        LabelError::Input(format!("clip {}: the labeling settings: {e}", clip.id()))
    })?;
    bus.ensure_stream(subjects::label::jobs_stream_config())
        .await
        .map_err(|e| LabelError::Bus(e.to_string()))?;
    let status = bus
        .ensure_kv(subjects::label::status_config())
        .await
        .map_err(|e| LabelError::Bus(e.to_string()))?;
    let job = LabelJob {
        job_id: uuid::Uuid::new_v4().simple().to_string(),
        clip_id: clip.id().to_string(),
        clip_dir: named,
        lane,
        submitted_ms: now_ms(),
        params,
        outputs: vec![],
    };
    put_status(
        &status,
        &StageStatus {
            job_id: job.job_id.clone(),
            clip_id: job.clip_id.clone(),
            stage: Stage::Mapping,
            lane,
            state: StageState::Queued,
            worker: String::new(),
            queued_ms: job.submitted_ms,
            started_ms: 0,
            updated_ms: job.submitted_ms,
        },
    )
    .await;
    // A clip's trace starts here; each stage queues the next inside it.
    let span = tracing::info_span!("label.submit", job = %job.job_id, clip = %job.clip_id);
    let subject = subjects::label::run(Stage::Mapping, lane);
    tracing::Instrument::instrument(bus.enqueue(&subject, &job), span)
        .await
        .map_err(|e| LabelError::Bus(e.to_string()))?;
    Ok(job)
}

/// Follows a job's statuses, calling `on_status` for each change, until the last stage is done
/// (its output) or a stage failed (its reason).
pub async fn watch(
    bus: &Bus,
    job_id: &str,
    mut on_status: impl FnMut(&StageStatus),
) -> Result<StageOutput, LabelError> {
    use futures::StreamExt;
    let kv = bus
        .ensure_kv(subjects::label::status_config())
        .await
        .map_err(|e| LabelError::Bus(e.to_string()))?;
    let mut entries = kv
        .watch_with_history(format!("{job_id}.*"))
        .await
        .map_err(|e| LabelError::Bus(e.to_string()))?;
    while let Some(entry) = entries.next().await {
        let entry = entry.map_err(|e| LabelError::Bus(e.to_string()))?;
        let Ok(s) = codec::decode::<StageStatus>(&entry.value) else {
            continue;
        };
        on_status(&s);
        match &s.state {
            StageState::Failed { reason } => {
                return Err(LabelError::Failed {
                    stage: s.stage,
                    reason: reason.clone(),
                });
            }
            StageState::Done(out) if s.stage == Stage::Annotate => return Ok(out.clone()),
            _ => {}
        }
    }
    Err(LabelError::Bus("the status watch ended".into()))
}

/// Runs a labeling service: connects to NATS and serves `work`'s stage until `shutdown`.
pub async fn run_service<W: StageWork>(
    work: W,
    config: motorpool_config::LabelConfig,
    shutdown: CancellationToken,
) -> Result<(), LabelError> {
    let stage = W::STAGE;
    let worker_id = config.worker_id.clone().unwrap_or_else(|| {
        let host = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "host".into());
        format!("{host}-{stage}-{}", std::process::id())
    });
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| LabelError::io(format!("label store {}", config.data_dir.display()), e))?;
    let http = config
        .http_addr
        .map(motorpool_telemetry::serve_metrics)
        .transpose()
        .map_err(|e| LabelError::Internal(e.to_string()))?;
    let bus = Bus::connect_service(
        &config.nats_url,
        &format!("motorpool-{stage}"),
        config.nats_nkey_file.as_deref(),
        config.nats_tls_ca_file.as_deref(),
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| LabelError::Bus(e.to_string()))?;
    let served = serve_stage(
        bus,
        Arc::new(work),
        StageOptions {
            data_dir: config.data_dir.clone(),
            worker_id,
            concurrency: config.concurrency,
            aging_step_ms: config.aging_step_ms,
            ack_wait: Duration::from_millis(config.ack_wait_ms),
            clips_dir: config.clips_dir.clone(),
        },
        shutdown,
    )
    .await
    .map_err(|e| LabelError::Bus(e.to_string()));
    if let Some(h) = http {
        h.stop(true).await;
    }
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_clip_is_found_under_the_stages_clips_dir_and_never_outside_it() {
        let root = Path::new("/clips");
        assert_eq!(
            clip_path("lot-7/c-001", Some(root)).unwrap(),
            Path::new("/clips/lot-7/c-001")
        );
        assert_eq!(
            clip_path("/data/clips/c-001", Some(root)).unwrap(),
            Path::new("/data/clips/c-001"),
            "an absolute path is read where it says"
        );
        let e = clip_path("lot-7/c-001", None).unwrap_err().to_string();
        assert!(e.contains("--clips-dir"), "{e}");
        for hostile in ["", "../etc", "lot/../../etc", "./c"] {
            let e = clip_path(hostile, Some(root)).unwrap_err();
            assert!(matches!(e, LabelError::Input(_)), "{hostile:?}: {e}");
        }
    }
}
