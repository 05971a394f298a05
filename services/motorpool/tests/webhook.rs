//! The CI front door on `motorpool up` as it ships: a project added to the stack's projects file
//! while it runs takes signed merge-request and tag events, whose jobs land on the CI lane
//! queues through the webhook's own bus user; other bus users cannot queue CI jobs.

mod support;

use motorpool_bus::subjects::ci;
use motorpool_messages::ci::CiJob;
use motorpool_messages::exec::Lane;
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};
use support::Stack;

const TOKEN: &str = "stack-gitlab-token-0123";
const SHA: &str = "abcdefabcdefabcdefabcdefabcdefabcdefabcd";

fn post(stack: &Stack, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Value) {
    let (status, body) = support::ci::http(stack.webhook, "POST", path, headers, body);
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_forge_events_become_ci_jobs_on_the_stack_as_it_ships() {
    // No runner: the jobs stay on their queue to be looked at.
    let stack = Stack::up(&["--workers", "0", "--runners", "0"]);
    assert!(
        stack
            .log()
            .contains(&format!("http://{}/hooks/<project>", stack.webhook)),
        "up prints where forges post:\n{}",
        stack.log()
    );
    let mr = json!({
        "object_kind": "merge_request",
        "user": {"username": "dev1"},
        "project": {"path_with_namespace": "av/monorepo", "git_http_url": "https://forge/av/monorepo.git"},
        "object_attributes": {"iid": 3, "action": "open", "source_branch": "feat", "target_branch": "main", "last_commit": {"id": SHA}},
        "labels": [{"title": "priority::release"}],
    })
    .to_string();
    let headers = [
        ("X-Gitlab-Token", TOKEN),
        ("X-Gitlab-Event", "Merge Request Hook"),
        ("Idempotency-Key", "stack-1"),
    ];
    // No project yet: nothing to post to.
    assert_eq!(
        post(&stack, "/hooks/av/monorepo", &headers, mr.as_bytes()).0,
        404
    );

    // An operator adds the project while the stack runs; the service picks it up.
    let dir = stack.dir.path().join("data/webhook");
    let secret = dir.join("monorepo.secret");
    std::fs::write(&secret, TOKEN).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(
        dir.join("projects.toml"),
        "[[project]]\nname = \"av/monorepo\"\nforge = \"gitlab\"\nsecret_file = \"monorepo.secret\"\nlabels = { \"priority::release\" = \"release\" }\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        let (status, body) = post(&stack, "/hooks/av/monorepo", &headers, mr.as_bytes());
        if status != 404 || Instant::now() > deadline {
            break (status, body);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(status, 201, "{body}");
    let jobs = body["jobs"].as_array().unwrap().clone();
    assert_eq!(jobs.len(), 2, "build and test by default: {body}");
    assert!(jobs.iter().all(|j| j["lane"] == "release"), "{body}");
    // A wrong token and a replay make nothing more.
    let wrong = [
        ("X-Gitlab-Token", "not-the-token-000000"),
        headers[1],
        headers[2],
    ];
    assert_eq!(
        post(&stack, "/hooks/av/monorepo", &wrong, mr.as_bytes()).0,
        401
    );
    let (status, again) = post(&stack, "/hooks/av/monorepo", &headers, mr.as_bytes());
    assert_eq!((status, &again["duplicate"]), (200, &json!(true)));

    // The jobs are on the release lane's queue, written by the webhook's own bus user.
    let admin = stack.bus_as("admin").await;
    let mut stream = admin.ensure_stream(ci::jobs_stream_config()).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 2);
    let last = stream
        .get_last_raw_message_by_subject(ci::run(Lane::Release).as_str())
        .await
        .unwrap();
    let job: CiJob = motorpool_messages::codec::decode(&last.payload).unwrap();
    assert_eq!(job.commit, SHA);
    assert_eq!(job.project, "av/monorepo");
    assert!(
        !job.trusted,
        "a merge request's job may not write the action cache"
    );

    // Nobody else may queue CI work: a shard's and the operator's credentials are refused.
    for user in ["cas-0", "operator"] {
        let bus = stack.bus_as(user).await;
        let forged = CiJob {
            job_id: "f".repeat(32),
            trusted: true,
            ..job.clone()
        };
        assert!(
            bus.enqueue(&ci::run(Lane::Release), &forged).await.is_err(),
            "{user} queued a CI job"
        );
    }
    assert_eq!(stream.info().await.unwrap().state.messages, 2);
    let violations = stack.bus_violations();
    assert!(
        violations.is_empty(),
        "the stack's own services stay within their permissions: {violations:?}"
    );
}
