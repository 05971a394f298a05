//! `motorpool drives`: burn a real ext4 image onto bay drives from the command line, then look at
//! them as an operator would.

mod support;

use motorpool_disk_burner::gpt::{Gpt, Guid};
use std::path::Path;
use std::process::Command;
use support::{motorpool, text};

/// A 16 MiB ext4 image of `tree` at `img`.
fn mkfs_ext4(tree: &Path, img: &Path) {
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(tree)
        .arg(img)
        .arg("16M")
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .output()
        .unwrap();
    assert!(mkfs.status.success(), "{}", text(&mkfs));
}

fn drive(path: &Path, guid: &str) {
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(512 << 20).unwrap();
    Gpt {
        disk_guid: Guid::parse(guid).unwrap(),
        sectors: (512 << 20) / 512,
        partitions: vec![],
    }
    .write(&mut f)
    .unwrap();
}

#[test]
fn drives_burn_list_images_and_menu_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let bays = dir.path().join("bays");
    std::fs::create_dir_all(&bays).unwrap();
    drive(&bays.join("a.img"), "00000000-0001-4000-8000-000000000001");
    drive(&bays.join("b.img"), "00000000-0002-4000-8000-000000000002");
    drive(&bays.join("c.img"), "9a1b2c3d-0003-4000-8000-000000000003");
    let foreign = std::fs::read(bays.join("c.img")).unwrap();

    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/motorpool-release"), "v=cli\n").unwrap();
    let img = dir.path().join("img.ext4");
    mkfs_ext4(&tree, &img);

    let bays_s = bays.to_str().unwrap();
    let burn = motorpool(&[
        "drives",
        "burn",
        "--bays",
        bays_s,
        "--image",
        img.to_str().unwrap(),
        "--id",
        "av-cli-1",
        "--esp-mib",
        "16",
    ]);
    let out = text(&burn);
    assert!(burn.status.success(), "{out}");
    assert!(out.contains("2 of 3 drives ready"), "{out}");
    assert!(out.contains("REFUSED, untouched"), "{out}");
    assert!(out.contains("READY: av-cli-1 in slot 1, verified"), "{out}");
    assert_eq!(std::fs::read(bays.join("c.img")).unwrap(), foreign);

    let list = text(&motorpool(&["drives", "list", "--bays", bays_s]));
    assert!(
        list.lines()
            .any(|l| l.contains("a.img") && l.contains("yes") && l.contains("av-cli-1")),
        "{list}"
    );
    assert!(
        list.lines()
            .any(|l| l.contains("c.img") && l.contains("no (9a1b2c3d")),
        "{list}"
    );

    let a = bays.join("a.img");
    let images = text(&motorpool(&["drives", "images", a.to_str().unwrap()]));
    assert!(
        images.lines().any(|l| l.starts_with("1 ")
            && l.contains("av-cli-1")
            && l.contains("11111111-0001-0001-")),
        "{images}"
    );
    assert_eq!(
        images.lines().filter(|l| l.contains("(empty)")).count(),
        11,
        "{images}"
    );

    let menu = text(&motorpool(&["drives", "menu", a.to_str().unwrap()]));
    assert!(
        menu.contains("menuentry \"Motorpool image av-cli-1 (slot 1)\""),
        "{menu}"
    );
    let refused = motorpool(&["drives", "images", bays.join("c.img").to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("not a Motorpool drive"),
        "{}",
        text(&refused)
    );

    // Again: the drives hold the image, so it is only verified.
    let again = text(&motorpool(&[
        "drives",
        "burn",
        "--image",
        img.to_str().unwrap(),
        "--id",
        "av-cli-1",
        a.to_str().unwrap(),
    ]));
    assert!(
        again.contains("already there; verified") && again.contains("0 MiB written"),
        "{again}"
    );
}

/// A stored image as the builder leaves it: `image.ext4`, `manifest.json` and, signed,
/// `manifest.json.sig`.
fn store_image(dir: &Path, tree: &Path, id: &str, key: Option<&Path>) -> std::path::PathBuf {
    use motorpool_disk_burner::image::Image;
    use motorpool_disk_burner::sign::ManifestSigner;
    let out = dir.join(id);
    std::fs::create_dir_all(&out).unwrap();
    let img = out.join("image.ext4");
    mkfs_ext4(tree, &img);
    let manifest = Image::load(&img, id).unwrap().manifest;
    let bytes = serde_json::to_vec_pretty(&serde_json::json!({ "image": manifest })).unwrap();
    std::fs::write(out.join("manifest.json"), &bytes).unwrap();
    if let Some(key) = key {
        let sig = ManifestSigner::read(key).unwrap().sign(&bytes);
        std::fs::write(out.join("manifest.json.sig"), sig).unwrap();
    }
    out
}

#[test]
fn corrupted_or_unsigned_images_are_refused_before_any_drive_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let bays = dir.path().join("bays");
    std::fs::create_dir_all(&bays).unwrap();
    drive(&bays.join("a.img"), "00000000-0011-4000-8000-000000000001");
    let key = dir.path().join("fleet.key");
    let made = motorpool(&["image", "keygen", "--out", key.to_str().unwrap()]);
    assert!(made.status.success(), "{}", text(&made));
    let trusted = format!("{}.pub", key.display());
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("opt/av")).unwrap();
    let payload: Vec<u8> = (0..2_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(tree.join("opt/av/stack.bin"), &payload).unwrap();
    let store = dir.path().join("store");
    let bays_s = bays.to_str().unwrap();
    let burn = |image: &Path| {
        motorpool(&[
            "drives",
            "burn",
            "--bays",
            bays_s,
            "--esp-mib",
            "16",
            "--trusted-keys",
            &trusted,
            "--image",
            image.to_str().unwrap(),
        ])
    };
    let before = std::fs::read(bays.join("a.img")).unwrap();

    // Each way an image file goes bad, on a signed image.
    type Damage = fn(&Path, &[u8]);
    let cases: [(&str, Damage, &str); 5] = [
        (
            "bit-rot",
            |img, _| {
                // One bit in the payload's data, far from the superblock.
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(img)
                    .unwrap();
                use std::os::unix::fs::FileExt;
                let mut at = 1 << 20;
                let mut b = [0u8; 1];
                loop {
                    f.read_exact_at(&mut b, at).unwrap();
                    if b[0] != 0 {
                        break;
                    }
                    at += 4096;
                }
                f.write_all_at(&[b[0] ^ 0x10], at).unwrap();
            },
            "the file is corrupt",
        ),
        (
            "zeroed-superblock",
            |img, _| {
                use std::os::unix::fs::FileExt;
                let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
                f.write_all_at(&[0u8; 1024], 1024).unwrap();
            },
            "the file is corrupt",
        ),
        (
            "truncated",
            |img, _| {
                let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
                f.set_len(f.metadata().unwrap().len() / 2).unwrap();
            },
            "truncated or replaced",
        ),
        (
            "random",
            |img, _| {
                let len = std::fs::metadata(img).unwrap().len() as usize;
                let noise: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
                std::fs::write(img, noise).unwrap();
            },
            "the file is corrupt",
        ),
        (
            "empty",
            |img, _| std::fs::write(img, b"").unwrap(),
            "truncated or replaced",
        ),
    ];
    for (name, damage, why) in cases {
        let stored = store_image(&store, &tree, &format!("av-{name}"), Some(&key));
        let ok = burn(&stored);
        assert!(ok.status.success(), "{name} before damage: {}", text(&ok));
        damage(&stored.join("image.ext4"), &payload);
        let bad = burn(&stored);
        let out = text(&bad);
        assert!(!bad.status.success(), "{name}: {out}");
        assert!(
            out.contains("image refused, no drive touched") && out.contains(why),
            "{name}: {out}"
        );
    }
    let after_good_burns = std::fs::read(bays.join("a.img")).unwrap();
    assert_ne!(before, after_good_burns);

    // A manifest changed after signing (its size, here), an unsigned image, another key's.
    let stored = store_image(&store, &tree, "av-tampered", Some(&key));
    let m = stored.join("manifest.json");
    let edited = std::fs::read_to_string(&m)
        .unwrap()
        .replacen("\"size\": ", "\"size\": 1", 1);
    std::fs::write(&m, edited).unwrap();
    let out = text(&burn(&stored));
    assert!(out.contains("changed after signing"), "{out}");
    let unsigned = store_image(&store, &tree, "av-unsigned", None);
    let out = text(&burn(&unsigned));
    assert!(out.contains("not signed"), "{out}");
    let other = dir.path().join("other.key");
    assert!(
        motorpool(&["image", "keygen", "--out", other.to_str().unwrap()])
            .status
            .success()
    );
    let foreign = store_image(&store, &tree, "av-foreign", Some(&other));
    let out = text(&burn(&foreign));
    assert!(out.contains("does not trust"), "{out}");
    assert_eq!(
        std::fs::read(bays.join("a.img")).unwrap(),
        after_good_burns,
        "no refused image touched the drive"
    );

    // A bare file that is not ext4 is refused too; `drives images | head` ends quietly.
    let noise = dir.path().join("noise.img");
    std::fs::write(&noise, vec![7u8; 1 << 20]).unwrap();
    let out = motorpool(&[
        "drives",
        "burn",
        "--bays",
        bays_s,
        "--image",
        noise.to_str().unwrap(),
        "--id",
        "av-noise",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("not an ext4 file system"),
        "{}",
        text(&out)
    );
    // Its output into a pipe nobody reads any more (`| head` after its line): no panic.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let piped = Command::new(env!("CARGO_BIN_EXE_motorpool"))
        .args(["drives", "images", bays.join("a.img").to_str().unwrap()])
        .stdout(writer)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&piped.stderr).contains("panicked"),
        "{}",
        String::from_utf8_lossy(&piped.stderr)
    );
    let missing = motorpool(&["drives", "list", "--bays", "/no/such/bays"]);
    assert!(
        text(&missing).contains("/no/such/bays"),
        "{}",
        text(&missing)
    );
}
