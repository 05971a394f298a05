//! Burning one image onto many drives at once, and verifying it past the page cache.
//!
//! For each drive, in its own thread:
//! 1. **Interlock.** Read the GPT; a drive without one, or whose disk GUID does not start with
//!    `00000000`, is refused and not one byte of it is written.
//! 2. **Slot.** A drive that already holds the image (the same id, and the slot's record, the
//!    last 4 KiB of its partition where the image leaves them free, names the same BLAKE3, or
//!    there is no record) is only verified. Otherwise a slot with
//!    the same id but other content (a rebuild), else the first empty slot, else the one burned
//!    longest ago (a burn sequence number kept in the partition's type-specific attribute bits)
//!    that does not hold the drive's default image, is marked empty in the GPT and written; the
//!    image it replaces is reported. When only the default's slot is left, the burn is refused.
//!    A marked drive without Motorpool partitions is laid out first ([`crate::layout::plan`]).
//! 3. **Write** only the image's mapped ranges, read from the image file chunk by chunk (drives
//!    burning at once share its pages in the page cache; the burner holds one chunk per drive),
//!    in large aligned writes with `O_DIRECT` where the target allows it; then `fsync`. A drive
//!    pulled mid-burn (its bay file gone, or I/O errors) ends its job as `Failed`; the others go
//!    on.
//! 4. **Verify** by reading the ranges back with `O_DIRECT` (or after dropping the drive's pages
//!    from the cache where `O_DIRECT` is refused) and comparing each range's BLAKE3.
//! 5. **Record and name.** Write the slot's record (id, size, BLAKE3), then the ESP's menu with
//!    the image in it, and only then name the slot after the image in the GPT: a slot is named
//!    only when the whole burn, boot menu included, succeeded.

use crate::gpt::{Gpt, GptError, SECTOR};
use crate::image::Image;
use crate::layout::{self, EMPTY_NAME, LayoutOptions};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Largest single write or read.
const CHUNK: usize = 8 << 20;
const ALIGN: usize = 4096;
/// The memory a drive's burn holds: one chunk-sized buffer (the write phase's, then the verify's).
pub const BUFFER_PER_DRIVE: u64 = (CHUNK + ALIGN) as u64;

/// Where a drive is, as operators and the bus see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum DriveState {
    Inserted,
    /// Not ours: left untouched.
    Refused {
        reason: String,
    },
    Burning {
        slot: usize,
        done: u64,
        total: u64,
    },
    Verifying {
        slot: usize,
        done: u64,
        total: u64,
    },
    Ready {
        slot: usize,
        image: String,
        verify_only: bool,
        /// The image this burn replaced in a full drive's slot.
        replaced: Option<String>,
    },
    Failed {
        reason: String,
    },
}

/// How a burn ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BurnReport {
    pub drive: PathBuf,
    pub state: DriveState,
    pub bytes_written: u64,
    pub bytes_verified: u64,
    pub direct_io: bool,
}

/// A drive: a block device or a bay file, and the identity it had when it was opened.
struct Drive {
    path: PathBuf,
    /// Held with an exclusive `flock` for the whole job: no drive is written by two jobs at once
    /// (two burners, or a burner and `drives set-default`).
    file: nix::fcntl::Flock<File>,
    dev_ino: (u64, u64),
    /// For a block device: its sysfs directory and the kernel's disk sequence number at open
    /// (a loop device keeps its node when another file is attached; the sequence changes).
    block: Option<(PathBuf, String)>,
    sectors: u64,
}

impl Drive {
    fn open(path: &Path) -> std::io::Result<Drive> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let file = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| match errno {
                nix::errno::Errno::EWOULDBLOCK => std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    "another job is writing this drive",
                ),
                e => e.into(),
            })?;
        let meta = file.metadata()?;
        let size = if meta.file_type().is_file() {
            meta.len()
        } else {
            use std::io::Seek;
            (&*file).seek(std::io::SeekFrom::End(0))?
        };
        let block = meta.file_type().is_block_device().then(|| {
            let rdev = meta.rdev();
            let sys = PathBuf::from(format!(
                "/sys/dev/block/{}:{}",
                libc::major(rdev),
                libc::minor(rdev)
            ));
            let seq = std::fs::read_to_string(sys.join("diskseq")).unwrap_or_default();
            (sys, seq)
        });
        Ok(Drive {
            path: path.to_path_buf(),
            file,
            dev_ino: (meta.dev(), meta.ino()),
            block,
            sectors: size / SECTOR,
        })
    }

    /// False once the drive was pulled: its path is gone or names another file, or the block
    /// device lost its media or holds another disk now.
    fn present(&self) -> bool {
        let same_node =
            std::fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.dev_ino);
        same_node
            && self.block.as_ref().is_none_or(|(sys, seq)| {
                let size = std::fs::read_to_string(sys.join("size")).unwrap_or_default();
                size.trim().parse::<u64>().is_ok_and(|s| s > 0)
                    && std::fs::read_to_string(sys.join("diskseq")).unwrap_or_default() == *seq
            })
    }

    fn gpt(&self) -> Result<Gpt, GptError> {
        Gpt::read(&mut &*self.file, self.sectors)
    }

    fn write_gpt(&self, gpt: &Gpt) -> Result<(), GptError> {
        gpt.write(&mut &*self.file)?;
        self.file.sync_data()?;
        Ok(())
    }

    /// A second handle with `O_DIRECT`, when the target allows it.
    fn direct(&self) -> Option<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&self.path)
            .ok()
    }
}

/// A buffer whose usable part starts on a 4 KiB boundary (what `O_DIRECT` needs).
struct Aligned {
    buf: Vec<u8>,
    at: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let buf = vec![0u8; len + ALIGN];
        let at = buf.as_ptr().align_offset(ALIGN);
        Aligned { buf, at }
    }
    fn get(&mut self, len: usize) -> &mut [u8] {
        &mut self.buf[self.at..self.at + len]
    }
}

/// Burns `image` onto the drive at `path`, reporting every state change to `on_state`.
pub fn burn(
    path: &Path,
    image: &Image,
    layout_opts: &LayoutOptions,
    on_state: &(dyn Fn(&Path, &DriveState) + Sync),
) -> BurnReport {
    let mut report = BurnReport {
        drive: path.to_path_buf(),
        state: DriveState::Inserted,
        bytes_written: 0,
        bytes_verified: 0,
        direct_io: false,
    };
    on_state(path, &report.state);
    report.state = match burn_inner(path, image, layout_opts, on_state, &mut report) {
        Ok(state) | Err(state) => state,
    };
    on_state(path, &report.state);
    report
}

fn failed(reason: impl Into<String>) -> DriveState {
    DriveState::Failed {
        reason: reason.into(),
    }
}

/// Reads the GPT through a read-only handle and refuses a drive that is not a Motorpool drive.
fn interlock(path: &Path) -> Result<(), DriveState> {
    let file = File::open(path).map_err(|e| failed(format!("cannot open: {e}")))?;
    let size = {
        use std::io::Seek;
        (&file)
            .seek(std::io::SeekFrom::End(0))
            .map_err(|e| failed(format!("cannot read: {e}")))?
    };
    match Gpt::read(&mut &file, size / SECTOR) {
        Ok(gpt) if layout::is_motorpool(&gpt) => Ok(()),
        Ok(gpt) => Err(DriveState::Refused {
            reason: format!(
                "disk GUID {} does not start with 00000000: not a Motorpool drive",
                gpt.disk_guid
            ),
        }),
        Err(GptError::Io(e)) => Err(failed(format!("cannot read: {e}"))),
        Err(e) => Err(DriveState::Refused {
            reason: format!("not a Motorpool drive ({e})"),
        }),
    }
}

fn burn_inner(
    path: &Path,
    image: &Image,
    layout_opts: &LayoutOptions,
    on_state: &(dyn Fn(&Path, &DriveState) + Sync),
    report: &mut BurnReport,
) -> Result<DriveState, DriveState> {
    // 1. The interlock, on a read-only handle: a drive that is not ours is never even opened
    //    for writing. (Checked again below under the write lock.)
    interlock(path)?;
    let drive = Drive::open(path).map_err(|e| failed(format!("cannot open: {e}")))?;
    let mut gpt = match drive.gpt() {
        Ok(g) => g,
        Err(GptError::Io(e)) => return Err(failed(format!("cannot read: {e}"))),
        Err(e) => {
            return Err(DriveState::Refused {
                reason: format!("not a Motorpool drive ({e})"),
            });
        }
    };
    if !layout::is_motorpool(&gpt) {
        return Err(DriveState::Refused {
            reason: format!(
                "disk GUID {} does not start with 00000000: not a Motorpool drive",
                gpt.disk_guid
            ),
        });
    }
    if layout::slots(&gpt).is_empty() {
        gpt = layout::plan(gpt.disk_guid, drive.sectors, layout_opts).map_err(failed)?;
        drive
            .write_gpt(&gpt)
            .map_err(|e| failed(format!("cannot lay out: {e}")))?;
    }
    let id = &image.manifest.id;
    let slots = layout::slots(&gpt);
    // 2. The slot.
    let same_id = slots
        .iter()
        .find(|s| s.image.as_deref() == Some(id.as_str()));
    // A slot records what it holds when the image leaves room for the record; without one
    // (an image that fills its slot, a drive burned before records) the id decides.
    let record =
        same_id.and_then(|s| read_slot_record(&drive.file, &s.partition).filter(|r| r.id == *id));
    if let Some(s) = same_id
        && record
            .as_ref()
            .is_none_or(|r| r.blake3 == image.manifest.blake3)
    {
        verify(
            &drive,
            image,
            s.number,
            s.partition.offset(),
            on_state,
            report,
        )?;
        // A slot verified without a record (burned before records) gets one, where it fits.
        if record.is_none() && image.manifest.size + RECORD <= s.partition.len() {
            write_record(&drive, &s.partition, image)
                .map_err(|e| failed(format!("cannot write the slot's record: {e}")))?;
        }
        boot_menu(path, &gpt, layout_opts)?;
        return Ok(DriveState::Ready {
            slot: s.number,
            image: id.clone(),
            verify_only: true,
            replaced: None,
        });
    }
    let default = crate::esp::read_default(path, &gpt).ok().flatten();
    let seq = |p: &crate::gpt::Partition| p.attributes >> 48;
    let target = same_id
        .or_else(|| slots.iter().find(|s| s.image.is_none()))
        .or_else(|| {
            slots
                .iter()
                .filter(|s| default.is_none() || s.image != default)
                .min_by_key(|s| seq(&s.partition))
        })
        .cloned()
        .ok_or_else(|| match &default {
            Some(d) => failed(format!(
                "every slot holds the default image {d}, which is never replaced: make another \
                 image the default (`motorpool drives set-default`) or lay the drive out with \
                 more slots"
            )),
            None => failed("the drive has no image slot"),
        })?;
    let replaced = target.image.clone().filter(|i| i != id);
    if image.manifest.size > target.partition.len() {
        return Err(failed(format!(
            "image {id} ({} bytes) does not fit slot {} ({} bytes)",
            image.manifest.size,
            target.number,
            target.partition.len()
        )));
    }
    let next_seq = slots.iter().map(|s| seq(&s.partition)).max().unwrap_or(0) + 1;
    gpt.partitions[target.index].name = EMPTY_NAME.into();
    drive
        .write_gpt(&gpt)
        .map_err(|e| failed(format!("cannot update the GPT: {e}")))?;
    clear_record(&drive, &target.partition)
        .map_err(|e| failed(format!("cannot clear the slot's record: {e}")))?;

    // 3. Write.
    let base = target.partition.offset();
    let total = image.manifest.mapped_bytes();
    let direct = drive.direct();
    report.direct_io = direct.is_some();
    let mut bounce = Aligned::new(CHUNK);
    let mut done = 0u64;
    on_state(
        path,
        &DriveState::Burning {
            slot: target.number,
            done,
            total,
        },
    );
    for r in &image.manifest.ranges {
        let mut off = 0u64;
        while off < r.len {
            if !drive.present() {
                return Err(failed("the drive was removed during the burn"));
            }
            let n = (r.len - off).min(CHUNK as u64) as usize;
            let at = base + r.offset + off;
            let chunk = bounce.get(n);
            image.read_at(chunk, r.offset + off).map_err(|e| {
                failed(format!("reading the image at byte {}: {e}", r.offset + off))
            })?;
            let result = match &direct {
                Some(f) if n.is_multiple_of(ALIGN) => f.write_all_at(chunk, at),
                _ => drive.file.write_all_at(chunk, at),
            };
            result.map_err(|e| failed(format!("write at byte {at}: {e}")))?;
            off += n as u64;
            done += n as u64;
            report.bytes_written += n as u64;
            on_state(
                path,
                &DriveState::Burning {
                    slot: target.number,
                    done,
                    total,
                },
            );
        }
    }
    drop(bounce);
    drive
        .file
        .sync_all()
        .map_err(|e| failed(format!("flush: {e}")))?;
    if !drive.present() {
        return Err(failed("the drive was removed during the burn"));
    }
    // 4. Verify. 5. Record, menu, name: a slot is named only when the whole burn succeeded.
    verify(&drive, image, target.number, base, on_state, report)?;
    if image.manifest.size + RECORD <= target.partition.len() {
        write_record(&drive, &target.partition, image)
            .map_err(|e| failed(format!("cannot write the slot's record: {e}")))?;
    }
    let p = &mut gpt.partitions[target.index];
    p.name = format!("mp:{id}");
    p.attributes = (p.attributes & 0x0000_ffff_ffff_ffff) | (next_seq.min(0xffff) << 48);
    boot_menu(path, &gpt, layout_opts)?;
    drive
        .write_gpt(&gpt)
        .map_err(|e| failed(format!("cannot update the GPT: {e}")))?;
    Ok(DriveState::Ready {
        slot: target.number,
        image: id.clone(),
        verify_only: false,
        replaced,
    })
}

/// Bytes at the end of an image partition that record what the slot holds, when the image
/// leaves them free (ext4 never touches bytes past its own size).
pub const RECORD: u64 = 4096;
const RECORD_MAGIC: &str = "motorpool-slot-v1";

/// What a slot's record says it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotRecord {
    pub id: String,
    pub size: u64,
    pub blake3: String,
}

fn record_at(p: &crate::gpt::Partition) -> u64 {
    p.offset() + p.len() - RECORD
}

fn write_record(drive: &Drive, p: &crate::gpt::Partition, image: &Image) -> std::io::Result<()> {
    let m = &image.manifest;
    let text = format!(
        "{RECORD_MAGIC}\nid={}\nsize={}\nblake3={}\n",
        m.id, m.size, m.blake3
    );
    let mut block = vec![0u8; RECORD as usize];
    block[..text.len()].copy_from_slice(text.as_bytes());
    drive.file.write_all_at(&block, record_at(p))?;
    drive.file.sync_data()
}

/// Zeroes the slot's record, before an image is written into the slot: a record left by an
/// earlier image must not speak for the next (whose own bytes may then cover the area).
fn clear_record(drive: &Drive, p: &crate::gpt::Partition) -> std::io::Result<()> {
    if p.len() < RECORD {
        return Ok(());
    }
    drive
        .file
        .write_all_at(&[0u8; RECORD as usize], record_at(p))?;
    drive.file.sync_data()
}

/// The record of the slot in partition `p`, when it has a well-formed one.
/// The images a Motorpool drive holds, by slot, the one the menu boots by default marked. Only reads (no
/// lock: a burn in progress may be seen half done); a drive that is not ours holds none.
pub fn images_on(path: &Path) -> Result<Vec<motorpool_messages::fleet::DriveImage>, String> {
    use std::io::Seek;
    let mut f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let size = f
        .seek(std::io::SeekFrom::End(0))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let gpt = match Gpt::read(&mut f, size / SECTOR) {
        Ok(g) if layout::is_motorpool(&g) => g,
        Err(GptError::Io(e)) => return Err(format!("{}: {e}", path.display())),
        Ok(_) | Err(_) => return Ok(Vec::new()),
    };
    let chosen = crate::esp::read_default(path, &gpt).ok().flatten();
    let default = crate::grub::boots_by_default(&gpt, chosen.as_deref());
    Ok(layout::slots(&gpt)
        .into_iter()
        .filter_map(|s| {
            Some(motorpool_messages::fleet::DriveImage {
                slot: s.number as u32,
                default: default == Some(s.number),
                image: s.image?,
            })
        })
        .collect())
}

pub fn read_slot_record(drive: &File, p: &crate::gpt::Partition) -> Option<SlotRecord> {
    if p.len() < RECORD {
        return None;
    }
    let mut block = vec![0u8; RECORD as usize];
    drive.read_exact_at(&mut block, record_at(p)).ok()?;
    let end = block.iter().position(|&b| b == 0).unwrap_or(block.len());
    let text = std::str::from_utf8(&block[..end]).ok()?;
    let mut lines = text.lines();
    (lines.next()? == RECORD_MAGIC).then_some(())?;
    let mut field = |k: &str| lines.next()?.strip_prefix(k).map(str::to_string);
    Some(SlotRecord {
        id: field("id=")?,
        size: field("size=")?.parse().ok()?,
        blake3: field("blake3=")?,
    })
}

/// Writes the ESP (GRUB, the master menu listing every image) when the options ask for it.
fn boot_menu(path: &Path, gpt: &Gpt, opts: &LayoutOptions) -> Result<(), DriveState> {
    if !opts.boot_menu {
        return Ok(());
    }
    crate::esp::install(path, gpt, None).map_err(|e| failed(format!("boot menu: {e}")))
}

/// Reads the image's ranges back from the drive, past the page cache, and compares hashes.
fn verify(
    drive: &Drive,
    image: &Image,
    slot: usize,
    base: u64,
    on_state: &(dyn Fn(&Path, &DriveState) + Sync),
    report: &mut BurnReport,
) -> Result<(), DriveState> {
    let direct = drive.direct();
    if direct.is_none() {
        // No O_DIRECT here: drop the drive's cached pages so the reads come from the medium.
        let _ = drive.file.sync_all();
        let _ = nix::fcntl::posix_fadvise(
            &*drive.file,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    } else {
        report.direct_io = true;
    }
    let total = image.manifest.mapped_bytes();
    let mut done = 0;
    let mut buf = Aligned::new(CHUNK);
    on_state(&drive.path, &DriveState::Verifying { slot, done, total });
    for r in &image.manifest.ranges {
        let mut h = blake3::Hasher::new();
        let mut off = 0u64;
        while off < r.len {
            if !drive.present() {
                return Err(failed("the drive was removed during verification"));
            }
            let n = (r.len - off).min(CHUNK as u64) as usize;
            let at = base + r.offset + off;
            let b = buf.get(n);
            let result = match &direct {
                Some(f) if n.is_multiple_of(ALIGN) => f.read_exact_at(b, at),
                _ => drive.file.read_exact_at(b, at),
            };
            result.map_err(|e| failed(format!("read back at byte {at}: {e}")))?;
            h.update(b);
            off += n as u64;
            done += n as u64;
            report.bytes_verified += n as u64;
            on_state(&drive.path, &DriveState::Verifying { slot, done, total });
        }
        let got = h.finalize().to_hex().to_string();
        if got != r.blake3 {
            return Err(failed(format!(
                "verification failed: bytes {}..{} of image {} read back with BLAKE3 {got}, the manifest says {}",
                r.offset,
                r.offset + r.len,
                image.manifest.id,
                r.blake3
            )));
        }
    }
    Ok(())
}

/// Burns `image` onto every drive in parallel (one thread per drive, each reading the image
/// file a chunk at a time).
pub fn burn_all(
    drives: &[PathBuf],
    image: &Image,
    layout_opts: &LayoutOptions,
    on_state: &(dyn Fn(&Path, &DriveState) + Sync),
) -> Vec<BurnReport> {
    std::thread::scope(|s| {
        let handles: Vec<_> = drives
            .iter()
            .map(|d| s.spawn(move || burn(d, image, layout_opts, on_state)))
            .collect();
        handles
            .into_iter()
            .zip(drives)
            .map(|(h, d)| {
                h.join().unwrap_or_else(|_| BurnReport {
                    drive: d.clone(),
                    state: failed("the burn thread panicked"),
                    bytes_written: 0,
                    bytes_verified: 0,
                    direct_io: false,
                })
            })
            .collect()
    })
}

/// The drives in a bay directory: its regular files and block devices, sorted.
/// An error names the directory; a drive pulled while the directory is read is simply not listed.
pub fn scan_bays(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let named = |e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("bays directory {}: {e}", dir.display()))
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(named)? {
        let e = e.map_err(named)?;
        let Ok(m) = std::fs::metadata(e.path()) else {
            continue;
        };
        if m.file_type().is_file() || m.file_type().is_block_device() {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}
