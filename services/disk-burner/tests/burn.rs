//! Three real ext4 images burned onto four file-backed drives in parallel: one drive is not
//! Motorpool's (it stays byte-identical), one is pulled mid-burn (a clean failure, the others
//! unaffected); read-back verification passes, re-burning is verify-only and catches corruption,
//! and every drive's menu lists all its images.

use motorpool_disk_burner::burn::{DriveState, burn_all, scan_bays};
use motorpool_disk_burner::gpt::{Gpt, Guid, Partition};
use motorpool_disk_burner::grub::master_config;
use motorpool_disk_burner::image::Image;
use motorpool_disk_burner::layout::{LayoutOptions, slots};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

mod common;
use common::{DRIVE, drive, hash_file, mkfs_image};

#[test]
fn images_burn_onto_marked_drives_in_parallel_and_nothing_else_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let bays = dir.path().join("bays");
    std::fs::create_dir_all(&bays).unwrap();
    for i in 0..3 {
        drive(
            &bays.join(format!("bay{i}.img")),
            Guid::parse(&format!("00000000-{i:04x}-4000-8000-00000000000{i}")).unwrap(),
            vec![],
        );
    }
    // Someone's laptop disk, plugged into the wrong bay: a real table and data.
    let foreign = bays.join("bay3.img");
    drive(
        &foreign,
        Guid::parse("3f2504e0-4f89-41d3-9a0c-0305e82c3301").unwrap(),
        vec![Partition {
            type_guid: Guid::LINUX,
            unique_guid: Guid::random(),
            first_lba: 2048,
            last_lba: 100_000,
            attributes: 0,
            name: "home".into(),
        }],
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&foreign)
        .unwrap()
        .write_all_at(b"precious user data", 2048 * 512)
        .unwrap();
    let foreign_hash = hash_file(&foreign);

    let drives = scan_bays(&bays).unwrap();
    assert_eq!(drives.len(), 4);
    let opts = LayoutOptions {
        esp_bytes: 32 << 20,
        ..Default::default()
    };
    let states: Mutex<Vec<(PathBuf, DriveState)>> = Mutex::new(Vec::new());
    let record =
        |p: &Path, s: &DriveState| states.lock().unwrap().push((p.to_path_buf(), s.clone()));

    let mut images = Vec::new();
    for v in ["v1", "v2", "v3"] {
        let img = Image::load(&mkfs_image(dir.path(), v), &format!("av-2026.11-{v}")).unwrap();
        assert!(
            img.manifest.mapped_bytes() < img.manifest.size / 2,
            "sparse: {} of {}",
            img.manifest.mapped_bytes(),
            img.manifest.size
        );
        images.push(img);
    }

    // v1 everywhere.
    let r1 = burn_all(&drives, &images[0], &opts, &record);
    for r in &r1[..3] {
        assert!(
            matches!(
                r.state,
                DriveState::Ready {
                    verify_only: false,
                    ..
                }
            ),
            "{r:?}"
        );
        assert_eq!(
            r.bytes_written,
            images[0].manifest.mapped_bytes(),
            "only mapped ranges are written"
        );
        assert_eq!(r.bytes_verified, images[0].manifest.mapped_bytes());
    }
    assert!(
        matches!(&r1[3].state, DriveState::Refused { reason } if reason.contains("00000000")),
        "{:?}",
        r1[3]
    );
    assert_eq!(r1[3].bytes_written, 0);

    // v2, with bay 1 pulled as its burn starts.
    let pulled = drives[1].clone();
    let pull = |p: &Path, s: &DriveState| {
        record(p, s);
        if p == pulled && matches!(s, DriveState::Burning { done: 0, .. }) {
            std::fs::rename(p, dir.path().join("pulled.img")).unwrap();
        }
    };
    let r2 = burn_all(&drives, &images[1], &opts, &pull);
    assert!(
        matches!(&r2[1].state, DriveState::Failed { reason } if reason.contains("removed")),
        "{:?}",
        r2[1]
    );
    for i in [0, 2] {
        assert!(
            matches!(r2[i].state, DriveState::Ready { slot: 2, .. }),
            "{:?}",
            r2[i]
        );
    }
    // v3 onto the drives still in the bays.
    let present = scan_bays(&bays).unwrap();
    assert_eq!(present.len(), 3);
    let r3 = burn_all(&present, &images[2], &opts, &record);
    assert!(
        r3.iter()
            .filter(|r| matches!(r.state, DriveState::Ready { .. }))
            .count()
            == 2
    );

    assert_eq!(
        hash_file(&foreign),
        foreign_hash,
        "the foreign drive is byte-for-byte untouched"
    );

    for d in [&drives[0], &drives[2]] {
        let mut f = std::fs::File::open(d).unwrap();
        let gpt = Gpt::read(&mut f, DRIVE / 512).unwrap();
        let names: Vec<_> = slots(&gpt).into_iter().filter_map(|s| s.image).collect();
        assert_eq!(names, ["av-2026.11-v1", "av-2026.11-v2", "av-2026.11-v3"]);
        let menu = master_config(&gpt, None);
        for img in &images {
            assert!(
                menu.contains(&format!("Motorpool image {} ", img.manifest.id)),
                "{menu}"
            );
        }
        // The image in slot 3 is the ext4 file system byte for byte where it has data.
        let s3 = &slots(&gpt)[2];
        let mut sb = [0u8; 2];
        f.read_exact_at(&mut sb, s3.partition.offset() + 1024 + 56)
            .unwrap();
        assert_eq!(sb, [0x53, 0xef], "ext4 superblock magic");
    }
    // The pulled drive kept v1 and has v2's slot marked empty (a half-burned slot is never named).
    let mut f = std::fs::File::open(dir.path().join("pulled.img")).unwrap();
    let gpt = Gpt::read(&mut f, DRIVE / 512).unwrap();
    let names: Vec<_> = slots(&gpt).into_iter().map(|s| s.image).collect();
    assert_eq!(names[0].as_deref(), Some("av-2026.11-v1"));
    assert_eq!(names[1], None);

    // Burning an image a drive holds is a verify-only pass...
    let again = burn_all(&drives[..1], &images[0], &opts, &record);
    assert!(
        matches!(
            again[0].state,
            DriveState::Ready {
                slot: 1,
                verify_only: true,
                ..
            }
        ),
        "{:?}",
        again[0]
    );
    assert_eq!(again[0].bytes_written, 0);
    // ...which catches a flipped byte.
    let mut f = std::fs::File::open(&drives[0]).unwrap();
    let gpt = Gpt::read(&mut f, DRIVE / 512).unwrap();
    let s1 = &slots(&gpt)[0];
    let r = &images[0].manifest.ranges[0];
    let at = s1.partition.offset() + r.offset + 100;
    let w = std::fs::OpenOptions::new()
        .write(true)
        .open(&drives[0])
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    w.write_all_at(&[b[0] ^ 0xff], at).unwrap();
    w.sync_all().unwrap();
    let bad = burn_all(&drives[..1], &images[0], &opts, &record);
    assert!(
        matches!(&bad[0].state, DriveState::Failed { reason } if reason.contains("verification failed")),
        "{:?}",
        bad[0]
    );

    // Progress went through the states in order for a drive.
    let seen: Vec<String> = states
        .lock()
        .unwrap()
        .iter()
        .filter(|(p, _)| *p == drives[2])
        .map(|(_, s)| {
            serde_json::to_value(s).unwrap()["state"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let first_ready = seen.iter().position(|s| s == "ready").unwrap();
    assert_eq!(seen[0], "inserted");
    assert!(seen[..first_ready].contains(&"burning".to_string()));
    assert!(seen[..first_ready].contains(&"verifying".to_string()));
}

#[test]
fn a_burned_drive_boots_in_qemu_to_a_menu_that_finds_every_image() {
    use motorpool_disk_burner::boot::boot_test;
    use motorpool_disk_burner::esp;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("drive.img");
    drive(
        &d,
        Guid::parse("00000000-0b00-4000-8000-000000000001").unwrap(),
        vec![],
    );
    let opts = LayoutOptions {
        esp_bytes: 64 << 20,
        ..Default::default()
    };
    // One image with its own boot config, one without.
    let bootable = mkfs_image(dir.path(), "boot");
    let tree = dir.path().join("tree-boot");
    std::fs::create_dir_all(tree.join("boot/grub")).unwrap();
    std::fs::write(tree.join("boot/grub/grub.cfg"), "menuentry x { true }\n").unwrap();
    std::fs::remove_file(&bootable).unwrap();
    let out = Command::new(
        ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap(),
    )
    .args(["-q", "-F", "-d"])
    .arg(&tree)
    .arg(&bootable)
    .arg("48M")
    .output()
    .unwrap();
    assert!(out.status.success());
    let plain = mkfs_image(dir.path(), "plain");
    for (path, id) in [(&bootable, "av-boot"), (&plain, "av-plain")] {
        let img = Image::load(path, id).unwrap();
        let r = burn_all(std::slice::from_ref(&d), &img, &opts, &|_, _| {});
        assert!(matches!(r[0].state, DriveState::Ready { .. }), "{:?}", r[0]);
    }
    let mut f = std::fs::File::open(&d).unwrap();
    let gpt = Gpt::read(&mut f, DRIVE / 512).unwrap();
    let menu = esp::read_menu(&d, &gpt).unwrap();
    assert!(
        menu.contains("Motorpool image av-boot") && menu.contains("Motorpool image av-plain"),
        "{menu}"
    );

    let report = boot_test(&d, 2, std::time::Duration::from_secs(300)).unwrap();
    assert!(report.menu_shown);
    assert_eq!(
        report.images,
        [
            (
                2,
                "av-plain".to_string(),
                "found, no boot config".to_string()
            ),
            (1, "av-boot".to_string(), "found, bootable".to_string()),
        ],
        "{}",
        report.console
    );
}

#[test]
fn a_drive_another_job_holds_is_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("drive.img");
    drive(
        &d,
        Guid::parse("00000000-0c00-4000-8000-000000000001").unwrap(),
        vec![],
    );
    let before = hash_file(&d);
    let held = nix::fcntl::Flock::lock(
        std::fs::File::open(&d).unwrap(),
        nix::fcntl::FlockArg::LockExclusiveNonblock,
    )
    .unwrap();
    let img = Image::load(&mkfs_image(dir.path(), "held"), "av-held").unwrap();
    let r = burn_all(
        std::slice::from_ref(&d),
        &img,
        &LayoutOptions {
            slots: 6,
            ..Default::default()
        },
        &|_, _| {},
    );
    assert!(
        matches!(&r[0].state, DriveState::Failed { reason } if reason.contains("another job is writing this drive")),
        "{:?}",
        r[0]
    );
    assert_eq!(hash_file(&d), before);
    drop(held);
    let r = burn_all(
        std::slice::from_ref(&d),
        &img,
        &LayoutOptions {
            slots: 6,
            ..Default::default()
        },
        &|_, _| {},
    );
    assert!(matches!(r[0].state, DriveState::Ready { .. }), "{:?}", r[0]);
}
