//! The bus against a real nats-server.

use motorpool_bus::{Bus, BusError, MailboxOptions, NatsServer, Subject, serve, subjects};
use motorpool_messages::cas::{FindMissing, FindMissingReply, ShardInfo};
use motorpool_messages::{DigestFunction, ErrorCode, WireError};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

async fn bus(server: &NatsServer) -> Bus {
    Bus::connect(&server.url(), "test", Duration::from_secs(2))
        .await
        .unwrap()
}

/// A shard's heartbeat, for the tests that need some message.
fn shard_info(id: &str) -> ShardInfo {
    ShardInfo {
        shard_id: id.into(),
        data_addr: "127.0.0.1:1".into(),
        capacity_bytes: 1,
        used_bytes: 0,
        blob_count: 0,
        started_at_ms: 1,
        heartbeat_at_ms: 2,
        draining: false,
    }
}

/// A labeling job for the lane-queue tests.
fn label_job(
    id: &str,
    lane: motorpool_messages::exec::Lane,
) -> motorpool_messages::label::LabelJob {
    motorpool_messages::label::LabelJob {
        job_id: id.into(),
        clip_id: "c".into(),
        clip_dir: "/nowhere".into(),
        lane,
        submitted_ms: 0,
        params: motorpool_messages::label::LabelParams::default(),
        outputs: vec![],
    }
}

/// The `mapping` (`prelabel`) stage's lane queues, as the labeling stages open them.
fn lane_options(prelabel: bool, ack_wait: Duration) -> motorpool_bus::LaneQueueOptions {
    use motorpool_messages::label::Stage;
    motorpool_bus::LaneQueueOptions {
        consumer: if prelabel {
            |l| subjects::label::consumer(Stage::Prelabel, l)
        } else {
            |l| subjects::label::consumer(Stage::Mapping, l)
        },
        subject: if prelabel {
            |l| subjects::label::run(Stage::Prelabel, l)
        } else {
            |l| subjects::label::run(Stage::Mapping, l)
        },
        aging_step_ms: 3_600_000,
        ack_wait,
        max_deliver: 5,
    }
}

#[tokio::test]
async fn request_reply_with_typed_errors_and_malformed_frames() {
    let server = NatsServer::start().unwrap();
    let bus = bus(&server).await;
    assert_eq!(bus.max_payload(), 8 * 1024 * 1024);
    let subject = subjects::cas::find_missing("s1");
    let stop = CancellationToken::new();
    let task = serve(
        &bus,
        subject.clone(),
        MailboxOptions::default(),
        stop.clone(),
        |req: FindMissing| async move {
            if req.instance == "bad" {
                return Err(WireError::invalid("bad instance"));
            }
            Ok(FindMissingReply {
                missing: (0..req.digests.len() as u32)
                    .filter(|i| i % 2 == 1)
                    .collect(),
            })
        },
    )
    .await
    .unwrap();

    let digests = (0..4u8)
        .map(|i| DigestFunction::Sha256.digest_of(&[i]))
        .collect();
    let reply = bus
        .request(
            &subject,
            &FindMissing {
                instance: String::new(),
                digests,
            },
        )
        .await
        .unwrap();
    assert_eq!(reply.missing, vec![1, 3]);

    let err = bus
        .request(
            &subject,
            &FindMissing {
                instance: "bad".into(),
                digests: vec![],
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            BusError::Remote(WireError {
                code: ErrorCode::InvalidArgument,
                ..
            })
        ),
        "{err}"
    );

    // A frame of the wrong kind reaches the mailbox: it answers with a clear error and keeps serving.
    let raw = bus
        .client()
        .request(
            subject.to_string(),
            motorpool_messages::encode(&ShardInfo {
                shard_id: "x".into(),
                data_addr: String::new(),
                capacity_bytes: 0,
                used_bytes: 0,
                blob_count: 0,
                started_at_ms: 0,
                heartbeat_at_ms: 0,
                draining: false,
            })
            .unwrap()
            .into(),
        )
        .await
        .unwrap();
    let answer: Result<FindMissingReply, WireError> =
        motorpool_messages::decode(&raw.payload).unwrap();
    let err = answer.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);
    assert!(
        err.message.contains("expected a FindMissing"),
        "{}",
        err.message
    );
    assert!(
        bus.request(
            &subject,
            &FindMissing {
                instance: String::new(),
                digests: vec![]
            }
        )
        .await
        .is_ok()
    );

    stop.cancel();
    task.await.unwrap();
    let err = bus
        .request(
            &subject,
            &FindMissing {
                instance: String::new(),
                digests: vec![],
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, BusError::NoResponders { .. }), "{err}");
}

#[tokio::test]
async fn queue_groups_split_work_and_timeouts_are_reported() {
    let server = NatsServer::start().unwrap();
    let bus = bus(&server).await;
    let subject = Subject::clone(&subjects::cas::find_missing("group"));
    let stop = CancellationToken::new();
    let counts = std::sync::Arc::new([
        std::sync::atomic::AtomicUsize::new(0),
        std::sync::atomic::AtomicUsize::new(0),
    ]);
    for i in 0..2 {
        let counts = counts.clone();
        serve(
            &bus,
            subject.clone(),
            MailboxOptions {
                queue_group: Some("g".into()),
                concurrency: 4,
            },
            stop.clone(),
            move |_req: FindMissing| {
                counts[i].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { Ok(FindMissingReply { missing: vec![] }) }
            },
        )
        .await
        .unwrap();
    }
    for _ in 0..40 {
        bus.request(
            &subject,
            &FindMissing {
                instance: String::new(),
                digests: vec![],
            },
        )
        .await
        .unwrap();
    }
    let a = counts[0].load(std::sync::atomic::Ordering::SeqCst);
    let b = counts[1].load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(a + b, 40, "each request handled exactly once");
    assert!(a > 0 && b > 0, "both members took work: {a} {b}");

    let slow = subjects::cas::find_missing("slow");
    serve(
        &bus,
        slow.clone(),
        MailboxOptions::default(),
        stop.clone(),
        |_req: FindMissing| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(FindMissingReply { missing: vec![] })
        },
    )
    .await
    .unwrap();
    let err = bus
        .request_with_timeout(
            &slow,
            &FindMissing {
                instance: String::new(),
                digests: vec![],
            },
            Duration::from_millis(100),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, BusError::Timeout { .. }), "{err}");
    stop.cancel();
}

#[tokio::test]
async fn a_bucket_no_service_made_yet_reads_as_empty_and_other_failures_still_fail() {
    let server = NatsServer::start().unwrap();
    let bus = bus(&server).await;
    let none: Vec<ShardInfo> = bus.kv_values("never_made").await.unwrap();
    assert!(none.is_empty());
    bus.ensure_kv(async_nats::jetstream::kv::Config {
        bucket: "made".into(),
        history: 1,
        ..Default::default()
    })
    .await
    .unwrap()
    .put(
        "s1",
        motorpool_messages::codec::encode(&shard_info("s1"))
            .unwrap()
            .into(),
    )
    .await
    .unwrap();
    let one: Vec<ShardInfo> = bus.kv_values("made").await.unwrap();
    assert_eq!(one.len(), 1);
    // A name that cannot be a bucket is an error, not an empty list.
    assert!(
        bus.kv_values::<ShardInfo>("no spaces allowed")
            .await
            .is_err()
    );
}

#[tokio::test]
async fn broadcast_and_kv_survive_a_server_restart() {
    let mut server = NatsServer::start().unwrap();
    let bus = bus(&server).await;
    let kv = bus
        .ensure_kv(async_nats::jetstream::kv::Config {
            bucket: "test_bucket".into(),
            history: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    kv.put("k", "v".into()).await.unwrap();
    server.restart().unwrap();
    // The client reconnects by itself; JetStream state is on disk.
    let mut value = None;
    for _ in 0..100 {
        if let Ok(Some(v)) = kv.get("k").await {
            value = Some(v);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(value.as_deref(), Some(&b"v"[..]));

    let mut sub = bus
        .subscribe::<ShardInfo>(&subjects::cas::all_heartbeats())
        .await
        .unwrap();
    let info = shard_info("s9");
    bus.publish(&subjects::cas::heartbeat("s9"), &info)
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, info);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_in_a_higher_lane_is_handed_out_whole_before_a_lower_one() {
    use motorpool_bus::LaneQueue;
    use motorpool_messages::exec::Lane;
    use motorpool_messages::label::{LabelJob, Stage};

    let server = NatsServer::start().unwrap();
    let bus = bus(&server).await;
    bus.ensure_stream(subjects::label::jobs_stream_config())
        .await
        .unwrap();
    // Lint first, then release: the picker holds one job per lane, so each further release job
    // is still on its way from the server when the next pick is made.
    for (lane, n) in [(Lane::Lint, 6), (Lane::Release, 6)] {
        for i in 0..n {
            let job = label_job(&format!("{}-{i}", lane.name()), lane);
            bus.enqueue(&subjects::label::run(Stage::Prelabel, lane), &job)
                .await
                .unwrap();
        }
    }
    let options = lane_options(true, Duration::from_secs(30));
    let mut queue =
        LaneQueue::<LabelJob>::open(&bus, subjects::label::jobs_stream_config(), options)
            .await
            .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut order = Vec::new();
    for _ in 0..12 {
        let d = tokio::time::timeout(Duration::from_secs(10), queue.next())
            .await
            .unwrap_or_else(|_| panic!("no job after {order:?}"))
            .unwrap();
        order.push(d.lane);
        d.ack().await.unwrap();
    }
    assert!(order[..6].iter().all(|l| *l == Lane::Release), "{order:?}");
    assert!(order[6..].iter().all(|l| *l == Lane::Lint), "{order:?}");
    queue.close().await;
}

#[tokio::test]
async fn lane_queues_hand_out_release_first_then_fifo_and_redeliver_dropped_jobs() {
    use motorpool_bus::LaneQueue;
    use motorpool_messages::exec::Lane;
    use motorpool_messages::label::{LabelJob, Stage};

    let server = NatsServer::start().unwrap();
    let bus = bus(&server).await;
    bus.ensure_stream(subjects::label::jobs_stream_config())
        .await
        .unwrap();
    for (id, lane) in [
        ("lint-1", Lane::Lint),
        ("test-1", Lane::Test),
        ("lint-2", Lane::Lint),
        ("release-1", Lane::Release),
        ("test-2", Lane::Test),
    ] {
        bus.enqueue(
            &subjects::label::run(Stage::Mapping, lane),
            &label_job(id, lane),
        )
        .await
        .unwrap();
    }
    let options = lane_options(false, Duration::from_secs(1));
    let mut queue =
        LaneQueue::<LabelJob>::open(&bus, subjects::label::jobs_stream_config(), options.clone())
            .await
            .unwrap();
    // Let every lane's first job arrive before picking.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut order = Vec::new();
    let mut dropped = None;
    for i in 0..5 {
        let d = tokio::time::timeout(Duration::from_secs(5), queue.next())
            .await
            .unwrap()
            .unwrap();
        order.push(d.msg.job_id.clone());
        if i == 1 {
            dropped = Some(d); // held, never acknowledged
        } else {
            d.ack().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(order, ["release-1", "test-1", "test-2", "lint-1", "lint-2"]);
    // A job whose holder went away comes back after ack_wait.
    drop(dropped);
    let again = tokio::time::timeout(Duration::from_secs(10), queue.next())
        .await
        .expect("redelivered")
        .unwrap();
    assert_eq!(again.msg.job_id, "test-1");
    assert_eq!(again.delivered, 2);
    again.ack().await.unwrap();
    queue.close().await;
    // Nothing is left: the work queue is empty.
    let stream = bus
        .ensure_stream(subjects::label::jobs_stream_config())
        .await
        .unwrap();
    let mut stream = stream;
    assert_eq!(stream.info().await.unwrap().state.messages, 0);
}

/// A three-node JetStream cluster: what a connection creates is kept three times, and a client
/// given every member's URL keeps working (KV writes and reads, requests) while the node it
/// talks to is killed and another restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_keeps_kv_and_requests_through_a_node_killed_and_one_restarted() {
    let mut cluster =
        motorpool_bus::NatsCluster::start(3, motorpool_bus::NatsServerOptions::default()).unwrap();
    let bus = Bus::connect(&cluster.url(), "test", Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(bus.replicas(), 3, "{:?}", bus.client().server_info());
    let config = async_nats::jetstream::kv::Config {
        bucket: "cluster_test".into(),
        history: 1,
        ..Default::default()
    };
    // The cluster elects its JetStream leader after the routes are up: ask until it answers.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let kv = loop {
        match bus.ensure_kv(config.clone()).await {
            Ok(kv) => break kv,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no JetStream in the cluster: {e}"),
        }
    };
    let info = bus
        .jetstream()
        .get_stream("KV_cluster_test")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.num_replicas, 3);
    // A responder on its own connection, as a service would have.
    let answer = Bus::connect(&cluster.url(), "answer", Duration::from_secs(2))
        .await
        .unwrap();
    let subject = subjects::cas::find_missing("s1");
    let _served = serve(
        &answer,
        subject.clone(),
        MailboxOptions::default(),
        CancellationToken::new(),
        |req: FindMissing| async move {
            Ok::<_, WireError>(FindMissingReply {
                missing: (0..req.digests.len() as u32).collect(),
            })
        },
    )
    .await
    .unwrap();
    let mut writes = 0u32;
    // Kill the node this client is on (the first URL), then bring it back while writing.
    cluster.servers[0].kill();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut restarted = false;
    while writes < 40 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{writes} writes in 60 s"
        );
        if writes == 20 && !restarted {
            cluster.servers[1].kill();
            cluster.servers[0].restart().unwrap();
            restarted = true;
        }
        let put = kv
            .put(format!("k{writes}"), writes.to_string().into())
            .await;
        let asked = bus
            .request_with_timeout(
                &subject,
                &FindMissing {
                    instance: String::new(),
                    digests: vec![],
                },
                Duration::from_secs(2),
            )
            .await;
        if put.is_ok() && asked.is_ok() {
            writes += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    cluster.servers[1].restart().unwrap();
    for i in 0..40u32 {
        let v = kv.get(format!("k{i}")).await.unwrap().expect("kept");
        assert_eq!(v, i.to_string().as_bytes());
    }
}
