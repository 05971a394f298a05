//! Images through the platform's CAS: a builder's signed images are published through the
//! gateway (with the CI key; a developer's key may not), and a burner host with an empty store
//! fetches one, then a second, similar one fetching only the pieces it lacks, checks them
//! against the signed manifest and burns from what it fetched. An untrusted signer's image is
//! refused before any piece is fetched. Then a burner actor with an empty store and the depot
//! configured fetches the channel's newest image itself and burns it onto a drive put in a bay.

mod support;

use motorpool_image_builder::testing::{base_image, git, sample_repo, sample_request};
use motorpool_image_builder::{ManifestSigner, build};
use std::path::Path;
use support::{Stack, motorpool, text};

/// `image fetch`'s bytes fetched, reused and of data, from its `Fetched ...` line.
fn fetched_reused_data(out: &str) -> (u64, u64, u64) {
    let line = out
        .lines()
        .find(|l| l.starts_with("Fetched "))
        .unwrap_or_else(|| panic!("{out}"));
    (
        number_before(line, "bytes fetched"),
        number_before(line, "reused"),
        number_before(line, "bytes of data"),
    )
}

/// The number just before `word` in `line`.
fn number_before(line: &str, word: &str) -> u64 {
    let at = line
        .find(word)
        .unwrap_or_else(|| panic!("{word:?} in {line}"));
    line[..at]
        .split_whitespace()
        .last()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a number before {word:?} in {line}"))
}

#[test]
fn images_are_fetched_from_the_platform_by_content_only_what_is_missing() {
    let stack = Stack::up(&[]);
    let dir = tempfile::tempdir().unwrap();
    base_image(dir.path());
    let repo = sample_repo(dir.path());
    // 6 MiB the two versions share, beside the file that changes.
    let payload: Vec<u8> = (0..6u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(repo.join("images/av/payload.bin"), &payload).unwrap();
    let dockerfile = repo.join("images/av/Dockerfile");
    let mut d = std::fs::read_to_string(&dockerfile).unwrap();
    d.push_str("COPY payload.bin /opt/av/payload.bin\n");
    std::fs::write(&dockerfile, d).unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "payload"]);

    let key = dir.path().join("fleet.key");
    let signer = ManifestSigner::generate();
    signer.write(&key, "").unwrap();
    let trusted = format!("{}.pub", key.display());
    let store = dir.path().join("builder-store");
    let req = sample_request(&repo);
    let v1 = build(&req, &store, 5, Some(&signer), &|_| {}).unwrap();
    std::fs::write(repo.join("images/av/stack.txt"), "planner v2\n").unwrap();
    git(&repo, &["commit", "-q", "-am", "v2"]);
    let v2 = build(&req, &store, 5, Some(&signer), &|_| {}).unwrap();

    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let ci_key = keys.join("ci");
    let dev_key = keys.join("developer");
    std::fs::write(&ci_key, &stack.keys.ci).unwrap();
    std::fs::write(&dev_key, &stack.keys.developer).unwrap();
    let remote = format!("grpc://{}", stack.grpc);
    let publish = |image: &Path, key: &Path| {
        motorpool(&[
            "image",
            "publish",
            "--image",
            image.to_str().unwrap(),
            "--remote",
            &remote,
            "--api-key-file",
            key.to_str().unwrap(),
        ])
    };
    // A developer's key may not list images in a channel (it would write the action cache).
    let denied = publish(&v1.dir, &dev_key);
    assert!(!denied.status.success(), "{}", text(&denied));
    assert!(
        text(&denied).contains("PermissionDenied") || text(&denied).contains("permission"),
        "{}",
        text(&denied)
    );
    for built in [&v1, &v2] {
        let out = publish(&built.dir, &ci_key);
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            text(&out).contains("as channel stable's newest"),
            "{}",
            text(&out)
        );
    }

    // A burner host's empty store: v1 first (everything fetched), then v2.
    let site = dir.path().join("site-store");
    let fetch = |id: &str, trusted: &str| {
        motorpool(&[
            "image",
            "fetch",
            "--channel",
            "stable",
            "--store",
            site.to_str().unwrap(),
            "--id",
            id,
            "--trusted-keys",
            trusted,
            "--remote",
            &remote,
            "--api-key-file",
            dev_key.to_str().unwrap(),
        ])
    };
    // Another fleet's key: refused before a piece moves, nothing left in the store.
    let stranger = dir.path().join("stranger.key");
    ManifestSigner::generate().write(&stranger, "").unwrap();
    let refused = fetch(
        &v1.manifest.image.id,
        &format!("{}.pub", stranger.display()),
    );
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("does not trust"),
        "{}",
        text(&refused)
    );
    assert!(!site.join("stable").join(&v1.manifest.image.id).exists());

    let first = fetch(&v1.manifest.image.id, &trusted);
    let first_out = text(&first);
    assert!(first.status.success(), "{first_out}");
    let (fetched, reused, data) = fetched_reused_data(&first_out);
    assert_eq!((fetched, reused), (data, 0), "{first_out}");
    let second = fetch(&v2.manifest.image.id, &trusted);
    let second_out = text(&second);
    assert!(second.status.success(), "{second_out}");
    let (fetched, reused, data) = fetched_reused_data(&second_out);
    let line = &second_out;
    eprintln!("second, similar image: {fetched} bytes fetched, {reused} reused, of {data}");
    assert_eq!(fetched + reused, data, "{line}");
    assert!(reused >= 5 << 20, "the shared payload is reused: {line}");
    assert!(fetched < data / 2, "{line}");
    // The fetched image is the built one, byte for byte, and fetching again does nothing.
    let fetched_image = site
        .join("stable")
        .join(&v2.manifest.image.id)
        .join("image.ext4");
    assert!(std::fs::read(&fetched_image).unwrap() == std::fs::read(&v2.image).unwrap());
    let again = text(&fetch(&v2.manifest.image.id, &trusted));
    assert!(again.contains("already in the store"), "{again}");

    // And it burns from there, checked against its signature.
    let bay = dir.path().join("bay0.img");
    let mut f = std::fs::File::create(&bay).unwrap();
    f.set_len(1 << 30).unwrap();
    motorpool_disk_burner::gpt::Gpt {
        disk_guid: motorpool_disk_burner::gpt::Guid::parse("00000000-0de9-4000-8000-000000000001")
            .unwrap(),
        sectors: (1 << 30) / 512,
        partitions: vec![],
    }
    .write(&mut f)
    .unwrap();
    let burn = motorpool(&[
        "drives",
        "burn",
        "--esp-mib",
        "32",
        "--slots",
        "4",
        "--image",
        site.join("stable")
            .join(&v2.manifest.image.id)
            .to_str()
            .unwrap(),
        "--trusted-keys",
        &trusted,
        bay.to_str().unwrap(),
    ]);
    assert!(burn.status.success(), "{}", text(&burn));
    assert!(
        text(&burn).contains(&format!("READY: {}", v2.manifest.image.id)),
        "{}",
        text(&burn)
    );

    // A burner actor whose store is empty, with the depot configured: it fetches the channel's
    // newest image (v2) itself, checks its signature, and burns it onto a drive in its bays.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use motorpool_messages::fleet::{DriveKind, DriveStatus};
        let server = motorpool_bus::NatsServer::start().unwrap();
        let bus =
            motorpool_bus::Bus::connect(&server.url(), "test", std::time::Duration::from_secs(5))
                .await
                .unwrap();
        let config = motorpool_config::FleetConfig {
            nats_url: server.url(),
            store_dir: dir.path().join("burner-store"),
            bays_dir: dir.path().join("bays"),
            images_per_drive: 1,
            scan_ms: 100,
            burner_id: Some("site-2".into()),
            slots: 4,
            trusted_keys_file: Some(trusted.clone().into()),
            depot_url: Some(remote.clone()),
            depot_api_key_file: Some(dev_key.clone()),
            ..Default::default()
        };
        std::fs::create_dir_all(&config.bays_dir).unwrap();
        let mut states = bus
            .subscribe::<DriveStatus>(&motorpool_bus::subjects::fleet::drive_state("site-2"))
            .await
            .unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let burner = tokio::spawn(motorpool_disk_burner::actor::serve(
            bus.clone(),
            config.clone(),
            stop.clone(),
        ));
        // The drive goes in once the image is in the store, as an operator would after the
        // burner said it had it; the burner finds it on its next scan.
        let image_dir = config.store_dir.join("stable").join(&v2.manifest.image.id);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !image_dir.join("manifest.json").exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the burner fetched nothing"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        // A fresh marked drive, plugged in whole (made beside the bays, then moved in).
        let fresh = dir.path().join("fresh.img");
        let mut f = std::fs::File::create(&fresh).unwrap();
        f.set_len(1 << 30).unwrap();
        motorpool_disk_burner::gpt::Gpt {
            disk_guid: motorpool_disk_burner::gpt::Guid::parse(
                "00000000-0de9-4000-8000-000000000002",
            )
            .unwrap(),
            sectors: (1 << 30) / 512,
            partitions: vec![],
        }
        .write(&mut f)
        .unwrap();
        std::fs::rename(&fresh, config.bays_dir.join("bay0.img")).unwrap();
        let ready = tokio::time::timeout(std::time::Duration::from_secs(60), async {
            while let Some(s) = states.next().await {
                assert_ne!(s.kind, DriveKind::Failed, "{s:?}");
                if s.kind == DriveKind::Ready {
                    return s;
                }
            }
            panic!("the burner stopped")
        })
        .await
        .expect("the drive became ready");
        assert_eq!(ready.image, v2.manifest.image.id);
        stop.cancel();
        let _ = burner.await;

        // A site whose gateway is out of reach still starts, and burns what its store holds.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let offline = tokio::spawn(motorpool_disk_burner::actor::serve(
            bus.clone(),
            motorpool_config::FleetConfig {
                depot_url: Some(format!("grpc://{closed}")),
                burner_id: Some("site-3".into()),
                ..config.clone()
            },
            stop.clone(),
        ));
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        assert!(!offline.is_finished(), "{:?}", offline.await);
        stop.cancel();
        offline.await.unwrap().unwrap();
    });
}
