//! `motorpool drives`: burn a real ext4 image onto bay drives from the command line, then look at
//! them as an operator would.

use motorpool_disk_burner::gpt::{Gpt, Guid};
use std::path::Path;
use std::process::{Command, Output};

fn motorpool(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_motorpool"))
        .args(args)
        .output()
        .expect("run motorpool")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
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
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg("16M")
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .output()
        .unwrap();
    assert!(mkfs.status.success(), "{}", text(&mkfs));

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
