//! Real drive sizes and full drives: the ESP is a valid FAT on sparse drives from 16 GiB to
//! 4 TiB (checked with dosfstools' `fsck.vfat` and the menu read back with mtools), a drive left
//! stuck by the old ESP bug is recovered by a re-burn, a slot is named only when its burn,
//! boot menu included, succeeded, and a full drive never evicts its default image.

use motorpool_disk_burner::burn::{BurnReport, DriveState, burn_all, read_slot_record};
use motorpool_disk_burner::esp;
use motorpool_disk_burner::gpt::{Gpt, Guid};
use motorpool_disk_burner::image::Image;
use motorpool_disk_burner::layout::{Kind, LayoutOptions, kind, slots};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

mod common;
use common::mkfs_image;

fn sparse_drive(path: &Path, bytes: u64, disk: &str) {
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(bytes).unwrap();
    Gpt {
        disk_guid: Guid::parse(disk).unwrap(),
        sectors: bytes / 512,
        partitions: vec![],
    }
    .write(&mut f)
    .unwrap();
}

/// Burns `img` onto the one drive at `d`.
fn burn_one(d: &Path, img: &Image, opts: &LayoutOptions) -> BurnReport {
    burn_all(
        std::slice::from_ref(&d.to_path_buf()),
        img,
        opts,
        &|_, _| {},
    )
    .remove(0)
}

fn gpt_of(path: &Path) -> Gpt {
    let mut f = std::fs::File::open(path).unwrap();
    let bytes = f.metadata().unwrap().len();
    Gpt::read(&mut f, bytes / 512).unwrap()
}

/// `fsck.vfat -n` over the drive's ESP, copied out (sparse) to a file of its own.
fn fsck_esp(drive: &Path, gpt: &Gpt, scratch: &Path) -> Result<String, String> {
    let esp = gpt
        .partitions
        .iter()
        .find(|p| kind(p) == Some(Kind::Esp))
        .unwrap();
    let src = std::fs::File::open(drive).unwrap();
    let out = std::fs::File::create(scratch).unwrap();
    out.set_len(esp.len()).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for (off, len) in
        motorpool_disk_burner::image::data_extents(&src, esp.offset() + esp.len()).unwrap()
    {
        let (a, b) = (
            off.max(esp.offset()),
            (off + len).min(esp.offset() + esp.len()),
        );
        let mut at = a;
        while at < b {
            let n = ((b - at) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], at).unwrap();
            out.write_all_at(&buf[..n], at - esp.offset()).unwrap();
            at += n as u64;
        }
    }
    let fsck = ["/usr/sbin/fsck.vfat", "/sbin/fsck.vfat"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("fsck.vfat (dosfstools)");
    let o = Command::new(fsck).arg("-n").arg(scratch).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o.status.success().then_some(text.clone()).ok_or(text)
}

#[test]
fn the_esp_is_a_valid_fat_on_drives_of_16_gib_to_4_tib() {
    let dir = tempfile::tempdir().unwrap();
    let img = Image::load(&mkfs_image(dir.path(), "big"), "av-big").unwrap();
    for (i, gib) in [16u64, 1024, 4096].into_iter().enumerate() {
        let d = dir.path().join(format!("drive-{gib}g.img"));
        sparse_drive(
            &d,
            gib << 30,
            &format!("00000000-{i:04x}-4000-8000-0000000000a{i}"),
        );
        let r = burn_one(&d, &img, &LayoutOptions::default());
        assert!(
            matches!(
                r.state,
                DriveState::Ready {
                    verify_only: false,
                    ..
                }
            ),
            "{gib} GiB: {:?}",
            r
        );
        let gpt = gpt_of(&d);
        let fsck = fsck_esp(&d, &gpt, &dir.path().join("esp.fat"))
            .unwrap_or_else(|e| panic!("{gib} GiB: fsck.vfat: {e}"));
        assert!(fsck.contains("files"), "{fsck}");
        let menu = esp::read_menu(&d, &gpt).unwrap();
        assert!(
            menu.contains("menuentry \"Motorpool image av-big (slot 1)\""),
            "{gib} GiB:\n{menu}"
        );
        std::fs::remove_file(&d).unwrap();
    }
}

#[test]
fn a_drive_stuck_by_the_old_esp_bug_is_recovered_by_a_reburn() {
    let dir = tempfile::tempdir().unwrap();
    let img = Image::load(&mkfs_image(dir.path(), "stuck"), "av-stuck").unwrap();
    let d = dir.path().join("drive.img");
    sparse_drive(&d, 24 << 30, "00000000-0d00-4000-8000-000000000001");
    // The state the bug left: the image burned and its slot named, then an ESP that
    // `mkfs.vfat --offset` made with 16 KiB clusters, too few for FAT32.
    let no_menu = LayoutOptions {
        boot_menu: false,
        ..Default::default()
    };
    let r = burn_one(&d, &img, &no_menu);
    assert!(matches!(r.state, DriveState::Ready { .. }), "{:?}", r);
    let gpt = gpt_of(&d);
    let esp_first = gpt.partitions[0].first_lba;
    let kib = gpt.partitions[0].len() / 1024;
    let mkfs = ["/usr/sbin/mkfs.vfat", "/sbin/mkfs.vfat"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap();
    let o = Command::new(mkfs)
        .args(["-F", "32", &format!("--offset={esp_first}"), "-n", "MP-ESP"])
        .arg(&d)
        .arg(kib.to_string())
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    assert!(
        esp::read_menu(&d, &gpt).is_err(),
        "mtools cannot read that FAT"
    );
    let mut boot = [0u8; 512];
    std::fs::File::open(&d)
        .unwrap()
        .read_exact_at(&mut boot, gpt.partitions[0].offset())
        .unwrap();
    assert_eq!(esp::fat_geometry(&boot, gpt.partitions[0].len()), None);

    // A re-burn: the image is already there (verified), and the ESP is made again.
    let r = burn_one(&d, &img, &LayoutOptions::default());
    assert!(
        matches!(
            r.state,
            DriveState::Ready {
                verify_only: true,
                ..
            }
        ),
        "{:?}",
        r
    );
    assert_eq!(r.bytes_written, 0);
    fsck_esp(&d, &gpt, &dir.path().join("esp.fat")).unwrap();
    assert!(esp::read_menu(&d, &gpt).unwrap().contains("av-stuck"));
}

#[test]
fn a_slot_is_named_only_when_its_boot_menu_was_written_too() {
    let dir = tempfile::tempdir().unwrap();
    let img = Image::load(&mkfs_image(dir.path(), "menu"), "av-menu").unwrap();
    let d = dir.path().join("drive.img");
    sparse_drive(&d, 1 << 30, "00000000-0e00-4000-8000-000000000001");
    // An ESP of 1 MiB cannot hold a FAT16 or FAT32: the burn's last step fails.
    let tiny_esp = LayoutOptions {
        esp_bytes: 1 << 20,
        ..Default::default()
    };
    let r = burn_one(&d, &img, &tiny_esp);
    assert!(
        matches!(&r.state, DriveState::Failed { reason } if reason.contains("boot menu")),
        "{:?}",
        r
    );
    let gpt = gpt_of(&d);
    assert!(
        slots(&gpt).iter().all(|s| s.image.is_none()),
        "no slot is named after a burn whose menu failed: {:?}",
        slots(&gpt)
    );
}

#[test]
fn a_full_drive_keeps_its_default_image_and_says_what_it_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("drive.img");
    sparse_drive(&d, 1 << 30, "00000000-0f00-4000-8000-000000000001");
    let opts = LayoutOptions {
        esp_bytes: 32 << 20,
        ..Default::default()
    };
    let mut images = Vec::new();
    for n in 1..=13 {
        let v = format!("v{n:02}");
        images.push(Image::load(&mkfs_image(dir.path(), &v), &format!("av-{v}")).unwrap());
        std::fs::remove_file(dir.path().join(format!("{v}.ext4"))).unwrap();
        std::fs::remove_dir_all(dir.path().join(format!("tree-{v}"))).unwrap();
    }
    for img in &images[..12] {
        let r = burn_one(&d, img, &opts);
        assert!(
            matches!(&r.state, DriveState::Ready { replaced: None, .. }),
            "{:?}",
            r
        );
    }
    // The operator makes the oldest image the default; then a thirteenth image comes.
    let gpt = gpt_of(&d);
    esp::install(&d, &gpt, Some("av-v01")).unwrap();
    let r = burn_one(&d, &images[12], &opts);
    match &r.state {
        DriveState::Ready {
            slot,
            replaced: Some(old),
            ..
        } => {
            assert_eq!((old.as_str(), *slot), ("av-v02", 2), "{:?}", r);
        }
        other => panic!("{other:?}"),
    }
    let gpt = gpt_of(&d);
    let names: Vec<String> = slots(&gpt).into_iter().filter_map(|s| s.image).collect();
    assert!(names.contains(&"av-v01".to_string()), "{names:?}");
    assert!(!names.contains(&"av-v02".to_string()), "{names:?}");
    assert_eq!(
        esp::read_default(&d, &gpt).unwrap().as_deref(),
        Some("av-v01")
    );
    assert!(
        esp::read_menu(&d, &gpt)
            .unwrap()
            .contains("set default=\"slot-1\"")
    );
    // Each slot records what it holds.
    let f = std::fs::File::open(&d).unwrap();
    let s2 = &slots(&gpt)[1];
    let rec = read_slot_record(&f, &s2.partition).unwrap();
    assert_eq!(
        (rec.id.as_str(), rec.blake3.as_str()),
        ("av-v13", images[12].manifest.blake3.as_str())
    );

    // A drive with one slot whose image is the default refuses to replace it.
    let one = dir.path().join("one.img");
    sparse_drive(&one, 1 << 30, "00000000-0f01-4000-8000-000000000001");
    let single = LayoutOptions {
        slots: 1,
        ..opts.clone()
    };
    burn_one(&one, &images[0], &single);
    esp::install(&one, &gpt_of(&one), Some("av-v01")).unwrap();
    let r = burn_one(&one, &images[1], &single);
    assert!(
        matches!(&r.state, DriveState::Failed { reason } if reason.contains("default image av-v01")),
        "{:?}",
        r
    );
    let names: Vec<_> = slots(&gpt_of(&one)).into_iter().map(|s| s.image).collect();
    assert_eq!(names, [Some("av-v01".to_string())]);
}

#[test]
fn a_rebuild_with_the_same_id_but_other_bytes_is_burned_again_into_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("drive.img");
    sparse_drive(&d, 1 << 30, "00000000-1000-4000-8000-000000000001");
    let opts = LayoutOptions {
        esp_bytes: 32 << 20,
        ..Default::default()
    };
    let first = Image::load(&mkfs_image(dir.path(), "r1"), "av-same").unwrap();
    let second = Image::load(&mkfs_image(dir.path(), "r2"), "av-same").unwrap();
    assert_ne!(first.manifest.blake3, second.manifest.blake3);
    let r = burn_one(&d, &first, &opts);
    assert!(
        matches!(r.state, DriveState::Ready { slot: 1, .. }),
        "{:?}",
        r
    );
    // A slot burned before records existed has none: the id decides (verify-only), and the
    // pass leaves a record behind.
    let slot1 = slots(&gpt_of(&d))[0].partition.clone();
    let w = std::fs::OpenOptions::new().write(true).open(&d).unwrap();
    w.write_all_at(&[0u8; 4096], slot1.offset() + slot1.len() - 4096)
        .unwrap();
    assert_eq!(
        read_slot_record(&std::fs::File::open(&d).unwrap(), &slot1),
        None
    );
    let r = burn_one(&d, &first, &opts);
    assert!(
        matches!(
            r.state,
            DriveState::Ready {
                verify_only: true,
                ..
            }
        ),
        "{:?}",
        r
    );
    let rec = read_slot_record(&std::fs::File::open(&d).unwrap(), &slot1).unwrap();
    assert_eq!(rec.blake3, first.manifest.blake3);
    // Same id, other content: not "already there", and not a failed verification either.
    let r = burn_one(&d, &second, &opts);
    assert!(
        matches!(
            r.state,
            DriveState::Ready {
                slot: 1,
                verify_only: false,
                replaced: None,
                ..
            }
        ),
        "{:?}",
        r
    );
    // And now it is there.
    let r = burn_one(&d, &second, &opts);
    assert!(
        matches!(
            r.state,
            DriveState::Ready {
                verify_only: true,
                ..
            }
        ),
        "{:?}",
        r
    );
}
