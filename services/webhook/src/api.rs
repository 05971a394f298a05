//! The API clients' way in: `POST /api/v1/jobs` (one CI job of a kind the project defines) and
//! `POST /api/v1/images` (one build of an image the project defines). A client is a bearer
//! token in the projects file; it may use only its projects, rides at most its lane, is held to
//! its rate, and starts image builds only when the file allows it (`images = true`). A request
//! repeated with the same `Idempotency-Key` queues nothing new. `GET /api/v1/jobs/<id>` and
//! `GET /api/v1/images/<id>` answer their status to anyone holding the id (128 random-looking
//! bits derived from the delivery).

use crate::{State, answer, events, jobs, projects};
use actix_web::http::StatusCode as S;
use actix_web::{HttpRequest, HttpResponse, web};
use motorpool_messages::ci::{JobKind, Trigger};
use motorpool_messages::exec::Lane;
use serde_json::json;

/// Why a request was refused: its status, the outcome counted in the metrics, what to tell the
/// caller, and for a rate limit when to come back.
#[derive(Debug)]
pub(crate) struct Refusal {
    status: S,
    outcome: &'static str,
    error: String,
    retry_after_s: Option<u64>,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.error)
    }
}

impl actix_web::ResponseError for Refusal {
    fn status_code(&self) -> S {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut r = answer(
            self.status,
            "api",
            self.outcome,
            json!({ "error": self.error }),
        );
        if let Some(s) = self.retry_after_s {
            r.headers_mut().insert(
                actix_web::http::header::RETRY_AFTER,
                actix_web::http::header::HeaderValue::from(s),
            );
        }
        r
    }
}

fn refuse(status: S, outcome: &'static str, error: String) -> Refusal {
    Refusal {
        status,
        outcome,
        error,
        retry_after_s: None,
    }
}

type Answer = Result<HttpResponse, Refusal>;

/// The client whose bearer token the request carries.
fn client(req: &HttpRequest, state: &State, path: &str) -> Result<projects::ApiClient, Refusal> {
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    token
        .and_then(|t| state.projects.client(t.trim()))
        .ok_or_else(|| {
            refuse(
                S::UNAUTHORIZED,
                "unauthenticated",
                format!("POST {path} needs `Authorization: Bearer <token>` of a client in the projects file"),
            )
        })
}

/// The request's body as `T`, and the project it names, which the client may use.
fn request<T: serde::de::DeserializeOwned>(
    body: &[u8],
    state: &State,
    client: &projects::ApiClient,
    project: impl Fn(&T) -> &str,
) -> Result<(T, projects::Project), Refusal> {
    let r: T = serde_json::from_slice(body).map_err(|e| {
        refuse(
            S::BAD_REQUEST,
            "malformed",
            format!("the request is not valid: {e}"),
        )
    })?;
    let name = project(&r);
    let Some(p) = state.projects.get(name) else {
        return Err(refuse(
            S::NOT_FOUND,
            "unknown_project",
            format!("no project named {name:?} is configured here"),
        ));
    };
    if !client.may_use(&p.name) {
        return Err(refuse(
            S::FORBIDDEN,
            "forbidden",
            format!("client {:?} may not start work of {:?}", client.id, p.name),
        ));
    }
    Ok((r, p))
}

/// A full commit id and a full ref, and the URL the project is cloned from.
fn source(project: &projects::Project, commit: &str, git_ref: &str) -> Result<String, Refusal> {
    let ok_commit =
        (commit.len() == 40 || commit.len() == 64) && commit.bytes().all(|b| b.is_ascii_hexdigit());
    if !ok_commit || !git_ref.starts_with("refs/") {
        return Err(refuse(
            S::BAD_REQUEST,
            "malformed",
            "commit must be a full commit id and ref a full ref (refs/heads/... or refs/tags/...)"
                .into(),
        ));
    }
    project.clone_url.clone().ok_or_else(|| {
        refuse(
            S::BAD_REQUEST,
            "malformed",
            format!(
                "project {:?} has no clone_url: API requests need one in the projects file",
                project.name
            ),
        )
    })
}

/// `natural`, capped by the client's lane; a lower one on request, never a higher one.
fn lane(
    client: &projects::ApiClient,
    natural: Lane,
    asked: Option<&str>,
    what: &str,
) -> Result<Lane, Refusal> {
    let lane = if natural.rank() > client.max_lane.rank() {
        client.max_lane
    } else {
        natural
    };
    let Some(asked) = asked else { return Ok(lane) };
    let Some(asked) = Lane::from_name(asked) else {
        return Err(refuse(
            S::BAD_REQUEST,
            "malformed",
            format!("lane {asked:?} is not release, build, test or lint"),
        ));
    };
    if asked.rank() > lane.rank() {
        return Err(refuse(
            S::FORBIDDEN,
            "forbidden",
            format!(
                "client {:?} may not put {what} on the {asked} lane (at most {lane})",
                client.id
            ),
        ));
    }
    Ok(asked)
}

/// Takes a token from the client's bucket, or answers 429 with when to come back.
fn admit(state: &State, client: &projects::ApiClient) -> Result<(), Refusal> {
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
    admitted.map(drop).map_err(|e| Refusal {
        retry_after_s: Some((60.0 / client.rate_per_minute).ceil().max(1.0) as u64),
        ..refuse(S::TOO_MANY_REQUESTS, "rate_limited", e.message)
    })
}

/// The delivery key of this request: its `Idempotency-Key` (or a fresh one), per client.
fn delivery(
    req: &HttpRequest,
    project: &projects::Project,
    client: &projects::ApiClient,
) -> (String, String) {
    let delivery = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let key = jobs::delivery_key(project, &format!("api:{}:{delivery}", client.id));
    (key, delivery)
}

async fn submit(state: &State, key: &str, planned: jobs::Planned) -> Answer {
    match state.queue.submit(key, planned, false).await {
        Ok(jobs::Outcome::Queued(planned)) => Ok(answer(
            S::CREATED,
            "api",
            "queued",
            crate::queued_json(&planned),
        )),
        Ok(jobs::Outcome::Duplicate(ids)) => Ok(answer(
            S::OK,
            "api",
            "duplicate",
            json!({"duplicate": true, "jobs": ids}),
        )),
        Err(e) => Err(refuse(
            S::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("it could not be queued ({e}); try again"),
        )),
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
    kind: JobKind,
    /// A lower lane than the kind's; never a higher one than the client's.
    #[serde(default)]
    lane: Option<String>,
}

pub(crate) async fn job(req: HttpRequest, body: web::Bytes, state: web::Data<State>) -> Answer {
    let client = client(&req, &state, "/api/v1/jobs")?;
    let (r, project) = request(&body, &state, &client, |r: &JobRequest| &r.project)?;
    let template = project
        .jobs
        .iter()
        .find(|t| t.kind == r.kind)
        .ok_or_else(|| {
            refuse(
                S::NOT_FOUND,
                "unknown_kind",
                format!("project {:?} defines no {} job", project.name, r.kind),
            )
        })?;
    let clone_url = source(&project, &r.commit, &r.git_ref)?;
    let lane = lane(
        &client,
        r.kind.lane(),
        r.lane.as_deref(),
        &format!("a {} job", r.kind),
    )?;
    admit(&state, &client)?;
    let (key, delivery) = delivery(&req, &project, &client);
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
    let planned = jobs::Planned {
        jobs: vec![job],
        images: Vec::new(),
    };
    submit(&state, &key, planned).await
}

/// What an API client asks for: one build of an image its project defines, from a commit. A
/// tag ref names the image after the tag, as a tag push would; any other ref after the commit.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageRequest {
    project: String,
    image: String,
    commit: String,
    #[serde(rename = "ref")]
    git_ref: String,
    #[serde(default)]
    lane: Option<String>,
}

pub(crate) async fn image(req: HttpRequest, body: web::Bytes, state: web::Data<State>) -> Answer {
    let client = client(&req, &state, "/api/v1/images")?;
    if !client.images {
        return Err(refuse(
            S::FORBIDDEN,
            "forbidden",
            format!(
                "client {:?} may not start image builds (`images = true` in its [[client]] entry)",
                client.id
            ),
        ));
    }
    let (r, project) = request(&body, &state, &client, |r: &ImageRequest| &r.project)?;
    let template = project
        .images
        .iter()
        .find(|t| t.name == r.image)
        .ok_or_else(|| {
            refuse(
                S::NOT_FOUND,
                "unknown_image",
                format!("project {:?} defines no image {:?}", project.name, r.image),
            )
        })?;
    let clone_url = source(&project, &r.commit, &r.git_ref)?;
    let lane = lane(&client, template.lane, r.lane.as_deref(), "an image build")?;
    admit(&state, &client)?;
    let (key, _) = delivery(&req, &project, &client);
    let commit = r.commit.to_ascii_lowercase();
    // Named after the tag when the ref is one, else after the commit.
    let name = r
        .git_ref
        .strip_prefix("refs/tags/")
        .map(str::to_string)
        .unwrap_or_else(|| commit[..12].to_string());
    let event = events::Event {
        project: project.name.clone(),
        clone_url,
        commit,
        git_ref: r.git_ref.clone(),
        trigger: Trigger::Api {
            client: client.id.clone(),
        },
        user: client.id.clone(),
    };
    let mut build = jobs::image_job(
        &project,
        template,
        &event,
        &name,
        &jobs::image_job_id(&key, &template.name),
    );
    build.lane = lane;
    let planned = jobs::Planned {
        jobs: Vec::new(),
        images: vec![build],
    };
    submit(&state, &key, planned).await
}

/// A job or build id: 32 hex digits.
fn job_id(id: &str) -> Result<(), Refusal> {
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(refuse(
            S::BAD_REQUEST,
            "malformed",
            format!("{id:?} is not a job id"),
        ));
    }
    Ok(())
}

fn unavailable(e: motorpool_bus::BusError) -> Refusal {
    refuse(S::SERVICE_UNAVAILABLE, "unavailable", e.to_string())
}

/// `GET /api/v1/jobs/<id>`: a CI job's status.
pub(crate) async fn job_status(id: web::Path<String>, state: web::Data<State>) -> Answer {
    job_id(&id)?;
    match state.queue.status(&id).await.map_err(unavailable)? {
        Some(s) => Ok(HttpResponse::Ok().json(crate::status_json(&s))),
        None => Err(refuse(S::NOT_FOUND, "unknown_job", format!("no job {id}"))),
    }
}

/// `GET /api/v1/images/<id>`: an image build's status.
pub(crate) async fn image_status(id: web::Path<String>, state: web::Data<State>) -> Answer {
    job_id(&id)?;
    match state.queue.build_status(&id).await.map_err(unavailable)? {
        Some(s) => Ok(HttpResponse::Ok().json(crate::build_json(&s))),
        None => Err(refuse(
            S::NOT_FOUND,
            "unknown_job",
            format!("no image build {id}"),
        )),
    }
}
