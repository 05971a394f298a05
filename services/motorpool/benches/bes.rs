//! The Build Event Service on `motorpool up`, all in one run:
//! - a Bazel all-hit rebuild (after `clean`) with and without `--bes_backend` (goal: under 3%
//!   apart), alternating, medians;
//! - build events ingested per second on one stream, each kept in JetStream before its
//!   acknowledgement;
//! - the time to serve the page (and its JSON) of an invocation of 10,000 remote actions
//!   (goal: under 200 ms).
//!
//!   cargo bench -p motorpool --bench bes
//!   MOTORPOOL_BENCH_REPS=5 MOTORPOOL_BENCH_LIBS=40 cargo bench -p motorpool --bench bes
//!   MOTORPOOL_BENCH_BES_FLAGS="--bes_upload_mode=fully_async" cargo bench -p motorpool --bench bes
//!   MOTORPOOL_BENCH_BEP_FILE=1 cargo bench -p motorpool --bench bes   # events to a file instead

#[path = "../tests/support/mod.rs"]
mod support;

use bazel_bep::types::build_event_stream as bep;
use googleapis_tonic_google_devtools_build_v1::google::devtools::build::v1 as bes;
use motorpool_messages::bes::RemoteAction;
use std::time::Instant;
use support::Stack;
use support::bes::{bazel_event, client, publish, request};
use support::workspace::{Bazel, Workspace};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One test's summary, event `seq` of `inv`.
fn event(seq: i64, inv: &str) -> bes::PublishBuildToolEventStreamRequest {
    request(
        inv,
        seq,
        bazel_event(
            &format!("//pkg{}:test_{seq}", seq % 100),
            bep::TestStatus::Passed,
        ),
    )
}

fn main() {
    support::require_bazel();
    let reps = env("MOTORPOOL_BENCH_REPS", 3);
    let libs = env("MOTORPOOL_BENCH_LIBS", 30);
    let dir = tempfile::tempdir().unwrap();
    let ws = Workspace::generate(dir.path(), libs);
    let stack = Stack::up(&["--workers", "2", "--shards", "0"]);
    let bazel = Bazel::with_server(&ws, &dir.path().join("root"));
    let base = vec![
        "//...".to_string(),
        format!("--remote_executor=grpc://{}", stack.grpc),
        "--spawn_strategy=remote".to_string(),
        stack.bazel_auth(&stack.keys.ci),
    ];
    let bep_file = dir.path().join("bep.bin");
    let with_bes = |mut f: Vec<String>| {
        if std::env::var("MOTORPOOL_BENCH_BEP_FILE").is_ok() {
            // Bazel's own share: the same events written to a file, no service at all.
            f.push(format!("--build_event_binary_file={}", bep_file.display()));
            return f;
        }
        f.push(format!("--bes_backend=grpc://{}", stack.grpc));
        f.push(format!(
            "--bes_results_url=http://{}/invocation/",
            stack.http
        ));
        f.extend(
            std::env::var("MOTORPOOL_BENCH_BES_FLAGS")
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_string),
        );
        f
    };
    // Warm the cache and the Bazel server.
    bazel.run("build", &base);
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        for bes_on in [false, true] {
            bazel.run("clean", &[]);
            let flags = if bes_on {
                with_bes(base.clone())
            } else {
                base.clone()
            };
            let run = bazel.run("build", &flags);
            let (_, hits, _) = run.process_summary();
            assert!(hits > 0, "an all-hit rebuild");
            let s = run.elapsed.as_secs_f64();
            if bes_on {
                with.push(s)
            } else {
                without.push(s)
            }
        }
    }
    bazel.run("shutdown", &[]);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (ingest_per_s, n_events) = rt.block_on(async {
        let mut client = client(&stack, &stack.keys.ci).await;
        let n = env("MOTORPOOL_BENCH_EVENTS", 20_000) as i64;
        let inv = "be7c4a00-0000-4000-8000-000000000001";
        let start = Instant::now();
        let (acks, end) = publish(&mut client, (1..=n).map(|i| event(i, inv)).collect()).await;
        end.unwrap();
        assert_eq!(acks.last(), Some(&n), "every event acknowledged");
        (n as f64 / start.elapsed().as_secs_f64(), n)
    });

    // An invocation of 10,000 remote actions.
    let inv = "be7c4a00-0000-4000-8000-000000000002";
    let actions = 10_000;
    rt.block_on(async {
        let mut client = client(&stack, &stack.keys.ci).await;
        let (_, end) = publish(&mut client, (1..=2).map(|i| event(i, inv)).collect()).await;
        end.unwrap();
        let admin = stack.bus_as("admin").await;
        let t0 = motorpool_messages::now_ms();
        for i in 0..actions {
            let start = t0 + (i as u64 % 500) * 7;
            let a = RemoteAction {
                invocation_id: inv.into(),
                owner: "ci".into(),
                operation: format!("{i:032x}"),
                action: format!("{:064x}/{}", i, 140 + i % 50),
                mnemonic: ["CppCompile", "CppLink", "TestRunner"][i % 3].into(),
                description: format!("Compiling pkg{}/file{i}.cc", i % 200),
                lane: "build".into(),
                pool: "cpu".into(),
                worker: format!("worker-{}", i % 16),
                queued_ms: start,
                worker_start_ms: start + 2,
                fetch_start_ms: start + 2,
                fetch_end_ms: start + 5,
                exec_start_ms: start + 5,
                exec_end_ms: start + 40,
                upload_start_ms: start + 40,
                upload_end_ms: start + 45,
                done_ms: start + 46,
                ..Default::default()
            };
            admin
                .enqueue(&motorpool_bus::subjects::bes::action(inv), &a)
                .await
                .unwrap();
        }
    });
    let auth = format!("Bearer {}", stack.keys.ci);
    let time = |path: &str| {
        let mut v = Vec::new();
        let mut bytes = 0;
        for _ in 0..5 {
            let start = Instant::now();
            let (status, body) = support::ci::http(
                stack.http,
                "GET",
                path,
                &[("Authorization", auth.as_str())],
                b"",
            );
            v.push(start.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(status, 200, "{path}");
            bytes = body.len();
        }
        (median(v), bytes)
    };
    let (page_ms, page_bytes) = time(&format!("/invocation/{inv}"));
    let (json_ms, json_bytes) = time(&format!("/api/v1/invocations/{inv}"));
    let bars = {
        let (_, body) = support::ci::http(
            stack.http,
            "GET",
            &format!("/invocation/{inv}"),
            &[("Authorization", auth.as_str())],
            b"",
        );
        body.matches("<g class=\"action").count()
    };
    assert_eq!(bars, actions, "every action drawn");

    let (w, b) = (median(without), median(with));
    println!(
        "\nBuild Event Service (2 workers, {libs} libraries, {reps} reps, medians; same run; extra BES flags: {:?})\n",
        std::env::var("MOTORPOOL_BENCH_BES_FLAGS").unwrap_or_default()
    );
    println!("| measure | value | goal |");
    println!("|---|---|---|");
    println!("| all-hit rebuild without --bes_backend | {w:.2} s | |");
    let mode = if std::env::var("MOTORPOOL_BENCH_BEP_FILE").is_ok() {
        "--build_event_binary_file (no service)"
    } else {
        "--bes_backend"
    };
    println!("| all-hit rebuild with {mode} | {b:.2} s | |");
    println!("| with / without | {:.3}x | under 1.03x |", b / w);
    println!("| events ingested, one stream ({n_events} events) | {ingest_per_s:.0} /s | |");
    println!(
        "| page of an invocation of {actions} actions | {page_ms:.0} ms ({:.1} MB) | under 200 ms |",
        page_bytes as f64 / 1e6
    );
    println!(
        "| its JSON twin | {json_ms:.0} ms ({:.1} MB) | |",
        json_bytes as f64 / 1e6
    );
}
