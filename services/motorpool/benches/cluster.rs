//! What a NATS cluster costs a build, in one run: the same cold Bazel remote-execution build
//! (a fresh instance name each time, so every action runs) against `motorpool up` with one NATS
//! server and with `--nats-cluster 3` (every stream and bucket kept three times), alternating,
//! medians.
//!
//!   cargo bench -p motorpool --bench cluster
//!   MOTORPOOL_BENCH_REPS=5 MOTORPOOL_BENCH_LIBS=40 cargo bench -p motorpool --bench cluster

#[path = "../tests/support/mod.rs"]
mod support;

use support::Stack;
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

fn main() {
    support::require_bazel();
    let reps = env("MOTORPOOL_BENCH_REPS", 3);
    let libs = env("MOTORPOOL_BENCH_LIBS", 20);
    let dir = tempfile::tempdir().unwrap();
    let ws = Workspace::generate(dir.path(), libs);
    let stacks = [
        ("1 server", Stack::up(&["--workers", "2", "--shards", "1"])),
        (
            "3-server cluster",
            Stack::up(&["--workers", "2", "--shards", "1", "--nats-cluster", "3"]),
        ),
    ];
    let bazel = Bazel::with_server(&ws, &dir.path().join("root"));
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); stacks.len()];
    let mut actions = 0;
    for rep in 0..reps {
        for (i, (_, stack)) in stacks.iter().enumerate() {
            bazel.run("clean", &[]);
            let run = bazel.run("build", &stack.remote_build_flags(&format!("bench-{rep}")));
            let (total, hits, internal) = run.process_summary();
            assert_eq!(hits, 0, "a cold build");
            actions = total - internal;
            times[i].push(run.elapsed.as_secs_f64());
        }
    }
    bazel.run("shutdown", &[]);
    let base = median(times[0].clone());
    println!(
        "\nCold remote-execution build, {libs} libraries ({actions} remote actions), 2 workers, {reps} runs each, alternating\n"
    );
    println!("| NATS | median wall time | runs | vs one server |");
    println!("|---|---|---|---|");
    for ((name, _), t) in stacks.iter().zip(&times) {
        let runs: Vec<String> = t.iter().map(|s| format!("{s:.2}")).collect();
        println!(
            "| {name} | {:.2} s | {} | {:.3}x |",
            median(t.clone()),
            runs.join(", "),
            median(t.clone()) / base
        );
    }
}
