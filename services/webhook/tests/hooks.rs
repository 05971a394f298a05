//! The webhook service against a real nats-server: signed GitLab and GitHub events become jobs
//! on the lane queues once; hostile and broken deliveries get their status and make nothing.

use hmac::{Hmac, Mac};
use motorpool_bus::{
    Bus, LaneQueue, LaneQueueOptions, NatsServer,
    subjects::{ci, fleet},
};
use motorpool_config::WebhookConfig;
use motorpool_messages::ci::{CiJob, JobKind};
use motorpool_messages::exec::Lane;
use motorpool_messages::fleet::ImageBuildJob;
use serde_json::{Value, json};
use sha2::Sha256;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const GITLAB_SECRET: &str = "gitlab-token-0123456789";
const GITHUB_SECRET: &str = "github-secret-0123456789";
const NIGHTLY: &str = "nightly-token-0123456789";
const TOOLS_BOT: &str = "tools-bot-token-0123456789";
const RELEASE_BOT: &str = "release-bot-token-0123456789";
const C1: &str = "1111111111111111111111111111111111111111";
const C2: &str = "2222222222222222222222222222222222222222";

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

fn write_projects(dir: &Path) -> std::path::PathBuf {
    for (name, secret) in [("gl.secret", GITLAB_SECRET), ("gh.secret", GITHUB_SECRET)] {
        let p = dir.join(name);
        std::fs::write(&p, secret).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let file = dir.join("projects.toml");
    std::fs::write(
        &file,
        r#"
[[project]]
name = "av/monorepo"
forge = "gitlab"
secret_file = "gl.secret"
clone_url = "file:///srv/git/monorepo.git"
labels = { "priority::release" = "release" }
[[project.job]]
kind = "build"
[[project.job]]
kind = "test"
[[project.job]]
kind = "lint"
flags = ["--config=lint"]
[[project.job]]
kind = "release"
flags = ["-c", "opt"]
[[project.image]]
name = "car"
dockerfile = "images/car/Dockerfile"
context = "images/car"
tags = ["v*"]

[[project]]
name = "av/tools"
forge = "github"
secret_file = "gh.secret"

[[client]]
id = "nightly"
sha256 = "SHA_NIGHTLY"
projects = ["av/monorepo"]
max_lane = "build"
rate_per_minute = 1
burst = 2

[[client]]
id = "tools-bot"
sha256 = "SHA_TOOLS"
projects = ["av/tools"]
images = true

[[client]]
id = "release-bot"
sha256 = "SHA_RELEASE"
max_lane = "release"
images = true
"#
        .replace("SHA_NIGHTLY", &sha256_hex(NIGHTLY))
        .replace("SHA_TOOLS", &sha256_hex(TOOLS_BOT))
        .replace("SHA_RELEASE", &sha256_hex(RELEASE_BOT)),
    )
    .unwrap();
    file
}

/// One HTTP/1.1 request: `(status, JSON body)`. A server may answer (413) before it has read
/// the whole body; what it said still counts.
fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = s.write_all(head.as_bytes()).and_then(|_| s.write_all(body));
    response(s)
}

fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    response(s)
}

fn response(mut s: std::net::TcpStream) -> (u16, Value) {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn gitlab_mr(
    iid: u64,
    action: &str,
    commit: &str,
    oldrev: Option<&str>,
    labels: &[&str],
) -> Vec<u8> {
    json!({
        "object_kind": "merge_request",
        "user": {"username": "dev1"},
        "project": {"path_with_namespace": "av/monorepo", "git_http_url": "https://forge/av/monorepo.git"},
        "object_attributes": {
            "iid": iid, "action": action, "source_branch": "feat", "target_branch": "main",
            "last_commit": {"id": commit}, "oldrev": oldrev,
        },
        "labels": labels.iter().map(|l| json!({"title": l})).collect::<Vec<_>>(),
    })
    .to_string()
    .into_bytes()
}

/// A delivery and the status it must get: what it is, path, headers, body, status.
type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, Vec<u8>, u16);

fn github_signature(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(GITHUB_SECRET.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Delivers a merge-request event signed with the GitLab project's token, as delivery `key`.
async fn gitlab_delivery(addr: SocketAddr, key: &'static str, body: Vec<u8>) -> (u16, Value) {
    tokio::task::spawn_blocking(move || {
        let headers = [
            ("X-Gitlab-Token", GITLAB_SECRET),
            ("X-Gitlab-Event", "Merge Request Hook"),
            ("Idempotency-Key", key),
        ];
        post(addr, "/hooks/av/monorepo", &headers, &body)
    })
    .await
    .unwrap()
}

async fn queued(bus: &Bus) -> u64 {
    let mut stream = bus.ensure_stream(ci::jobs_stream_config()).await.unwrap();
    stream.info().await.unwrap().state.messages
}

fn ids(v: &Value) -> Vec<String> {
    v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_events_queue_jobs_once_in_their_lanes_and_bad_ones_make_nothing() {
    let server = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = WebhookConfig {
        nats_url: server.url(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        projects_file: Some(write_projects(dir.path())),
        max_body_bytes: 64 * 1024,
        ..WebhookConfig::default()
    };
    let shutdown = CancellationToken::new();
    let started = motorpool_webhook::start(config, shutdown.clone())
        .await
        .unwrap();
    let addr = started.http_addr;
    let bus = Bus::connect(&server.url(), "test-runner", Duration::from_secs(5))
        .await
        .unwrap();
    let hook = "/hooks/av/monorepo";
    let gl = |token: &'static str, kind: &'static str, key: &'static str| {
        vec![
            ("X-Gitlab-Token", token),
            ("X-Gitlab-Event", kind),
            ("Idempotency-Key", key),
        ]
    };
    let mr = gitlab_mr(7, "open", C1, None, &[]);

    // Hostile and broken deliveries: each its status, none makes anything.
    let forged = json!({
        "action": "opened", "number": 1,
        "pull_request": {"head": {"sha": C1, "ref": "x"}, "base": {"ref": "main"}},
        "repository": {"full_name": "av/monorepo", "clone_url": "https://evil/x.git"},
        "sender": {"login": "mallory"},
    })
    .to_string()
    .into_bytes();
    let (mr_sig, forged_sig) = (github_signature(&mr), github_signature(&forged));
    let wrong = "wrong-token-0123456789";
    let cases: Vec<Case> = vec![
        (
            "an unknown project",
            "/hooks/av/unknown",
            gl(GITLAB_SECRET, "Merge Request Hook", "a"),
            mr.clone(),
            404,
        ),
        (
            "no token",
            hook,
            vec![("X-Gitlab-Event", "Merge Request Hook")],
            mr.clone(),
            401,
        ),
        (
            "a wrong token",
            hook,
            gl(wrong, "Merge Request Hook", "a"),
            mr.clone(),
            401,
        ),
        // Garbage under a wrong token is refused as unauthenticated: nothing is parsed first.
        (
            "garbage and a wrong token",
            hook,
            gl(wrong, "Merge Request Hook", "a"),
            b"{{{".to_vec(),
            401,
        ),
        (
            "malformed JSON",
            hook,
            gl(GITLAB_SECRET, "Merge Request Hook", "a"),
            b"{not json".to_vec(),
            400,
        ),
        (
            "no event kind",
            hook,
            vec![("X-Gitlab-Token", GITLAB_SECRET)],
            mr.clone(),
            400,
        ),
        (
            "an oversized body",
            hook,
            gl(GITLAB_SECRET, "Merge Request Hook", "a"),
            vec![b' '; 100_000],
            413,
        ),
        (
            "a kind not handled",
            hook,
            gl(GITLAB_SECRET, "Note Hook", "a"),
            br#"{"object_kind":"note"}"#.to_vec(),
            202,
        ),
        (
            "a GitHub signature on a GitLab project",
            hook,
            vec![
                ("X-Hub-Signature-256", mr_sig.as_str()),
                ("X-GitHub-Event", "pull_request"),
            ],
            mr.clone(),
            401,
        ),
        (
            "the tools project's secret, naming the monorepo",
            "/hooks/av/tools",
            vec![
                ("X-Hub-Signature-256", forged_sig.as_str()),
                ("X-GitHub-Event", "pull_request"),
            ],
            forged.clone(),
            400,
        ),
    ];
    for (what, path, headers, body, expected) in cases {
        let (path, headers) = (
            path.to_string(),
            headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>(),
        );
        let (status, answer) = tokio::task::spawn_blocking(move || {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            post(addr, &path, &headers, &body)
        })
        .await
        .unwrap();
        assert_eq!(status, expected, "{what}: {answer}");
    }
    assert_eq!(queued(&bus).await, 0, "no refused delivery queued a job");

    // A signed merge request: build, test and lint, each in its kind's lane.
    let (status, body) = gitlab_delivery(addr, "delivery-1", mr.clone()).await;
    assert_eq!(status, 201, "{body}");
    let first = ids(&body);
    let lanes: Vec<&str> = body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["lane"].as_str().unwrap())
        .collect();
    assert_eq!(lanes, ["build", "test", "lint"], "{body}");
    assert_eq!(queued(&bus).await, 3);

    // The same delivery again (the forge retried): nothing new, the same jobs named.
    let (status, again) = gitlab_delivery(addr, "delivery-1", mr.clone()).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["duplicate"], true);
    assert_eq!(queued(&bus).await, 3, "a replayed delivery queues nothing");

    let (status, job) = tokio::task::spawn_blocking({
        let id = first[0].clone();
        move || get(addr, &format!("/api/v1/jobs/{id}"))
    })
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(job["state"], "queued");
    assert_eq!(
        job["trusted"], false,
        "a merge request's code does not write the cache"
    );
    assert_eq!(job["commit"], C1);
    assert_eq!(job["ref"], "refs/merge-requests/7/head");

    // New commits on the MR: its own jobs, and the older commit's queued jobs are superseded.
    let (status, body) = gitlab_delivery(
        addr,
        "delivery-2",
        gitlab_mr(7, "update", C2, Some(C1), &[]),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(ids(&body).len(), 3);
    for id in &first {
        let (_, s) = tokio::task::spawn_blocking({
            let id = id.clone();
            move || get(addr, &format!("/api/v1/jobs/{id}"))
        })
        .await
        .unwrap();
        assert_eq!(s["state"], "superseded", "{s}");
        assert_eq!(s["detail"], format!("superseded by {C2}"));
    }

    // Another MR, labelled for release: the release job too, and every job on the release lane.
    let (status, body) = gitlab_delivery(
        addr,
        "delivery-3",
        gitlab_mr(9, "open", C2, None, &["priority::release", "release"]),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let jobs = body["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 4, "{body}");
    assert!(jobs.iter().all(|j| j["lane"] == "release"), "{body}");
    assert!(jobs.iter().any(|j| j["kind"] == "release"), "{body}");

    // A GitHub pull request, signed with the tools project's secret.
    let pr = json!({
        "action": "opened", "number": 4,
        "pull_request": {"head": {"sha": C2, "ref": "fix"}, "base": {"ref": "main"}, "labels": []},
        "repository": {"full_name": "av/tools", "clone_url": "https://github.example/av/tools.git"},
        "sender": {"login": "octo"},
    })
    .to_string();
    let (status, body) = tokio::task::spawn_blocking(move || {
        let sig = github_signature(pr.as_bytes());
        post(
            addr,
            "/hooks/av/tools",
            &[
                ("X-Hub-Signature-256", sig.as_str()),
                ("X-GitHub-Event", "pull_request"),
                ("X-GitHub-Delivery", "9c7a0d2e-1"),
            ],
            pr.as_bytes(),
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(queued(&bus).await, 3 + 3 + 4 + 2);

    // A runner takes them in lane order: the release-labelled MR's jobs, queued after all the
    // others, come first; lint comes last.
    let mut queue = LaneQueue::<CiJob>::open(
        &bus,
        ci::jobs_stream_config(),
        LaneQueueOptions {
            consumer: ci::run_consumer,
            subject: ci::run,
            aging_step_ms: 3_600_000,
            ack_wait: Duration::from_secs(30),
            max_deliver: 3,
        },
    )
    .await
    .unwrap();
    let mut order = Vec::new();
    for _ in 0..12 {
        let d = tokio::time::timeout(Duration::from_secs(10), queue.next())
            .await
            .unwrap()
            .unwrap();
        order.push((d.lane, d.msg.kind, d.msg.project.clone()));
        d.ack().await.unwrap();
    }
    assert!(
        order[..4].iter().all(|(lane, _, _)| *lane == Lane::Release),
        "{order:?}"
    );
    assert!(
        order[10..].iter().all(|(lane, _, _)| *lane == Lane::Lint),
        "{order:?}"
    );
    assert!(
        order
            .iter()
            .any(|(_, kind, p)| *kind == JobKind::Build && p == "av/tools")
    );
    queue.close().await;

    // Still serving after all of it.
    let (status, _) = tokio::task::spawn_blocking(move || get(addr, "/healthz"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    shutdown.cancel();
    started.join().await;
}

async fn start(server: &NatsServer, dir: &Path) -> (motorpool_webhook::Started, CancellationToken) {
    let config = WebhookConfig {
        nats_url: server.url(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        projects_file: Some(write_projects(dir)),
        ..WebhookConfig::default()
    };
    let shutdown = CancellationToken::new();
    let started = motorpool_webhook::start(config, shutdown.clone())
        .await
        .unwrap();
    (started, shutdown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_clients_start_jobs_within_their_projects_lanes_and_rate() {
    let server = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (started, shutdown) = start(&server, dir.path()).await;
    let addr = started.http_addr;
    let bus = Bus::connect(&server.url(), "test-api", Duration::from_secs(5))
        .await
        .unwrap();
    let call = |token: Option<&'static str>, body: Value| {
        tokio::task::spawn_blocking(move || {
            let auth = token.map(|t| format!("Bearer {t}"));
            let headers: Vec<(&str, &str)> =
                auth.iter().map(|a| ("Authorization", a.as_str())).collect();
            post(addr, "/api/v1/jobs", &headers, body.to_string().as_bytes())
        })
    };
    let req = |kind: &str, lane: Option<&str>| json!({"project": "av/monorepo", "commit": C1, "ref": "refs/heads/main", "kind": kind, "lane": lane});
    let refused = [
        (None, req("build", None), 401, "no token"),
        (
            Some("not-a-client-token-000"),
            req("build", None),
            401,
            "an unknown token",
        ),
        (
            Some(TOOLS_BOT),
            req("build", None),
            403,
            "another project's client",
        ),
        (
            Some(NIGHTLY),
            req("build", Some("release")),
            403,
            "a lane above the client's",
        ),
        (
            Some(NIGHTLY),
            json!({"project": "av/monorepo"}),
            400,
            "no commit",
        ),
        (
            Some(NIGHTLY),
            req("build", Some("urgent")),
            400,
            "no such lane",
        ),
        (
            Some(NIGHTLY),
            json!({"project": "av/nope", "commit": C1, "ref": "refs/heads/main", "kind": "build"}),
            404,
            "an unknown project",
        ),
    ];
    for (token, body, expected, what) in refused {
        let (status, answer) = call(token, body).await.unwrap();
        assert_eq!(status, expected, "{what}: {answer}");
    }
    assert_eq!(queued(&bus).await, 0, "no refused request queued a job");

    // A release job asked by a client capped at build rides the build lane; a lower lane may
    // be asked for.
    let (status, body) = call(Some(NIGHTLY), req("release", None)).await.unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["jobs"][0]["lane"], "build");
    let (status, body) = call(Some(NIGHTLY), req("lint", Some("lint")))
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    // The burst (2) is spent: the third gets 429 and says when to come back.
    let (status, body) = call(Some(NIGHTLY), req("build", None)).await.unwrap();
    assert_eq!(status, 429, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("rate limit"),
        "{body}"
    );
    assert_eq!(queued(&bus).await, 2, "the refused request queued nothing");
    shutdown.cancel();
    started.join().await;
}

async fn builds_queued(bus: &Bus) -> Vec<ImageBuildJob> {
    let stream = bus
        .ensure_stream(fleet::builds_stream_config())
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut seq = 1;
    while let Ok(m) = stream.get_raw_message(seq).await {
        assert_eq!(m.subject.as_str(), fleet::build(Lane::Release).as_str());
        out.push(motorpool_messages::codec::decode(&m.payload).unwrap());
        seq += 1;
    }
    out
}

fn gitlab_tag(tag: &str, commit: &str) -> Vec<u8> {
    json!({
        "object_kind": "tag_push", "ref": format!("refs/tags/{tag}"),
        "before": "0000000000000000000000000000000000000000", "after": commit,
        "checkout_sha": commit, "user_username": "release-manager",
        "project": {"path_with_namespace": "av/monorepo", "git_http_url": "https://forge/av/monorepo.git"},
    })
    .to_string()
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_and_allowed_clients_queue_image_builds_once() {
    let server = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (started, shutdown) = start(&server, dir.path()).await;
    let addr = started.http_addr;
    let bus = Bus::connect(&server.url(), "test-images", Duration::from_secs(5))
        .await
        .unwrap();
    let tag = |key: &'static str, body: Vec<u8>| {
        tokio::task::spawn_blocking(move || {
            let headers = [
                ("X-Gitlab-Token", GITLAB_SECRET),
                ("X-Gitlab-Event", "Tag Push Hook"),
                ("Idempotency-Key", key),
            ];
            post(addr, "/hooks/av/monorepo", &headers, &body)
        })
    };
    let get = |path: String| tokio::task::spawn_blocking(move || get(addr, &path));

    // A release tag: the release job and the car image, pinned to the tag's commit.
    let (status, body) = tag("t1", gitlab_tag("v2.1", C1)).await.unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["jobs"].as_array().unwrap().len(), 1, "{body}");
    let image = &body["images"][0];
    assert_eq!(
        (&image["image_id"], &image["lane"], &image["commit"]),
        (&json!("car-v2.1"), &json!("release"), &json!(C1)),
        "{body}"
    );
    let builds = builds_queued(&bus).await;
    assert_eq!(builds.len(), 1);
    assert_eq!(builds[0].job_id, image["job_id"].as_str().unwrap());
    assert_eq!(builds[0].request.repo, "file:///srv/git/monorepo.git");
    assert_eq!(builds[0].request.dockerfile, "images/car/Dockerfile");
    let (status, state) = get(format!("/api/v1/images/{}", builds[0].job_id))
        .await
        .unwrap();
    assert_eq!(
        (status, &state["state"]),
        (200, &json!("queued")),
        "{state}"
    );

    // The forge delivers it again: nothing new.
    let (status, again) = tag("t1", gitlab_tag("v2.1", C1)).await.unwrap();
    assert_eq!(
        (status, &again["duplicate"]),
        (200, &json!(true)),
        "{again}"
    );
    assert!(
        again["jobs"]
            .as_array()
            .unwrap()
            .contains(&json!(builds[0].job_id)),
        "{again}"
    );
    // A tag no image is built from, and a deleted tag: no build.
    let (status, body) = tag("t2", gitlab_tag("nightly-5", C2)).await.unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["images"], json!([]), "{body}");
    let deleted = gitlab_tag("v2.1", "0000000000000000000000000000000000000000");
    assert_eq!(tag("t3", deleted).await.unwrap().0, 202);
    assert_eq!(builds_queued(&bus).await.len(), 1);

    // Through the API: only clients allowed image builds, only images the project defines.
    let call = |token: &'static str, key: &'static str, body: Value| {
        tokio::task::spawn_blocking(move || {
            let auth = format!("Bearer {token}");
            let headers = [("Authorization", auth.as_str()), ("Idempotency-Key", key)];
            post(
                addr,
                "/api/v1/images",
                &headers,
                body.to_string().as_bytes(),
            )
        })
    };
    let req = |image: &str, git_ref: &str| json!({"project": "av/monorepo", "image": image, "commit": C2, "ref": git_ref});
    for (token, body, expected, what) in [
        (
            NIGHTLY,
            req("car", "refs/tags/v3"),
            403,
            "a client not allowed images",
        ),
        (
            TOOLS_BOT,
            req("car", "refs/tags/v3"),
            403,
            "another project's client",
        ),
        (
            RELEASE_BOT,
            req("bus", "refs/tags/v3"),
            404,
            "an image the project does not define",
        ),
        (RELEASE_BOT, req("car", "v3"), 400, "not a full ref"),
        (
            RELEASE_BOT,
            json!({"project": "av/monorepo", "image": "car", "commit": C2, "ref": "refs/tags/v3", "dockerfile": "/etc/shadow"}),
            400,
            "a field the API does not take",
        ),
    ] {
        let (status, answer) = call(token, "k0", body).await.unwrap();
        assert_eq!(status, expected, "{what}: {answer}");
    }
    assert_eq!(
        builds_queued(&bus).await.len(),
        1,
        "no refused request queued a build"
    );
    let (status, body) = call(RELEASE_BOT, "k1", req("car", "refs/tags/v3"))
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["images"][0]["image_id"], "car-v3");
    let (status, body) = call(RELEASE_BOT, "k2", req("car", "refs/heads/main"))
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["images"][0]["image_id"], format!("car-{}", &C2[..12]));
    let (status, body) = call(RELEASE_BOT, "k2", req("car", "refs/heads/main"))
        .await
        .unwrap();
    assert_eq!((status, &body["duplicate"]), (200, &json!(true)), "{body}");
    assert_eq!(builds_queued(&bus).await.len(), 3);

    // Status lookups that are not a build.
    assert_eq!(get("/api/v1/images/nope".into()).await.unwrap().0, 400);
    assert_eq!(
        get(format!("/api/v1/images/{}", "0".repeat(32)))
            .await
            .unwrap()
            .0,
        404
    );
    shutdown.cancel();
    started.join().await;
}
