//! Report: collect an action's outputs, check that they stay inside the exec root, hash and upload
//! them, and describe them in an ActionResult.

use crate::run::relative_path;
use crate::{JobError, Services};
use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use motorpool_cas_client::WriteData;
use motorpool_cas_client::proto::to_proto;
use motorpool_messages::{BlobDigest, DigestFunction, ErrorCode};
use prost::Message as _;
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Blobs to upload: digest -> where the bytes are.
#[derive(Debug, Default)]
pub struct Uploads {
    pub blobs: HashMap<BlobDigest, Body>,
}

#[derive(Debug)]
pub enum Body {
    File(PathBuf),
    Bytes(Vec<u8>),
}

impl Uploads {
    fn add_bytes(&mut self, function: DigestFunction, data: Vec<u8>) -> BlobDigest {
        let d = function.digest_of(&data);
        self.blobs.entry(d).or_insert(Body::Bytes(data));
        d
    }
}

fn hash_file(function: DigestFunction, path: &Path) -> Result<BlobDigest, JobError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)
        .map_err(|e| JobError::infra(format!("read output {}: {e}", path.display())))?;
    let mut h = function.hasher();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| JobError::infra(format!("read output {}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish())
}

fn is_executable(meta: &std::fs::Metadata) -> bool {
    meta.permissions().mode() & 0o111 != 0
}

/// Resolves `p` (inside `root`) through symlinks and fails when it leaves `root`. `None`: `p` is
/// a symlink whose target does not exist (which is an output like any other: REAPI reports it as
/// a symlink), provided that its target, read as a path, stays inside `root`.
fn contained(root: &Path, p: &Path, shown: &str) -> Result<Option<PathBuf>, JobError> {
    let real = match std::fs::canonicalize(p) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let target = std::fs::read_link(p)
                .map_err(|e| JobError::infra(format!("read link {shown}: {e}")))?;
            let base = p.parent().unwrap_or(root);
            return match lexically_inside(root, &base.join(&target)) {
                true => Ok(None),
                false => Err(JobError::action(
                    ErrorCode::InvalidArgument,
                    format!(
                        "output {shown} is a link to {}, outside the exec root",
                        target.display()
                    ),
                )),
            };
        }
        Err(e) => return Err(JobError::infra(format!("resolve output {shown}: {e}"))),
    };
    if !real.starts_with(root) {
        return Err(JobError::action(
            ErrorCode::InvalidArgument,
            format!(
                "output {shown} resolves to {}, outside the exec root",
                real.display()
            ),
        ));
    }
    Ok(Some(real))
}

/// Whether `p` (absolute, possibly with `..`, not resolved) names a place inside `root`.
fn lexically_inside(root: &Path, p: &Path) -> bool {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out.starts_with(root)
}

/// Builds the Directory tree of `dir` bottom-up; returns the root and every child.
fn tree(
    root: &Path,
    function: DigestFunction,
    dir: &Path,
    shown: &str,
    uploads: &mut Uploads,
    children: &mut Vec<re::Directory>,
) -> Result<re::Directory, JobError> {
    let mut out = re::Directory::default();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| JobError::infra(format!("list output directory {shown}: {e}")))?
        .filter_map(Result::ok)
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let shown = format!("{shown}/{name}");
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| JobError::infra(format!("stat output {shown}: {e}")))?;
        if meta.file_type().is_symlink() {
            contained(root, &path, &shown)?; // inside the root, or dangling: kept as a link
            let target = std::fs::read_link(&path)
                .map_err(|e| JobError::infra(format!("read link {shown}: {e}")))?;
            out.symlinks.push(re::SymlinkNode {
                name,
                target: target.to_string_lossy().into_owned(),
                node_properties: None,
            });
        } else if meta.is_dir() {
            let sub = tree(root, function, &path, &shown, uploads, children)?;
            let bytes = sub.encode_to_vec();
            let d = function.digest_of(&bytes);
            children.push(sub);
            out.directories.push(re::DirectoryNode {
                name,
                digest: Some(to_proto(&d)),
            });
        } else if meta.is_file() {
            let d = hash_file(function, &path)?;
            uploads.blobs.entry(d).or_insert(Body::File(path));
            out.files.push(re::FileNode {
                name,
                digest: Some(to_proto(&d)),
                is_executable: is_executable(&meta),
                node_properties: None,
            });
        }
    }
    Ok(out)
}

/// Collects the outputs the command declares into `result`, and the blobs to upload.
// Bazel 4 names outputs in the (deprecated) output_files and output_directories.
#[allow(deprecated)]
pub fn collect(
    command: &re::Command,
    exec_root: &Path,
    function: DigestFunction,
    max_bytes: u64,
    result: &mut re::ActionResult,
    uploads: &mut Uploads,
) -> Result<(), JobError> {
    let root = std::fs::canonicalize(exec_root)
        .map_err(|e| JobError::infra(format!("resolve the exec root: {e}")))?;
    let workdir = root.join(relative_path(
        &command.working_directory,
        "working directory",
    )?);
    // REAPI 2.1 clients name outputs in output_paths; older ones (Bazel 4) split files and dirs.
    let (files, dirs): (Vec<&String>, Vec<&String>) = if command.output_paths.is_empty() {
        (
            command.output_files.iter().collect(),
            command.output_directories.iter().collect(),
        )
    } else {
        (command.output_paths.iter().collect(), Vec::new())
    };
    let either = !command.output_paths.is_empty();
    for (p, want_dir) in files
        .into_iter()
        .map(|p| (p, false))
        .chain(dirs.into_iter().map(|p| (p, true)))
    {
        let rel = relative_path(p, "output")?;
        let path = workdir.join(&rel);
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue; // not produced: the client decides whether that is an error
        };
        let is_link = meta.file_type().is_symlink();
        let real = contained(&root, &path, p)?;
        let link = || {
            std::fs::read_link(&path)
                .map(|t| t.to_string_lossy().into_owned())
                .map_err(|e| JobError::infra(format!("read link {p}: {e}")))
        };
        // A link the client asked for by path, or one pointing nowhere, is reported as a link.
        let Some(real) = real.filter(|_| !(is_link && either)) else {
            let s = re::OutputSymlink {
                path: p.clone(),
                target: link()?,
                node_properties: None,
            };
            match (either, want_dir) {
                (true, _) => result.output_symlinks.push(s),
                (false, false) => result.output_file_symlinks.push(s),
                (false, true) => result.output_directory_symlinks.push(s),
            }
            continue;
        };
        let real_meta = std::fs::metadata(&real)
            .map_err(|e| JobError::infra(format!("stat output {p}: {e}")))?;
        if real_meta.is_dir() && (want_dir || either) {
            let mut children = Vec::new();
            let root_dir = tree(&root, function, &real, p, uploads, &mut children)?;
            let t = re::Tree {
                root: Some(root_dir),
                children,
            };
            let d = uploads.add_bytes(function, t.encode_to_vec());
            result.output_directories.push(re::OutputDirectory {
                path: p.clone(),
                tree_digest: Some(to_proto(&d)),
                is_topologically_sorted: false,
                root_directory_digest: None,
            });
        } else if real_meta.is_file() && !want_dir {
            let d = hash_file(function, &real)?;
            uploads.blobs.entry(d).or_insert(Body::File(real));
            result.output_files.push(re::OutputFile {
                path: p.clone(),
                digest: Some(to_proto(&d)),
                is_executable: is_executable(&real_meta),
                contents: Vec::new(),
                node_properties: None,
            });
        } else {
            return Err(JobError::action(
                ErrorCode::InvalidArgument,
                format!(
                    "output {p} is a {} but the command declared a {}",
                    if real_meta.is_dir() {
                        "directory"
                    } else {
                        "file"
                    },
                    if want_dir { "directory" } else { "file" }
                ),
            ));
        }
    }
    let total: u64 = uploads.blobs.keys().map(|d| d.size).sum();
    if total > max_bytes {
        return Err(JobError::action(
            ErrorCode::ResourceExhausted,
            format!(
                "the action's outputs total {total} bytes, more than this pool's limit of {max_bytes}"
            ),
        ));
    }
    Ok(())
}

/// Uploads the outputs: small blobs together in batches, without asking first (an action
/// that ran missed the cache, so its outputs are nearly always new, and a shard skips a blob it
/// holds for the price of hashing it); large ones each on the data stream, only those the CAS
/// lacks.
pub async fn upload(svc: &Services, instance: &str, uploads: Uploads) -> Result<(), JobError> {
    let small_limit = svc.shards.payload_budget() as u64 / 2;
    let large: Vec<BlobDigest> = uploads
        .blobs
        .keys()
        .filter(|d| d.size > small_limit)
        .copied()
        .collect();
    let present: HashSet<BlobDigest> = if large.is_empty() {
        HashSet::new()
    } else {
        let missing = svc
            .shards
            .find_missing(instance, &large)
            .await
            .map_err(|e| JobError::infra(format!("find missing outputs: {e}")))?;
        large
            .into_iter()
            .zip(missing)
            .filter(|(_, m)| !m)
            .map(|(d, _)| d)
            .collect()
    };
    let mut batch = Vec::new();
    let mut bytes = 0u64;
    let mut count = 0u64;
    for d in uploads.blobs.keys() {
        if d.is_empty_blob() || present.contains(d) {
            continue;
        }
        bytes += d.size;
        count += 1;
        let data = match &uploads.blobs[d] {
            Body::File(p) if d.size > small_limit => {
                // Large files go in chunks, never whole in memory.
                upload_file(svc, instance, d, p).await?;
                continue;
            }
            Body::Bytes(b) => b.clone(),
            Body::File(p) => std::fs::read(p)
                .map_err(|e| JobError::infra(format!("read output {}: {e}", p.display())))?,
        };
        if d.size <= small_limit {
            batch.push(motorpool_messages::cas::BlobPut { digest: *d, data });
        } else {
            svc.shards
                .write_blob(instance, d, data)
                .await
                .map_err(|e| JobError::infra(format!("upload output {d}: {e}")))?;
        }
    }
    if !batch.is_empty() {
        let names: Vec<BlobDigest> = batch.iter().map(|b| b.digest).collect();
        let results = svc
            .shards
            .batch_write(instance, batch)
            .await
            .map_err(|e| JobError::infra(format!("upload outputs: {e}")))?;
        if let Some((d, e)) = names
            .iter()
            .zip(results)
            .find_map(|(d, r)| r.map(|e| (d, e)))
        {
            return Err(JobError::infra(format!("upload output {d}: {e}")));
        }
    }
    metrics::counter!(crate::metric_names::WORKER_UPLOADED_BLOBS_TOTAL).increment(count);
    metrics::counter!(crate::metric_names::WORKER_UPLOADED_BYTES_TOTAL).increment(bytes);
    Ok(())
}

/// Streams one output file to the CAS in 1 MiB chunks.
async fn upload_file(
    svc: &Services,
    instance: &str,
    d: &BlobDigest,
    path: &Path,
) -> Result<(), JobError> {
    use tokio::io::AsyncReadExt;
    let failed =
        |e: std::io::Error| JobError::infra(format!("read output {}: {e}", path.display()));
    let file = tokio::fs::File::open(path).await.map_err(failed)?;
    let size = d.size;
    let chunks = futures::stream::unfold((file, 0u64), move |(mut f, sent)| async move {
        if sent >= size {
            return None;
        }
        let mut buf = vec![0u8; (size - sent).min(1 << 20) as usize];
        let item = match f.read_exact(&mut buf).await {
            Ok(_) => Ok(WriteData {
                finish: sent + buf.len() as u64 == size,
                data: buf.into(),
            }),
            Err(e) => Err(motorpool_cas_client::ApiError::Invalid(format!(
                "read output {d}: {e}"
            ))),
        };
        let next = sent + item.as_ref().map_or(size, |w| w.data.len() as u64);
        Some((item, (f, next)))
    });
    let upload_id = format!("out-{}-{}", d.hex(), motorpool_messages::now_ms());
    svc.shards
        .write_stream(instance, d, &upload_id, 0, Box::pin(chunks))
        .await
        .map_err(|e| JobError::infra(format!("upload output {d}: {e}")))?;
    Ok(())
}

/// Adds stdout and stderr (hashed from their files, which the upload reads again) to the result
/// and the uploads.
pub fn std_streams(
    function: DigestFunction,
    stdout: &Path,
    stderr: &Path,
    result: &mut re::ActionResult,
    uploads: &mut Uploads,
) -> Result<(), JobError> {
    for (path, slot) in [
        (stdout, &mut result.stdout_digest),
        (stderr, &mut result.stderr_digest),
    ] {
        let d = hash_file(function, path)?;
        uploads
            .blobs
            .entry(d)
            .or_insert(Body::File(path.to_path_buf()));
        *slot = Some(to_proto(&d));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects `c`'s outputs in `root`: the result and the uploads, or the error.
    fn collected(
        c: &re::Command,
        root: &Path,
        max_bytes: u64,
    ) -> Result<(re::ActionResult, Uploads), JobError> {
        let mut r = re::ActionResult::default();
        let mut u = Uploads::default();
        collect(c, root, DigestFunction::Sha256, max_bytes, &mut r, &mut u).map(|()| (r, u))
    }

    #[allow(deprecated)]
    fn cmd(files: &[&str], dirs: &[&str]) -> re::Command {
        re::Command {
            arguments: vec!["true".into()],
            output_files: files.iter().map(|s| s.to_string()).collect(),
            output_directories: dirs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn files_and_trees_are_collected() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("out/d/sub")).unwrap();
        std::fs::write(root.join("out/a.o"), b"object").unwrap();
        std::fs::write(root.join("out/d/x"), b"x").unwrap();
        std::fs::write(root.join("out/d/sub/y"), b"y").unwrap();
        std::fs::set_permissions(
            root.join("out/d/sub/y"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let c = cmd(&["out/a.o", "out/never"], &["out/d"]);
        let (r, u) = collected(&c, root, u64::MAX).unwrap();
        assert_eq!(r.output_files.len(), 1, "a missing output is skipped");
        assert_eq!(
            r.output_files[0].digest.as_ref().unwrap().hash,
            DigestFunction::Sha256.digest_of(b"object").hex()
        );
        assert_eq!(r.output_directories.len(), 1);
        // object, x, y and the Tree message.
        assert_eq!(u.blobs.len(), 4);
        let tree_d = r.output_directories[0].tree_digest.clone().unwrap();
        let tree = u
            .blobs
            .iter()
            .find(|(d, _)| d.hex() == tree_d.hash)
            .map(|(_, b)| match b {
                Body::Bytes(b) => re::Tree::decode(b.as_slice()).unwrap(),
                Body::File(_) => panic!("tree is bytes"),
            })
            .unwrap();
        let root_dir = tree.root.unwrap();
        assert_eq!(root_dir.files[0].name, "x");
        assert_eq!(root_dir.directories[0].name, "sub");
        assert!(tree.children[0].files[0].is_executable);
    }

    #[test]
    fn outputs_escaping_the_exec_root_are_rejected() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("out")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.join("out/link")).unwrap();
        for (c, needle) in [
            (cmd(&["out/link"], &[]), "outside the exec root"),
            (cmd(&["../x"], &[]), "'..'"),
            (cmd(&["/etc/passwd"], &[]), "absolute"),
        ] {
            let err = collected(&c, root, u64::MAX).unwrap_err();
            assert!(matches!(err, JobError::Action(_)), "{err}");
            assert!(err.to_string().contains(needle), "{err}");
        }
        // A link out of the root inside an output directory is rejected too.
        std::fs::create_dir_all(root.join("tree")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("tree/escape")).unwrap();
        let err = collected(&cmd(&[], &["tree"]), root, u64::MAX).unwrap_err();
        assert!(err.to_string().contains("outside the exec root"), "{err}");
    }

    #[test]
    #[allow(deprecated)] // Bazel 4's output_file_symlinks
    fn dangling_links_are_outputs_reported_as_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("out/d")).unwrap();
        std::os::unix::fs::symlink("../missing.h", root.join("out/d/dangling")).unwrap();
        std::os::unix::fs::symlink("nowhere", root.join("out/top")).unwrap();
        let (r, u) = collected(&cmd(&["out/top"], &["out/d"]), root, u64::MAX).unwrap();
        assert_eq!(r.output_file_symlinks.len(), 1, "{r:?}");
        assert_eq!(r.output_file_symlinks[0].target, "nowhere");
        let tree_d = r.output_directories[0].tree_digest.clone().unwrap();
        let tree = u
            .blobs
            .iter()
            .find_map(|(d, b)| match b {
                Body::Bytes(b) if d.hex() == tree_d.hash => {
                    Some(re::Tree::decode(b.as_slice()).unwrap())
                }
                _ => None,
            })
            .unwrap();
        let links = &tree.root.unwrap().symlinks;
        assert_eq!(
            (links[0].name.as_str(), links[0].target.as_str()),
            ("dangling", "../missing.h")
        );
        // REAPI 2.1 clients (output_paths) get every link as a link, dangling or not.
        let c = re::Command {
            arguments: vec!["true".into()],
            output_paths: vec!["out/top".into()],
            ..Default::default()
        };
        let (r, _) = collected(&c, root, u64::MAX).unwrap();
        assert_eq!(r.output_symlinks[0].target, "nowhere");
        // A dangling link that would point out of the exec root is still refused.
        std::os::unix::fs::symlink("/nonexistent/x", root.join("out/d/away")).unwrap();
        let err = collected(&cmd(&[], &["out/d"]), root, u64::MAX).unwrap_err();
        assert!(matches!(err, JobError::Action(_)), "{err}");
        assert!(err.to_string().contains("outside the exec root"), "{err}");
    }

    #[test]
    fn outputs_over_the_pools_limit_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("big"), vec![7u8; 4096]).unwrap();
        let err = collected(&cmd(&["big"], &[]), dir.path(), 4095).unwrap_err();
        assert!(
            matches!(&err, JobError::Action(e) if e.code == ErrorCode::ResourceExhausted),
            "{err}"
        );
        assert!(err.to_string().contains("4096 bytes"), "{err}");
    }
}
