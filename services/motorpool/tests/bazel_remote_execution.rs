//! The real Bazel 4.2.3 builds and tests through `motorpool up --workers 2 --tls` as its remote
//! executor, over TLS (`grpcs://`, `--tls_certificate`) with an API key.

mod support;

use support::ci::remote_processes;
use support::workspace::{Bazel, Workspace, local_reference};
use support::{Stack, sha256_file};

#[test]
fn bazel_remote_execution_matches_local_and_rebuilds_from_cache() {
    support::require_bazel();
    let dir = tempfile::tempdir().unwrap();
    let ws = Workspace::generate(dir.path(), 50);

    // Reference: a purely local build in its own output root.
    let reference = local_reference(&ws, &dir.path().join("root-local"));

    // No dedicated shard: the workers hold the whole CAS.
    let stack = Stack::up(&["--workers", "2", "--shards", "0", "--tls"]);
    let bazel = || Bazel::new(&ws, &dir.path().join("root-remote")).with_openssl();
    let remote = bazel();
    let flags = vec![
        "//...".to_string(),
        format!("--remote_executor=grpcs://{}", stack.grpc),
        "--remote_instance_name=ci".to_string(),
        format!("--tls_certificate={}", stack.tls_ca().unwrap().display()),
        "--spawn_strategy=remote".to_string(),
        "--jobs=8".to_string(),
        stack.bazel_auth(&stack.keys.ci),
    ];
    let cold = remote.run("test", &flags);
    let (total, hits, internal) = cold.process_summary();
    let err = cold.stderr();
    assert_eq!(hits, 0, "a cold cache has no hits: {err}");
    let remote_count = remote_processes(&err);
    assert_eq!(
        remote_count,
        total - internal,
        "every action must run remotely:\n{err}"
    );
    assert!(
        remote_count >= 250,
        "builds and tests ran remotely: {remote_count}"
    );
    let out = String::from_utf8_lossy(&cold.output.stdout);
    assert!(
        out.contains("Executed 50 out of 50 tests: 50 tests pass"),
        "all tests pass remotely:\n{out}"
    );
    for (artifact, expected) in &reference {
        assert_eq!(
            &sha256_file(&remote.bazel_bin().join(artifact)),
            expected,
            "{artifact} built remotely differs from the local build"
        );
    }

    remote.run("clean", &["--expunge".into()]);
    let warm = remote.run("test", &flags);
    let (total, hits, internal) = warm.process_summary();
    assert_eq!(
        hits,
        total - internal,
        "after clean --expunge everything is a remote cache hit:\n{}",
        warm.stderr()
    );
    remote.run("clean", &["--expunge".into()]);

    // kill -9 one worker in the middle of a cold build (a fresh instance name): the build still
    // succeeds, with the same outputs and no missing digest.
    let mut fault = flags.clone();
    fault[2] = "--remote_instance_name=fault".into();
    let build = std::thread::spawn({
        let remote = bazel();
        move || remote.run("test", &fault)
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !stack.http_get("/api/v1/queues").contains("\"executing\":") || executing(&stack) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the build never got going"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_secs(3));
    stack.kill9(&["worker", "worker-0"]);
    let run = build.join().expect("the build survives losing a worker");
    let err = run.stderr();
    for bad in [
        "missing digest",
        "Missing digest",
        "CacheNotFoundException",
        "FAILED_PRECONDITION",
    ] {
        assert!(!err.contains(bad), "{bad} after losing a worker:\n{err}");
    }
    let out = String::from_utf8_lossy(&run.output.stdout);
    assert!(
        out.contains("Executed 50 out of 50 tests: 50 tests pass"),
        "{out}"
    );
    for (artifact, expected) in &reference {
        assert_eq!(
            &sha256_file(&remote.bazel_bin().join(artifact)),
            expected,
            "{artifact} differs after losing a worker"
        );
    }
    remote.run("clean", &["--expunge".into()]);
}

/// Actions executing now, from `/api/v1/queues`.
fn executing(stack: &Stack) -> u64 {
    let text = stack.http_get("/api/v1/queues");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["executing"].as_u64())
        .unwrap_or(0)
}
