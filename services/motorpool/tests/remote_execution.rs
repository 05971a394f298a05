//! Remote execution against the real stack (`motorpool up` with workers): semantics, lanes,
//! deduplication, cancellation, rate limits, retries with alerts, and restarts of the scheduler
//! and the gateway.

mod support;

use bazel_remote_apis::google::longrunning as lr;
use futures::StreamExt;
use motorpool_bus::subjects;
use motorpool_messages::exec::Alert;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use support::Stack;
use support::exec::{ExecClient, Spec, follow, secs};
use tonic::Code;

const TEST: (&str, &str) = ("x-motorpool-lane", "test");
const LINT: (&str, &str) = ("x-motorpool-lane", "lint");
const RELEASE: (&str, &str) = ("x-motorpool-lane", "release");

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn execution_semantics_dedup_cancel_rate_limits_and_bad_input() {
    let marks = tempfile::tempdir().unwrap();
    // worker-0 serves the CPU pool, worker-1 the GPU pool. Unsandboxed: the actions count
    // their runs in files outside their exec root, which the sandbox forbids.
    let stack = Stack::up_with_env(
        &[
            "--workers",
            "2",
            "--worker-slots",
            "2",
            "--gpu-workers",
            "1",
            "--no-sandbox",
        ],
        &[
            ("MOTORPOOL_SCHEDULER_API_RATE_PER_S", "0.5"),
            ("MOTORPOOL_SCHEDULER_API_BURST", "1"),
            ("MOTORPOOL_SCHEDULER_API_MAX_WAIT_MS", "2500"),
        ],
    );
    let mut c = ExecClient::connect(&stack, "ci").await;
    // cas-0 and both workers' shards.
    stack.wait_for_shard_news(3);

    // An action with an output, stdout and an environment.
    let mut spec = Spec::sh("mkdir -p out && printf \"$WORD\" > out/word && echo made it");
    spec.env = vec![("WORD".into(), "bonjour".into())];
    spec.outputs = vec!["out/word".into()];
    let first = c.run(&spec, &[]).await;
    assert_eq!(first.code(), 0, "{:?}", first.response.status);
    assert!(!first.response.cached_result);
    let r = first.result();
    assert_eq!(r.exit_code, 0);
    assert_eq!(r.output_files.len(), 1);
    assert_eq!(
        r.output_files[0].digest.as_ref().unwrap().hash,
        support::sha(b"bonjour").hex()
    );
    assert_eq!(
        r.stdout_digest.as_ref().unwrap().hash,
        support::sha(b"made it\n").hex()
    );
    assert_eq!(
        first.stages.first(),
        Some(&2),
        "QUEUED first: {:?}",
        first.stages
    );
    assert_eq!(
        first.stages.last(),
        Some(&4),
        "COMPLETED last: {:?}",
        first.stages
    );
    let meta = r.execution_metadata.as_ref().unwrap();
    assert!(meta.worker.starts_with("worker-"), "{}", meta.worker);
    assert!(secs(&meta.execution_start_timestamp) >= secs(&meta.input_fetch_completed_timestamp));
    // The same action again comes from the action cache; the gateway remembered the result
    // the worker reported, so it answers without asking the shards.
    let remembered = stack.metric("motorpool_gateway_remembered_results_served_total");
    let again = c.run(&spec, &[]).await;
    assert!(again.response.cached_result, "second run is a cache hit");
    assert_eq!(
        stack.metric("motorpool_gateway_remembered_results_served_total"),
        remembered + 1.0
    );
    assert_eq!(again.result().output_files, r.output_files);

    assert_eq!(meta.worker, "worker-0", "CPU jobs run on the CPU worker");

    // GPU jobs go to the GPU pool's queues and run only on a worker offering the GPU.
    let mut gpu = Spec::sh("echo on a gpu");
    gpu.platform = vec![("gpu".into(), "1".into())];
    let g = c.run(&gpu, &[]).await;
    assert_eq!(g.code(), 0, "{:?}", g.response.status);
    assert_eq!(
        g.result().execution_metadata.as_ref().unwrap().worker,
        "worker-1"
    );
    // A job no worker can serve (two GPUs) waits in the GPU queue, visible in the queue stats.
    let mut big = Spec::sh("echo never");
    big.platform = vec![("gpu".into(), "2".into())];
    let d = c.upload(&big).await;
    let mut waiting = c.start(&d, &[RELEASE], true).await.unwrap();
    let name = waiting.next().await.unwrap().unwrap().name;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let queues = stack.http_get("/api/v1/queues");
    assert!(
        queues.contains(r#"{"depth":1,"lane":"release","pool":"gpu"}"#),
        "{queues}"
    );
    c.ops
        .cancel_operation(lr::CancelOperationRequest { name })
        .await
        .unwrap();

    // A failing action is reported as such, not retried, not cached.
    let fail = Spec::sh(&format!(
        "echo x >> {}/fails; exit 7",
        marks.path().display()
    ));
    let f1 = c.run(&fail, &[]).await;
    assert_eq!((f1.code(), f1.result().exit_code), (0, 7));
    let f2 = c.run(&fail, &[]).await;
    assert!(!f2.response.cached_result, "non-zero exits are not cached");
    let runs = std::fs::read_to_string(marks.path().join("fails")).unwrap();
    assert_eq!(runs.lines().count(), 2, "one run per Execute, no retries");

    // A timeout kills the action: DEADLINE_EXCEEDED with what it printed so far.
    let mut slow = Spec::sh("echo started; sleep 30");
    slow.timeout_s = 1;
    let t0 = Instant::now();
    let timed = c.run(&slow, &[]).await;
    assert_eq!(timed.code(), Code::DeadlineExceeded as i32);
    assert!(t0.elapsed() < Duration::from_secs(15));

    // Identical actions in flight at once share one execution.
    let log = marks.path().join("dedup");
    let same = Spec::sh(&format!("echo run >> {}; sleep 1", log.display()));
    let d = c.upload(&same).await;
    let (s1, s2) = (
        c.start(&d, &[], true).await.unwrap(),
        c.start(&d, &[], true).await.unwrap(),
    );
    let (a, b) = tokio::join!(follow(s1), follow(s2));
    assert_eq!(a.unwrap().result().exit_code, 0);
    assert_eq!(b.unwrap().result().exit_code, 0);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "run\n");

    // Cancel: the running action's process group is killed, the operation ends CANCELLED.
    let long = Spec::sh(&format!(
        "sleep 30; touch {}/not-cancelled",
        marks.path().display()
    ));
    let d = c.upload(&long).await;
    let mut stream = c.start(&d, &[], true).await.unwrap();
    let name = stream.next().await.unwrap().unwrap().name;
    // Meanwhile the worker's heartbeat shows the job in its execute stage, and /queues says so.
    let (http_addr, key) = (stack.http, stack.keys.developer.clone());
    let op = name.clone();
    tokio::task::spawn_blocking(move || {
        let auth = format!("Bearer {key}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let headers = [("Authorization", auth.as_str())];
            let (status, body) =
                support::ci::http(http_addr, "GET", "/api/v1/workers", &headers, b"");
            assert_eq!(status, 200, "{body}");
            let workers: serde_json::Value = serde_json::from_str(&body).unwrap();
            let stage = workers
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|w| w["jobs"].as_array().unwrap())
                .find(|j| j["operation"] == op.as_str())
                .map(|j| j["stage"].as_str().unwrap().to_string());
            if stage.as_deref() == Some("executing") {
                let (_, page) = support::ci::http(http_addr, "GET", "/queues", &headers, b"");
                assert!(
                    page.contains("<span class=\"stage executing\">executing 1</span>"),
                    "{page}"
                );
                assert!(
                    page.contains(&op),
                    "the job, listed under its worker: {page}"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "never shown executing: {workers}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await
    .unwrap();
    c.ops
        .cancel_operation(lr::CancelOperationRequest { name: name.clone() })
        .await
        .unwrap();
    let cancelled = follow(stream).await.unwrap();
    assert_eq!(cancelled.code(), Code::Cancelled as i32);
    let got = c
        .ops
        .get_operation(lr::GetOperationRequest { name: name.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(got.done);
    let list = |filter: &str| lr::ListOperationsRequest {
        filter: filter.into(),
        page_size: 1000,
        ..Default::default()
    };
    let done = c
        .ops
        .list_operations(list("done=true"))
        .await
        .unwrap()
        .into_inner();
    assert!(done.operations.iter().any(|o| o.name == name));
    let open = c
        .ops
        .list_operations(list("done=false"))
        .await
        .unwrap()
        .into_inner();
    assert!(open.operations.iter().all(|o| !o.done && o.name != name));
    let bad = c
        .ops
        .list_operations(list("state=weird"))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    // API clients: a burst of 1 at 0.5/s; the second waits ~2 s, the third would wait 4 s > 2.5 s.
    let api = |n: &str| Spec::sh(&format!("echo {n}"));
    let bot = [
        ("x-motorpool-trigger", "api"),
        ("x-motorpool-client", "bot"),
    ];
    let t0 = Instant::now();
    let d1 = c.upload(&api("1")).await;
    let d2 = c.upload(&api("2")).await;
    let d3 = c.upload(&api("3")).await;
    let s1 = c.start(&d1, &bot, true).await.unwrap();
    let s2 = c.start(&d2, &bot, true).await.unwrap();
    let refused = c.start(&d3, &bot, true).await.expect_err("over the limit");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("bot"), "{}", refused.message());
    let other = c
        .run(
            &api("4"),
            &[
                ("x-motorpool-trigger", "api"),
                ("x-motorpool-client", "nightly"),
            ],
        )
        .await;
    assert_eq!(other.code(), 0, "another client has its own bucket");
    follow(s1).await.unwrap();
    let waited = follow(s2).await.unwrap();
    assert_eq!(waited.code(), 0);
    assert!(
        t0.elapsed() >= Duration::from_millis(1800),
        "the second API execution waited for its token: {:?}",
        t0.elapsed()
    );

    // Bad input: each a clear status, and the stack keeps serving.
    let missing = support::sha(b"an action nobody uploaded");
    let e = c.start(&missing, &[], false).await.err().unwrap();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("is missing from the CAS"),
        "{}",
        e.message()
    );
    // REAPI names the missing blob, so Bazel uploads it and executes again.
    let failure = tonic_types::StatusExt::get_details_precondition_failure(&e).expect("details");
    assert_eq!(failure.violations[0].r#type, "MISSING");
    assert_eq!(
        failure.violations[0].subject,
        format!("blobs/{}/{}", missing.hex(), missing.size)
    );
    let e = c
        .start(&d1, &[("x-motorpool-lane", "urgent")], false)
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut escape = Spec::sh("echo secret > ../escaped");
    escape.outputs = vec!["../escaped".into()];
    let r = c.run(&escape, &[]).await;
    assert_eq!(r.code(), Code::InvalidArgument as i32, "{:?}", r.response);
    let mut link = Spec::sh("ln -s /etc/passwd leak");
    link.outputs = vec!["leak".into()];
    let r = c.run(&link, &[]).await;
    assert_eq!(r.code(), Code::InvalidArgument as i32, "{:?}", r.response);
    assert!(
        r.response
            .status
            .unwrap()
            .message
            .contains("outside the exec root")
    );
    let e = c
        .exec
        .wait_execution(
            bazel_remote_apis::build::bazel::remote::execution::v2::WaitExecutionRequest {
                name: "0123456789abcdef0123456789abcdef".into(),
            },
        )
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::NotFound);
    let ok = c.run(&Spec::sh("true"), &[]).await;
    assert_eq!(ok.code(), 0, "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn release_overtakes_a_saturated_test_lane_and_lint_still_finishes() {
    // One worker with one slot, and a short aging step so the test is quick.
    let stack = Stack::up_with_env(
        &["--workers", "1", "--worker-slots", "1", "--shards", "1"],
        &[("MOTORPOOL_SCHEDULER_AGING_STEP_MS", "1000")],
    );
    let c = ExecClient::connect(&stack, "").await;
    let started = Instant::now();
    // The feeder keeps the test lane saturated: a new 0.3 s test action every 0.15 s for 9 s.
    let feeder = {
        let mut c = ExecClient::connect(&stack, "").await;
        tokio::spawn(async move {
            let mut runs = Vec::new();
            let mut i = 0;
            while started.elapsed() < Duration::from_secs(9) {
                let d = c.upload(&Spec::sh(&format!("sleep 0.3; echo t{i}"))).await;
                let s = c.start(&d, &[TEST], true).await.unwrap();
                runs.push(tokio::spawn(follow(s)));
                i += 1;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            let mut out = Vec::new();
            for r in runs {
                out.push(r.await.unwrap().unwrap());
            }
            out
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut lc = ExecClient::connect(&stack, "").await;
    let d = lc.upload(&Spec::sh("echo lint")).await;
    let lint = tokio::spawn(follow(lc.start(&d, &[LINT], true).await.unwrap()));
    tokio::time::sleep(Duration::from_millis(900)).await;
    let mut rc = ExecClient::connect(&stack, "").await;
    let d = rc.upload(&Spec::sh("echo release")).await;
    let release_submitted = support::exec::now_secs();
    let release = follow(rc.start(&d, &[RELEASE], true).await.unwrap())
        .await
        .unwrap();
    let lint = lint.await.unwrap().unwrap();
    let lint_done = support::exec::now_secs();
    let tests = feeder.await.unwrap();
    drop(c);

    let start = |f: &support::exec::Finished| {
        secs(
            &f.result()
                .execution_metadata
                .as_ref()
                .unwrap()
                .execution_start_timestamp,
        )
    };
    let r_start = start(&release);
    // Release starts at the next free slot: no test action starts between its arrival and it.
    let overtaken: Vec<f64> = tests
        .iter()
        .map(start)
        .filter(|s| *s > release_submitted && *s < r_start)
        .collect();
    assert!(
        overtaken.is_empty(),
        "test actions started after the release action arrived and before it: {overtaken:?}"
    );
    assert!(
        r_start - release_submitted < 1.0,
        "release waited {}s",
        r_start - release_submitted
    );
    // Lint finishes while the test lane is still saturated (aging), not after it drains.
    let last_test_start = tests.iter().map(start).fold(0.0, f64::max);
    assert!(
        start(&lint) < last_test_start,
        "lint ran only after the test lane drained"
    );
    assert!(lint_done > 0.0);
    assert!(
        tests.len() >= 40,
        "the feeder saturated the lane: {} actions",
        tests.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_dying_are_retried_then_alerted_and_restarts_lose_nothing() {
    let marks = tempfile::tempdir().unwrap();
    // Unsandboxed: these actions stand in for a crashing worker by killing it (their parent)
    // and count their attempts in a file outside their exec root, both of which the sandbox
    // forbids (tests/sandbox.rs in the worker shows that it does).
    let stack = Stack::up_with_env(
        &["--workers", "2", "--worker-slots", "2", "--no-sandbox"],
        &[("MOTORPOOL_SCHEDULER_WORKER_TIMEOUT_MS", "1500")],
    );
    let bus = stack.bus_as("admin").await;
    let mut alerts = bus
        .subscribe::<Alert>(&subjects::ops::all_alerts())
        .await
        .unwrap();
    let mut c = ExecClient::connect(&stack, "").await;

    // The action kills its own worker (its parent) the first time only: one retry, success.
    let once = marks.path().join("once");
    let spec = Spec::sh(&format!(
        "if [ -e {m} ]; then echo survived; else touch {m}; kill -9 $PPID; sleep 5; fi",
        m = once.display()
    ));
    let r = c.run(&spec, &[]).await;
    assert_eq!(r.code(), 0, "{:?}", r.response.status);
    assert_eq!(r.result().exit_code, 0);

    // Always killing its worker: three attempts, then a failed operation and an alert.
    let spec = Spec::sh(&format!(
        "echo attempt >> {}/always; kill -9 $PPID; sleep 5",
        marks.path().display()
    ));
    let r = c.run(&spec, &[]).await;
    assert_eq!(r.code(), Code::Unavailable as i32, "{:?}", r.response);
    let msg = r.response.status.unwrap().message;
    assert!(msg.contains("3 attempts"), "{msg}");
    let attempts = std::fs::read_to_string(marks.path().join("always")).unwrap();
    assert_eq!(attempts.lines().count(), 3);
    let alert = loop {
        let a = tokio::time::timeout(Duration::from_secs(10), alerts.next())
            .await
            .expect("an alert")
            .unwrap();
        if a.kind == "retries_exhausted" {
            break a;
        }
    };
    assert_eq!(alert.subject_id, r.name);

    // Restart the scheduler in the middle of 200 queued actions: each runs exactly once.
    let log = marks.path().join("each");
    let done = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(100));
    let mut runs = Vec::new();
    for i in 0..200 {
        let d = c
            .upload(&Spec::sh(&format!(
                "echo a{i} >> {}; sleep 0.02",
                log.display()
            )))
            .await;
        let permit = gate.clone().acquire_owned().await.unwrap();
        let s = c.start(&d, &[], false).await.unwrap();
        let counter = done.clone();
        runs.push(tokio::spawn(async move {
            let r = follow(s).await;
            drop(permit);
            counter.fetch_add(1, Ordering::SeqCst);
            r
        }));
        if i == 120 {
            while done.load(Ordering::SeqCst) < 40 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            stack.kill9(&["scheduler"]);
        }
    }
    for r in runs {
        let f = r.await.unwrap().unwrap();
        assert_eq!(f.code(), 0, "{:?}", f.response.status);
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for l in text.lines() {
        *counts.entry(l).or_default() += 1;
    }
    assert_eq!(counts.len(), 200, "every action ran");
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "ran more than once: {twice:?}");

    // The gateway dies while an operation runs; WaitExecution on a new connection finishes it.
    let d = c.upload(&Spec::sh("sleep 2; echo late")).await;
    let mut s = c.start(&d, &[], true).await.unwrap();
    let name = s.next().await.unwrap().unwrap().name;
    stack.kill9(&["gateway"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let finished = loop {
        assert!(Instant::now() < deadline, "gateway did not come back");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let Ok(ch) = tonic::transport::Channel::from_shared(stack.endpoint())
            .unwrap()
            .connect()
            .await
        else {
            continue;
        };
        let ch = tonic::service::interceptor::InterceptedService::new(
            ch,
            support::Bearer::new(&stack.keys.admin),
        );
        let mut exec =
            bazel_remote_apis::build::bazel::remote::execution::v2::execution_client::ExecutionClient::new(ch);
        let req = bazel_remote_apis::build::bazel::remote::execution::v2::WaitExecutionRequest {
            name: name.clone(),
        };
        match exec.wait_execution(req).await {
            Ok(stream) => match follow(stream.into_inner()).await {
                Ok(f) => break f,
                Err(_) => continue,
            },
            Err(_) => continue,
        }
    };
    assert_eq!(finished.result().exit_code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn actions_on_the_stack_as_it_ships_run_sandboxed_and_an_oom_is_not_retried() {
    let stack = Stack::up(&["--workers", "1", "--worker-slots", "2"]);
    let mut c = ExecClient::connect(&stack, "").await;
    let probe = Spec::sh(
        "id -u; cat /etc/shadow >/dev/null 2>&1 || echo no-shadow; \
         ls /proc | grep -c '^[0-9]' | awk '{ print ($1 < 10) ? \"own-pids\" : \"host-pids\" }'",
    );
    let r = c.run(&probe, &[]).await;
    assert_eq!((r.code(), r.result().exit_code), (0, 0), "{:?}", r.response);
    assert_eq!(
        r.result().stdout_digest.as_ref().unwrap().hash,
        support::sha(b"65534\nno-shadow\nown-pids\n").hex(),
        "the action ran as the sandbox user, without the host's secrets or processes"
    );

    // Over its 64 MiB (asked with memory-mb): a failed run with a note (an infrastructure failure
    // would be retried and end UNAVAILABLE), not an outage.
    let mut hog = Spec::sh("x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo ${#x}");
    hog.platform = vec![("memory-mb".into(), "64".into())];
    let r = c.run(&hog, &[]).await;
    assert_eq!(r.code(), 0, "{:?}", r.response.status);
    assert_ne!(r.result().exit_code, 0);
    assert!(
        r.response.message.contains("memory limit"),
        "{:?}",
        r.response.message
    );
    // The worker keeps serving.
    let r = c.run(&probe, &[]).await;
    assert_eq!(r.result().exit_code, 0);
}
