//! The CI path end to end on `motorpool up` as it ships: a local bare git repository holding a
//! generated C++ Bazel workspace and a Git LFS file; signed GitLab merge-request and GitHub
//! pull-request events -> jobs on the lane queues -> the stack's runner checks them out (LFS
//! objects included) into its warm workspace pool and builds them with the real Bazel on the
//! platform's remote execution -> a recording forge (standing in for GitLab's and GitHub's
//! status APIs, which cannot exist here) receives pending, running and success.

mod support;

use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};
use support::Stack;
use support::ci::*;

#[test]
fn merge_requests_are_built_on_the_platform_in_warm_workspaces_and_reported_to_the_forge() {
    support::require_bazel();
    let dir = tempfile::tempdir().unwrap();
    let Repo {
        ws,
        work,
        origin_url,
        c1,
        calib,
    } = repo(
        dir.path(),
        6,
        // The merge request's own .bazelrc tries to raise its lane.
        &[(
            ".bazelrc",
            "build --remote_header=x-motorpool-lane=release\n",
        )],
    );

    let (forge, received) = recording_forge();
    let token_file = dir.path().join("forge.token");
    std::fs::write(&token_file, "forge-api-token").unwrap();
    let api = format!("http://{forge}/api/v4");
    let gh_api = format!("http://{forge}");
    let stack = Stack::up_with_env(
        &["--workers", "2", "--shards", "0"],
        &[
            ("MOTORPOOL_RUNNER_FORGES__GITLAB__API_URL", api.as_str()),
            (
                "MOTORPOOL_RUNNER_FORGES__GITLAB__TOKEN_FILE",
                token_file.to_str().unwrap(),
            ),
            ("MOTORPOOL_RUNNER_FORGES__GITHUB__API_URL", gh_api.as_str()),
            (
                "MOTORPOOL_RUNNER_FORGES__GITHUB__TOKEN_FILE",
                token_file.to_str().unwrap(),
            ),
        ],
    );

    write_projects(&stack, &ws, &["//..."]);

    // A merge request opens: one build job; the runner takes it in a new (cold) workspace.
    let gl = |key: &'static str| {
        [
            ("X-Gitlab-Token", TOKEN),
            ("X-Gitlab-Event", "Merge Request Hook"),
            ("Idempotency-Key", key),
        ]
    };
    let id1 = queue_job(
        &stack,
        "/hooks/av/monorepo",
        &gl("mr-1"),
        &gitlab_mr(&origin_url, 1, "open", &c1, None),
    );
    let (done1, log1) = finished(&stack, &id1);
    assert_eq!(done1["state"], "succeeded", "{done1}\n{log1}");
    assert_eq!(done1["warm"], false, "{done1}");
    assert!(!done1["trusted"].as_bool().unwrap());
    let steps: Vec<&str> = done1["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        ["workspace", "checkout", "build", "report"],
        "{done1}"
    );
    let cold_remote = remote_processes(&log1);
    assert!(
        cold_remote >= 10,
        "the build ran on the platform: {cold_remote}\n{log1}"
    );
    // The job's build has its page, linked from the job's log, naming the job and its MR.
    let link = format!(
        "Streaming build results to: http://{}/invocation/",
        stack.http
    );
    let invocation = log1
        .lines()
        .find_map(|l| l.split(&link).nth(1))
        .unwrap_or_else(|| panic!("the job's log links its build's page:\n{log1}"))
        .trim()
        .to_string();
    let auth = format!("Bearer {}", stack.keys.admin);
    let (status, body) = http(
        stack.http,
        "GET",
        &format!("/api/v1/invocations?q={id1}"),
        &[("Authorization", auth.as_str())],
        b"",
    );
    let list: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    assert_eq!(status, 200, "{body}");
    assert_eq!(list[0]["invocation_id"], invocation.as_str(), "{list}");
    assert_eq!(
        (
            &list[0]["ci_job"],
            &list[0]["merge_request"],
            &list[0]["commit"]
        ),
        (
            &serde_json::json!(id1),
            &serde_json::json!("1"),
            &serde_json::json!(c1)
        ),
        "{list}"
    );
    // The LFS file was fetched, not left as a pointer.
    let workspace = done1["workspace"].as_str().unwrap().to_string();
    let checkout = stack
        .dir
        .path()
        .join("data/runner/workspaces")
        .join(&workspace)
        .join("src");
    assert_eq!(
        std::fs::read(checkout.join("calib/camera.bin")).unwrap(),
        calib
    );

    // Its executions rode the job's lane (build), not the one its .bazelrc asked for.
    let lanes = |lane: &str| -> f64 {
        stack
            .http_get("/metrics")
            .lines()
            .filter(|l| {
                l.starts_with("motorpool_gateway_executions_total")
                    && l.contains(&format!("lane=\"{lane}\""))
            })
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum()
    };
    assert!(lanes("build") > 0.0, "{}", stack.http_get("/metrics"));
    assert_eq!(
        lanes("release"),
        0.0,
        "a repository's header raised its lane"
    );

    // The forge heard pending, running, success for that commit, with its token.
    let statuses = |commit: &str| -> Vec<String> {
        received
            .lock()
            .unwrap()
            .iter()
            .filter(|(path, _, _)| path.ends_with(commit))
            .map(|(_, _, body)| body["state"].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(statuses(&c1), ["pending", "running", "success"]);
    {
        let got = received.lock().unwrap();
        let (path, token, body) = &got[0];
        assert_eq!(
            path,
            &format!("/api/v4/projects/av%2Fmonorepo/statuses/{c1}")
        );
        assert_eq!(token, "forge-api-token");
        assert_eq!(body["name"], "motorpool/build");
    }

    // New commits on the MR (one library changed): the same workspace, warm; only what changed
    // is fetched and rebuilt.
    let lib = work.join("lib5/lib5.cc");
    let text = std::fs::read_to_string(&lib).unwrap();
    std::fs::write(
        &lib,
        text.replace("return acc + m.size();", "return acc + 2 * m.size();"),
    )
    .unwrap();
    git(&work, &["commit", "--quiet", "-am", "second"]);
    git(
        &work,
        &[
            "push",
            "--quiet",
            "--force",
            "origin",
            "HEAD:refs/merge-requests/1/head",
        ],
    );
    let c2 = head(&work);
    let id2 = queue_job(
        &stack,
        "/hooks/av/monorepo",
        &gl("mr-2"),
        &gitlab_mr(&origin_url, 1, "update", &c2, Some(&c1)),
    );
    let (done2, log2) = finished(&stack, &id2);
    assert_eq!(done2["state"], "succeeded", "{done2}\n{log2}");
    assert_eq!(done2["warm"], true, "{done2}");
    assert_eq!(done2["workspace"], workspace.as_str());
    let warm_remote = remote_processes(&log2);
    assert!(
        warm_remote < cold_remote,
        "a warm workspace rebuilds only what changed: {warm_remote} remote actions vs {cold_remote}\n{log2}"
    );
    assert!(
        !log2.contains("git init"),
        "no new clone in a warm workspace:\n{log2}"
    );
    eprintln!(
        "cold job: {cold_remote} remote actions, steps {}; warm job: {warm_remote} remote actions, steps {}",
        done1["steps"], done2["steps"]
    );
    assert_eq!(statuses(&c2), ["pending", "running", "success"]);

    // The same commit as a GitHub pull request on the mirror: GitHub's status API and states.
    let pr = json!({
        "action": "opened", "number": 1,
        "pull_request": {"head": {"sha": c2, "ref": "feat"}, "base": {"ref": "main"}, "labels": []},
        "repository": {"full_name": "av/mirror", "clone_url": origin_url},
        "sender": {"login": "octo"},
    })
    .to_string();
    git(
        &work,
        &["push", "--quiet", "origin", "HEAD:refs/pull/1/head"],
    );
    let sig = {
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(GH_SECRET.as_bytes()).unwrap();
        mac.update(pr.as_bytes());
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    };
    let id3 = queue_job(
        &stack,
        "/hooks/av/mirror",
        &[
            ("X-Hub-Signature-256", sig.as_str()),
            ("X-GitHub-Event", "pull_request"),
            ("X-GitHub-Delivery", "gh-1"),
        ],
        pr.as_bytes(),
    );
    let done3 = wait_job(&stack, &id3);
    assert_eq!(done3["state"], "succeeded", "{done3}");
    let gh: Vec<(String, String)> = received
        .lock()
        .unwrap()
        .iter()
        .filter(|(path, _, _)| path.starts_with("/repos/av/mirror/statuses/"))
        .map(|(_, token, body)| {
            (
                token.clone(),
                body["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let states: Vec<&str> = gh.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(
        states,
        ["pending", "pending", "success"],
        "GitHub has no running state"
    );
    assert_eq!(gh[0].0, "Bearer forge-api-token");

    // A push to main (trusted: its key may write the action cache) never runs in a workspace
    // where a merge request's code ran: it gets a clean one.
    git(
        &work,
        &["push", "--quiet", "origin", "HEAD:refs/heads/main"],
    );
    let push = json!({
        "object_kind": "push", "ref": "refs/heads/main", "before": c1, "after": c2,
        "checkout_sha": c2, "user_username": "rm",
        "project": {"path_with_namespace": "av/monorepo", "git_http_url": origin_url},
    })
    .to_string();
    let id4 = queue_job(
        &stack,
        "/hooks/av/monorepo",
        &[
            ("X-Gitlab-Token", TOKEN),
            ("X-Gitlab-Event", "Push Hook"),
            ("Idempotency-Key", "push-1"),
        ],
        push.as_bytes(),
    );
    let (done4, log4) = finished(&stack, &id4);
    assert_eq!(done4["state"], "succeeded", "{done4}\n{log4}");
    assert_eq!(done4["trusted"], true);
    assert_eq!(done4["warm"], false, "{done4}");
    assert_ne!(done4["workspace"], workspace.as_str(), "{done4}");

    // The pool shows the workspace, free and clean, with the jobs it ran.
    let (_, pool) = http(stack.runner, "GET", "/api/v1/workspaces", &[], b"");
    let pool: Value = serde_json::from_str(&pool).unwrap();
    let entry = pool
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == workspace.as_str())
        .unwrap();
    assert_eq!(entry["busy"], false, "{pool}");
    assert_eq!(entry["dirty"], false, "{pool}");
    assert_eq!(entry["jobs"], 3, "{pool}");
    assert_eq!(entry["tainted"], true, "{pool}");
    let trusted = pool
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == done4["workspace"])
        .unwrap();
    assert_eq!(trusted["tainted"], false, "{pool}");
    assert!(
        stack.bus_violations().is_empty(),
        "{:?}",
        stack.bus_violations()
    );
}

/// Bazel clients (not servers) working in `ws`.
fn bazel_clients(ws: &Path) -> usize {
    let needle = format!("--output_base={}", ws.join("output_base").display());
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(&needle) && !cmd.contains("A-server.jar")
        })
        .count()
}

#[test]
fn a_runner_killed_mid_job_loses_its_lease_and_the_job_finishes_in_the_reset_workspace() {
    support::require_bazel();
    let dir = tempfile::tempdir().unwrap();
    let slow =
        "genrule(name = \"slow\", outs = [\"slow.txt\"], cmd = \"sleep 8 && echo done > $@\")\n";
    let Repo {
        ws, origin_url, c1, ..
    } = repo(dir.path(), 1, &[("slow/BUILD", slow)]);
    // Two runners sharing a pool of one workspace; leases of 4 s.
    let stack = Stack::up_with_env(
        &["--workers", "1", "--shards", "0", "--runners", "2"],
        &[
            ("MOTORPOOL_RUNNER_POOL_SIZE", "1"),
            ("MOTORPOOL_RUNNER_LEASE_MS", "4000"),
        ],
    );
    write_projects(&stack, &ws, &["//slow:slow"]);
    let headers = [
        ("X-Gitlab-Token", TOKEN),
        ("X-Gitlab-Event", "Merge Request Hook"),
        ("Idempotency-Key", "slow-1"),
    ];
    let id = queue_job(
        &stack,
        "/hooks/av/monorepo",
        &headers,
        &gitlab_mr(&origin_url, 1, "open", &c1, None),
    );
    // Once it builds, kill its runner with SIGKILL.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (runner, workspace) = loop {
        let (_, s) = http(
            stack.webhook,
            "GET",
            &format!("/api/v1/jobs/{id}"),
            &[],
            b"",
        );
        let s: Value = serde_json::from_str(&s).unwrap_or(Value::Null);
        if s["state"] == "running" && s["detail"] == "build" {
            break (
                s["runner"].as_str().unwrap().to_string(),
                s["workspace"].as_str().unwrap().to_string(),
            );
        }
        assert!(
            Instant::now() < deadline,
            "the job never started building: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let ws_dir = stack
        .dir
        .path()
        .join("data/runner/workspaces")
        .join(&workspace);
    let started = Instant::now();
    while bazel_clients(&ws_dir) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no Bazel client in {}:\n{}",
            ws_dir.display(),
            job_log(&stack, &id)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    stack.kill9(&["runner", runner.as_str()]);
    // Its Bazel client dies with it: nobody builds on in the workspace it held.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        bazel_clients(&ws_dir),
        0,
        "the dead runner's Bazel client lives on"
    );

    // The lease runs out, the job runs again (on whichever runner is up) in the same, reset,
    // workspace, and finishes.
    let (done, log) = finished(&stack, &id);
    assert_eq!(done["state"], "succeeded", "{done}\n{log}");
    assert_eq!(done["attempt"], 2, "{done}");
    assert_eq!(done["workspace"], workspace.as_str());
    assert!(
        log.contains("did not end cleanly; resetting it"),
        "the dirty workspace was reset before reuse:\n{log}"
    );
    let (_, pool) = http(stack.runner, "GET", "/api/v1/workspaces", &[], b"");
    let pool: Value = serde_json::from_str(&pool).unwrap();
    assert_eq!(pool.as_array().unwrap().len(), 1, "{pool}");
    assert_eq!(pool[0]["dirty"], false, "{pool}");
}
