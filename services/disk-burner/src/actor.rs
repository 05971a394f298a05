//! The disk burner as an actor: it watches for drives (the bays directory, or the host's block
//! devices woken by kernel uevents: [`crate::source`]) and burns the channel's newest images onto
//! every drive that appears, oldest first so the newest boots by default. Drives in use or
//! read-only are refused before anything opens them for writing; the interlock refuses the rest
//! that are not ours. Every state change goes to the KV bucket `mp_v1_fleet_drives`
//! (`<burner>.<drive>`), to the subject `mp.v1.fleet.drive.state.<burner>`, and to the metric
//! `motorpool_fleet_drives{state}`. Each image is checked against its manifest and signature
//! once, then read from its file by every drive's burn; drives burn in parallel, one thread each;
//! a drive that disappears ends its job on its own. With a depot configured, the store is kept in
//! step with the channel in the platform's CAS ([`crate::depot`]). The chassis LEDs follow the
//! states through `ledctl` ([`crate::leds`]).

use crate::burn::{DriveState, burn};
use crate::image::Image;
use crate::layout::LayoutOptions;
use crate::leds::{Leds, find_ledctl};
use crate::source::{Seen, Sysfs, Uevents, scan_bays};
use anyhow::Context;
use motorpool_bus::{Bus, subjects::fleet};
use motorpool_config::{DriveSource, FleetConfig};
use motorpool_messages::fleet::{DriveKind, DriveStatus};
use motorpool_messages::{codec, now_ms};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The channel's newest `n` images in the store, oldest first: `(id, image directory)`.
pub fn newest_images(store: &Path, channel: &str, n: usize) -> Vec<(String, PathBuf)> {
    let mut found: Vec<(u64, String, PathBuf)> = std::fs::read_dir(store.join(channel))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        // `.fetch-*`: an image the depot is still assembling.
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| {
            let m: serde_json::Value =
                serde_json::from_slice(&std::fs::read(e.path().join("manifest.json")).ok()?)
                    .ok()?;
            Some((
                m["built_at_ms"].as_u64()?,
                m["image"]["id"].as_str()?.to_string(),
                e.path(),
            ))
        })
        .collect();
    found.sort();
    let skip = found
        .len()
        .saturating_sub(n.clamp(1, crate::layout::MAX_IMAGES));
    found
        .into_iter()
        .skip(skip)
        .map(|(_, id, p)| (id, p))
        .collect()
}

fn status(burner: &str, drive: &Path, image: &str, s: &DriveState) -> DriveStatus {
    let (kind, slot, done, total, reason) = match s {
        DriveState::Inserted => (DriveKind::Inserted, 0, 0, 0, String::new()),
        DriveState::Refused { reason } => (DriveKind::Refused, 0, 0, 0, reason.clone()),
        DriveState::Burning { slot, done, total } => {
            (DriveKind::Burning, *slot, *done, *total, String::new())
        }
        DriveState::Verifying { slot, done, total } => {
            (DriveKind::Verifying, *slot, *done, *total, String::new())
        }
        DriveState::Ready { slot, replaced, .. } => (
            DriveKind::Ready,
            *slot,
            0,
            0,
            replaced
                .as_ref()
                .map(|r| format!("replaced {r}, the oldest image that was not the default"))
                .unwrap_or_default(),
        ),
        DriveState::Failed { reason } => (DriveKind::Failed, 0, 0, 0, reason.clone()),
    };
    DriveStatus {
        burner: burner.to_string(),
        drive: drive.display().to_string(),
        kind,
        image: image.to_string(),
        slot: slot as u32,
        done,
        total,
        reason,
        updated_ms: now_ms(),
        images: Vec::new(),
    }
}

/// A KV-key-safe name for a drive.
fn drive_key(burner: &str, drive: &Path) -> String {
    let name: String = drive
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{burner}.{name}")
}

/// Burns every image in `images` (oldest first) onto one drive; reports each state.
fn burn_drive(
    drive: &Path,
    images: &[Arc<Image>],
    layout: &LayoutOptions,
    report: &(dyn Fn(&Path, &str, &DriveState) + Sync),
) {
    for img in images {
        let id = img.manifest.id.clone();
        // Each burn starts a trace of its own (when traces are exported).
        let _span =
            tracing::info_span!("fleet.burn", drive = %drive.display(), image = %id).entered();
        let r = burn(drive, img, layout, &|p, s| report(p, &id, s));
        if !matches!(r.state, DriveState::Ready { .. }) {
            return;
        }
    }
}

/// Waits for the kernel to say a disk came, went or changed; forever without a socket. A
/// socket error (an overflowed queue) also wakes the caller, which rescans.
async fn disk_event(uevents: &mut Option<Uevents>) {
    let Some(u) = uevents else {
        return std::future::pending().await;
    };
    loop {
        match u.next().await {
            Ok(e) if e.is_disk() => return,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("uevents: {e}; rescanning");
                tokio::time::sleep(Duration::from_millis(200)).await;
                return;
            }
        }
    }
}

/// Watches for drives and burns until `shutdown`.
pub async fn serve(
    bus: Bus,
    config: FleetConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let kv = bus.ensure_kv(fleet::drives_config()).await?;
    let burner = config.burner_id.clone().unwrap_or_else(|| {
        hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "burner".into())
    });
    let leds = Leds::start(find_ledctl(config.ledctl.as_deref()));
    let has_leds = leds.is_some();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<DriveStatus>();
    // The publisher: KV, subject, metrics, LEDs, in the order the states happened.
    let publisher = {
        let (bus, kv, burner) = (bus.clone(), kv.clone(), burner.clone());
        tokio::spawn(async move {
            let mut kinds: BTreeMap<String, DriveKind> = BTreeMap::new();
            let mut last_progress: HashMap<String, u64> = HashMap::new();
            while let Some(s) = rx.recv().await {
                let key = drive_key(&burner, Path::new(&s.drive));
                // Progress is published at most every 64 MiB per drive; changes of kind always.
                let progress = matches!(s.kind, DriveKind::Burning | DriveKind::Verifying);
                let prev = kinds.insert(key.clone(), s.kind);
                if progress && prev == Some(s.kind) && s.done < s.total {
                    let last = last_progress.entry(key.clone()).or_default();
                    if s.done < *last + (64 << 20) {
                        continue;
                    }
                    *last = s.done;
                } else {
                    last_progress.insert(key.clone(), 0);
                }
                if prev != Some(s.kind)
                    && let Some(leds) = &leds
                {
                    leds.show(Path::new(&s.drive), s.kind);
                }
                for k in DriveKind::ALL {
                    let n = kinds.values().filter(|v| **v == k).count();
                    metrics::gauge!(crate::metric_names::FLEET_DRIVES, "state" => k.name())
                        .set(n as f64);
                }
                if let Ok(bytes) = codec::encode(&s) {
                    let _ = kv.put(&key, bytes.into()).await;
                }
                let _ = bus.publish(&fleet::drive_state(&burner), &s).await;
            }
        })
    };
    let layout = LayoutOptions {
        slots: config.slots,
        overlay_percent: config.overlay_percent,
        by_size: config.layouts.clone(),
        ..Default::default()
    };
    let trusted = match &config.trusted_keys_file {
        Some(f) => Some(Arc::new(
            crate::sign::TrustedKeys::read(f).map_err(anyhow::Error::msg)?,
        )),
        None => {
            tracing::warn!(
                "no trusted_keys_file: image manifests are checked for integrity, not for who signed them"
            );
            None
        }
    };
    let depot = match &config.depot_url {
        Some(url) => Some(spawn_depot_sync(url, &config, trusted.clone(), shutdown.clone()).await?),
        None => None,
    };
    let loaded: Arc<Mutex<HashMap<String, Arc<Image>>>> = Arc::default();
    let mut known: HashMap<PathBuf, Seen> = HashMap::new();
    let sysfs = Sysfs::host();
    let mut uevents = match config.drive_source {
        DriveSource::Bays => None,
        DriveSource::Udev => Some(Uevents::open().context("joining the kernel's uevents")?),
    };
    tracing::info!(
        source = ?config.drive_source, bays = %config.bays_dir.display(),
        udev_match = ?config.udev_match, channel = %config.channel, %burner,
        leds = has_leds, "Disk burner ready"
    );
    loop {
        let scanned = match config.drive_source {
            DriveSource::Bays => scan_bays(&config.bays_dir),
            DriveSource::Udev => sysfs.scan(&config.udev_match),
        };
        match scanned {
            Ok(drives) => {
                for (path, s) in changes(&mut known, drives) {
                    match s {
                        Change::Gone => {
                            let _ = tx.send(DriveStatus {
                                kind: DriveKind::Removed,
                                ..status(&burner, &path, "", &DriveState::Inserted)
                            });
                        }
                        Change::Refuse(reason) => {
                            let _ = tx.send(status(&burner, &path, "", &DriveState::Inserted));
                            let _ = tx.send(status(
                                &burner,
                                &path,
                                "",
                                &DriveState::Refused { reason },
                            ));
                        }
                        Change::Burn => {
                            let job = Job {
                                tx: tx.clone(),
                                burner: burner.clone(),
                                loaded: loaded.clone(),
                                config: config.clone(),
                                layout: layout.clone(),
                                trusted: trusted.clone(),
                            };
                            tokio::task::spawn_blocking(move || job.run(&path));
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(source = ?config.drive_source, "cannot scan for drives: {e}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(config.scan_ms.max(50))) => {}
            _ = disk_event(&mut uevents) => {}
        }
    }
    drop(tx);
    if let Some(d) = depot {
        d.abort();
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), publisher).await;
    Ok(())
}

/// Keeps the store's channel in step with the depot (the platform's CAS): at once, then every
/// `depot_sync_s`. Fetches only what the store lacks; a gateway out of reach or a failed look is
/// logged and tried again. Only an unreadable key file stops the burner from starting.
async fn spawn_depot_sync(
    url: &str,
    config: &FleetConfig,
    trusted: Option<Arc<crate::sign::TrustedKeys>>,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let key = match &config.depot_api_key_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("depot_api_key_file {}", f.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let (url, ca, instance) = (
        url.to_string(),
        config.depot_tls_ca_file.clone(),
        config.depot_instance.clone(),
    );
    let (store, channel, n) = (
        config.store_dir.clone(),
        config.channel.clone(),
        config.images_per_drive,
    );
    let every = Duration::from_secs(config.depot_sync_s.max(1));
    Ok(tokio::spawn(async move {
        // A gateway that cannot be reached now (a site's link down) is tried again: the
        // burner burns what its store holds meanwhile.
        let mut depot = None;
        loop {
            if depot.is_none() {
                match crate::depot::Depot::connect(&url, key.as_deref(), ca.as_deref(), &instance)
                    .await
                {
                    Ok(d) => depot = Some(d),
                    Err(error) => tracing::warn!(%error, "Cannot reach the depot; trying again"),
                }
            }
            if let Some(d) = &depot {
                match d.fetch(&channel, &store, trusted.as_deref(), n, None).await {
                    Ok(images) => {
                        for f in images.iter().filter(|f| !f.present) {
                            tracing::info!(image = %f.id, fetched = f.fetched, reused = f.reused, data = f.mapped, "Fetched an image from the depot");
                            metrics::counter!(crate::metric_names::FLEET_DEPOT_BYTES_TOTAL, "how" => "fetched")
                                .increment(f.fetched);
                            metrics::counter!(crate::metric_names::FLEET_DEPOT_BYTES_TOTAL, "how" => "reused")
                                .increment(f.reused);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, %channel, "Cannot fetch images from the depot")
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }))
}

/// What a scan means for one drive.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    Gone,
    Refuse(String),
    Burn,
}

/// Compares a scan with the drives known so far (and remembers it): drives gone, drives new or
/// replaced (another disk under the same path), and refused drives whose reason changed or went
/// away (a disk unmounted after it was plugged is burned then), each with what to do.
fn changes(known: &mut HashMap<PathBuf, Seen>, drives: Vec<Seen>) -> Vec<(PathBuf, Change)> {
    let mut out = Vec::new();
    known.retain(|path, _| {
        let here = drives.iter().any(|d| &d.path == path);
        if !here {
            out.push((path.clone(), Change::Gone));
        }
        here
    });
    for d in drives {
        let change = match known.get(&d.path) {
            Some(k) if k.identity == d.identity => match (&k.refuse, &d.refuse) {
                (Some(_), None) => Some(Change::Burn),
                (Some(was), Some(now)) if was != now => Some(Change::Refuse(now.clone())),
                // Unchanged, or in use after its job began: the job owns the drive.
                _ => None,
            },
            _ => Some(d.refuse.clone().map_or(Change::Burn, Change::Refuse)),
        };
        if let Some(c) = change {
            out.push((d.path.clone(), c));
        }
        known.insert(d.path.clone(), d);
    }
    out
}

/// One drive's job: load the channel's newest images (each once for all drives, checked against
/// their manifests and signatures) and burn them.
struct Job {
    tx: tokio::sync::mpsc::UnboundedSender<DriveStatus>,
    burner: String,
    /// Images loaded for the jobs: only the channel's current newest stay.
    loaded: Arc<Mutex<HashMap<String, Arc<Image>>>>,
    config: FleetConfig,
    layout: LayoutOptions,
    trusted: Option<Arc<crate::sign::TrustedKeys>>,
}

impl Job {
    fn run(self, path: &Path) {
        let Job {
            tx,
            burner,
            loaded,
            config,
            layout,
            trusted,
        } = self;
        // Every state carries what the drive holds, read again whenever a burn ends.
        let held = Mutex::new(crate::burn::images_on(path).unwrap_or_default());
        let send = |id: &str, s: &DriveState| {
            let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
            if matches!(s, DriveState::Ready { .. } | DriveState::Failed { .. }) {
                *held = crate::burn::images_on(path).unwrap_or_default();
            }
            let _ = tx.send(DriveStatus {
                images: held.clone(),
                ..status(&burner, path, id, s)
            });
        };
        send("", &DriveState::Inserted);
        let mut images = Vec::new();
        let newest = newest_images(&config.store_dir, &config.channel, config.images_per_drive);
        if let Ok(mut m) = loaded.lock() {
            m.retain(|id, _| newest.iter().any(|(n, _)| n == id));
        }
        for (id, dir) in newest {
            let cached = loaded.lock().ok().and_then(|m| m.get(&id).cloned());
            let img = match cached {
                Some(i) => i,
                None => match Image::load_stored(&dir, trusted.as_deref()) {
                    Ok(i) => {
                        let i = Arc::new(i);
                        if let Ok(mut m) = loaded.lock() {
                            m.insert(id.clone(), i.clone());
                        }
                        i
                    }
                    Err(e) => {
                        let reason = format!("image {id} refused, drive untouched: {e}");
                        send(&id, &DriveState::Failed { reason });
                        return;
                    }
                },
            };
            images.push(img);
        }
        if images.is_empty() {
            let reason = format!("no image in channel {}", config.channel);
            send("", &DriveState::Failed { reason });
            return;
        }
        burn_drive(path, &images, &layout, &|_, id, s| send(id, s));
    }
}

/// `motorpool disk-burner`: connects and serves until `shutdown`.
pub async fn run(config: FleetConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    if config.drive_source == DriveSource::Bays {
        std::fs::create_dir_all(&config.bays_dir)?;
    }
    motorpool_telemetry::with_metrics(config.http_addr, async move {
        let bus = Bus::connect_service(
            &config.nats_url,
            "motorpool-disk-burner",
            config.nats_nkey_file.as_deref(),
            config.nats_tls_ca_file.as_deref(),
            Duration::from_secs(10),
        )
        .await?;
        serve(bus, config, shutdown).await
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(path: &str, id: u64, refuse: Option<&str>) -> Seen {
        Seen {
            path: path.into(),
            identity: (id, 0, 0),
            refuse: refuse.map(String::from),
        }
    }

    #[test]
    fn scans_become_burns_refusals_and_removals_once_each() {
        let mut known = HashMap::new();
        let scan = |known: &mut HashMap<PathBuf, Seen>, v: Vec<Seen>| {
            let mut c = changes(known, v);
            c.sort_by(|a, b| a.0.cmp(&b.0));
            c
        };
        let c = scan(
            &mut known,
            vec![
                seen("/dev/sda", 1, None),
                seen("/dev/sdb", 2, Some("in use: sdb1 mounted at /")),
            ],
        );
        assert_eq!(
            c,
            [
                ("/dev/sda".into(), Change::Burn),
                (
                    "/dev/sdb".into(),
                    Change::Refuse("in use: sdb1 mounted at /".into())
                )
            ]
        );
        // The same scan again: nothing to do.
        let again = vec![
            seen("/dev/sda", 1, None),
            seen("/dev/sdb", 2, Some("in use: sdb1 mounted at /")),
        ];
        assert_eq!(scan(&mut known, again), []);
        // sda is in use once its job runs (ignored); sdb is unmounted (burned now); sdc came.
        let c = scan(
            &mut known,
            vec![
                seen("/dev/sda", 1, Some("in use: sda1 mounted at /mnt")),
                seen("/dev/sdb", 2, None),
                seen("/dev/sdc", 3, None),
            ],
        );
        assert_eq!(
            c,
            [
                ("/dev/sdb".into(), Change::Burn),
                ("/dev/sdc".into(), Change::Burn)
            ]
        );
        // sda pulled; another disk under sdb's name.
        let c = scan(
            &mut known,
            vec![seen("/dev/sdb", 9, None), seen("/dev/sdc", 3, None)],
        );
        assert_eq!(
            c,
            [
                ("/dev/sda".into(), Change::Gone),
                ("/dev/sdb".into(), Change::Burn)
            ]
        );
    }
}
