//! What may sit behind a shard's own disk, and the object-store tier that does (ADR 0017).
//!
//! [`BlobStore`] is the interface every blob store of the platform offers: the shard's file
//! store ([`crate::store::Store`]), the object-store tier ([`ObjectTier`], on Apache Arrow's
//! `object_store`: S3 and S3-compatible servers, GCS, Azure, a file system) and test doubles.
//! The file store keeps one behind it ([`crate::store::Store::put_behind`]): it writes what it
//! stores there too (through or behind), and fetches what it is asked for and does not hold.
//!
//! The tier's calls are synchronous, like the file store's, and run on a small runtime of the
//! tier's own: a shard calls them from its blocking threads and data-stream threads.
//!
//! Layout in the bucket, under the configured prefix (one bucket serves every shard and every
//! instance; `<ns>` is the instance's namespace, 16 hex digits):
//! - `cas/<ns>/<digest function>/<hash>-<size>`: a blob's bytes.
//! - `ac/<ns>/<hash>-<size>`: an action's encoded `ActionResult`.
//! - `instances/<ns>`: the instance's name, so usage can be reported by name.
//! - `used/<day>/<random>`: what shards saw used, one object per shard and flush: lines of
//!   `cas/<ns>/<function>/<hash>-<size>` and `ac/<ns>/<hash>-<size>`. S3 does not touch an
//!   object when it is read, so this is how the sweep ([`ObjectTier::sweep`]) knows what is
//!   used without a write per read.

use crate::store::StoreError;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use motorpool_config::{ObjectStoreConfig, TierWrite};
use motorpool_messages::BlobDigest;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

/// A store of blobs and action-cache entries, by instance namespace and digest.
pub trait BlobStore: Send + Sync {
    /// For each digest, whether the store holds it.
    fn has(&self, ns: u64, digests: &[BlobDigest]) -> Result<Vec<bool>, StoreError>;
    /// Writes the whole blob to `to`; false when the store does not hold it. The bytes are the
    /// store's word: the caller verifies them against the digest.
    fn get(&self, ns: u64, d: &BlobDigest, to: &mut dyn Write) -> Result<bool, StoreError>;
    /// Stores a blob whose bytes the caller verified.
    fn put(&self, ns: u64, d: &BlobDigest, data: &[u8]) -> Result<(), StoreError>;
    /// Several small blobs whole, as many at once as the store likes; `None` for one it does
    /// not hold. The bytes are the store's word, as with [`BlobStore::get`].
    fn get_many(
        &self,
        ns: u64,
        digests: &[BlobDigest],
    ) -> Vec<Result<Option<Vec<u8>>, StoreError>> {
        digests
            .iter()
            .map(|d| {
                let mut data = Vec::with_capacity(d.size as usize);
                self.get(ns, d, &mut data)
                    .map(|found| found.then_some(data))
            })
            .collect()
    }
    /// Stores several blobs (`(namespace, digest, bytes)`), as many at once as the store
    /// likes; one result per blob.
    fn put_many(&self, blobs: &[(u64, BlobDigest, &[u8])]) -> Vec<Result<(), StoreError>> {
        blobs
            .iter()
            .map(|(ns, d, data)| self.put(*ns, d, data))
            .collect()
    }
    /// Stores a blob from a file holding exactly its (verified) bytes, without holding them
    /// all in memory.
    fn put_file(&self, ns: u64, d: &BlobDigest, path: &Path) -> Result<(), StoreError>;
    fn ac_get(&self, ns: u64, action: &BlobDigest) -> Result<Option<Vec<u8>>, StoreError>;
    fn ac_put(&self, ns: u64, action: &BlobDigest, result: &[u8]) -> Result<(), StoreError>;
    fn ac_delete(&self, ns: u64, action: &BlobDigest) -> Result<(), StoreError>;
    /// Records an instance's name beside its namespace (once per process is enough).
    fn name_instance(&self, _ns: u64, _name: &str) -> Result<(), StoreError> {
        Ok(())
    }
    /// Records that these blobs and action-cache entries were used (for a lifecycle that keeps
    /// what is used), in one write for the lot.
    fn record_use(&self, _used: &[Used]) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A blob or action-cache entry that was used: asked for, found, read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Used {
    Blob(u64, BlobDigest),
    Action(u64, BlobDigest),
}

/// Blobs up to this size go up in one request; larger ones in parts of this size.
const PART: usize = 8 * 1024 * 1024;
/// Requests in flight at once for one call (existence checks, parts of one upload).
const CONCURRENCY: usize = 16;

/// The object-store tier.
pub struct ObjectTier {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    write: TierWrite,
    /// Where, for messages (the URL without credentials: they never sit in it).
    url: String,
    rt: Option<tokio::runtime::Runtime>,
    named: parking_lot::Mutex<std::collections::HashSet<u64>>,
}

impl std::fmt::Debug for ObjectTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectTier")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Drop for ObjectTier {
    fn drop(&mut self) {
        // May be dropped on an async thread, where a runtime cannot wait for its tasks.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl ObjectTier {
    /// Opens the tier `config` names. Options come from the environment (`AWS_*`, `GOOGLE_*`,
    /// `AZURE_*`, as the clients name them) and then the configuration; an option the store's
    /// client does not know is an error, not ignored.
    pub fn open(config: &ObjectStoreConfig) -> anyhow::Result<ObjectTier> {
        let url = url::Url::parse(&config.url).map_err(|e| {
            anyhow::anyhow!(
                "object_store.url {:?} is not a URL ({e}): use s3://bucket/prefix, \
                 gs://bucket/prefix, az://container/prefix or file:///path",
                config.url
            )
        })?;
        let env_prefix = match url.scheme() {
            "s3" | "s3a" => "AWS_",
            "gs" => "GOOGLE_",
            "az" | "azure" | "abfs" | "abfss" | "adl" => "AZURE_",
            "file" => "",
            other => anyhow::bail!(
                "object_store.url {:?}: scheme {other}:// is not one of s3, gs, az, file",
                config.url
            ),
        };
        for key in config.options.keys() {
            anyhow::ensure!(
                known_option(url.scheme(), key),
                "object_store.options.{key} is not an option of the {}:// client",
                url.scheme()
            );
        }
        if url.scheme() == "file" {
            std::fs::create_dir_all(url.path()).map_err(|e| {
                anyhow::anyhow!("object_store.url {}: cannot create it: {e}", config.url)
            })?;
        }
        let mut options: Vec<(String, String)> = if env_prefix.is_empty() {
            Vec::new()
        } else {
            std::env::vars()
                .filter(|(k, _)| k.starts_with(env_prefix))
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect()
        };
        options.extend(config.options.iter().map(|(k, v)| (k.clone(), v.clone())));
        let (store, prefix) = object_store::parse_url_opts(&url, options)
            .map_err(|e| anyhow::anyhow!("object_store.url {}: {e}", config.url))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cas-tier")
            .enable_all()
            .build()?;
        let mut shown = url.clone();
        let _ = shown.set_password(None);
        let _ = shown.set_username("");
        Ok(ObjectTier {
            store: Arc::from(store),
            prefix,
            write: config.write,
            url: shown.to_string(),
            rt: Some(rt),
            named: Default::default(),
        })
    }

    pub fn write(&self) -> TierWrite {
        self.write
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs `f` on the tier's runtime and waits for it, from any thread (an async one blocks).
    fn run<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let rt = self
            .rt
            .as_ref()
            .expect("the tier's runtime lives as long as the tier");
        rt.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv().expect("a tier task ran to its end")
    }

    fn path(&self, parts: &[&str]) -> ObjectPath {
        let mut p = self.prefix.clone();
        for part in parts {
            p = p.join(*part);
        }
        p
    }

    fn blob_path(&self, ns: u64, d: &BlobDigest) -> ObjectPath {
        self.path(&[
            "cas",
            &format!("{ns:016x}"),
            d.function.name(),
            &format!("{}-{}", d.hex(), d.size),
        ])
    }

    fn ac_path(&self, ns: u64, action: &BlobDigest) -> ObjectPath {
        self.path(&[
            "ac",
            &format!("{ns:016x}"),
            &format!("{}-{}", action.hex(), action.size),
        ])
    }

    fn error(&self, what: String) -> impl Fn(object_store::Error) -> StoreError + '_ {
        move |e| StoreError::Behind(format!("{what} in {}: {e}", self.url))
    }

    /// Every blob and action-cache entry under the prefix: `(key, size, last modified)`. For
    /// the lifecycle sweep and for tests.
    pub fn list(&self) -> Result<Vec<(String, u64, u64)>, StoreError> {
        let store = self.store.clone();
        let prefix = self.prefix.clone();
        self.run(async move {
            store
                .list(Some(&prefix))
                .map_ok(|m| {
                    (
                        m.location.to_string(),
                        m.size,
                        m.last_modified.timestamp_millis().max(0) as u64,
                    )
                })
                .try_collect::<Vec<_>>()
                .await
        })
        .map_err(self.error("list".into()))
    }
}

/// True when `key` is an option the client of `scheme` understands.
fn known_option(scheme: &str, key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    match scheme {
        "s3" | "s3a" => key.parse::<object_store::aws::AmazonS3ConfigKey>().is_ok(),
        "gs" => key.parse::<object_store::gcp::GoogleConfigKey>().is_ok(),
        "file" => false,
        _ => key.parse::<object_store::azure::AzureConfigKey>().is_ok(),
    }
}

fn not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

impl BlobStore for ObjectTier {
    fn has(&self, ns: u64, digests: &[BlobDigest]) -> Result<Vec<bool>, StoreError> {
        let paths: Vec<ObjectPath> = digests.iter().map(|d| self.blob_path(ns, d)).collect();
        let store = self.store.clone();
        let sizes: Vec<u64> = digests.iter().map(|d| d.size).collect();
        self.run(async move {
            futures::stream::iter(paths.into_iter().zip(sizes))
                .map(|(p, size)| {
                    let store = store.clone();
                    async move {
                        match store.head(&p).await {
                            Ok(meta) => Ok(meta.size == size),
                            Err(e) if not_found(&e) => Ok(false),
                            Err(e) => Err(e),
                        }
                    }
                })
                .buffered(CONCURRENCY)
                .try_collect::<Vec<bool>>()
                .await
        })
        .map_err(self.error(format!("look up {} blob(s)", digests.len())))
    }

    fn get(&self, ns: u64, d: &BlobDigest, to: &mut dyn Write) -> Result<bool, StoreError> {
        // The body streams through a small channel to this thread, which writes it.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Bytes, object_store::Error>>(4);
        let store = self.store.clone();
        let path = self.blob_path(ns, d);
        let rt = self
            .rt
            .as_ref()
            .expect("the tier's runtime lives as long as the tier");
        rt.spawn(async move {
            match store.get(&path).await {
                Ok(got) => {
                    let mut body = got.into_stream();
                    while let Some(chunk) = body.next().await {
                        let stop = chunk.is_err();
                        if tx.send(chunk).is_err() || stop {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
        let what = || format!("read {d}");
        for chunk in rx {
            match chunk {
                Ok(bytes) => to
                    .write_all(&bytes)
                    .map_err(|e| StoreError::Behind(format!("{}: {e}", what())))?,
                Err(e) if not_found(&e) => return Ok(false),
                Err(e) => return Err(self.error(what())(e)),
            }
        }
        Ok(true)
    }

    fn put(&self, ns: u64, d: &BlobDigest, data: &[u8]) -> Result<(), StoreError> {
        let store = self.store.clone();
        let path = self.blob_path(ns, d);
        let payload = PutPayload::from(Bytes::copy_from_slice(data));
        self.run(async move { store.put(&path, payload).await.map(|_| ()) })
            .map_err(self.error(format!("write {d}")))
    }

    fn get_many(
        &self,
        ns: u64,
        digests: &[BlobDigest],
    ) -> Vec<Result<Option<Vec<u8>>, StoreError>> {
        let paths: Vec<ObjectPath> = digests.iter().map(|d| self.blob_path(ns, d)).collect();
        let store = self.store.clone();
        let results = self.run(async move {
            futures::stream::iter(paths)
                .map(|path| {
                    let store = store.clone();
                    async move {
                        match store.get(&path).await {
                            Ok(got) => got.bytes().await.map(|b| Some(b.to_vec())),
                            Err(e) if not_found(&e) => Ok(None),
                            Err(e) => Err(e),
                        }
                    }
                })
                .buffered(CONCURRENCY)
                .collect::<Vec<_>>()
                .await
        });
        results
            .into_iter()
            .zip(digests)
            .map(|(r, d)| r.map_err(self.error(format!("read {d}"))))
            .collect()
    }

    fn put_many(&self, blobs: &[(u64, BlobDigest, &[u8])]) -> Vec<Result<(), StoreError>> {
        let puts: Vec<(ObjectPath, PutPayload)> = blobs
            .iter()
            .map(|(ns, d, data)| {
                (
                    self.blob_path(*ns, d),
                    PutPayload::from(Bytes::copy_from_slice(data)),
                )
            })
            .collect();
        let store = self.store.clone();
        let results = self.run(async move {
            futures::stream::iter(puts)
                .map(|(path, payload)| {
                    let store = store.clone();
                    async move { store.put(&path, payload).await.map(|_| ()) }
                })
                .buffered(CONCURRENCY)
                .collect::<Vec<_>>()
                .await
        });
        results
            .into_iter()
            .zip(blobs)
            .map(|(r, (_, d, _))| r.map_err(self.error(format!("write {d}"))))
            .collect()
    }

    fn put_file(&self, ns: u64, d: &BlobDigest, path: &Path) -> Result<(), StoreError> {
        let what = format!("write {d}");
        let mut file = std::fs::File::open(path)
            .map_err(|e| StoreError::Behind(format!("{what}: open {}: {e}", path.display())))?;
        if d.size as usize <= PART {
            let mut data = Vec::with_capacity(d.size as usize);
            file.read_to_end(&mut data)
                .map_err(|e| StoreError::Behind(format!("{what}: {e}")))?;
            return self.put(ns, d, &data);
        }
        // In parts, read here and handed over one at a time, so at most a few parts are held.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(2);
        let store = self.store.clone();
        let dest = self.blob_path(ns, d);
        let rt = self
            .rt
            .as_ref()
            .expect("the tier's runtime lives as long as the tier");
        let done = rt.spawn(async move {
            let upload = store.put_multipart(&dest).await?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
            let mut rx = Some(rx);
            loop {
                writer.wait_for_capacity(CONCURRENCY).await?;
                let (part, back) = tokio::task::spawn_blocking(move || {
                    let rx = rx.take().expect("the part channel");
                    let part = rx.recv().ok();
                    (part, rx)
                })
                .await
                .map_err(|e| object_store::Error::Generic {
                    store: "motorpool",
                    source: Box::new(e),
                })?;
                rx = Some(back);
                match part {
                    Some(part) => writer.put(part),
                    None => break,
                }
            }
            writer.finish().await.map(|_| ())
        });
        let mut sent = 0u64;
        let mut buf = vec![0u8; PART];
        let read = loop {
            let n = match read_full(&mut file, &mut buf) {
                Ok(n) => n,
                Err(e) => break Err(e),
            };
            if n == 0 {
                break Ok(());
            }
            sent += n as u64;
            if tx.send(Bytes::copy_from_slice(&buf[..n])).is_err() {
                break Ok(()); // the upload failed; its error is below
            }
        };
        drop(tx);
        let uploaded = self.run(async move {
            done.await.unwrap_or_else(|e| {
                Err(object_store::Error::Generic {
                    store: "motorpool",
                    source: Box::new(e),
                })
            })
        });
        read.map_err(|e| StoreError::Behind(format!("{what}: read {}: {e}", path.display())))?;
        uploaded.map_err(self.error(what.clone()))?;
        if sent != d.size {
            return Err(StoreError::Behind(format!(
                "{what}: the file held {sent} bytes"
            )));
        }
        Ok(())
    }

    fn ac_get(&self, ns: u64, action: &BlobDigest) -> Result<Option<Vec<u8>>, StoreError> {
        let store = self.store.clone();
        let path = self.ac_path(ns, action);
        self.run(async move {
            match store.get(&path).await {
                Ok(got) => got.bytes().await.map(|b| Some(b.to_vec())),
                Err(e) if not_found(&e) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .map_err(self.error(format!("read the action cache entry of {action}")))
    }

    fn ac_put(&self, ns: u64, action: &BlobDigest, result: &[u8]) -> Result<(), StoreError> {
        let store = self.store.clone();
        let path = self.ac_path(ns, action);
        let payload = PutPayload::from(Bytes::copy_from_slice(result));
        self.run(async move { store.put(&path, payload).await.map(|_| ()) })
            .map_err(self.error(format!("write the action cache entry of {action}")))
    }

    fn ac_delete(&self, ns: u64, action: &BlobDigest) -> Result<(), StoreError> {
        let store = self.store.clone();
        let path = self.ac_path(ns, action);
        self.run(async move {
            match store.delete(&path).await {
                Err(e) if not_found(&e) => Ok(()),
                r => r,
            }
        })
        .map_err(self.error(format!("remove the action cache entry of {action}")))
    }

    fn record_use(&self, used: &[Used]) -> Result<(), StoreError> {
        if used.is_empty() {
            return Ok(());
        }
        let mut lines = String::with_capacity(used.len() * 100);
        for u in used {
            lines.push_str(&used_key(u));
            lines.push('\n');
        }
        let day = day_of(motorpool_messages::now_ms());
        let name = format!("{:016x}", rand::random::<u64>());
        let store = self.store.clone();
        let path = self.path(&["used", &day.to_string(), &name]);
        let payload = PutPayload::from(Bytes::from(lines));
        self.run(async move { store.put(&path, payload).await.map(|_| ()) })
            .map_err(self.error(format!("record {} used blob(s)", used.len())))
    }

    fn name_instance(&self, ns: u64, name: &str) -> Result<(), StoreError> {
        if !self.named.lock().insert(ns) {
            return Ok(());
        }
        let store = self.store.clone();
        let path = self.path(&["instances", &format!("{ns:016x}")]);
        let payload = PutPayload::from(Bytes::copy_from_slice(name.as_bytes()));
        let r = self
            .run(async move { store.put(&path, payload).await.map(|_| ()) })
            .map_err(self.error(format!("name instance {name:?}")));
        if r.is_err() {
            self.named.lock().remove(&ns);
        }
        r
    }
}

/// Reads until `buf` is full or the file ends.
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The key of a used blob or entry, relative to the prefix (as under `cas/` and `ac/`).
fn used_key(u: &Used) -> String {
    match u {
        Used::Blob(ns, d) => format!("cas/{ns:016x}/{}/{}-{}", d.function.name(), d.hex(), d.size),
        Used::Action(ns, a) => format!("ac/{ns:016x}/{}-{}", a.hex(), a.size),
    }
}

/// Days since the epoch (UTC).
fn day_of(ms: u64) -> u64 {
    ms / 86_400_000
}

/// What a sweep kept and removed, by instance.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Instance name (or its namespace when its name was never recorded) ->
    /// (blobs kept, their bytes, blobs removed, their bytes, entries kept, entries removed).
    pub instances: std::collections::BTreeMap<String, InstanceUsage>,
    /// Use records read, and old ones removed.
    pub use_records: usize,
    pub use_records_removed: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InstanceUsage {
    pub blobs_kept: u64,
    pub bytes_kept: u64,
    pub blobs_removed: u64,
    pub bytes_removed: u64,
    pub entries_kept: u64,
    pub entries_removed: u64,
}

impl ObjectTier {
    /// The lifecycle of the bucket: keeps what was written or used within `keep` of `now_ms`
    /// and every blob a kept action-cache entry references (its outputs, its streams, its
    /// output trees and the files in them); removes the rest, and use records older than
    /// `keep`. With `dry_run`, only reports. Blobs are removed after the entries that could
    /// reference them are decided, so a kept entry never points at a removed blob.
    pub fn sweep(
        &self,
        keep: std::time::Duration,
        now_ms: u64,
        dry_run: bool,
    ) -> Result<SweepReport, StoreError> {
        use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
        use prost::Message;
        let cutoff = now_ms.saturating_sub(keep.as_millis() as u64);
        let oldest_day = day_of(cutoff);
        let prefix = format!("{}/", self.prefix);
        let prefix = if prefix == "/" { String::new() } else { prefix };
        let mut report = SweepReport::default();
        let mut cas = Vec::new();
        let mut acs = Vec::new();
        let mut names: std::collections::HashMap<String, String> = Default::default();
        let mut used: std::collections::HashSet<String> = Default::default();
        let mut doomed = Vec::new();
        for (key, size, modified) in self.list()? {
            let Some(rel) = key.strip_prefix(&prefix) else {
                continue;
            };
            let parts: Vec<&str> = rel.split('/').collect();
            match parts.as_slice() {
                ["cas", ns, function, name] => cas.push((
                    rel.to_string(),
                    ns.to_string(),
                    function.to_string(),
                    name.to_string(),
                    size,
                    modified,
                )),
                ["ac", ns, name] => {
                    acs.push((rel.to_string(), ns.to_string(), name.to_string(), modified))
                }
                ["instances", ns] => {
                    let mut name = Vec::new();
                    if self.get_raw(&key, &mut name)? {
                        names.insert(ns.to_string(), String::from_utf8_lossy(&name).into_owned());
                    }
                }
                ["used", day, _] => {
                    let day: u64 = day.parse().unwrap_or(0);
                    if day < oldest_day {
                        report.use_records_removed += 1;
                        doomed.push(key.clone());
                    } else {
                        let mut lines = Vec::new();
                        if self.get_raw(&key, &mut lines)? {
                            report.use_records += 1;
                            used.extend(
                                String::from_utf8_lossy(&lines).lines().map(str::to_string),
                            );
                        }
                    }
                }
                _ => {}
            }
        }
        let instance = |ns: &str| {
            names
                .get(ns)
                .cloned()
                .unwrap_or_else(|| format!("namespace {ns}"))
        };
        // Entries first: the blobs the kept ones reference are kept whatever their age.
        let mut referenced: std::collections::HashSet<String> = Default::default();
        // Blobs by namespace and `<hash>-<size>` (any digest function), for reading trees.
        let blob_at: std::collections::HashMap<(&str, &str), &str> = cas
            .iter()
            .map(|c| ((c.1.as_str(), c.3.as_str()), c.0.as_str()))
            .collect();
        for (rel, ns, _, modified) in &acs {
            let usage = report.instances.entry(instance(ns)).or_default();
            if *modified < cutoff && !used.contains(rel) {
                usage.entries_removed += 1;
                doomed.push(format!("{prefix}{rel}"));
                continue;
            }
            usage.entries_kept += 1;
            let mut bytes = Vec::new();
            if !self.get_raw(&format!("{prefix}{rel}"), &mut bytes)? {
                continue;
            }
            let Ok(result) = re::ActionResult::decode(bytes.as_slice()) else {
                tracing::warn!(entry = %rel, "An action-cache entry in the object store is not an ActionResult");
                continue;
            };
            let mut refer = |d: Option<&re::Digest>| {
                if let Some(d) = d {
                    referenced.insert(format!("{ns}/{}-{}", d.hash, d.size_bytes));
                }
            };
            for f in &result.output_files {
                refer(f.digest.as_ref());
            }
            refer(result.stdout_digest.as_ref());
            refer(result.stderr_digest.as_ref());
            for dir in &result.output_directories {
                refer(dir.tree_digest.as_ref());
                let Some(t) = &dir.tree_digest else { continue };
                // The tree's files: read the tree from the bucket, under any digest function.
                let name = format!("{}-{}", t.hash, t.size_bytes);
                let tree_bytes = blob_at
                    .get(&(ns.as_str(), name.as_str()))
                    .map(|rel| format!("{prefix}{rel}"));
                let mut data = Vec::new();
                if let Some(path) = tree_bytes
                    && self.get_raw(&path, &mut data)?
                    && let Ok(tree) = re::Tree::decode(data.as_slice())
                {
                    for d in tree.root.iter().chain(tree.children.iter()) {
                        for f in &d.files {
                            refer(f.digest.as_ref());
                        }
                    }
                }
            }
        }
        for (rel, ns, _, name, size, modified) in &cas {
            let usage = report.instances.entry(instance(ns)).or_default();
            let keep = *modified >= cutoff
                || used.contains(rel)
                || referenced.contains(&format!("{ns}/{name}"));
            if keep {
                usage.blobs_kept += 1;
                usage.bytes_kept += size;
            } else {
                usage.blobs_removed += 1;
                usage.bytes_removed += size;
                doomed.push(format!("{prefix}{rel}"));
            }
        }
        if !dry_run {
            let store = self.store.clone();
            let paths: Vec<ObjectPath> = doomed.into_iter().map(ObjectPath::from).collect();
            self.run(async move {
                futures::stream::iter(paths)
                    .map(|p| {
                        let store = store.clone();
                        async move {
                            match store.delete(&p).await {
                                Err(e) if not_found(&e) => Ok(()),
                                r => r,
                            }
                        }
                    })
                    .buffer_unordered(CONCURRENCY)
                    .try_collect::<Vec<()>>()
                    .await
            })
            .map_err(self.error("remove swept objects".into()))?;
        }
        Ok(report)
    }

    /// The whole object at `key` (a full key, prefix included) into `to`; false when absent.
    fn get_raw(&self, key: &str, to: &mut Vec<u8>) -> Result<bool, StoreError> {
        let store = self.store.clone();
        let path = ObjectPath::from(key);
        let got = self
            .run(async move {
                match store.get(&path).await {
                    Ok(g) => g.bytes().await.map(Some),
                    Err(e) if not_found(&e) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .map_err(self.error(format!("read {key}")))?;
        Ok(got.map(|b| to.extend_from_slice(&b)).is_some())
    }
}
