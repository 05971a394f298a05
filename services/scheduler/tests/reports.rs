//! A scheduler that has just started (or taken over from a dead one) hears workers' job reports
//! before its watch has read the operations bucket: the record, not its memory, decides whether
//! a report is current, so a finished job is completed once and never sent to run again.

use motorpool_bus::{Bus, BusError, NatsServer, subjects};
use motorpool_config::SchedulerConfig;
use motorpool_messages::exec::{Ack, JobDone, JobResult, Lane, OpState, Operation, Outcome, Pool};
use motorpool_messages::{DigestFunction, decode, encode, now_ms};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_heard_before_the_record_is_read_completes_the_job_once() {
    let server = NatsServer::start().unwrap();
    let bus = Bus::connect(&server.url(), "worker-w1", Duration::from_secs(5))
        .await
        .unwrap();
    let ops = bus
        .ensure_kv(subjects::exec::operations_config())
        .await
        .unwrap();
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
    let config = SchedulerConfig {
        nats_url: server.url(),
        scheduler_id: Some("s1".into()),
        ..Default::default()
    };
    let scheduler = tokio::spawn(motorpool_scheduler::run(config, shutdown.clone()));
    // The worker reports as soon as a scheduler answers, as it does after a takeover.
    let done = JobDone {
        operation_id: id.clone(),
        attempt: 1,
        worker: "w1".into(),
        result: JobResult::Finished(finished("ran once")),
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
            Ok(Ack) => break,
            Err(BusError::NoResponders { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(e) => panic!("the report was not taken: {e}"),
        }
    }
    let answered = Instant::now();
    // Completed with the worker's outcome at once, not left running to be retried when the
    // worker no longer lists it.
    let op = loop {
        let entry = ops.get(&id).await.unwrap().unwrap();
        let op: Operation = decode(&entry).unwrap();
        if op.is_done() || answered.elapsed() > Duration::from_secs(4) {
            break op;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    match &op.state {
        OpState::Completed(outcome) => assert_eq!(outcome.message, "ran once"),
        other => panic!("the reported job is {other:?}, not completed"),
    }
    assert_eq!(op.attempts, 1);
    assert!(op.failures.is_empty(), "{:?}", op.failures);
    shutdown.cancel();
    scheduler.await.unwrap().unwrap();
}
