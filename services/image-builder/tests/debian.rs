//! A real boot: Debian 12 (made here by debootstrap: Debian's kernel, initramfs-tools,
//! overlayroot and cryptsetup; no registry) is built into an image from a git repository by the
//! image builder, signed, burned onto a drive, and booted in qemu with OVMF (KVM where it works)
//! through the drive's master menu and the image's own GRUB config to userspace. There, a check
//! run as PID 1 reports what the root is made of: the overlay of the image's partition, read-only,
//! and a dm-crypt device on the drive's overlay partition named by the seed's
//! `55555555-<DISK_ID>-555555555555`; a file written at runtime lands in the overlay and not in
//! the image.

use motorpool_disk_burner::burn::{DriveState, burn_all};
use motorpool_disk_burner::gpt::{Gpt, Guid};
use motorpool_disk_burner::image::Image;
use motorpool_disk_burner::layout::{self, LayoutOptions};
use motorpool_disk_burner::sign::TrustedKeys;
use motorpool_image_builder::testing::{git, have_image, sh};
use motorpool_image_builder::{BuildRequest, ManifestSigner, build};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const BASE: &str = "motorpool-test-debian:bookworm";

/// The Debian mirror apt uses here (debootstrap does not read apt's sources).
fn mirror() -> String {
    let mut sources = String::new();
    for f in [
        "/etc/apt/sources.list.d/debian.sources",
        "/etc/apt/sources.list",
    ] {
        sources.push_str(&std::fs::read_to_string(f).unwrap_or_default());
    }
    sources
        .split_whitespace()
        .find(|w| w.starts_with("http") && w.trim_end_matches('/').ends_with("/debian"))
        .unwrap_or("http://deb.debian.org/debian")
        .to_string()
}

/// [`BASE`]: Debian 12 by debootstrap, `docker import`ed, unless the engine has it already.
fn debian_base(work: &Path) {
    if have_image(BASE) {
        return;
    }
    let root = work.join("debian-root");
    sh(Command::new("debootstrap")
        .args([
            "--variant=minbase",
            // busybox: initramfs-tools only recommends it; overlayroot's scripts need its tools.
            "--include=linux-image-amd64,overlayroot,busybox",
            "bookworm",
        ])
        .arg(&root)
        .arg(mirror()));
    // What a car's image does not need and the test would copy around: the package cache.
    let _ = std::fs::remove_dir_all(root.join("var/cache/apt/archives"));
    let tar = work.join("debian.tar");
    sh(Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["--numeric-owner", "-cf"])
        .arg(&tar)
        .arg("."));
    sh(Command::new("docker").arg("import").arg(&tar).arg(BASE));
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_file(&tar);
}

#[test]
fn a_debian_image_boots_to_userspace_on_the_image_and_an_encrypted_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    debian_base(dir.path());
    let base_s = t.elapsed().as_secs_f64();

    // The repository: the fixture's Dockerfile, check script and kernel arguments.
    let repo = dir.path().join("repo");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/debian");
    std::fs::create_dir_all(repo.join("images/debian")).unwrap();
    for f in [
        "Dockerfile",
        "mp-check",
        "kernel-cmdline",
        "initramfs-e2fsprogs",
    ] {
        std::fs::copy(fixture.join(f), repo.join("images/debian").join(f)).unwrap();
    }
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "debian"]);

    let key = dir.path().join("fleet.key");
    let signer = ManifestSigner::generate();
    signer.write(&key, "").unwrap();
    let t = Instant::now();
    let built = build(
        &BuildRequest {
            repo: repo.display().to_string(),
            git_ref: "main".into(),
            dockerfile: "images/debian/Dockerfile".into(),
            context: "images/debian".into(),
            build_args: vec![("BASE".into(), BASE.into())],
            channel: "stable".into(),
            image_id: Some("debian-12".into()),
        },
        &dir.path().join("store"),
        2,
        Some(&signer),
        &|s| eprintln!("build: {s}"),
    )
    .unwrap();
    let build_s = t.elapsed().as_secs_f64();
    assert!(built.manifest.bootable);

    let drive = dir.path().join("drive.img");
    let size = 8u64 << 30;
    let mut f = std::fs::File::create(&drive).unwrap();
    f.set_len(size).unwrap();
    let disk = Guid::parse("00000000-d15c-4a1d-8b00-000000000001").unwrap();
    Gpt {
        disk_guid: disk,
        sectors: size / 512,
        partitions: vec![],
    }
    .write(&mut f)
    .unwrap();
    let t = Instant::now();
    let trusted = TrustedKeys::parse(&signer.public_line()).unwrap();
    let image = Image::load_stored(&built.dir, Some(&trusted)).unwrap();
    let r = burn_all(
        std::slice::from_ref(&drive),
        &image,
        &LayoutOptions {
            slots: 4,
            ..Default::default()
        },
        &|_, _| {},
    );
    assert!(matches!(r[0].state, DriveState::Ready { .. }), "{:?}", r[0]);
    let burn_s = t.elapsed().as_secs_f64();
    let gpt = Gpt::read(&mut std::fs::File::open(&drive).unwrap(), size / 512).unwrap();
    let slot = &layout::slots(&gpt)[0];

    let run = motorpool_disk_burner::boot::boot(&drive, Duration::from_secs(900), 1024, &|c| {
        c.contains("mp-check: done")
    })
    .unwrap_or_else(|e| panic!("{e}"));
    // The whole console, kept for whoever looks into a failure.
    let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join("debian-boot-console.txt");
    std::fs::write(&log, &run.console).unwrap();
    eprintln!("console: {}", log.display());
    let said = |what: &str| -> String {
        run.console
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("mp-check: {what} ")))
            .unwrap_or_else(|| panic!("no {what:?} in the console:\n{}", run.console))
            .trim()
            .to_string()
    };
    eprintln!(
        "debian base {base_s:.0} s, build {build_s:.0} s ({} MiB image), burn {burn_s:.1} s, \
         boot to userspace {:.1} s with {}{}",
        built.manifest.image.size >> 20,
        run.seconds,
        run.accelerator,
        run.kvm_failed
            .as_ref()
            .map(|w| format!(" (KVM failed: {w})"))
            .unwrap_or_default()
    );

    eprintln!(
        "{}",
        run.console
            .lines()
            .filter(|l| l.contains("mp-check") || l.contains("overlayroot"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The root is an overlay: the image's partition below, read-only...
    assert!(said("root").ends_with(" overlay"), "{}", said("root"));
    let lower = said("lower");
    assert!(lower.contains(" ext4 ro"), "{lower}");
    assert_eq!(
        said("lower-partuuid"),
        slot.partition.unique_guid.to_string()
    );
    assert_eq!(said("lower-writable"), "no");
    // ...and above it a dm-crypt device on the drive's overlay, named by the seed's scheme.
    assert!(
        said("upper-dm").starts_with("CRYPT-"),
        "{}",
        said("upper-dm")
    );
    let overlay = format!("55555555-{}-555555555555", &disk.to_string()[9..23]);
    assert_eq!(said("upper-partuuid"), overlay);
    assert_eq!(
        slot.overlay.as_ref().unwrap().unique_guid.to_string(),
        overlay
    );
    // A file written at runtime is in the overlay, not in the image.
    assert_eq!(said("runtime-file"), "written at runtime");
    assert_eq!(said("runtime-file-in-upper"), "yes");
    assert_eq!(said("runtime-file-in-lower"), "no");
}
