//! A git repository with a Dockerfile (its base image made here, no registry) becomes an ext4
//! image through the real Docker engine; the image holds the tree, boots by its own GRUB config,
//! comes out the same from the same inputs, is kept by the retention policy, and burns.

use motorpool_disk_burner::burn::{DriveState, burn_all};
use motorpool_disk_burner::gpt::{Gpt, Guid};
use motorpool_disk_burner::image::Image;
use motorpool_disk_burner::layout::LayoutOptions;
use motorpool_disk_burner::sign::TrustedKeys;
use motorpool_image_builder::testing::{base_image, git, sample_repo};
use motorpool_image_builder::{BuildError, BuildRequest, ManifestSigner, build, list};
use std::path::Path;
use std::process::Command;

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn debugfs_cat(image: &Path, file: &str) -> String {
    let debugfs = ["/usr/sbin/debugfs", "/sbin/debugfs"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap();
    sh(Command::new(debugfs)
        .args(["-R", &format!("cat {file}")])
        .arg(image))
}

#[test]
fn a_dockerfile_in_git_becomes_a_verified_bootable_image() {
    let dir = tempfile::tempdir().unwrap();
    base_image(dir.path());
    let repo = sample_repo(dir.path());
    let store = dir.path().join("store");
    let req = BuildRequest {
        repo: repo.display().to_string(),
        git_ref: "main".into(),
        dockerfile: "images/av/Dockerfile".into(),
        context: "images/av".into(),
        build_args: vec![("FLAVOR".into(), "release".into())],
        channel: "stable".into(),
        image_id: None,
    };
    let steps = std::sync::Mutex::new(Vec::new());
    let built = build(&req, &store, 2, None, &|s| {
        steps.lock().unwrap().push(s.to_string())
    })
    .unwrap();
    let m = &built.manifest;
    let commit = git(&repo, &["rev-parse", "HEAD"]);
    assert_eq!(m.commit, commit.trim());
    assert_eq!(m.image.id, format!("stable-{}", &m.commit[..12]));
    assert_eq!(m.build_args, req.build_args);
    assert!(m.bootable);
    assert!(m.image.mapped_bytes() < m.image.size, "the image is sparse");
    assert!(
        steps
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.starts_with("docker build"))
    );

    // The tree is in the file system, read without mounting.
    assert_eq!(
        debugfs_cat(&built.image, "/etc/motorpool-release"),
        "flavor=release\n"
    );
    assert_eq!(
        debugfs_cat(&built.image, "/opt/av/stack.txt"),
        "planner v1\n"
    );
    let grub = debugfs_cat(&built.image, "/boot/grub/grub.cfg");
    assert!(
        grub.contains("linux /boot/vmlinuz-6.1.0-av root=PARTUUID=$mp_root_partuuid"),
        "{grub}"
    );
    assert!(
        grub.contains("overlayroot=\"crypt:dev=/dev/disk/by-partuuid/$mp_overlay_partuuid,mkfs=1"),
        "{grub}"
    );
    assert!(grub.contains("initrd /boot/initrd.img-6.1.0-av"), "{grub}");

    // The same inputs give the same tree, timestamps included, and the same image, byte for
    // byte (a second later, so any build time would show).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let again = build(&req, &dir.path().join("store2"), 2, None, &|_| {}).unwrap();
    assert_eq!(
        again.manifest.tree_blake3, m.tree_blake3,
        "reproducible tree"
    );
    assert_eq!(again.manifest.image, m.image, "reproducible image");
    assert!(
        std::fs::read(&again.image).unwrap() == std::fs::read(&built.image).unwrap(),
        "byte-identical image files"
    );
    let fsck = Command::new(
        ["/usr/sbin/e2fsck", "/sbin/e2fsck"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap(),
    )
    .args(["-fn"])
    .arg(&again.image)
    .output()
    .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let stat = sh(Command::new(
        ["/usr/sbin/debugfs", "/sbin/debugfs"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap(),
    )
    .args(["-R", "stat /opt/av/stack.txt"])
    .arg(&built.image));
    assert!(
        stat.contains("mtime: 0x6ae729c0"),
        "mtime is the commit time (2026-11-01T12:00Z):\n{stat}"
    );

    // Retention: the newest two of the channel stay. These builds sign their manifests.
    let signer = ManifestSigner::generate();
    let trusted = TrustedKeys::parse(&signer.public_line()).unwrap();
    for v in ["v2", "v3"] {
        std::fs::write(repo.join("images/av/stack.txt"), format!("planner {v}\n")).unwrap();
        git(
            &repo,
            &[
                "-c",
                "user.name=ci",
                "-c",
                "user.email=ci@example.invalid",
                "commit",
                "-q",
                "-am",
                v,
            ],
        );
        build(&req, &store, 2, Some(&signer), &|_| {}).unwrap();
    }
    let kept = list(&store, "stable");
    assert_eq!(kept.len(), 2);
    assert!(kept.iter().all(|k| k.commit != m.commit), "the oldest went");
    assert!(!built.dir.exists());

    // A path out of the repository is refused before anything runs.
    let bad = build(
        &BuildRequest {
            dockerfile: "../../etc/Dockerfile".into(),
            ..req.clone()
        },
        &store,
        2,
        None,
        &|_| {},
    );
    assert!(
        matches!(bad, Err(BuildError::Request(ref e)) if e.contains("leaves the repository")),
        "{bad:?}"
    );
    // So is an image id or a channel that would name a directory outside its place in the store.
    for (id, channel) in [
        ("..", "stable"),
        (".", "stable"),
        ("av-1", ".."),
        ("av-1", "a/b"),
    ] {
        let bad = build(
            &BuildRequest {
                image_id: Some(id.into()),
                channel: channel.into(),
                ..req.clone()
            },
            &store,
            2,
            None,
            &|_| {},
        );
        assert!(
            matches!(bad, Err(BuildError::Request(_))),
            "{id} {channel}: {bad:?}"
        );
    }
    assert_eq!(list(&store, "stable").len(), 2, "the store is untouched");
    // An unknown ref fails at its step with git's words.
    let e = build(
        &BuildRequest {
            git_ref: "no-such-branch".into(),
            ..req.clone()
        },
        &store,
        2,
        None,
        &|_| {},
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("\"no-such-branch\" is not a branch, tag or commit of"),
        "{e}"
    );
    assert!(!e.is_infrastructure(), "{e}");

    // The newest image burns onto a drive.
    let newest = &kept[0];
    let image_dir = store.join("stable").join(&newest.image.id);
    let image = Image::load_stored(&image_dir, Some(&trusted)).unwrap();
    assert_eq!(image.manifest, newest.image);
    // The unsigned first build's directory is gone; a signature by another key is refused.
    let stranger = TrustedKeys::parse(&ManifestSigner::generate().public_line()).unwrap();
    let e = Image::load_stored(&image_dir, Some(&stranger)).unwrap_err();
    assert!(e.to_string().contains("does not trust"), "{e}");
    let drive = dir.path().join("drive.img");
    let mut f = std::fs::File::create(&drive).unwrap();
    f.set_len(1 << 30).unwrap();
    Gpt {
        disk_guid: Guid::parse("00000000-0042-4000-8000-000000000042").unwrap(),
        sectors: (1 << 30) / 512,
        partitions: vec![],
    }
    .write(&mut f)
    .unwrap();
    let r = burn_all(
        &[drive],
        &image,
        &LayoutOptions {
            esp_bytes: 32 << 20,
            ..Default::default()
        },
        &|_, _| {},
    );
    assert!(matches!(r[0].state, DriveState::Ready { .. }), "{:?}", r[0]);
}
