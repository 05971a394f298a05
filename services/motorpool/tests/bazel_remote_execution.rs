//! The real Bazel 4.2.3 builds and tests through `motorpool up --workers 2 --tls` as its remote
//! executor, over TLS (`grpcs://`, `--tls_certificate`) with an API key.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use support::ci::remote_processes;
use support::workspace::{Bazel, Workspace, local_reference};
use support::{Stack, sha256_file};

#[test]
fn bazel_remote_execution_matches_local_and_rebuilds_from_cache() {
    support::require_bazel();
    let _turn = support::one_stack_build_at_a_time();
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

/// Workers started as an operator would on another host: from some directory, with the default
/// (relative) data dir, two side by side. Bazel's test actions run on both; a second worker with
/// an id or a data dir already in use refuses to start and says why.
#[test]
fn workers_started_anywhere_run_bazel_tests_and_namesakes_are_refused() {
    support::require_bazel();
    let _turn = support::one_stack_build_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let ws = Workspace::generate(dir.path(), 8);
    let stack = Stack::up(&["--workers", "0", "--shards", "1"]);
    let _log = support::LogOnPanic(&stack);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (w1_nk, w2_nk) = rt.block_on(async {
        (
            stack.add_bus_user("worker:w1").await,
            stack.add_bus_user("worker:w2").await,
        )
    });
    let data_key = stack.dir.path().join("data/bus/data.key");
    // A directory of the operator's: 0700, as a home is, so the sandbox user cannot reach the
    // data dirs made in it (the worker then puts exec roots in its scratch dir).
    let elsewhere = tempfile::tempdir().unwrap();
    let worker = |id: &str, nk: &Path, extra: &[&str]| {
        let log = std::fs::File::create(elsewhere.path().join(format!("{id}.log"))).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_motorpool"))
            .current_dir(elsewhere.path())
            .arg("worker")
            .args(["--nats-url", &stack.nats_url()])
            .arg("--nats-nkey-file")
            .arg(nk)
            .arg("--data-key-file")
            .arg(&data_key)
            .args(["--worker-id", id])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    };
    let metrics = [support::free_addr(), support::free_addr()];
    let w1 = Killed(worker(
        "w1",
        &w1_nk,
        &["--http-addr", &metrics[0].to_string()],
    ));
    let w2 = Killed(worker(
        "w2",
        &w2_nk,
        &["--http-addr", &metrics[1].to_string()],
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !stack.http_get("/api/v1/queues").contains("\"workers\":2") {
        assert!(
            Instant::now() < deadline,
            "the workers never registered: {}",
            std::fs::read_to_string(elsewhere.path().join("w1.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for id in ["w1", "w2"] {
        assert!(
            elsewhere
                .path()
                .join(format!("motorpool-data/{id}/worker.lock"))
                .exists(),
            "{id}'s default data dir is motorpool-data/{id}, beside where it started"
        );
    }

    // Namesakes: the same id elsewhere, and another id in a data dir in use.
    let refused = |id: &str, nk: &Path, extra: &[&str]| {
        let child = worker(id, nk, extra);
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success(), "a namesake of {id} started");
        std::fs::read_to_string(elsewhere.path().join(format!("{id}.log"))).unwrap()
    };
    let log = refused("w1", &w1_nk, &["--data-dir", "motorpool-data/another"]);
    assert!(
        log.contains("worker id w1 is in use") && log.contains("--worker-id"),
        "{log}"
    );
    let log = refused("w3", &w2_nk, &["--data-dir", "motorpool-data/w2"]);
    assert!(
        log.contains("is in use by another worker (pid") && log.contains("--data-dir"),
        "{log}"
    );

    // Bazel's test actions (test-setup.sh from bazel_tools, run by path) pass on both.
    let bazel = Bazel::new(&ws, &dir.path().join("root"));
    let run = bazel.run("test", &stack.remote_build_flags("anywhere"));
    let out = String::from_utf8_lossy(&run.output.stdout);
    assert!(
        out.contains("Executed 8 out of 8 tests: 8 tests pass"),
        "{out}{}",
        run.stderr()
    );
    for (id, addr) in ["w1", "w2"].iter().zip(metrics) {
        let text = support::ci::http(addr, "GET", "/metrics", &[], b"").1;
        let ok: f64 = text
            .lines()
            .find(|l| l.starts_with("motorpool_worker_jobs_total{result=\"ok\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        assert!(ok > 0.0, "{id} ran no action:\n{text}");
    }
    drop((w1, w2));
    bazel.run("clean", &["--expunge".into()]);
}

/// A child process killed when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `motorpool up --nats-cluster 3`: a Bazel remote-execution build while the NATS server most
/// services talk to is killed with -9 and another is restarted. The build passes with the local
/// build's outputs; every action Bazel ran remotely ran once.
#[test]
fn a_build_rides_a_nats_node_killed_and_another_restarted() {
    support::require_bazel();
    let _turn = support::one_stack_build_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let ws = Workspace::generate(dir.path(), 20);
    let reference = local_reference(&ws, &dir.path().join("root-local"));
    let stack = Stack::up(&["--workers", "2", "--shards", "1", "--nats-cluster", "3"]);
    let _log = support::LogOnPanic(&stack);
    let nats = stack.children_running("nats-server");
    assert_eq!(nats.len(), 3, "three NATS servers");
    assert_eq!(
        stack.nats_url().split(',').count(),
        3,
        "services get every URL"
    );

    let root = dir.path().join("root-remote");
    let bazel = Bazel::new(&ws, &root);
    let build = build_under_way(&stack, &ws, &root, "cluster", 1);
    // The first server (every service's first URL) dies hard; `motorpool up` restarts it.
    let signal = |pid: u32, sig| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
    };
    signal(nats[0], nix::sys::signal::Signal::SIGKILL);
    std::thread::sleep(Duration::from_secs(4));
    // Another is restarted while the build goes on.
    signal(nats[1], nix::sys::signal::Signal::SIGTERM);
    let run = build.join().expect("the build survives");
    let err = passes_as_locally(&run, &bazel, &reference, 20);
    let restarted = stack.children_running("nats-server");
    assert_eq!(restarted.len(), 3, "both servers are back: {restarted:?}");
    assert!(!restarted.contains(&nats[0]) && !restarted.contains(&nats[1]));
    // Run once: the jobs that reached a worker are exactly the actions Bazel ran remotely (an
    // Execute Bazel sent again after a broken stream may find its result in the cache: a
    // "remote cache hit", not a second run). An assignment lost with the server is sent again
    // once the worker's heartbeat shows it never arrived, and counts once.
    let sum_of = |service: &str, metric: &str| stack.metric_sum(service, metric);
    let ran = sum_of("worker-", "motorpool_worker_jobs_total") as u64;
    let dispatched = sum_of("scheduler", "motorpool_scheduler_dispatched_total") as u64;
    let retried = sum_of("scheduler", "motorpool_scheduler_retries_total") as u64;
    let (remote, hits) = (remote_processes(&err), run.process_summary().1);
    eprintln!(
        "NATS node killed and another restarted: {remote} remote actions, {hits} remote cache \
         hits, {dispatched} dispatched, {ran} run, {retried} retried"
    );
    assert!(
        (remote..=remote + hits).contains(&ran),
        "{ran} run for {remote} remote actions and {hits} hits:\n{err}"
    );
    bazel.run("clean", &["--expunge".into()]);
}

/// The active scheduler, from `/api/v1/queues` (none while no scheduler answers).
fn active_scheduler(stack: &Stack) -> Option<(String, u64)> {
    let text = stack.http_get("/api/v1/queues");
    let body = text.split("\r\n\r\n").nth(1)?;
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    Some((
        v["scheduler"]["active"].as_str()?.to_string(),
        v["scheduler"]["term"].as_u64()?,
    ))
}

/// `motorpool up --schedulers 2`: the active scheduler killed with -9 in the middle of a Bazel
/// remote-execution build. The standby takes over (the time it took is printed), the build
/// passes with the local build's outputs, every action ran once, and the killed scheduler,
/// restarted, stands by.
#[test]
fn the_active_scheduler_killed_mid_build_is_replaced_by_its_standby() {
    support::require_bazel();
    let _turn = support::one_stack_build_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let ws = Workspace::generate(dir.path(), 20);
    let reference = local_reference(&ws, &dir.path().join("root-local"));
    let stack = Stack::up(&["--workers", "2", "--shards", "1", "--schedulers", "2"]);
    let _log = support::LogOnPanic(&stack);
    let (active, term) = active_scheduler(&stack).expect("a scheduler is active");
    assert!(
        active == "scheduler-0" || active == "scheduler-1",
        "{active}"
    );
    let actives = || stack.metric_sum("scheduler-", "motorpool_scheduler_active");
    assert_eq!(actives(), 1.0, "exactly one scheduler is active");

    let root = dir.path().join("root-remote");
    let bazel = Bazel::new(&ws, &root);
    let build = build_under_way(&stack, &ws, &root, "takeover", 2);
    let killed_at = Instant::now();
    let killed = stack.kill9(&["scheduler", "--scheduler-id", &active]);
    let (next, next_term) = loop {
        match active_scheduler(&stack) {
            Some((id, t)) if id != active => break (id, t),
            _ => {}
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "no standby took over"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let takeover = killed_at.elapsed();
    assert!(
        next_term > term,
        "the standby's term {next_term} follows {term}"
    );

    let run = build.join().expect("the build survives");
    let err = passes_as_locally(&run, &bazel, &reference, 20);
    // Every action Bazel ran remotely reached a worker once: the jobs the dead scheduler had
    // handed out ran on and reported to the new one.
    let ran = stack.metric_sum("worker-", "motorpool_worker_jobs_total") as u64;
    let retried = stack.metric_sum("scheduler-", "motorpool_scheduler_retries_total") as u64;
    let (remote, hits) = (remote_processes(&err), run.process_summary().1);
    eprintln!(
        "Active scheduler {active} killed with -9: {next} took over in {:.2} s (lease 3 s); \
         {remote} remote actions, {hits} remote cache hits, {ran} jobs, {retried} retried by \
         the new scheduler",
        takeover.as_secs_f64()
    );
    let by_result = ["ok", "error", "infrastructure"].map(|r| {
        let series = format!("motorpool_worker_jobs_total{{result=\"{r}\"}}");
        (r, stack.metric_sum("worker-", &series) as u64)
    });
    let infra = stack.metric_sum("worker-", "motorpool_worker_infrastructure_failures_total");
    // Runs that completed (ok or error): a takeover that sent an action to run a second time
    // shows as two. An attempt that failed for a platform reason is retried by design, by the
    // old scheduler or the new one (the old one's counters die with it); it is reported, and
    // the worker logs its reason.
    let completed = by_result[0].1 + by_result[1].1;
    assert!(
        (remote..=remote + hits).contains(&completed),
        "{completed} runs completed for {remote} remote actions and {hits} hits ({ran} jobs by \
         result {by_result:?}, {infra} infrastructure failures on workers, {retried} retried by \
         the new scheduler):\n{err}"
    );
    // The killed one is restarted and stands by; still exactly one is active.
    let deadline = Instant::now() + Duration::from_secs(30);
    while stack
        .child_pid(&["scheduler", "--scheduler-id", &active])
        .is_none_or(|pid| pid == killed)
    {
        assert!(Instant::now() < deadline, "{active} was not restarted");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(active_scheduler(&stack), Some((next, next_term)));
    assert_eq!(actives(), 1.0, "exactly one scheduler is active");
    bazel.run("clean", &["--expunge".into()]);
}

/// `bazel test //...` with remote execution on `stack` (instance `instance`, output root
/// `root`) on a thread of its own, returned once at least `executing` actions run on workers.
fn build_under_way(
    stack: &Stack,
    ws: &Workspace,
    root: &Path,
    instance: &str,
    executing_at_least: u64,
) -> std::thread::JoinHandle<support::workspace::Run> {
    let flags = stack.remote_build_flags(instance);
    let bazel = Bazel::new(ws, root);
    let build = std::thread::spawn(move || bazel.run("test", &flags));
    let deadline = Instant::now() + Duration::from_secs(120);
    while executing(stack) < executing_at_least {
        assert!(Instant::now() < deadline, "the build never got going");
        std::thread::sleep(Duration::from_millis(100));
    }
    build
}

/// Asserts that all `tests` tests of `run` passed and every artifact equals the local build's;
/// returns Bazel's stderr.
fn passes_as_locally(
    run: &support::workspace::Run,
    bazel: &Bazel,
    reference: &[(String, String)],
    tests: usize,
) -> String {
    let out = String::from_utf8_lossy(&run.output.stdout);
    let err = run.stderr();
    assert!(
        out.contains(&format!(
            "Executed {tests} out of {tests} tests: {tests} tests pass"
        )),
        "{out}\n{err}"
    );
    for (artifact, expected) in reference {
        assert_eq!(
            &sha256_file(&bazel.bazel_bin().join(artifact)),
            expected,
            "{artifact} differs from the local build"
        );
    }
    err
}
