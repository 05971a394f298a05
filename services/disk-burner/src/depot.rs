//! Images through the platform's CAS, for burner hosts at many sites: a builder publishes an
//! image once, burner hosts fetch it by content, each only the pieces it does not hold yet.
//!
//! Everything goes through the gateway's Remote Execution API (gRPC, its TLS and API keys), so a
//! site needs nothing but the gateway's address and a key:
//! - **Pieces**: an image's mapped ranges cut into pieces of at most 1 MiB, listed in its signed
//!   manifest with their BLAKE3 and SHA-256 ([`crate::image::Piece`]); each piece is a CAS blob
//!   (its SHA-256 is its digest).
//! - **The manifest** (`manifest.json`, exact bytes) and its signature are blobs too.
//! - **A channel** is an action-cache entry under a fixed key (the SHA-256 of
//!   `motorpool.fleet.channel.v1` and the channel's name) whose output files are
//!   `<id>/manifest.json` and `<id>/manifest.json.sig`, oldest image first. Publishing writes
//!   the action cache, so it takes a key with `write-ac` (CI's or an admin's).
//!
//! Fetching reads the channel's entry, then each new image's manifest and signature (checked
//! before anything else is fetched), then its pieces: one found in an image the store already
//! holds (by BLAKE3) is copied from there; the others come from the CAS (ByteStream) and are
//! checked against the manifest's BLAKE3 as they arrive. The image is assembled in a temporary
//! directory of the store, checked whole against its manifest ([`Image::load_stored`]), and only
//! then renamed into place, where the burner finds it.

use crate::image::{Image, ImageError, ImageManifest, Piece};
use crate::sign::{SIGNATURE_FILE, TrustedKeys};
use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::bytestream as bs;
use futures::{StreamExt, TryStreamExt};
use sha2::Digest;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Why publishing or fetching failed.
#[derive(Debug, thiserror::Error)]
pub enum DepotError {
    #[error("{0}")]
    Connect(String),
    #[error("{call}: {status}")]
    Call {
        call: &'static str,
        status: tonic::Status,
    },
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DepotError + '_ {
    move |source| DepotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn call(call: &'static str) -> impl FnOnce(tonic::Status) -> DepotError {
    move |status| DepotError::Call { call, status }
}

/// Adds `authorization: Bearer <key>` to every call.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type AuthChannel = InterceptedService<Channel, Bearer>;

/// Concurrent piece transfers.
const PARALLEL: usize = 8;

/// The gateway, as a store of images.
#[derive(Clone)]
pub struct Depot {
    channel: AuthChannel,
    instance: String,
}

/// What a fetch did for one image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    pub id: String,
    pub dir: PathBuf,
    pub size: u64,
    pub mapped: u64,
    /// Bytes that came over the network.
    pub fetched: u64,
    /// Bytes copied from images the store already held.
    pub reused: u64,
    /// True when the store already had this exact manifest: nothing was done.
    pub present: bool,
}

/// The action-cache key of a channel's list of images.
pub fn channel_key(channel: &str) -> re::Digest {
    let name = format!("motorpool.fleet.channel.v1\0{channel}");
    digest_of(name.as_bytes())
}

fn digest_of(bytes: &[u8]) -> re::Digest {
    re::Digest {
        hash: hex::encode(sha2::Sha256::digest(bytes)),
        size_bytes: bytes.len() as i64,
    }
}

impl Depot {
    /// Connects to the gateway at `url` (`grpc://`, `grpcs://`, `http://` or `https://`), with an
    /// API key and, for TLS, the CA that signed the gateway's certificate (else the system's).
    pub async fn connect(
        url: &str,
        key: Option<&str>,
        ca_file: Option<&Path>,
        instance: &str,
    ) -> Result<Depot, DepotError> {
        let (tls, rest) = match url.split_once("://") {
            Some(("grpc" | "http", rest)) => (false, rest),
            Some(("grpcs" | "https", rest)) => (true, rest),
            _ => {
                return Err(DepotError::Connect(format!(
                    "{url}: not a grpc://, grpcs://, http:// or https:// address"
                )));
            }
        };
        let scheme = if tls { "https" } else { "http" };
        let mut endpoint = Channel::from_shared(format!("{scheme}://{rest}"))
            .map_err(|e| DepotError::Connect(format!("{url}: {e}")))?;
        if tls {
            let mut cfg = tonic::transport::ClientTlsConfig::new().with_enabled_roots();
            if let Some(ca) = ca_file {
                let pem = std::fs::read(ca).map_err(io(ca))?;
                cfg = cfg.ca_certificate(tonic::transport::Certificate::from_pem(pem));
            }
            endpoint = endpoint
                .tls_config(cfg)
                .map_err(|e| DepotError::Connect(format!("{url}: {e}")))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| DepotError::Connect(format!("cannot reach {url}: {e}")))?;
        let bearer = key
            .filter(|k| !k.is_empty())
            .map(|k| format!("Bearer {k}").parse())
            .transpose()
            .map_err(|_| DepotError::Connect("the API key is not a valid header value".into()))?;
        Ok(Depot {
            channel: InterceptedService::new(channel, Bearer(bearer)),
            instance: instance.to_string(),
        })
    }

    fn cas(
        &self,
    ) -> re::content_addressable_storage_client::ContentAddressableStorageClient<AuthChannel> {
        re::content_addressable_storage_client::ContentAddressableStorageClient::new(
            self.channel.clone(),
        )
        .max_decoding_message_size(64 << 20)
    }

    fn ac(&self) -> re::action_cache_client::ActionCacheClient<AuthChannel> {
        re::action_cache_client::ActionCacheClient::new(self.channel.clone())
    }

    fn bytestream(&self) -> bs::byte_stream_client::ByteStreamClient<AuthChannel> {
        bs::byte_stream_client::ByteStreamClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
    }

    /// The channel's images as published, oldest first: `(id, manifest digest, signature
    /// digest)`; empty for a channel never published.
    pub async fn channel(
        &self,
        channel: &str,
    ) -> Result<Vec<(String, re::Digest, Option<re::Digest>)>, DepotError> {
        let got = self
            .ac()
            .get_action_result(re::GetActionResultRequest {
                instance_name: self.instance.clone(),
                action_digest: Some(channel_key(channel)),
                ..Default::default()
            })
            .await;
        let result = match got {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(Vec::new()),
            Err(s) => return Err(call("GetActionResult")(s)),
        };
        let mut out: Vec<(String, re::Digest, Option<re::Digest>)> = Vec::new();
        for f in &result.output_files {
            let Some((id, file)) = f.path.split_once('/') else {
                continue;
            };
            let Some(d) = f.digest.clone() else { continue };
            match file {
                "manifest.json" => out.push((id.to_string(), d, None)),
                SIGNATURE_FILE => {
                    if let Some(e) = out.iter_mut().find(|e| e.0 == id) {
                        e.2 = Some(d);
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Uploads the stored image in `dir` (its pieces, manifest and signature; only what the CAS
    /// lacks) and makes it the channel's newest, keeping the newest `keep`. Returns the bytes
    /// uploaded.
    pub async fn publish(&self, dir: &Path, channel: &str, keep: usize) -> Result<u64, DepotError> {
        valid_channel(channel)?;
        // Checked as a burner would check it: nothing corrupt is published.
        let image = Image::load_stored(dir, None)?;
        if image.manifest.pieces.is_empty() {
            return Err(DepotError::Refused(format!(
                "{}: its manifest lists no pieces (built before pieces existed): build it again",
                dir.display()
            )));
        }
        let manifest_path = dir.join("manifest.json");
        let manifest = std::fs::read(&manifest_path).map_err(io(&manifest_path))?;
        let sig_path = dir.join(SIGNATURE_FILE);
        let signature = match std::fs::read(&sig_path) {
            Ok(s) => Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(&sig_path)(e)),
        };
        let m = image.manifest.clone();
        let mut digests: Vec<re::Digest> = m
            .pieces
            .iter()
            .map(|p| re::Digest {
                hash: p.sha256.clone(),
                size_bytes: p.len as i64,
            })
            .collect();
        digests.push(digest_of(&manifest));
        if let Some(s) = &signature {
            digests.push(digest_of(s));
        }
        let missing = self
            .cas()
            .find_missing_blobs(re::FindMissingBlobsRequest {
                instance_name: self.instance.clone(),
                blob_digests: digests.clone(),
                ..Default::default()
            })
            .await
            .map_err(call("FindMissingBlobs"))?
            .into_inner()
            .missing_blob_digests;
        let missing: std::collections::HashSet<String> =
            missing.into_iter().map(|d| d.hash).collect();
        let mut uploaded = 0u64;
        let pieces: Vec<Piece> = m
            .pieces
            .iter()
            .filter(|p| missing.contains(&p.sha256))
            .cloned()
            .collect();
        let image = std::sync::Arc::new(image);
        let file = dir.join("image.ext4");
        let sent: Vec<u64> = futures::stream::iter(pieces)
            .map(|p| {
                let (depot, image, file) = (self.clone(), image.clone(), file.clone());
                async move {
                    let mut buf = vec![0u8; p.len as usize];
                    image.read_at(&mut buf, p.offset).map_err(io(&file))?;
                    depot.write_blob(&p.sha256, buf).await?;
                    Ok::<u64, DepotError>(p.len)
                }
            })
            .buffer_unordered(PARALLEL)
            .try_collect()
            .await?;
        uploaded += sent.iter().sum::<u64>();
        for blob in std::iter::once(&manifest).chain(signature.as_ref()) {
            let d = digest_of(blob);
            if missing.contains(&d.hash) {
                self.write_blob(&d.hash, blob.clone()).await?;
                uploaded += blob.len() as u64;
            }
        }
        // The channel's list: this image last; the oldest beyond `keep` dropped.
        let mut list = self.channel(channel).await?;
        list.retain(|e| e.0 != m.id);
        list.push((
            m.id.clone(),
            digest_of(&manifest),
            signature.as_deref().map(digest_of),
        ));
        let skip = list.len().saturating_sub(keep.max(1));
        let mut files = Vec::new();
        for (id, manifest, signature) in list.into_iter().skip(skip) {
            files.push(re::OutputFile {
                path: format!("{id}/manifest.json"),
                digest: Some(manifest),
                ..Default::default()
            });
            if let Some(s) = signature {
                files.push(re::OutputFile {
                    path: format!("{id}/{SIGNATURE_FILE}"),
                    digest: Some(s),
                    ..Default::default()
                });
            }
        }
        self.ac()
            .update_action_result(re::UpdateActionResultRequest {
                instance_name: self.instance.clone(),
                action_digest: Some(channel_key(channel)),
                action_result: Some(re::ActionResult {
                    output_files: files,
                    execution_metadata: Some(re::ExecutedActionMetadata {
                        worker: "motorpool image publish".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map_err(call("UpdateActionResult"))?;
        Ok(uploaded)
    }

    async fn write_blob(&self, sha256: &str, data: Vec<u8>) -> Result<(), DepotError> {
        let size = data.len();
        let resource = format!(
            "{}{}uploads/{}/blobs/{sha256}/{size}",
            self.instance,
            if self.instance.is_empty() { "" } else { "/" },
            uuid_like()
        );
        let chunks: Vec<bs::WriteRequest> = data
            .chunks(1 << 20)
            .enumerate()
            .map(|(i, c)| bs::WriteRequest {
                resource_name: if i == 0 {
                    resource.clone()
                } else {
                    String::new()
                },
                write_offset: (i << 20) as i64,
                finish_write: (i + 1) << 20 >= size,
                data: c.to_vec(),
            })
            .collect();
        let chunks = if chunks.is_empty() {
            vec![bs::WriteRequest {
                resource_name: resource,
                finish_write: true,
                ..Default::default()
            }]
        } else {
            chunks
        };
        self.bytestream()
            .write(futures::stream::iter(chunks))
            .await
            .map_err(call("ByteStream.Write"))?;
        Ok(())
    }

    async fn read_blob(&self, d: &re::Digest) -> Result<Vec<u8>, DepotError> {
        let resource = format!(
            "{}{}blobs/{}/{}",
            self.instance,
            if self.instance.is_empty() { "" } else { "/" },
            d.hash,
            d.size_bytes
        );
        let mut stream = self
            .bytestream()
            .read(bs::ReadRequest {
                resource_name: resource,
                ..Default::default()
            })
            .await
            .map_err(call("ByteStream.Read"))?
            .into_inner();
        let mut out = Vec::with_capacity(d.size_bytes.max(0) as usize);
        while let Some(chunk) = stream.message().await.map_err(call("ByteStream.Read"))? {
            out.extend_from_slice(&chunk.data);
        }
        if digest_of(&out) != *d {
            return Err(DepotError::Refused(format!(
                "the CAS returned other bytes for blob {}/{}",
                d.hash, d.size_bytes
            )));
        }
        Ok(out)
    }

    /// Fetches the channel's newest `newest` images (or the one named `only`) into
    /// `<store>/<channel>/<id>/`, each only as far as the store does not hold it already.
    /// With `trusted` keys, an image whose manifest they did not sign is refused before any of
    /// its pieces is fetched.
    pub async fn fetch(
        &self,
        channel: &str,
        store: &Path,
        trusted: Option<&TrustedKeys>,
        newest: usize,
        only: Option<&str>,
    ) -> Result<Vec<Fetched>, DepotError> {
        valid_channel(channel)?;
        let list = self.channel(channel).await?;
        if list.is_empty() {
            return Err(DepotError::Refused(format!(
                "channel {channel} has no published image on instance {:?}",
                self.instance
            )));
        }
        let wanted: Vec<_> = match only {
            Some(id) => list.into_iter().filter(|e| e.0 == id).collect(),
            None => {
                let skip = list.len().saturating_sub(newest.max(1));
                list.into_iter().skip(skip).collect()
            }
        };
        if wanted.is_empty() {
            return Err(DepotError::Refused(format!(
                "channel {channel} has no image {}",
                only.unwrap_or_default()
            )));
        }
        let dir = store.join(channel);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let mut out = Vec::new();
        for (id, manifest, signature) in wanted {
            out.push(
                self.fetch_one(&dir, &id, &manifest, signature.as_ref(), trusted)
                    .await?,
            );
        }
        Ok(out)
    }

    async fn fetch_one(
        &self,
        dir: &Path,
        id: &str,
        manifest_digest: &re::Digest,
        signature_digest: Option<&re::Digest>,
        trusted: Option<&TrustedKeys>,
    ) -> Result<Fetched, DepotError> {
        if !crate::image::valid_id(id) {
            return Err(DepotError::Refused(format!(
                "the channel names an invalid image id {id:?}"
            )));
        }
        let target = dir.join(id);
        let manifest_bytes = self.read_blob(manifest_digest).await?;
        let signature = match signature_digest {
            Some(d) => Some(self.read_blob(d).await?),
            None => None,
        };
        if let Some(keys) = trusted {
            let sig = signature.as_deref().ok_or_else(|| {
                DepotError::Refused(format!(
                    "image {id} is published unsigned, and only signed images are taken"
                ))
            })?;
            keys.verify(&manifest_bytes, &String::from_utf8_lossy(sig))
                .map_err(|e| DepotError::Refused(format!("image {id}: {e}")))?;
        }
        let value: serde_json::Value = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| DepotError::Refused(format!("image {id}: manifest not JSON: {e}")))?;
        let manifest: ImageManifest = serde_json::from_value(value["image"].clone())
            .map_err(|e| DepotError::Refused(format!("image {id}: no image manifest: {e}")))?;
        manifest
            .check()
            .map_err(|e| DepotError::Refused(format!("image {id}: {e}")))?;
        if manifest.id != id || manifest.pieces.is_empty() {
            return Err(DepotError::Refused(format!(
                "image {id}: its manifest names {} with {} pieces",
                manifest.id,
                manifest.pieces.len()
            )));
        }
        let mut report = Fetched {
            id: id.to_string(),
            dir: target.clone(),
            size: manifest.size,
            mapped: manifest.mapped_bytes(),
            fetched: 0,
            reused: 0,
            present: false,
        };
        if std::fs::read(target.join("manifest.json")).is_ok_and(|b| b == manifest_bytes) {
            report.present = true;
            return Ok(report);
        }
        // Pieces the store holds already, by BLAKE3.
        let local = local_pieces(dir);
        let staging = dir.join(format!(".fetch-{id}-{}", uuid_like()));
        std::fs::create_dir_all(&staging).map_err(io(&staging))?;
        let result = self
            .assemble(&staging, &manifest, &local, &mut report)
            .await
            .and_then(|()| {
                let w = |name: &str, bytes: &[u8]| {
                    let p = staging.join(name);
                    std::fs::write(&p, bytes).map_err(io(&p))
                };
                w("manifest.json", &manifest_bytes)?;
                if let Some(s) = &signature {
                    w(SIGNATURE_FILE, s)?;
                }
                // The whole image against its manifest (and signature) before it is in place.
                Image::load_stored(&staging, trusted)?;
                if target.exists() {
                    std::fs::remove_dir_all(&target).map_err(io(&target))?;
                }
                std::fs::rename(&staging, &target).map_err(io(&target))
            });
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        result.map(|()| report)
    }

    async fn assemble(
        &self,
        staging: &Path,
        m: &ImageManifest,
        local: &HashMap<String, (PathBuf, u64)>,
        report: &mut Fetched,
    ) -> Result<(), DepotError> {
        let path = staging.join("image.ext4");
        let file = std::fs::File::create(&path).map_err(io(&path))?;
        file.set_len(m.size).map_err(io(&path))?;
        let file = std::sync::Arc::new(file);
        let local = std::sync::Arc::new(local.clone());
        let (size, id) = (m.size, m.id.clone());
        let results: Vec<(bool, u64)> = futures::stream::iter(m.pieces.clone())
            .map(|p| {
                let (depot, file, local, path, id) =
                    (self.clone(), file.clone(), local.clone(), path.clone(), id.clone());
                async move {
                    let (bytes, reused) =
                        match local.get(&p.blake3).and_then(|(f, at)| read_local(f, *at, &p)) {
                            Some(b) => (b, true),
                            None => {
                                let b = depot
                                    .read_blob(&re::Digest {
                                        hash: p.sha256.clone(),
                                        size_bytes: p.len as i64,
                                    })
                                    .await?;
                                if blake3::hash(&b).to_hex().as_str() != p.blake3 {
                                    return Err(DepotError::Refused(format!(
                                        "piece at byte {} of {id} arrived with another BLAKE3 than its manifest's",
                                        p.offset
                                    )));
                                }
                                (b, false)
                            }
                        };
                    // The last piece may run past the file's end (the block map's whole block).
                    let keep = (bytes.len() as u64).min(size.saturating_sub(p.offset)) as usize;
                    file.write_all_at(&bytes[..keep], p.offset)
                        .map_err(io(&path))?;
                    Ok::<(bool, u64), DepotError>((reused, p.len))
                }
            })
            .buffer_unordered(PARALLEL)
            .try_collect()
            .await?;
        for (reused, len) in results {
            if reused {
                report.reused += len;
            } else {
                report.fetched += len;
            }
        }
        file.sync_all().map_err(io(&path))
    }
}

/// A channel names a directory of the store: the image ids' alphabet, nothing that climbs out.
fn valid_channel(channel: &str) -> Result<(), DepotError> {
    if crate::image::valid_id(channel) {
        Ok(())
    } else {
        Err(DepotError::Refused(format!(
            "channel {channel:?} must be 1-27 of [A-Za-z0-9._-], not starting with '.'"
        )))
    }
}

/// A piece from an image the store holds, when its bytes still hash to the BLAKE3 wanted.
fn read_local(file: &Path, at: u64, p: &Piece) -> Option<Vec<u8>> {
    let f = std::fs::File::open(file).ok()?;
    let size = f.metadata().ok()?.len();
    let mut buf = vec![0u8; p.len as usize];
    let readable = (p.len).min(size.saturating_sub(at)) as usize;
    f.read_exact_at(&mut buf[..readable], at).ok()?;
    (blake3::hash(&buf).to_hex().as_str() == p.blake3).then_some(buf)
}

/// Every piece of the images in a channel's directory: BLAKE3 -> (image file, offset).
fn local_pieces(dir: &Path) -> HashMap<String, (PathBuf, u64)> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let Ok(bytes) = std::fs::read(e.path().join("manifest.json")) else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        let Ok(m) = serde_json::from_value::<ImageManifest>(v["image"].clone()) else {
            continue;
        };
        for p in m.pieces {
            out.entry(p.blake3)
                .or_insert((e.path().join("image.ext4"), p.offset));
        }
    }
    out
}

fn uuid_like() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}
