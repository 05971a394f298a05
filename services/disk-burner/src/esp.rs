//! The EFI system partition: a FAT file system holding GRUB (`EFI/BOOT/BOOTX64.EFI`, the path
//! firmware boots from removable drives) and the master menu (`EFI/motorpool/grub.cfg`).
//!
//! Nothing is mounted. The FAT is made in a file of the ESP's exact size (`mkfs.vfat` with the
//! cluster size chosen here, so the count of clusters fits the FAT type whatever the drive's
//! size: `mkfs.vfat --offset` on the drive itself sizes clusters for the whole drive, which left
//! FAT32 with too few clusters on drives over 8 GiB), GRUB is copied into it, and its data
//! extents are written to the drive at the ESP's offset. Later changes (the menu, the default)
//! go in place through mtools (`-i drive@@offset`). An ESP whose boot sector does not describe a
//! valid FAT inside the partition ([`fat_geometry`]) counts as unformatted and is made again.
//!
//! GRUB is built once per process by `grub-mkstandalone` with a small embedded config that finds
//! the ESP by its menu file, turns on the serial console (what the boot test and a headless car
//! read) and loads the menu. The default image is kept in `EFI/motorpool/default`, so it
//! survives later burns.
//!
//! Needs Debian's `dosfstools`, `mtools` and `grub-efi-amd64-bin`.

use crate::gpt::{Gpt, SECTOR};
use crate::grub::master_config;
use crate::layout::{self, Kind};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Why the ESP could not be written.
#[derive(Debug, thiserror::Error)]
pub enum EspError {
    #[error("{tool}: {message}")]
    Tool { tool: &'static str, message: String },
    #[error("the drive has no ESP")]
    NoEsp,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

const MENU: &str = "::/EFI/motorpool/grub.cfg";
const DEFAULT: &str = "::/EFI/motorpool/default";

fn tool(name: &'static str, cmd: &mut Command) -> Result<String, EspError> {
    let out = cmd.output().map_err(|e| EspError::Tool {
        tool: name,
        message: format!("cannot run it ({e}); install dosfstools, mtools and grub-efi-amd64-bin"),
    })?;
    if !out.status.success() {
        return Err(EspError::Tool {
            tool: name,
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// GRUB for x86_64 UEFI with the embedded config, built once.
fn grub_efi() -> Result<&'static Path, EspError> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("motorpool-grub-{}", std::process::id()));
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let cfg = dir.join("embedded.cfg");
            std::fs::write(
                &cfg,
                "serial --unit=0 --speed=115200\n\
                 terminal_input serial console\n\
                 terminal_output serial console\n\
                 search --no-floppy --set=root --file /EFI/motorpool/grub.cfg\n\
                 configfile /EFI/motorpool/grub.cfg\n",
            )
            .map_err(|e| e.to_string())?;
            let efi = dir.join("BOOTX64.EFI");
            tool(
                "grub-mkstandalone",
                Command::new("grub-mkstandalone")
                    .args(["-O", "x86_64-efi", "--locales=", "--fonts=", "--themes="])
                    .arg("--modules=part_gpt fat ext2 regexp configfile normal serial terminal echo test search search_fs_file linux")
                    .arg("-o")
                    .arg(&efi)
                    .arg(format!("boot/grub/grub.cfg={}", cfg.display())),
            )
            .map_err(|e| e.to_string())?;
            Ok(efi)
        })
        .as_ref()
        .map(|p| p.as_path())
        .map_err(|message| EspError::Tool {
            tool: "grub-mkstandalone",
            message: message.clone(),
        })
}

fn esp_partition(gpt: &Gpt) -> Result<&crate::gpt::Partition, EspError> {
    gpt.partitions
        .iter()
        .find(|p| layout::kind(p) == Some(Kind::Esp))
        .ok_or(EspError::NoEsp)
}

/// `drive@@offset`, mtools' way to address a file system inside a disk.
fn mtools_target(drive: &Path, offset: u64) -> String {
    format!("{}@@{offset}", drive.display())
}

/// What a FAT boot sector describes (Microsoft's FAT specification, "FAT type determination").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FatGeometry {
    /// 12, 16 or 32: decided by the count of clusters, as every FAT driver decides it.
    pub fat_type: u8,
    pub clusters: u64,
    pub bytes: u64,
    pub sectors_per_cluster: u8,
}

/// The FAT a boot sector describes, when it describes a valid one that fits in `room` bytes:
/// sane fields, and a layout (FAT32's or FAT12/16's) that matches the type its cluster count
/// makes it. `None` for anything else, including today's bug: a FAT32 layout with fewer than
/// 65,525 clusters, which mtools and firmware refuse.
pub fn fat_geometry(boot: &[u8; 512], room: u64) -> Option<FatGeometry> {
    let u16_at = |i: usize| u16::from_le_bytes([boot[i], boot[i + 1]]) as u64;
    let u32_at =
        |i: usize| u32::from_le_bytes([boot[i], boot[i + 1], boot[i + 2], boot[i + 3]]) as u64;
    if boot[510..512] != [0x55, 0xaa] {
        return None;
    }
    let bps = u16_at(11);
    let spc = boot[13];
    let (reserved, fats, root_entries) = (u16_at(14), boot[16] as u64, u16_at(17));
    let total = if u16_at(19) != 0 {
        u16_at(19)
    } else {
        u32_at(32)
    };
    let fat_sectors = if u16_at(22) != 0 {
        u16_at(22)
    } else {
        u32_at(36)
    };
    if !matches!(bps, 512 | 1024 | 2048 | 4096)
        || !spc.is_power_of_two()
        || reserved == 0
        || !(1..=2).contains(&fats)
        || total == 0
        || fat_sectors == 0
    {
        return None;
    }
    let root_sectors = (root_entries * 32).div_ceil(bps);
    let data = total.checked_sub(reserved + fats * fat_sectors + root_sectors)?;
    let clusters = data / spc as u64;
    let fat_type = match clusters {
        0..4085 => 12,
        4085..65525 => 16,
        _ => 32,
    };
    // FAT32's layout (no fixed root directory, the 32-bit FAT size) for FAT32 only.
    let fat32_layout = root_entries == 0 && u16_at(22) == 0;
    if fat32_layout != (fat_type == 32) || total * bps > room {
        return None;
    }
    // The FAT must have an entry for every cluster.
    let entry_bits: u64 = match fat_type {
        12 => 12,
        16 => 16,
        _ => 32,
    };
    if fat_sectors * bps * 8 < (clusters + 2) * entry_bits {
        return None;
    }
    Some(FatGeometry {
        fat_type,
        clusters,
        bytes: total * bps,
        sectors_per_cluster: spc,
    })
}

/// The valid FAT at `offset` on the drive, if there is one.
fn formatted(drive: &Path, offset: u64, room: u64) -> Result<Option<FatGeometry>, EspError> {
    let f = std::fs::File::open(drive)?;
    let mut boot = [0u8; 512];
    f.read_exact_at(&mut boot, offset)?;
    Ok(fat_geometry(&boot, room))
}

/// FAT type and sectors per cluster for a FAT of `sectors` 512-byte sectors: FAT32 as UEFI
/// recommends wherever it can have the clusters it needs (at least 65,525, with a margin),
/// the largest clusters up to 4 KiB that allow it; FAT16 below that.
fn fat_params(sectors: u64) -> Result<(u8, u8), EspError> {
    const MARGIN: u64 = 70_000; // over FAT32's 65,525 after reserved sectors and the FATs
    if let Some(spc) = [8u8, 4, 2, 1]
        .into_iter()
        .find(|&s| sectors / s as u64 >= MARGIN)
    {
        return Ok((32, spc));
    }
    // FAT16: 4,085 to 65,524 clusters.
    [1u8, 2, 4, 8, 16, 32, 64]
        .into_iter()
        .find(|&s| sectors / (s as u64) < 65_000)
        .filter(|&s| sectors / s as u64 > 4_500)
        .map(|s| (16, s))
        .ok_or_else(|| EspError::Tool {
            tool: "mkfs.vfat",
            message: format!(
                "an ESP of {} bytes cannot hold a FAT16 or FAT32 file system",
                sectors * 512
            ),
        })
}

/// Makes the ESP's FAT (with GRUB in it) in a file of the partition's size, then writes the
/// file's data to the drive at the partition's offset.
fn format(drive: &Path, gpt: &Gpt, esp: &crate::gpt::Partition) -> Result<(), EspError> {
    let dir = tempfile_dir()?;
    let result = (|| {
        let fs = dir.join("esp.fat");
        std::fs::File::create(&fs)?.set_len(esp.len())?;
        let (fat, spc) = fat_params(esp.len() / SECTOR)?;
        // The volume id from the disk GUID: the same drive gets the same ESP.
        let volid = hex::encode(&gpt.disk_guid.0[12..16]);
        tool(
            "mkfs.vfat",
            Command::new(mkfs_vfat())
                .args(["-F", &fat.to_string(), "-s", &spc.to_string(), "-S", "512"])
                .args(["-h", &esp.first_lba.to_string(), "-i", &volid])
                .args(["-n", "MP-ESP", "--invariant"])
                .arg(&fs),
        )?;
        let target = mtools_target(&fs, 0);
        tool(
            "mmd",
            Command::new("mmd").args(["-i", &target, "::/EFI", "::/EFI/BOOT", "::/EFI/motorpool"]),
        )?;
        tool(
            "mcopy",
            Command::new("mcopy")
                .args(["-o", "-i", &target])
                .arg(grub_efi()?)
                .arg("::/EFI/BOOT/BOOTX64.EFI"),
        )?;
        let src = std::fs::File::open(&fs)?;
        let out = std::fs::OpenOptions::new().write(true).open(drive)?;
        // The old boot sector goes first: a copy cut short leaves no valid-looking FAT behind.
        out.write_all_at(&[0u8; 512], esp.offset())?;
        let mut buf = vec![0u8; 1 << 20];
        for (off, len) in crate::image::data_extents(&src, esp.len())? {
            let end = (off + len).min(esp.len());
            let mut at = off;
            while at < end {
                let n = ((end - at) as usize).min(buf.len());
                src.read_exact_at(&mut buf[..n], at)?;
                let skip = if at == 0 { n.min(512) } else { 0 };
                out.write_all_at(&buf[skip..n], esp.offset() + at + skip as u64)?;
                at += n as u64;
            }
        }
        out.sync_data()?;
        // The boot sector last.
        let mut boot = [0u8; 512];
        src.read_exact_at(&mut boot, 0)?;
        out.write_all_at(&boot, esp.offset())?;
        out.sync_data()?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Formats the ESP if it holds no valid FAT, installs GRUB, and writes the master menu for the
/// drive's images. `default` sets the default image (kept on the ESP); `None` keeps the one set
/// before, if any.
pub fn install(drive: &Path, gpt: &Gpt, default: Option<&str>) -> Result<(), EspError> {
    let esp = esp_partition(gpt)?;
    let offset = esp.offset();
    let target = mtools_target(drive, offset);
    let keep = match default {
        Some(d) => Some(d.to_string()),
        None => read_default(drive, gpt)?,
    };
    if formatted(drive, offset, esp.len())?.is_none() {
        format(drive, gpt, esp)?;
    }
    let dir = tempfile_dir()?;
    let menu = dir.join("grub.cfg");
    std::fs::write(&menu, master_config(gpt, keep.as_deref()))?;
    tool(
        "mcopy",
        Command::new("mcopy")
            .args(["-o", "-i", &target])
            .arg(&menu)
            .arg(MENU),
    )?;
    if let Some(d) = &keep {
        let f = dir.join("default");
        std::fs::write(&f, d)?;
        tool(
            "mcopy",
            Command::new("mcopy")
                .args(["-o", "-i", &target])
                .arg(&f)
                .arg(DEFAULT),
        )?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .open(drive)
        .and_then(|f| f.sync_all());
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf, EspError> {
    let d = std::env::temp_dir().join(format!(
        "motorpool-esp-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// The default image recorded on the ESP.
pub fn read_default(drive: &Path, gpt: &Gpt) -> Result<Option<String>, EspError> {
    let esp = esp_partition(gpt)?;
    if formatted(drive, esp.offset(), esp.len())?.is_none() {
        return Ok(None);
    }
    let out = Command::new("mtype")
        .args(["-i", &mtools_target(drive, esp.offset()), DEFAULT])
        .output()?;
    Ok(out
        .status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty()))
}

/// The master menu as it is on the drive's ESP.
pub fn read_menu(drive: &Path, gpt: &Gpt) -> Result<String, EspError> {
    let esp = esp_partition(gpt)?;
    tool(
        "mtype",
        Command::new("mtype").args(["-i", &mtools_target(drive, esp.offset()), MENU]),
    )
}

fn mkfs_vfat() -> &'static str {
    ["/usr/sbin/mkfs.vfat", "/sbin/mkfs.vfat"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("mkfs.vfat")
}

/// Sectors of the drive at `path` (files and block devices).
pub fn sectors(path: &Path) -> std::io::Result<u64> {
    use std::io::Seek;
    let mut f = std::fs::File::open(path)?;
    Ok(f.seek(std::io::SeekFrom::End(0))? / SECTOR)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A boot sector with the given BPB fields.
    fn boot(
        spc: u8,
        reserved: u16,
        root_entries: u16,
        total: u32,
        fat16: u16,
        fat32: u32,
    ) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[11..13].copy_from_slice(&512u16.to_le_bytes());
        b[13] = spc;
        b[14..16].copy_from_slice(&reserved.to_le_bytes());
        b[16] = 2;
        b[17..19].copy_from_slice(&root_entries.to_le_bytes());
        b[22..24].copy_from_slice(&fat16.to_le_bytes());
        b[32..36].copy_from_slice(&total.to_le_bytes());
        b[36..40].copy_from_slice(&fat32.to_le_bytes());
        b[510] = 0x55;
        b[511] = 0xaa;
        b
    }

    #[test]
    fn a_fat32_layout_with_too_few_clusters_is_not_a_valid_fat() {
        let room = 300 << 20;
        // What `mkfs.vfat -F 32 --offset` wrote into a 300 MiB ESP on a 24 GiB drive:
        // 16 KiB clusters, 19,188 of them, too few for FAT32.
        let bug = boot(32, 32, 0, 614_376, 0, 160);
        assert_eq!(fat_geometry(&bug, room), None);
        // The same partition with 512-byte clusters: a FAT32.
        let good = boot(1, 32, 0, 614_376, 0, 4_800);
        let g = fat_geometry(&good, room).unwrap();
        assert_eq!((g.fat_type, g.sectors_per_cluster), (32, 1));
        assert!(g.clusters >= 65_525, "{g:?}");
        // A FAT too small for its clusters, a file system larger than its partition, no
        // signature, zeros: none is a FAT.
        assert_eq!(fat_geometry(&boot(1, 32, 0, 614_376, 0, 100), room), None);
        assert_eq!(fat_geometry(&good, room / 2), None);
        let mut unsigned = good;
        unsigned[510] = 0;
        assert_eq!(fat_geometry(&unsigned, room), None);
        assert_eq!(fat_geometry(&[0u8; 512], room), None);
        // FAT16 with a root directory and a 16-bit FAT size.
        let fat16 = boot(4, 4, 512, 200_000, 200, 0);
        assert_eq!(fat_geometry(&fat16, room).map(|g| g.fat_type), Some(16));
    }

    #[test]
    fn cluster_sizes_fit_the_fat_type_for_every_esp_size() {
        for mib in [32u64, 64, 100, 260, 300, 512, 1024, 4096] {
            let sectors = (mib << 20) / 512;
            let (fat, spc) = fat_params(sectors).unwrap();
            let clusters = sectors / spc as u64;
            match fat {
                32 => assert!(clusters >= 70_000, "{mib} MiB: {clusters} clusters"),
                _ => assert!((4_500..65_000).contains(&clusters), "{mib} MiB: {clusters}"),
            }
        }
        assert!(fat_params((1 << 20) / 512).is_err());
    }
}
