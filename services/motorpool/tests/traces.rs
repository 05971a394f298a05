//! Traces across the bus: the stack exports over OTLP to a real OTLP/gRPC receiver (the
//! collector's trace service, built here from the OTLP protos), and one `Execute` arrives as one
//! trace with spans from the gateway, the scheduler, the worker and a CAS shard, each span's
//! parent in the same trace.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};
use support::Stack;
use support::exec::{ExecClient, Spec};
use support::otlp::{Received, Receiver};

/// Waits until `f` holds of the receiver's spans, for at most `secs`.
async fn until(rx: &Receiver, secs: u64, what: &str, f: impl Fn(&[Received]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if f(&rx.spans()) {
            return;
        }
        if Instant::now() > deadline {
            let names: BTreeSet<String> = rx
                .spans()
                .iter()
                .map(|s| format!("{}:{}", s.service, s.name))
                .collect();
            panic!("{what}: not within {secs} s; spans received: {names:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The Execute call's span for the operation named `op`.
fn execute_span<'a>(spans: &'a [Received], op: &str) -> Option<&'a Received> {
    let trace = spans.iter().find(|s| {
        s.name == "worker.job" && s.attributes.get("op").map(String::as_str) == Some(op)
    })?;
    spans
        .iter()
        .find(|s| s.trace_id == trace.trace_id && s.name == "Execute")
}

/// The trace as an indented tree (`--nocapture` shows it).
fn print_tree(trace: &[Received], span: &Received, depth: usize) {
    eprintln!(
        "{:indent$}{} [{}] {:.2} ms",
        "",
        span.name,
        span.service,
        span.end_ns.saturating_sub(span.start_ns) as f64 / 1e6,
        indent = depth * 2
    );
    let mut children: Vec<&Received> = trace
        .iter()
        .filter(|s| s.parent_id == span.span_id)
        .collect();
    children.sort_by_key(|s| s.start_ns);
    for c in children {
        print_tree(trace, c, depth + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_execute_is_one_trace_from_the_gateway_through_the_scheduler_and_worker_to_a_shard() {
    let rx = Receiver::start().await;
    let endpoint = rx.endpoint();
    let stack = Stack::up_with_env(
        &["--workers", "1", "--shards", "1", "--no-sandbox"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            // Exported within a fifth of a second rather than the default five.
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    );
    let _log = support::LogOnPanic(&stack);
    let mut c = ExecClient::connect(&stack, "traced").await;
    stack.wait_for_shard_news(2);

    let mut spec = Spec::sh("echo traced > out && echo done");
    spec.outputs = vec!["out".into()];
    let done = c.run(&spec, &[]).await;
    assert_eq!(done.code(), 0, "{:?}", done.response.status);
    let op = done.name.rsplit('/').next().unwrap().to_string();

    until(&rx, 30, "the worker's span of the job", |s| {
        execute_span(s, &op).is_some()
    })
    .await;
    let root = execute_span(&rx.spans(), &op).unwrap().clone();
    // Everything of the trace arrives within the exporters' delay; the job's report to the
    // scheduler is the last hop.
    until(&rx, 30, "the scheduler's span of the job's report", |s| {
        s.iter()
            .any(|x| x.trace_id == root.trace_id && x.name == "JobDone")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let trace = rx.trace(&root.trace_id);

    // One root: the gateway's Execute call, which nothing else is a parent of.
    let roots: Vec<&Received> = trace.iter().filter(|s| s.parent_id.is_empty()).collect();
    assert_eq!(roots.len(), 1, "{trace:#?}");
    assert_eq!(roots[0].span_id, root.span_id);
    assert_eq!(root.service, "motorpool-gateway");
    assert_eq!(root.attributes.get("rpc.system").unwrap(), "grpc");

    // Every other span's parent is in the trace, and starts no later than it.
    let by_id: HashMap<&str, &Received> = trace.iter().map(|s| (s.span_id.as_str(), s)).collect();
    for s in &trace {
        if s.parent_id.is_empty() {
            continue;
        }
        let parent = by_id
            .get(s.parent_id.as_str())
            .unwrap_or_else(|| panic!("{}:{} has no parent in the trace", s.service, s.name));
        assert!(
            parent.start_ns <= s.start_ns + 1_000_000,
            "{} starts before its parent {}",
            s.name,
            parent.name
        );
    }
    print_tree(&trace, &root, 0);
    let services: BTreeSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
    for want in [
        "motorpool-gateway",
        "motorpool-scheduler",
        "motorpool-worker",
        "motorpool-cas-shard",
    ] {
        assert!(services.contains(want), "{want} missing from {services:?}");
    }

    // The path: Execute -> scheduler.queue and scheduler.dispatch -> Assign (worker) ->
    // worker.job -> fetch, execute, upload (the upload's writes reach a shard), report ->
    // JobDone (scheduler).
    let parent_of = |s: &Received| by_id.get(s.parent_id.as_str()).map(|p| p.name.clone());
    let one = |name: &str| -> &Received {
        let v: Vec<&Received> = trace.iter().filter(|s| s.name == name).collect();
        assert_eq!(v.len(), 1, "{name}: {v:#?}");
        v[0]
    };
    let dispatch = one("scheduler.dispatch");
    assert_eq!(dispatch.service, "motorpool-scheduler");
    assert_eq!(parent_of(dispatch).as_deref(), Some("Execute"));
    assert_eq!(dispatch.attributes.get("op"), Some(&op));
    assert_eq!(
        parent_of(one("scheduler.queue")).as_deref(),
        Some("Execute")
    );
    let assign = one("Assign");
    assert_eq!(assign.service, "motorpool-worker");
    assert_eq!(parent_of(assign).as_deref(), Some("scheduler.dispatch"));
    assert_eq!(
        assign
            .attributes
            .get("messaging.system")
            .map(String::as_str),
        Some("nats")
    );
    let job = one("worker.job");
    assert_eq!(parent_of(job).as_deref(), Some("Assign"));
    for stage in [
        "worker.fetch",
        "worker.execute",
        "worker.upload",
        "worker.report",
    ] {
        let s = one(stage);
        assert_eq!(s.service, "motorpool-worker");
        assert_eq!(parent_of(s).as_deref(), Some("worker.job"), "{stage}");
    }
    let job_done = one("JobDone");
    assert_eq!(job_done.service, "motorpool-scheduler");
    assert_eq!(parent_of(job_done).as_deref(), Some("worker.report"));
    // The shard stored the worker's outputs and the action's result. (The worker read the
    // action from its own replica: no bus call, no span; the gateway's reads are under Execute.)
    let shard_spans: Vec<&Received> = trace
        .iter()
        .filter(|s| s.service == "motorpool-cas-shard")
        .collect();
    assert!(
        shard_spans
            .iter()
            .any(|s| parent_of(s).as_deref() == Some("worker.upload")),
        "no shard span under the upload: {shard_spans:#?}"
    );

    // Work outside any call starts no trace: nothing the stack did on its own (heartbeats,
    // leases, shard news) is a root, only the client's calls at the gateway.
    let stray: BTreeSet<String> = rx
        .spans()
        .iter()
        .filter(|s| s.parent_id.is_empty() && s.service != "motorpool-gateway")
        .map(|s| format!("{}:{}", s.service, s.name))
        .collect();
    assert!(
        stray.is_empty(),
        "traces started outside the gateway: {stray:?}"
    );
}
