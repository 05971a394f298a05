//! The EFI system partition: a FAT file system holding GRUB (`EFI/BOOT/BOOTX64.EFI`, the path
//! firmware boots from removable drives) and the master menu (`EFI/motorpool/grub.cfg`).
//!
//! Everything is written in place on the drive at the ESP's offset, without mounting: the FAT
//! by `mkfs.vfat --offset`, files by mtools (`-i drive@@offset`). GRUB is built once per process
//! by `grub-mkstandalone` with a small embedded config that finds the ESP by its menu file,
//! turns on the serial console (what the boot test and a headless car read) and loads the menu.
//! The default image is kept in `EFI/motorpool/default`, so it survives later burns.
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

/// True when the ESP holds a FAT file system (boot signature and a FAT type string).
fn formatted(drive: &Path, offset: u64) -> Result<bool, EspError> {
    let f = std::fs::File::open(drive)?;
    let mut boot = [0u8; 512];
    f.read_exact_at(&mut boot, offset)?;
    Ok(boot[510..512] == [0x55, 0xaa] && (&boot[54..57] == b"FAT" || &boot[82..87] == b"FAT32"))
}

/// Formats the ESP if needed, installs GRUB, and writes the master menu for the drive's images.
/// `default` sets the default image (kept on the ESP); `None` keeps the one set before, if any.
pub fn install(drive: &Path, gpt: &Gpt, default: Option<&str>) -> Result<(), EspError> {
    let esp = esp_partition(gpt)?;
    let offset = esp.offset();
    let target = mtools_target(drive, offset);
    if !formatted(drive, offset)? {
        let kib = esp.len() / 1024;
        // FAT32 as UEFI recommends, where the partition is large enough for it; FAT16 (which
        // firmware reads as well) on small ones.
        let fat = if esp.len() >= 260 << 20 { "32" } else { "16" };
        tool(
            "mkfs.vfat",
            Command::new(mkfs_vfat())
                .args(["-F", fat])
                .arg(format!("--offset={}", esp.first_lba))
                .args(["-n", "MP-ESP"])
                .arg(drive)
                .arg(kib.to_string()),
        )?;
        tool(
            "mmd",
            Command::new("mmd").args(["-i", &target, "::/EFI", "::/EFI/BOOT", "::/EFI/motorpool"]),
        )?;
        let efi = grub_efi()?;
        tool(
            "mcopy",
            Command::new("mcopy")
                .args(["-o", "-i", &target])
                .arg(efi)
                .arg("::/EFI/BOOT/BOOTX64.EFI"),
        )?;
    }
    let keep = match default {
        Some(d) => Some(d.to_string()),
        None => read_default(drive, gpt)?,
    };
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
    if !formatted(drive, esp.offset())? {
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
