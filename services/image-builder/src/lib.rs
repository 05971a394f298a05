//! The image builder: a git repository with a Dockerfile becomes a bootable file-system image.
//!
//! Docker is only the build tool, as in Flexo: the Dockerfile is built by the local engine, a
//! container is created (never started) and exported as a tar of the root file system, and the
//! tree becomes an ext4 partition image with `mkfs.ext4 -d`, without mounting anything. Steps:
//!
//! 1. `git clone` the repository, check out the ref, note the commit and its time.
//! 2. `docker build` (the legacy builder: no registry, base images are local) with the build
//!    arguments and `SOURCE_DATE_EPOCH` set to the commit time.
//! 3. `docker create` + `docker export` the root file system; `docker rm` the container and the
//!    build tag.
//! 4. Unpack it, drop Docker's traces (`/.dockerenv`), write the image's own GRUB config when the
//!    tree has a kernel (booting with `overlayroot=crypt:...` on the overlay the master menu
//!    names, plus the image's own arguments from `/etc/motorpool/kernel-cmdline`), and set every
//!    timestamp to the commit time.
//! 5. `mkfs.ext4 -d` with a UUID and hash seed derived from the commit and the build inputs, and
//!    the clock fixed at the commit time; then every inode's access and change times set to the
//!    commit time with `debugfs` (`mkfs.ext4 -d` copies them from the unpacked tree, where they
//!    are build times). Two builds of one commit on one host are byte-identical (the build test
//!    proves it). Inode numbers follow the order `mkfs.ext4 -d` reads directories in, which is
//!    the build host's file system's: e2fsprogs 1.47.0 (Debian 12) does not sort them, so two
//!    hosts with different file systems can still number inodes differently.
//! 6. The manifest (repo, commit, Dockerfile, build args, sizes, BLAKE3, block map) beside the
//!    image in the store, `<store>/<channel>/<image id>/`; only the newest `keep` images of a
//!    channel are kept.
//!
//! Images are vehicle-agnostic: nothing of a car (identity, keys, calibration) is an input.

pub mod actor;
pub mod metric_names;
pub mod testing;

use motorpool_disk_burner::image::{Image, ImageManifest, valid_id};
pub use motorpool_disk_burner::sign::ManifestSigner;
pub use motorpool_messages::fleet::BuildRequest;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The manifest written beside every image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildManifest {
    pub repo: String,
    pub git_ref: String,
    pub commit: String,
    /// Commit time, seconds since the epoch: every timestamp in the image.
    pub source_date_epoch: u64,
    pub dockerfile: String,
    pub build_args: Vec<(String, String)>,
    pub channel: String,
    pub rootfs_tar_bytes: u64,
    pub tree_bytes: u64,
    /// Whether the tree had a kernel and got its own GRUB config.
    pub bootable: bool,
    /// BLAKE3 over the tree as the image holds it: every path in order with its type, mode,
    /// owner, size, mtime and content (or link target). The same inputs give the same tree
    /// digest, and on one build host the same image bytes (see the module's docs).
    pub tree_blake3: String,
    pub built_at_ms: u64,
    pub image: ImageManifest,
}

/// A built image in the store.
#[derive(Clone, Debug)]
pub struct Built {
    pub dir: PathBuf,
    pub image: PathBuf,
    pub manifest: BuildManifest,
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("bad request: {0}")]
    Request(String),
    #[error("{step}: {message}")]
    Step { step: &'static str, message: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl BuildError {
    /// True when the build's tools could not be reached (git or Docker missing, Docker's daemon
    /// down): worth trying again later, unlike a build that failed on its own inputs.
    pub fn is_infrastructure(&self) -> bool {
        match self {
            BuildError::Step { message, .. } => {
                message.starts_with("cannot run ")
                    || message.contains("Cannot connect to the Docker daemon")
                    || message.contains("error during connect")
            }
            BuildError::Io(_) | BuildError::Request(_) => false,
        }
    }
}

fn step(step: &'static str, message: impl Into<String>) -> BuildError {
    BuildError::Step {
        step,
        message: message.into(),
    }
}

/// Runs a command; its stdout, or an error with its stderr.
fn run(name: &'static str, cmd: &mut Command) -> Result<String, BuildError> {
    let out = cmd
        .output()
        .map_err(|e| step(name, format!("cannot run {:?}: {e}", cmd.get_program())))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(15).collect();
        return Err(step(
            name,
            format!(
                "{:?} failed ({}):\n{}",
                cmd.get_program(),
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A path inside the repository: relative, without `..`.
fn inside(what: &str, rel: &str) -> Result<(), BuildError> {
    let p = Path::new(rel);
    if p.is_absolute()
        || p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(BuildError::Request(format!(
            "{what} {rel:?} leaves the repository"
        )));
    }
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Builds the image and stores it, its manifest signed by `signer` when there is one;
/// `progress` hears each step.
pub fn build(
    req: &BuildRequest,
    store: &Path,
    keep: usize,
    signer: Option<&ManifestSigner>,
    progress: &dyn Fn(&str),
) -> Result<Built, BuildError> {
    inside("dockerfile", &req.dockerfile)?;
    inside("context", &req.context)?;
    if !valid_id(&req.channel) {
        return Err(BuildError::Request(format!(
            "channel {:?} is not a valid name",
            req.channel
        )));
    }
    if let Some(id) = req.image_id.as_deref().filter(|id| !valid_id(id)) {
        return Err(BuildError::Request(format!(
            "image id {id:?} must be 1-27 of [A-Za-z0-9._-], not starting with '.'"
        )));
    }
    for (k, _) in &req.build_args {
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(BuildError::Request(format!(
                "build argument name {k:?} is not valid"
            )));
        }
    }
    std::fs::create_dir_all(store)?;
    let work = tempfile_dir(store)?;
    let result = build_in(req, store, &work, keep, signer, progress);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn tempfile_dir(store: &Path) -> Result<PathBuf, BuildError> {
    let dir = store.join(format!(".build-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn build_in(
    req: &BuildRequest,
    store: &Path,
    work: &Path,
    keep: usize,
    signer: Option<&ManifestSigner>,
    progress: &dyn Fn(&str),
) -> Result<Built, BuildError> {
    // 1. Source.
    progress(&format!("clone {} at {}", req.repo, req.git_ref));
    let src = work.join("src");
    run(
        "git clone",
        Command::new("git")
            .args(["clone", "--quiet", "--no-checkout", &req.repo])
            .arg(&src),
    )?;
    // The ref as a branch, a tag or a commit, named in the error when it is none of them.
    let resolved = ["origin/", "refs/tags/", ""].iter().find_map(|prefix| {
        run(
            "git rev-parse",
            Command::new("git").arg("-C").arg(&src).args([
                "rev-parse",
                "--verify",
                "--quiet",
                &format!("{prefix}{}^{{commit}}", req.git_ref),
            ]),
        )
        .ok()
    });
    let Some(resolved) = resolved else {
        return Err(step(
            "git checkout",
            format!(
                "{:?} is not a branch, tag or commit of {}",
                req.git_ref, req.repo
            ),
        ));
    };
    run(
        "git checkout",
        Command::new("git")
            .arg("-C")
            .arg(&src)
            .args(["checkout", "--quiet", "--detach", &resolved]),
    )?;
    let commit = run(
        "git rev-parse",
        Command::new("git")
            .arg("-C")
            .arg(&src)
            .args(["rev-parse", "HEAD"]),
    )?;
    let epoch: u64 = run(
        "git log",
        Command::new("git")
            .arg("-C")
            .arg(&src)
            .args(["log", "-1", "--format=%ct"]),
    )?
    .parse()
    .map_err(|e| step("git log", format!("commit time: {e}")))?;
    let id = req
        .image_id
        .clone()
        .unwrap_or_else(|| format!("{}-{}", req.channel, &commit[..12]));
    if !valid_id(&id) {
        return Err(BuildError::Request(format!(
            "image id {id:?} must be 1-27 of [A-Za-z0-9._-], not starting with '.'"
        )));
    }
    let dockerfile = src.join(&req.dockerfile);
    if !dockerfile.is_file() {
        return Err(step(
            "docker build",
            format!("{} not found at {commit}", req.dockerfile),
        ));
    }

    // 2. Docker build (Docker as a build tool only).
    progress(&format!(
        "docker build {} ({})",
        req.dockerfile,
        &commit[..12]
    ));
    let tag = format!("motorpool-build:{}", uuid::Uuid::new_v4().simple());
    let mut cmd = Command::new("docker");
    cmd.env("DOCKER_BUILDKIT", "0")
        .args(["build", "--quiet", "--force-rm", "-t", &tag, "-f"])
        .arg(&dockerfile)
        .args(["--build-arg", &format!("SOURCE_DATE_EPOCH={epoch}")]);
    for (k, v) in &req.build_args {
        cmd.args(["--build-arg", &format!("{k}={v}")]);
    }
    cmd.arg(src.join(&req.context));
    run("docker build", &mut cmd)?;

    // 3. Export the root file system from a container that never runs.
    progress("export the root file system");
    let tar = work.join("rootfs.tar");
    let exported = (|| {
        // A command is required to create a container, though this one never starts.
        let cid = run(
            "docker create",
            Command::new("docker").args(["create", &tag, "/motorpool-never-runs"]),
        )?;
        let r = run(
            "docker export",
            Command::new("docker")
                .args(["export", "-o"])
                .arg(&tar)
                .arg(&cid),
        );
        let _ = run("docker rm", Command::new("docker").args(["rm", "-f", &cid]));
        r
    })();
    let _ = run(
        "docker rmi",
        Command::new("docker").args(["rmi", "-f", &tag]),
    );
    exported?;
    let rootfs_tar_bytes = std::fs::metadata(&tar)?.len();

    // 4. The tree.
    progress("unpack and normalise the tree");
    let tree = work.join("tree");
    std::fs::create_dir_all(&tree)?;
    run(
        "unpack",
        Command::new("tar")
            .args(["-x", "-p", "--numeric-owner", "-f"])
            .arg(&tar)
            .arg("-C")
            .arg(&tree),
    )?;
    std::fs::remove_file(&tar)?;
    let _ = std::fs::remove_file(tree.join(".dockerenv"));
    let bootable = write_image_grub(&tree)?;
    run(
        "timestamps",
        Command::new("find").arg(&tree).args([
            "-exec",
            "touch",
            "-h",
            "-d",
            &format!("@{epoch}"),
            "{}",
            "+",
        ]),
    )?;
    let (tree_blake3, tree_bytes) = tree_digest(&tree)?;

    // 5. The file system, from the same inputs the same bytes where ext4 allows.
    progress("mkfs.ext4 -d");
    let seed = blake3::hash(
        format!("{commit}\0{}\0{:?}\0{id}", req.dockerfile, req.build_args).as_bytes(),
    );
    let b = seed.as_bytes();
    let uuid = uuid::Builder::from_random_bytes(b[..16].try_into().unwrap_or([0; 16])).into_uuid();
    let hash_seed =
        uuid::Builder::from_random_bytes(b[16..32].try_into().unwrap_or([0; 16])).into_uuid();
    let size_mib = (tree_bytes * 13 / 10 / (1 << 20)) + 64;
    let image = work.join("image.ext4");
    run(
        "mkfs.ext4",
        Command::new(mkfs())
            .args(["-q", "-F", "-t", "ext4", "-U", &uuid.to_string()])
            .args(["-E", &format!("hash_seed={hash_seed},root_owner=0:0")])
            .args(["-L", &format!("mp-{}", &id[..id.len().min(13)])])
            .arg("-d")
            .arg(&tree)
            .arg(&image)
            .arg(format!("{size_mib}M"))
            .env("E2FSPROGS_FAKE_TIME", epoch.to_string()),
    )?;
    progress("fix every inode's times");
    fix_times(&image, &tree, epoch)?;

    // 6. Manifest, store, retention.
    progress("hash and map the image");
    let loaded = Image::load(&image, &id)?;
    let manifest = BuildManifest {
        repo: req.repo.clone(),
        git_ref: req.git_ref.clone(),
        commit,
        source_date_epoch: epoch,
        dockerfile: req.dockerfile.clone(),
        build_args: req.build_args.clone(),
        channel: req.channel.clone(),
        rootfs_tar_bytes,
        tree_bytes,
        bootable,
        tree_blake3,
        built_at_ms: now_ms(),
        image: loaded.manifest,
    };
    let staged = work.join("out");
    std::fs::create_dir_all(&staged)?;
    std::fs::rename(&image, staged.join("image.ext4"))?;
    let manifest_bytes = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    std::fs::write(staged.join("manifest.json"), &manifest_bytes)?;
    if let Some(signer) = signer {
        std::fs::write(
            staged.join(motorpool_disk_burner::sign::SIGNATURE_FILE),
            signer.sign(&manifest_bytes),
        )?;
    }
    let dir = store.join(&req.channel).join(&id);
    std::fs::create_dir_all(store.join(&req.channel))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::rename(&staged, &dir)?;
    progress(&format!("stored {}", dir.display()));
    prune(&store.join(&req.channel), keep)?;
    Ok(Built {
        image: dir.join("image.ext4"),
        dir,
        manifest,
    })
}

/// The tree digest (see [`BuildManifest::tree_blake3`]) and the tree's bytes.
pub fn tree_digest(root: &Path) -> Result<(String, u64), BuildError> {
    use std::os::unix::fs::MetadataExt;
    let mut h = blake3::Hasher::new();
    let mut bytes = 0u64;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        let meta = std::fs::symlink_metadata(&path)?;
        h.update(rel.as_os_str().as_encoded_bytes());
        h.update(&[0]);
        for v in [
            meta.mode() as u64,
            meta.uid() as u64,
            meta.gid() as u64,
            meta.size(),
            meta.mtime() as u64,
            meta.rdev(),
        ] {
            h.update(&v.to_le_bytes());
        }
        let ft = meta.file_type();
        if ft.is_symlink() {
            h.update(std::fs::read_link(&path)?.as_os_str().as_encoded_bytes());
        } else if ft.is_file() {
            bytes += meta.size();
            let mut f = std::fs::File::open(&path)?;
            h.update_reader(&mut f)?;
        } else if ft.is_dir() {
            let mut names: Vec<_> = std::fs::read_dir(&path)?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name())
                .collect();
            // Reverse order on the stack, so entries are visited in name order.
            names.sort();
            for n in names.into_iter().rev() {
                stack.push(rel.join(n));
            }
        }
    }
    Ok((h.finalize().to_hex().to_string(), bytes))
}

/// Sets every inode's access and change times to the commit time, with `debugfs -w`.
/// `mkfs.ext4 -d` copies them from the unpacked tree, where the change time is when the tree was
/// unpacked and touched and the access time when it was last read: build times, which made two
/// builds of one commit differ.
fn fix_times(image: &Path, tree: &Path, epoch: u64) -> Result<(), BuildError> {
    let mut cmds = String::new();
    let mut stack = vec![PathBuf::from("/")];
    while let Some(rel) = stack.pop() {
        let name = rel
            .to_str()
            .filter(|n| !n.contains(['"', '\n']))
            .ok_or_else(|| {
                step(
                    "fix times",
                    format!("the file name {rel:?} cannot be passed to debugfs"),
                )
            })?;
        for field in ["ctime", "atime"] {
            cmds.push_str(&format!("sif \"{name}\" {field} @{epoch}\n"));
        }
        let path = tree.join(rel.strip_prefix("/").unwrap_or(&rel));
        if std::fs::symlink_metadata(&path)?.is_dir() {
            for e in std::fs::read_dir(&path)? {
                stack.push(rel.join(e?.file_name()));
            }
        }
    }
    let file = image.with_extension("debugfs");
    std::fs::write(&file, cmds)?;
    let out = Command::new(debugfs())
        .arg("-w")
        .arg("-f")
        .arg(&file)
        .arg(image)
        .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
        .output()
        .map_err(|e| step("fix times", format!("cannot run debugfs: {e}")));
    let _ = std::fs::remove_file(&file);
    let out = out?;
    // debugfs echoes each command and reports what failed between them, still exiting 0.
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match said.lines().find(|l| !l.starts_with("debugfs")) {
        Some(bad) => Err(step("fix times", format!("debugfs: {bad}"))),
        None if !out.status.success() => Err(step("fix times", format!("debugfs: {}", out.status))),
        None => Ok(()),
    }
}

fn debugfs() -> &'static str {
    ["/usr/sbin/debugfs", "/sbin/debugfs"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("debugfs")
}

fn mkfs() -> &'static str {
    ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("mkfs.ext4")
}

/// The tree's own kernel arguments, from `/etc/motorpool/kernel-cmdline` (one line, for example
/// `console=ttyS0,115200 quiet`), with a leading space; empty without the file. Characters that
/// mean something to GRUB's config language are refused, so an image cannot change its menu entry.
fn kernel_args(tree: &Path) -> Result<String, BuildError> {
    let path = tree.join("etc/motorpool/kernel-cmdline");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => {
            return Err(step(
                "boot config",
                format!("/etc/motorpool/kernel-cmdline: {e}"),
            ));
        }
    };
    let line = text.trim();
    if line.lines().count() > 1
        || line
            .chars()
            .any(|c| !c.is_ascii_graphic() && c != ' ' || "\"'\\$;{}`#".contains(c))
    {
        return Err(step(
            "boot config",
            "/etc/motorpool/kernel-cmdline must be one line of plain kernel arguments (no quotes, \\, $, ;, braces, backquotes or #)",
        ));
    }
    Ok(if line.is_empty() {
        String::new()
    } else {
        format!(" {line}")
    })
}

/// Writes `/boot/grub/grub.cfg` for a tree that has a kernel: it boots the newest kernel with the
/// root and overlay the master menu hands over. False when there is no kernel.
fn write_image_grub(tree: &Path) -> Result<bool, BuildError> {
    let boot = tree.join("boot");
    let mut kernels: Vec<String> = std::fs::read_dir(&boot)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("vmlinuz"))
                .collect()
        })
        .unwrap_or_default();
    kernels.sort();
    let Some(kernel) = kernels.last() else {
        return Ok(false);
    };
    let version = kernel.strip_prefix("vmlinuz-").unwrap_or("");
    let initrd = ["initrd.img-", "initramfs-"]
        .iter()
        .map(|p| format!("{p}{version}"))
        .find(|n| boot.join(n).exists());
    let mut cfg = String::from(
        "# Written by the Motorpool image builder. The master menu on the drive sets\n\
         # mp_root_partuuid and mp_overlay_partuuid before it loads this file.\n\
         set timeout=0\n\
         menuentry \"Motorpool image $mp_image\" {\n",
    );
    let extra = kernel_args(tree)?;
    cfg.push_str(&format!(
        "    linux /boot/{kernel} root=PARTUUID=$mp_root_partuuid ro overlayroot=\"crypt:dev=/dev/disk/by-partuuid/$mp_overlay_partuuid,mkfs=1,fstype=ext4,recurse=0\"{extra}\n"
    ));
    if let Some(i) = initrd {
        cfg.push_str(&format!("    initrd /boot/{i}\n"));
    }
    cfg.push_str("}\n");
    std::fs::create_dir_all(boot.join("grub"))?;
    std::fs::write(boot.join("grub/grub.cfg"), cfg)?;
    Ok(true)
}

/// Keeps the newest `keep` images of a channel (by build time), removes the rest.
pub fn prune(channel_dir: &Path, keep: usize) -> Result<Vec<PathBuf>, BuildError> {
    let mut images: Vec<(u64, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(channel_dir)? {
        let e = e?;
        // `.fetch-*`: an image the depot is still assembling.
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let dir = e.path();
        let Ok(bytes) = std::fs::read(dir.join("manifest.json")) else {
            continue;
        };
        if let Ok(m) = serde_json::from_slice::<BuildManifest>(&bytes) {
            images.push((m.built_at_ms, dir));
        }
    }
    images.sort_by_key(|i| std::cmp::Reverse(i.0));
    let mut removed = Vec::new();
    for (_, dir) in images.into_iter().skip(keep.max(1)) {
        std::fs::remove_dir_all(&dir)?;
        removed.push(dir);
    }
    Ok(removed)
}

/// The images of a channel, newest first.
pub fn list(store: &Path, channel: &str) -> Vec<BuildManifest> {
    let mut out: Vec<BuildManifest> = std::fs::read_dir(store.join(channel))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| std::fs::read(e.path().join("manifest.json")).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect();
    out.sort_by_key(|m| std::cmp::Reverse(m.built_at_ms));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_images_kernel_arguments_are_appended_but_cannot_rewrite_its_menu_entry() {
        let tree = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tree.path().join("boot")).unwrap();
        std::fs::write(tree.path().join("boot/vmlinuz-6.1.0-av"), "k").unwrap();
        assert!(write_image_grub(tree.path()).unwrap());
        let cfg = std::fs::read_to_string(tree.path().join("boot/grub/grub.cfg")).unwrap();
        assert!(cfg.contains("recurse=0\"\n"), "{cfg}");
        std::fs::create_dir_all(tree.path().join("etc/motorpool")).unwrap();
        let args = tree.path().join("etc/motorpool/kernel-cmdline");
        std::fs::write(&args, "console=ttyS0,115200 quiet\n").unwrap();
        write_image_grub(tree.path()).unwrap();
        let cfg = std::fs::read_to_string(tree.path().join("boot/grub/grub.cfg")).unwrap();
        assert!(
            cfg.contains("recurse=0\" console=ttyS0,115200 quiet\n"),
            "{cfg}"
        );
        for hostile in [
            "quiet\"; linux /boot/evil",
            "a }\nmenuentry evil {",
            "init=$mp_image",
            "x; reboot",
            "a\tb",
        ] {
            std::fs::write(&args, hostile).unwrap();
            let e = write_image_grub(tree.path()).unwrap_err().to_string();
            assert!(
                e.contains("one line of plain kernel arguments"),
                "{hostile:?}: {e}"
            );
        }
    }
}
