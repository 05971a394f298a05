//! Remote-execution benchmark: the whole stack as `motorpool up --workers 2` runs it. Prints a
//! Markdown table.
//!
//! - Scheduling overhead: 1000 trivial actions one after another, Execute to completed, minus the
//!   action's own run time (from its ExecutedActionMetadata); p50 and p99.
//! - Throughput: 1000 trivial actions with 64 in flight on 2 workers; actions per second.
//! - Bazel: a cold remote-execution build of the generated workspace beside a local build of it,
//!   medians of `reps` runs each.
//!
//! `cargo bench -p motorpool --bench exec` (`MOTORPOOL_BENCH_QUICK=1` for a short run,
//! `MOTORPOOL_BENCH_BAZEL=0` to skip the Bazel rows, `MOTORPOOL_BENCH_ONLY=bazel` for only them,
//! `MOTORPOOL_BENCH_SLOTS=N` for N action slots per worker, `MOTORPOOL_BENCH_RE_FLAGS="..."` for
//! extra Bazel flags on the remote build, `MOTORPOOL_BENCH_METRICS=1` for the gateway's latency
//! per method after the Bazel builds).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Instant;
use support::Stack;
use support::exec::{ExecClient, Spec, follow, secs};
use support::workspace::{Bazel, Workspace};

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Where a remote build's time goes on the gateway: calls and mean latency per method, from the
/// `motorpool_gateway_request_duration_seconds` sums and counts.
fn print_gateway_latencies(metrics: &str) {
    let mut by: std::collections::BTreeMap<String, (f64, f64)> = Default::default();
    for line in metrics.lines() {
        let name = "motorpool_gateway_request_duration_seconds_";
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (Some(method), Some(value)) = (
            rest.split('"').nth(1),
            line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()),
        ) else {
            continue;
        };
        let e = by.entry(method.to_string()).or_default();
        if rest.starts_with("sum") {
            e.0 = value;
        } else if rest.starts_with("count") {
            e.1 = value;
        }
    }
    println!("\n| gateway method | calls | mean | total |\n|---|---|---|---|");
    for (m, (sum, count)) in by {
        println!(
            "| {m} | {count:.0} | {:.2} ms | {sum:.2} s |",
            sum / count.max(1.0) * 1e3
        );
    }
}

fn trivial(i: usize) -> Spec {
    Spec {
        args: vec!["/bin/true".into(), format!("{i}")],
        ..Default::default()
    }
}

fn main() {
    let quick = std::env::var("MOTORPOOL_BENCH_QUICK").is_ok_and(|v| v == "1");
    let bazel = std::env::var("MOTORPOOL_BENCH_BAZEL").map_or(true, |v| v != "0");
    let n = if quick { 200 } else { 1000 };
    let only_bazel = std::env::var("MOTORPOOL_BENCH_ONLY").is_ok_and(|v| v == "bazel");
    let slots = std::env::var("MOTORPOOL_BENCH_SLOTS").ok();
    let extra_flags: Vec<String> = std::env::var("MOTORPOOL_BENCH_RE_FLAGS")
        .map(|v| v.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rows: Vec<[String; 3]> = Vec::new();
    {
        let mut up = vec!["--workers", "2", "--shards", "0"];
        if let Some(n) = &slots {
            up.extend(["--worker-slots", n.as_str()]);
        }
        let stack = Stack::up(&up);
        rt.block_on(async {
            if only_bazel {
                return;
            }
            let mut c = ExecClient::connect(&stack, "bench").await;
            // Warm up the connections and the workers' caches.
            for i in 0..20 {
                c.run(&trivial(1_000_000 + i), &[]).await;
            }
            let mut digests = Vec::new();
            for i in 0..n {
                digests.push(c.upload(&trivial(i)).await);
            }
            let mut overhead = Vec::new();
            let mut total = Vec::new();
            for d in &digests {
                let t = Instant::now();
                let f = follow(c.start(d, &[], true).await.unwrap()).await.unwrap();
                let wall = t.elapsed().as_secs_f64();
                let m = f.result().execution_metadata.clone().unwrap();
                let run =
                    secs(&m.execution_completed_timestamp) - secs(&m.execution_start_timestamp);
                overhead.push((wall - run) * 1000.0);
                total.push(wall * 1000.0);
            }
            rows.push([
                format!("scheduling overhead per action, {n} sequential (p50)"),
                format!("{:.2} ms", percentile(&mut overhead, 0.5)),
                "< 5 ms".into(),
            ]);
            rows.push([
                format!("scheduling overhead per action, {n} sequential (p99)"),
                format!("{:.2} ms", percentile(&mut overhead, 0.99)),
                String::new(),
            ]);
            rows.push([
                "Execute to completed, trivial action (p50)".into(),
                format!("{:.2} ms", percentile(&mut total, 0.5)),
                String::new(),
            ]);

            // Throughput: fresh actions, 64 in flight.
            let mut digests = Vec::new();
            for i in 0..n {
                digests.push(c.upload(&trivial(2_000_000 + i)).await);
            }
            let gate = Arc::new(tokio::sync::Semaphore::new(64));
            let t = Instant::now();
            let mut runs = Vec::new();
            for d in digests {
                let permit = gate.clone().acquire_owned().await.unwrap();
                let s = c.start(&d, &[], true).await.unwrap();
                runs.push(tokio::spawn(async move {
                    let r = follow(s).await;
                    drop(permit);
                    r
                }));
            }
            for r in runs {
                r.await.unwrap().unwrap();
            }
            let rate = n as f64 / t.elapsed().as_secs_f64();
            rows.push([
                format!("throughput, {n} trivial actions, 64 in flight, 2 workers"),
                format!("{rate:.0} actions/s"),
                String::new(),
            ]);
        });

        if bazel {
            let reps = if quick { 1 } else { 3 };
            let dir = tempfile::tempdir().unwrap();
            let ws = Workspace::generate(dir.path(), 50);
            let b = Bazel::new(&ws, &dir.path().join("root"));
            let mut local = Vec::new();
            let mut remote = Vec::new();
            for rep in 0..reps {
                b.run("clean", &["--expunge".into()]);
                local.push(b.run("build", &["//...".into()]).elapsed.as_secs_f64());
                b.run("clean", &["--expunge".into()]);
                let flags: Vec<String> = vec![
                    "//...".to_string(),
                    format!("--remote_executor=grpc://{}", stack.grpc),
                    // A fresh instance each time: a cold cache, every action executed.
                    format!("--remote_instance_name=cold{rep}"),
                    "--spawn_strategy=remote".to_string(),
                    "--jobs=8".to_string(),
                ]
                .into_iter()
                .chain(extra_flags.iter().cloned())
                .collect::<Vec<_>>();
                remote.push(b.run("build", &flags).elapsed.as_secs_f64());
            }
            b.run("clean", &["--expunge".into()]);
            if std::env::var("MOTORPOOL_BENCH_METRICS").is_ok_and(|v| v == "1") {
                print_gateway_latencies(&stack.http_get("/metrics"));
            }
            let (l, r) = (percentile(&mut local, 0.5), percentile(&mut remote, 0.5));
            rows.push([
                "Bazel local build, 50 libs + 50 tests (build //...)".into(),
                format!("{l:.2} s"),
                String::new(),
            ]);
            rows.push([
                "Bazel cold remote-execution build, same workspace".into(),
                format!("{r:.2} s ({:.2}x local)", r / l),
                "<= 1.15x local".into(),
            ]);
        }
        drop(stack);
    }
    println!("\n| measure | median | goal |\n|---|---|---|");
    for [a, b, c] in rows {
        println!("| {a} | {b} | {c} |");
    }
}
