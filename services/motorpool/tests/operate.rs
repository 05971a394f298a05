//! Operating the stack with the tools operators run: a real Prometheus scrapes every service
//! `motorpool up` lists and loads the platform's alert rules (checked and unit-tested by
//! promtool); an alert the platform raises reaches people once, through a real Alertmanager to
//! its webhook receiver and straight to a chat webhook.

mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::ci::recording_forge;
use support::{Stack, free_addr, which};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/prometheus")
}

/// A child process killed when the test ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET path`: the body of a 2xx answer, or `None` (refused, not up yet, an error status).
fn get(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    ureq::get(&format!("http://{addr}{path}"))
        .call()
        .ok()?
        .body_mut()
        .read_to_string()
        .ok()
}

fn get_json(addr: std::net::SocketAddr, path: &str) -> Value {
    let body = get(addr, path).unwrap_or_else(|| panic!("GET {path}"));
    serde_json::from_str(&body).unwrap()
}

/// Polls `f` every 250 ms until it answers, for at most `secs`.
fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn the_alert_rules_pass_promtool_and_prometheus_scrapes_every_service() {
    let promtool = which("promtool").expect("promtool (scripts/setup --test installs it)");
    for args in [
        vec!["check", "rules", "motorpool.rules.yml"],
        vec!["test", "rules", "motorpool.rules.test.yml"],
    ] {
        let out = Command::new(&promtool)
            .current_dir(deploy())
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let stack = Stack::up(&["--workers", "1", "--shards", "1", "--no-sandbox"]);
    let _log = support::LogOnPanic(&stack);
    let dir = stack.dir.path().join("data/prometheus");
    let targets: Value =
        serde_json::from_slice(&std::fs::read(dir.join("targets.json")).unwrap()).unwrap();
    let listed: Vec<(String, std::net::SocketAddr)> = targets
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["labels"]["service"].as_str().unwrap().to_string(),
                t["targets"][0].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect();
    let services: Vec<&str> = listed.iter().map(|(s, _)| s.as_str()).collect();
    for s in [
        "cas-0",
        "scheduler",
        "reindexer",
        "mapping",
        "prelabel",
        "annotate",
        "worker-0",
        "gateway",
        "webhook",
    ] {
        assert!(services.contains(&s), "{s} is not listed: {services:?}");
    }
    // Each answers /healthz and /metrics on its own port.
    for (service, addr) in &listed {
        wait_for(30, &format!("{service}'s /healthz"), || {
            get(*addr, "/healthz")
        });
        assert!(get(*addr, "/metrics").is_some(), "{service}'s /metrics");
    }
    // Metrics come with their help text: the scheduler's and a worker's, once recorded.
    for (service, metric) in [
        ("scheduler", "motorpool_scheduler_active"),
        ("worker-0", "motorpool_bus_sent_bytes_total"),
    ] {
        let addr = listed.iter().find(|(s, _)| s == service).unwrap().1;
        let text = wait_for(30, &format!("{service}'s {metric}"), || {
            get(addr, "/metrics").filter(|t| t.contains(&format!("\n{metric}")))
        });
        assert!(
            text.contains(&format!("# HELP {metric} ")),
            "{service} serves {metric} without its help text:\n{text}"
        );
    }

    // A real Prometheus with the configuration `motorpool up` wrote.
    let web = free_addr();
    let tsdb = tempfile::tempdir().unwrap();
    let _prometheus = Killed(
        Command::new(which("prometheus").expect("prometheus (scripts/setup --test)"))
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!("--storage.tsdb.path={}", tsdb.path().display()))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let up = wait_for(60, "every target up in Prometheus", || {
        let v: Value = serde_json::from_str(&get(web, "/api/v1/targets")?).ok()?;
        let active = v["data"]["activeTargets"].as_array()?.clone();
        (active.len() == listed.len() && active.iter().all(|t| t["health"] == "up"))
            .then_some(active)
    });
    assert!(
        up.iter().any(|t| t["labels"]["service"] == "scheduler"),
        "{up:?}"
    );
    let query = |q: &str| {
        get_json(web, &format!("/api/v1/query?query={q}"))["data"]["result"]
            .as_array()
            .unwrap()
            .clone()
    };
    let workers = wait_for(30, "the scheduler's worker gauge scraped", || {
        query("motorpool_scheduler_workers").first().cloned()
    });
    assert_eq!(workers["value"][1], "1", "{workers}");
    assert_eq!(workers["metric"]["service"], "scheduler");
    let rules = get_json(web, "/api/v1/rules");
    let loaded = rules["data"]["groups"][0]["rules"].as_array().unwrap();
    let written = include_str!("../../../deploy/prometheus/motorpool.rules.yml")
        .matches("- alert:")
        .count();
    assert_eq!(loaded.len(), written, "every rule is loaded: {rules}");
    assert!(
        loaded.iter().all(|r| r["health"] == "ok"),
        "every rule evaluates: {rules}"
    );
}

#[test]
fn a_platform_alert_reaches_people_once_through_alertmanager_and_chat() {
    let (receiver, notified) = recording_forge();
    let (chat, chatted) = recording_forge();
    // A real Alertmanager whose one receiver is a recording webhook.
    let am = free_addr();
    let am_dir = tempfile::tempdir().unwrap();
    let config = am_dir.path().join("alertmanager.yml");
    std::fs::write(
        &config,
        format!(
            "route:\n  receiver: people\n  group_by: [alertname, subject]\n  group_wait: 1s\n  group_interval: 1m\n  repeat_interval: 4h\n\
             receivers:\n  - name: people\n    webhook_configs:\n      - url: http://{receiver}/alerts\n        send_resolved: false\n"
        ),
    )
    .unwrap();
    let _alertmanager = Killed(
        Command::new(
            which("prometheus-alertmanager")
                .expect("prometheus-alertmanager (scripts/setup --test)"),
        )
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.path={}", am_dir.path().display()))
        .arg(format!("--web.listen-address={am}"))
        .arg("--cluster.listen-address=")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    wait_for(30, "Alertmanager ready", || get(am, "/-/ready"));

    let stack = Stack::up(&[
        "--workers",
        "2",
        "--no-sandbox",
        "--alertmanager-url",
        &format!("http://{am}"),
        "--slack-webhook-url",
        &format!("http://{chat}/slack"),
    ]);
    let _log = support::LogOnPanic(&stack);
    wait_for(30, "two workers", || {
        stack
            .http_get("/api/v1/queues")
            .contains("\"workers\":2")
            .then_some(())
    });
    // A worker stops answering (SIGSTOP: alive, so nothing restarts it): the scheduler raises
    // `worker_lost` once it misses its heartbeats.
    let pid = stack.child_pid(&["worker", "worker-1"]).expect("worker-1");
    let stopped = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::signal::kill(stopped, nix::sys::signal::Signal::SIGSTOP).unwrap();
    struct Resume(nix::unistd::Pid);
    impl Drop for Resume {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
        }
    }
    let _resume = Resume(stopped);

    let note = wait_for(60, "Alertmanager's notification", || {
        notified.lock().unwrap().first().cloned()
    });
    let (path, _, body) = note;
    assert_eq!(path, "/alerts");
    let alerts = body["alerts"].as_array().unwrap();
    assert_eq!(alerts.len(), 1, "{body}");
    assert_eq!(alerts[0]["labels"]["alertname"], "MotorpoolWorkerLost");
    assert_eq!(alerts[0]["labels"]["subject"], "worker-1");
    assert_eq!(alerts[0]["labels"]["source"], "scheduler");
    assert_eq!(alerts[0]["status"], "firing");
    wait_for(30, "the chat message", || {
        (!chatted.lock().unwrap().is_empty()).then_some(())
    });
    // The same alert raised again (the scheduler's own retry, a second relay delivery) is not
    // news: nothing more arrives.
    let scheduler = stack.nkey("scheduler");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let bus = motorpool_bus::Bus::connect_service(
            &stack.nats_url(),
            "test-as-scheduler",
            Some(&scheduler),
            None,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let again = motorpool_messages::exec::Alert {
            kind: "worker_lost".into(),
            source: "scheduler".into(),
            subject_id: "worker-1".into(),
            message: "worker worker-1 sent no heartbeat (again)".into(),
            at_ms: motorpool_messages::now_ms(),
        };
        bus.publish(&motorpool_bus::subjects::ops::alert("worker_lost"), &again)
            .await
            .unwrap();
        bus.flush().await.unwrap();
    });
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(notified.lock().unwrap().len(), 1, "one notification");
    let chats = chatted.lock().unwrap().clone();
    assert_eq!(chats.len(), 1, "one chat message: {chats:?}");
    let text = chats[0].2["text"].as_str().unwrap();
    assert!(
        text.starts_with("[motorpool] worker_lost from scheduler about worker-1"),
        "{text}"
    );
    // The relay counts what it did on its own /metrics.
    let dir = stack.dir.path().join("data/prometheus");
    let targets: Value =
        serde_json::from_slice(&std::fs::read(dir.join("targets.json")).unwrap()).unwrap();
    let relay = targets
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["labels"]["service"] == "alert-relay")
        .expect("the relay is listed")["targets"][0]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let metrics = get(relay, "/metrics").expect("the relay's /metrics");
    assert!(
        metrics
            .contains("motorpool_alert_relay_alerts_total{sink=\"slack\",outcome=\"duplicate\"} 1"),
        "{metrics}"
    );
}

/// The services of a compose file and each one's lines (a flat reading: two-space service
/// names under `services:`, their keys below).
fn compose_services(file: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(file),
    )
    .unwrap_or_else(|e| panic!("{file}: {e}"));
    let services = text
        .split("\nservices:\n")
        .nth(1)
        .expect("a services: section");
    let services = services.split("\nvolumes:").next().unwrap();
    let mut out: Vec<(String, String)> = Vec::new();
    for line in services.lines() {
        if let Some(name) = line
            .strip_prefix("  ")
            .filter(|l| !l.starts_with(' ') && !l.starts_with('#'))
            .and_then(|l| l.strip_suffix(':'))
        {
            out.push((name.to_string(), String::new()));
        } else if let Some((_, body)) = out.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

/// The three-node profile (compose.cluster.yaml on top of compose.yaml): NATS's members share
/// one cluster configuration that nats-server accepts under each member's name, and every
/// service that talks to NATS is given all three members (so it rides a member's loss and
/// creates three replicas), a standby scheduler among them.
#[test]
fn the_compose_cluster_profile_gives_every_service_all_three_members() {
    let base = compose_services("compose.yaml");
    let cluster = compose_services("compose.cluster.yaml");
    let members = "nats://nats:4222,nats://nats-2:4222,nats://nats-3:4222";
    let on_nats: Vec<&str> = base
        .iter()
        .filter(|(_, body)| body.contains("MOTORPOOL_NATS_URL"))
        .map(|(name, _)| name.as_str())
        .collect();
    assert!(on_nats.len() >= 10, "{on_nats:?}");
    for name in on_nats.iter().chain(&["scheduler-2"]) {
        let body = cluster
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b)
            .unwrap_or_else(|| panic!("compose.cluster.yaml does not override {name}"));
        assert!(
            body.contains(&format!("MOTORPOOL_NATS_URL: {members}")),
            "{name} is not given every member: {body}"
        );
    }
    let standby = &cluster.iter().find(|(n, _)| n == "scheduler-2").unwrap().1;
    assert!(standby.contains("--scheduler-id"), "{standby}");
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/nats-cluster.conf");
    for member in ["nats", "nats-2", "nats-3"] {
        let body = &cluster
            .iter()
            .find(|(n, _)| n == member)
            .unwrap_or_else(|| panic!("no {member}"))
            .1;
        let name = body
            .lines()
            .find_map(|l| l.trim().strip_prefix("NATS_SERVER_NAME: "))
            .unwrap_or_else(|| panic!("{member} has no NATS_SERVER_NAME"));
        assert!(
            body.contains("deploy/nats-cluster.conf"),
            "{member}: {body}"
        );
        let out = Command::new(which("nats-server").expect("nats-server (scripts/setup)"))
            .arg("-t")
            .arg("-c")
            .arg(&conf)
            .env("NATS_SERVER_NAME", name)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nats-server rejects {} as {name}: {}",
            conf.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = std::fs::read_to_string(&conf).unwrap();
    for route in [
        "nats-route://nats:6222",
        "nats-route://nats-2:6222",
        "nats-route://nats-3:6222",
    ] {
        assert!(
            text.contains(route),
            "{route} missing from {}",
            conf.display()
        );
    }
}
