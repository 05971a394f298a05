//! Input fetch: materialise an action's input tree in an exec root.
//!
//! Directory messages are read level by level in batches. File bodies go through a local cache
//! of read-only files named by digest (one for executables, one for the rest), and land in the
//! exec root as hard links to it, so an input shared by many actions is fetched and stored once.
//! A blob that the worker's own CAS shard holds is read from it directly; the rest come from the
//! cluster through the CAS client.
//!
//! Exec roots are reused from one action to the next (see [`place`]): what the previous action
//! left that the new tree also has (directories, files linked to the same cache inode, symlinks
//! to the same target) stays, and everything else goes. A C++ build's actions share most of
//! their tree, so most of the directories and links a fresh root would need already exist; the
//! action still sees exactly its input tree.

use crate::{JobError, Services, make_writable_and_remove};
use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use motorpool_cas_client::proto;
use motorpool_messages::{BlobDigest, DigestFunction, ErrorCode};
use parking_lot::Mutex;
use prost::Message as _;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io;
use std::os::unix::fs::{DirEntryExt, MetadataExt, PermissionsExt};
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
    /// Numbers each insert's temporary file: jobs fetching at once may insert the same blob.
    seq: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct CacheState {
    /// file name -> (size, last use tick, inode)
    entries: HashMap<String, (u64, u64, u64)>,
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
            seq: Default::default(),
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

    /// The cached file and its inode, if present (and marks it used).
    fn lookup(&self, d: &BlobDigest, executable: bool) -> Option<(PathBuf, u64)> {
        let name = Self::name(d, executable);
        let mut s = self.state.lock();
        s.tick += 1;
        let tick = s.tick;
        let e = s.entries.get_mut(&name)?;
        e.1 = tick;
        let ino = e.2;
        Some((self.dir.join(name), ino))
    }

    /// Stores `data` (already verified) and returns the cached file and its inode.
    fn insert(
        &self,
        d: &BlobDigest,
        executable: bool,
        data: &[u8],
    ) -> std::io::Result<(PathBuf, u64)> {
        let name = Self::name(d, executable);
        let path = self.dir.join(&name);
        // A temporary name of this insert's own: two jobs inserting the same blob at once each
        // write, seal and rename their own file (the second rename replaces the first, same
        // bytes). With one name per process, one job's rename took the other's file from under
        // it ("input cache: No such file or directory", an infrastructure failure and a retry).
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!(".{name}.{}.{seq}", std::process::id()));
        std::fs::write(&tmp, data)?;
        let mode = if executable { 0o555 } else { 0o444 };
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        let ino = std::fs::symlink_metadata(&tmp)?.ino();
        std::fs::rename(&tmp, &path)?;
        let evict = {
            let mut s = self.state.lock();
            s.tick += 1;
            let tick = s.tick;
            if s.entries.insert(name, (d.size, tick, ino)).is_none() {
                s.used += d.size;
            }
            let mut evict = Vec::new();
            if s.used > self.capacity {
                let mut by_age: Vec<(u64, String, u64)> = s
                    .entries
                    .iter()
                    .map(|(n, (size, t, _))| (*t, n.clone(), *size))
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
        Ok((path, ino))
    }
}

/// Empty directories kept for reuse: exec roots get their directories from here (a rename)
/// rather than from `mkdir`, and give them back rather than removing them.
///
/// Measured on the benchmark machines (ext4 without a journal, where every new inode scans the
/// inodes freed in the last minutes), `mkdir` in busy exec roots was the largest cost of the
/// worker itself; renames allocate nothing. On other file systems it is a smaller saving.
pub struct DirStash {
    dir: PathBuf,
    free: Mutex<Vec<PathBuf>>,
    seq: std::sync::atomic::AtomicU64,
    capacity: usize,
    /// Who owns the directories it makes: the sandbox user, so that actions can write in their
    /// exec roots (the files linked into them stay root's and read-only). `None`: the worker.
    owner: Option<(u32, u32)>,
}

impl DirStash {
    /// Opens (and empties) the stash under `dir`, keeping at most `capacity` directories, each
    /// made for `owner` (uid, gid).
    pub fn open(dir: PathBuf, capacity: usize, owner: Option<(u32, u32)>) -> io::Result<DirStash> {
        if dir.exists() {
            make_writable_and_remove(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        Ok(DirStash {
            dir,
            free: Mutex::default(),
            seq: Default::default(),
            capacity,
            owner,
        })
    }

    /// Creates the directory `dst` (whose parent exists), from the stash when it has one.
    pub(crate) fn make(&self, dst: &Path) -> io::Result<()> {
        let spare = self.free.lock().pop();
        if let Some(spare) = spare
            && std::fs::rename(&spare, dst).is_ok()
        {
            return Ok(());
        }
        std::fs::create_dir(dst)?;
        if let Some(owner) = self.owner {
            crate::sandbox::give(dst, owner)?;
        }
        Ok(())
    }

    /// Removes the directory `path` and everything in it; the directories go to the stash
    /// (emptied, mode 0755) while it has room.
    fn take(&self, path: &Path) -> io::Result<()> {
        if self.free.lock().len() >= self.capacity {
            return make_writable_and_remove(path);
        }
        let mode = std::fs::symlink_metadata(path)?.permissions().mode() & 0o7777;
        if mode != 0o755 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
        }
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                self.take(&entry.path())?;
            } else {
                std::fs::remove_file(entry.path())?;
            }
        }
        let n = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let parked = self.dir.join(n.to_string());
        std::fs::rename(path, &parked)?;
        self.free.lock().push(parked);
        Ok(())
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

/// Makes `exec_root` (which exists, empty or left by an earlier action) hold exactly the tree
/// rooted at `root`, plus the directories in `extra_dirs` (relative to the exec root: where
/// outputs go) and their parents.
pub async fn materialize(
    svc: &Services,
    instance: &str,
    function: DigestFunction,
    root: BlobDigest,
    exec_root: &Path,
    extra_dirs: &[PathBuf],
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
    let mut sources: HashMap<(BlobDigest, bool), (PathBuf, u64)> = HashMap::new();
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

    let mut want: BTreeMap<PathBuf, Want> = BTreeMap::new();
    let twice = |p: &Path| {
        JobError::action(
            ErrorCode::InvalidArgument,
            format!("the input tree names {} twice", p.display()),
        )
    };
    for d in dirs {
        if want.insert(d.clone(), Want::Dir).is_some() {
            return Err(twice(&d));
        }
    }
    let file_count = files.len();
    for f in files {
        let (src, ino) = sources[&(f.digest, f.executable)].clone();
        let w = Want::File {
            src,
            ino,
            digest: f.digest,
            executable: f.executable,
        };
        if want.insert(f.path.clone(), w).is_some() {
            return Err(twice(&f.path));
        }
    }
    for (p, target) in links {
        if want.insert(p.clone(), Want::Link(target)).is_some() {
            return Err(twice(&p));
        }
    }
    for d in extra_dirs {
        for a in d.ancestors().filter(|a| !a.as_os_str().is_empty()) {
            match want.get(a) {
                None => {
                    want.insert(a.to_path_buf(), Want::Dir);
                }
                Some(Want::Dir) => {}
                Some(_) => {
                    return Err(JobError::action(
                        ErrorCode::InvalidArgument,
                        format!(
                            "output directory {} goes through the input {}",
                            d.display(),
                            a.display()
                        ),
                    ));
                }
            }
        }
    }

    let root_dir = exec_root.to_path_buf();
    let stash = svc.stash.clone();
    let (want, placed) = tokio::task::spawn_blocking(move || {
        let placed = place(&root_dir, &want, &stash).or_else(|_| {
            // Something the last action left cannot be reconciled (a directory it made
            // read-only, say): start from an empty root.
            make_writable_and_remove(&root_dir)?;
            stash.make(&root_dir)?;
            place(&root_dir, &want, &stash)
        });
        (want, placed)
    })
    .await
    .map_err(|e| JobError::infra(format!("materialise: {e}")))?;
    let placed =
        placed.map_err(|e| JobError::infra(format!("materialise {}: {e}", exec_root.display())))?;
    // Files whose cache entry was evicted between fetch and link: fetched again and copied.
    for p in placed.lost {
        let Some(Want::File {
            digest, executable, ..
        }) = want.get(&p)
        else {
            continue;
        };
        let body = svc.read_one(instance, digest).await?;
        let dst = exec_root.join(&p);
        let io = |e: std::io::Error| JobError::infra(format!("materialise {}: {e}", dst.display()));
        std::fs::write(&dst, body).map_err(io)?;
        let mode = if *executable { 0o555 } else { 0o444 };
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    }
    metrics::counter!(crate::metric_names::WORKER_INPUT_FILES_TOTAL).increment(file_count as u64);
    metrics::counter!(crate::metric_names::WORKER_INPUT_FETCHED_TOTAL)
        .increment(missing.len() as u64);
    metrics::counter!(crate::metric_names::WORKER_INPUT_ENTRIES_KEPT_TOTAL)
        .increment(placed.kept as u64);
    metrics::counter!(crate::metric_names::WORKER_INPUT_ENTRIES_MADE_TOTAL)
        .increment(placed.made as u64);
    Ok(())
}

/// One entry an exec root must hold.
enum Want {
    Dir,
    /// A hard link to the cache file `src` (inode `ino`).
    File {
        src: PathBuf,
        ino: u64,
        digest: BlobDigest,
        executable: bool,
    },
    Link(String),
}

/// What [`place`] did.
#[derive(Debug, Default)]
struct Placed {
    /// Entries already right.
    kept: usize,
    /// Entries created.
    made: usize,
    /// Files whose cache file vanished before they could be linked or copied.
    lost: Vec<PathBuf>,
}

/// Brings `root` to exactly `want` (paths relative to it). Entries already right stay: a
/// directory, a file that is a hard link to the same cache inode, a symlink with the same
/// target. Everything else in the root is removed; what is missing is created, parents first.
/// Directories come from and go to `stash`.
fn place(root: &Path, want: &BTreeMap<PathBuf, Want>, stash: &DirStash) -> io::Result<Placed> {
    let mut kept = HashSet::new();
    prune(root, Path::new(""), want, &mut kept, stash)?;
    let mut placed = Placed {
        kept: kept.len(),
        ..Placed::default()
    };
    for (p, w) in want {
        if kept.contains(p.as_path()) {
            continue;
        }
        let dst = root.join(p);
        match w {
            Want::Dir => stash.make(&dst)?,
            Want::Link(target) => std::os::unix::fs::symlink(target, &dst)?,
            Want::File { src, .. } => {
                if std::fs::hard_link(src, &dst).is_err() {
                    // Another file system, or the cache entry was just evicted: copy (the mode
                    // comes along).
                    if let Err(e) = std::fs::copy(src, &dst) {
                        if src.exists() {
                            return Err(e);
                        }
                        placed.lost.push(p.clone());
                        continue;
                    }
                }
            }
        }
        placed.made += 1;
    }
    Ok(placed)
}

/// Removes whatever under `root/rel` is not wanted as it is; records what stays in `kept`.
fn prune(
    root: &Path,
    rel: &Path,
    want: &BTreeMap<PathBuf, Want>,
    kept: &mut HashSet<PathBuf>,
    stash: &DirStash,
) -> io::Result<()> {
    for entry in std::fs::read_dir(root.join(rel))? {
        let entry = entry?;
        let p = rel.join(entry.file_name());
        let ty = entry.file_type()?;
        let keep = match want.get(&p) {
            Some(Want::Dir) => ty.is_dir(),
            Some(Want::File { ino, .. }) => ty.is_file() && entry.ino() == *ino,
            Some(Want::Link(target)) => {
                ty.is_symlink() && std::fs::read_link(entry.path())? == Path::new(target)
            }
            None => false,
        };
        if !keep {
            if ty.is_dir() {
                stash.take(&entry.path())?;
            } else {
                std::fs::remove_file(entry.path())?;
            }
            continue;
        }
        if ty.is_dir() {
            // As a fresh directory would be, whatever the last action did to it.
            let mode = entry.metadata()?.permissions().mode() & 0o7777;
            if mode != 0o755 {
                std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o755))?;
            }
            prune(root, &p, want, kept, stash)?;
        }
        kept.insert(p);
    }
    Ok(())
}

fn digest(function: DigestFunction, d: Option<&re::Digest>) -> Result<BlobDigest, JobError> {
    proto::digest(function, d)
        .map_err(|e| JobError::action(ErrorCode::InvalidArgument, format!("input tree: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use motorpool_messages::DigestFunction;

    /// A cache file and the `Want` that links it.
    fn cached(dir: &Path, name: &str, body: &str, executable: bool) -> Want {
        let src = dir.join(name);
        std::fs::write(&src, body).unwrap();
        let mode = if executable { 0o555 } else { 0o444 };
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(mode)).unwrap();
        Want::File {
            ino: std::fs::metadata(&src).unwrap().ino(),
            src,
            digest: DigestFunction::Sha256.digest_of(body.as_bytes()),
            executable,
        }
    }

    /// Every entry under `root`: path -> what it is (for files, the inode).
    fn listing(root: &Path) -> BTreeMap<PathBuf, String> {
        fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, String>) {
            for e in std::fs::read_dir(root.join(rel)).unwrap() {
                let e = e.unwrap();
                let p = rel.join(e.file_name());
                let ty = e.file_type().unwrap();
                if ty.is_dir() {
                    out.insert(p.clone(), "dir".into());
                    walk(root, &p, out);
                } else if ty.is_symlink() {
                    let t = std::fs::read_link(e.path()).unwrap();
                    out.insert(p, format!("link {}", t.display()));
                } else {
                    out.insert(p, format!("file {}", e.ino()));
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(root, Path::new(""), &mut out);
        out
    }

    fn expected(want: &BTreeMap<PathBuf, Want>) -> BTreeMap<PathBuf, String> {
        want.iter()
            .map(|(p, w)| {
                let what = match w {
                    Want::Dir => "dir".to_string(),
                    Want::File { ino, .. } => format!("file {ino}"),
                    Want::Link(t) => format!("link {t}"),
                };
                (p.clone(), what)
            })
            .collect()
    }

    #[test]
    fn jobs_inserting_the_same_blob_at_once_all_get_it() {
        let dir = tempfile::tempdir().unwrap();
        let cache =
            std::sync::Arc::new(InputCache::open(dir.path().join("cache"), 1 << 30).unwrap());
        let body = vec![7u8; 64 * 1024];
        let d = DigestFunction::Sha256.digest_of(&body);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (cache, body) = (cache.clone(), body.clone());
                std::thread::spawn(move || {
                    (0..300)
                        .map(|_| cache.insert(&d, false, &body).map(|(p, _)| p))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for t in threads {
            for r in t.join().unwrap() {
                let path = r.expect("every insert of the blob succeeds");
                assert_eq!(std::fs::read(&path).unwrap(), body);
            }
        }
        // No temporary file is left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path().join("cache"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [InputCache::name(&d, false)]);
    }

    #[test]
    fn a_reused_exec_root_holds_exactly_the_next_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");
        std::fs::create_dir(&cache).unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let stash = DirStash::open(tmp.path().join("stash"), 100, None).unwrap();
        let p = PathBuf::from;

        // The first action: a package with a header and a source, a dependency's header, a
        // tool, a symlink, and an output directory.
        let mut first = BTreeMap::new();
        first.insert(p("lib0"), Want::Dir);
        first.insert(p("lib0/lib0.h"), cached(&cache, "h0", "int f0();", false));
        first.insert(p("lib1"), Want::Dir);
        first.insert(p("lib1/lib1.h"), cached(&cache, "h1", "int f1();", false));
        first.insert(p("lib1/lib1.cc"), cached(&cache, "c1", "int f1(){}", false));
        first.insert(p("tools"), Want::Dir);
        first.insert(p("tools/cc"), cached(&cache, "cc", "#!/bin/sh", true));
        first.insert(p("tools/cc.link"), Want::Link("cc".into()));
        first.insert(p("out"), Want::Dir);
        first.insert(p("out/lib1"), Want::Dir);
        let placed = place(&root, &first, &stash).unwrap();
        assert_eq!((placed.kept, placed.made), (0, first.len()));
        assert_eq!(listing(&root), expected(&first));
        let mode = std::fs::metadata(root.join("tools/cc"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o555);

        // What the action left behind: an output, a stray temp file in an input directory, a
        // directory it made read-only, a new directory of its own.
        std::fs::write(root.join("out/lib1/lib1.o"), "object").unwrap();
        std::fs::write(root.join("lib1/.tmp123"), "scratch").unwrap();
        std::fs::set_permissions(root.join("lib0"), std::fs::Permissions::from_mode(0o555))
            .unwrap();
        std::fs::create_dir_all(root.join("scratch/deep")).unwrap();
        std::fs::set_permissions(
            root.join("scratch/deep"),
            std::fs::Permissions::from_mode(0o500),
        )
        .unwrap();

        // The next action shares lib0 and the tool, has another version of lib1's header, no
        // lib1.cc, a symlink pointing elsewhere, a file where a directory was, and new inputs
        // inside the read-only directory.
        let mut next = BTreeMap::new();
        next.insert(p("lib0"), Want::Dir);
        next.insert(p("lib0/lib0.h"), cached(&cache, "h0b", "int f0();", false));
        next.insert(
            p("lib0/extra.h"),
            cached(&cache, "x0", "#pragma once", false),
        );
        next.insert(p("lib1"), Want::Dir);
        next.insert(
            p("lib1/lib1.h"),
            cached(&cache, "h1b", "int f1(int);", false),
        );
        next.insert(p("tools"), Want::Dir);
        let Want::File { src, ino, .. } = &first[&p("tools/cc")] else {
            unreachable!()
        };
        next.insert(
            p("tools/cc"),
            Want::File {
                src: src.clone(),
                ino: *ino,
                digest: DigestFunction::Sha256.digest_of(b"#!/bin/sh"),
                executable: true,
            },
        );
        next.insert(p("tools/cc.link"), Want::Link("../tools/cc".into()));
        next.insert(p("out"), cached(&cache, "o", "now a file", false));
        let stashed_before = stash.free.lock().len();
        let placed = place(&root, &next, &stash).unwrap();
        assert_eq!(listing(&root), expected(&next));
        // out, out/lib1, scratch and scratch/deep went to the stash; nothing new needed one.
        assert_eq!(stashed_before, 0);
        assert_eq!(stash.free.lock().len(), 4);
        for d in stash.free.lock().iter() {
            assert_eq!(std::fs::read_dir(d).unwrap().count(), 0, "{}", d.display());
            let mode = std::fs::metadata(d).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o755, "{}", d.display());
        }
        // lib0, lib1, tools and tools/cc stayed; the rest was made.
        assert_eq!(placed.kept, 4);
        assert_eq!(placed.made, next.len() - 4);
        assert!(placed.lost.is_empty());
        let mode = std::fs::metadata(root.join("lib0"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);

        // A cache file evicted before it could be linked is reported, not invented.
        let mut gone = BTreeMap::new();
        gone.insert(p("lib9.h"), cached(&cache, "h9", "int f9();", false));
        std::fs::remove_file(cache.join("h9")).unwrap();
        let placed = place(&root, &gone, &stash).unwrap();
        assert_eq!(placed.lost, vec![p("lib9.h")]);
        assert!(listing(&root).is_empty());

        // New directories come out of the stash (the same inodes, renamed), not from mkdir.
        let parked: HashSet<u64> = stash
            .free
            .lock()
            .iter()
            .map(|d| std::fs::metadata(d).unwrap().ino())
            .collect();
        assert_eq!(parked.len(), 7);
        let mut dirs = BTreeMap::new();
        for d in ["a", "a/b", "c"] {
            dirs.insert(p(d), Want::Dir);
        }
        place(&root, &dirs, &stash).unwrap();
        assert_eq!(listing(&root), expected(&dirs));
        for d in ["a", "a/b", "c"] {
            let ino = std::fs::metadata(root.join(d)).unwrap().ino();
            assert!(
                parked.contains(&ino),
                "{d} was made, not taken from the stash"
            );
        }
        assert_eq!(stash.free.lock().len(), 4);
    }
}
