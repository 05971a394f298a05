//! Drive states on the chassis LEDs, through ledmon's `ledctl`, the way Flexo showed them: dark
//! when a drive goes in, blinking fast while it burns and verifies, steadily lit when it is ready
//! to be pulled and taken to a car.
//!
//! | state | `ledctl` pattern | what the operator sees (SES/SGPIO backplanes) |
//! |---|---|---|
//! | inserted, refused | `off` | dark |
//! | burning, verifying | `locate` | fast blink |
//! | ready | `failure` | steady (red on most backplanes): pull it |
//! | failed | `degraded` | slow blink: look at `motorpool drives list` |
//!
//! Only block devices have LEDs; bay files are skipped. `ledctl` runs one call at a time in its
//! own task, so a slow enclosure never holds up the bus; a failing call is logged, never fatal.

use motorpool_messages::fleet::DriveKind;
use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;

/// The `ledctl` pattern for a drive state; `None` leaves the LED as it is (a removed drive).
pub fn pattern(kind: DriveKind) -> Option<&'static str> {
    match kind {
        DriveKind::Inserted | DriveKind::Refused => Some("off"),
        DriveKind::Burning | DriveKind::Verifying => Some("locate"),
        DriveKind::Ready => Some("failure"),
        DriveKind::Failed => Some("degraded"),
        DriveKind::Removed => None,
    }
}

/// `ledctl` as configured, else from PATH.
pub fn find_ledctl(configured: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = configured {
        return Some(p.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join("ledctl"))
        .find(|p| p.is_file())
}

/// The LED driver: a queue of drive states worked by one task, which calls `ledctl` only when a
/// drive's pattern changes.
#[derive(Clone)]
pub struct Leds {
    tx: mpsc::UnboundedSender<(PathBuf, DriveKind)>,
}

impl Leds {
    /// Starts the task; `None` when there is no `ledctl`.
    pub fn start(ledctl: Option<PathBuf>) -> Option<Leds> {
        let ledctl = ledctl?;
        let (tx, mut rx) = mpsc::unbounded_channel::<(PathBuf, DriveKind)>();
        tokio::spawn(async move {
            let mut shown: HashMap<PathBuf, &'static str> = HashMap::new();
            while let Some((drive, kind)) = rx.recv().await {
                let Some(pattern) = pattern(kind) else {
                    shown.remove(&drive);
                    continue;
                };
                let is_block =
                    std::fs::metadata(&drive).is_ok_and(|m| m.file_type().is_block_device());
                if !is_block || shown.insert(drive.clone(), pattern) == Some(pattern) {
                    continue;
                }
                let arg = format!("{pattern}={}", drive.display());
                let run = tokio::process::Command::new(&ledctl)
                    .arg(&arg)
                    .kill_on_drop(true)
                    .output();
                match tokio::time::timeout(Duration::from_secs(10), run).await {
                    Ok(Ok(out)) if out.status.success() => {}
                    Ok(Ok(out)) => tracing::warn!(
                        ledctl = %ledctl.display(), %arg, status = %out.status,
                        stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                        "ledctl failed"
                    ),
                    Ok(Err(e)) => tracing::warn!(ledctl = %ledctl.display(), %arg, "ledctl: {e}"),
                    Err(_) => tracing::warn!(ledctl = %ledctl.display(), %arg, "ledctl timed out"),
                }
            }
        });
        Some(Leds { tx })
    }

    /// Shows `kind` on the drive's LED (block devices only).
    pub fn show(&self, drive: &Path, kind: DriveKind) {
        let _ = self.tx.send((drive.to_path_buf(), kind));
    }
}
