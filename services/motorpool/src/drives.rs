//! `motorpool drives`: look at boot drives and burn images onto them.
//!
//! - `drives list` shows each drive (a bay directory's files or block devices named on the command
//!   line): size, whether it is a Motorpool drive, its images.
//! - `drives images <drive>` lists a drive's slots; `drives menu <drive>` prints its master GRUB
//!   menu; `drives set-default <drive> <image>` changes the image it boots; `drives boot-test
//!   <drive>` boots it in qemu until the menu has found every image.
//! - `drives watch --nats-url URL` shows the drives of running burners, as they publish them in the
//!   KV bucket `mp_v1_fleet_drives`, with a progress bar per drive.
//! - `drives burn --image <store>/<channel>/<id>` burns a stored image (checked against its
//!   manifest, and its signature with `--trusted-keys`, before any drive is touched) onto every
//!   given drive in parallel with a progress bar per drive (the role Flexo gave to chassis LEDs);
//!   drives that are not Motorpool's are reported and left untouched. `--image FILE --id ID`
//!   burns a bare ext4 file, which has no manifest to be checked against.

use clap::{Args, Subcommand};
use motorpool_disk_burner::boot::boot_test;
use motorpool_disk_burner::burn::{DriveState, burn_all, read_slot_record, scan_bays};
use motorpool_disk_burner::esp;
use motorpool_disk_burner::gpt::{Gpt, SECTOR};
use motorpool_disk_burner::image::Image;
use motorpool_disk_burner::layout::{self, LayoutOptions};
use motorpool_disk_burner::sign::TrustedKeys;
use motorpool_messages::fleet::{DriveKind, DriveStatus};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum DrivesCommand {
    /// List drives: size, Motorpool or not, images.
    List(Which),
    /// List a drive's image slots.
    Images { drive: PathBuf },
    /// Print a drive's master GRUB menu, as its ESP holds it.
    Menu { drive: PathBuf },
    /// Make an image the one the drive boots by default.
    SetDefault { drive: PathBuf, image: String },
    /// Boot the drive in qemu with OVMF until its menu has found every image (read-only).
    BootTest {
        drive: PathBuf,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout_s: u64,
    },
    /// Burn an image onto drives in parallel, verified by reading back.
    Burn(BurnArgs),
    /// Watch the drives of running burners (`motorpool disk-burner`) over the bus, with a
    /// progress bar per drive.
    Watch(WatchArgs),
}

/// How a command line reaches the bus.
#[derive(Args)]
pub struct BusArgs {
    /// NATS server URL.
    #[arg(
        long,
        env = "MOTORPOOL_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    /// The nkey seed to connect with, where the bus needs one.
    #[arg(long, env = "MOTORPOOL_NATS_NKEY_FILE")]
    nats_nkey_file: Option<PathBuf>,
    /// PEM CA of that NATS, where it speaks TLS.
    #[arg(long, env = "MOTORPOOL_NATS_TLS_CA_FILE")]
    nats_tls_ca_file: Option<PathBuf>,
}

impl BusArgs {
    pub async fn connect(&self, name: &str) -> anyhow::Result<motorpool_bus::Bus> {
        Ok(motorpool_bus::Bus::connect_service(
            &self.nats_url,
            name,
            self.nats_nkey_file.as_deref(),
            self.nats_tls_ca_file.as_deref(),
            Duration::from_secs(5),
        )
        .await?)
    }
}

#[derive(Args)]
pub struct WatchArgs {
    #[command(flatten)]
    bus: BusArgs,
    /// Only this burner's drives.
    #[arg(long)]
    burner: Option<String>,
    /// Print the drives once and exit.
    #[arg(long)]
    once: bool,
}

#[derive(Args)]
pub struct Which {
    /// A directory whose files (or block devices) are drives, as hot-plug bays.
    #[arg(long)]
    bays: Option<PathBuf>,
    /// Drives by path.
    drives: Vec<PathBuf>,
}

#[derive(Args)]
pub struct BurnArgs {
    #[command(flatten)]
    which: Which,
    /// The image: its directory in the image store (`<store>/<channel>/<id>`, with
    /// `manifest.json`), or a bare ext4 file (with `--id`).
    #[arg(long)]
    image: PathBuf,
    /// A bare image file's id (1-27 of [A-Za-z0-9._-]); it names the slot.
    #[arg(long)]
    id: Option<String>,
    /// Public keys whose signatures are accepted (`motorpool image keygen` writes them): a
    /// stored image must then be signed by one of them.
    #[arg(long, env = "MOTORPOOL_FLEET_TRUSTED_KEYS_FILE")]
    trusted_keys: Option<PathBuf>,
    /// Size of the ESP made when a marked drive is laid out, MiB.
    #[arg(long, default_value_t = 300)]
    esp_mib: u64,
    /// Image slots made when a marked drive is laid out (1-12).
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u64).range(1..=12))]
    slots: u64,
    /// The overlay's share of a drive laid out, percent.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=90))]
    overlay_percent: u64,
}

fn drives(w: &Which) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = w.drives.clone();
    if let Some(b) = &w.bays {
        out.extend(scan_bays(b)?);
    }
    anyhow::ensure!(!out.is_empty(), "no drives: name some, or --bays DIR");
    Ok(out)
}

fn read_gpt(p: &Path) -> anyhow::Result<Result<Gpt, String>> {
    use std::io::Seek;
    let mut f = std::fs::File::open(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    let size = f.seek(std::io::SeekFrom::End(0))?;
    Ok(Gpt::read(&mut f, size / SECTOR).map_err(|e| e.to_string()))
}

/// The drive's table, when it is a Motorpool drive.
fn ours(drive: &Path) -> anyhow::Result<Gpt> {
    let gpt = read_gpt(drive)?.map_err(|e| anyhow::anyhow!("{}: {e}", drive.display()))?;
    anyhow::ensure!(
        layout::is_motorpool(&gpt),
        "{}: not a Motorpool drive (disk GUID {})",
        drive.display(),
        gpt.disk_guid
    );
    Ok(gpt)
}

pub fn main(cmd: DrivesCommand) -> anyhow::Result<()> {
    crate::quiet_broken_pipe();
    match cmd {
        DrivesCommand::List(w) => {
            println!("{:<40} {:>10}  {:<10} images", "drive", "size", "motorpool");
            for d in drives(&w)? {
                let size = std::fs::File::open(&d)
                    .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
                    .unwrap_or(0);
                let (ours, images) = match read_gpt(&d)? {
                    Ok(g) if layout::is_motorpool(&g) => (
                        "yes".to_string(),
                        layout::slots(&g)
                            .into_iter()
                            .filter_map(|s| s.image)
                            .collect::<Vec<_>>()
                            .join(", "),
                    ),
                    Ok(g) => (format!("no ({})", g.disk_guid), String::new()),
                    Err(e) => (format!("no ({e})"), String::new()),
                };
                println!(
                    "{:<40} {:>9}M  {:<10} {images}",
                    d.display(),
                    size >> 20,
                    ours
                );
            }
            Ok(())
        }
        DrivesCommand::Images { drive } => {
            let gpt = read_gpt(&drive)?.map_err(|e| anyhow::anyhow!("{}: {e}", drive.display()))?;
            anyhow::ensure!(
                layout::is_motorpool(&gpt),
                "{}: not a Motorpool drive (disk GUID {})",
                drive.display(),
                gpt.disk_guid
            );
            let file = std::fs::File::open(&drive)
                .map_err(|e| anyhow::anyhow!("{}: {e}", drive.display()))?;
            let chosen = esp::read_default(&drive, &gpt).ok().flatten();
            let default = motorpool_disk_burner::grub::boots_by_default(&gpt, chosen.as_deref());
            println!(
                "{:<5} {:<28} {:>9}  {:<38} {:<16} overlay",
                "slot", "image", "size", "partuuid", "blake3"
            );
            for s in layout::slots(&gpt) {
                let record = read_slot_record(&file, &s.partition);
                println!(
                    "{:<5} {:<28} {:>8}M  {:<38} {:<16} {}{}",
                    s.number,
                    s.image.as_deref().unwrap_or("(empty)"),
                    s.partition.len() >> 20,
                    s.partition.unique_guid.to_string(),
                    record
                        .filter(|r| s.image.as_ref() == Some(&r.id))
                        .map(|r| r.blake3[..16].to_string())
                        .unwrap_or_else(|| "-".into()),
                    s.overlay
                        .map(|o| o.unique_guid.to_string())
                        .unwrap_or_default(),
                    if default == Some(s.number) {
                        "  (default)"
                    } else {
                        ""
                    }
                );
            }
            Ok(())
        }
        DrivesCommand::Menu { drive } => {
            let gpt = ours(&drive)?;
            print!("{}", esp::read_menu(&drive, &gpt)?);
            Ok(())
        }
        DrivesCommand::SetDefault { drive, image } => {
            let gpt = ours(&drive)?;
            let images: Vec<String> = layout::slots(&gpt)
                .into_iter()
                .filter_map(|s| s.image)
                .collect();
            anyhow::ensure!(
                images.contains(&image),
                "{}: no image {image:?} on this drive (it has: {})",
                drive.display(),
                images.join(", ")
            );
            esp::install(&drive, &gpt, Some(&image))?;
            println!("{}: boots {image} by default", drive.display());
            Ok(())
        }
        DrivesCommand::BootTest { drive, timeout_s } => {
            let gpt = ours(&drive)?;
            let expected = layout::slots(&gpt)
                .iter()
                .filter(|s| s.image.is_some())
                .count();
            println!(
                "Booting {} in qemu (OVMF, {}; read-only)...",
                drive.display(),
                match motorpool_disk_burner::boot::accelerator() {
                    "kvm" => "KVM",
                    _ => "software emulation: /dev/kvm is not usable here",
                }
            );
            anyhow::ensure!(
                expected > 0,
                "{}: no image on the drive to boot",
                drive.display()
            );
            let report = boot_test(&drive, expected, Duration::from_secs(timeout_s))?;
            if let Some(why) = &report.kvm_failed {
                println!("  KVM failed here ({why}); booted with software emulation instead");
            }
            for (slot, image, status) in &report.images {
                println!("  slot {slot:<2} {image:<28} {status}");
            }
            let found = report
                .images
                .iter()
                .filter(|i| i.2.starts_with("found"))
                .count();
            println!(
                "The menu came up after {:.1} s and found {found} of {expected} images",
                report.seconds
            );
            anyhow::ensure!(
                report.images.len() == expected && found == expected,
                "the menu did not find every image"
            );
            let bootable = report
                .images
                .iter()
                .filter(|i| i.2 == "found, bootable")
                .count();
            anyhow::ensure!(
                bootable > 0,
                "no image on the drive has a boot config (/boot/grub/grub.cfg): nothing would boot"
            );
            Ok(())
        }
        DrivesCommand::Burn(a) => burn(a),
        DrivesCommand::Watch(a) => tokio::runtime::Handle::current().block_on(watch(a)),
    }
}

/// One line for a drive as its burner published it.
fn describe_status(s: &DriveStatus) -> String {
    let what = match s.kind {
        DriveKind::Inserted => "inserted".to_string(),
        DriveKind::Refused => format!("REFUSED, untouched: {}", s.reason),
        DriveKind::Burning => format!(
            "burning {} into slot {} {}",
            s.image,
            s.slot,
            bar(s.done, s.total)
        ),
        DriveKind::Verifying => format!(
            "verifying {} in slot {} {}",
            s.image,
            s.slot,
            bar(s.done, s.total)
        ),
        DriveKind::Ready => format!("READY: {} in slot {}", s.image, s.slot),
        DriveKind::Failed => format!("FAILED: {}", s.reason),
        DriveKind::Removed => "removed".to_string(),
    };
    format!("{:<12} {:<32} {what}", s.burner, s.drive)
}

async fn watch(a: WatchArgs) -> anyhow::Result<()> {
    use futures::{StreamExt, TryStreamExt};
    use motorpool_bus::subjects::fleet;
    let bus = a.bus.connect("motorpool-drives-watch").await?;
    let kv = bus.ensure_kv(fleet::drives_config()).await?;
    let mine = |s: &DriveStatus| a.burner.as_ref().is_none_or(|b| *b == s.burner);
    let mut drives: BTreeMap<String, DriveStatus> = BTreeMap::new();
    if a.once {
        let keys: Vec<String> = kv.keys().await?.try_collect().await?;
        for k in keys {
            if let Some(v) = kv.get(&k).await?
                && let Ok(s) = motorpool_messages::codec::decode::<DriveStatus>(&v)
                && mine(&s)
            {
                drives.insert(k, s);
            }
        }
        if drives.is_empty() {
            println!("no drives");
        }
        for s in drives.values() {
            println!("{}", describe_status(s));
        }
        return Ok(());
    }
    // The latest state of every drive, then each change as it happens.
    let mut updates = kv.watch_all_from_revision(1).await?;
    let tty = std::io::stdout().is_terminal();
    let mut drawn = 0usize;
    let mut redraw = tokio::time::interval(Duration::from_millis(200));
    let mut dirty = false;
    loop {
        tokio::select! {
            e = updates.next() => {
                let Some(e) = e else { return Ok(()) };
                let e = e?;
                if let Ok(s) = motorpool_messages::codec::decode::<DriveStatus>(&e.value)
                    && mine(&s)
                {
                    if !tty && drives.get(&e.key).map(|p| p.kind) != Some(s.kind) {
                        println!("{}", describe_status(&s));
                    }
                    drives.insert(e.key, s);
                    dirty = true;
                }
            }
            _ = redraw.tick(), if tty && dirty => {
                if drawn > 0 {
                    print!("\x1b[{drawn}A");
                }
                for s in drives.values() {
                    println!("\x1b[2K{}", describe_status(s));
                }
                drawn = drives.len();
                dirty = false;
                let _ = std::io::stdout().flush();
            }
        }
    }
}

fn bar(done: u64, total: u64) -> String {
    let width = 24usize;
    let filled = if total > 0 {
        (done as usize * width / total as usize).min(width)
    } else {
        0
    };
    format!(
        "[{}{}] {:>3}%",
        "#".repeat(filled),
        "-".repeat(width - filled),
        (done * 100).checked_div(total).unwrap_or(0)
    )
}

fn describe(s: &DriveState) -> String {
    match s {
        DriveState::Inserted => "inserted".into(),
        DriveState::Refused { reason } => format!("REFUSED, untouched: {reason}"),
        DriveState::Burning { slot, done, total } => {
            format!("burning slot {slot}   {}", bar(*done, *total))
        }
        DriveState::Verifying { slot, done, total } => {
            format!("verifying slot {slot} {}", bar(*done, *total))
        }
        DriveState::Ready {
            slot,
            image,
            verify_only,
            replaced,
        } => format!(
            "READY: {image} in slot {slot}{}{}",
            if *verify_only {
                " (already there; verified)"
            } else {
                ", verified"
            },
            replaced
                .as_ref()
                .map(|r| format!(" (replaced {r}, the oldest image that was not the default)"))
                .unwrap_or_default()
        ),
        DriveState::Failed { reason } => format!("FAILED: {reason}"),
    }
}

fn burn(a: BurnArgs) -> anyhow::Result<()> {
    let list = drives(&a.which)?;
    let t = Instant::now();
    let image = if a.image.is_dir() {
        let trusted = a
            .trusted_keys
            .as_deref()
            .map(TrustedKeys::read)
            .transpose()
            .map_err(anyhow::Error::msg)?;
        if let Some(id) = &a.id {
            anyhow::ensure!(
                a.image.file_name().is_some_and(|n| n == id.as_str()),
                "--id {id} names a bare image file; {} is a stored image (its manifest names it)",
                a.image.display()
            );
        }
        let image = Image::load_stored(&a.image, trusted.as_ref())
            .map_err(|e| anyhow::anyhow!("image refused, no drive touched: {e}"))?;
        println!(
            "Image {} checked against its manifest{}",
            image.manifest.id,
            if trusted.is_some() {
                " and its signature"
            } else {
                " (no --trusted-keys: its signature is not checked)"
            }
        );
        image
    } else {
        anyhow::ensure!(
            a.trusted_keys.is_none(),
            "{} is a bare file with no signed manifest; --trusted-keys takes stored images only",
            a.image.display()
        );
        let id = a.id.as_deref().ok_or_else(|| {
            anyhow::anyhow!(
                "{} is a bare image file: give its id with --id, or burn it from the image store",
                a.image.display()
            )
        })?;
        let image = Image::load(&a.image, id)
            .map_err(|e| anyhow::anyhow!("image refused, no drive touched: {e}"))?;
        println!("Image {id}: a bare file, no manifest to check it against (only that it is ext4)");
        image
    };
    println!(
        "Image {}: {} MiB, {} MiB of data in {} ranges, BLAKE3 {} (read in {:.1} s)",
        image.manifest.id,
        image.manifest.size >> 20,
        image.manifest.mapped_bytes() >> 20,
        image.manifest.ranges.len(),
        &image.manifest.blake3[..16],
        t.elapsed().as_secs_f64()
    );
    let states: Mutex<BTreeMap<PathBuf, DriveState>> = Mutex::new(BTreeMap::new());
    let tty = std::io::stdout().is_terminal();
    let opts = LayoutOptions {
        esp_bytes: a.esp_mib << 20,
        slots: a.slots as usize,
        overlay_percent: a.overlay_percent,
        ..Default::default()
    };
    let finished = std::sync::atomic::AtomicBool::new(false);
    let reports = std::thread::scope(|s| {
        let render = s.spawn(|| {
            let mut drawn = 0usize;
            // Without a terminal: a line whenever a drive's state changes kind.
            let mut kinds: BTreeMap<PathBuf, std::mem::Discriminant<DriveState>> = BTreeMap::new();
            loop {
                let done = finished.load(std::sync::atomic::Ordering::Relaxed);
                let now = states.lock().unwrap().clone();
                if tty {
                    if drawn > 0 {
                        print!("\x1b[{drawn}A");
                    }
                    for (d, st) in &now {
                        println!("\x1b[2K{:<32} {}", d.display(), describe(st));
                    }
                    drawn = now.len();
                } else {
                    for (d, st) in &now {
                        let kind = std::mem::discriminant(st);
                        if kinds.insert(d.clone(), kind) != Some(kind) {
                            println!("{:<32} {}", d.display(), describe(st));
                        }
                    }
                }
                let _ = std::io::stdout().flush();
                if done {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let r = burn_all(&list, &image, &opts, &|p, st| {
            states.lock().unwrap().insert(p.to_path_buf(), st.clone());
        });
        finished.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = render.join();
        r
    });
    let ready = reports
        .iter()
        .filter(|r| matches!(r.state, DriveState::Ready { .. }))
        .count();
    let written: u64 = reports.iter().map(|r| r.bytes_written).sum();
    println!(
        "{ready} of {} drives ready in {:.1} s ({} MiB written, {:.0} MB/s aggregate)",
        reports.len(),
        t.elapsed().as_secs_f64(),
        written >> 20,
        written as f64 / t.elapsed().as_secs_f64() / 1e6
    );
    let failed = reports
        .iter()
        .filter(|r| matches!(r.state, DriveState::Failed { .. }))
        .count();
    anyhow::ensure!(failed == 0, "{failed} drive(s) failed");
    Ok(())
}
