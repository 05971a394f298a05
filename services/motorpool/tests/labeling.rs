//! BevSlots labeling end to end: `motorpool up` runs the three stage actors, `motorpool label run`
//! queues synthetic clips on the real NATS and follows them; outputs are versioned and reused;
//! malformed clips fail with the clip and the frame named.

mod support;

use motorpool_labeling::synth::{Layout, SynthOptions, generate};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::{Stack, text};

fn synth_clip(dir: &Path, seed: u64, frames: u32) -> PathBuf {
    let clip = generate(&SynthOptions {
        seed,
        layout: Layout::Angled,
        frames,
        points: 3000,
        ..Default::default()
    });
    let path = dir.join(&clip.clip_id);
    clip.write(&path).unwrap();
    path
}

/// `motorpool label run` against the stack's NATS, as its operator user.
fn label_run(stack: &Stack, clip: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_motorpool"))
        .args(["label", "run"])
        .arg(clip)
        .args(["--nats-url", &stack.nats_url()])
        .arg("--nats-nkey-file")
        .arg(stack.nkey("operator"))
        .args(extra)
        .output()
        .expect("run motorpool label run")
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

/// The annotate output directory a run printed.
/// The (only) mapping output of the clip whose annotate output is `annotate`.
fn mapping_output(annotate: &Path) -> PathBuf {
    let clip = annotate.parent().unwrap().parent().unwrap();
    let mut versions = std::fs::read_dir(clip.join("mapping")).unwrap();
    versions.next().unwrap().unwrap().path()
}

fn annotate_dir(out: &str) -> PathBuf {
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("picture"))
        .unwrap_or_else(|| panic!("no picture line in:\n{out}"));
    let html = line.split_whitespace().last().unwrap();
    Path::new(html).parent().unwrap().to_path_buf()
}

#[test]
fn clips_are_labeled_on_the_stack_with_versioned_reusable_outputs() {
    let stack = Stack::up(&["--workers", "0"]);
    let clips = tempfile::tempdir().unwrap();
    let clip = synth_clip(clips.path(), 7, 120);

    let first = label_run(&stack, &clip, &["--lane", "release"]);
    let out = text(&first);
    assert!(first.status.success(), "{out}\n{}", stack.log());
    assert!(out.contains("in the release lane"), "{out}");
    for stage in ["mapping", "prelabel", "annotate"] {
        assert!(
            out.contains(&format!("{stage:<9} done")),
            "{stage} not done:\n{out}"
        );
    }
    let dir = annotate_dir(&out);
    assert!(
        dir.starts_with(stack.dir.path().join("data/labels")),
        "outputs go to the stack's label store: {}",
        dir.display()
    );

    // Mapping placed every frame by registration and wrote the poses the later stages used.
    let version = mapping_output(&dir);
    let poses = json(&version.join("poses.json"));
    assert_eq!(poses["format"], "motorpool.poses.v1");
    assert_eq!(poses["frames"].as_array().unwrap().len(), 120);
    let stats = json(&version.join("mapping.json"));
    let anchors = stats["anchors"].as_u64().unwrap();
    assert!((1..=5).contains(&anchors), "{stats}");
    assert_eq!(
        stats["registered"].as_u64().unwrap() + anchors,
        120,
        "{stats}"
    );

    // Statistics and a reason for every dropped frame.
    let stats = json(&dir.join("stats.json"));
    let kept = stats["frames_kept"].as_u64().unwrap();
    assert_eq!(stats["frames"], 120);
    assert!(kept > 60, "{stats}");
    assert!(stats["slots"].as_u64().unwrap() >= 15, "{stats}");
    assert!(
        stats["tracks"].as_u64() > stats["slots"].as_u64(),
        "false positives make short tracks: {stats}"
    );
    let dropped = json(&dir.join("dropped_frames.json"));
    assert_eq!(dropped.as_array().unwrap().len() as u64, 120 - kept);
    for d in dropped.as_array().unwrap() {
        assert!(
            ["no_visible_slots", "avm_no_result", "avm_disagrees"]
                .contains(&d["dropped"].as_str().unwrap()),
            "{d}"
        );
        assert!(!d["detail"].as_str().unwrap().is_empty());
    }

    // COCO keypoints: an image per kept frame (rendered), four keypoints per slot.
    let coco = json(&dir.join("coco_keypoints.json"));
    let images = coco["images"].as_array().unwrap();
    assert_eq!(images.len() as u64, kept);
    for img in images {
        assert!(
            dir.join(img["file_name"].as_str().unwrap()).is_file(),
            "{img}"
        );
    }
    let anns = coco["annotations"].as_array().unwrap();
    assert_eq!(
        anns.len() as u64,
        stats["label_instances"].as_u64().unwrap()
    );
    for a in anns {
        assert_eq!(a["keypoints"].as_array().unwrap().len(), 12);
        assert_eq!(a["num_keypoints"], 4);
        assert!(
            a["area"].as_f64().unwrap() > 100.0,
            "a slot is ~13 m^2 = 1300 px: {a}"
        );
    }
    assert_eq!(
        coco["categories"][0]["keypoints"].as_array().unwrap().len(),
        4
    );

    // Label Studio: a task per kept frame, polygons in percent with scores.
    let ls = json(&dir.join("label_studio.json"));
    assert_eq!(ls.as_array().unwrap().len() as u64, kept);
    let r = &ls[0]["predictions"][0]["result"][0];
    assert_eq!(r["type"], "polygonlabels");
    assert!(r["score"].as_f64().unwrap() > 0.0);
    for p in r["value"]["points"].as_array().unwrap() {
        let x = p[0].as_f64().unwrap();
        assert!((-50.0..=150.0).contains(&x), "{p}");
    }

    // The picture.
    let svg = std::fs::read_to_string(dir.join("report.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("data:image/png;base64,"));
    assert!(svg.matches("<title>slot ").count() as u64 == stats["slots"].as_u64().unwrap());
    assert!(
        std::fs::read_to_string(dir.join("report.html"))
            .unwrap()
            .contains(&svg[..200])
    );

    // The labels page and its JSON twin: the clip's stages, done, with the picture embedded.
    let auth = format!("Bearer {}", stack.keys.developer);
    let get = |path: &str| {
        support::ci::http(
            stack.http,
            "GET",
            path,
            &[("Authorization", auth.as_str())],
            b"",
        )
    };
    let (status, body) = get("/api/v1/labels");
    assert_eq!(status, 200, "{body}");
    let jobs: serde_json::Value = serde_json::from_str(&body).unwrap();
    let job = &jobs[0];
    let states: Vec<(&str, &str)> = job
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["stage"].as_str().unwrap(), s["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [
            ("mapping", "done"),
            ("prelabel", "done"),
            ("annotate", "done")
        ],
        "{job}"
    );
    assert_eq!(job[2]["output"], dir.display().to_string());
    let id = job[0]["job_id"].as_str().unwrap().to_string();
    let (status, picture) = get(&format!("/labels/{id}/report.svg"));
    assert_eq!(
        (status, picture.len()),
        (200, svg.len()),
        "the clip's own picture"
    );
    let (_, page) = get("/labels");
    assert!(
        page.contains(&format!("src=\"/labels/{id}/report.svg\""))
            && page.contains(job[0]["clip_id"].as_str().unwrap()),
        "{page}"
    );
    let browser = support::browser::Browser::start();
    browser.login(&format!("http://{}", stack.http), &stack.keys.developer);
    browser.go(&format!("http://{}/labels", stack.http));
    assert_eq!(
        browser.find_all("img.report").len(),
        1,
        "{}",
        browser.text()
    );
    assert!(browser.text().contains("annotate"));
    browser.screenshot("labels");

    // The same clip again: every stage reuses its output.
    let again = label_run(&stack, &clip, &[]);
    let out2 = text(&again);
    assert!(again.status.success(), "{out2}");
    assert_eq!(out2.matches("(cached").count(), 3, "{out2}");
    assert_eq!(annotate_dir(&out2), dir);

    // Other annotate parameters: mapping and prelabel are reused, annotate writes a new version
    // beside the old one.
    let narrow = label_run(&stack, &clip, &["--visible-m", "7"]);
    let out3 = text(&narrow);
    assert!(narrow.status.success(), "{out3}");
    assert_eq!(out3.matches("(cached").count(), 2, "{out3}");
    let dir3 = annotate_dir(&out3);
    assert_ne!(dir3, dir);
    assert!(dir.join("manifest.json").is_file() && dir3.join("manifest.json").is_file());
    let w3 = json(&dir3.join("coco_keypoints.json"))["images"][0]["width"].as_u64();
    assert_eq!(
        w3,
        Some(560),
        "7 m at 0.025 m/px (4 px a 0.1 m raster cell)"
    );

    // A malformed detections file fails the prelabel stage, naming the clip and the frame.
    let bad = synth_clip(clips.path(), 8, 40);
    let path = bad.join("detections/avm.json");
    let mut v = json(&path);
    v["frames"][5]["index"] = 77.into();
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let failed = label_run(&stack, &bad, &[]);
    let out4 = text(&failed);
    assert!(!failed.status.success(), "{out4}");
    assert!(
        out4.contains("prelabel  FAILED: clip synth-angled-s8, frame 77"),
        "{out4}"
    );
    // The stack goes on serving.
    let fine = label_run(&stack, &synth_clip(clips.path(), 9, 40), &[]);
    assert!(fine.status.success(), "{}", text(&fine));
}

#[test]
fn label_run_without_a_stack_runs_the_pipeline_in_process_and_refuses_bad_clips() {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip");
    let synth = Command::new(env!("CARGO_BIN_EXE_motorpool"))
        .args([
            "label", "synth", "--seed", "3", "--layout", "parallel", "--frames", "60", "--out",
        ])
        .arg(&clip)
        .output()
        .unwrap();
    assert!(synth.status.success(), "{}", text(&synth));
    assert!(text(&synth).contains("60 frames"), "{}", text(&synth));

    let run = Command::new(env!("CARGO_BIN_EXE_motorpool"))
        .args(["label", "run"])
        .arg(&clip)
        .arg("--data-dir")
        .arg(dir.path().join("labels"))
        .env_remove("MOTORPOOL_NATS_URL")
        .output()
        .unwrap();
    let out = text(&run);
    assert!(run.status.success(), "{out}");
    assert!(out.contains("Labeled clip synth-parallel-s3"), "{out}");
    assert!(annotate_dir(&out).join("coco_keypoints.json").is_file());

    // A frame missing from clip.json: refused before anything is queued.
    let manifest = clip.join("clip.json");
    let mut v = json(&manifest);
    v["frames"].as_array_mut().unwrap().remove(10);
    std::fs::write(&manifest, serde_json::to_vec(&v).unwrap()).unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_motorpool"))
        .args(["label", "run"])
        .arg(&clip)
        .env_remove("MOTORPOOL_NATS_URL")
        .output()
        .unwrap();
    let out = text(&run);
    assert!(!run.status.success());
    assert!(
        out.contains("clip synth-parallel-s3, frame 10: frame 10 is missing"),
        "{out}"
    );
}

#[test]
fn a_lot_is_labeled_in_one_run_with_its_settings_recorded_and_bad_clips_refused() {
    let dir = tempfile::tempdir().unwrap();
    let lot = dir.path().join("lot-b");
    synth_clip(&lot, 4, 40);
    synth_clip(&lot, 5, 40);
    // A clip whose manifest lost frame 10: refused with its reason, the others go on.
    let bad = synth_clip(&lot, 6, 30);
    let manifest = bad.join("clip.json");
    let mut v = json(&manifest);
    v["frames"].as_array_mut().unwrap().remove(10);
    std::fs::write(&manifest, serde_json::to_vec(&v).unwrap()).unwrap();
    let settings = dir.path().join("lot-b.toml");
    std::fs::write(
        &settings,
        "min_hits = 4\nmax_overlap = 0.3\navm_range_m = 4.5\nmin_paint_share = 0.3\n",
    )
    .unwrap();
    let label = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_motorpool"))
            .args(["label", "run"])
            .args(args)
            .arg("--data-dir")
            .arg(dir.path().join("labels"))
            .env_remove("MOTORPOOL_NATS_URL")
            .output()
            .unwrap()
    };
    let summary = dir.path().join("summary.json");
    let lot_arg = lot.display().to_string();
    let (settings_arg, summary_arg) = (
        settings.display().to_string(),
        summary.display().to_string(),
    );
    let run = label(&[
        &lot_arg,
        "--config",
        &settings_arg,
        "--max-overlap",
        "0.2",
        "--register",
        "false",
        "--summary",
        &summary_arg,
    ]);
    let out = text(&run);
    assert!(!run.status.success(), "one clip was refused: {out}");
    assert!(out.contains("1 of 3 clips were not labeled"), "{out}");
    assert!(out.contains("2 of 3 clips labeled"), "{out}");
    assert!(out.contains("[2/2 clips done]"), "{out}");
    let rows = json(&summary);
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    let status = |id: &str| {
        rows.iter()
            .find(|r| r["clip"].as_str().unwrap().ends_with(id))
            .unwrap_or_else(|| panic!("no row for {id}: {rows:?}"))
    };
    let refused = status("synth-angled-s6");
    assert_eq!(refused["status"], "refused");
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("frame 10: frame 10 is missing"),
        "{refused}"
    );
    for id in ["synth-angled-s4", "synth-angled-s5"] {
        let row = status(id);
        assert_eq!(row["status"], "labeled", "{row}");
        assert!(row["stats"]["slots"].as_u64().unwrap() > 0, "{row}");
        // The settings in force: the file's, the flag over the file's, the defaults.
        let out = Path::new(row["output"].as_str().unwrap());
        let params = &json(&out.join("manifest.json"))["params"];
        assert_eq!(params["min_hits"], 4, "{params}");
        assert_eq!(params["max_overlap"], 0.2, "{params}");
        assert_eq!(params["avm_range_m"], 4.5, "{params}");
        assert_eq!(params["gate_m"], 1.0, "{params}");
        assert_eq!(params["min_paint_share"], 0.3, "{params}");
        assert_eq!(params["register"], false, "{params}");
        // Registration off: the mapping stage kept the clip's poses and said so.
        let version = mapping_output(out);
        let poses = json(&version.join("poses.json"));
        assert_eq!(poses["registered"], false, "{poses}");
        assert_eq!(json(&version.join("mapping.json"))["registered"], 0);
    }

    // Settings that cannot be right are refused before anything is queued.
    std::fs::write(&settings, "min_hit = 4\n").unwrap();
    let run = label(&[&lot_arg, "--config", &settings_arg]);
    assert!(!run.status.success());
    assert!(
        text(&run).contains("unknown field `min_hit`"),
        "{}",
        text(&run)
    );
    assert!(!text(&run).contains("Queued clip"), "{}", text(&run));
    let run = label(&[&lot_arg, "--min-observed-share", "1.5"]);
    assert!(
        text(&run).contains("min_observed_share is a share and must lie in 0..=1, not 1.5"),
        "{}",
        text(&run)
    );
    // A list names clips relative to itself; a directory holding no clip says so.
    let list = dir.path().join("tonight.txt");
    std::fs::write(&list, "# tonight\nlot-b/synth-angled-s4   # the first\n\n").unwrap();
    let list_arg = list.display().to_string();
    let run = label(&["--list", &list_arg]);
    assert!(run.status.success(), "{}", text(&run));
    assert!(text(&run).contains("Labeled clip synth-angled-s4"));
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let run = label(&[&empty.display().to_string()]);
    assert!(
        text(&run).contains("is neither a clip (no clip.json) nor a lot of clips"),
        "{}",
        text(&run)
    );
}
