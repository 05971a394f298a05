//! The build-event view with the real Bazel 4.2.3: a build and test run on `motorpool up`
//! streams its events to the gateway (`--bes_backend`), Bazel prints the invocation's link, and
//! the page and its JSON twin show every target and test, the failing test's log from the CAS,
//! and one timeline bar for every action the platform ran, joined with the platform's own
//! record of where it ran and how long each stage took.

mod support;

use bazel_bep::types::build_event_stream as bep;
use googleapis_tonic_google_devtools_build_v1::google::devtools::build::v1 as bes;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use support::Stack;
use support::bes::{bazel_event, client, publish, request};
use support::browser::Browser;
use support::ci::{http, remote_processes};
use support::workspace::{Bazel, Workspace};

const INVOCATION: &str = "5d1e4b5e-8c1f-4e0a-9d7e-3b2a1c0f9e11";

/// `GET path` on the HTTP port at `addr` with `key`.
fn get(addr: std::net::SocketAddr, key: &str, path: &str) -> (u16, String) {
    let auth = format!("Bearer {key}");
    http(addr, "GET", path, &[("Authorization", auth.as_str())], b"")
}

fn json(addr: std::net::SocketAddr, key: &str, path: &str) -> Value {
    let (status, body) = get(addr, key, path);
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn bazel_streams_its_build_and_the_invocation_page_shows_every_target_test_and_action() {
    support::require_bazel();
    let dir = tempfile::tempdir().unwrap();
    let ws = Workspace::generate(dir.path(), 4);
    // One test that fails, with something to say.
    let broken = ws.root.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(
        broken.join("BUILD"),
        "sh_test(name = \"broken_test\", srcs = [\"broken_test.sh\"])\n",
    )
    .unwrap();
    let script = broken.join("broken_test.sh");
    std::fs::write(&script, "#!/bin/sh\necho 'expected 42, got 41'\nexit 1\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();

    let stack = Stack::up(&["--workers", "2", "--shards", "0"]);
    let _log = support::LogOnPanic(&stack);
    let bazel = Bazel::new(&ws, &dir.path().join("root"));
    let flags = vec![
        "//...".to_string(),
        format!("--remote_executor=grpc://{}", stack.grpc),
        format!("--bes_backend=grpc://{}", stack.grpc),
        format!("--bes_results_url=http://{}/invocation/", stack.http),
        format!("--invocation_id={INVOCATION}"),
        "--remote_instance_name=ci".to_string(),
        "--spawn_strategy=remote".to_string(),
        "--jobs=8".to_string(),
        "--build_metadata=BRANCH_NAME=feature/bes".to_string(),
        // Bazel's own timing profile, uploaded to the CAS and named in its build tool logs.
        "--experimental_generate_json_trace_profile".to_string(),
        stack.bazel_auth(&stack.keys.ci),
    ];
    let run = bazel.run_expecting("test", &flags, 3);
    let err = run.stderr();
    assert!(
        err.contains(&format!(
            "Streaming build results to: http://{}/invocation/{INVOCATION}",
            stack.http
        )),
        "Bazel prints the invocation's link:\n{err}"
    );
    let remote = remote_processes(&err);
    assert!(remote >= 10, "actions ran remotely: {remote}\n{err}");

    // The JSON twin, as the key that built it sees it.
    let inv = json(
        stack.http,
        &stack.keys.ci,
        &format!("/api/v1/invocations/{INVOCATION}"),
    );
    let s = &inv["summary"];
    assert_eq!(s["status"], "tests_failed", "{s}");
    assert_eq!(s["command"], "test");
    assert_eq!(s["branch"], "feature/bes");
    assert_eq!(
        (s["tests"].as_u64(), s["tests_failed"].as_u64()),
        (Some(5), Some(1)),
        "{s}"
    );
    assert!(s["finished_ms"].as_u64().unwrap() >= s["started_ms"].as_u64().unwrap());
    let targets = inv["targets"].as_array().unwrap();
    let labels: Vec<&str> = targets.iter().filter_map(|t| t["label"].as_str()).collect();
    for i in 0..4 {
        assert!(
            labels.contains(&format!("//lib{i}:lib{i}").as_str()),
            "{labels:?}"
        );
        assert!(
            labels.contains(&format!("//lib{i}:lib{i}_test").as_str()),
            "{labels:?}"
        );
    }
    let failing = targets
        .iter()
        .find(|t| t["label"] == "//broken:broken_test")
        .expect("the failing test is listed");
    assert_eq!(failing["test"]["status"], "failed", "{failing}");
    // Every action the platform ran is one bar, with where it ran and its stages' times.
    let actions = inv["actions"].as_array().unwrap();
    let executed = actions.iter().filter(|a| a["cached"] == false).count() as u64;
    assert_eq!(executed, remote, "one record per remotely executed action");
    for a in actions.iter().filter(|a| a["cached"] == false) {
        assert!(a["worker"].as_str().is_some_and(|w| !w.is_empty()), "{a}");
        assert!(
            a["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{a}"
        );
        assert!(
            a["exec_end_ms"].as_u64() >= a["exec_start_ms"].as_u64(),
            "{a}"
        );
        assert!(a["exec_start_ms"].as_u64().unwrap() > 0, "{a}");
    }

    // What each action did, read off its command as Bazel's messages say it.
    for kind in [
        "Compiling lib0/lib0.cc",
        "Linking lib0/liblib0.a",
        "Testing lib0/lib0_test",
    ] {
        assert!(
            actions.iter().any(|a| a["description"] == kind),
            "{kind} among {:?}",
            actions
                .iter()
                .map(|a| &a["description"])
                .collect::<Vec<_>>()
        );
    }

    // Bazel's profile, read from the CAS: every action Bazel processed; those the platform ran
    // are matched to it.
    // Bazel names a test by its label, the platform by its path: `//lib:a_test`, `lib/a_test`.
    let path = |name: &str| name.replace("//", "").replace(':', "/");
    let profiled = inv["profile"]["actions"]
        .as_array()
        .expect("Bazel's profile");
    let on_platform = profiled
        .iter()
        .filter(|p| {
            actions.iter().any(|a| {
                a["cached"] == false
                    && path(a["description"].as_str().unwrap()) == path(p["name"].as_str().unwrap())
            })
        })
        .count();
    assert!(
        on_platform >= 10 && profiled.len() > on_platform,
        "{on_platform} of {} profiled actions ran on the platform",
        profiled.len()
    );

    // Bazel's critical path, its steps that ran here matched to their bars.
    let path = inv["critical_path"].as_array().unwrap();
    assert!(!path.is_empty(), "{inv}");
    let matched: Vec<&Value> = path.iter().filter(|s| s["operation"] != "").collect();
    assert!(
        matched
            .iter()
            .any(|s| s["description"].as_str().unwrap().starts_with("Testing //")),
        "the test on the critical path ran here: {path:?}"
    );

    // The page: the same targets, the timeline's bars, and the log reachable from the page.
    let (status, page) = get(
        stack.http,
        &stack.keys.ci,
        &format!("/invocation/{INVOCATION}"),
    );
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("//broken:broken_test") && page.contains("tests_failed"));
    assert_eq!(
        page.matches("<g class=\"step").count(),
        profiled.len(),
        "Bazel's timeline: one bar per action it processed"
    );
    assert_eq!(page.matches("<g class=\"step remote").count(), on_platform);
    // The key Bazel sent as a header is on its command line: never on a page, nor kept.
    let key = stack.keys.ci.as_str();
    assert!(!page.contains(key), "the API key is on the page");
    assert!(!inv.to_string().contains(key), "the API key is in the JSON");
    assert!(
        page.contains("--remote_header=authorization=&lt;redacted&gt;"),
        "{page}"
    );
    let kept = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let admin = stack.bus_as("admin").await;
        let stream = admin
            .jetstream()
            .get_stream(motorpool_bus::subjects::bes::STREAM)
            .await
            .unwrap();
        let mut kept = Vec::new();
        let mut seq = 1;
        while let Ok(m) = stream.get_raw_message(seq).await {
            kept.extend_from_slice(&m.payload);
            seq += 1;
        }
        kept
    });
    assert!(
        kept.len() > 10_000,
        "the events are kept: {} bytes",
        kept.len()
    );
    if let Some(i) = kept.windows(key.len()).position(|w| w == key.as_bytes()) {
        panic!(
            "the API key is in the kept events: {}",
            String::from_utf8_lossy(&kept[i.saturating_sub(200)..i])
        );
    }
    assert_eq!(
        page.matches("<g class=\"action critical\"").count(),
        matched.len(),
        "the critical path is outlined on the timeline"
    );
    assert_eq!(
        page.matches("<g class=\"action").count(),
        actions.len(),
        "one bar per action"
    );
    let failing_log = failing["test"]["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o[0] == "test.log")
        .expect("the failing test's log")[1]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!(
        "/invocation/{INVOCATION}/output?uri={}",
        failing_log
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            })
            .collect::<String>()
    );
    assert!(
        page.contains(&format!("href=\"{path}\">test.log</a>")),
        "the failing test's log is linked from the page"
    );
    let (status, log) = get(stack.http, &stack.keys.ci, &path);
    assert_eq!(status, 200, "{log}");
    assert!(log.contains("expected 42, got 41"), "{log}");

    // The list shows it to its key; another (non-admin) key sees neither it nor its page.
    let list = json(
        stack.http,
        &stack.keys.ci,
        "/api/v1/invocations?command=test",
    );
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|i| i["invocation_id"] == INVOCATION),
        "{list}"
    );
    let theirs = json(stack.http, &stack.keys.developer, "/api/v1/invocations");
    assert!(theirs.as_array().unwrap().is_empty(), "{theirs}");
    let (status, _) = get(
        stack.http,
        &stack.keys.developer,
        &format!("/api/v1/invocations/{INVOCATION}"),
    );
    assert_eq!(status, 404);
    let (status, _) = http(stack.http, "GET", "/api/v1/invocations", &[], b"");
    assert_eq!(status, 401, "no key, no list");

    // In a real browser, with JavaScript off, as a developer would: the key given once.
    let browser = Browser::start();
    let base = format!("http://{}", stack.http);
    browser.go(&format!("{base}/invocations"));
    assert!(browser.url().ends_with("/login"), "{}", browser.url());
    browser.login(&base, &stack.keys.ci);
    let text = browser.text();
    assert!(
        text.contains("tests_failed") && text.contains("//..."),
        "{text}"
    );
    browser.screenshot("invocations");
    browser.click(&format!("a[href='/invocation/{INVOCATION}']"));
    assert_eq!(
        browser.find_all("svg.timeline g.action").len(),
        actions.len(),
        "one bar per action, drawn"
    );
    assert_eq!(
        browser.find_all("svg.timeline g.action.critical").len(),
        matched.len()
    );
    let text = browser.text();
    assert!(
        text.contains("//broken:broken_test") && text.contains("Critical path"),
        "{text}"
    );
    browser.screenshot("invocation");
    browser.go(&format!("{base}/invocation/{INVOCATION}#timeline"));
    browser.screenshot("invocation-timeline");
    browser.go(&format!("{base}/invocation/{INVOCATION}#profile"));
    assert_eq!(browser.find_all("svg.profile g.step").len(), profiled.len());
    browser.screenshot("invocation-profile");
    browser.click("a[href*='/output?uri=']");
    assert!(
        browser.text().contains("expected 42, got 41"),
        "the test log, a click away"
    );
    browser.go(&format!("{base}/queues"));
    assert_eq!(browser.find_all("tr.worker").len(), 2, "{}", browser.text());
    browser.screenshot("queues");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_and_hostile_event_streams_get_a_clear_status_and_lose_nothing_else() {
    let stack = Stack::up_with_env(
        &["--workers", "0", "--shards", "1"],
        &[
            ("MOTORPOOL_GATEWAY_BES__MAX_EVENTS_PER_INVOCATION", "6"),
            ("MOTORPOOL_GATEWAY_BES__MAX_INVOCATIONS", "3"),
            ("MOTORPOOL_GATEWAY_BES__SWEEP_INTERVAL_S", "1"),
        ],
    );
    let _log = support::LogOnPanic(&stack);
    let mut ci = client(&stack, &stack.keys.ci).await;
    let mut dev = client(&stack, &stack.keys.developer).await;
    let pass = |l: &str| bazel_event(l, bep::TestStatus::Passed);
    let inv = "0b7e2f3a-1111-4c8e-9a40-5d6c7b8a9f00";

    // In order, with Bazel's retry of events 2 and 3 on a new stream: each kept once.
    let (acks, end) = publish(
        &mut ci,
        (1..=3)
            .map(|i| request(inv, i, pass(&format!("//t:{i}"))))
            .collect(),
    )
    .await;
    assert_eq!((acks, end.is_ok()), (vec![1, 2, 3], true));
    let (acks, end) = publish(
        &mut ci,
        (2..=4)
            .map(|i| request(inv, i, pass(&format!("//t:{i}"))))
            .collect(),
    )
    .await;
    assert_eq!(
        (acks, end.is_ok()),
        (vec![2, 3, 4], true),
        "duplicates are acknowledged again"
    );

    // Out of order: what came before is acknowledged, then FAILED_PRECONDITION.
    let (acks, end) = publish(
        &mut ci,
        vec![
            request(inv, 5, pass("//t:5")),
            request(inv, 7, pass("//t:7")),
        ],
    )
    .await;
    assert_eq!(acks, vec![5]);
    let status = end.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("send 6 first"), "{status:?}");

    // Malformed: no stream id, a hostile invocation id, bytes that are no Bazel event.
    let mut no_stream = request(inv, 6, pass("//t:6"));
    no_stream.ordered_build_event.as_mut().unwrap().stream_id = None;
    let garbage = bes::BuildEvent {
        event_time: None,
        event: Some(bes::build_event::Event::BazelEvent(prost_types::Any {
            type_url: "type.googleapis.com/build_event_stream.BuildEvent".into(),
            value: vec![0xff; 40],
        })),
    };
    for (what, req) in [
        ("no stream id", no_stream),
        (
            "an invocation id that climbs",
            request("../../etc", 1, pass("//x")),
        ),
        ("an event that does not decode", request(inv, 6, garbage)),
    ] {
        let (acks, end) = publish(&mut ci, vec![req]).await;
        let status = end.expect_err(what);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{what}: {status:?}"
        );
        assert!(acks.is_empty(), "{what}");
    }
    // Another key cannot add to this invocation.
    let (_, end) = publish(&mut dev, vec![request(inv, 6, pass("//t:6"))]).await;
    assert_eq!(end.unwrap_err().code(), tonic::Code::PermissionDenied);

    // Over the cap (6 events): acknowledged, not kept, and the invocation says so.
    let (acks, end) = publish(
        &mut ci,
        (6..=9)
            .map(|i| {
                request(
                    inv,
                    i,
                    bazel_event(&format!("//t:{i}"), bep::TestStatus::Failed),
                )
            })
            .collect(),
    )
    .await;
    assert_eq!((acks, end.is_ok()), (vec![6, 7, 8, 9], true));

    let (http_addr, key) = (stack.http, stack.keys.ci.clone());
    let k = key.clone();
    let inv_json = tokio::task::spawn_blocking(move || {
        json(http_addr, &k, &format!("/api/v1/invocations/{inv}"))
    })
    .await
    .unwrap();
    let s = &inv_json["summary"];
    assert_eq!(s["truncated"], true, "{s}");
    assert_eq!(
        s["status"], "running",
        "no build finished yet: it shows as running"
    );
    assert_eq!(s["events"], 9, "{s}");
    // Nine test summaries were counted, the six kept are listed once each.
    assert_eq!(
        (s["tests"].as_u64(), s["tests_failed"].as_u64()),
        (Some(9), Some(4)),
        "{s}"
    );
    let listed: Vec<&str> = inv_json["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["label"].as_str())
        .collect();
    assert_eq!(
        listed,
        ["//t:1", "//t:2", "//t:3", "//t:4", "//t:5", "//t:6"]
    );

    // Still serving, and the count bound (3) holds: the oldest invocations go whole.
    for n in 2..=5 {
        let id = format!("0b7e2f3a-{n:04}-4c8e-9a40-5d6c7b8a9f00");
        let (acks, end) = publish(&mut ci, vec![request(&id, 1, pass("//u"))]).await;
        assert_eq!((acks, end.is_ok()), (vec![1], true));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let kept = loop {
        let k = key.clone();
        let list = tokio::task::spawn_blocking(move || json(http_addr, &k, "/api/v1/invocations"))
            .await
            .unwrap();
        let ids: Vec<String> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["invocation_id"].as_str().unwrap().to_string())
            .collect();
        if ids.len() == 3 || std::time::Instant::now() > deadline {
            break ids;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(
        kept,
        (3..=5)
            .rev()
            .map(|n| format!("0b7e2f3a-{n:04}-4c8e-9a40-5d6c7b8a9f00"))
            .collect::<Vec<_>>(),
        "the three newest are kept"
    );
    let (status, _) = tokio::task::spawn_blocking(move || {
        get(http_addr, &key, &format!("/api/v1/invocations/{inv}"))
    })
    .await
    .unwrap();
    assert_eq!(status, 404, "the oldest is gone");
    let admin = stack.bus_as("admin").await;
    let mut stream = admin
        .jetstream()
        .get_stream(motorpool_bus::subjects::bes::STREAM)
        .await
        .unwrap();
    let subject = motorpool_bus::subjects::bes::event(inv);
    let left = stream.info().await.unwrap().state.messages;
    assert!(
        stream
            .get_last_raw_message_by_subject(subject.as_str())
            .await
            .is_err(),
        "its events are gone too ({left} messages left)"
    );
}

/// A TCP proxy to `upstream` that cuts its first connection once `cut_after` bytes went from the
/// client to the server; later connections pass whole. Returns its address and how many
/// connections it took.
fn cutting_proxy(
    upstream: std::net::SocketAddr,
    cut_after: usize,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = std::sync::Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let n = count.fetch_add(1, Ordering::SeqCst);
            let Ok(server) = std::net::TcpStream::connect(upstream) else {
                continue;
            };
            let limit = if n == 0 { cut_after } else { usize::MAX };
            let (mut c_read, mut s_write) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (mut s_read, mut c_write) = (server, client);
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                let mut sent = 0usize;
                loop {
                    let n = match c_read.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if sent + n > limit {
                        // Cut mid-stream: both ways, at once.
                        let _ = c_read.shutdown(std::net::Shutdown::Both);
                        let _ = s_write.shutdown(std::net::Shutdown::Both);
                        break;
                    }
                    sent += n;
                    if s_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = s_write.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s_read, &mut c_write);
                let _ = c_write.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (addr, connections)
}

#[test]
fn bazel_resending_over_a_cut_connection_makes_one_complete_invocation() {
    support::require_bazel();
    let dir = tempfile::tempdir().unwrap();
    let ws = Workspace::generate(dir.path(), 3);
    let stack = Stack::up(&["--workers", "2", "--shards", "0"]);
    let _log = support::LogOnPanic(&stack);
    // Build events go through a proxy that breaks the first connection mid-build.
    let (proxy, connections) = cutting_proxy(stack.grpc, 12_000);
    let invocation = "7a3c2b1d-0e4f-4a5b-8c6d-9e0f1a2b3c4d";
    let bazel = Bazel::new(&ws, &dir.path().join("root"));
    let run = bazel.run(
        "test",
        &[
            "//...".to_string(),
            format!("--remote_executor=grpc://{}", stack.grpc),
            format!("--bes_backend=grpc://{proxy}"),
            format!("--invocation_id={invocation}"),
            "--spawn_strategy=remote".to_string(),
            stack.bazel_auth(&stack.keys.ci),
        ],
    );
    let connections = connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        connections >= 2,
        "the first connection was cut and Bazel came back: {connections}\n{}",
        run.stderr()
    );
    let inv = json(
        stack.http,
        &stack.keys.ci,
        &format!("/api/v1/invocations/{invocation}"),
    );
    let s = &inv["summary"];
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(s["tests"], 3, "each test counted once: {s}");
    assert!(s["finished_ms"].as_u64().unwrap() > 0, "{s}");
    // Each event kept once.
    let kept = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let admin = stack.bus_as("admin").await;
        let stream = admin
            .jetstream()
            .get_stream(motorpool_bus::subjects::bes::STREAM)
            .await
            .unwrap();
        let subject = motorpool_bus::subjects::bes::event(invocation);
        let mut kept = Vec::new();
        let mut seq = 1;
        while let Ok(m) = stream.get_raw_message(seq).await {
            if m.subject.as_str() == subject.as_str() {
                let e: motorpool_messages::bes::BesEvent =
                    motorpool_messages::codec::decode(&m.payload).unwrap();
                kept.push((e.component, e.sequence));
            }
            seq += 1;
        }
        kept
    });
    let mut unique = kept.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), kept.len(), "an event kept twice");
    assert_eq!(kept.len() as u64, s["events"].as_u64().unwrap(), "{s}");
    let tool: Vec<i64> = unique
        .iter()
        .filter(|(c, _)| *c == 3)
        .map(|(_, q)| *q)
        .collect();
    assert_eq!(
        tool,
        (1..=tool.len() as i64).collect::<Vec<_>>(),
        "no event missing"
    );
}
