//! The build-event view on the gateway's HTTP port: server-rendered pages (no script, no
//! external asset) and their JSON twins under `/api/v1/`.
//!
//! | page | JSON twin |
//! |---|---|
//! | `/invocations` (`?user=`, `?status=`, `?command=`, `?q=` a pattern, branch or commit) | `/api/v1/invocations` |
//! | `/invocation/<id>` (what `--bes_results_url=http://HOST:8080/invocation/` links) | `/api/v1/invocations/<id>` |
//! | `/invocation/<id>/timeline.svg` | - |
//! | `/invocation/<id>/output?uri=bytestream://...` (a test log, from the CAS) | - |
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
}

impl Ui {
    pub async fn new(
        bes: Option<Arc<Bes>>,
        auth: Arc<Auth>,
        shards: Shards,
        _bus: Bus,
    ) -> anyhow::Result<Ui> {
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
        Ok(Ui {
            bes,
            stream,
            auth,
            shards,
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
        .route("/api/v1/invocations/{id}", web::get().to(invocation_json));
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
nav a{margin-right:1em}form.filter input{width:9em}";

fn page(title: &str, refresh: bool, body: &str) -> HttpResponse {
    let meta = if refresh {
        "<meta http-equiv=\"refresh\" content=\"3\">"
    } else {
        ""
    };
    HttpResponse::Ok().content_type("text/html; charset=utf-8").body(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">{meta}<title>{} · Motorpool</title><style>{STYLE}</style></head>\
         <body><nav><a href=\"/invocations\">Invocations</a><a href=\"/api/v1/queues\">Queues (JSON)</a><a href=\"/login\">Key</a></nav>{body}</body></html>",
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
        "branch": s.branch, "commit": s.commit, "status": s.status, "exit_code": s.exit_code,
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
    match visible(&ui, &who, &filter).await {
        Ok(list) => HttpResponse::Ok().json(list.iter().map(summary_json).collect::<Vec<_>>()),
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

async fn invocation_json(
    req: HttpRequest,
    ui: web::Data<Ui>,
    id: web::Path<String>,
) -> HttpResponse {
    let who = match ui.caller(&req) {
        Ok(w) => w,
        Err(e) => return unauthenticated(false, &e),
    };
    match find(&ui, &who, &id).await {
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
    let inv = match find(&ui, &who, &id).await {
        Ok(i) => i,
        Err(r) => return r,
    };
    let s = &inv.summary;
    let now = motorpool_messages::now_ms();
    let (hits, executed) = inv.cache_hits();
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>{cmd} <code>{pat}</code></h1><p class=\"{status}\"><b>{status}</b>{trunc} · {dur} · started {started} · Bazel {ver}</p>\
         <table><tr><th>invocation</th><td><code>{id}</code></td></tr><tr><th>user</th><td>{user} on {host}</td></tr>\
         <tr><th>branch / commit</th><td>{branch} <code>{commit}</code></td></tr>\
         <tr><th>targets</th><td>{targets} ({tfail} failed)</td></tr><tr><th>tests</th><td>{tests} ({tfl} failed, {flaky} flaky)</td></tr>\
         <tr><th>remote actions</th><td>{executed} executed, {hits} found in the cache through Execute</td></tr>\
         <tr><th>command line</th><td><code>{args}</code></td></tr></table>",
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
        ver = esc(&inv.tool_version),
        id = esc(&s.invocation_id),
        user = esc(&s.user),
        host = esc(&s.host),
        branch = esc(&s.branch),
        commit = esc(&s.commit),
        targets = s.targets,
        tfail = s.targets_failed,
        tests = s.tests,
        tfl = s.tests_failed,
        flaky = s.tests_flaky,
        args = esc(&inv.args.join(" ")),
    );
    let _ = write!(
        b,
        "<h2>Timeline</h2><p>Every action the platform ran for this build: one row per worker slot, \
         bars coloured by mnemonic, the dark part the execution, the lighter parts input fetch and output upload; \
         hover a bar for its details. <a href=\"/invocation/{}/timeline.svg\">SVG</a></p>{}",
        esc(&s.invocation_id),
        timeline(&inv.actions, &on_path(&inv))
    );
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
