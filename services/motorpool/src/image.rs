//! `motorpool image`: build fleet images from a git repository with a Dockerfile (here, or queued
//! on the bus for the image builders), list them, and make the key that signs their manifests.

use clap::{Args, Subcommand};
use motorpool_image_builder::{BuildRequest, ManifestSigner, build, list};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Build an image: clone, docker build, export, mkfs.ext4 -d, manifest.
    Build(BuildArgs),
    /// Queue a build for the image builders (`motorpool image-builder`) on the bus, in a lane.
    Submit(SubmitArgs),
    /// Make an ed25519 key pair that signs image manifests: the secret key for builders
    /// (`signing_key_file`), `<out>.pub` for burners' `trusted_keys_file`.
    Keygen {
        /// Where the secret key goes (never over an existing file); the public key goes beside
        /// it as `<out>.pub`.
        #[arg(long)]
        out: PathBuf,
        /// A comment on the public key's line (who signs with it).
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Publish a stored image to the platform's CAS (through the gateway) as its channel's
    /// newest, for burner hosts to fetch; only what the CAS lacks is sent. Needs a key that may
    /// write the action cache.
    Publish {
        /// The image's directory in the store (`<store>/<channel>/<id>`).
        #[arg(long)]
        image: PathBuf,
        /// The channel [default: the name of the image directory's parent].
        #[arg(long)]
        channel: Option<String>,
        /// Images the channel keeps listed.
        #[arg(long, default_value_t = 5)]
        keep: usize,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Fetch a channel's images from the platform's CAS into a store, each only as far as the
    /// store does not hold it already (pieces of images it has are copied, not fetched).
    Fetch {
        #[arg(long, default_value = "stable")]
        channel: String,
        #[arg(long, default_value = "motorpool-data/images")]
        store: PathBuf,
        /// Only this image (else the channel's newest `--newest`).
        #[arg(long)]
        id: Option<String>,
        #[arg(long, default_value_t = 1)]
        newest: usize,
        /// Public keys whose signatures are accepted: an image they did not sign is refused
        /// before its pieces are fetched.
        #[arg(long, env = "MOTORPOOL_FLEET_TRUSTED_KEYS_FILE")]
        trusted_keys: Option<PathBuf>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// List a channel's images, newest first.
    List {
        #[arg(long, default_value = "motorpool-data/images")]
        store: PathBuf,
        #[arg(long, default_value = "stable")]
        channel: String,
    },
}

/// What to build: the same for a local build and a queued one.
#[derive(Args)]
pub struct Source {
    /// Git URL or path.
    #[arg(long)]
    repo: String,
    /// Branch, tag or commit.
    #[arg(long = "ref", default_value = "main")]
    git_ref: String,
    /// Dockerfile, relative to the repository root.
    #[arg(long, default_value = "Dockerfile")]
    dockerfile: String,
    /// Build context, relative to the repository root.
    #[arg(long, default_value = ".")]
    context: String,
    /// NAME=VALUE (repeatable).
    #[arg(long = "build-arg", value_parser = crate::parse_property)]
    build_args: Vec<(String, String)>,
    /// Release channel.
    #[arg(long, default_value = "stable")]
    channel: String,
    /// Image id [default: <channel>-<short commit>].
    #[arg(long)]
    id: Option<String>,
}

impl Source {
    fn request(self) -> BuildRequest {
        BuildRequest {
            repo: self.repo,
            git_ref: self.git_ref,
            dockerfile: self.dockerfile,
            context: self.context,
            build_args: self.build_args,
            channel: self.channel,
            image_id: self.id,
        }
    }
}

#[derive(Args)]
pub struct BuildArgs {
    #[command(flatten)]
    source: Source,
    /// The ed25519 key that signs the manifest (`motorpool image keygen`).
    #[arg(long, env = "MOTORPOOL_FLEET_SIGNING_KEY_FILE")]
    signing_key: Option<PathBuf>,
    /// Image store.
    #[arg(long, default_value = "motorpool-data/images")]
    store: PathBuf,
    /// Images kept per channel.
    #[arg(long, default_value_t = 5)]
    keep: usize,
}

#[derive(Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    source: Source,
    /// The lane: release, build, test or lint.
    #[arg(long, default_value = "release", value_parser = parse_lane)]
    lane: motorpool_messages::exec::Lane,
    /// Follow the build until it is done or failed (exit status 1 when it failed).
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    bus: crate::drives::BusArgs,
}

/// How to reach the platform's CAS: the gateway.
#[derive(Args)]
pub struct RemoteArgs {
    /// The gateway: grpc://HOST:8980, or grpcs:// with TLS.
    #[arg(
        long,
        env = "MOTORPOOL_REMOTE",
        default_value = "grpc://127.0.0.1:8980"
    )]
    remote: String,
    /// A file holding the API key (`motorpool up` prints the stack's).
    #[arg(long, env = "MOTORPOOL_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// The API key itself (prefer --api-key-file: a command line is visible to other users).
    #[arg(long, env = "MOTORPOOL_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// PEM CA of the gateway's certificate, for grpcs:// [default: the system's roots].
    #[arg(long)]
    tls_ca_file: Option<PathBuf>,
    /// The REAPI instance name images live under.
    #[arg(long, default_value = "")]
    instance: String,
}

impl RemoteArgs {
    async fn connect(&self) -> anyhow::Result<motorpool_disk_burner::depot::Depot> {
        let key = match (&self.api_key_file, &self.api_key) {
            (Some(f), _) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?
                    .trim()
                    .to_string(),
            ),
            (None, k) => k.clone(),
        };
        Ok(motorpool_disk_burner::depot::Depot::connect(
            &self.remote,
            key.as_deref(),
            self.tls_ca_file.as_deref(),
            &self.instance,
        )
        .await?)
    }
}

fn parse_lane(s: &str) -> Result<motorpool_messages::exec::Lane, String> {
    motorpool_messages::exec::Lane::from_name(s)
        .ok_or_else(|| format!("{s:?} is not a lane (release, build, test, lint)"))
}

pub fn main(cmd: ImageCommand) -> anyhow::Result<()> {
    crate::quiet_broken_pipe();
    match cmd {
        ImageCommand::Build(a) => {
            let t = Instant::now();
            let signer = a
                .signing_key
                .as_deref()
                .map(ManifestSigner::read)
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let req = a.source.request();
            let built = build(&req, &a.store, a.keep, signer.as_ref(), &|s| {
                println!("[{:>6.1}s] {s}", t.elapsed().as_secs_f64())
            })?;
            let m = &built.manifest;
            println!(
                "Built {} from {} ({}): {} MiB image, {} MiB of data, BLAKE3 {}{}",
                m.image.id,
                m.repo,
                &m.commit[..12],
                m.image.size >> 20,
                m.image.mapped_bytes() >> 20,
                &m.image.blake3[..16],
                if m.bootable {
                    ", bootable"
                } else {
                    " (no kernel in the tree: not bootable)"
                }
            );
            println!("  image     {}", built.image.display());
            println!(
                "  manifest  {}{}",
                built.dir.join("manifest.json").display(),
                if signer.is_some() {
                    " (signed)"
                } else {
                    " (not signed: no --signing-key)"
                }
            );
            Ok(())
        }
        ImageCommand::Submit(a) => tokio::runtime::Handle::current().block_on(submit(a)),
        ImageCommand::Publish {
            image,
            channel,
            keep,
            remote,
        } => tokio::runtime::Handle::current().block_on(async {
            let channel = match channel {
                Some(c) => c,
                None => image
                    .canonicalize()
                    .ok()
                    .and_then(|p| p.parent()?.file_name()?.to_str().map(str::to_string))
                    .ok_or_else(|| anyhow::anyhow!("{}: give --channel", image.display()))?,
            };
            let t = Instant::now();
            let depot = remote.connect().await?;
            let sent = depot.publish(&image, &channel, keep).await?;
            println!(
                "Published {} as channel {channel}'s newest: {sent} bytes sent (the CAS had the rest) in {:.1} s",
                image.display(),
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }),
        ImageCommand::Fetch {
            channel,
            store,
            id,
            newest,
            trusted_keys,
            remote,
        } => tokio::runtime::Handle::current().block_on(async {
            let trusted = trusted_keys
                .as_deref()
                .map(motorpool_disk_burner::sign::TrustedKeys::read)
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let t = Instant::now();
            let depot = remote.connect().await?;
            for f in depot
                .fetch(&channel, &store, trusted.as_ref(), newest, id.as_deref())
                .await?
            {
                if f.present {
                    println!("{}: already in the store ({})", f.id, f.dir.display());
                    continue;
                }
                println!(
                    "Fetched {}: {} bytes fetched, {} reused from the store, of {} bytes of data ({} MiB image){}: {}",
                    f.id,
                    f.fetched,
                    f.reused,
                    f.mapped,
                    f.size >> 20,
                    if trusted.is_some() { ", signature checked" } else { "" },
                    f.dir.display()
                );
            }
            println!("in {:.1} s", t.elapsed().as_secs_f64());
            Ok(())
        }),
        ImageCommand::Keygen { out, comment } => {
            let key = ManifestSigner::generate();
            key.write(&out, &comment)
                .map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
            println!(
                "secret key  {} (mode 0600: builders' signing_key_file)",
                out.display()
            );
            println!(
                "public key  {}.pub (burners' trusted_keys_file):\n  {}",
                out.display(),
                key.public_line()
            );
            Ok(())
        }
        ImageCommand::List { store, channel } => {
            println!(
                "{:<28} {:<12} {:>9} {:>9}  built",
                "image", "commit", "size", "data"
            );
            let now = motorpool_messages::now_ms();
            for m in list(&store, &channel) {
                println!(
                    "{:<28} {:<12} {:>8}M {:>8}M  {} min ago",
                    m.image.id,
                    &m.commit[..12.min(m.commit.len())],
                    m.image.size >> 20,
                    m.image.mapped_bytes() >> 20,
                    now.saturating_sub(m.built_at_ms) / 60_000
                );
            }
            Ok(())
        }
    }
}

async fn submit(a: SubmitArgs) -> anyhow::Result<()> {
    use futures::StreamExt;
    use motorpool_messages::fleet::{BuildState, BuildStatus};
    let bus = a.bus.connect("motorpool-image-submit").await?;
    let req = a.source.request();
    let job = motorpool_image_builder::actor::submit(&bus, &req, a.lane).await?;
    println!(
        "Queued build {} of {} at {} in the {} lane",
        job.job_id,
        req.repo,
        req.git_ref,
        a.lane.name()
    );
    if !a.wait {
        return Ok(());
    }
    let kv = bus
        .ensure_kv(motorpool_bus::subjects::fleet::builds_config())
        .await?;
    let mut updates = kv.watch(&job.job_id).await?;
    let t = Instant::now();
    while let Some(e) = updates.next().await {
        let e = e?;
        let Ok(s) = motorpool_messages::codec::decode::<BuildStatus>(&e.value) else {
            continue;
        };
        let at = t.elapsed().as_secs_f64();
        match s.state {
            BuildState::Queued => println!("[{at:>6.1}s] queued"),
            BuildState::Running { step } => println!("[{at:>6.1}s] {step}"),
            BuildState::Done {
                image_id,
                dir,
                blake3,
            } => {
                println!(
                    "Built {image_id}, BLAKE3 {}: {}",
                    &blake3[..16.min(blake3.len())],
                    Path::new(&dir).display()
                );
                return Ok(());
            }
            BuildState::Failed { reason } => anyhow::bail!("build {} failed: {reason}", job.job_id),
        }
    }
    anyhow::bail!("the bus closed before build {} ended", job.job_id)
}
