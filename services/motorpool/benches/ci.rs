//! CI jobs cold against warm, on `motorpool up`: the same generated workspace, one file changed
//! before each job. A cold job runs as a throw-away CI pod would (no checkout, no Bazel server:
//! the workspace is wiped first; the platform's remote cache is shared either way); a warm job
//! finds the last job's checkout, LFS objects and Bazel server in its workspace.
//!
//!   cargo bench -p motorpool --bench ci
//!   MOTORPOOL_BENCH_REPS=5 MOTORPOOL_BENCH_LIBS=60 MOTORPOOL_BENCH_LFS_MB=256 cargo bench -p motorpool --bench ci
//!
//! Prints a table of medians: checkout, Bazel loading and analysis (from Bazel's JSON profile:
//! "Evaluate target patterns" to "Prepare for build"), the whole Bazel command, and end to end
//! (the event's job queued to its status written as done).

#[path = "../tests/support/mod.rs"]
mod support;

use serde_json::Value;
use std::path::Path;
use support::Stack;
use support::ci::*;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Bazel's loading and analysis time in seconds, from its JSON profile: from the phase marker
/// "Evaluate target patterns" to "Prepare for build".
fn analysis_s(profile: &Path) -> f64 {
    let Ok(text) = std::fs::read_to_string(profile) else {
        return f64::NAN;
    };
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let events = v["traceEvents"].as_array().cloned().unwrap_or_default();
    let at = |name: &str| {
        events
            .iter()
            .find(|e| e["cat"] == "build phase marker" && e["name"] == name)
            .and_then(|e| e["ts"].as_f64())
    };
    match (at("Evaluate target patterns"), at("Prepare for build")) {
        (Some(a), Some(b)) => (b - a) / 1e6,
        _ => f64::NAN,
    }
}

/// A table row: the step, how to read it off a run, its goal.
type Row = (&'static str, fn(&Run) -> f64, &'static str);

struct Run {
    checkout_s: f64,
    analysis_s: f64,
    bazel_s: f64,
    end_to_end_s: f64,
    warm: bool,
    remote: u64,
}

fn job(stack: &Stack, repo: &Repo, profile: &Path, n: usize, libs: usize, iid: u64) -> Run {
    // One library changed, pushed to the MR, announced by a signed event.
    let lib = repo
        .work
        .join(format!("lib{}/lib{}.cc", n % libs, n % libs));
    let text = std::fs::read_to_string(&lib).unwrap();
    std::fs::write(&lib, format!("{text}// change {n}\n")).unwrap();
    git(
        &repo.work,
        &["commit", "--quiet", "-am", &format!("change {n}")],
    );
    let mr_ref = format!("HEAD:refs/merge-requests/{iid}/head");
    git(
        &repo.work,
        &["push", "--quiet", "--force", "origin", &mr_ref],
    );
    let commit = head(&repo.work);
    let key = format!("bench-{n}");
    let headers = [
        ("X-Gitlab-Token", TOKEN),
        ("X-Gitlab-Event", "Merge Request Hook"),
        ("Idempotency-Key", key.as_str()),
    ];
    let id = queue_job(
        stack,
        "/hooks/av/monorepo",
        &headers,
        &gitlab_mr(&repo.origin_url, iid, "open", &commit, None),
    );
    let (done, log) = finished(stack, &id);
    if std::env::var("MOTORPOOL_BENCH_LOGS").is_ok() {
        eprintln!("{log}");
    }
    assert_eq!(done["state"], "succeeded", "{done}\n{log}");
    let step = |name: &str| {
        done["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .and_then(|s| s["ms"].as_u64())
            .unwrap_or(0) as f64
            / 1000.0
    };
    Run {
        checkout_s: step("checkout"),
        analysis_s: analysis_s(profile),
        bazel_s: step("build"),
        end_to_end_s: (done["updated_ms"].as_u64().unwrap() - done["queued_ms"].as_u64().unwrap())
            as f64
            / 1000.0,
        warm: done["warm"].as_bool().unwrap(),
        remote: remote_processes(&log),
    }
}

/// Wipes the pool's workspaces as a throw-away pod starts: no checkout, no Bazel server.
fn wipe(stack: &Stack) {
    let dir = stack.dir.path().join("data/runner/workspaces");
    for ws in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let ws = ws.path();
        if ws.join("output_base/server").exists() {
            let _ = std::process::Command::new("bazel")
                .current_dir(ws.join("src"))
                .arg(format!(
                    "--output_base={}",
                    ws.join("output_base").display()
                ))
                .arg(format!(
                    "--bazelrc={}",
                    ws.join("motorpool.bazelrc").display()
                ))
                .arg("shutdown")
                .output();
        }
        let _ = std::fs::remove_dir_all(&ws);
    }
}

fn main() {
    support::require_bazel();
    let reps: usize = std::env::var("MOTORPOOL_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let libs: usize = std::env::var("MOTORPOOL_BENCH_LIBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let lfs_mb: usize = std::env::var("MOTORPOOL_BENCH_LFS_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    // Recorded sensor data under LFS, as a perception monorepo has (incompressible bytes).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: String = (0..lfs_mb << 19)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            format!("{:02x}", x as u8)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path(), libs, &[("data/drive-0001.bin", data.as_str())]);
    drop(data);
    let stack = Stack::up(&["--workers", "2", "--shards", "0"]);
    let profile = dir.path().join("profile.json");
    let profile_flag = format!("--profile={}", profile.display());
    write_projects_with(&stack, &repo.ws, &["//..."], &[profile_flag.as_str()]);
    // One job first: the platform's remote cache holds the workspace, as a busy one would.
    job(&stack, &repo, &profile, 0, libs, 1);
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for r in 0..reps {
        wipe(&stack);
        let c = job(&stack, &repo, &profile, 2 * r + 1, libs, 1);
        assert!(!c.warm, "a wiped workspace is cold");
        let w = job(&stack, &repo, &profile, 2 * r + 2, libs, 1);
        assert!(w.warm, "the next job finds its workspace warm");
        eprintln!(
            "rep {r}: cold {:.2}/{:.2}/{:.2}/{:.2} s ({} remote), warm {:.2}/{:.2}/{:.2}/{:.2} s ({} remote)",
            c.checkout_s,
            c.analysis_s,
            c.bazel_s,
            c.end_to_end_s,
            c.remote,
            w.checkout_s,
            w.analysis_s,
            w.bazel_s,
            w.end_to_end_s,
            w.remote
        );
        cold.push(c);
        warm.push(w);
    }
    println!(
        "\nCI job after a one-file change, {libs} libraries + {libs} tests (build //...), {lfs_mb} MiB under Git LFS, medians of {reps}, same run\n"
    );
    println!("| step | cold | warm | warm / cold | goal |\n|---|---|---|---|---|");
    let rows: [Row; 4] = [
        (
            "checkout (fetch, checkout, LFS)",
            |r| r.checkout_s,
            "≤ 0.10",
        ),
        (
            "Bazel loading and analysis (its profile)",
            |r| r.analysis_s,
            "",
        ),
        ("Bazel command (analysis + execution)", |r| r.bazel_s, ""),
        ("end to end (queued to done)", |r| r.end_to_end_s, "≤ 0.35"),
    ];
    for (name, f, goal) in rows {
        let (c, w) = (
            median(cold.iter().map(f).collect()),
            median(warm.iter().map(f).collect()),
        );
        println!("| {name} | {c:.2} s | {w:.2} s | {:.2} | {goal} |", w / c);
    }
}
