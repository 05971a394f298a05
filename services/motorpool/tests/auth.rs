//! Identity at the gateway, against `motorpool up` as it ships (keys made at its first start):
//! who may write the action cache, whose operations a caller sees, how high its lane goes, and
//! keys rotating without a restart.

mod support;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::longrunning as lr;
use futures::StreamExt;
use std::time::{Duration, Instant};
use support::exec::{ExecClient, Spec};
use support::*;
use tonic::Code;

/// A result told apart from others by its exit code (it needs no blob in the CAS).
fn result(exit_code: i32) -> re::ActionResult {
    re::ActionResult {
        exit_code,
        ..Default::default()
    }
}

async fn ac(stack: &Stack, key: &str) -> re::action_cache_client::ActionCacheClient<AuthChannel> {
    re::action_cache_client::ActionCacheClient::new(stack.channel_as(key).await)
}

fn update(
    action: &motorpool_messages::BlobDigest,
    r: re::ActionResult,
) -> re::UpdateActionResultRequest {
    re::UpdateActionResultRequest {
        instance_name: "prod".into(),
        action_digest: Some(proto(action)),
        action_result: Some(r),
        results_cache_policy: None,
        digest_function: 0,
    }
}

fn get(action: &motorpool_messages::BlobDigest) -> re::GetActionResultRequest {
    re::GetActionResultRequest {
        instance_name: "prod".into(),
        action_digest: Some(proto(action)),
        inline_stdout: true,
        inline_stderr: false,
        inline_output_files: vec![],
        digest_function: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_keys_with_the_role_write_the_action_cache_and_the_good_entry_stays() {
    let stack = Stack::up(&["--workers", "0"]);
    let action = sha(b"an action whose result CI wrote");
    // CI writes the good entry.
    ac(&stack, &stack.keys.ci)
        .await
        .update_action_result(update(&action, result(7)))
        .await
        .unwrap();
    // No key, a wrong key, and a developer's key (no write-ac) are refused.
    for (key, code) in [
        ("", Code::Unauthenticated),
        ("mp_not-a-key", Code::Unauthenticated),
        (stack.keys.developer.as_str(), Code::PermissionDenied),
    ] {
        let e = ac(&stack, key)
            .await
            .update_action_result(update(&action, result(66)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{key:?}: {e:?}");
    }
    // Reads: the developer may; an anonymous caller may not (anonymous is off as it ships).
    let got = ac(&stack, &stack.keys.developer)
        .await
        .get_action_result(get(&action))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.exit_code, 7, "the good entry stays");
    let e = ac(&stack, "")
        .await
        .get_action_result(get(&action))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operations_belong_to_their_caller_and_a_header_cannot_raise_the_lane() {
    let stack = Stack::up(&["--workers", "1"]);
    let mut dev = ExecClient::connect_as(&stack, "", &stack.keys.developer).await;
    // The developer's key rides at most the build lane: asking for release is capped.
    let spec = Spec::sh("sleep 1; echo mine");
    let d = dev.upload(&spec).await;
    let mut s = dev
        .start(&d, &[("x-motorpool-lane", "release")], true)
        .await
        .unwrap();
    let name = s.next().await.unwrap().unwrap().name;
    let metrics = stack.http_get("/metrics");
    assert!(
        metrics.contains("motorpool_gateway_executions_total{lane=\"build\",outcome=\"queued\"} 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("executions_total{lane=\"release\""),
        "{metrics}"
    );

    // CI's key sees none of the developer's operations; the admin sees them.
    let mut ci = ExecClient::connect_as(&stack, "", &stack.keys.ci).await;
    let listed = ci
        .ops
        .list_operations(lr::ListOperationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.operations.iter().all(|o| o.name != name),
        "{listed:?}"
    );
    for e in [
        ci.ops
            .get_operation(lr::GetOperationRequest { name: name.clone() })
            .await
            .unwrap_err(),
        ci.ops
            .cancel_operation(lr::CancelOperationRequest { name: name.clone() })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
    }
    let mut admin = ExecClient::connect(&stack, "").await;
    let listed = admin
        .ops
        .list_operations(lr::ListOperationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.operations.iter().any(|o| o.name == name));
    // The developer sees its own, to the end.
    let op = dev
        .ops
        .get_operation(lr::GetOperationRequest { name: name.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(op.name, name);
    while let Some(Ok(_)) = s.next().await {}
}

/// Waits (10 s at most) until a GetActionResult with `key` fails with `code`.
async fn until(
    stack: &Stack,
    key: &str,
    action: &motorpool_messages::BlobDigest,
    code: Code,
    what: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ac(stack, key).await.get_action_result(get(action)).await {
            Err(e) if e.code() == code => return,
            other => assert!(Instant::now() < deadline, "{what}: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_added_scoped_and_revoked_without_a_restart() {
    let stack = Stack::up(&["--workers", "0"]);
    let keys_file = stack.dir.path().join("data/keys.toml");
    let motorpool = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_motorpool"))
            .arg("keys")
            .args(args)
            .arg("--keys-file")
            .arg(&keys_file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let key = motorpool(&[
        "add",
        "--id",
        "team-a",
        "--roles",
        "read",
        "--instances",
        "prod",
    ]);
    assert!(key.starts_with("mp_"), "{key}");
    assert!(
        !std::fs::read_to_string(&keys_file).unwrap().contains(&key),
        "only the hash is kept"
    );
    let action = sha(b"nothing here");
    // Within a second or two the gateway knows the new key, for its instance only.
    until(
        &stack,
        &key,
        &action,
        Code::NotFound,
        "the new key never worked",
    )
    .await;
    let mut other = get(&action);
    other.instance_name = "test".into();
    let e = ac(&stack, &key)
        .await
        .get_action_result(other)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(motorpool(&["list"]).contains("team-a"));
    // Revoked: refused from the next reload on.
    motorpool(&["remove", "--id", "team-a"]);
    until(
        &stack,
        &key,
        &action,
        Code::Unauthenticated,
        "the removed key still works",
    )
    .await;
}
