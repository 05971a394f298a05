//! Real hot-plug on a real kernel: loop devices attached and detached while the burner runs with
//! the `udev` source. It finds them through netlink uevents alone (its periodic scan is set to
//! ten minutes), burns the marked one, refuses a foreign and a read-only one without changing a
//! byte, reports a detached one as removed, burns the next disk attached under the same name,
//! and drives the LEDs through `ledctl` (a recording script: there is no enclosure here).
//!
//! Needs root for loop devices; CI runs as root.

mod common;

use common::{drive, hash_file, mkfs_image};
use motorpool_bus::{Bus, NatsServer, TypedSubscriber, subjects::fleet};
use motorpool_config::{DriveSource, FleetConfig};
use motorpool_disk_burner::gpt::{Gpt, Guid};
use motorpool_disk_burner::layout::slots;
use motorpool_messages::fleet::{DriveKind, DriveStatus};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A loop device, detached when dropped.
struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path, read_only: bool) -> Loop {
        let mut cmd = Command::new("losetup");
        if read_only {
            cmd.arg("-r");
        }
        let out = cmd.args(["-f", "--show"]).arg(file).output().unwrap();
        assert!(
            out.status.success(),
            "losetup (root and loop devices are required): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
    }

    fn detach(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
            self.0 = PathBuf::new();
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.detach();
    }
}

/// The next state of `drive` that is not progress, within a minute.
async fn next_kind(states: &mut TypedSubscriber<DriveStatus>, drive: &Path) -> DriveStatus {
    loop {
        let s = tokio::time::timeout(Duration::from_secs(60), states.next())
            .await
            .unwrap_or_else(|_| panic!("no state for {} within a minute", drive.display()))
            .unwrap();
        if Path::new(&s.drive) == drive {
            return s;
        }
    }
}

/// Waits for `drive` to reach `want`, failing on a failed or refused drive.
async fn until(
    states: &mut TypedSubscriber<DriveStatus>,
    drive: &Path,
    want: DriveKind,
) -> Vec<DriveKind> {
    let mut kinds = Vec::new();
    loop {
        let s = next_kind(states, drive).await;
        if kinds.last() != Some(&s.kind) {
            kinds.push(s.kind);
        }
        if s.kind == want {
            return kinds;
        }
        assert!(
            !matches!(
                s.kind,
                DriveKind::Failed | DriveKind::Refused | DriveKind::Removed
            ),
            "{s:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_plugged_block_devices_are_found_by_uevents_and_leds_follow_their_state() {
    let dir = tempfile::tempdir().unwrap();
    // The store: one image in channel `stable`, as the image builder leaves it.
    let store = dir.path().join("images");
    let slot = store.join("stable/av-1");
    std::fs::create_dir_all(&slot).unwrap();
    std::fs::rename(mkfs_image(dir.path(), "one"), slot.join("image.ext4")).unwrap();
    let manifest = motorpool_disk_burner::image::Image::load(&slot.join("image.ext4"), "av-1")
        .unwrap()
        .manifest;
    std::fs::write(
        slot.join("manifest.json"),
        serde_json::json!({ "built_at_ms": 1, "image": manifest }).to_string(),
    )
    .unwrap();
    let led_log = dir.path().join("leds.log");
    let ledctl = dir.path().join("ledctl");
    std::fs::write(
        &ledctl,
        format!("#!/bin/sh\necho \"$@\" >> {}\n", led_log.display()),
    )
    .unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(&ledctl)
        .status()
        .unwrap();

    let server = NatsServer::start().unwrap();
    let bus = Bus::connect(&server.url(), "test", Duration::from_secs(5))
        .await
        .unwrap();
    let config = FleetConfig {
        nats_url: server.url(),
        store_dir: store,
        drive_source: DriveSource::Udev,
        udev_match: vec!["loop*".into()],
        ledctl: Some(ledctl),
        images_per_drive: 1,
        scan_ms: 600_000,
        burner_id: Some("rack-1".into()),
        ..Default::default()
    };
    let mut states = bus
        .subscribe::<DriveStatus>(&fleet::drive_state("rack-1"))
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let burner = tokio::spawn(motorpool_disk_burner::actor::serve(
        bus.clone(),
        config,
        stop.clone(),
    ));
    // The first scan has run once the burner is subscribed to uevents.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A marked drive: found by its uevent, burned, verified, ready.
    let ours = dir.path().join("ours.img");
    drive(
        &ours,
        Guid::parse("00000000-10de-4000-8000-000000000001").unwrap(),
        vec![],
    );
    let mut ours_dev = Loop::attach(&ours, false);
    let kinds = until(&mut states, &ours_dev.0, DriveKind::Ready).await;
    assert_eq!(
        kinds,
        [
            DriveKind::Inserted,
            DriveKind::Burning,
            DriveKind::Verifying,
            DriveKind::Ready
        ]
    );
    let gpt = Gpt::read(
        &mut std::fs::File::open(&ours).unwrap(),
        common::DRIVE / 512,
    )
    .unwrap();
    let images: Vec<_> = slots(&gpt).into_iter().filter_map(|s| s.image).collect();
    assert_eq!(images, ["av-1"]);

    // A foreign drive and a read-only marked one: refused, not a byte changed.
    let theirs = dir.path().join("theirs.img");
    drive(
        &theirs,
        Guid::parse("7c9e6679-7425-40de-944b-e07fc1f90ae7").unwrap(),
        vec![],
    );
    let locked = dir.path().join("locked.img");
    drive(
        &locked,
        Guid::parse("00000000-10de-4000-8000-000000000002").unwrap(),
        vec![],
    );
    let (theirs_hash, locked_hash) = (hash_file(&theirs), hash_file(&locked));
    let theirs_dev = Loop::attach(&theirs, false);
    let s = loop {
        let s = next_kind(&mut states, &theirs_dev.0).await;
        if s.kind != DriveKind::Inserted {
            break s;
        }
    };
    assert_eq!(s.kind, DriveKind::Refused, "{s:?}");
    assert!(s.reason.contains("not a Motorpool drive"), "{}", s.reason);
    let locked_dev = Loop::attach(&locked, true);
    let s = loop {
        let s = next_kind(&mut states, &locked_dev.0).await;
        if s.kind != DriveKind::Inserted {
            break s;
        }
    };
    assert_eq!(
        (s.kind, s.reason.as_str()),
        (DriveKind::Refused, "read-only")
    );

    // Pulled: removed. The next disk under the same name is a new drive.
    let name = ours_dev.0.clone();
    ours_dev.detach();
    let s = next_kind(&mut states, &name).await;
    assert_eq!(s.kind, DriveKind::Removed, "{s:?}");
    let next = dir.path().join("next.img");
    drive(
        &next,
        Guid::parse("00000000-10de-4000-8000-000000000003").unwrap(),
        vec![],
    );
    let next_dev = Loop::attach(&next, false);
    until(&mut states, &next_dev.0, DriveKind::Ready).await;

    stop.cancel();
    burner.await.unwrap().unwrap();
    assert_eq!(
        hash_file(&theirs),
        theirs_hash,
        "the foreign drive is untouched"
    );
    assert_eq!(
        hash_file(&locked),
        locked_hash,
        "the read-only drive is untouched"
    );

    // The LEDs followed: dark when inserted, blinking while burning, lit when ready; the
    // refused drives dark. (Each call is one `pattern=device` line.)
    let leds = std::fs::read_to_string(&led_log).unwrap();
    let of = |dev: &Path| -> Vec<String> {
        leds.lines()
            .filter_map(|l| {
                let (p, d) = l.split_once('=')?;
                (Path::new(d) == dev).then(|| p.to_string())
            })
            .collect()
    };
    assert_eq!(of(&theirs_dev.0), ["off"], "{leds}");
    assert_eq!(of(&locked_dev.0), ["off"], "{leds}");
    let led = of(&next_dev.0);
    assert!(
        led.ends_with(&["off".to_string(), "locate".into(), "failure".into()]),
        "{leds}"
    );
}
