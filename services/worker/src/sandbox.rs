//! The action sandbox: bubblewrap's namespaces, an unprivileged user, and a cgroup per action.
//!
//! An action is spawned as `bwrap` (Debian's `bubblewrap`) after the forked child has joined the
//! action's cgroup, dropped to the sandbox user and set its priority and file-size limit; every
//! process the action starts inherits all four. Inside, it sees the host's `/usr` and `/etc`
//! (and the `/bin`, `/sbin`, `/lib*` links or directories, plus configured paths) read-only, a
//! private `/tmp`, `/dev` and `/proc`, and its exec root, bound at the same path: nothing else of
//! the worker (its CAS, input cache, configuration and credentials live elsewhere under its data
//! dir). Its user, mount, pid, ipc, uts and cgroup namespaces are new, and so is its network
//! namespace (only its own loopback) unless it asked for the network where the pool allows it.
//! When the action's first process ends, bubblewrap's init ends the pid namespace and with it
//! every process left (a `setsid` child included); on a timeout the cgroup is killed whole.
//!
//! Input files are hard links to the worker's input cache, owned by root and read-only: the
//! sandbox user can read them and remove its links, never change them. The exec root's
//! directories belong to the sandbox user (see `inputs::DirStash`), so actions write where they
//! need to. See ADR 0008 for the choices and their cost per action.

use crate::JobError;
use motorpool_config::{SandboxConfig, SandboxMode};
use motorpool_messages::ErrorCode;
use std::ffi::OsString;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why the sandbox cannot be set up on this host.
#[derive(Debug, thiserror::Error)]
#[error("the action sandbox cannot start: {0}")]
pub struct SandboxError(pub String);

/// What one action may use, from the configuration and its platform properties.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub max_processes: u64,
    /// CPU quota in cores; `None` is no quota.
    pub cpu_cores: Option<f64>,
    /// Keep the host network (asked for with `network = "on"`, allowed by the pool).
    pub network: bool,
}

/// The sandbox of one worker.
pub struct Sandbox {
    config: SandboxConfig,
    bwrap: PathBuf,
    /// The read-only part of the sandbox's file system, as bwrap arguments.
    fs_args: Vec<OsString>,
    cgroups: Cgroups,
}

impl Sandbox {
    /// Sets up the sandbox of worker `worker_id`: finds bwrap, checks that the worker may switch
    /// to the sandbox user, and prepares the cgroups (removing any a previous run left).
    /// `None` when the configuration turns it off.
    pub fn open(config: &SandboxConfig, worker_id: &str) -> Result<Option<Sandbox>, SandboxError> {
        if config.mode == SandboxMode::Off {
            return Ok(None);
        }
        if !nix::unistd::geteuid().is_root() {
            return Err(SandboxError(format!(
                "the worker runs as uid {}, not root: it needs root to run actions as uid {} and \
                 to give them cgroups (or set sandbox.mode = \"off\" for a pool whose every \
                 action is trusted)",
                nix::unistd::geteuid(),
                config.uid
            )));
        }
        if config.uid == 0 || config.gid == 0 {
            return Err(SandboxError(
                "sandbox.uid and sandbox.gid must not be 0 (root)".into(),
            ));
        }
        let bwrap = match &config.bwrap {
            Some(p) => p.clone(),
            None => find_in_path("bwrap").ok_or_else(|| {
                SandboxError(
                    "bwrap is not on PATH: install bubblewrap (Debian: apt-get install \
                     bubblewrap), or set sandbox.bwrap"
                        .into(),
                )
            })?,
        };
        let mut fs_args: Vec<OsString> = Vec::new();
        for p in ["/usr", "/etc"] {
            fs_args.extend(["--ro-bind".into(), p.into(), p.into()]);
        }
        for p in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = std::fs::read_link(p)
                        .map_err(|e| SandboxError(format!("read link {p}: {e}")))?;
                    fs_args.extend(["--symlink".into(), target.into(), p.into()]);
                }
                Ok(m) if m.is_dir() => fs_args.extend(["--ro-bind".into(), p.into(), p.into()]),
                _ => {}
            }
        }
        for p in &config.read_only_paths {
            if !p.is_absolute() || !p.exists() {
                return Err(SandboxError(format!(
                    "sandbox.read_only_paths names {}, which is not an existing absolute path",
                    p.display()
                )));
            }
            fs_args.extend(["--ro-bind".into(), p.into(), p.into()]);
        }
        fs_args.extend(["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"].map(OsString::from));
        let cgroups = Cgroups::open(Path::new("/proc/self"), worker_id)?;
        Ok(Some(Sandbox {
            config: config.clone(),
            bwrap,
            fs_args,
            cgroups,
        }))
    }

    /// The user and group owning the exec root's directories.
    pub fn owner(&self) -> (u32, u32) {
        (self.config.uid, self.config.gid)
    }

    /// Which cgroup version this host gave the sandbox.
    pub fn cgroup_version(&self) -> u8 {
        self.cgroups.version()
    }

    /// The limits of an action with these platform properties.
    pub fn limits(&self, platform: &[(String, String)]) -> Result<Limits, JobError> {
        let c = &self.config;
        let mut limits = Limits {
            memory_bytes: c.memory_bytes,
            max_processes: c.max_processes,
            cpu_cores: (c.cpu_cores > 0.0).then_some(c.cpu_cores),
            network: false,
        };
        let bad = |m: String| JobError::action(ErrorCode::InvalidArgument, m);
        for (k, v) in platform {
            match k.as_str() {
                "memory-mb" => {
                    let mb: u64 = v.parse().map_err(|_| {
                        bad(format!(
                            "platform property memory-mb={v:?} is not a number of MiB"
                        ))
                    })?;
                    let want = mb.saturating_mul(1 << 20);
                    if want > c.max_memory_bytes {
                        return Err(bad(format!(
                            "platform property memory-mb={mb} asks more than this pool's {} MiB",
                            c.max_memory_bytes >> 20
                        )));
                    }
                    limits.memory_bytes = want;
                }
                "cores" => {
                    let cores: f64 = v
                        .parse()
                        .ok()
                        .filter(|n: &f64| n.is_finite() && *n > 0.0)
                        .ok_or_else(|| {
                            bad(format!(
                                "platform property cores={v:?} is not a positive number"
                            ))
                        })?;
                    limits.cpu_cores = Some(cores);
                }
                "network" => match v.as_str() {
                    "on" if c.allow_network => limits.network = true,
                    "on" => {
                        return Err(bad(
                            "the action asks for network = \"on\", which this pool does not allow"
                                .into(),
                        ));
                    }
                    "off" => {}
                    _ => {
                        return Err(bad(format!(
                            "platform property network={v:?} is not on or off"
                        )));
                    }
                },
                _ => {}
            }
        }
        Ok(limits)
    }

    /// Makes the cgroup for one action (`name` unique among this worker's running actions).
    pub fn cgroup(&self, name: &str, limits: &Limits) -> io::Result<ActionCgroup> {
        self.cgroups.make(name, limits)
    }

    /// The bwrap command that runs `program args` in `workdir` (inside `exec_root`), the child
    /// of a spawn prepared by [`ActionCgroup::prepare`].
    pub fn command(
        &self,
        exec_root: &Path,
        workdir: &Path,
        program: &OsString,
        args: &[String],
        limits: &Limits,
    ) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.bwrap);
        cmd.args([
            "--die-with-parent",
            "--new-session",
            "--unshare-user",
            "--unshare-ipc",
            "--unshare-pid",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            "localhost",
        ]);
        if !limits.network {
            cmd.arg("--unshare-net");
        }
        cmd.args(&self.fs_args)
            .arg("--bind")
            .arg(exec_root)
            .arg(exec_root)
            .arg("--chdir")
            .arg(workdir)
            .arg("--")
            .arg(program)
            .args(args);
        cmd
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_else(|| vec!["/usr/bin".into(), "/bin".into()])
        .into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The cgroup hierarchy the worker makes its actions' cgroups in: `<parent>/motorpool-<worker>`,
/// where the parent is the worker's own cgroup on cgroup v1 (one directory per controller) and
/// the hierarchy's root on cgroup v2 (whose "no processes in inner cgroups" rule rules out the
/// worker's own, which holds the worker).
#[derive(Debug)]
enum Cgroups {
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: Option<PathBuf>,
    },
    V2 {
        base: PathBuf,
        cpu: bool,
    },
}

/// Parses `/proc/<pid>/cgroup` and `/proc/<pid>/mountinfo`: (controllers, path) per hierarchy,
/// and (mount point, root, fs type, super options) per cgroup mount.
type Membership = Vec<(String, String)>;
type CgroupMount = (PathBuf, String, String, String);

fn read_cgroup_tables(proc_dir: &Path) -> Result<(Membership, Vec<CgroupMount>), SandboxError> {
    let read = |name: &str| {
        std::fs::read_to_string(proc_dir.join(name))
            .map_err(|e| SandboxError(format!("read {}/{name}: {e}", proc_dir.display())))
    };
    let membership = read("cgroup")?
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, ctl, path) = (it.next()?, it.next()?, it.next()?);
            Some((ctl.to_string(), path.to_string()))
        })
        .collect();
    let mounts = read("mountinfo")?
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            let fstype = *post.first()?;
            if fstype != "cgroup" && fstype != "cgroup2" {
                return None;
            }
            Some((
                PathBuf::from(pre.get(4)?),
                pre.get(3)?.to_string(),
                fstype.to_string(),
                post.get(2).unwrap_or(&"").to_string(),
            ))
        })
        .collect();
    Ok((membership, mounts))
}

/// `mount point + (path - mount root)`.
fn under_mount(mount: &Path, root: &str, path: &str) -> PathBuf {
    let rel = path
        .strip_prefix(root)
        .unwrap_or(path)
        .trim_start_matches('/');
    if rel.is_empty() {
        mount.to_path_buf()
    } else {
        mount.join(rel)
    }
}

fn write_file(path: &Path, value: &str) -> io::Result<()> {
    std::fs::write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("write {value:?} to {}: {e}", path.display()),
        )
    })
}

impl Cgroups {
    fn open(proc_dir: &Path, worker_id: &str) -> Result<Cgroups, SandboxError> {
        let (membership, mounts) = read_cgroup_tables(proc_dir)?;
        // The pid keeps two stacks on one host (tests, say) whose workers share an id apart.
        let prefix = format!("motorpool-{worker_id}-");
        let leaf = format!("{prefix}{}", std::process::id());
        let unified = mounts.iter().find(|m| m.2 == "cgroup2");
        let v1 = |ctl: &str| -> Option<PathBuf> {
            let (_, path) = membership
                .iter()
                .find(|(c, _)| c.split(',').any(|c| c == ctl))?;
            let (mount, root, _, _) = mounts
                .iter()
                .find(|m| m.2 == "cgroup" && m.3.split(',').any(|o| o == ctl))?;
            Some(under_mount(mount, root, path).join(&leaf))
        };
        let cg = match (v1("memory"), v1("pids")) {
            (Some(memory), Some(pids)) => Cgroups::V1 {
                memory,
                pids,
                cpu: v1("cpu"),
            },
            _ => {
                let Some((mount, _, _, _)) = unified else {
                    return Err(SandboxError(
                        "no cgroup hierarchy with the memory and pids controllers is mounted"
                            .into(),
                    ));
                };
                let available =
                    std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
                let has = |c: &str| available.split_whitespace().any(|a| a == c);
                if !has("memory") || !has("pids") {
                    return Err(SandboxError(format!(
                        "cgroup v2 at {} offers {available:?}; the sandbox needs memory and pids",
                        mount.display()
                    )));
                }
                Cgroups::V2 {
                    base: mount.join(&leaf),
                    cpu: has("cpu"),
                }
            }
        };
        cg.prepare(&prefix)
            .map_err(|e| SandboxError(format!("prepare the actions' cgroups ({cg:?}): {e}")))?;
        Ok(cg)
    }

    fn version(&self) -> u8 {
        match self {
            Cgroups::V1 { .. } => 1,
            Cgroups::V2 { .. } => 2,
        }
    }

    fn bases(&self) -> Vec<&Path> {
        match self {
            Cgroups::V1 { memory, pids, cpu } => {
                let mut v = vec![memory.as_path(), pids.as_path()];
                v.extend(cpu.as_deref());
                v
            }
            Cgroups::V2 { base, .. } => vec![base.as_path()],
        }
    }

    /// Creates the worker's cgroup directories, removes those a previous run of this worker left
    /// (named `prefix<pid>` for a pid that is gone), and on v2 enables the controllers for the
    /// actions' cgroups.
    fn prepare(&self, prefix: &str) -> io::Result<()> {
        for base in self.bases() {
            std::fs::create_dir_all(base)?;
            let parent = base.parent().expect("the base is below the mount");
            for e in std::fs::read_dir(parent)?.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let gone = name
                    .strip_prefix(prefix)
                    .and_then(|pid| pid.parse::<u32>().ok())
                    .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
                if gone {
                    kill_and_remove(&[e.path()], self.version())?;
                }
            }
        }
        if let Cgroups::V2 { base, cpu } = self {
            let want = if *cpu {
                "+memory +pids +cpu"
            } else {
                "+memory +pids"
            };
            let parent = base.parent().expect("the base is below the mount");
            write_file(&parent.join("cgroup.subtree_control"), want)?;
            write_file(&base.join("cgroup.subtree_control"), want)?;
        }
        Ok(())
    }

    fn make(&self, name: &str, limits: &Limits) -> io::Result<ActionCgroup> {
        let dirs: Vec<PathBuf> = self.bases().iter().map(|b| b.join(name)).collect();
        for d in &dirs {
            match std::fs::create_dir(d) {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    kill_and_remove(std::slice::from_ref(d), self.version())?;
                    std::fs::create_dir(d)?;
                }
                r => r?,
            }
        }
        let cg = ActionCgroup {
            dirs,
            version: self.version(),
            memory_bytes: limits.memory_bytes,
        };
        let quota = limits
            .cpu_cores
            .map(|c| ((c * 100_000.0) as u64).max(1_000));
        match self {
            Cgroups::V1 { cpu, .. } => {
                let (mem, pids) = (&cg.dirs[0], &cg.dirs[1]);
                write_file(
                    &mem.join("memory.limit_in_bytes"),
                    &limits.memory_bytes.to_string(),
                )?;
                let memsw = mem.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write_file(&memsw, &limits.memory_bytes.to_string())?;
                }
                write_file(&pids.join("pids.max"), &limits.max_processes.to_string())?;
                if let (Some(_), Some(q)) = (cpu, quota) {
                    write_file(&cg.dirs[2].join("cpu.cfs_period_us"), "100000")?;
                    write_file(&cg.dirs[2].join("cpu.cfs_quota_us"), &q.to_string())?;
                }
            }
            Cgroups::V2 { cpu, .. } => {
                let d = &cg.dirs[0];
                write_file(&d.join("memory.max"), &limits.memory_bytes.to_string())?;
                if d.join("memory.swap.max").exists() {
                    write_file(&d.join("memory.swap.max"), "0")?;
                }
                write_file(&d.join("pids.max"), &limits.max_processes.to_string())?;
                if let (true, Some(q)) = (cpu, quota) {
                    write_file(&d.join("cpu.max"), &format!("{q} 100000"))?;
                }
            }
        }
        Ok(cg)
    }
}

impl Drop for Cgroups {
    /// The worker is going: so do its actions' cgroups (their processes are already gone).
    fn drop(&mut self) {
        let bases: Vec<PathBuf> = self.bases().iter().map(|b| b.to_path_buf()).collect();
        let _ = kill_and_remove(&bases, self.version());
    }
}

/// Kills every process in the cgroups `dirs` and removes them (children first).
fn kill_and_remove(dirs: &[PathBuf], version: u8) -> io::Result<()> {
    for d in dirs {
        if let Ok(rd) = std::fs::read_dir(d) {
            let subs: Vec<PathBuf> = rd
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect();
            kill_and_remove(&subs, version)?;
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for d in dirs {
        if !d.exists() {
            continue;
        }
        loop {
            kill_members(d, version);
            match std::fs::remove_dir(d) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) if std::time::Instant::now() > deadline => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("remove cgroup {}: {e}", d.display()),
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
    Ok(())
}

/// SIGKILLs every process of one cgroup (`cgroup.kill` where the kernel has it).
fn kill_members(dir: &Path, version: u8) {
    if version == 2 && dir.join("cgroup.kill").exists() {
        let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        return;
    }
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// One action's cgroup (one directory per v1 controller, or one v2 directory).
#[derive(Debug)]
pub struct ActionCgroup {
    dirs: Vec<PathBuf>,
    version: u8,
    memory_bytes: u64,
}

/// What the child of a sandboxed spawn does between fork and exec.
pub struct Prepared {
    procs: Vec<std::fs::File>,
    uid: nix::unistd::Uid,
    gid: nix::unistd::Gid,
    nice: i32,
    max_file_bytes: u64,
}

impl ActionCgroup {
    /// Opens what the child needs before it drops its rights.
    pub fn prepare(
        &self,
        owner: (u32, u32),
        nice: i32,
        max_file_bytes: u64,
    ) -> io::Result<Prepared> {
        let procs = self
            .dirs
            .iter()
            .map(|d| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("cgroup.procs"))
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Prepared {
            procs,
            uid: nix::unistd::Uid::from_raw(owner.0),
            gid: nix::unistd::Gid::from_raw(owner.1),
            nice,
            max_file_bytes,
        })
    }

    /// Kills whatever still runs in the cgroup.
    pub fn kill(&self) {
        for d in &self.dirs {
            kill_members(d, self.version);
        }
    }

    /// Whether the kernel killed a process of the action for going over its memory limit.
    pub fn oom_killed(&self) -> bool {
        let (file, dir) = match self.version {
            1 => ("memory.oom_control", &self.dirs[0]),
            _ => ("memory.events", &self.dirs[0]),
        };
        std::fs::read_to_string(dir.join(file))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(' '))
            .any(|(k, v)| k == "oom_kill" && v.trim().parse::<u64>().is_ok_and(|n| n > 0))
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }

    /// Kills what is left and removes the cgroup.
    pub fn remove(self) -> io::Result<()> {
        kill_and_remove(&self.dirs, self.version)
    }
}

impl Prepared {
    /// Runs in the forked child, before exec: joins the cgroup (so that every process the action
    /// starts is in it from its first instruction), sets the priority and the largest file the
    /// action may write, then drops to the sandbox user. Only system calls: no allocation, no
    /// lock, as a child of a multi-threaded parent requires.
    fn in_child(&self) -> io::Result<()> {
        for f in &self.procs {
            nix::unistd::write(f, b"0")?;
        }
        if self.nice > 0 {
            let current = nix::libc::PRIO_PROCESS;
            // SAFETY: setpriority(2) on the calling process; no memory is passed.
            #[allow(unsafe_code)]
            let r = unsafe { nix::libc::setpriority(current, 0, self.nice) };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        use nix::sys::resource::{Resource, setrlimit};
        setrlimit(
            Resource::RLIMIT_FSIZE,
            self.max_file_bytes,
            self.max_file_bytes,
        )?;
        setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
        nix::unistd::setgroups(&[])?;
        nix::unistd::setgid(self.gid)?;
        nix::unistd::setuid(self.uid)?;
        Ok(())
    }

    /// Installs [`Prepared::in_child`] on `cmd`.
    pub fn apply(self, cmd: &mut tokio::process::Command) {
        // SAFETY: the closure runs between fork and exec in the child, where only
        // async-signal-safe operations are allowed: `in_child` makes system calls on file
        // descriptors and values it owns, and allocates nothing (its error path builds an
        // `io::Error` from an errno, which does not allocate).
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || self.in_child());
        }
    }
}

/// Gives `path` to `owner` (uid, gid): how exec-root directories become the sandbox user's.
pub fn give(path: &Path, (uid, gid): (u32, u32)) -> io::Result<()> {
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )?;
    Ok(())
}

/// Appends `note` to the file at `path` (a stream the worker kept for the action).
pub fn append_note(path: &Path, note: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(path) {
        let _ = f.write_all(note.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_proc(cgroup: &str, mountinfo: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("cgroup"), cgroup).unwrap();
        std::fs::write(d.path().join("mountinfo"), mountinfo).unwrap();
        d
    }

    #[test]
    fn cgroup_tables_name_each_controllers_directory() {
        let p = fake_proc(
            "4:memory:/harness/a\n8:pids:/\n1:cpu:/\n0::/\n",
            "36 25 0:31 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory\n\
             37 25 0:32 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n\
             38 25 0:33 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n\
             39 25 0:34 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
             40 25 0:35 / /tmp rw - tmpfs tmpfs rw\n",
        );
        let (m, mounts) = read_cgroup_tables(p.path()).unwrap();
        assert_eq!(m[0], ("memory".to_string(), "/harness/a".to_string()));
        assert_eq!(mounts.len(), 4, "tmpfs is not a cgroup mount");
        assert_eq!(
            under_mount(Path::new("/sys/fs/cgroup/memory"), "/", "/harness/a"),
            PathBuf::from("/sys/fs/cgroup/memory/harness/a")
        );
        // A container's cgroup namespace mounts its own cgroup as the root.
        assert_eq!(
            under_mount(Path::new("/sys/fs/cgroup"), "/docker/x", "/docker/x"),
            PathBuf::from("/sys/fs/cgroup")
        );
    }

    #[test]
    fn platform_properties_ask_within_the_pools_limits() {
        let mut config = SandboxConfig {
            memory_bytes: 1 << 30,
            max_memory_bytes: 4 << 30,
            ..SandboxConfig::default()
        };
        let sb = |config: &SandboxConfig| Sandbox {
            config: config.clone(),
            bwrap: "/usr/bin/bwrap".into(),
            fs_args: Vec::new(),
            cgroups: Cgroups::V2 {
                base: "/nonexistent".into(),
                cpu: true,
            },
        };
        let p = |kv: &[(&str, &str)]| -> Vec<(String, String)> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let l = sb(&config).limits(&p(&[])).unwrap();
        assert_eq!(
            (l.memory_bytes, l.cpu_cores, l.network),
            (1 << 30, None, false)
        );
        let l = sb(&config)
            .limits(&p(&[
                ("memory-mb", "2048"),
                ("cores", "1.5"),
                ("OSFamily", "linux"),
            ]))
            .unwrap();
        assert_eq!((l.memory_bytes, l.cpu_cores), (2 << 30, Some(1.5)));
        for (bad, needle) in [
            (
                p(&[("memory-mb", "8192")]),
                "more than this pool's 4096 MiB",
            ),
            (p(&[("memory-mb", "lots")]), "not a number"),
            (p(&[("cores", "-1")]), "positive"),
            (p(&[("network", "on")]), "does not allow"),
            (p(&[("network", "maybe")]), "not on or off"),
        ] {
            let e = sb(&config).limits(&bad).unwrap_err();
            assert!(matches!(e, JobError::Action(_)), "{e}");
            assert!(e.to_string().contains(needle), "{bad:?}: {e}");
        }
        config.allow_network = true;
        assert!(
            sb(&config)
                .limits(&p(&[("network", "on")]))
                .unwrap()
                .network
        );
    }

    #[test]
    fn cgroup_v2_limits_are_written_to_the_actions_directory() {
        let root = tempfile::tempdir().unwrap();
        let base = root.path().join("motorpool-w1");
        std::fs::create_dir(&base).unwrap();
        let cg = Cgroups::V2 {
            base: base.clone(),
            cpu: true,
        };
        let limits = Limits {
            memory_bytes: 3 << 20,
            max_processes: 64,
            cpu_cores: Some(0.5),
            network: false,
        };
        // A plain directory stands in for cgroupfs: the writes create the files.
        let made = cg.make("a1", &limits).unwrap();
        let read = |f: &str| std::fs::read_to_string(base.join("a1").join(f)).unwrap();
        assert_eq!(read("memory.max"), (3u64 << 20).to_string());
        assert_eq!(read("pids.max"), "64");
        assert_eq!(read("cpu.max"), "50000 100000");
        assert_eq!(made.dirs, vec![base.join("a1")]);
        std::fs::write(base.join("a1/memory.events"), "low 0\noom 1\noom_kill 1\n").unwrap();
        assert!(made.oom_killed());
        // cgroupfs removes a cgroup's files with it; a plain directory must be emptied first.
        std::fs::remove_dir_all(base.join("a1")).unwrap();
    }
}
