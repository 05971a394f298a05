//! Remote-execution benchmark: the whole stack as `motorpool up --workers 2` runs it. Prints a
//! Markdown table.
//!
//! - Scheduling overhead: 1000 trivial actions one after another, Execute to completed, minus the
//!   action's own run time (from its ExecutedActionMetadata); p50 and p99.
//! - Throughput: 1000 trivial actions with 64 in flight on 2 workers; actions per second.
//! - Bazel: a cold remote-execution build of the generated workspace beside a local build of it,
//!   medians of `reps` runs each, an all-hit rebuild through `--remote_executor`, and where each
//!   build's CPU time went (Bazel itself, the platform's services, each by process, and what they
//!   burn idle; the actions). On a machine
//!   whose cores are all busy, wall time follows the CPU total, so this says what the remote
//!   build costs beyond the local one, and whose cost it is: "without the platform's CPU" is the
//!   ratio a platform that cost nothing would reach with this Bazel.
//!
//! - Tracing: the scheduling overhead with no trace export, with OTLP export sampling 10% of
//!   traces, and sampling all of them, on three stacks in turn.
//!
//! `cargo bench -p motorpool --bench exec` (`MOTORPOOL_BENCH_QUICK=1` for a short run,
//! `MOTORPOOL_BENCH_BAZEL=0` to skip the Bazel rows, `MOTORPOOL_BENCH_ONLY=bazel` or `=tracing`
//! for only those rows,
//! `MOTORPOOL_BENCH_SLOTS=N` for N action slots per worker, `MOTORPOOL_BENCH_RE_FLAGS="..."` for
//! extra Bazel flags on the remote build, `MOTORPOOL_BENCH_METRICS=1` for the gateway's latency
//! per method after the Bazel builds).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Instant;
use support::exec::{ExecClient, Spec, follow, secs};
use support::workspace::{Bazel, Workspace};
use support::{Stack, cpu_of};

/// `root` and every process below it.
fn process_tree(root: u32) -> Vec<u32> {
    let mut parent = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok())
        {
            parent.insert(pid, ppid);
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parent.iter().filter(|(_, pp)| **pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree
}

/// What a process of the stack is: its service (`motorpool <service> ...`), or its program's name.
fn role_of(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let program = args[0].rsplit('/').next().unwrap_or_default().to_string();
    match args.get(1) {
        Some(service) if program == "motorpool" || program.starts_with("motorpool-") => {
            service.clone()
        }
        _ => program,
    }
}

/// CPU seconds of the stack per role: `(its processes' own, what their reaped children used)`.
/// The children that are reaped are the actions the workers ran.
fn stack_cpu(up: u32) -> std::collections::BTreeMap<String, (f64, f64)> {
    let mut by = std::collections::BTreeMap::<String, (f64, f64)>::new();
    for pid in process_tree(up) {
        let (own, children) = cpu_of(pid);
        let e = by.entry(role_of(pid)).or_default();
        e.0 += own;
        e.1 += children;
    }
    by
}

fn total(by: &std::collections::BTreeMap<String, (f64, f64)>) -> (f64, f64) {
    by.values().fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
}

/// CPU seconds used so far by this process's reaped children (Bazel runs with `--batch`, so its
/// JVM and, for a local build, every action it ran are among them).
fn children_cpu() -> f64 {
    cpu_of(std::process::id()).1
}

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
    let only_tracing = std::env::var("MOTORPOOL_BENCH_ONLY").is_ok_and(|v| v == "tracing");
    if !only_tracing {
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
                let (o, wall) = timed_run(&mut c, d).await;
                overhead.push(o);
                total.push(wall);
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
            let cold = Bazel::new(&ws, &dir.path().join("root-batch"));
            rows.extend(bazel_rows(&stack, &cold, reps, &extra_flags));
            let warm = Bazel::with_server(&ws, &dir.path().join("root-server"));
            rows.extend(bazel_rows(&stack, &warm, reps, &extra_flags));
            warm.run("shutdown", &[]);
            if std::env::var("MOTORPOOL_BENCH_METRICS").is_ok_and(|v| v == "1") {
                print_gateway_latencies(&stack.http_get("/metrics"));
            }
        }
        drop(stack);
    }
    if std::env::var("MOTORPOOL_BENCH_ONLY").map_or(true, |v| v == "tracing") {
        rows.extend(tracing_rows(&rt, n / 2));
    }
    println!("\n| measure | median | goal |\n|---|---|---|");
    for [a, b, c] in rows {
        println!("| {a} | {b} | {c} |");
    }
}

/// Runs an action already uploaded: (Execute to completed minus the action's own run, Execute
/// to completed), in ms.
async fn timed_run(c: &mut ExecClient, d: &motorpool_messages::BlobDigest) -> (f64, f64) {
    let t = Instant::now();
    let f = follow(c.start(d, &[], true).await.unwrap()).await.unwrap();
    let wall = t.elapsed().as_secs_f64();
    let m = f.result().execution_metadata.clone().unwrap();
    let run = secs(&m.execution_completed_timestamp) - secs(&m.execution_start_timestamp);
    ((wall - run) * 1000.0, wall * 1000.0)
}

/// What tracing costs each action: three stacks side by side (no export; OTLP export with 10%
/// of traces sampled; with every trace sampled) to a receiver in this process, the same `n`
/// trivial actions run on each in turn, one at a time, so drift in the machine's load falls on
/// all three alike.
fn tracing_rows(rt: &tokio::runtime::Runtime, n: usize) -> Vec<[String; 3]> {
    let receiver = rt.block_on(support::otlp::Receiver::start());
    let endpoint = receiver.endpoint();
    let up = ["--workers", "1", "--shards", "0"];
    let exporting = |sampler: &'static str, arg: &'static str| {
        let mut env = vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_TRACES_SAMPLER", sampler),
        ];
        if !arg.is_empty() {
            env.push(("OTEL_TRACES_SAMPLER_ARG", arg));
        }
        Stack::up_with_env(&up, &env)
    };
    let stacks = [
        ("no trace export", Stack::up(&up)),
        (
            "traces exported, 10% sampled",
            exporting("parentbased_traceidratio", "0.1"),
        ),
        (
            "traces exported, all sampled",
            exporting("parentbased_always_on", ""),
        ),
    ];
    let mut overheads: Vec<Vec<f64>> = vec![Vec::new(); stacks.len()];
    rt.block_on(async {
        let mut clients = Vec::new();
        let mut digests = Vec::new();
        for (_, stack) in &stacks {
            let mut c = ExecClient::connect(stack, "bench").await;
            for i in 0..20 {
                c.run(&trivial(3_000_000 + i), &[]).await;
            }
            let mut ds = Vec::new();
            for i in 0..n {
                ds.push(c.upload(&trivial(4_000_000 + i)).await);
            }
            clients.push(c);
            digests.push(ds);
        }
        // Action i on every stack, then action i + 1.
        for round in 0..n {
            for ((c, ds), out) in clients.iter_mut().zip(&digests).zip(&mut overheads) {
                out.push(timed_run(c, &ds[round]).await.0);
            }
        }
    });
    let names: Vec<&str> = stacks.iter().map(|(name, _)| *name).collect();
    drop(stacks);
    let base = percentile(&mut overheads[0].clone(), 0.5);
    let mut rows = Vec::new();
    for (k, name) in names.iter().enumerate() {
        let p50 = percentile(&mut overheads[k], 0.5);
        let extra = if k == 0 {
            String::new()
        } else {
            format!(" ({:+.2} ms)", p50 - base)
        };
        rows.push([
            format!("scheduling overhead per action, {n} sequential, {name} (p50)"),
            format!("{p50:.2} ms{extra}"),
            if k == 1 {
                "< +0.5 ms".into()
            } else {
                String::new()
            },
        ]);
    }
    rows.push([
        "spans received by the OTLP receiver".into(),
        format!(
            "{} in {} exports",
            receiver.spans().len(),
            receiver.requests()
        ),
        String::new(),
    ]);
    rows
}

/// Local and cold remote-execution builds of the workspace, `reps` of each, alternating: their
/// wall times and where the CPU went. With `--batch` Bazel (a fresh JVM per command) every build
/// also pays the JVM's start and JIT warm-up; with a Bazel server, one untimed build of each kind
/// warms it first, and `clean` (not `--expunge`, which stops the server) empties the outputs.
fn bazel_rows(stack: &Stack, b: &Bazel, reps: usize, extra_flags: &[String]) -> Vec<[String; 3]> {
    let batch = b.batch();
    let mode = if batch { "batch" } else { "server" };
    let remote_flags = |instance: String| -> Vec<String> {
        [
            "//...".to_string(),
            format!("--remote_executor=grpc://{}", stack.grpc),
            stack.bazel_auth(&stack.keys.ci),
            // A fresh instance each time: a cold cache, every action executed.
            format!("--remote_instance_name={instance}"),
            "--spawn_strategy=remote".to_string(),
            "--jobs=8".to_string(),
        ]
        .into_iter()
        .chain(extra_flags.iter().cloned())
        .collect()
    };
    let clean = || {
        if batch {
            b.run("clean", &["--expunge".into()]);
        } else {
            b.run("clean", &[]);
        }
    };
    // Bazel's CPU so far: with --batch, this process's reaped children (the JVM and, locally,
    // the actions); with a server, the server's own and its reaped children's.
    let server = (!batch).then(|| {
        b.run("build", &["//...".into()]);
        clean();
        b.run(
            "build",
            &remote_flags(format!("warm-{}", std::process::id())),
        );
        let out = b.run("info", &["server_pid".into()]).output.stdout;
        String::from_utf8_lossy(&out).trim().parse::<u32>().unwrap()
    });
    // `(Bazel's own, the actions it ran locally)`; with --batch the two cannot be told apart
    // (the JVM's reaped children are added to its own parent's), so all of it is in the first.
    let bazel_cpu = || match server {
        None => (children_cpu(), 0.0),
        Some(pid) => cpu_of(pid),
    };
    let up = stack.pid().expect("the stack runs");
    let (mut local, mut remote) = (Vec::new(), Vec::new());
    let (mut local_cpu, mut local_actions_cpu, mut client_cpu, mut platform_cpu, mut actions_cpu) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut by_role = std::collections::BTreeMap::<String, Vec<f64>>::new();
    // The stack's own CPU per second while it has nothing to do (heartbeats, timers), measured
    // during the local builds: the remote build pays it too, but it is no request's cost.
    let mut idle_rate = Vec::new();
    for rep in 0..reps {
        clean();
        let (before, idle_before) = (bazel_cpu(), total(&stack_cpu(up)).0);
        let wall = b.run("build", &["//...".into()]).elapsed.as_secs_f64();
        local.push(wall);
        idle_rate.push((total(&stack_cpu(up)).0 - idle_before) / wall);
        let after = bazel_cpu();
        local_cpu.push(after.0 + after.1 - before.0 - before.1);
        local_actions_cpu.push(after.1 - before.1);
        clean();
        let instance = format!("cold-{}-{mode}-{rep}", std::process::id());
        let (before, stack_before) = (bazel_cpu(), stack_cpu(up));
        remote.push(
            b.run("build", &remote_flags(instance))
                .elapsed
                .as_secs_f64(),
        );
        let stack_after = stack_cpu(up);
        let after = bazel_cpu();
        client_cpu.push(after.0 + after.1 - before.0 - before.1);
        let (all_before, all_after) = (total(&stack_before), total(&stack_after));
        platform_cpu.push(all_after.0 - all_before.0);
        actions_cpu.push(all_after.1 - all_before.1);
        for (role, (own, _)) in &stack_after {
            let was = stack_before.get(role).map_or(0.0, |b| b.0);
            by_role.entry(role.clone()).or_default().push(own - was);
        }
    }
    // All-hit rebuilds through --remote_executor: one cold build fills an instance's cache, then
    // every action of each rebuild is answered from the action cache.
    let instance = format!("hits-{}-{mode}", std::process::id());
    clean();
    b.run("build", &remote_flags(instance.clone()));
    let mut hit = Vec::new();
    for _ in 0..reps {
        clean();
        let run = b.run("build", &remote_flags(instance.clone()));
        let (total, hits, internal) = run.process_summary();
        assert_eq!(hits, total - internal, "all hits");
        hit.push(run.elapsed.as_secs_f64());
    }
    clean();
    let how = if batch {
        "bazel --batch"
    } else {
        "warm Bazel server"
    };
    let (l, r) = (percentile(&mut local, 0.5), percentile(&mut remote, 0.5));
    let (lc, la, cc, pc, ac) = (
        percentile(&mut local_cpu, 0.5),
        percentile(&mut local_actions_cpu, 0.5),
        percentile(&mut client_cpu, 0.5),
        percentile(&mut platform_cpu, 0.5),
        percentile(&mut actions_cpu, 0.5),
    );
    let idle = percentile(&mut idle_rate, 0.5) * r;
    let local_split = if batch {
        format!("{lc:.1} s")
    } else {
        format!("{lc:.1} s ({:.1} s Bazel / {la:.1} s actions)", lc - la)
    };
    // The platform's CPU per service, busiest first (medians over the reps).
    let mut roles: Vec<(f64, String)> = by_role
        .into_iter()
        .map(|(role, mut v)| (percentile(&mut v, 0.5), role))
        .filter(|(cpu, _)| *cpu >= 0.05)
        .collect();
    roles.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
    let roles = roles
        .iter()
        .map(|(cpu, role)| format!("{role} {cpu:.1} s"))
        .collect::<Vec<_>>()
        .join(", ");
    vec![
        [
            format!("Bazel local build, 50 libs + 50 tests (build //...), {how}"),
            format!("{l:.2} s"),
            String::new(),
        ],
        [
            format!("Bazel cold remote-execution build, same workspace, {how}"),
            format!("{r:.2} s ({:.2}x local)", r / l),
            "<= 1.15x local".into(),
        ],
        [
            format!("Bazel all-hit rebuild through --remote_executor, same workspace, {how}"),
            format!("{:.2} s", percentile(&mut hit, 0.5)),
            String::new(),
        ],
        [
            format!("CPU, local build: Bazel and the actions it ran, {how}"),
            local_split,
            String::new(),
        ],
        [
            format!("CPU, remote build: Bazel / platform services / actions, {how}"),
            format!(
                "{cc:.1} s / {pc:.1} s ({idle:.1} s of it idle) / {ac:.1} s (total {:.2}x local; \
                 {:.2}x without the platform's CPU)",
                (cc + pc + ac) / lc,
                (cc + ac) / lc
            ),
            String::new(),
        ],
        [
            format!("CPU, remote build: platform services by process, {how}"),
            roles,
            String::new(),
        ],
    ]
}
