//! `motorpool label`: run clips through the BevSlots pipeline, make synthetic clips, measure.
//!
//! - `label run <clip-dir>` queues a clip for mapping -> prelabel -> annotate and shows each
//!   stage's progress. With `--nats-url` (or `MOTORPOOL_NATS_URL`) it uses a running stack
//!   (`motorpool up` runs the three stages); without, it starts a private nats-server and the
//!   three stage actors in this process: the same actors, the same messages.
//! - `label synth` writes a synthetic clip; `label bench` prints the quality and speed table.

use clap::{Args, Subcommand, ValueEnum};
use motorpool_annotate::Annotate;
use motorpool_bus::{Bus, NatsServer};
use motorpool_labeling::clip::FrameSlots;
use motorpool_labeling::eval::{EvalOptions, Quality, evaluate, percentile};
use motorpool_labeling::synth::{Layout, SynthOptions, generate};
use motorpool_labeling::{Clip, Progress, StageOptions, run_once, serve_stage, submit, watch};
use motorpool_mapping::Mapping;
use motorpool_messages::exec::Lane;
use motorpool_messages::label::{
    DetectorSource, LabelJob, LabelParams, Stage, StageState, StageStatus,
};
use motorpool_prelabel::Prelabel;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Subcommand)]
pub enum LabelCommand {
    /// Label a clip: mapping -> prelabel -> annotate, with progress.
    Run(RunArgs),
    /// Write a synthetic clip (lot, trajectory, lidar, noisy detections, ground truth).
    Synth(SynthArgs),
    /// Print the quality and speed table on synthetic clips.
    Bench(BenchArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LaneArg {
    Release,
    Build,
    Test,
    Lint,
}

impl From<LaneArg> for Lane {
    fn from(l: LaneArg) -> Lane {
        match l {
            LaneArg::Release => Lane::Release,
            LaneArg::Build => Lane::Build,
            LaneArg::Test => Lane::Test,
            LaneArg::Lint => Lane::Lint,
        }
    }
}

#[derive(Args)]
pub struct RunArgs {
    /// The clip directory (format in shared/labeling/src/clip.rs).
    clip: PathBuf,
    /// A running stack's NATS; without it the pipeline runs in this process.
    #[arg(long, env = "MOTORPOOL_NATS_URL")]
    nats_url: Option<String>,
    /// The nkey seed to connect to that NATS with (`motorpool up` makes
    /// `<data dir>/bus/operator.nk`).
    #[arg(long, env = "MOTORPOOL_NATS_NKEY_FILE")]
    nats_nkey_file: Option<PathBuf>,
    /// PEM CA of that NATS, where it speaks TLS.
    #[arg(long, env = "MOTORPOOL_NATS_TLS_CA_FILE")]
    nats_tls_ca_file: Option<PathBuf>,
    /// Priority lane.
    #[arg(long, value_enum, default_value = "build")]
    lane: LaneArg,
    /// Label store for the in-process pipeline (a running stack uses its own).
    #[arg(long, default_value = "motorpool-data/labels")]
    data_dir: PathBuf,
    /// Run this ONNX BevSlots model instead of reading detections/bevslots.json.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Score threshold for --model.
    #[arg(long, default_value_t = 0.5)]
    score_threshold: f64,
    /// Half-width of the labeled square around the car, metres.
    #[arg(long)]
    visible_m: Option<f64>,
}

#[derive(Args)]
pub struct SynthArgs {
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long)]
    out: PathBuf,
    /// perpendicular, parallel or angled.
    #[arg(long, default_value = "perpendicular")]
    layout: String,
    /// Frames at 10 Hz.
    #[arg(long, default_value_t = 300)]
    frames: u32,
}

#[derive(Args)]
pub struct BenchArgs {
    /// First seed; each layout runs `--clips` seeds from here.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Clips per layout.
    #[arg(long, default_value_t = 2)]
    clips: u64,
    /// Timing repeats of fusion + annotate per clip (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
}

pub async fn main(cmd: LabelCommand) -> anyhow::Result<()> {
    match cmd {
        LabelCommand::Run(a) => run(a).await,
        LabelCommand::Synth(a) => {
            let layout = Layout::from_name(&a.layout).ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown layout {:?}: perpendicular, parallel or angled",
                    a.layout
                )
            })?;
            let clip = generate(&SynthOptions {
                seed: a.seed,
                layout,
                frames: a.frames,
                ..Default::default()
            });
            clip.write(&a.out)?;
            println!(
                "Wrote clip {} to {}: {} frames, {} slots",
                clip.clip_id,
                a.out.display(),
                clip.manifest.frames.len(),
                clip.truth.slots.len()
            );
            Ok(())
        }
        LabelCommand::Bench(a) => tokio::task::spawn_blocking(move || bench(a)).await?,
    }
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    let mut params = LabelParams::default();
    if let Some(model) = &a.model {
        params.bevslots = DetectorSource::Onnx {
            model: std::fs::canonicalize(model)?.display().to_string(),
            score_threshold: a.score_threshold,
        };
    }
    if let Some(v) = a.visible_m {
        params.visible_m = v;
    }
    // Check the clip before anything starts: a malformed clip is reported at once.
    Clip::open(&a.clip)?;
    let (_server, url, nkey, local) = match &a.nats_url {
        Some(url) => (None, url.clone(), a.nats_nkey_file.clone(), None),
        None => {
            let server = NatsServer::start()?;
            let url = server.url();
            std::fs::create_dir_all(&a.data_dir)?;
            let data_dir = std::fs::canonicalize(&a.data_dir)?;
            let stop = CancellationToken::new();
            let bus = Bus::connect(&url, "motorpool-label", Duration::from_secs(10)).await?;
            let options = |stage: Stage| StageOptions {
                data_dir: data_dir.clone(),
                worker_id: format!("local-{stage}"),
                concurrency: 1,
                aging_step_ms: 10_000,
                ack_wait: Duration::from_secs(120),
            };
            let tasks = vec![
                tokio::spawn(serve_stage(
                    bus.clone(),
                    Arc::new(Mapping),
                    options(Stage::Mapping),
                    stop.clone(),
                )),
                tokio::spawn(serve_stage(
                    bus.clone(),
                    Arc::new(Prelabel),
                    options(Stage::Prelabel),
                    stop.clone(),
                )),
                tokio::spawn(serve_stage(
                    bus.clone(),
                    Arc::new(Annotate),
                    options(Stage::Annotate),
                    stop.clone(),
                )),
            ];
            (Some(server), url, None, Some((stop, tasks)))
        }
    };
    let bus = Bus::connect_service(
        &url,
        "motorpool-label-client",
        nkey.as_deref(),
        a.nats_tls_ca_file.as_deref().filter(|_| local.is_none()),
        Duration::from_secs(10),
    )
    .await?;
    let job = submit(&bus, &a.clip, a.lane.into(), params).await?;
    println!(
        "Queued clip {} as job {} in the {} lane",
        job.clip_id, job.job_id, job.lane
    );
    let tty = std::io::stderr().is_terminal();
    let mut shown = ShowProgress::default();
    let started = std::sync::atomic::AtomicBool::new(false);
    let watching = watch(&bus, &job.job_id, |s| {
        if !matches!(s.state, StageState::Queued) {
            started.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        shown.show(s, tty)
    });
    // A stack without the labeling stages would leave the job queued without a word: say so.
    let hint = async {
        tokio::time::sleep(Duration::from_secs(15)).await;
        if !started.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!(
                "\nNo mapping stage has taken the job after 15 s; it stays queued (nothing is lost). Is `motorpool up` or `motorpool mapping --nats-url {url}` running?"
            );
        }
        std::future::pending::<()>().await
    };
    let result = tokio::select! {
        r = watching => r,
        _ = hint => unreachable!("the hint never finishes"),
    };
    if tty {
        eprintln!();
    }
    if let Some((stop, tasks)) = local {
        stop.cancel();
        for t in tasks {
            let _ = t.await;
        }
    }
    let out = result?;
    let stats_path = Path::new(&out.dir).join("stats.json");
    let stats: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats_path)?)?;
    println!(
        "Labeled clip {}: {} fused slots, {} of {} frames kept ({} dropped: {}), {} labels written",
        job.clip_id,
        stats["slots"],
        stats["frames_kept"],
        stats["frames"],
        stats["frames"].as_u64().unwrap_or(0) - stats["frames_kept"].as_u64().unwrap_or(0),
        stats["frames_dropped"],
        stats["label_instances"],
    );
    println!(
        "  labels   {}/coco_keypoints.json, {}/label_studio.json",
        out.dir, out.dir
    );
    println!("  picture  {}/report.html", out.dir);
    Ok(())
}

#[derive(Default)]
struct ShowProgress {
    last: Option<(Stage, String)>,
}

impl ShowProgress {
    fn show(&mut self, s: &StageStatus, tty: bool) {
        let line = match &s.state {
            StageState::Queued => format!("{:<9} queued", s.stage.name()),
            StageState::Running { done, total } => {
                let width = 30usize;
                let filled = if *total > 0 {
                    (*done as usize * width) / *total as usize
                } else {
                    0
                };
                format!(
                    "{:<9} [{}{}] {done}/{total}",
                    s.stage.name(),
                    "#".repeat(filled.min(width)),
                    "-".repeat(width - filled.min(width))
                )
            }
            StageState::Done(o) => format!(
                "{:<9} done in {} ms{} -> {}",
                s.stage.name(),
                o.elapsed_ms,
                if o.cached {
                    " (cached: same inputs, same version)"
                } else {
                    ""
                },
                o.dir
            ),
            StageState::Failed { reason } => format!("{:<9} FAILED: {reason}", s.stage.name()),
        };
        let key = (s.stage, line.clone());
        if self.last.as_ref() == Some(&key) {
            return;
        }
        let same_stage_running = matches!(s.state, StageState::Running { .. })
            && self
                .last
                .as_ref()
                .is_some_and(|(st, l)| *st == s.stage && l.contains('['));
        if tty && same_stage_running {
            eprint!("\r{line}");
        } else {
            if tty && self.last.is_some() {
                eprintln!();
            }
            if tty {
                eprint!("{line}");
            } else {
                eprintln!("{line}");
            }
        }
        let _ = std::io::stderr().flush();
        self.last = Some(key);
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// The quality and speed table.
fn bench(a: BenchArgs) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let store = tmp.path().join("labels");
    let eval = EvalOptions::default();
    println!("# BevSlots labeling on synthetic clips\n");
    println!(
        "{} layouts x {} clips, 300 frames at 10 Hz each; P/R at a {} m corner threshold (every corner); corner error over pairs within 1 m.\n",
        Layout::ALL.len(),
        a.clips,
        eval.threshold_m
    );
    println!(
        "| clip | slots seen >= 5 frames | raw err mean / p95 (m) | fused err mean / p95 (m) | fused/raw err | raw P / R | fused P / R | corner 0 entrance-left (raw / fused) | frames kept |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let (mut raw_all, mut fused_all) = (Quality::default(), Quality::default());
    let mut timing = Vec::new();
    for layout in Layout::ALL {
        for seed in a.seed..a.seed + a.clips {
            let synth = generate(&SynthOptions {
                seed,
                layout,
                ..Default::default()
            });
            let dir = tmp.path().join(&synth.clip_id);
            synth.write(&dir)?;
            let clip = Clip::open(&dir)?;
            let mut job = LabelJob {
                job_id: format!("bench-{seed}"),
                clip_id: clip.id().to_string(),
                clip_dir: dir.display().to_string(),
                lane: Lane::Build,
                submitted_ms: 0,
                params: LabelParams::default(),
                outputs: vec![],
            };
            let mut stage_ms = Vec::new();
            for stage in Stage::ALL {
                let t = Instant::now();
                let out = match stage {
                    Stage::Mapping => run_once(&Mapping, &job, &store, &Progress::default())?,
                    Stage::Prelabel => run_once(&Prelabel, &job, &store, &Progress::default())?,
                    Stage::Annotate => run_once(&Annotate, &job, &store, &Progress::default())?,
                };
                stage_ms.push(t.elapsed().as_secs_f64() * 1000.0);
                job.outputs.push(out);
            }
            // Quality: raw per-frame detections and per-frame fused labels, every frame.
            let truth = clip
                .ground_truth()?
                .ok_or_else(|| anyhow::anyhow!("no ground truth"))?;
            let raw: Vec<Vec<_>> = clip
                .slots("detections/bevslots.json")?
                .into_iter()
                .map(|f| f.unwrap_or_default())
                .collect();
            let avm = clip.slots("detections/avm.json")?;
            let params = &job.params;
            let detected: Vec<FrameSlots> = raw
                .iter()
                .enumerate()
                .map(|(i, slots)| FrameSlots {
                    index: i as u32,
                    slots: slots.clone(),
                })
                .collect();
            let frames = motorpool_prelabel::observations(&clip, &detected);
            let fusion = motorpool_prelabel::fusion::fuse(&frames, params);
            let verdicts = motorpool_annotate::annotate(&clip, &fusion.labels, &avm, params);
            let fused: Vec<Vec<_>> = verdicts
                .iter()
                .map(|v| {
                    v.labels
                        .iter()
                        .map(|l| motorpool_labeling::geom::Slot {
                            corners: l.corners,
                            score: l.score,
                        })
                        .collect()
                })
                .collect();
            let rq = evaluate(&truth, &raw, &eval);
            let fq = evaluate(&truth, &fused, &eval);
            let seen = motorpool_labeling::eval::seen_slots(&truth, eval.min_seen)
                .iter()
                .filter(|s| **s)
                .count();
            let kept = verdicts.iter().filter(|v| v.dropped.is_none()).count();
            println!(
                "| {} | {seen} | {:.3} / {:.3} | {:.3} / {:.3} | {:.2} | {:.3} / {:.3} | {:.3} / {:.3} | {:.3} / {:.3} | {kept}/{} |",
                clip.id(),
                rq.mean_error(),
                rq.p95_error(),
                fq.mean_error(),
                fq.p95_error(),
                fq.mean_error() / rq.mean_error(),
                rq.precision(),
                rq.recall(),
                fq.precision(),
                fq.recall(),
                rq.order_share(),
                fq.order_share(),
                verdicts.len()
            );
            raw_all.merge(&rq);
            fused_all.merge(&fq);
            // Speed: fusion + annotate, in memory, on one core.
            let mut samples = Vec::new();
            for _ in 0..a.repeats.max(1) {
                let t = Instant::now();
                let f = motorpool_prelabel::fusion::fuse(&frames, params);
                let v = motorpool_annotate::annotate(&clip, &f.labels, &avm, params);
                std::hint::black_box(&v);
                samples.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            let visible = verdicts.iter().map(|v| v.labels.len()).sum::<usize>() as f64
                / verdicts.len() as f64;
            timing.push((
                clip.id().to_string(),
                median(&mut samples),
                visible,
                stage_ms,
            ));
        }
    }
    println!(
        "| **all** | | {:.3} / {:.3} | {:.3} / {:.3} | **{:.2}** (goal <= 0.50) | {:.3} / {:.3} | **{:.3} / {:.3}** (goal >= 0.98) | {:.3} / **{:.3}** (goal >= 0.99) | |",
        raw_all.mean_error(),
        raw_all.p95_error(),
        fused_all.mean_error(),
        fused_all.p95_error(),
        fused_all.mean_error() / raw_all.mean_error(),
        raw_all.precision(),
        raw_all.recall(),
        fused_all.precision(),
        fused_all.recall(),
        raw_all.order_share(),
        fused_all.order_share(),
    );
    println!("\n## Speed (one core)\n");
    println!(
        "| clip | visible slots / frame | fusion + annotate, median (ms) | frames/s | mapping stage (ms) | prelabel stage (ms) | annotate stage (ms) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (id, ms, visible, stages) in &timing {
        println!(
            "| {id} | {visible:.1} | {ms:.1} | {:.0} | {:.0} | {:.0} | {:.0} |",
            300.0 / (ms / 1000.0),
            stages[0],
            stages[1],
            stages[2]
        );
    }
    let mut all: Vec<f64> = timing.iter().map(|t| t.1).collect();
    println!(
        "\nFusion + annotate of a 30 s clip: median {:.1} ms, p95 {:.1} ms (goal: well under 1000 ms). Stage times include reading and writing files (the annotate stage renders a PNG per kept frame).",
        median(&mut all),
        percentile(&all, 0.95)
    );
    Ok(())
}
