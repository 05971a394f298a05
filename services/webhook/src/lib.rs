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
//! A tag also queues the fleet images its project's `[[project.image]]` entries build from it.
//!
//! `POST /api/v1/jobs` starts one job for an API client (a bearer token from the projects
//! file's `[[client]]` entries: the projects it may use, its highest lane, its rate), and
//! `POST /api/v1/images` one build of a project's image for a client allowed `images`;
//! `GET /api/v1/jobs/<id>` and `GET /api/v1/images/<id>` answer their status.
//! Secrets never reach a log line.

mod api;
pub mod events;
pub mod jobs;
pub mod metric_names;
pub mod projects;

use actix_web::{HttpRequest, HttpResponse, web};
use motorpool_bus::Bus;
use motorpool_config::WebhookConfig;
use motorpool_messages::ci::{JobState, JobStatus, Trigger};
use motorpool_messages::fleet::{BuildState, BuildStatus};
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
            .route("/api/v1/jobs", web::post().to(api::job))
            .route("/api/v1/jobs/{id}", web::get().to(api::job_status))
            .route("/api/v1/images", web::post().to(api::image))
            .route("/api/v1/images/{id}", web::get().to(api::image_status))
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
    metrics::counter!(crate::metric_names::WEBHOOK_EVENTS_TOTAL, "forge" => forge.to_string(), "outcome" => outcome)
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
    let planned = jobs::Planned {
        jobs: jobs::plan(&project, &event, &key, &delivery),
        images: jobs::plan_images(&project, &event, &key),
    };
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
        Ok(jobs::Outcome::Queued(planned)) => {
            tracing::info!(project = %name, commit = %event.commit, trigger = event.trigger.name(), jobs = planned.jobs.len(), images = planned.images.len(), "Queued CI jobs");
            answer(S::CREATED, forge, "queued", queued_json(&planned))
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

/// What a delivery queued, as JSON: each job and image build with where its status is.
fn queued_json(p: &jobs::Planned) -> serde_json::Value {
    let jobs: Vec<_> = p
        .jobs
        .iter()
        .map(|j| json!({"job_id": j.job_id, "kind": j.kind.name(), "lane": j.lane.name(), "status": format!("/api/v1/jobs/{}", j.job_id)}))
        .collect();
    let images: Vec<_> = p
        .images
        .iter()
        .map(|i| {
            json!({
                "job_id": i.job_id, "image_id": i.request.image_id, "channel": i.request.channel,
                "commit": i.request.git_ref, "lane": i.lane.name(),
                "status": format!("/api/v1/images/{}", i.job_id),
            })
        })
        .collect();
    json!({"jobs": jobs, "images": images})
}

/// An image build's status as JSON.
pub fn build_json(s: &BuildStatus) -> serde_json::Value {
    let mut v = json!({"job_id": s.job_id, "state": s.state.name(), "updated_ms": s.updated_ms});
    if !s.state.detail().is_empty() {
        v["detail"] = s.state.detail().into();
    }
    if let BuildState::Done {
        image_id, blake3, ..
    } = &s.state
    {
        v["image_id"] = image_id.as_str().into();
        v["blake3"] = blake3.as_str().into();
    }
    v
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
