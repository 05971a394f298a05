//! The CI runner: takes CI jobs from the lane queues (release first), runs each in a warm
//! workspace of its pool ([`pool`]): checkout with Git LFS, then the job's Bazel command on the
//! platform (remote execution, the job's lane, a key that may write the action cache only for
//! trusted jobs), and reports to the forge ([`forge`]).
//!
//! A job's status (KV bucket `mp_v1_ci_jobs`) moves `Queued` -> `Running {step}` ->
//! `Succeeded` / `Failed`, with the time of each step (`workspace`, `checkout`, `build`,
//! `report`). A failing build or test is a result. An infrastructure failure (git unreachable,
//! Bazel crashed, this runner killed) runs the job again, up to `max_attempts` runs in all,
//! then raises the `ci_retries_exhausted` alert. A job superseded by a newer push to its merge
//! request before it started is skipped.
//!
//! HTTP: `GET /api/v1/workspaces` (the pool), `GET /api/v1/jobs/<id>/log` (a job's log so far;
//! `?offset=N` for what came after byte N), `/metrics`, `/healthz`.

pub mod forge;
pub mod metric_names;
pub mod pool;
pub mod work;

use actix_web::{HttpResponse, web};
use motorpool_bus::{Bus, Delivery, LaneQueue, LaneQueueOptions, subjects};
use motorpool_config::RunnerConfig;
use motorpool_messages::ci::{CiJob, JobState, JobStatus, StepTime};
use motorpool_messages::exec::Alert;
use motorpool_messages::{codec, now_ms};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use work::{Log, StepError};

struct Runner {
    config: RunnerConfig,
    bus: Bus,
    jobs: async_nats::jetstream::kv::Store,
    pool: pool::Pool,
    forges: forge::Forges,
    trusted_key: Option<String>,
    untrusted_key: Option<String>,
    logs: PathBuf,
    stop: CancellationToken,
}

fn read_key(path: &Option<PathBuf>) -> anyhow::Result<Option<String>> {
    path.as_ref()
        .map(|p| {
            std::fs::read_to_string(p)
                .map(|k| k.trim().to_string())
                .map_err(|e| anyhow::anyhow!("API key file {}: {e}", p.display()))
        })
        .transpose()
}

/// A started runner: its HTTP address.
pub struct Started {
    pub http_addr: std::net::SocketAddr,
    http: actix_web::dev::ServerHandle,
    serve: tokio::task::JoinHandle<()>,
    pool: pool::Pool,
    config: RunnerConfig,
}

impl Started {
    /// Waits for the jobs in hand to end after shutdown fired, then stops the Bazel servers
    /// kept warm in this pool's free workspaces (nothing else would stop them before their idle
    /// time runs out).
    pub async fn join(self) {
        let _ = self.serve.await;
        self.http.stop(true).await;
        let (pool, config) = (self.pool, self.config);
        let now = now_ms();
        let free: Vec<String> = match pool.list().await {
            Ok(list) => list
                .into_iter()
                .filter(|(w, _)| w.holder.as_ref().is_none_or(|l| l.expires_ms <= now))
                .map(|(w, _)| w.name)
                .collect(),
            Err(_) => Vec::new(),
        };
        let _ = tokio::task::spawn_blocking(move || {
            for name in free {
                work::stop_server(&config, &pool.dir.join(name));
            }
        })
        .await;
    }
}

/// Connects, binds, and takes jobs until `shutdown`.
pub async fn start(config: RunnerConfig, shutdown: CancellationToken) -> anyhow::Result<Started> {
    anyhow::ensure!(
        motorpool_bus::subjects::valid_id(&config.runner_id),
        "runner_id {:?}: letters, digits, - and _ only",
        config.runner_id
    );
    let missing = missing_tools(&config.bazel);
    anyhow::ensure!(
        missing.is_empty(),
        "the runner needs {} on PATH (Bazel; Debian's git, git-lfs and util-linux's setpriv)",
        missing.join(", ")
    );
    let bus = Bus::connect_service(
        &config.nats_url,
        &format!("runner-{}", config.runner_id),
        config.nats_nkey_file.as_deref(),
        config.nats_tls_ca_file.as_deref(),
        Duration::from_millis(config.bus_timeout_ms),
    )
    .await?;
    std::fs::create_dir_all(&config.workspaces_dir)?;
    let workspaces_dir = std::fs::canonicalize(&config.workspaces_dir)?;
    let logs = workspaces_dir
        .parent()
        .unwrap_or(&workspaces_dir)
        .join("logs");
    let pool = pool::Pool::open(
        &bus,
        workspaces_dir,
        &config.pool,
        config.pool_size,
        config.lease_ms,
        &config.runner_id,
    )
    .await?;
    let runner = Arc::new(Runner {
        jobs: bus.ensure_kv(subjects::ci::jobs_config()).await?,
        forges: forge::Forges::open(&config.forges)?,
        trusted_key: read_key(&config.trusted_key_file)?,
        untrusted_key: read_key(&config.untrusted_key_file)?,
        pool,
        logs,
        stop: shutdown.clone(),
        bus: bus.clone(),
        config: config.clone(),
    });
    let queue = LaneQueue::<CiJob>::open(
        &bus,
        subjects::ci::jobs_stream_config(),
        LaneQueueOptions {
            consumer: subjects::ci::run_consumer,
            subject: subjects::ci::run,
            aging_step_ms: 600_000,
            // A runner that dies stops keeping its jobs alive: they go to another after this.
            ack_wait: Duration::from_millis(config.lease_ms.max(1_000)),
            // The last delivery that fails raises the alert; the server offers one more, which
            // finds the job failed and lets it go.
            max_deliver: i64::from(config.max_attempts.max(1)) + 1,
        },
    )
    .await?;
    let (http, http_addr) = http_server(config.http_addr, runner.clone())?;
    tracing::info!(runner = %config.runner_id, pool = %config.pool, %http_addr, "Runner is taking CI jobs");
    let serve = tokio::spawn({
        let runner = runner.clone();
        async move {
            queue
                .serve(config.concurrency.max(1), shutdown, move |d| {
                    let runner = runner.clone();
                    async move { runner.handle(d).await }
                })
                .await;
        }
    });
    Ok(Started {
        http_addr,
        http,
        serve,
        pool: runner.pool.clone(),
        config: runner.config.clone(),
    })
}

/// Runs the runner until `shutdown` fires.
pub async fn run(config: RunnerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    start(config, shutdown).await?.join().await;
    Ok(())
}

impl Runner {
    async fn status(&self, job_id: &str) -> Option<JobStatus> {
        let bytes = self.jobs.get(job_id).await.ok()??;
        codec::decode(&bytes).ok()
    }

    async fn put(&self, s: &mut JobStatus, state: JobState) {
        s.state = state;
        s.updated_ms = now_ms();
        match codec::encode(&*s) {
            Ok(bytes) => {
                if let Err(error) = self.jobs.put(&s.job.job_id, bytes.into()).await {
                    tracing::warn!(job = %s.job.job_id, %error, "Cannot record a job status");
                }
            }
            Err(error) => tracing::warn!(%error, "Cannot encode a job status"),
        }
    }

    async fn report(&self, job: &CiJob, status: forge::Status, description: String) {
        let (forges, job) = (self.forges.clone(), job.clone());
        let _ =
            tokio::task::spawn_blocking(move || forges.report(&job, status, &description)).await;
    }

    async fn handle(&self, d: Delivery<CiJob>) {
        let job = d.msg.clone();
        let mut status = self
            .status(&job.job_id)
            .await
            .unwrap_or_else(|| JobStatus::queued(job.clone(), now_ms()));
        match &status.state {
            JobState::Superseded { .. } | JobState::Canceled { .. } => {
                tracing::info!(job = %job.job_id, state = status.state.name(), "Skipping a job that will not run");
                let _ = d.ack().await;
                return;
            }
            JobState::Succeeded | JobState::Failed { .. } => {
                // Done before (a redelivery after its last acknowledgement was lost).
                let _ = d.ack().await;
                return;
            }
            JobState::Queued | JobState::Running { .. } => {}
        }
        let attempt = d.delivered.max(1) as u32;
        status.runner = self.config.runner_id.clone();
        status.attempt = attempt;
        status.steps.clear();
        tracing::info!(job = %job.job_id, project = %job.project, kind = %job.kind, lane = %job.lane, attempt, "Running a CI job");
        self.put(
            &mut status,
            JobState::Running {
                step: "workspace".into(),
            },
        )
        .await;
        self.report(
            &job,
            forge::Status::Pending,
            format!("taken by {}", self.config.runner_id),
        )
        .await;
        let outcome = self.attempt(&d, &mut status).await;
        match outcome {
            Ok(()) => {
                metrics::counter!(crate::metric_names::RUNNER_JOBS_TOTAL, "outcome" => "succeeded")
                    .increment(1);
                self.finish(
                    &mut status,
                    JobState::Succeeded,
                    forge::Status::Success,
                    "passed".into(),
                )
                .await;
                let _ = d.ack().await;
            }
            Err(StepError::Result(reason)) => {
                metrics::counter!(crate::metric_names::RUNNER_JOBS_TOTAL, "outcome" => "failed")
                    .increment(1);
                self.finish(
                    &mut status,
                    JobState::Failed {
                        reason: reason.clone(),
                    },
                    forge::Status::Failed,
                    reason,
                )
                .await;
                let _ = d.ack().await;
            }
            Err(StepError::Infrastructure(reason)) if attempt < self.config.max_attempts => {
                metrics::counter!(crate::metric_names::RUNNER_JOBS_TOTAL, "outcome" => "retried")
                    .increment(1);
                tracing::warn!(job = %job.job_id, attempt, %reason, "An infrastructure failure; the job runs again");
                self.put(&mut status, JobState::Queued).await;
                let _ = d.nak(Duration::from_secs(2u64.pow(attempt.min(5)))).await;
            }
            Err(StepError::Infrastructure(reason)) => {
                metrics::counter!(crate::metric_names::RUNNER_JOBS_TOTAL, "outcome" => "gave_up")
                    .increment(1);
                let message = format!(
                    "CI job {} ({} {} of {} at {}) failed {attempt} times on infrastructure: {reason}",
                    job.job_id, job.kind, job.command, job.project, job.commit
                );
                self.alert(&job.job_id, &message).await;
                self.finish(
                    &mut status,
                    JobState::Failed {
                        reason: format!("infrastructure, after {attempt} attempts: {reason}"),
                    },
                    forge::Status::Failed,
                    "infrastructure failure".into(),
                )
                .await;
                let _ = d.term().await;
            }
        }
    }

    async fn finish(
        &self,
        status: &mut JobStatus,
        state: JobState,
        forge: forge::Status,
        why: String,
    ) {
        let started = Instant::now();
        self.report(&status.job, forge, why).await;
        status.steps.push(StepTime {
            name: "report".into(),
            ms: started.elapsed().as_millis() as u64,
        });
        self.put(status, state).await;
    }

    async fn alert(&self, job_id: &str, message: &str) {
        let alert = Alert {
            kind: "ci_retries_exhausted".into(),
            source: format!("runner:{}", self.config.runner_id),
            subject_id: job_id.to_string(),
            message: message.to_string(),
            at_ms: now_ms(),
        };
        tracing::error!(job = %job_id, %message, "Alert");
        metrics::counter!(crate::metric_names::ALERTS_TOTAL, "kind" => "ci_retries_exhausted")
            .increment(1);
        if let Err(error) = self
            .bus
            .publish(&subjects::ops::alert("ci_retries_exhausted"), &alert)
            .await
        {
            tracing::error!(%error, "Cannot raise an alert");
        }
    }

    /// One run of the job: workspace, checkout, build. The workspace goes back clean only
    /// when the run got to the end of its build.
    async fn attempt(&self, d: &Delivery<CiJob>, status: &mut JobStatus) -> Result<(), StepError> {
        let job = d.msg.clone();
        let mut log = Log::open(self.logs.join(format!("{}.log", job.job_id)))
            .map_err(|e| StepError::Infrastructure(format!("job log: {e}")))?;
        log.line(&format!(
            "== {} {} of {} at {} ({}), lane {}, attempt {} on {}",
            job.kind,
            job.command,
            job.project,
            job.commit,
            job.git_ref,
            job.lane,
            status.attempt,
            self.config.runner_id
        ));
        let started = Instant::now();
        let held = self
            .pool
            .acquire(&job, &self.stop)
            .await
            .map_err(|e| StepError::Infrastructure(format!("no workspace: {e}")))?;
        status.workspace = held.name.clone();
        let (config, path) = (self.config.clone(), held.path.clone());
        let (dirty, wipe) = (held.was_dirty, held.wipe);
        let (log, (reset, _)) = blocking(move || {
            let r = work::prepare(&config, &path, dirty, wipe, &mut log);
            (log, r)
        })
        .await?;
        // Warm only if its checkout is still there (an operator may have wiped the directory).
        status.warm = held.warm && !reset && work::src(&held.path).join(".git").exists();
        step(status, "workspace", started);
        let mut log = log;
        log.line(&format!(
            "== workspace {} ({})",
            held.name,
            if status.warm { "warm" } else { "cold" }
        ));
        self.put(
            status,
            JobState::Running {
                step: "checkout".into(),
            },
        )
        .await;
        let started = Instant::now();
        let (path, j) = (held.path.clone(), job.clone());
        let (log, checked) = blocking(move || {
            let r = work::checkout(&path, &j, &mut log);
            (log, r)
        })
        .await?;
        if let Err(e) = checked {
            let _ = self.pool.release(held, &job.clone_url, "", 0, true).await;
            return Err(e);
        }
        step(status, "checkout", started);
        self.put(
            status,
            JobState::Running {
                step: "build".into(),
            },
        )
        .await;
        self.report(
            &job,
            forge::Status::Running,
            format!("{} running", job.command),
        )
        .await;
        let started = Instant::now();
        let key = if job.trusted {
            self.trusted_key.clone()
        } else {
            self.untrusted_key.clone()
        };
        let (config, path, j) = (self.config.clone(), held.path.clone(), job.clone());
        let (mut log, built) = blocking(move || {
            let mut log = log;
            let r = work::build(&config, &path, &j, key.as_deref(), &mut log);
            (log, r)
        })
        .await?;
        step(status, "build", started);
        log.line(&format!(
            "== {}",
            match &built {
                Ok(()) => "passed".to_string(),
                Err(e) => e.to_string(),
            }
        ));
        let path = held.path.clone();
        let bytes = tokio::task::spawn_blocking(move || {
            work::settle(&path, &mut log);
            work::disk_bytes(&path)
        })
        .await
        .unwrap_or(0);
        let infra = matches!(built, Err(StepError::Infrastructure(_)));
        if let Err(error) = self
            .pool
            .release(held, &job.clone_url, &job.commit, bytes, infra)
            .await
        {
            tracing::warn!(%error, "Could not release a workspace; its lease expires");
        }
        built
    }
}

/// The tools a runner needs that are not there: `bazel` (as configured), git, git-lfs,
/// setpriv.
pub fn missing_tools(bazel: &std::path::Path) -> Vec<String> {
    [
        bazel,
        "git".as_ref(),
        "git-lfs".as_ref(),
        "setpriv".as_ref(),
    ]
    .into_iter()
    .filter(|tool| !on_path(tool))
    .map(|tool| tool.display().to_string())
    .collect()
}

/// Whether `tool` names an executable, as a path or on `PATH`.
fn on_path(tool: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if tool.components().count() > 1 {
        return executable(tool);
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| executable(&d.join(tool))))
        .unwrap_or(false)
}

fn step(status: &mut JobStatus, name: &str, started: Instant) {
    status.steps.push(StepTime {
        name: name.into(),
        ms: started.elapsed().as_millis() as u64,
    });
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StepError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StepError::Infrastructure(format!("the step panicked: {e}")))
}

fn http_server(
    addr: std::net::SocketAddr,
    runner: Arc<Runner>,
) -> anyhow::Result<(actix_web::dev::ServerHandle, std::net::SocketAddr)> {
    let data = web::Data::new(runner);
    let server = actix_web::HttpServer::new(move || {
        actix_web::App::new()
            .app_data(data.clone())
            .route("/api/v1/workspaces", web::get().to(workspaces))
            .route("/api/v1/jobs/{id}/log", web::get().to(job_log))
            .route(
                "/healthz",
                web::get().to(|| async { HttpResponse::Ok().body("ok\n") }),
            )
            .route(
                "/metrics",
                web::get().to(motorpool_telemetry::metrics_handler),
            )
    })
    .workers(1)
    .disable_signals()
    .bind(addr)
    .map_err(|e| anyhow::anyhow!("bind HTTP on {addr}: {e}"))?;
    let bound = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    tokio::spawn(server);
    Ok((handle, bound))
}

async fn workspaces(runner: web::Data<Arc<Runner>>) -> HttpResponse {
    match runner.pool.list().await {
        Ok(list) => {
            let now = now_ms();
            let body: Vec<_> = list
                .into_iter()
                .map(|(w, _)| {
                    let held = w.holder.as_ref().filter(|l| l.expires_ms > now);
                    serde_json::json!({
                        "pool": w.pool, "name": w.name, "repo": w.repo, "commit": w.commit,
                        "busy": held.is_some(), "runner": held.map(|l| l.runner.clone()),
                        "job_id": held.map(|l| l.job_id.clone()), "dirty": w.dirty,
                        "tainted": w.tainted,
                        "bytes": w.bytes, "jobs": w.jobs, "updated_ms": w.updated_ms,
                    })
                })
                .collect();
            HttpResponse::Ok().json(body)
        }
        Err(e) => HttpResponse::ServiceUnavailable().body(format!("{e}\n")),
    }
}

async fn job_log(
    id: web::Path<String>,
    query: web::Query<std::collections::HashMap<String, String>>,
    runner: web::Data<Arc<Runner>>,
) -> HttpResponse {
    use std::io::{Read, Seek};
    let id = id.into_inner();
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return HttpResponse::BadRequest().body(format!("{id:?} is not a job id\n"));
    }
    let offset: u64 = query
        .get("offset")
        .and_then(|o| o.parse().ok())
        .unwrap_or(0);
    let path = runner.logs.join(format!("{id}.log"));
    let Ok(mut f) = std::fs::File::open(&path) else {
        return HttpResponse::NotFound().body(format!("no log for job {id} on this runner\n"));
    };
    let mut out = Vec::new();
    if f.seek(std::io::SeekFrom::Start(offset)).is_ok() {
        let _ = f.take(4 << 20).read_to_end(&mut out);
    }
    HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .insert_header(("x-next-offset", (offset + out.len() as u64).to_string()))
        .body(out)
}
