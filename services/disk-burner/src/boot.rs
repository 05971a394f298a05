//! The boot test: a burned drive boots in qemu with OVMF (UEFI firmware; KVM where `/dev/kvm`
//! can be opened, software emulation otherwise) far enough to show that the master menu finds
//! every image on it.
//!
//! The drive is attached read-only (`snapshot=on`: nothing the guest does reaches it). GRUB
//! runs the master menu, whose first lines say, for every slot, whether GRUB could read the
//! image's file system and its boot config; the test reads them from the serial console and
//! stops the machine. Needs Debian's `qemu-system-x86` and `ovmf`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What the drive showed.
#[derive(Clone, Debug, PartialEq)]
pub struct BootReport {
    /// `(slot, image, status)` from the menu's `motorpool: slot N image X <status>` lines.
    pub images: Vec<(usize, String, String)>,
    pub menu_shown: bool,
    pub seconds: f64,
    /// `kvm` or `tcg` (software emulation).
    pub accelerator: &'static str,
    /// Why KVM was given up for software emulation, when `/dev/kvm` was there but failed.
    pub kvm_failed: Option<String>,
    /// The serial console, for a human when something is off.
    pub console: String,
}

/// Why the boot test could not run or failed.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("{0}")]
    Setup(String),
    #[error("the drive did not reach its menu within {waited:?}; console:\n{console}")]
    Timeout { waited: Duration, console: String },
    #[error("qemu stopped ({0})")]
    Qemu(String),
}

fn firmware() -> Result<(PathBuf, PathBuf), BootError> {
    for (code, vars) in [
        (
            "/usr/share/OVMF/OVMF_CODE_4M.fd",
            "/usr/share/OVMF/OVMF_VARS_4M.fd",
        ),
        (
            "/usr/share/OVMF/OVMF_CODE.fd",
            "/usr/share/OVMF/OVMF_VARS.fd",
        ),
    ] {
        if Path::new(code).exists() && Path::new(vars).exists() {
            return Ok((code.into(), vars.into()));
        }
    }
    Err(BootError::Setup(
        "no OVMF firmware: install Debian's ovmf".into(),
    ))
}

/// Boots `drive` until its menu has reported on `expected` slots (or every slot it lists, once
/// the menu is up), within `limit`: with KVM where `/dev/kvm` opens, and again with software
/// emulation if KVM fails (a nested or restricted KVM can refuse the guest's first instructions).
pub fn boot_test(drive: &Path, expected: usize, limit: Duration) -> Result<BootReport, BootError> {
    let run = boot(drive, limit, 256, &|text| {
        text.contains("Motorpool image") && parse(text).len() >= expected.max(1)
    })?;
    Ok(BootReport {
        images: parse(&run.console),
        menu_shown: true,
        seconds: run.seconds,
        accelerator: run.accelerator,
        kvm_failed: run.kvm_failed,
        console: run.console,
    })
}

/// What a boot printed, and how it ran.
#[derive(Clone, Debug)]
pub struct BootRun {
    pub console: String,
    pub seconds: f64,
    pub accelerator: &'static str,
    pub kvm_failed: Option<String>,
}

/// Boots `drive` (read-only) with `memory_mib` of RAM until `done` holds for its serial console
/// (checked as output arrives, and once more when the machine powers off), within `limit`: KVM
/// where `/dev/kvm` opens, software emulation if KVM fails or is not there.
pub fn boot(
    drive: &Path,
    limit: Duration,
    memory_mib: u32,
    done: &dyn Fn(&str) -> bool,
) -> Result<BootRun, BootError> {
    if accelerator() == "kvm" {
        match boot_with(drive, limit, memory_mib, "kvm", done) {
            Err(BootError::Qemu(why)) => {
                let mut r = boot_with(drive, limit, memory_mib, "tcg", done)?;
                r.kvm_failed = Some(why);
                Ok(r)
            }
            other => other,
        }
    } else {
        boot_with(drive, limit, memory_mib, "tcg", done)
    }
}

fn boot_with(
    drive: &Path,
    limit: Duration,
    memory_mib: u32,
    accelerator: &'static str,
    done: &dyn Fn(&str) -> bool,
) -> Result<BootRun, BootError> {
    let (code, vars) = firmware()?;
    let work = std::env::temp_dir().join(format!(
        "motorpool-boot-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&work).map_err(|e| BootError::Setup(e.to_string()))?;
    let vars_copy = work.join("vars.fd");
    std::fs::copy(&vars, &vars_copy)
        .map_err(|e| BootError::Setup(format!("{}: {e}", vars.display())))?;
    let errors = work.join("qemu.err");
    let stderr = std::fs::File::create(&errors).map_err(|e| BootError::Setup(e.to_string()))?;
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", accelerator])
        // Under emulation, every CPU feature qemu can emulate (AES-NI among them, which a car's
        // CPU has and an encrypted overlay uses); under KVM, qemu's default model (`host` can
        // fail on nested KVM).
        .args(if accelerator == "tcg" {
            &["-cpu", "max"][..]
        } else {
            &[][..]
        })
        .args([
            "-machine",
            "q35",
            "-m",
            &memory_mib.to_string(),
            "-display",
            "none",
            "-nodefaults",
            "-no-reboot",
        ])
        .args(["-serial", "stdio", "-monitor", "none"])
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            code.display()
        ))
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=1,file={}",
            vars_copy.display()
        ))
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,snapshot=on",
            drive.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .map_err(|e| {
            BootError::Setup(format!(
                "cannot run qemu-system-x86_64 ({e}); install Debian's qemu-system-x86"
            ))
        })?;
    let mut out = child
        .stdout
        .take()
        .ok_or_else(|| BootError::Setup("no console".into()))?;
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut console = Vec::new();
    let result = loop {
        let text = String::from_utf8_lossy(&console).into_owned();
        if done(&text) {
            break Ok(BootRun {
                console: text,
                seconds: start.elapsed().as_secs_f64(),
                accelerator,
                kvm_failed: None,
            });
        }
        // qemu gone (a guest that powered off, or qemu refused to run it), or its guest stopped
        // by a KVM error (qemu then waits, paused).
        let err = std::fs::read_to_string(&errors).unwrap_or_default();
        let exited = child.try_wait().ok().flatten();
        if exited.is_some() || err.contains("KVM internal error") {
            // What the console said last.
            while let Ok(chunk) = rx.recv_timeout(Duration::from_millis(100)) {
                console.extend(chunk);
            }
            let text = String::from_utf8_lossy(&console).into_owned();
            if done(&text) {
                continue;
            }
            let why: Vec<&str> = err
                .lines()
                .filter(|l| !l.contains("warning:"))
                .take(3)
                .collect();
            break Err(BootError::Qemu(format!(
                "{}{}; console ends: {}",
                exited.map(|s| format!("{s}: ")).unwrap_or_default(),
                why.join("; "),
                tail(&text, 2000)
            )));
        }
        if start.elapsed() > limit {
            break Err(BootError::Timeout {
                waited: limit,
                console: tail(&text, 4000),
            });
        }
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(200)) {
            console.extend(chunk);
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// The last `n` characters of `text`.
fn tail(text: &str, n: usize) -> String {
    let skip = text.chars().count().saturating_sub(n);
    text.chars().skip(skip).collect()
}

/// `kvm` when this process may use `/dev/kvm`, else `tcg`.
pub fn accelerator() -> &'static str {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if kvm { "kvm" } else { "tcg" }
}

/// The `motorpool: slot N image X <status>` lines of a console.
fn parse(text: &str) -> Vec<(usize, String, String)> {
    let mut out: Vec<(usize, String, String)> = Vec::new();
    for line in text.split(['\n', '\r']) {
        let Some(rest) = line.split("motorpool: slot ").nth(1) else {
            continue;
        };
        let mut words = rest.splitn(4, ' ');
        let (Some(n), Some("image"), Some(image), Some(status)) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            continue;
        };
        let Ok(n) = n.parse() else { continue };
        if !out.iter().any(|(m, _, _)| *m == n) {
            out.push((n, image.to_string(), status.trim().to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn menu_lines_parse() {
        let text = "\x1b[2Jmotorpool: slot 1 image av-1 found, bootable\r\nnoise\nmotorpool: slot 2 image av-2 MISSING\r\n";
        let got = super::parse(text);
        assert_eq!(
            got,
            [
                (1, "av-1".into(), "found, bootable".into()),
                (2, "av-2".into(), "MISSING".into())
            ]
        );
    }
}
