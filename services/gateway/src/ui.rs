//! The build-event view on the gateway's HTTP port: server-rendered pages (no script, no
//! external asset) and their JSON twins under `/api/v1/`.
//!
//! | page | JSON twin |
//! |---|---|
//! | `/invocations` (`?user=`, `?status=`, `?command=`, `?q=` a pattern, branch or commit) | `/api/v1/invocations` |
//! | `/invocation/<id>` (what `--bes_results_url=http://HOST:8080/invocation/` links) | `/api/v1/invocations/<id>` |
//! | `/invocation/<id>/timeline.svg` | - |
//! | `/invocation/<id>/output?uri=bytestream://...` (a test log, from the CAS) | - |
//! | `/queues`: depth per lane and pool over the last hour, workers with each held job's pipeline stage, alerts | `/api/v1/queues`, `/api/v1/workers`, `/api/v1/alerts` |
//! | `/fleet`: each burner's drives with their state, progress and the images they hold, image builds | `/api/v1/drives`, `/api/v1/image-builds` |
//! | `/labels`: each clip's stages with state, progress, time, output and report picture | `/api/v1/labels` |
//!
//! Callers are identified as at the gRPC port: `Authorization: Bearer <key>` or `x-api-key`,
//! or, for a browser, the key given once at `/login` and kept in an HttpOnly cookie. A caller
//! sees the invocations its key streamed; admins (and everyone, when the gateway lets anyone
//! in) see all.

use crate::auth::{Auth, Identity};
use crate::bes::Bes;
use crate::invocations::{self, Invocation};
use actix_web::{HttpRequest, HttpResponse, web};
use motorpool_bus::Bus;
use motorpool_cas_client::Shards;
use motorpool_messages::bes::{InvocationSummary, RemoteAction};
use motorpool_messages::exec::{Alert, HeldJob, JobStage, QueueStats, WorkerInfo};
use motorpool_messages::fleet::{BuildState, BuildStatus, DriveImage, DriveKind, DriveStatus};
use motorpool_messages::label::{Stage, StageState, StageStatus};
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;

const COOKIE: &str = "motorpool_key";

/// What the pages read from.
pub struct Ui {
    bes: Option<Arc<Bes>>,
    stream: Option<async_nats::jetstream::stream::Stream>,
    auth: Arc<Auth>,
    shards: Shards,
    bus: Bus,
    /// The labeling stages' output root, canonical, when this host sees it.
    labels_dir: Option<std::path::PathBuf>,
    /// The scheduler's queue statistics, sampled every [`SAMPLE_MS`], the last hour of them.
    history: Arc<parking_lot::Mutex<std::collections::VecDeque<(u64, QueueStats)>>>,
}

const SAMPLE_MS: u64 = 5_000;
const HISTORY: usize = 720;

impl Ui {
    pub async fn new(
        bes: Option<Arc<Bes>>,
        auth: Arc<Auth>,
        shards: Shards,
        bus: Bus,
        labels_dir: Option<std::path::PathBuf>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<Ui> {
        let labels_dir = labels_dir.and_then(|d| std::fs::canonicalize(d).ok());
        let stream = match &bes {
            Some(b) => Some(
                b.bus()
                    .jetstream()
                    .get_stream(motorpool_bus::subjects::bes::STREAM)
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!("stream {}: {e}", motorpool_bus::subjects::bes::STREAM)
                    })?,
            ),
            None => None,
        };
        let history = Arc::new(parking_lot::Mutex::new(std::collections::VecDeque::new()));
        let (samples, sampler) = (history.clone(), bus.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(SAMPLE_MS));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.cancelled() => break,
                }
                if let Ok(stats) = crate::queue_stats(&sampler).await {
                    let mut h = samples.lock();
                    h.push_back((motorpool_messages::now_ms(), stats));
                    while h.len() > HISTORY {
                        h.pop_front();
                    }
                }
            }
        });
        Ok(Ui {
            bes,
            stream,
            auth,
            shards,
            bus,
            labels_dir,
            history,
        })
    }

    /// The caller: a key in a header, or the login cookie.
    fn caller(&self, req: &HttpRequest) -> Result<Arc<Identity>, String> {
        let mut headers = tonic::codegen::http::HeaderMap::new();
        for name in ["authorization", "x-api-key"] {
            if let Some(v) = req.headers().get(name).and_then(|v| v.to_str().ok())
                && let Ok(v) = v.parse()
            {
                headers.insert(name, v);
            }
        }
        if headers.is_empty()
            && let Some(c) = req.cookie(COOKIE)
            && let Ok(v) = format!("Bearer {}", c.value()).parse()
        {
            headers.insert("authorization", v);
        }
        self.auth.identify(&headers).map_err(|e| e.to_string())
    }
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(|| async { see_other("/invocations") }))
        .route("/login", web::get().to(login_page))
        .route("/login", web::post().to(login))
        .route("/invocations", web::get().to(list_page))
        .route("/api/v1/invocations", web::get().to(list_json))
        .route("/invocation/{id}", web::get().to(invocation_page))
        .route("/invocation/{id}/timeline.svg", web::get().to(timeline_svg))
        .route("/invocation/{id}/output", web::get().to(output))
        .route("/api/v1/invocations/{id}", web::get().to(invocation_json))
        .route("/queues", web::get().to(queues_page))
        .route("/api/v1/workers", web::get().to(workers_json))
        .route("/api/v1/alerts", web::get().to(alerts_json))
        .route("/fleet", web::get().to(fleet_page))
        .route("/api/v1/drives", web::get().to(drives_json))
        .route("/api/v1/image-builds", web::get().to(image_builds_json))
        .route("/labels", web::get().to(labels_page))
        .route("/api/v1/labels", web::get().to(labels_json))
        .route("/labels/{id}/report.svg", web::get().to(label_report));
}

fn see_other(to: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header(("location", to.to_string()))
        .finish()
}

/// Escapes text for HTML and SVG.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes a query parameter's value.
fn url_arg(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse}\
td,th{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}\
.succeeded,.passed{color:#1a7f37}.failed,.build_failure,.tests_failed,.failed_to_build,.timeout{color:#cf222e}\
.running{color:#9a6700}.flaky{color:#bc4c00}code,pre{font:12px ui-monospace,monospace}pre{background:#f6f8fa;padding:.6em;overflow:auto}\
nav a{margin-right:1em}form.filter input{width:9em}\
span.stage{padding:0 .35em;border-radius:3px;background:#eaeef2;white-space:nowrap}span.stage.executing{background:#dafbe1}\
span.stage.fetching,span.stage.uploading{background:#ddf4ff}";

fn page(title: &str, refresh: bool, body: &str) -> HttpResponse {
    let meta = if refresh {
        "<meta http-equiv=\"refresh\" content=\"3\">"
    } else {
        ""
    };
    HttpResponse::Ok().content_type("text/html; charset=utf-8").body(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">{meta}<title>{} · Motorpool</title><style>{STYLE}</style></head>\
         <body><nav><a href=\"/invocations\">Invocations</a><a href=\"/queues\">Queues and workers</a><a href=\"/fleet\">Drive bays</a><a href=\"/labels\">Labels</a><a href=\"/login\">Key</a></nav>{body}</body></html>",
        esc(title)
    ))
}

fn unauthenticated(html: bool, why: &str) -> HttpResponse {
    if html {
        see_other("/login")
    } else {
        HttpResponse::Unauthorized().json(serde_json::json!({ "error": why }))
    }
}

fn off() -> HttpResponse {
    HttpResponse::NotFound()
        .json(serde_json::json!({"error": "the Build Event Service is off (bes.enabled = false)"}))
}

async fn login_page() -> HttpResponse {
    page(
        "Key",
        false,
        "<h1>Your API key</h1><p>The pages show the invocations your key streamed (all of them for an admin key). \
         The key is kept in an HttpOnly cookie of this browser.</p>\
         <form method=\"post\" action=\"/login\"><input type=\"password\" name=\"key\" size=\"50\" autocomplete=\"off\"> <button>Use it</button></form>",
    )
}

#[derive(serde::Deserialize)]
struct LoginForm {
    key: String,
}

async fn login(ui: web::Data<Ui>, form: web::Form<LoginForm>) -> HttpResponse {
    let key = form.key.trim().to_string();
    let mut headers = tonic::codegen::http::HeaderMap::new();
    match format!("Bearer {key}").parse() {
        Ok(v) => {
            headers.insert("authorization", v);
        }
        Err(_) => return HttpResponse::BadRequest().body("that is not a key\n"),
    }
    if let Err(e) = ui.auth.identify(&headers) {
        return HttpResponse::Unauthorized().body(format!("{e}\n"));
    }
    let cookie = actix_web::cookie::Cookie::build(COOKIE, key)
        .path("/")
        .http_only(true)
        .same_site(actix_web::cookie::SameSite::Strict)
        .finish();
    HttpResponse::SeeOther()
        .cookie(cookie)
        .insert_header(("location", "/invocations"))
        .finish()
}

/// The list's filters.
#[derive(serde::Deserialize, Default)]
struct Filter {
    user: Option<String>,
    status: Option<String>,
    command: Option<String>,
    q: Option<String>,
    limit: Option<usize>,
}

impl Filter {
    fn keeps(&self, s: &InvocationSummary) -> bool {
        let is = |want: &Option<String>, have: &str| {
            want.as_deref().is_none_or(|w| w.is_empty() || w == have)
        };
        is(&self.user, &s.user)
            && is(&self.status, &s.status)
            && is(&self.command, &s.command)
            && self.q.as_deref().is_none_or(|q| {
                q.is_empty()
                    || s.patterns.iter().any(|p| p.contains(q))
                    || s.branch.contains(q)
                    || s.commit.starts_with(q)
                    || s.ci_job.starts_with(q)
                    || s.invocation_id.starts_with(q)
            })
    }
}

async fn visible(
    ui: &Ui,
    who: &Identity,
    filter: &Filter,
) -> Result<Vec<InvocationSummary>, String> {
    let bes = ui.bes.as_ref().ok_or("the Build Event Service is off")?;
    let mut all = invocations::list(bes.summaries()).await?;
    all.retain(|s| who.owns(&s.owner) && filter.keeps(s));
    all.truncate(filter.limit.unwrap_or(500).min(5000));
    Ok(all)
}

fn summary_json(s: &InvocationSummary) -> serde_json::Value {
    serde_json::json!({
        "invocation_id": s.invocation_id, "build_id": s.build_id, "owner": s.owner,
        "command": s.command, "patterns": s.patterns, "user": s.user, "host": s.host,
        "branch": s.branch, "commit": s.commit, "ci_job": s.ci_job, "merge_request": s.merge_request,
        "status": s.status, "exit_code": s.exit_code,
        "started_ms": s.started_ms, "finished_ms": s.finished_ms,
        "targets": s.targets, "targets_failed": s.targets_failed, "tests": s.tests,
        "tests_failed": s.tests_failed, "tests_flaky": s.tests_flaky, "events": s.events,
        "truncated": s.truncated, "updated_ms": s.updated_ms,
        "page": format!("/invocation/{}", s.invocation_id),
    })
}

async fn list_json(
    req: HttpRequest,
    ui: web::Data<Ui>,
    filter: web::Query<Filter>,
) -> HttpResponse {
    if ui.bes.is_none() {
        return off();
    }
    let who = match ui.caller(&req) {
        Ok(w) => w,
        Err(e) => return unauthenticated(false, &e),
    };
    twin(visible(&ui, &who, &filter).await, summary_json)
}

/// A JSON twin's answer: each item as JSON, or 503 with why they could not be read.
fn twin<T, J: serde::Serialize>(
    items: Result<Vec<T>, String>,
    json: impl Fn(&T) -> J,
) -> HttpResponse {
    match items {
        Ok(list) => HttpResponse::Ok().json(list.iter().map(json).collect::<Vec<_>>()),
        Err(e) => HttpResponse::ServiceUnavailable().json(serde_json::json!({ "error": e })),
    }
}

fn duration(s: &InvocationSummary, now: u64) -> String {
    let end = if s.finished_ms > 0 {
        s.finished_ms
    } else {
        now
    };
    let ms = end.saturating_sub(s.started_ms);
    if ms >= 60_000 {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    } else {
        format!("{:.1}s", ms as f64 / 1000.0)
    }
}

fn when(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

async fn list_page(
    req: HttpRequest,
    ui: web::Data<Ui>,
    filter: web::Query<Filter>,
) -> HttpResponse {
    if ui.bes.is_none() {
        return off();
    }
    let who = match ui.caller(&req) {
        Ok(w) => w,
        Err(e) => return unauthenticated(true, &e),
    };
    let list = match visible(&ui, &who, &filter).await {
        Ok(l) => l,
        Err(e) => return HttpResponse::ServiceUnavailable().body(format!("{e}\n")),
    };
    let now = motorpool_messages::now_ms();
    let mut b = String::new();
    let v = |o: &Option<String>| esc(o.as_deref().unwrap_or(""));
    let _ = write!(
        b,
        "<h1>Invocations</h1><form class=\"filter\" method=\"get\">user <input name=\"user\" value=\"{}\"> status <input name=\"status\" value=\"{}\"> \
         command <input name=\"command\" value=\"{}\"> pattern, branch or commit <input name=\"q\" value=\"{}\"> <button>Filter</button></form>\
         <p>{} invocation(s){}</p><table><tr><th>started</th><th>status</th><th>command</th><th>patterns</th><th>user</th><th>branch / commit</th>\
         <th>targets</th><th>tests</th><th>duration</th></tr>",
        v(&filter.user),
        v(&filter.status),
        v(&filter.command),
        v(&filter.q),
        list.len(),
        if who.may(crate::auth::Role::Admin) {
            ", every key's"
        } else {
            ", your key's"
        }
    );
    for s in &list {
        let _ = write!(
            b,
            "<tr><td><a href=\"/invocation/{id}\">{started}</a></td><td class=\"{status}\">{status}{trunc}</td><td>{cmd}</td><td><code>{pat}</code></td>\
             <td><a href=\"?user={user_q}\">{user}</a></td><td>{branch} <code>{commit}</code></td><td>{targets}{tfail}</td><td>{tests}{testfail}</td><td>{dur}</td></tr>",
            id = esc(&s.invocation_id),
            started = when(s.started_ms),
            status = esc(&s.status),
            trunc = if s.truncated { " (truncated)" } else { "" },
            cmd = esc(&s.command),
            pat = esc(&s.patterns.join(" ")),
            user_q = url_arg(&s.user),
            user = esc(&s.user),
            branch = esc(&s.branch),
            commit = esc(&s.commit.chars().take(12).collect::<String>()),
            targets = s.targets,
            tfail = if s.targets_failed > 0 {
                format!(
                    " <span class=\"failed\">({} failed)</span>",
                    s.targets_failed
                )
            } else {
                String::new()
            },
            tests = s.tests,
            testfail = if s.tests_failed + s.tests_flaky > 0 {
                format!(
                    " <span class=\"failed\">({} failed, {} flaky)</span>",
                    s.tests_failed, s.tests_flaky
                )
            } else {
                String::new()
            },
            dur = duration(s, now),
        );
    }
    b.push_str("</table>");
    let running = list.iter().any(|s| s.finished_ms == 0);
    page("Invocations", running, &b)
}

/// The invocation, if the caller may see it.
async fn find(ui: &Ui, who: &Identity, id: &str) -> Result<Invocation, HttpResponse> {
    let (Some(bes), Some(stream)) = (&ui.bes, &ui.stream) else {
        return Err(off());
    };
    if !motorpool_bus::subjects::valid_id(id) {
        return Err(HttpResponse::BadRequest().json(serde_json::json!({"error": format!("{:?} is not an invocation id", invocations::clip(id, 80))})));
    }
    let missing = || {
        HttpResponse::NotFound()
            .json(serde_json::json!({"error": format!("no invocation {id} that this key may see")}))
    };
    match invocations::load(stream, bes.summaries(), id).await {
        Ok(Some(inv)) if who.owns(&inv.summary.owner) => Ok(inv),
        Ok(_) => Err(missing()),
        Err(e) => Err(HttpResponse::ServiceUnavailable().json(serde_json::json!({ "error": e }))),
    }
}

/// [`find`], with Bazel's own profile read from the CAS when it uploaded one: what the page and
/// its JSON show, and nothing else needs.
async fn find_with_profile(ui: &Ui, who: &Identity, id: &str) -> Result<Invocation, HttpResponse> {
    let mut inv = find(ui, who, id).await?;
    if let Some((instance, digest)) = inv.profile_uri().and_then(parse_bytestream)
        && digest.size <= MAX_PROFILE_BYTES
    {
        match ui.shards.read_blob(&instance, &digest).await {
            Ok(gz) => match invocations::parse_profile(&gz) {
                Ok(p) => inv.profile = Some(p),
                Err(error) => {
                    tracing::debug!(invocation = %id, %error, "Bazel's profile does not read")
                }
            },
            Err(error) => {
                tracing::debug!(invocation = %id, %error, "Bazel's profile is not in the CAS")
            }
        }
    }
    Ok(inv)
}

/// Profiles larger than this (compressed) are not drawn.
const MAX_PROFILE_BYTES: u64 = 64 << 20;

/// Bazel's profile as SVG: one row per Bazel thread that processed actions, each bar an action
/// as Bazel saw it; solid when the platform ran it (the worker on hover), pale when Bazel ran it
/// or found it in the cache itself; its critical path outlined.
pub fn profile_timeline(profile: &invocations::Profile, actions: &[RemoteAction]) -> String {
    const W: f64 = 1100.0;
    const LEFT: f64 = 170.0;
    const ROW: f64 = 14.0;
    if profile.actions.is_empty() {
        return "<p>Bazel's profile lists no action.</p>".into();
    }
    let t1 = profile
        .actions
        .iter()
        .map(|a| a.start_us + a.duration_us)
        .max()
        .unwrap_or(1)
        .max(1);
    let t0 = profile
        .actions
        .iter()
        .map(|a| a.start_us)
        .min()
        .unwrap_or(0)
        .min(t1 - 1);
    let scale = W / (t1 - t0) as f64;
    let remote: Vec<&RemoteAction> = actions
        .iter()
        .filter(|a| !a.description.is_empty())
        .collect();
    let row: HashMap<i64, usize> = profile
        .threads
        .iter()
        .enumerate()
        .map(|(i, (tid, _))| (*tid, i))
        .collect();
    let height = 30.0 + profile.threads.len() as f64 * ROW;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"profile\" width=\"{w:.0}\" height=\"{height:.0}\" font-family=\"sans-serif\">",
        w = LEFT + W + 10.0
    );
    for (i, (_, name)) in profile.threads.iter().enumerate() {
        let _ = write!(
            svg,
            "<text x=\"4\" y=\"{:.1}\" font-size=\"10\">{}</text>",
            32.0 + i as f64 * ROW,
            esc(name)
        );
    }
    let _ = write!(
        svg,
        "<text x=\"{LEFT}\" y=\"11\" font-size=\"10\">0s</text><text x=\"{:.0}\" y=\"11\" font-size=\"10\" text-anchor=\"end\">{:.1}s</text>",
        LEFT + W,
        (t1 - t0) as f64 / 1e6
    );
    for a in &profile.actions {
        let y = 22.0 + row.get(&a.thread).copied().unwrap_or(0) as f64 * ROW;
        let ran = remote
            .iter()
            .find(|r| invocations::same_action(&a.name, &r.description));
        let kind = a.name.split_whitespace().next().unwrap_or_default();
        let title = format!(
            "{}\n{:.3} s{}{}",
            a.name,
            a.duration_us as f64 / 1e6,
            match ran {
                Some(r) if r.cached => " · found in the platform's cache".to_string(),
                Some(r) => format!(" · ran on {}", r.worker),
                None => " · in Bazel (local, or its cache check hit)".to_string(),
            },
            if a.critical {
                " · on the critical path"
            } else {
                ""
            }
        );
        let _ = write!(
            svg,
            "<g class=\"step{}{}\"><title>{}</title><rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\" fill-opacity=\"{}\"{}/></g>",
            if ran.is_some() { " remote" } else { "" },
            if a.critical { " critical" } else { "" },
            esc(&title),
            LEFT + (a.start_us - t0) as f64 * scale,
            (a.duration_us as f64 * scale).max(1.0),
            ROW - 2.0,
            colour(kind),
            if ran.is_some() { "1" } else { "0.35" },
            if a.critical {
                " stroke=\"#cf222e\" stroke-width=\"2\""
            } else {
                ""
            }
        );
    }
    svg.push_str("</svg>");
    svg
}

async fn invocation_json(
    req: HttpRequest,
    ui: web::Data<Ui>,
    id: web::Path<String>,
) -> HttpResponse {
    let who = match ui.caller(&req) {
        Ok(w) => w,
        Err(e) => return unauthenticated(false, &e),
    };
    match find_with_profile(&ui, &who, &id).await {
        Ok(inv) => {
            let (hits, executed) = inv.cache_hits();
            let mut v = serde_json::to_value(&inv).unwrap_or_default();
            v["summary"] = summary_json(&inv.summary);
            v["remote_cache_hits"] = hits.into();
            v["remote_executed"] = executed.into();
            HttpResponse::Ok().json(v)
        }
        Err(r) => r,
    }
}

async fn invocation_page(
    req: HttpRequest,
    ui: web::Data<Ui>,
    id: web::Path<String>,
) -> HttpResponse {
    let who = match ui.caller(&req) {
        Ok(w) => w,
        Err(e) => return unauthenticated(true, &e),
    };
    let inv = match find_with_profile(&ui, &who, &id).await {
        Ok(i) => i,
        Err(r) => return r,
    };
    let s = &inv.summary;
    let now = motorpool_messages::now_ms();
    let (hits, executed) = inv.cache_hits();
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>{cmd} <code>{pat}</code></h1><p class=\"{status}\"><b>{status}</b>{trunc} · {dur} · started {started}{ver}</p>\
         <table><tr><th>invocation</th><td><code>{id}</code></td></tr><tr><th>user</th><td>{user} on {host}</td></tr>\
         <tr><th>branch / commit</th><td>{branch} <code>{commit}</code></td></tr>{ci}\
         <tr><th>targets</th><td>{targets} ({tfail} failed)</td></tr><tr><th>tests</th><td>{tests} ({tfl} failed, {flaky} flaky)</td></tr>\
         <tr><th>remote actions</th><td>{executed} executed, {hits} found in the cache through Execute</td></tr>\
         <tr><th>command line</th><td><code>bazel {cmd} {pat} {options}</code></td></tr></table>",
        cmd = esc(&s.command),
        pat = esc(&s.patterns.join(" ")),
        status = esc(&s.status),
        trunc = if s.truncated {
            " (events past the cap were not kept)"
        } else {
            ""
        },
        dur = duration(s, now),
        started = when(s.started_ms),
        ver = if inv.tool_version.is_empty() {
            String::new()
        } else {
            format!(" · Bazel {}", esc(&inv.tool_version))
        },
        id = esc(&s.invocation_id),
        user = esc(&s.user),
        host = esc(&s.host),
        branch = esc(&s.branch),
        commit = esc(&s.commit),
        ci = if s.ci_job.is_empty() {
            String::new()
        } else {
            format!(
                "<tr><th>CI</th><td>job <code>{}</code>{}</td></tr>",
                esc(&s.ci_job),
                if s.merge_request.is_empty() {
                    String::new()
                } else {
                    format!(" of merge request !{}", esc(&s.merge_request))
                }
            )
        },
        targets = s.targets,
        tfail = s.targets_failed,
        tests = s.tests,
        tfl = s.tests_failed,
        flaky = s.tests_flaky,
        options = esc(&inv.options.join(" ")),
    );
    let _ = write!(
        b,
        "<h2 id=\"timeline\">Timeline</h2><p>Every action the platform ran for this build: one row per worker slot, \
         bars coloured by mnemonic, the dark part the execution, the lighter parts input fetch and output upload; \
         hover a bar for its details. <a href=\"/invocation/{}/timeline.svg\">SVG</a></p>{}",
        esc(&s.invocation_id),
        timeline(&inv.actions, &on_path(&inv))
    );
    if let Some(profile) = &inv.profile {
        let _ = write!(
            b,
            "<h2 id=\"profile\">Bazel's timeline</h2><p>From Bazel's own profile: every action it processed, on the thread that \
             processed it; solid bars ran on the platform, pale ones in Bazel or from its cache; its critical path outlined red.</p>{}",
            profile_timeline(profile, &inv.actions)
        );
    }
    if !inv.critical_path.is_empty() {
        b.push_str("<h2>Critical path</h2><p>Bazel's, step by step; the steps the platform ran are outlined red on the timeline.</p><table><tr><th>seconds</th><th>action</th><th>ran</th></tr>");
        for step in &inv.critical_path {
            let ran = inv
                .actions
                .iter()
                .find(|a| !step.operation.is_empty() && a.operation == step.operation)
                .map(|a| {
                    format!(
                        "on {} (operation <code>{}</code>)",
                        esc(&a.worker),
                        esc(&a.operation)
                    )
                })
                .unwrap_or_else(|| "in Bazel".to_string());
            let _ = write!(
                b,
                "<tr><td>{:.2}</td><td>{}</td><td>{ran}</td></tr>",
                step.seconds,
                esc(&step.description)
            );
        }
        b.push_str("</table>");
    }
    b.push_str("<h2>Targets</h2><table><tr><th>target</th><th>kind</th><th>built</th><th>test</th><th>outputs</th></tr>");
    for t in &inv.targets {
        let built = match t.success {
            Some(true) => "<span class=\"passed\">ok</span>",
            Some(false) => "<span class=\"failed\">failed</span>",
            None => "<span class=\"running\">building</span>",
        };
        let (test, outputs) = match &t.test {
            Some(x) => (
                format!(
                    "<span class=\"{st}\">{st}</span> {ms} ms{cached}{attempts}",
                    st = esc(&x.status),
                    ms = x.duration_ms,
                    cached = if x.cached { " (cached)" } else { "" },
                    attempts = if x.attempts > 1 {
                        format!(", {} attempts", x.attempts)
                    } else {
                        String::new()
                    }
                ),
                x.outputs
                    .iter()
                    .map(|(name, uri)| {
                        format!(
                            "<a href=\"/invocation/{}/output?uri={}\">{}</a>",
                            esc(&s.invocation_id),
                            url_arg(uri),
                            esc(name)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            None => (String::new(), String::new()),
        };
        let _ = write!(
            b,
            "<tr><td><code>{}</code></td><td>{}</td><td>{built}</td><td>{test}</td><td>{outputs}</td></tr>",
            esc(&t.label),
            esc(&t.kind)
        );
    }
    b.push_str("</table>");
    for (name, text) in &inv.tool_logs {
        // The critical path is its own table, above; the rest is Bazel's text.
        if name.contains("elapsed time") || name.contains("process stats") {
            let _ = write!(b, "<h2>{}</h2><pre>{}</pre>", esc(name), esc(text));
        }
    }
    page(
        &format!("{} {}", s.command, s.patterns.join(" ")),
        s.finished_ms == 0,
        &b,
    )
}

async fn timeline_svg(req: HttpRequest, ui: web::Data<Ui>, id: web::Path<String>) -> HttpResponse {
    let who = match ui.caller(&req) {
        Ok(w) => w,
        Err(e) => return unauthenticated(false, &e),
    };
    match find(&ui, &who, &id).await {
        Ok(inv) => HttpResponse::Ok()
            .content_type("image/svg+xml")
            .body(timeline(&inv.actions, &on_path(&inv))),
        Err(r) => r,
    }
}

#[derive(serde::Deserialize)]
struct OutputQuery {
    uri: String,
}

/// A file an invocation's events name by `bytestream://` URI (a test's log), from the CAS.
async fn output(
    req: HttpRequest,
    ui: web::Data<Ui>,
    id: web::Path<String>,
    q: web::Query<OutputQuery>,
) -> HttpResponse {
    let who = match ui.caller(&req) {
        Ok(w) => w,
        Err(e) => return unauthenticated(true, &e),
    };
    let inv = match find(&ui, &who, &id).await {
        Ok(i) => i,
        Err(r) => return r,
    };
    let named = inv
        .targets
        .iter()
        .filter_map(|t| t.test.as_ref())
        .any(|t| t.outputs.iter().any(|(_, u)| *u == q.uri));
    if !named {
        return HttpResponse::NotFound().body("the invocation names no such file\n");
    }
    let Some((instance, digest)) = parse_bytestream(&q.uri) else {
        return HttpResponse::BadRequest()
            .body("not a bytestream://HOST/INSTANCE/blobs/HASH/SIZE URI\n");
    };
    match ui.shards.read_blob(&instance, &digest).await {
        Ok(bytes) => HttpResponse::Ok()
            .content_type("text/plain; charset=utf-8")
            .body(bytes),
        Err(e) => HttpResponse::NotFound().body(format!("{e}\n")),
    }
}

/// `bytestream://host[:port]/[instance/]blobs/<hash>/<size>`.
pub fn parse_bytestream(uri: &str) -> Option<(String, motorpool_messages::BlobDigest)> {
    let rest = uri.strip_prefix("bytestream://")?;
    let (_, path) = rest.split_once('/')?;
    let (instance, blob) = match path.split_once("blobs/") {
        Some((i, b)) => (i.trim_end_matches('/'), b),
        None => return None,
    };
    let (hash, size) = blob.split_once('/')?;
    let size: i64 = size.parse().ok()?;
    let digest = motorpool_messages::BlobDigest::parse(
        motorpool_messages::DigestFunction::Sha256,
        hash,
        size,
    )
    .ok()?;
    Some((instance.to_string(), digest))
}

/// The operations on the invocation's critical path.
fn on_path(inv: &Invocation) -> HashSet<&str> {
    inv.critical_path
        .iter()
        .filter(|s| !s.operation.is_empty())
        .map(|s| s.operation.as_str())
        .collect()
}

/// The workers' registrations.
async fn workers(bus: &Bus) -> Result<Vec<WorkerInfo>, String> {
    let mut out: Vec<WorkerInfo> =
        kv_all(bus, motorpool_bus::subjects::exec::WORKERS_BUCKET).await?;
    out.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
    Ok(out)
}

/// The last `n` alerts raised, newest first.
async fn alerts(bus: &Bus, n: usize) -> Result<Vec<Alert>, String> {
    let mut stream = bus
        .jetstream()
        .get_stream(motorpool_bus::subjects::ops::ALERTS_STREAM)
        .await
        .map_err(|e| e.to_string())?;
    let state = stream
        .info()
        .await
        .map_err(|e| e.to_string())?
        .state
        .clone();
    let mut out = Vec::new();
    let mut seq = state.last_sequence;
    while seq >= state.first_sequence.max(1) && out.len() < n {
        if let Ok(m) = stream.get_raw_message(seq).await
            && let Ok(a) = motorpool_messages::codec::decode::<Alert>(&m.payload)
        {
            out.push(a);
        }
        seq -= 1;
    }
    Ok(out)
}

fn worker_json(w: &WorkerInfo, now: u64) -> serde_json::Value {
    serde_json::json!({
        "worker_id": w.worker_id, "pool": w.pool.to_string(), "platform": w.platform,
        "slots": w.slots, "running": w.running.len(),
        "operations": w.running.iter().map(|h| &h.operation_id).collect::<Vec<_>>(),
        "jobs": w.running.iter().map(|h| serde_json::json!({
            "operation": h.operation_id, "attempt": h.attempt, "stage": h.stage.name(),
            "since_ms": h.since_ms,
        })).collect::<Vec<_>>(),
        "draining": w.draining, "heartbeat_age_ms": now.saturating_sub(w.heartbeat_at_ms),
        "started_at_ms": w.started_at_ms,
    })
}

async fn workers_json(req: HttpRequest, ui: web::Data<Ui>) -> HttpResponse {
    if let Err(e) = ui.caller(&req) {
        return unauthenticated(false, &e);
    }
    let now = motorpool_messages::now_ms();
    twin(workers(&ui.bus).await, |w| worker_json(w, now))
}

async fn alerts_json(req: HttpRequest, ui: web::Data<Ui>) -> HttpResponse {
    if let Err(e) = ui.caller(&req) {
        return unauthenticated(false, &e);
    }
    twin(alerts(&ui.bus, 100).await, |a| {
        serde_json::json!({"kind": a.kind, "source": a.source, "subject": a.subject_id,
            "message": a.message, "at_ms": a.at_ms})
    })
}

/// Queue depth per `pool/lane` over the samples, as SVG lines.
pub fn depth_chart(history: &[(u64, QueueStats)]) -> String {
    const W: f64 = 900.0;
    const H: f64 = 160.0;
    const LEFT: f64 = 40.0;
    if history.len() < 2 {
        return "<p>Not enough samples yet (one every 5 s).</p>".into();
    }
    let t0 = history[0].0;
    let t1 = history[history.len() - 1].0.max(t0 + 1);
    let mut series: std::collections::BTreeMap<String, Vec<(u64, u64)>> =
        std::collections::BTreeMap::new();
    for (t, s) in history {
        for (pool, lane, depth) in &s.depth {
            series
                .entry(format!("{pool}/{lane}"))
                .or_default()
                .push((*t, *depth));
        }
    }
    let max = series
        .values()
        .flatten()
        .map(|(_, d)| *d)
        .max()
        .unwrap_or(0)
        .max(1);
    let x = |t: u64| LEFT + (t - t0) as f64 / (t1 - t0) as f64 * W;
    let y = |d: u64| 10.0 + H - d as f64 / max as f64 * H;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"depth\" width=\"{w:.0}\" height=\"{h:.0}\" font-family=\"sans-serif\" font-size=\"10\">\
         <text x=\"2\" y=\"14\">{max}</text><text x=\"2\" y=\"{z:.0}\">0</text><line x1=\"{LEFT}\" y1=\"{z:.0}\" x2=\"{r:.0}\" y2=\"{z:.0}\" stroke=\"#ccc\"/>",
        w = LEFT + W + 160.0,
        h = H + 30.0,
        z = 10.0 + H,
        r = LEFT + W
    );
    for (i, (name, points)) in series.iter().enumerate() {
        let colour = colour(name);
        let path: Vec<String> = points
            .iter()
            .map(|(t, d)| format!("{:.1},{:.1}", x(*t), y(*d)))
            .collect();
        let _ = write!(
            svg,
            "<polyline class=\"series\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"><title>{}</title></polyline>\
             <text x=\"{:.0}\" y=\"{}\" fill=\"{colour}\">{}</text>",
            path.join(" "),
            esc(name),
            LEFT + W + 8.0,
            20 + i * 12,
            esc(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

async fn queues_page(req: HttpRequest, ui: web::Data<Ui>) -> HttpResponse {
    if let Err(e) = ui.caller(&req) {
        return unauthenticated(true, &e);
    }
    let now = motorpool_messages::now_ms();
    let history: Vec<(u64, QueueStats)> = ui.history.lock().iter().cloned().collect();
    let mut b = String::from("<h1>Queues and workers</h1>");
    match crate::queue_stats(&ui.bus).await {
        Ok(s) => {
            let _ = write!(
                b,
                "<p>{} worker(s), {} action(s) executing, {} free slot(s). Active scheduler: \
                 <span class=\"scheduler\">{}</span> (lease term {}).</p>\
                 <table><tr><th>pool</th><th>lane</th><th>queued</th></tr>",
                s.workers,
                s.executing,
                s.free_slots,
                esc(&s.scheduler),
                s.term
            );
            for (pool, lane, depth) in &s.depth {
                let _ = write!(
                    b,
                    "<tr class=\"queue\"><td>{pool}</td><td>{lane}</td><td>{depth}</td></tr>"
                );
            }
            b.push_str("</table>");
        }
        Err(e) => {
            let _ = write!(b, "<p class=\"failed\">{}</p>", esc(&e));
        }
    }
    let _ = write!(
        b,
        "<h2>Depth over the last hour</h2>{}",
        depth_chart(&history)
    );
    b.push_str(
        "<h2>Workers</h2><table><tr><th>worker</th><th>pool</th><th>platform</th>\
         <th>executing</th><th>pipeline</th><th>last heartbeat</th></tr>",
    );
    for w in workers(&ui.bus).await.unwrap_or_default() {
        let platform: Vec<String> = w.platform.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let executing = w
            .running
            .iter()
            .filter(|h| h.stage == JobStage::Executing)
            .count();
        let _ = write!(
            b,
            "<tr class=\"worker\"><td>{}{}</td><td>{}</td><td><code>{}</code></td><td>{executing} of {} slot(s)</td><td>{}</td><td>{:.1} s ago</td></tr>",
            esc(&w.worker_id),
            if w.draining { " (draining)" } else { "" },
            w.pool,
            esc(&platform.join(" ")),
            w.slots,
            pipeline(&w.running, now),
            now.saturating_sub(w.heartbeat_at_ms) as f64 / 1000.0
        );
    }
    b.push_str("</table><h2>Alerts</h2>");
    match alerts(&ui.bus, 20).await {
        Ok(list) if list.is_empty() => b.push_str("<p>None raised.</p>"),
        Ok(list) => {
            b.push_str("<table><tr><th>when</th><th>kind</th><th>from</th><th>message</th></tr>");
            for a in list {
                let _ = write!(
                    b,
                    "<tr><td>{}</td><td class=\"failed\">{}</td><td>{}</td><td>{}</td></tr>",
                    when(a.at_ms),
                    esc(&a.kind),
                    esc(&a.source),
                    esc(&a.message)
                );
            }
            b.push_str("</table>");
        }
        Err(e) => {
            let _ = write!(b, "<p>{}</p>", esc(&e));
        }
    }
    page("Queues and workers", false, &b)
}

/// A worker's held jobs by pipeline stage: a count per stage, and each job with how long it has
/// been in its stage (a `<details>`, so it opens without JavaScript).
fn pipeline(jobs: &[HeldJob], now: u64) -> String {
    if jobs.is_empty() {
        return "idle".into();
    }
    let mut out = String::new();
    for stage in JobStage::ALL {
        let n = jobs.iter().filter(|h| h.stage == stage).count();
        if n > 0 {
            let _ = write!(
                out,
                "<span class=\"stage {0}\">{0} {n}</span> ",
                stage.name()
            );
        }
    }
    let _ = write!(
        out,
        "<details><summary>{} job(s)</summary><table>",
        jobs.len()
    );
    let mut sorted: Vec<&HeldJob> = jobs.iter().collect();
    sorted.sort_by_key(|h| (h.stage, h.since_ms));
    for h in sorted {
        let _ = write!(
            out,
            "<tr class=\"job\"><td><code>{}</code>{}</td><td>{}</td><td>{:.1} s</td></tr>",
            esc(&h.operation_id),
            if h.attempt > 1 {
                format!(" (attempt {})", h.attempt)
            } else {
                String::new()
            },
            h.stage.name(),
            now.saturating_sub(h.since_ms) as f64 / 1000.0
        );
    }
    out.push_str("</table></details>");
    out
}

/// Every value of a KV bucket, decoded (those that do not decode are skipped).
async fn kv_all<T: motorpool_messages::codec::Message>(
    bus: &Bus,
    bucket: &str,
) -> Result<Vec<T>, String> {
    bus.kv_values(bucket).await.map_err(|e| e.to_string())
}

/// The drive bays: every burner's drives, newest state first per burner.
async fn drives(bus: &Bus) -> Result<Vec<DriveStatus>, String> {
    let mut all: Vec<DriveStatus> =
        kv_all(bus, motorpool_bus::subjects::fleet::DRIVES_BUCKET).await?;
    all.sort_by(|a, b| (&a.burner, &a.drive).cmp(&(&b.burner, &b.drive)));
    Ok(all)
}

async fn image_builds(bus: &Bus) -> Result<Vec<BuildStatus>, String> {
    let mut all: Vec<BuildStatus> =
        kv_all(bus, motorpool_bus::subjects::fleet::BUILDS_BUCKET).await?;
    all.sort_by_key(|b| std::cmp::Reverse(b.updated_ms));
    Ok(all)
}

fn drive_json(d: &DriveStatus) -> serde_json::Value {
    serde_json::json!({
        "burner": d.burner, "drive": d.drive, "state": format!("{:?}", d.kind).to_ascii_lowercase(),
        "image": d.image, "slot": d.slot, "done": d.done, "total": d.total, "reason": d.reason,
        "updated_ms": d.updated_ms,
        "images": d.images.iter().map(|i| serde_json::json!({
            "slot": i.slot, "image": i.image, "default": i.default,
        })).collect::<Vec<_>>(),
    })
}

fn build_json(b: &BuildStatus) -> serde_json::Value {
    let image = match &b.state {
        BuildState::Done { image_id, .. } => image_id.as_str(),
        _ => "",
    };
    serde_json::json!({"job_id": b.job_id, "state": b.state.name(), "image_id": image,
        "detail": b.state.detail(), "updated_ms": b.updated_ms})
}

async fn drives_json(req: HttpRequest, ui: web::Data<Ui>) -> HttpResponse {
    if let Err(e) = ui.caller(&req) {
        return unauthenticated(false, &e);
    }
    twin(drives(&ui.bus).await, drive_json)
}

async fn image_builds_json(req: HttpRequest, ui: web::Data<Ui>) -> HttpResponse {
    if let Err(e) = ui.caller(&req) {
        return unauthenticated(false, &e);
    }
    twin(image_builds(&ui.bus).await, build_json)
}

/// The images a drive holds, one per line by slot, the default in bold.
fn held(images: &[DriveImage]) -> String {
    images
        .iter()
        .map(|i| {
            let name = esc(&i.image);
            if i.default {
                format!(
                    "<span class=\"held\">{}: <b>{name}</b> (default)</span>",
                    i.slot
                )
            } else {
                format!("<span class=\"held\">{}: {name}</span>", i.slot)
            }
        })
        .collect::<Vec<_>>()
        .join("<br>")
}

async fn fleet_page(req: HttpRequest, ui: web::Data<Ui>) -> HttpResponse {
    if let Err(e) = ui.caller(&req) {
        return unauthenticated(true, &e);
    }
    let list = drives(&ui.bus).await.unwrap_or_default();
    let busy = list
        .iter()
        .any(|d| matches!(d.kind, DriveKind::Burning | DriveKind::Verifying));
    let mut b = String::from("<h1>Drive bays</h1>");
    if list.is_empty() {
        b.push_str("<p>No burner has reported a drive.</p>");
    }
    let mut burner = "";
    for d in &list {
        if d.burner != burner {
            if !burner.is_empty() {
                b.push_str("</table>");
            }
            burner = &d.burner;
            let _ = write!(
                b,
                "<h2>{}</h2><table><tr><th>drive</th><th>state</th><th>image</th><th>progress</th><th>holds</th><th>since</th></tr>",
                esc(burner)
            );
        }
        let state = format!("{:?}", d.kind).to_ascii_lowercase();
        let progress = if d.total > 0 {
            format!(
                "<progress value=\"{}\" max=\"{}\"></progress> {:.0}%",
                d.done,
                d.total,
                d.done as f64 * 100.0 / d.total as f64
            )
        } else {
            String::new()
        };
        let class = match d.kind {
            DriveKind::Ready => "passed",
            DriveKind::Failed | DriveKind::Refused => "failed",
            _ => "running",
        };
        let _ = write!(
            b,
            "<tr class=\"drive\"><td><code>{}</code></td><td class=\"{class}\">{state}{}</td><td>{}{}</td><td>{progress}</td><td>{}</td><td>{}</td></tr>",
            esc(&d.drive),
            if d.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", esc(&d.reason))
            },
            esc(&d.image),
            if d.slot > 0 {
                format!(" (slot {})", d.slot)
            } else {
                String::new()
            },
            held(&d.images),
            when(d.updated_ms)
        );
    }
    if !burner.is_empty() {
        b.push_str("</table>");
    }
    b.push_str("<h2>Image builds</h2><table><tr><th>build</th><th>state</th><th>image</th><th>detail</th><th>updated</th></tr>");
    for build in image_builds(&ui.bus)
        .await
        .unwrap_or_default()
        .iter()
        .take(50)
    {
        let v = build_json(build);
        let _ = write!(
            b,
            "<tr><td><code>{}</code></td><td class=\"{}\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&build.job_id),
            if v["state"] == "failed" { "failed" } else { "" },
            esc(v["state"].as_str().unwrap_or_default()),
            esc(v["image_id"].as_str().unwrap_or_default()),
            esc(v["detail"].as_str().unwrap_or_default()),
            when(build.updated_ms)
        );
    }
    b.push_str("</table>");
    page("Drive bays", busy, &b)
}

/// Labeling jobs: each clip's stages, newest first.
async fn label_jobs(bus: &Bus) -> Result<Vec<Vec<StageStatus>>, String> {
    let all: Vec<StageStatus> = kv_all(bus, motorpool_bus::subjects::label::STATUS_BUCKET).await?;
    let mut jobs: std::collections::BTreeMap<String, Vec<StageStatus>> = Default::default();
    for s in all {
        jobs.entry(s.job_id.clone()).or_default().push(s);
    }
    let mut out: Vec<Vec<StageStatus>> = jobs.into_values().collect();
    for stages in &mut out {
        stages.sort_by_key(|s| s.stage as u8);
    }
    out.sort_by_key(|stages| std::cmp::Reverse(stages.iter().map(|s| s.queued_ms).min()));
    Ok(out)
}

fn stage_json(s: &StageStatus) -> serde_json::Value {
    let (state, done, total, output, cached, reason) = match &s.state {
        StageState::Queued => ("queued", 0, 0, "", false, ""),
        StageState::Running { done, total } => ("running", *done, *total, "", false, ""),
        StageState::Done(o) => ("done", 0, 0, o.dir.as_str(), o.cached, ""),
        StageState::Failed { reason } => ("failed", 0, 0, "", false, reason.as_str()),
    };
    serde_json::json!({
        "job_id": s.job_id, "clip_id": s.clip_id, "stage": s.stage.to_string(), "lane": s.lane.name(),
        "state": state, "done": done, "total": total, "output": output, "cached": cached,
        "reason": reason, "worker": s.worker, "queued_ms": s.queued_ms,
        "started_ms": s.started_ms, "updated_ms": s.updated_ms,
    })
}

async fn labels_json(req: HttpRequest, ui: web::Data<Ui>) -> HttpResponse {
    if let Err(e) = ui.caller(&req) {
        return unauthenticated(false, &e);
    }
    twin(label_jobs(&ui.bus).await, |stages| {
        stages.iter().map(stage_json).collect::<Vec<_>>()
    })
}

async fn labels_page(req: HttpRequest, ui: web::Data<Ui>) -> HttpResponse {
    if let Err(e) = ui.caller(&req) {
        return unauthenticated(true, &e);
    }
    let jobs = label_jobs(&ui.bus).await.unwrap_or_default();
    let running = jobs.iter().flatten().any(|s| !s.is_final());
    let mut b = String::from("<h1>Labels</h1>");
    if jobs.is_empty() {
        b.push_str("<p>No clip has been submitted (<code>motorpool label run</code>).</p>");
    }
    for stages in jobs.iter().take(100) {
        let Some(first) = stages.first() else {
            continue;
        };
        let _ = write!(
            b,
            "<h2 class=\"clip\">{} <small><code>{}</code>, {} lane</small></h2><table><tr><th>stage</th><th>state</th><th>worker</th><th>took</th><th>output</th></tr>",
            esc(&first.clip_id),
            esc(&first.job_id),
            first.lane
        );
        let mut report = None;
        for s in stages {
            let v = stage_json(s);
            let state = match &s.state {
                StageState::Running { done, total } if *total > 0 => format!(
                    "running <progress value=\"{done}\" max=\"{total}\"></progress> {done}/{total}"
                ),
                StageState::Failed { reason } => format!("failed: {}", esc(reason)),
                StageState::Done(o) if o.cached => "done (reused)".into(),
                _ => esc(v["state"].as_str().unwrap_or_default()),
            };
            let took = match &s.state {
                StageState::Done(o) => format!("{:.1} s", o.elapsed_ms as f64 / 1000.0),
                _ => String::new(),
            };
            if let StageState::Done(o) = &s.state
                && s.stage == Stage::Annotate
            {
                report = Some(o.dir.clone());
            }
            let _ = write!(
                b,
                "<tr class=\"stage\"><td>{}</td><td class=\"{}\">{state}</td><td>{}</td><td>{took}</td><td><code>{}</code></td></tr>",
                s.stage,
                esc(v["state"].as_str().unwrap_or_default()),
                esc(&s.worker),
                esc(v["output"].as_str().unwrap_or_default())
            );
        }
        b.push_str("</table>");
        if report.is_some() && ui.labels_dir.is_some() {
            let _ = write!(
                b,
                "<p><a href=\"/labels/{id}/report.svg\"><img class=\"report\" src=\"/labels/{id}/report.svg\" alt=\"the clip's report\" width=\"480\"></a></p>",
                id = esc(&first.job_id)
            );
        }
    }
    page("Labels", running, &b)
}

/// A labeling job's report picture, when its annotate output is under `labels_dir`.
async fn label_report(req: HttpRequest, ui: web::Data<Ui>, id: web::Path<String>) -> HttpResponse {
    if let Err(e) = ui.caller(&req) {
        return unauthenticated(false, &e);
    }
    let Some(root) = &ui.labels_dir else {
        return HttpResponse::NotFound()
            .body("this gateway does not see the labeling outputs (labels_dir)\n");
    };
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return HttpResponse::BadRequest().body("not a labeling job id\n");
    }
    // The job's annotate status, read by its key.
    let key = motorpool_bus::subjects::label::status_key(&id, Stage::Annotate);
    let status = match ui
        .bus
        .jetstream()
        .get_key_value(motorpool_bus::subjects::label::STATUS_BUCKET)
        .await
    {
        Ok(kv) => kv.get(&key).await.ok().flatten(),
        Err(_) => None,
    };
    let dir = status
        .and_then(|b| motorpool_messages::codec::decode::<StageStatus>(&b).ok())
        .and_then(|s| match s.state {
            StageState::Done(o) => Some(o.dir),
            _ => None,
        });
    let Some(dir) = dir else {
        return HttpResponse::NotFound().body("no annotated clip of that job\n");
    };
    // Only what lies under the labels dir, whatever a status says.
    let file = std::path::Path::new(&dir).join("report.svg");
    match std::fs::canonicalize(&file) {
        Ok(path) if path.starts_with(root) => match std::fs::read(&path) {
            Ok(bytes) => HttpResponse::Ok()
                .content_type("image/svg+xml")
                .insert_header(("content-security-policy", "script-src 'none'"))
                .body(bytes),
            Err(e) => HttpResponse::NotFound().body(format!("{e}\n")),
        },
        _ => HttpResponse::NotFound().body("the report is not under labels_dir\n"),
    }
}

/// A stable colour per mnemonic.
fn colour(mnemonic: &str) -> String {
    let h = mnemonic
        .bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    format!("hsl({},60%,45%)", h % 360)
}

fn start_of(a: &RemoteAction) -> u64 {
    [
        a.worker_start_ms,
        a.fetch_start_ms,
        a.exec_start_ms,
        a.done_ms,
    ]
    .into_iter()
    .find(|t| *t > 0)
    .unwrap_or(a.queued_ms)
}

fn end_of(a: &RemoteAction) -> u64 {
    [a.upload_end_ms, a.exec_end_ms, a.done_ms]
        .into_iter()
        .find(|t| *t > 0)
        .unwrap_or(a.queued_ms)
        .max(start_of(a))
}

/// The action timeline as SVG: one row per worker slot (actions packed onto the first slot of
/// their worker free at their start), cache hits on their own row.
pub fn timeline(actions: &[RemoteAction], critical: &HashSet<&str>) -> String {
    const W: f64 = 1100.0;
    const LEFT: f64 = 170.0;
    const ROW: f64 = 14.0;
    if actions.is_empty() {
        return "<p>No action of this invocation ran on the platform.</p>".into();
    }
    let t0 = actions
        .iter()
        .map(|a| a.queued_ms.min(start_of(a)))
        .min()
        .unwrap_or(0);
    let t1 = actions.iter().map(end_of).max().unwrap_or(t0).max(t0 + 1);
    let scale = W / (t1 - t0) as f64;
    let x = |t: u64| LEFT + (t.saturating_sub(t0)) as f64 * scale;
    // Rows: per worker, the slots' end times.
    let mut order: Vec<&RemoteAction> = actions.iter().collect();
    order.sort_by_key(|a| start_of(a));
    let mut slots: HashMap<String, Vec<u64>> = HashMap::new();
    let mut placed: Vec<(&RemoteAction, String, usize)> = Vec::with_capacity(order.len());
    for a in order {
        let worker = if a.cached || a.worker.is_empty() {
            "cache hits".to_string()
        } else {
            a.worker.clone()
        };
        let ends = slots.entry(worker.clone()).or_default();
        let (s, e) = (start_of(a), end_of(a));
        let slot = match ends.iter().position(|end| *end <= s) {
            Some(i) => i,
            None => {
                ends.push(0);
                ends.len() - 1
            }
        };
        ends[slot] = e.max(s + 1);
        placed.push((a, worker, slot));
    }
    let mut workers: Vec<&String> = slots.keys().collect();
    workers.sort();
    let mut row_of: HashMap<(&str, usize), usize> = HashMap::new();
    let mut labels = String::new();
    let mut rows = 0usize;
    for w in &workers {
        for slot in 0..slots[*w].len() {
            row_of.insert((w.as_str(), slot), rows);
            let _ = write!(
                labels,
                "<text x=\"4\" y=\"{:.1}\" font-size=\"10\">{} #{}</text>",
                22.0 + rows as f64 * ROW + 10.0,
                esc(w),
                slot + 1
            );
            rows += 1;
        }
    }
    let height = 30.0 + rows as f64 * ROW;
    let mut svg = String::with_capacity(placed.len() * 400);
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"timeline\" width=\"{:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {:.0} {height:.0}\" font-family=\"sans-serif\">",
        LEFT + W + 10.0,
        LEFT + W + 10.0
    );
    // Seconds along the top.
    let span_s = (t1 - t0) as f64 / 1000.0;
    let step = [0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0]
        .into_iter()
        .find(|s| span_s / s <= 12.0)
        .unwrap_or(1800.0);
    let mut t = 0.0;
    while t <= span_s {
        let px = LEFT + t * 1000.0 * scale;
        let _ = write!(
            svg,
            "<line x1=\"{px:.1}\" y1=\"14\" x2=\"{px:.1}\" y2=\"{height:.0}\" stroke=\"#eee\"/><text x=\"{px:.1}\" y=\"11\" font-size=\"10\">{t}s</text>"
        );
        t += step;
    }
    svg.push_str(&labels);
    for (a, worker, slot) in placed {
        let row = row_of[&(worker.as_str(), slot)];
        let y = 22.0 + row as f64 * ROW;
        let (s, e) = (start_of(a), end_of(a));
        let on_path = critical.contains(a.operation.as_str());
        let title = format!(
            "{what}{path}\n{mn} on {worker} ({lane} lane, {pool})\naction {action}\nqueue wait {qw} ms · fetch {fe} ms · execute {ex} ms · upload {up} ms\n{cached}exit {code}{attempts}{error}",
            what = if a.description.is_empty() {
                "an action"
            } else {
                &a.description
            },
            path = if on_path {
                " (on the critical path)"
            } else {
                ""
            },
            mn = if a.mnemonic.is_empty() {
                "action"
            } else {
                &a.mnemonic
            },
            lane = a.lane,
            pool = a.pool,
            action = a.action,
            qw = a.worker_start_ms.saturating_sub(a.queued_ms),
            fe = a.fetch_end_ms.saturating_sub(a.fetch_start_ms),
            ex = a.exec_end_ms.saturating_sub(a.exec_start_ms),
            up = a.upload_end_ms.saturating_sub(a.upload_start_ms),
            cached = if a.cached { "cache hit · " } else { "" },
            code = a.exit_code,
            attempts = if a.attempts > 1 {
                format!(" · {} attempts", a.attempts)
            } else {
                String::new()
            },
            error = if a.error.is_empty() {
                String::new()
            } else {
                format!("\n{}", a.error)
            },
        );
        let fill = if a.cached {
            "#8c959f".to_string()
        } else {
            colour(&a.mnemonic)
        };
        let _ = write!(
            svg,
            "<g class=\"action{crit}\" data-operation=\"{op}\"><title>{title}</title><rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" fill=\"{fill}\" fill-opacity=\"0.45\"{stroke}/>",
            crit = if on_path { " critical" } else { "" },
            stroke = if on_path {
                " stroke=\"#cf222e\" stroke-width=\"2\""
            } else {
                ""
            },
            op = esc(&a.operation),
            title = esc(&title),
            x = x(s),
            w = (x(e) - x(s)).max(1.0),
            h = ROW - 2.0,
        );
        if a.exec_start_ms > 0 && a.exec_end_ms >= a.exec_start_ms {
            let _ = write!(
                svg,
                "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{fill}\"/>",
                x(a.exec_start_ms),
                (x(a.exec_end_ms) - x(a.exec_start_ms)).max(1.0),
                ROW - 2.0
            );
        }
        svg.push_str("</g>");
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(worker: &str, start: u64, end: u64, cached: bool) -> RemoteAction {
        RemoteAction {
            invocation_id: "i".into(),
            operation: format!("{worker}-{start}"),
            mnemonic: "CppCompile".into(),
            worker: worker.into(),
            cached,
            queued_ms: start - 5,
            worker_start_ms: if cached { 0 } else { start },
            exec_start_ms: if cached { 0 } else { start + 1 },
            exec_end_ms: if cached { 0 } else { end - 1 },
            upload_end_ms: if cached { 0 } else { end },
            done_ms: end,
            ..Default::default()
        }
    }

    #[test]
    fn the_timeline_has_one_bar_per_action_on_packed_worker_slots_and_escapes_text() {
        let mut a = vec![
            action("w1", 1000, 2000, false),
            action("w1", 1500, 2500, false),
            action("w1", 2100, 3000, false),
            action("w2", 1000, 1200, false),
            action("", 1100, 1100, true),
        ];
        a[0].mnemonic = "<script>alert(1)</script>".into();
        let critical: HashSet<&str> = ["w1-1500"].into();
        let svg = timeline(&a, &critical);
        assert_eq!(svg.matches("<g class=\"action").count(), 5);
        // w1 needs two slots (the third action reuses the first), w2 one, the cache one.
        assert!(svg.contains(">w1 #2<") && !svg.contains(">w1 #3<"), "{svg}");
        assert!(svg.contains(">w2 #1<") && svg.contains(">cache hits #1<"));
        assert!(!svg.contains("<script>") && svg.contains("&lt;script&gt;"));
        assert_eq!(svg.matches("class=\"action critical\"").count(), 1);
        assert!(timeline(&[], &critical).contains("No action"));
    }

    #[test]
    fn bytestream_uris_name_an_instance_and_a_blob() {
        let h = "a".repeat(64);
        let (i, d) = parse_bytestream(&format!("bytestream://gw:8980/ci/blobs/{h}/12")).unwrap();
        assert_eq!((i.as_str(), d.size), ("ci", 12));
        let (i, _) = parse_bytestream(&format!("bytestream://gw:8980/blobs/{h}/12")).unwrap();
        assert_eq!(i, "");
        assert!(parse_bytestream("bytestream://gw/ci/blobs/xyz/1").is_none());
        assert!(parse_bytestream("http://gw/blobs/x/1").is_none());
    }

    #[test]
    fn dates_are_utc() {
        assert_eq!(when(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(when(1_796_428_800_000), "2026-12-05 00:00:00 UTC");
        assert_eq!(when(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }
}
