//! Where drives come from, as snapshots the burner compares with what it saw last.
//!
//! - **Bays** ([`scan_bays`]): a directory of raw disk files or block devices. A drive is plugged
//!   by appearing there (tests, demos, a rack whose bays are symlinked by slot).
//! - **Block devices** ([`Sysfs::scan`]): the host's whole disks from `/sys/class/block`. The
//!   kernel's netlink uevents ([`Uevents`]) wake the burner the moment a disk comes, goes or
//!   changes media; the snapshot itself is always read from sysfs, so a dropped or reordered
//!   event costs nothing but latency (the periodic scan backs the socket up).
//!
//! A snapshot entry carries an identity that changes when a different disk takes the same name
//! (inode for bay files; device number, the kernel's disk sequence number and size for block
//! devices), and a reason to refuse the disk without ever opening it for writing: read-only, or
//! in use (a partition mounted or swapped on, or held by device-mapper/md).

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// One drive as a scan saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub path: PathBuf,
    /// Changes when another disk takes this path.
    pub identity: (u64, u64, u64),
    /// Present but never to be written (no GPT is even read for writing).
    pub refuse: Option<String>,
}

/// The bays: every regular file or block device in `dir`, by path.
pub fn scan_bays(dir: &Path) -> io::Result<Vec<Seen>> {
    let mut out = Vec::new();
    for path in crate::burn::scan_bays(dir)? {
        // Gone between the listing and here: it is simply not in this snapshot.
        let Ok(m) = std::fs::metadata(&path) else {
            continue;
        };
        out.push(Seen {
            path,
            identity: (m.dev(), m.ino(), 0),
            refuse: None,
        });
    }
    Ok(out)
}

/// Does `name` match `pattern`, where `*` stands for any run of characters?
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    if !name.ends_with(last) {
        return false;
    }
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// Where the kernel tells about block devices: `/sys`, `/proc/self/mountinfo`, `/proc/swaps`
/// and `/dev` on a host; a directory tree of the same shape in tests.
#[derive(Clone, Debug)]
pub struct Sysfs {
    pub sys: PathBuf,
    pub mountinfo: PathBuf,
    pub swaps: PathBuf,
    pub dev: PathBuf,
}

impl Sysfs {
    pub fn host() -> Sysfs {
        Sysfs {
            sys: "/sys".into(),
            mountinfo: "/proc/self/mountinfo".into(),
            swaps: "/proc/swaps".into(),
            dev: "/dev".into(),
        }
    }

    /// Whole disks whose kernel name matches one of `patterns` and that hold media (size > 0).
    pub fn scan(&self, patterns: &[String]) -> io::Result<Vec<Seen>> {
        let in_use = self.in_use()?;
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.sys.join("class/block"))? {
            let dir = e?.path();
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if dir.join("partition").exists() || !patterns.iter().any(|p| glob_match(p, &name)) {
                continue;
            }
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).map(|s| s.trim().to_string());
            // Gone mid-scan, or no media: not a drive right now.
            let Ok(sectors) = read("size").map(|s| s.parse::<u64>().unwrap_or(0)) else {
                continue;
            };
            let Ok(dev) = read("dev") else { continue };
            if sectors == 0 {
                continue;
            }
            let devname = read("uevent")
                .ok()
                .and_then(|u| {
                    u.lines()
                        .find_map(|l| l.strip_prefix("DEVNAME=").map(str::to_string))
                })
                .unwrap_or_else(|| name.replace('!', "/"));
            let diskseq = read("diskseq")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let refuse = if read("ro").is_ok_and(|ro| ro == "1") {
                Some("read-only".to_string())
            } else {
                self.use_of(&dir, &dev, &in_use)
            };
            out.push(Seen {
                path: self.dev.join(devname),
                identity: (dev_number(&dev), diskseq, sectors),
                refuse,
            });
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// `major:minor` of every mounted or swapped-on block device, with where.
    fn in_use(&self) -> io::Result<BTreeMap<String, String>> {
        let mut used = BTreeMap::new();
        // mountinfo: "id parent major:minor root mountpoint ..."
        for line in std::fs::read_to_string(&self.mountinfo)?.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let (Some(dev), Some(at)) = (f.get(2), f.get(4)) {
                used.entry(dev.to_string())
                    .or_insert_with(|| format!("mounted at {at}"));
            }
        }
        // swaps: "Filename Type Size Used Priority", a header line first.
        if let Ok(swaps) = std::fs::read_to_string(&self.swaps) {
            for line in swaps.lines().skip(1) {
                let Some(file) = line.split_whitespace().next() else {
                    continue;
                };
                if let Ok(m) = std::fs::metadata(file)
                    && m.file_type().is_block_device()
                {
                    let rdev = m.rdev();
                    let dev = format!("{}:{}", libc::major(rdev), libc::minor(rdev));
                    used.insert(dev, format!("swap on {file}"));
                }
            }
        }
        Ok(used)
    }

    /// Why the disk at `dir` (device `dev`) is in use, if it is: the disk or one of its
    /// partitions mounted or swapped on, or held by another device.
    fn use_of(&self, dir: &Path, dev: &str, in_use: &BTreeMap<String, String>) -> Option<String> {
        let mut devs: Vec<(String, PathBuf)> = vec![(dev.to_string(), dir.to_path_buf())];
        let mut seen = HashSet::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.join("partition").exists()
                && let Ok(d) = std::fs::read_to_string(p.join("dev"))
            {
                devs.push((d.trim().to_string(), p));
            }
        }
        for (d, path) in devs {
            if !seen.insert(d.clone()) {
                continue;
            }
            let part = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let part = part.unwrap_or_default();
            if let Some(how) = in_use.get(&d) {
                return Some(format!("in use: {part} {how}"));
            }
            let holders: Vec<String> = std::fs::read_dir(path.join("holders"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|h| h.file_name().to_string_lossy().into_owned())
                .collect();
            if !holders.is_empty() {
                return Some(format!("in use: {part} held by {}", holders.join(", ")));
            }
        }
        None
    }
}

fn dev_number(dev: &str) -> u64 {
    let (maj, min) = dev.split_once(':').unwrap_or((dev, "0"));
    libc::makedev(maj.parse().unwrap_or(0), min.parse().unwrap_or(0))
}

/// One kernel uevent: `ACTION@DEVPATH` and its `KEY=VALUE` pairs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uevent {
    pub action: String,
    pub devpath: String,
    pub vars: BTreeMap<String, String>,
}

impl Uevent {
    /// Parses the kernel's format: `action@devpath\0KEY=VALUE\0...`. Messages from udevd
    /// (which start `libudev\0`) and anything else malformed are `None`.
    pub fn parse(msg: &[u8]) -> Option<Uevent> {
        let mut fields = msg.split(|b| *b == 0).filter(|f| !f.is_empty());
        let head = std::str::from_utf8(fields.next()?).ok()?;
        let (action, devpath) = head.split_once('@')?;
        let mut vars = BTreeMap::new();
        for f in fields {
            let f = std::str::from_utf8(f).ok()?;
            let (k, v) = f.split_once('=')?;
            vars.insert(k.to_string(), v.to_string());
        }
        Some(Uevent {
            action: action.to_string(),
            devpath: devpath.to_string(),
            vars,
        })
    }

    /// A disk (not a partition) came, went, or changed its media.
    pub fn is_disk(&self) -> bool {
        self.vars.get("SUBSYSTEM").map(String::as_str) == Some("block")
            && self.vars.get("DEVTYPE").map(String::as_str) == Some("disk")
    }
}

/// The kernel's uevent multicast group on a netlink socket, read by a thread of its own.
pub struct Uevents {
    rx: tokio::sync::mpsc::Receiver<io::Result<Uevent>>,
}

impl Uevents {
    /// Joins the kernel's uevent group (allowed without privileges on Linux). The reading
    /// thread ends within a second of the `Uevents` being dropped.
    pub fn open() -> io::Result<Uevents> {
        use nix::sys::socket::{
            AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, setsockopt, socket,
            sockopt,
        };
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkKObjectUEvent,
        )?;
        // Group 1: the kernel's own broadcast (udevd re-broadcasts on group 2 after its rules).
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 1))?;
        // A burst of hot-plugs should not overflow the queue (it would only cost a rescan).
        let _ = setsockopt(&fd, sockopt::RcvBuf, &(1 << 20));
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(1, 0),
        )?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        std::thread::Builder::new()
            .name("uevents".into())
            .spawn(move || read_uevents(fd, tx))?;
        Ok(Uevents { rx })
    }

    /// The next uevent from the kernel. An overflowed queue (`ENOBUFS`) comes back as an
    /// error; the caller rescans.
    pub async fn next(&mut self) -> io::Result<Uevent> {
        self.rx
            .recv()
            .await
            .unwrap_or_else(|| Err(io::Error::other("the uevent reader stopped")))
    }
}

/// Reads uevents until the receiver is gone. Messages from anyone but the kernel (netlink port
/// 0) are ignored: a local process must not be able to fake a hot-plug.
fn read_uevents(fd: OwnedFd, tx: tokio::sync::mpsc::Sender<io::Result<Uevent>>) {
    use nix::errno::Errno;
    use nix::sys::socket::{NetlinkAddr, recvfrom};
    let mut buf = vec![0u8; 16 << 10];
    while !tx.is_closed() {
        let sent = match recvfrom::<NetlinkAddr>(fd.as_raw_fd(), &mut buf) {
            Ok((n, Some(from))) if from.pid() == 0 => match Uevent::parse(&buf[..n]) {
                Some(e) => tx.blocking_send(Ok(e)),
                None => Ok(()),
            },
            Ok(_) | Err(Errno::EAGAIN | Errno::EINTR) => Ok(()),
            Err(e) => tx.blocking_send(Err(e.into())),
        };
        if sent.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("sd*", "sda"));
        assert!(glob_match("nvme*n*", "nvme0n1"));
        assert!(!glob_match("nvme*n*", "nvme0"));
        assert!(glob_match("loop*", "loop12"));
        assert!(!glob_match("sd*", "vda"));
        assert!(glob_match("vda", "vda"));
        assert!(!glob_match("vda", "vdab"));
        assert!(glob_match("*", "anything"));
        assert!(!glob_match("a*a", "a"));
    }

    #[test]
    fn uevents_parse_and_udevd_messages_do_not() {
        let e = Uevent::parse(
            b"change@/devices/virtual/block/loop0\0ACTION=change\0SUBSYSTEM=block\0DEVNAME=loop0\0DEVTYPE=disk\0DISKSEQ=12\0",
        )
        .unwrap();
        assert_eq!(e.action, "change");
        assert_eq!(e.devpath, "/devices/virtual/block/loop0");
        assert_eq!(e.vars["DISKSEQ"], "12");
        assert!(e.is_disk());
        let part = Uevent::parse(b"add@/block/sda/sda1\0SUBSYSTEM=block\0DEVTYPE=partition\0");
        assert!(!part.unwrap().is_disk());
        assert!(Uevent::parse(b"libudev\0\xfe\xed\xca\xfe").is_none());
        assert!(Uevent::parse(b"").is_none());
        assert!(Uevent::parse(b"add@/x\0NOEQUALS\0").is_none());
    }

    /// A sysfs tree of the host's shape: a free marked disk, the system disk with a mounted
    /// partition, one with a swap partition's holder, a read-only disk, an empty drive slot,
    /// and a partition entry that is not a disk.
    #[test]
    fn block_scan_refuses_disks_in_use_or_read_only_and_skips_empty_slots() {
        let root = tempfile::tempdir().unwrap();
        let sys = root.path().join("sys");
        let disk = |name: &str, dev: &str, size: u64, ro: bool| {
            let d = sys.join("class/block").join(name);
            std::fs::create_dir_all(d.join("holders")).unwrap();
            std::fs::write(d.join("dev"), format!("{dev}\n")).unwrap();
            std::fs::write(d.join("size"), format!("{size}\n")).unwrap();
            std::fs::write(d.join("ro"), if ro { "1\n" } else { "0\n" }).unwrap();
            std::fs::write(d.join("diskseq"), "7\n").unwrap();
            std::fs::write(d.join("uevent"), format!("MAJOR=8\nDEVNAME={name}\n")).unwrap();
            d
        };
        let part = |disk: &Path, name: &str, dev: &str| {
            let p = disk.join(name);
            std::fs::create_dir_all(p.join("holders")).unwrap();
            std::fs::write(p.join("partition"), "1\n").unwrap();
            std::fs::write(p.join("dev"), format!("{dev}\n")).unwrap();
            // sysfs also lists partitions beside the disks.
            std::fs::create_dir_all(sys.join("class/block").join(name)).unwrap();
            std::fs::write(sys.join("class/block").join(name).join("partition"), "1").unwrap();
            p
        };
        disk("sda", "8:0", 4_000_000, false);
        let sdb = disk("sdb", "8:16", 4_000_000, false);
        part(&sdb, "sdb1", "8:17");
        let sdc = disk("sdc", "8:32", 4_000_000, false);
        let sdc2 = part(&sdc, "sdc2", "8:34");
        std::fs::write(sdc2.join("holders/dm-0"), "").unwrap();
        disk("sdd", "8:48", 4_000_000, true);
        disk("sde", "8:64", 0, false);
        disk("zram0", "253:0", 1_000, false);
        let mountinfo = root.path().join("mountinfo");
        std::fs::write(
            &mountinfo,
            "22 1 8:17 / / rw,relatime shared:1 - ext4 /dev/sdb1 rw\n23 22 0:21 / /proc rw - proc proc rw\n",
        )
        .unwrap();
        let s = Sysfs {
            sys,
            mountinfo,
            swaps: root.path().join("no-swaps"),
            dev: "/dev".into(),
        };
        let seen = s.scan(&["sd*".to_string()]).unwrap();
        let by: BTreeMap<String, Option<String>> = seen
            .iter()
            .map(|s| (s.path.display().to_string(), s.refuse.clone()))
            .collect();
        assert_eq!(
            by,
            BTreeMap::from([
                ("/dev/sda".to_string(), None),
                (
                    "/dev/sdb".to_string(),
                    Some("in use: sdb1 mounted at /".to_string())
                ),
                (
                    "/dev/sdc".to_string(),
                    Some("in use: sdc2 held by dm-0".to_string())
                ),
                ("/dev/sdd".to_string(), Some("read-only".to_string())),
            ])
        );
        assert_eq!(seen[0].identity, (libc::makedev(8, 0), 7, 4_000_000));
    }
}
