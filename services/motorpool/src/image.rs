//! `motorpool image`: build fleet images from a git repository with a Dockerfile, list them.

use clap::{Args, Subcommand};
use motorpool_image_builder::{BuildRequest, build, list};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Build an image: clone, docker build, export, mkfs.ext4 -d, manifest.
    Build(BuildArgs),
    /// List a channel's images, newest first.
    List {
        #[arg(long, default_value = "motorpool-data/images")]
        store: PathBuf,
        #[arg(long, default_value = "stable")]
        channel: String,
    },
}

#[derive(Args)]
pub struct BuildArgs {
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
    /// Image store.
    #[arg(long, default_value = "motorpool-data/images")]
    store: PathBuf,
    /// Images kept per channel.
    #[arg(long, default_value_t = 5)]
    keep: usize,
}

pub fn main(cmd: ImageCommand) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Build(a) => {
            let t = Instant::now();
            let req = BuildRequest {
                repo: a.repo,
                git_ref: a.git_ref,
                dockerfile: a.dockerfile,
                context: a.context,
                build_args: a.build_args,
                channel: a.channel,
                image_id: a.id,
            };
            let built = build(&req, &a.store, a.keep, &|s| {
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
            println!("  manifest  {}", built.dir.join("manifest.json").display());
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
