//! A scheduler that has just started (or taken over from a dead one) rebuilds its state from
//! the operations bucket while workers already talk to it: the records, not its memory, decide,
//! so a finished job is completed once and nothing is sent to run a second time.

use motorpool_bus::{Bus, BusError, MailboxOptions, NatsServer, serve, subjects};
use motorpool_config::SchedulerConfig;
use motorpool_messages::exec::{
    Ack, Assign, AssignReply, HeldJob, JobDone, JobResult, JobStage, Lane, OpState, Operation,
    Outcome, Pool, WorkerInfo,
};
use motorpool_messages::{DigestFunction, decode, encode, now_ms};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn operation(id: String, state: OpState, attempts: u32) -> Operation {
    Operation {
        action: DigestFunction::Sha256.digest_of(id.as_bytes()),
        id,
        instance: String::new(),
        digest_function: DigestFunction::Sha256,
        lane: Lane::Build,
        pool: Pool::Cpu,
        platform: Vec::new(),
        do_not_cache: false,
        timeout_ms: 0,
        client: "test".into(),
        api: false,
        created_ms: now_ms(),
        not_before_ms: 0,
        attempts,
        failures: Vec::new(),
        state,
        queued_ms: now_ms(),
        trace: String::new(),
    }
}

fn finished(message: &str) -> Outcome {
    Outcome {
        error: None,
        result: Some(b"result".to_vec()),
        cached: false,
        message: message.into(),
    }
}

/// A nats-server, a connection as worker w1 and the operations bucket.
async fn operations_bucket() -> (NatsServer, Bus, async_nats::jetstream::kv::Store) {
    let server = NatsServer::start().unwrap();
    let bus = Bus::connect(&server.url(), "worker-w1", Duration::from_secs(5))
        .await
        .unwrap();
    let ops = bus
        .ensure_kv(subjects::exec::operations_config())
        .await
        .unwrap();
    (server, bus, ops)
}

/// Scheduler s1 on `server`, until `shutdown`.
fn start_scheduler(
    server: &NatsServer,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let config = SchedulerConfig {
        nats_url: server.url(),
        scheduler_id: Some("s1".into()),
        ..Default::default()
    };
    tokio::spawn(motorpool_scheduler::run(config, shutdown.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_heard_before_the_record_is_read_completes_the_job_once() {
    let (server, bus, ops) = operations_bucket().await;
    // Thousands of finished operations ahead of the running one: the scheduler's watch is still
    // reading them when the report arrives.
    for i in 0..3000 {
        let id = format!("{i:032x}");
        let op = operation(id.clone(), OpState::Completed(finished("old")), 1);
        ops.put(&id, encode(&op).unwrap().into()).await.unwrap();
    }
    let id = format!("{:032x}", u128::MAX);
    let running = operation(
        id.clone(),
        OpState::Executing {
            worker: "w1".into(),
            since_ms: now_ms(),
        },
        1,
    );
    ops.put(&id, encode(&running).unwrap().into())
        .await
        .unwrap();

    let shutdown = CancellationToken::new();
    let scheduler = start_scheduler(&server, &shutdown);
    // The worker reports as soon as a scheduler answers, as it does after a takeover.
    report(&bus, &id, "ran once").await;
    // Completed with the worker's outcome at once, not left running to be retried when the
    // worker no longer lists it.
    let op = settled(&ops, &id).await;
    match &op.state {
        OpState::Completed(outcome) => assert_eq!(outcome.message, "ran once"),
        other => panic!("the reported job is {other:?}, not completed"),
    }
    assert_eq!(op.attempts, 1);
    assert!(op.failures.is_empty(), "{:?}", op.failures);
    shutdown.cancel();
    scheduler.await.unwrap().unwrap();
}

/// Sends w1's report that attempt 1 of `id` finished, until a scheduler acknowledges it.
async fn report(bus: &Bus, id: &str, message: &str) {
    let done = JobDone {
        operation_id: id.to_string(),
        attempt: 1,
        worker: "w1".into(),
        result: JobResult::Finished(finished(message)),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match bus
            .request_with_timeout::<JobDone>(
                &subjects::exec::job_done("w1"),
                &done,
                Duration::from_secs(2),
            )
            .await
        {
            Ok(Ack) => return,
            Err(BusError::NoResponders { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(e) => panic!("the report was not taken: {e}"),
        }
    }
}

/// The record of `id` once it completed, or as it is after 4 s.
async fn settled(ops: &async_nats::jetstream::kv::Store, id: &str) -> Operation {
    let since = Instant::now();
    loop {
        let entry = ops.get(id).await.unwrap().unwrap();
        let op: Operation = decode(&entry).unwrap();
        if op.is_done() || since.elapsed() > Duration::from_secs(4) {
            return op;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_replayed_before_their_primary_share_its_run_and_are_never_run_again() {
    let (server, bus, ops) = operations_bucket().await;
    let put = |op: Operation| {
        let ops = ops.clone();
        async move {
            ops.put(&op.id, encode(&op).unwrap().into()).await.unwrap();
        }
    };
    // What a dead scheduler left: `b` follows `a`, which was dispatched after `b` began to
    // follow it, so the watch replays `b` first; `c` follows `d`, which completed (its
    // followers' writes never happened).
    let (a, b, c, d) = (
        "a".repeat(32),
        "b".repeat(32),
        "c".repeat(32),
        "d".repeat(32),
    );
    put(operation(a.clone(), OpState::Queued { follows: None }, 0)).await;
    let mut follower = operation(
        b.clone(),
        OpState::Queued {
            follows: Some(a.clone()),
        },
        0,
    );
    follower.action = DigestFunction::Sha256.digest_of(a.as_bytes());
    put(follower).await;
    let executing = OpState::Executing {
        worker: "w1".into(),
        since_ms: now_ms(),
    };
    put(operation(a.clone(), executing, 1)).await;
    let mut follower = operation(
        c.clone(),
        OpState::Queued {
            follows: Some(d.clone()),
        },
        0,
    );
    follower.action = DigestFunction::Sha256.digest_of(d.as_bytes());
    put(follower).await;
    put(operation(
        d.clone(),
        OpState::Completed(finished("d ran")),
        1,
    ))
    .await;

    // Worker w1, running `a`, with room for more: whatever is assigned to it is recorded.
    let assigned = Arc::new(Mutex::new(Vec::<String>::new()));
    let shutdown = CancellationToken::new();
    let seen = assigned.clone();
    serve(
        &bus,
        subjects::exec::assign("w1"),
        MailboxOptions::default(),
        shutdown.clone(),
        move |req: Assign| {
            seen.lock().unwrap().push(req.operation.id);
            async {
                Ok(AssignReply {
                    accepted: true,
                    reason: String::new(),
                })
            }
        },
    )
    .await
    .unwrap();
    let beats = {
        let (bus, a, stop) = (bus.clone(), a.clone(), shutdown.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let info = WorkerInfo {
                    worker_id: "w1".into(),
                    pool: Pool::Cpu,
                    platform: Vec::new(),
                    slots: 4,
                    running: vec![HeldJob {
                        operation_id: a.clone(),
                        attempt: 1,
                        stage: JobStage::Executing,
                        since_ms: now_ms(),
                    }],
                    started_at_ms: 0,
                    heartbeat_at_ms: now_ms(),
                    draining: false,
                    instance: "w1".into(),
                };
                let _ = bus.publish(&subjects::exec::heartbeat("w1"), &info).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let scheduler = start_scheduler(&server, &shutdown);

    // `c` shares `d`'s result as soon as the scheduler has read them.
    let op = settled(&ops, &c).await;
    match &op.state {
        OpState::Completed(o) => assert!(
            o.message
                .contains(&format!("shared the execution of operation {d}. d ran")),
            "{}",
            o.message
        ),
        other => panic!("the follower of a completed operation is {other:?}"),
    }
    // `b` waits for `a`'s run: a second of heartbeats with free slots, and nothing assigned.
    tokio::time::sleep(Duration::from_secs(1)).await;
    report(&bus, &a, "a ran").await;
    let op = settled(&ops, &b).await;
    match &op.state {
        OpState::Completed(o) => assert!(
            o.message
                .contains(&format!("shared the execution of operation {a}. a ran")),
            "{}",
            o.message
        ),
        other => panic!("the follower of a running operation is {other:?}"),
    }
    assert_eq!(op.attempts, 0, "the follower never ran itself");
    assert!(
        assigned.lock().unwrap().is_empty(),
        "followers were sent to run again: {:?}",
        assigned.lock().unwrap()
    );
    shutdown.cancel();
    beats.await.unwrap();
    scheduler.await.unwrap().unwrap();
}
