//! The bus as `motorpool up` ships it: every service is its own NATS user, and NATS itself
//! refuses what a user's role does not allow. Each forgery here worked before the bus had
//! users; each is tried with credentials an attacker could plausibly hold (none, a worker's, a
//! person's), against the running stack.

mod support;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use motorpool_bus::{Bus, BusError, subjects};
use motorpool_messages::cas::{AcPut, DataReply, DataRequest, FindMissing, ShardInfo, ShardNews};
use motorpool_messages::exec::{Alert, JobDone, JobResult};
use motorpool_messages::{ErrorCode, codec};
use std::time::Duration;
use support::*;

const SHORT: Duration = Duration::from_secs(2);

async fn connect_as(stack: &Stack, name: &str, nkey: Option<&std::path::Path>) -> Bus {
    Bus::connect_service(&stack.nats_url(), name, nkey, None, SHORT)
        .await
        .unwrap()
}

/// The registered `ShardInfo` under `key`, as the registry holds it.
async fn registry_entry(bus: &Bus, key: &str) -> Option<ShardInfo> {
    let kv = bus
        .jetstream()
        .get_key_value(subjects::cas::REGISTRY_BUCKET)
        .await
        .unwrap();
    kv.get(key)
        .await
        .unwrap()
        .map(|v| codec::decode(&v).unwrap())
}

/// How many alerts the alerts stream holds.
async fn stored_alerts(bus: &Bus) -> u64 {
    let mut stream = bus
        .jetstream()
        .get_stream(subjects::ops::ALERTS_STREAM)
        .await
        .unwrap();
    stream.info().await.unwrap().state.messages
}

/// `id`'s registration, once it is there (the stack is up when any shard is; others may follow).
async fn registered(bus: &Bus, id: &str) -> ShardInfo {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(info) = registry_entry(bus, id).await {
            return info;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{id} never registered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn shard_info(id: &str, data_addr: &str) -> ShardInfo {
    ShardInfo {
        shard_id: id.into(),
        data_addr: data_addr.into(),
        capacity_bytes: 1 << 40,
        used_bytes: 0,
        blob_count: 0,
        started_at_ms: 1,
        heartbeat_at_ms: u64::MAX / 2,
        draining: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_refuses_strangers_and_forgeries_from_every_role() {
    let stack = Stack::up(&["--workers", "1", "--shards", "1"]);
    let admin = stack.bus_as("admin").await;
    let real = registry_entry(&admin, "cas-0")
        .await
        .expect("cas-0 registered");

    // No credentials, or a key the realm does not know: no connection at all.
    let refused = Bus::connect(&stack.nats_url(), "intruder", SHORT)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("uthorization"), "{refused}");
    let unknown = stack.dir.path().join("unknown.nk");
    motorpool_bus::Credentials::generate()
        .save(&unknown)
        .unwrap();
    assert!(
        Bus::connect_service(&stack.nats_url(), "intruder", Some(&unknown), None, SHORT)
            .await
            .is_err()
    );

    // A worker's credentials (what an escaped action would steal first).
    let worker = connect_as(&stack, "intruder-worker", Some(&stack.nkey("worker-0"))).await;
    let kv = worker
        .jetstream()
        .get_key_value(subjects::cas::REGISTRY_BUCKET)
        .await
        .unwrap();
    // Register as another shard, pointing its reads at us: refused by NATS.
    let forged = codec::encode(&shard_info("cas-0", "127.0.0.1:1")).unwrap();
    assert!(kv.put("cas-0", forged.clone().into()).await.is_err());
    assert!(kv.put("evil", forged.into()).await.is_err());
    // Report a job on another worker's subject: never delivered.
    let done = JobDone {
        operation_id: "op-1".into(),
        attempt: 1,
        worker: "worker-1".into(),
        result: JobResult::Infrastructure("forged".into()),
    };
    let r = worker
        .request_with_timeout(&subjects::exec::job_done("worker-1"), &done, SHORT)
        .await;
    assert!(matches!(r, Err(BusError::Timeout { .. })), "{r:?}");
    // On its own subject, in another worker's name: the scheduler refuses it.
    match worker
        .request_with_timeout(&subjects::exec::job_done("worker-0"), &done, SHORT)
        .await
    {
        Err(BusError::Remote(e)) => assert_eq!(e.code, ErrorCode::PermissionDenied, "{e}"),
        other => panic!("a report in another worker's name: {other:?}"),
    }
    // Assign jobs, raise alerts: not a worker's to do. (Were the assignment delivered, the
    // worker subscribed there would answer, if only to say the frame is not an assignment.)
    let r = worker
        .request_with_timeout(&subjects::exec::assign("worker-0"), &done, SHORT)
        .await;
    assert!(matches!(r, Err(BusError::Timeout { .. })), "{r:?}");
    let alerts = stored_alerts(&admin).await;
    let alert = Alert {
        kind: "retries_exhausted".into(),
        source: "scheduler".into(),
        subject_id: "op-9".into(),
        message: "forged".into(),
        at_ms: 1,
    };
    worker
        .publish(&subjects::ops::alert("retries_exhausted"), &alert)
        .await
        .unwrap();
    assert!(
        worker
            .enqueue(&subjects::ops::alert("retries_exhausted"), &alert)
            .await
            .is_err()
    );
    // Snoop on blob uploads to a shard, or on other users' replies.
    let mut uploads = worker
        .subscribe::<FindMissing>(&subjects::cas::find_missing("cas-0"))
        .await
        .unwrap();
    let mut inboxes = worker
        .client()
        .subscribe("_INBOX.>".to_string())
        .await
        .unwrap();

    // Tell the gateways that another shard is leaving (they would forget every result they
    // verified): never delivered. In its own name it may (its blobs are its to announce).
    let mut news = admin
        .subscribe::<ShardNews>(&subjects::cas::all_news())
        .await
        .unwrap();
    admin.flush().await.unwrap();
    let forged_news = ShardNews {
        shard_id: "cas-0".into(),
        started_at_ms: 1,
        seq: 99,
        blobs: Vec::new(),
        actions: Vec::new(),
        leaving: true,
    };
    worker
        .publish(&subjects::cas::news("cas-0"), &forged_news)
        .await
        .unwrap();
    worker.flush().await.unwrap();
    let mut heard = Vec::new();
    let _ = tokio::time::timeout(Duration::from_millis(2500), async {
        while let Some(n) = news.next_from().await {
            heard.push(n);
        }
    })
    .await;
    assert!(
        heard
            .iter()
            .any(|(from, n)| from == "cas-0" && n.shard_id == "cas-0" && n.seq != 99),
        "cas-0's own beats arrive: {heard:?}"
    );
    assert!(
        heard.iter().all(|(_, n)| n != &forged_news),
        "a forged announcement arrived: {heard:?}"
    );

    // A person's command line may submit label jobs, not reach the action cache.
    let operator = connect_as(&stack, "intruder-operator", Some(&stack.nkey("operator"))).await;
    let blob = b"planted".to_vec();
    let action = sha(b"an action");
    let planted = re::ActionResult {
        stdout_digest: Some(proto(&sha(&blob))),
        ..Default::default()
    };
    let put = AcPut {
        instance: String::new(),
        action,
        result: prost::Message::encode_to_vec(&planted),
    };
    let r = operator
        .request_with_timeout(&subjects::cas::ac_put("cas-0"), &put, SHORT)
        .await;
    assert!(matches!(r, Err(BusError::Timeout { .. })), "{r:?}");
    let r = operator
        .request_with_timeout(&subjects::cas::ac_put("worker-0"), &put, SHORT)
        .await;
    assert!(matches!(r, Err(BusError::Timeout { .. })), "{r:?}");

    // Meanwhile the stack works for real clients, through the bus the snoops are on.
    let mut c = stack.clients().await;
    let d = sha(&blob);
    c.cas
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests: vec![re::batch_update_blobs_request::Request {
                digest: Some(proto(&d)),
                data: blob.clone(),
                compressor: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(c.missing(&[d]).await, 0);
    let none = tokio::time::timeout(Duration::from_secs(1), uploads.next()).await;
    assert!(none.is_err(), "a worker read another shard's requests");
    let none = tokio::time::timeout(
        Duration::from_millis(300),
        futures::StreamExt::next(&mut inboxes),
    )
    .await;
    assert!(
        !matches!(none, Ok(Some(_))),
        "a worker read other users' replies"
    );

    // Nothing forged took effect: the registry, the alerts, the action cache.
    let now = registry_entry(&admin, "cas-0").await.unwrap();
    assert_eq!(now.data_addr, real.data_addr);
    assert!(registry_entry(&admin, "evil").await.is_none());
    let after = stored_alerts(&admin).await;
    assert_eq!(after, alerts, "a forged alert was stored");
    let ac =
        c.ac.get_action_result(re::GetActionResultRequest {
            action_digest: Some(proto(&action)),
            ..Default::default()
        })
        .await;
    assert_eq!(ac.unwrap_err().code(), tonic::Code::NotFound);

    // Even a registration written with the admin's rights under a key that is not the shard's
    // own is ignored by readers.
    let kv = admin
        .jetstream()
        .get_key_value(subjects::cas::REGISTRY_BUCKET)
        .await
        .unwrap();
    let forged = codec::encode(&shard_info("cas-0", "127.0.0.1:1")).unwrap();
    kv.put("decoy", forged.into()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let shards = stack.http_get("/api/v1/shards");
    assert!(!shards.contains("127.0.0.1:1\""), "{shards}");
    assert!(!shards.contains("decoy"), "{shards}");
    kv.delete("decoy").await.unwrap();
}

/// One control frame on the data stream: `u32` little-endian length + codec frame.
fn frame<M: motorpool_messages::Message>(m: &M) -> Vec<u8> {
    let f = codec::encode(m).unwrap();
    let mut out = (f.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&f);
    out
}

fn read_reply(conn: &mut std::net::TcpStream) -> DataReply {
    use std::io::Read;
    let mut len = [0u8; 4];
    conn.read_exact(&mut len).unwrap();
    let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
    conn.read_exact(&mut buf).unwrap();
    codec::decode(&buf).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shards_data_stream_serves_only_holders_of_the_data_key() {
    use std::io::Write;
    let stack = Stack::up(&["--workers", "0", "--shards", "1"]);
    let admin = stack.bus_as("admin").await;
    let info = registered(&admin, "cas-0").await;
    let blob = b"sneaked in".to_vec();
    let digest = sha(&blob);
    for proof in [[0u8; 32], [9u8; 32]] {
        let mut conn = std::net::TcpStream::connect(&info.data_addr).unwrap();
        let DataReply::Challenge { .. } = read_reply(&mut conn) else {
            panic!("the shard starts with a challenge");
        };
        conn.write_all(&frame(&DataRequest::Hello { proof }))
            .unwrap();
        let mut put = frame(&DataRequest::Put {
            instance: String::new(),
            digest,
        });
        put.extend_from_slice(&blob);
        let _ = conn.write_all(&put);
        match read_reply(&mut conn) {
            DataReply::Error(e) => assert_eq!(e.code, ErrorCode::PermissionDenied, "{e}"),
            other => panic!("an unauthenticated peer got {other:?}"),
        }
    }
    // The gateway, which holds the key, works through the same stream.
    let mut c = stack.clients().await;
    bs_write(&mut c, "", &digest, &blob).await.unwrap();
    assert_eq!(
        bs_read(&mut c, &read_name("", &digest), 0, 0)
            .await
            .unwrap(),
        blob
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_users_are_added_and_removed_on_a_running_stack() {
    let stack = Stack::up(&["--workers", "0", "--shards", "1"]);
    let nkey = stack.add_bus_user("shard:spare").await;
    let spare = connect_as(&stack, "test-spare", Some(&nkey)).await;
    // The new user has its role's rights, no more.
    let kv = spare
        .jetstream()
        .get_key_value(subjects::cas::REGISTRY_BUCKET)
        .await
        .unwrap();
    let me = codec::encode(&shard_info("spare", "127.0.0.1:2")).unwrap();
    kv.put("spare", me.clone().into()).await.unwrap();
    assert!(kv.put("cas-0", me.into()).await.is_err());
    kv.delete("spare").await.unwrap();

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_motorpool"))
        .args(["keys", "bus", "list", "--realm"])
        .arg(stack.dir.path().join("data/bus/realm.toml"))
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    for user in [
        "gateway",
        "scheduler",
        "cas-0",
        "spare\tshard:spare",
        "operator",
    ] {
        assert!(listed.contains(user), "{user} in:\n{listed}");
    }
    assert!(
        !listed.split_whitespace().any(|w| w.starts_with("SU")),
        "seeds are never listed:\n{listed}"
    );

    let status = std::process::Command::new(env!("CARGO_BIN_EXE_motorpool"))
        .args(["keys", "bus", "remove", "--name", "spare", "--realm"])
        .arg(stack.dir.path().join("data/bus/realm.toml"))
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let again =
            Bus::connect_service(&stack.nats_url(), "test-spare", Some(&nkey), None, SHORT).await;
        if again.is_err() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a removed user still connects"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
