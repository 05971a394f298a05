//! The webhook service: the CI front door. Forges post merge-request, push and tag events to
//! `POST /hooks/<project>`; each is checked against its project's secret before its body is
//! read, reduced to one [`events::Event`], turned into jobs by the project's rules
//! ([`jobs::plan`]) and queued once per delivery on the CI lane queues ([`jobs::Queue`]).
//!
//! | answer | when |
//! |---|---|
//! | 201 and the jobs | jobs were queued |
//! | 200, `duplicate` | the forge delivered this event before: nothing new |
//! | 202, `ignored` | an event that asks for no job (a ping, a closed MR, a push to an untrusted branch, a kind not handled) |
//! | 400 | a signed body that is not the event it claims to be, or names another project |
//! | 401 | no signature, or a wrong one: nothing read, nothing made |
//! | 404 | no such project here |
//! | 413 | a body over `max_body_bytes` |
//! | 503 | the bus could not take the jobs: the forge retries, and the retry queues them once |
//!
//! `POST /api/v1/jobs` starts one job for an API client (a bearer token from the projects
//! file's `[[client]]` entries: the projects it may use, its highest lane, its rate);
//! `GET /api/v1/jobs/<id>` answers a job's status. Secrets never reach a log line.

pub mod events;
pub mod jobs;
pub mod projects;

use actix_web::{HttpRequest, HttpResponse, web};
use motorpool_bus::Bus;
use motorpool_config::WebhookConfig;
use motorpool_messages::ci::{JobState, JobStatus, Trigger};
use parking_lot::{Mutex, RwLock};
use projects::{Project, Stamp};
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The projects in force, re-read when their file or a secret changes.
pub struct Projects {
    file: Option<PathBuf>,
    current: RwLock<Arc<projects::Loaded>>,
    seen: Mutex<Vec<Stamp>>,
}

impl Projects {
    pub fn open(file: Option<PathBuf>) -> anyhow::Result<Projects> {
        let (current, seen) = match &file {
            Some(f) => (projects::load(f)?, projects::stamps(f)),
            None => (projects::Loaded::default(), Vec::new()),
        };
        Ok(Projects {
            file,
            current: RwLock::new(Arc::new(current)),
            seen: Mutex::new(seen),
        })
    }

    /// Re-reads the file if it or a secret changed. A file that no longer loads keeps the
    /// projects in force, and says why.
    pub fn reload_if_changed(&self) {
        let Some(path) = &self.file else { return };
        let now = projects::stamps(path);
        if now == *self.seen.lock() {
            return;
        }
        match projects::load(path) {
            Ok(p) => {
                tracing::info!(projects = p.projects.len(), clients = p.clients.len(), file = %path.display(), "Reloaded the projects");
                *self.current.write() = Arc::new(p);
            }
            Err(error) => {
                tracing::error!(%error, "The projects file does not load; the projects in force stay");
            }
        }
        *self.seen.lock() = now;
    }

    pub fn get(&self, name: &str) -> Option<Project> {
        self.current
            .read()
            .projects
            .iter()
            .find(|p| p.name == name)
            .cloned()
    }

    /// The API client whose token this is.
    pub fn client(&self, token: &str) -> Option<projects::ApiClient> {
        use sha2::Digest;
        use subtle::ConstantTimeEq;
        let h: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        self.current
            .read()
            .clients
            .iter()
            .find(|c| bool::from(c.sha256.ct_eq(&h)))
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.current.read().projects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct State {
    projects: Arc<Projects>,
    queue: jobs::Queue,
    /// One token bucket per API client (the scheduler's, at the client's own rate).
    limits: Mutex<std::collections::HashMap<String, motorpool_scheduler::limits::TokenBuckets>>,
}

/// A started webhook service.
#[derive(Debug)]
pub struct Started {
    pub http_addr: SocketAddr,
    http: actix_web::dev::ServerHandle,
}

impl Started {
    pub async fn join(self) {
        self.http.stop(true).await;
    }
}

/// Connects, binds and serves until `shutdown`.
pub async fn start(config: WebhookConfig, shutdown: CancellationToken) -> anyhow::Result<Started> {
    let bus = Bus::connect_service(
        &config.nats_url,
        "webhook",
        config.nats_nkey_file.as_deref(),
        config.nats_tls_ca_file.as_deref(),
        Duration::from_millis(config.bus_timeout_ms),
    )
    .await?;
    let queue = jobs::Queue::open(bus).await?;
    let projects = Arc::new(Projects::open(config.projects_file.clone())?);
    let reload = projects.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => reload.reload_if_changed(),
                _ = shutdown.cancelled() => break,
            }
        }
    });
    let state = web::Data::new(State {
        projects: projects.clone(),
        queue,
        limits: Mutex::default(),
    });
    let limit = config.max_body_bytes;
    let server = actix_web::HttpServer::new(move || {
        actix_web::App::new()
            .app_data(state.clone())
            .app_data(web::PayloadConfig::new(limit))
            .route("/hooks/{project:.+}", web::post().to(hook))
            .route("/api/v1/jobs", web::post().to(api_job))
            .route("/api/v1/jobs/{id}", web::get().to(job))
            .route(
                "/healthz",
                web::get().to(|| async { HttpResponse::Ok().body("ok\n") }),
            )
            .route(
                "/metrics",
                web::get().to(motorpool_telemetry::metrics_handler),
            )
    })
    .workers(2)
    .disable_signals()
    .bind(config.http_addr)
    .map_err(|e| anyhow::anyhow!("bind HTTP on {}: {e}", config.http_addr))?;
    let http_addr = server.addrs()[0];
    let server = server.run();
    let http = server.handle();
    tokio::spawn(server);
    tracing::info!(%http_addr, projects = projects.len(), "Webhook service is serving");
    Ok(Started { http_addr, http })
}

/// Runs the webhook service until `shutdown` fires.
pub async fn run(config: WebhookConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let started = start(config, shutdown.clone()).await?;
    shutdown.cancelled().await;
    started.join().await;
    Ok(())
}

fn answer(
    status: actix_web::http::StatusCode,
    forge: &str,
    outcome: &'static str,
    body: serde_json::Value,
) -> HttpResponse {
    metrics::counter!("motorpool_webhook_events_total", "forge" => forge.to_string(), "outcome" => outcome)
        .increment(1);
    HttpResponse::build(status).json(body)
}

async fn hook(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<State>,
) -> HttpResponse {
    use actix_web::http::StatusCode as S;
    let name = path.into_inner();
    let Some(project) = state.projects.get(&name) else {
        return answer(
            S::NOT_FOUND,
            "unknown",
            "unknown_project",
            json!({"error": format!("no project named {name:?} is configured here")}),
        );
    };
    let forge = project.forge.name();
    let header = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    if let Err(e) = events::verify(project.forge, &project.secret, header, &body) {
        tracing::warn!(project = %name, peer = ?req.peer_addr(), reason = %e, "Refused an unauthenticated event");
        return answer(
            S::UNAUTHORIZED,
            forge,
            "unauthenticated",
            json!({"error": e.to_string()}),
        );
    }
    let Some(kind) = header(events::kind_header(project.forge)) else {
        return answer(
            S::BAD_REQUEST,
            forge,
            "malformed",
            json!({"error": format!("no {} header: project {name:?} takes {forge} events", events::kind_header(project.forge))}),
        );
    };
    let event = match events::parse(project.forge, &kind, &body) {
        Err(e) => {
            return answer(
                S::BAD_REQUEST,
                forge,
                "malformed",
                json!({"error": e.to_string()}),
            );
        }
        Ok(events::Parsed::Ignored(reason)) => {
            return answer(S::ACCEPTED, forge, "ignored", json!({"ignored": reason}));
        }
        Ok(events::Parsed::Event(e)) => e,
    };
    if event.project != project.name {
        return answer(
            S::BAD_REQUEST,
            forge,
            "malformed",
            json!({"error": format!("the event is for project {:?}; this hook is for {:?}", event.project, project.name)}),
        );
    }
    let delivery = events::delivery_id(project.forge, header, &body);
    let key = jobs::delivery_key(&project, &delivery);
    let planned = jobs::plan(&project, &event, &key, &delivery);
    if planned.is_empty() {
        let why = match &event.trigger {
            Trigger::Push { branch } => {
                format!("pushes to {branch:?} start no job (not a trusted branch)")
            }
            other => format!("the project's rules make no job for a {}", other.name()),
        };
        return answer(S::ACCEPTED, forge, "ignored", json!({"ignored": why}));
    }
    match state
        .queue
        .submit(&key, planned, project.cancel_superseded)
        .await
    {
        Ok(jobs::Outcome::Queued(jobs)) => {
            tracing::info!(project = %name, commit = %event.commit, trigger = event.trigger.name(), jobs = jobs.len(), "Queued CI jobs");
            let list: Vec<_> = jobs
                .iter()
                .map(|j| json!({"job_id": j.job_id, "kind": j.kind.name(), "lane": j.lane.name(), "status": format!("/api/v1/jobs/{}", j.job_id)}))
                .collect();
            answer(S::CREATED, forge, "queued", json!({"jobs": list}))
        }
        Ok(jobs::Outcome::Duplicate(ids)) => answer(
            S::OK,
            forge,
            "duplicate",
            json!({"duplicate": true, "delivery": delivery, "jobs": ids}),
        ),
        Err(e) => {
            tracing::error!(project = %name, error = %e, "Could not queue CI jobs");
            answer(
                S::SERVICE_UNAVAILABLE,
                forge,
                "unavailable",
                json!({"error": format!("the jobs could not be queued ({e}); deliver the event again")}),
            )
        }
    }
}

/// A job's status as JSON.
pub fn status_json(s: &JobStatus) -> serde_json::Value {
    let j = &s.job;
    let detail = match &s.state {
        JobState::Superseded { by_commit } => Some(format!("superseded by {by_commit}")),
        JobState::Running { step } => Some(step.clone()),
        JobState::Failed { reason } | JobState::Canceled { reason } => Some(reason.clone()),
        JobState::Queued | JobState::Succeeded => None,
    };
    let merge_request = match &j.trigger {
        Trigger::MergeRequest { number, .. } => Some(*number),
        _ => None,
    };
    json!({
        "job_id": j.job_id, "project": j.project, "forge": j.forge.name(),
        "kind": j.kind.name(), "lane": j.lane.name(), "state": s.state.name(), "detail": detail,
        "commit": j.commit, "ref": j.git_ref, "command": j.command, "targets": j.targets,
        "flags": j.flags, "trigger": j.trigger.name(), "merge_request": merge_request,
        "requested_by": j.requested_by, "trusted": j.trusted, "queued_ms": j.queued_ms,
        "updated_ms": s.updated_ms, "runner": s.runner, "workspace": s.workspace, "warm": s.warm,
        "attempt": s.attempt,
        "steps": s.steps.iter().map(|t| json!({"name": t.name, "ms": t.ms})).collect::<Vec<_>>(),
    })
}

async fn job(id: web::Path<String>, state: web::Data<State>) -> HttpResponse {
    let id = id.into_inner();
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return HttpResponse::BadRequest()
            .json(json!({"error": format!("{id:?} is not a job id")}));
    }
    match state.queue.status(&id).await {
        Ok(Some(s)) => HttpResponse::Ok().json(status_json(&s)),
        Ok(None) => HttpResponse::NotFound().json(json!({"error": format!("no job {id}")})),
        Err(e) => HttpResponse::ServiceUnavailable().json(json!({"error": e.to_string()})),
    }
}

/// What an API client asks for: one job of a kind its project defines.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JobRequest {
    project: String,
    commit: String,
    #[serde(rename = "ref")]
    git_ref: String,
    kind: motorpool_messages::ci::JobKind,
    /// A lower lane than the kind's; never a higher one than the client's.
    #[serde(default)]
    lane: Option<String>,
}

async fn api_job(req: HttpRequest, body: web::Bytes, state: web::Data<State>) -> HttpResponse {
    use actix_web::http::StatusCode as S;
    use motorpool_messages::exec::Lane;
    let refuse = |status: S, outcome: &'static str, error: String| {
        answer(status, "api", outcome, json!({ "error": error }))
    };
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    let Some(client) = token.and_then(|t| state.projects.client(t.trim())) else {
        return refuse(
            S::UNAUTHORIZED,
            "unauthenticated",
            "POST /api/v1/jobs needs `Authorization: Bearer <token>` of a client in the projects file".into(),
        );
    };
    let r: JobRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return refuse(
                S::BAD_REQUEST,
                "malformed",
                format!("the request is not valid: {e}"),
            );
        }
    };
    let Some(project) = state.projects.get(&r.project) else {
        return refuse(
            S::NOT_FOUND,
            "unknown_project",
            format!("no project named {:?} is configured here", r.project),
        );
    };
    if !client.may_use(&project.name) {
        return refuse(
            S::FORBIDDEN,
            "forbidden",
            format!(
                "client {:?} may not start jobs of {:?}",
                client.id, project.name
            ),
        );
    }
    let Some(template) = project.jobs.iter().find(|t| t.kind == r.kind) else {
        return refuse(
            S::NOT_FOUND,
            "unknown_kind",
            format!("project {:?} defines no {} job", project.name, r.kind),
        );
    };
    let ok_commit = (r.commit.len() == 40 || r.commit.len() == 64)
        && r.commit.bytes().all(|b| b.is_ascii_hexdigit());
    if !ok_commit || !r.git_ref.starts_with("refs/") {
        return refuse(
            S::BAD_REQUEST,
            "malformed",
            "commit must be a full commit id and ref a full ref (refs/heads/...)".into(),
        );
    }
    let Some(clone_url) = project.clone_url.clone() else {
        return refuse(
            S::BAD_REQUEST,
            "malformed",
            format!(
                "project {:?} has no clone_url: API jobs need one in the projects file",
                project.name
            ),
        );
    };
    // The kind's lane, capped by the client's; a lower one on request, never a higher one.
    let mut lane = if r.kind.lane().rank() > client.max_lane.rank() {
        client.max_lane
    } else {
        r.kind.lane()
    };
    if let Some(asked) = &r.lane {
        let Some(asked) = Lane::from_name(asked) else {
            return refuse(
                S::BAD_REQUEST,
                "malformed",
                format!("lane {asked:?} is not release, build, test or lint"),
            );
        };
        if asked.rank() > lane.rank() {
            return refuse(
                S::FORBIDDEN,
                "forbidden",
                format!(
                    "client {:?} may not put a {} job on the {} lane (at most {})",
                    client.id, r.kind, asked, lane
                ),
            );
        }
        lane = asked;
    }
    let admitted = {
        let mut limits = state.limits.lock();
        let bucket = limits.entry(client.id.clone()).or_insert_with(|| {
            motorpool_scheduler::limits::TokenBuckets::new(
                client.rate_per_minute / 60.0,
                f64::from(client.burst),
            )
        });
        bucket.admit(&client.id, motorpool_messages::now_ms(), 0)
    };
    if let Err(e) = admitted {
        let retry = (60.0 / client.rate_per_minute).ceil().max(1.0) as u64;
        metrics::counter!("motorpool_webhook_events_total", "forge" => "api", "outcome" => "rate_limited").increment(1);
        return HttpResponse::TooManyRequests()
            .insert_header(("retry-after", retry.to_string()))
            .json(json!({ "error": e.message }));
    }
    let delivery = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let key = jobs::delivery_key(&project, &format!("api:{}:{delivery}", client.id));
    let event = events::Event {
        project: project.name.clone(),
        clone_url,
        commit: r.commit.to_ascii_lowercase(),
        git_ref: r.git_ref.clone(),
        trigger: Trigger::Api {
            client: client.id.clone(),
        },
        user: client.id.clone(),
    };
    let job = jobs::job(
        &project,
        template,
        &event,
        &jobs::job_id(&key, 0),
        lane,
        false,
        &delivery,
    );
    match state.queue.submit(&key, vec![job], false).await {
        Ok(jobs::Outcome::Queued(jobs)) => answer(
            S::CREATED,
            "api",
            "queued",
            json!({"jobs": jobs.iter().map(|j| json!({"job_id": j.job_id, "kind": j.kind.name(), "lane": j.lane.name(), "status": format!("/api/v1/jobs/{}", j.job_id)})).collect::<Vec<_>>()}),
        ),
        Ok(jobs::Outcome::Duplicate(ids)) => answer(
            S::OK,
            "api",
            "duplicate",
            json!({"duplicate": true, "jobs": ids}),
        ),
        Err(e) => refuse(
            S::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("the job could not be queued ({e}); try again"),
        ),
    }
}
