//! Helpers the burner's tests share: real ext4 images and GPT-labelled disk files.

#![allow(dead_code)] // each test binary uses its own subset

use motorpool_disk_burner::gpt::{Gpt, Guid, Partition};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const DRIVE: u64 = 1 << 30;

pub fn mkfs_image(dir: &Path, version: &str) -> PathBuf {
    let tree = dir.join(format!("tree-{version}"));
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::create_dir_all(tree.join("opt/av")).unwrap();
    std::fs::write(
        tree.join("etc/motorpool-release"),
        format!("version={version}\n"),
    )
    .unwrap();
    // Some incompressible payload, so the image has several data ranges.
    let payload: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ version.len() as u8)
        .collect();
    std::fs::write(tree.join("opt/av/stack.bin"), payload).unwrap();
    let img = dir.join(format!("{version}.ext4"));
    let mkfs = ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("mkfs.ext4 (e2fsprogs) is required");
    let out = Command::new(mkfs)
        .args(["-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg("48M")
        .env("E2FSPROGS_FAKE_TIME", "1700000000")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    img
}

pub fn drive(path: &Path, disk: Guid, partitions: Vec<Partition>) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(DRIVE).unwrap();
    let mut f = f;
    Gpt {
        disk_guid: disk,
        sectors: DRIVE / 512,
        partitions,
    }
    .write(&mut f)
    .unwrap();
}

pub fn hash_file(p: &Path) -> String {
    blake3::hash(&std::fs::read(p).unwrap())
        .to_hex()
        .to_string()
}
