//! Fleet images over the bus: a release tag pushed to the forge (a signed webhook delivery)
//! becomes a signed image in the store, a second build (queued with `motorpool image submit
//! --wait`, as a person would) a newer one; a marked drive put into a bay gets both, checked
//! against their signed manifests (the newest boots by default), a foreign drive is refused and
//! untouched, and every state is on the bus.

mod support;

use futures::StreamExt;
use motorpool_bus::{
    Bus, Credentials, NatsServer, NatsServerOptions, Realm, Role, subjects::fleet,
};
use motorpool_config::{FleetConfig, WebhookConfig};
use motorpool_disk_burner::gpt::{Gpt, Guid};
use motorpool_disk_burner::layout::slots;
use motorpool_image_builder::testing::{base_image, git, sample_repo};
use motorpool_messages::fleet::{BuildState, BuildStatus, DriveKind, DriveStatus};
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const DRIVE: u64 = 2 << 30;

fn drive(path: &Path, guid: &str) {
    let tmp = path.with_extension("part");
    let mut f = std::fs::File::create(&tmp).unwrap();
    f.set_len(DRIVE).unwrap();
    Gpt {
        disk_guid: Guid::parse(guid).unwrap(),
        sectors: DRIVE / 512,
        partitions: vec![],
    }
    .write(&mut f)
    .unwrap();
    // Plugged in at once, whole.
    std::fs::rename(tmp, path).unwrap();
}

async fn build_done(bus: &Bus, job_id: &str) -> (String, Vec<String>) {
    let kv = bus.ensure_kv(fleet::builds_config()).await.unwrap();
    let mut w = kv.watch_with_history(job_id).await.unwrap();
    let mut steps = Vec::new();
    loop {
        let e = tokio::time::timeout(Duration::from_secs(120), w.next())
            .await
            .expect("build status")
            .unwrap()
            .unwrap();
        let s: BuildStatus = motorpool_messages::codec::decode(&e.value).unwrap();
        match s.state {
            BuildState::Done { image_id, .. } => return (image_id, steps),
            BuildState::Failed { reason } => panic!("build failed: {reason}"),
            BuildState::Running { step } => steps.push(step),
            BuildState::Queued => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_and_burns_ride_the_bus() {
    let dir = tempfile::tempdir().unwrap();
    base_image(dir.path());
    let repo = sample_repo(dir.path());
    // A bus with users, as a deployment runs it: the builder, the burner and a person's command
    // line each as itself, allowed only their roles' subjects.
    let users = [
        ("webhook", Role::Webhook),
        ("image-builder", Role::ImageBuilder),
        ("flexo-1", Role::Burner("flexo-1".into())),
        ("operator", Role::Operator),
    ];
    let creds: Vec<Credentials> = users.iter().map(|_| Credentials::generate()).collect();
    let mut realm = Realm::default();
    for ((name, role), c) in users.iter().zip(&creds) {
        realm.upsert(name, role.clone(), c.public_key());
    }
    let log = dir.path().join("nats.log");
    let server = NatsServer::start_with(NatsServerOptions {
        realm: Some(realm),
        log_file: Some(log.clone()),
        ..Default::default()
    })
    .unwrap();
    let mut buses = Vec::new();
    for ((name, _), c) in users.iter().zip(&creds) {
        buses.push(
            Bus::connect_with(&server.url(), name, Some(c), None, Duration::from_secs(5))
                .await
                .unwrap(),
        );
    }
    let (bus, burner_bus, builder_bus) = (
        buses.pop().unwrap(),
        buses.pop().unwrap(),
        buses.pop().unwrap(),
    );
    let operator = &creds[3];
    // The fleet's signing key: builders sign with it, burners trust its public half.
    let key = dir.path().join("fleet.key");
    motorpool_image_builder::ManifestSigner::generate()
        .write(&key, "test builders")
        .unwrap();
    let config = FleetConfig {
        signing_key_file: Some(key.clone()),
        trusted_keys_file: Some(dir.path().join("fleet.key.pub")),
        nats_url: server.url(),
        store_dir: dir.path().join("images"),
        bays_dir: dir.path().join("bays"),
        images_per_drive: 2,
        scan_ms: 100,
        burner_id: Some("flexo-1".into()),
        ..Default::default()
    };
    std::fs::create_dir_all(&config.bays_dir).unwrap();
    let stop = CancellationToken::new();
    let builder = tokio::spawn(motorpool_image_builder::actor::serve(
        builder_bus,
        config.clone(),
        stop.clone(),
    ));

    // The forge's way in: the webhook service, as its own bus user, with a project whose
    // release tags build the car image.
    let hooks = dir.path().join("webhook");
    std::fs::create_dir_all(&hooks).unwrap();
    let secret = hooks.join("car.secret");
    std::fs::write(&secret, "car-forge-token-0123456789").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(
        hooks.join("projects.toml"),
        format!(
            "[[project]]\nname = \"av/car\"\nforge = \"gitlab\"\nsecret_file = \"car.secret\"\nclone_url = \"{}\"\n\
             [[project.image]]\nname = \"car\"\ndockerfile = \"images/av/Dockerfile\"\ncontext = \"images/av\"\ntags = [\"v*\"]\n",
            repo.display()
        ),
    )
    .unwrap();
    let webhook_nk = dir.path().join("webhook.nk");
    creds[0].save(&webhook_nk).unwrap();
    let webhook = motorpool_webhook::start(
        WebhookConfig {
            nats_url: server.url(),
            nats_nkey_file: Some(webhook_nk),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            projects_file: Some(hooks.join("projects.toml")),
            ..Default::default()
        },
        stop.clone(),
    )
    .await
    .unwrap();
    let commit = git(&repo, &["rev-parse", "HEAD"]).trim().to_string();
    let tag_push = json!({
        "object_kind": "tag_push", "ref": "refs/tags/v1.0",
        "before": "0000000000000000000000000000000000000000", "after": commit,
        "checkout_sha": commit, "user_username": "release-manager",
        "project": {"path_with_namespace": "av/car", "git_http_url": "https://forge/av/car.git"},
    })
    .to_string();
    let addr = webhook.http_addr;
    let (status, body) = tokio::task::spawn_blocking(move || {
        support::ci::http(
            addr,
            "POST",
            "/hooks/av/car",
            &[
                ("X-Gitlab-Token", "car-forge-token-0123456789"),
                ("X-Gitlab-Event", "Tag Push Hook"),
            ],
            tag_push.as_bytes(),
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 201, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let job_id = body["images"][0]["job_id"].as_str().unwrap().to_string();
    let (first, steps) = build_done(&bus, &job_id).await;
    assert_eq!(first, "car-v1.0");
    assert!(
        steps.iter().any(|s| s.starts_with("docker build")),
        "{steps:?}"
    );
    // The forge's side can follow it too.
    let (status, state) = tokio::task::spawn_blocking(move || {
        support::ci::http(addr, "GET", &format!("/api/v1/images/{job_id}"), &[], b"")
    })
    .await
    .unwrap();
    let state: Value = serde_json::from_str(&state).unwrap();
    assert_eq!(
        (status, &state["state"], &state["image_id"]),
        (200, &json!("done"), &json!("car-v1.0")),
        "{state}"
    );
    let signature = config
        .store_dir
        .join("stable")
        .join(&first)
        .join("manifest.json.sig");
    assert!(signature.exists(), "{} is signed", first);
    std::fs::write(repo.join("images/av/stack.txt"), "planner v2\n").unwrap();
    git(&repo, &["commit", "-q", "-am", "v2"]);
    // The second through the command line, as the operator.
    let operator_nk = dir.path().join("operator.nk");
    operator.save(&operator_nk).unwrap();
    let mut submit = std::process::Command::new(env!("CARGO_BIN_EXE_motorpool"));
    submit
        .args(["image", "submit", "--wait", "--lane", "release", "--repo"])
        .arg(&repo)
        .args([
            "--dockerfile",
            "images/av/Dockerfile",
            "--context",
            "images/av",
        ])
        .arg("--nats-url")
        .arg(server.url())
        .arg("--nats-nkey-file")
        .arg(&operator_nk);
    let out = tokio::task::spawn_blocking(move || submit.output().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("in the release lane"), "{text}");
    let second = text
        .lines()
        .find_map(|l| l.strip_prefix("Built "))
        .and_then(|l| l.split(',').next())
        .unwrap_or_else(|| panic!("{text}"))
        .to_string();
    assert_ne!(first, second);

    // The burner, and two drives plugged in.
    let mut states = bus
        .subscribe::<DriveStatus>(&fleet::drive_state("flexo-1"))
        .await
        .unwrap();
    let burner = tokio::spawn(motorpool_disk_burner::actor::serve(
        burner_bus,
        config.clone(),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ours = config.bays_dir.join("bay0.img");
    let theirs = config.bays_dir.join("bay1.img");
    drive(&ours, "00000000-00f1-4000-8000-000000000001");
    drive(&theirs, "7c9e6679-7425-40de-944b-e07fc1f90ae7");
    let before = std::fs::read(&theirs).unwrap();

    let mut seen: Vec<(String, DriveKind, String)> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let done_ours = seen
            .iter()
            .filter(|s| s.0.ends_with("bay0.img") && s.1 == DriveKind::Ready)
            .count()
            == 2;
        let done_theirs = seen
            .iter()
            .any(|s| s.0.ends_with("bay1.img") && s.1 == DriveKind::Refused);
        if done_ours && done_theirs {
            break;
        }
        let s = tokio::time::timeout_at(deadline, states.next())
            .await
            .expect("drive states")
            .unwrap();
        assert_ne!(s.kind, DriveKind::Failed, "{s:?}");
        seen.push((s.drive.clone(), s.kind, s.image.clone()));
    }
    // Oldest first: the newest image is burned last and boots by default.
    let ready: Vec<&str> = seen
        .iter()
        .filter(|s| s.1 == DriveKind::Ready)
        .map(|s| s.2.as_str())
        .collect();
    assert_eq!(ready, [first.as_str(), second.as_str()]);
    assert!(
        seen.iter()
            .any(|s| s.0.ends_with("bay0.img") && s.1 == DriveKind::Burning)
    );
    assert_eq!(
        std::fs::read(&theirs).unwrap(),
        before,
        "the foreign drive is untouched"
    );
    let mut f = std::fs::File::open(&ours).unwrap();
    let gpt = Gpt::read(&mut f, DRIVE / 512).unwrap();
    let names: Vec<_> = slots(&gpt).into_iter().filter_map(|s| s.image).collect();
    assert_eq!(names, [first.clone(), second.clone()]);
    let menu = motorpool_disk_burner::esp::read_menu(&ours, &gpt).unwrap();
    assert!(menu.contains("set default=\"slot-2\""), "{menu}");

    // The KV bucket keeps the latest state per drive for whoever looks later.
    let kv = bus.ensure_kv(fleet::drives_config()).await.unwrap();
    let entry = kv
        .get("flexo-1.bay0_img")
        .await
        .unwrap()
        .expect("drive state");
    let s: DriveStatus = motorpool_messages::codec::decode(&entry).unwrap();
    assert_eq!(
        (s.kind, s.image.as_str()),
        (DriveKind::Ready, second.as_str())
    );
    // ... with what the drive holds, read from it: both images, the newest the default.
    let held: Vec<(u32, &str, bool)> = s
        .images
        .iter()
        .map(|i| (i.slot, i.image.as_str(), i.default))
        .collect();
    assert_eq!(
        held,
        [(1, first.as_str(), false), (2, second.as_str(), true)]
    );

    // The operator's view of the same states, with the operator's seed file.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_motorpool"))
        .args([
            "drives",
            "watch",
            "--once",
            "--burner",
            "flexo-1",
            "--nats-url",
        ])
        .arg(server.url())
        .arg("--nats-nkey-file")
        .arg(&operator_nk)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |bay: &str| text.lines().find(|l| l.contains(bay)).unwrap_or_default();
    assert!(
        line("bay0.img").contains(&format!("READY: {second} in slot 2")),
        "{text}"
    );
    assert!(line("bay1.img").contains("REFUSED, untouched"), "{text}");

    // Pulled: reported as removed.
    std::fs::remove_file(&ours).unwrap();
    let removed = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(s) = states.next().await {
            if s.drive.ends_with("bay0.img") && s.kind == DriveKind::Removed {
                return true;
            }
        }
        false
    })
    .await
    .unwrap();
    assert!(removed);
    stop.cancel();
    let _ = builder.await;
    let _ = burner.await;
    webhook.join().await;
    // Every actor did its work within its role's subjects.
    let denied: Vec<String> = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Violation"))
        .map(str::to_string)
        .collect();
    assert!(
        denied.is_empty(),
        "refused on the bus:\n{}",
        denied.join("\n")
    );
}
