//! Input fetch: materialise an action's input tree in a fresh exec dir.
//!
//! Directory messages are read level by level in batches. File bodies go through a local cache
//! of read-only files named by digest (one for executables, one for the rest), and land in the
//! exec dir as hard links to it, so an input shared by many actions is fetched and stored once.
//! A blob that the worker's own CAS shard holds is read from it directly; the rest come from the
//! cluster through the CAS client.

use crate::{JobError, Services};
use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use motorpool_cas_client::proto;
use motorpool_messages::{BlobDigest, DigestFunction, ErrorCode};
use parking_lot::Mutex;
use prost::Message as _;
use std::collections::{HashMap, HashSet, VecDeque};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A file of the input tree.
struct FileInput {
    path: PathBuf,
    digest: BlobDigest,
    executable: bool,
}

/// The local input cache: read-only files named by digest, evicted least recently used.
pub struct InputCache {
    dir: PathBuf,
    capacity: u64,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    /// file name -> (size, last use tick)
    entries: HashMap<String, (u64, u64)>,
    used: u64,
    tick: u64,
}

impl InputCache {
    /// Opens (and empties: its index lives in memory) the cache under `dir`.
    pub fn open(dir: PathBuf, capacity: u64) -> std::io::Result<InputCache> {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        Ok(InputCache {
            dir,
            capacity,
            state: Mutex::default(),
        })
    }

    fn name(d: &BlobDigest, executable: bool) -> String {
        format!(
            "{}-{}{}",
            d.function.name(),
            d.hex(),
            if executable { "-x" } else { "" }
        )
    }

    /// The cached file, if present (and marks it used).
    fn lookup(&self, d: &BlobDigest, executable: bool) -> Option<PathBuf> {
        let name = Self::name(d, executable);
        let mut s = self.state.lock();
        s.tick += 1;
        let tick = s.tick;
        let e = s.entries.get_mut(&name)?;
        e.1 = tick;
        Some(self.dir.join(name))
    }

    /// Stores `data` (already verified) and returns the cached file.
    fn insert(&self, d: &BlobDigest, executable: bool, data: &[u8]) -> std::io::Result<PathBuf> {
        let name = Self::name(d, executable);
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!(".{name}.{}", std::process::id()));
        std::fs::write(&tmp, data)?;
        let mode = if executable { 0o555 } else { 0o444 };
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, &path)?;
        let evict = {
            let mut s = self.state.lock();
            s.tick += 1;
            let tick = s.tick;
            if s.entries.insert(name, (d.size, tick)).is_none() {
                s.used += d.size;
            }
            let mut evict = Vec::new();
            if s.used > self.capacity {
                let mut by_age: Vec<(u64, String, u64)> = s
                    .entries
                    .iter()
                    .map(|(n, (size, t))| (*t, n.clone(), *size))
                    .collect();
                by_age.sort();
                for (_, n, size) in by_age {
                    if s.used <= self.capacity * 9 / 10 {
                        break;
                    }
                    s.entries.remove(&n);
                    s.used -= size;
                    evict.push(n);
                }
            }
            evict
        };
        // Exec dirs hold their own links: removing the cache's name never breaks a running action.
        for n in evict {
            let _ = std::fs::remove_file(self.dir.join(n));
        }
        Ok(path)
    }
}

fn check_name(name: &str, what: &str) -> Result<(), JobError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(JobError::action(
            ErrorCode::InvalidArgument,
            format!("the input tree has a {what} named {name:?}"),
        ));
    }
    Ok(())
}

/// Materialises the tree rooted at `root` into `exec_root` (which exists and is empty).
pub async fn materialize(
    svc: &Services,
    instance: &str,
    function: DigestFunction,
    root: BlobDigest,
    exec_root: &Path,
) -> Result<(), JobError> {
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    let mut links = Vec::new();
    let mut seen = HashSet::new();
    let mut level: VecDeque<(PathBuf, BlobDigest)> = VecDeque::from([(PathBuf::new(), root)]);
    let mut directories: HashMap<BlobDigest, re::Directory> = HashMap::new();
    while !level.is_empty() {
        let want: Vec<BlobDigest> = level
            .iter()
            .map(|(_, d)| *d)
            .filter(|d| !directories.contains_key(d) && seen.insert(*d))
            .collect();
        for (d, blob) in want.iter().zip(svc.read_many(instance, &want).await?) {
            let dir = re::Directory::decode(blob.as_slice()).map_err(|e| {
                JobError::action(
                    ErrorCode::InvalidArgument,
                    format!("input directory {d} is not a Directory message: {e}"),
                )
            })?;
            directories.insert(*d, dir);
        }
        let mut next = VecDeque::new();
        for (path, d) in level.drain(..) {
            let dir = &directories[&d];
            for f in &dir.files {
                check_name(&f.name, "file")?;
                files.push(FileInput {
                    path: path.join(&f.name),
                    digest: digest(function, f.digest.as_ref())?,
                    executable: f.is_executable,
                });
            }
            for s in &dir.symlinks {
                check_name(&s.name, "symlink")?;
                links.push((path.join(&s.name), s.target.clone()));
            }
            for sub in &dir.directories {
                check_name(&sub.name, "directory")?;
                let p = path.join(&sub.name);
                dirs.push(p.clone());
                next.push_back((p, digest(function, sub.digest.as_ref())?));
            }
        }
        level = next;
    }

    // Bodies: whatever the cache lacks, fetched in batches.
    let mut missing: Vec<(BlobDigest, bool)> = Vec::new();
    let mut sources: HashMap<(BlobDigest, bool), PathBuf> = HashMap::new();
    for f in &files {
        let k = (f.digest, f.executable);
        if sources.contains_key(&k) || missing.contains(&k) {
            continue;
        }
        match svc.cache.lookup(&f.digest, f.executable) {
            Some(p) => {
                sources.insert(k, p);
            }
            None => missing.push(k),
        }
    }
    let digests: Vec<BlobDigest> = missing.iter().map(|(d, _)| *d).collect();
    let mut bodies = svc.read_many(instance, &digests).await?;
    for ((d, x), body) in missing.iter().zip(bodies.drain(..)) {
        let p = svc
            .cache
            .insert(d, *x, &body)
            .map_err(|e| JobError::infra(format!("input cache: {e}")))?;
        sources.insert((*d, *x), p);
    }

    let io = |e: std::io::Error, what: &Path| {
        JobError::infra(format!("materialise {}: {e}", what.display()))
    };
    for d in &dirs {
        let p = exec_root.join(d);
        std::fs::create_dir_all(&p).map_err(|e| io(e, &p))?;
    }
    for f in &files {
        let src = &sources[&(f.digest, f.executable)];
        let dst = exec_root.join(&f.path);
        if std::fs::hard_link(src, &dst).is_err() {
            // Another file system, or the cache entry was just evicted: copy.
            let body = match std::fs::read(src) {
                Ok(b) => b,
                Err(_) => svc.read_one(instance, &f.digest).await?,
            };
            std::fs::write(&dst, body).map_err(|e| io(e, &dst))?;
            let mode = if f.executable { 0o555 } else { 0o444 };
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode))
                .map_err(|e| io(e, &dst))?;
        }
    }
    for (p, target) in &links {
        let dst = exec_root.join(p);
        std::os::unix::fs::symlink(target, &dst).map_err(|e| io(e, &dst))?;
    }
    metrics::counter!("motorpool_worker_input_files_total").increment(files.len() as u64);
    metrics::counter!("motorpool_worker_input_fetched_total").increment(missing.len() as u64);
    Ok(())
}

fn digest(function: DigestFunction, d: Option<&re::Digest>) -> Result<BlobDigest, JobError> {
    proto::digest(function, d)
        .map_err(|e| JobError::action(ErrorCode::InvalidArgument, format!("input tree: {e}")))
}
