//! Helpers of the CI tests and benchmark: a git repository with LFS served from a local bare
//! repository, the projects file, plain HTTP calls, waiting for jobs.

use super::Stack;
use super::workspace::Workspace;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "ci-gitlab-token-0123456789";
pub const GH_SECRET: &str = "ci-github-secret-0123456789";

/// One status a forge received: (path, token header, JSON body).
pub type Received = Arc<Mutex<Vec<(String, String, Value)>>>;

/// A forge's status API that records what it is told and answers 201.
pub fn recording_forge() -> (std::net::SocketAddr, Received) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let got: Received = Arc::default();
    let seen = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            let (mut len, mut token) = (0usize, String::new());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let (k, v) = line.split_once(':').unwrap_or((&line, ""));
                match k.to_ascii_lowercase().as_str() {
                    "content-length" => len = v.trim().parse().unwrap_or(0),
                    "private-token" | "authorization" => token = v.trim().to_string(),
                    _ => {}
                }
            }
            let mut body = vec![0; len];
            let _ = reader.read_exact(&mut body);
            let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
            seen.lock().unwrap().push((
                path,
                token,
                serde_json::from_slice(&body).unwrap_or(Value::Null),
            ));
            let mut conn = conn;
            let _ = conn.write_all(
                b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
            );
        }
    });
    (addr, got)
}

pub fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .current_dir(dir)
        .args(["-c", "user.email=ci@test", "-c", "user.name=ci"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn head(dir: &Path) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .args(["rev-parse", "HEAD"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

pub fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        status,
        out.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
    )
}

/// Posts an event (or API request) to the webhook that must queue jobs; the first job's id.
pub fn queue_job(stack: &Stack, path: &str, headers: &[(&str, &str)], body: &[u8]) -> String {
    let (status, answer) = http(stack.webhook, "POST", path, headers, body);
    assert_eq!(status, 201, "{answer}");
    serde_json::from_str::<Value>(&answer).unwrap()["jobs"][0]["job_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A job's log so far, from the stack's first runner.
pub fn job_log(stack: &Stack, id: &str) -> String {
    http(
        stack.runner,
        "GET",
        &format!("/api/v1/jobs/{id}/log"),
        &[],
        b"",
    )
    .1
}

/// Waits for a job to finish: its status JSON and its log from the runner.
pub fn finished(stack: &Stack, id: &str) -> (Value, String) {
    (wait_job(stack, id), job_log(stack, id))
}

/// Waits for a job to reach a final state; its status JSON.
pub fn wait_job(stack: &Stack, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (_, body) = http(
            stack.webhook,
            "GET",
            &format!("/api/v1/jobs/{id}"),
            &[],
            b"",
        );
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        if matches!(v["state"].as_str(), Some("succeeded" | "failed")) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} did not finish: {v}\n{}",
            stack.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// "N remote" from the last process summary in a job's log.
pub fn remote_processes(log: &str) -> u64 {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(" processes:") || l.contains(" process:"))
        .unwrap_or("");
    line.split([':', ',', '.'])
        .map(str::trim)
        .find(|p| p.ends_with(" remote"))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

pub fn gitlab_mr(
    origin: &str,
    iid: u64,
    action: &str,
    commit: &str,
    oldrev: Option<&str>,
) -> Vec<u8> {
    json!({
        "object_kind": "merge_request",
        "user": {"username": "dev1"},
        "project": {"path_with_namespace": "av/monorepo", "git_http_url": origin},
        "object_attributes": {"iid": iid, "action": action, "source_branch": "feat", "target_branch": "main",
            "last_commit": {"id": commit}, "oldrev": oldrev},
        "labels": [],
    })
    .to_string()
    .into_bytes()
}

/// The test repository: a generated workspace with an LFS-tracked calibration file a genrule
/// reads, pushed to a local bare repository as `main` and merge request 1.
pub struct Repo {
    pub ws: Workspace,
    pub work: std::path::PathBuf,
    pub origin_url: String,
    pub c1: String,
    pub calib: Vec<u8>,
}

pub fn repo(dir: &Path, libs: usize, extra: &[(&str, &str)]) -> Repo {
    let ws = Workspace::generate(dir, libs);
    let work = ws.root.clone();
    let origin = dir.join("origin.git");
    git(
        dir,
        &["init", "--quiet", "--bare", origin.to_str().unwrap()],
    );
    git(&work, &["init", "--quiet"]);
    git(&work, &["lfs", "install", "--local"]);
    git(&work, &["lfs", "track", "*.bin"]);
    let calib: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::create_dir_all(work.join("calib")).unwrap();
    std::fs::write(work.join("calib/camera.bin"), &calib).unwrap();
    std::fs::write(
        work.join("calib/BUILD"),
        "genrule(name = \"size\", srcs = [\"camera.bin\"], outs = [\"size.txt\"], cmd = \"wc -c < $< > $@\")\n",
    )
    .unwrap();
    for (path, text) in extra {
        std::fs::create_dir_all(work.join(path).parent().unwrap()).unwrap();
        std::fs::write(work.join(path), text).unwrap();
    }
    git(&work, &["add", "."]);
    git(&work, &["commit", "--quiet", "-m", "first"]);
    let origin_url = format!("file://{}", origin.display());
    git(&work, &["remote", "add", "origin", &origin_url]);
    git(
        &work,
        &[
            "push",
            "--quiet",
            "origin",
            "HEAD:refs/heads/main",
            "HEAD:refs/merge-requests/1/head",
        ],
    );
    let c1 = head(&work);
    Repo {
        ws,
        work,
        origin_url,
        c1,
        calib,
    }
}

/// The operator's projects: the monorepo on GitLab and its GitHub mirror, each one job: a
/// remote build of `targets` with the offline overrides this machine's Bazel needs.
pub fn write_projects(stack: &Stack, ws: &Workspace, targets: &[&str]) {
    write_projects_with(stack, ws, targets, &[]);
}

/// [`write_projects`] with more Bazel flags for the job.
pub fn write_projects_with(stack: &Stack, ws: &Workspace, targets: &[&str], extra: &[&str]) {
    let hooks = stack.dir.path().join("data/webhook");
    for (name, secret) in [("gl.secret", TOKEN), ("gh.secret", GH_SECRET)] {
        std::fs::write(hooks.join(name), secret).unwrap();
        std::fs::set_permissions(hooks.join(name), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let flags: Vec<String> = ["rules_cc", "rules_java", "remote_coverage_tools"]
        .iter()
        .map(|r| format!("--override_repository={r}={}", ws.repos.join(r).display()))
        .chain([
            "--override_repository=platforms=/usr/share/bazel/tools/platforms".to_string(),
            "--spawn_strategy=remote".into(),
            "--jobs=8".into(),
        ])
        .chain(extra.iter().map(|f| f.to_string()))
        .collect();
    let job = format!(
        "[[project.job]]\nkind = \"build\"\ntargets = {}\nflags = {}\n",
        toml::Value::from(targets.to_vec()),
        toml::Value::from(flags)
    );
    std::fs::write(
        hooks.join("projects.toml"),
        format!(
            "[[project]]\nname = \"av/monorepo\"\nforge = \"gitlab\"\nsecret_file = \"gl.secret\"\n{job}\n\
             [[project]]\nname = \"av/mirror\"\nforge = \"github\"\nsecret_file = \"gh.secret\"\n{job}"
        ),
    )
    .unwrap();
    wait_for_project(stack, "av/monorepo");
    wait_for_project(stack, "av/mirror");
}

/// Waits (up to 30 s) until the webhook, which re-reads its projects file once a second, knows
/// `project`: an unsigned probe gets 401 from a known project and 404 from an unknown one.
pub fn wait_for_project(stack: &Stack, project: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = http(
            stack.webhook,
            "POST",
            &format!("/hooks/{project}"),
            &[],
            b"",
        );
        if status != 404 {
            assert_eq!(status, 401, "an unsigned probe of {project}: {body}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the webhook never loaded project {project}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
