//! The review round trip with the labeling tools. A real Label Studio (PyPI `label-studio`,
//! installed by `scripts/setup --test`, started here) takes the shipped labeling config, imports
//! a clip's tasks with their predictions and serves their images from the label store;
//! reviewers' corrections made through its API come back through its own export, and
//! `motorpool label import` reads them as a new label version with the diff. CVAT cannot run
//! here: its path is checked with the COCO keypoints package, edited as a CVAT reviewer's export
//! would be.

mod support;

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::text;

fn motorpool(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_motorpool"))
        .args(args)
        .env_remove("MOTORPOOL_NATS_URL")
        .output()
        .unwrap()
}

fn json_file(path: &Path) -> Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

/// Width and height of a PNG, from its header.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

/// A Label Studio server with one user, stopped when dropped.
struct LabelStudio {
    child: Child,
    base: String,
    agent: ureq::Agent,
    log: PathBuf,
}

const TOKEN: &str = "0123456789abcdef0123456789abcdef01234567";

impl LabelStudio {
    /// Starts Label Studio serving local files under `document_root`.
    fn start(document_root: &Path, data: &Path) -> LabelStudio {
        let program = support::which("label-studio")
            .or_else(|| {
                let venv = Path::new(&std::env::var("HOME").unwrap_or_default())
                    .join(".local/share/motorpool/label-studio/bin/label-studio");
                venv.is_file().then_some(venv)
            })
            .expect("label-studio is required (scripts/setup --test installs it)");
        let port = support::free_addr().port();
        std::fs::create_dir_all(data).unwrap();
        let log = data.join("label-studio.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .args([
                "start",
                "--no-browser",
                "--port",
                &port.to_string(),
                "--data-dir",
            ])
            .arg(data)
            .env("LABEL_STUDIO_BASE_DATA_DIR", data)
            .env("LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED", "true")
            .env("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", document_root)
            .env("LABEL_STUDIO_USERNAME", "reviewer@example.com")
            .env("LABEL_STUDIO_PASSWORD", "a-reviewers-password")
            .env("LABEL_STUDIO_USER_TOKEN", TOKEN)
            .env("LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN", "true")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start label-studio");
        let ls = LabelStudio {
            child,
            base: format!("http://127.0.0.1:{port}"),
            agent: ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(60)))
                .http_status_as_error(false)
                .build()
                .new_agent(),
            log,
        };
        let start = Instant::now();
        let up = || {
            ls.agent
                .get(format!("{}/health", ls.base))
                .call()
                .is_ok_and(|r| r.status().as_u16() == 200)
        };
        while !up() {
            assert!(
                start.elapsed() < Duration::from_secs(180),
                "Label Studio did not start:\n{}",
                std::fs::read_to_string(&ls.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        eprintln!("Label Studio up in {:.1} s", start.elapsed().as_secs_f64());
        ls
    }

    /// An API call with the user's token: (status, body).
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Vec<u8>) {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        let auth = format!("Token {TOKEN}");
        let r = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            (_, body) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .header("Content-Type", "application/json")
                .send(body.cloned().unwrap_or(json!({})).to_string()),
        };
        let mut r = r.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = r.status().as_u16();
        let bytes = r
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .unwrap();
        (status, bytes)
    }

    fn json(&self, method: &str, path: &str, body: Option<&Value>, want: u16) -> Value {
        let (status, bytes) = self.call(method, path, body);
        assert_eq!(
            status,
            want,
            "{method} {path}: {}",
            String::from_utf8_lossy(&bytes)
        );
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    }
}

impl Drop for LabelStudio {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Labels a synthetic clip in process; the annotate output directory.
fn labeled_clip(dir: &Path) -> PathBuf {
    let clip = dir.join("clip");
    let synth = motorpool(&[
        "label",
        "synth",
        "--seed",
        "7",
        "--layout",
        "angled",
        "--frames",
        "40",
        "--out",
        clip.to_str().unwrap(),
    ]);
    assert!(synth.status.success(), "{}", text(&synth));
    let run = motorpool(&[
        "label",
        "run",
        clip.to_str().unwrap(),
        "--data-dir",
        dir.join("labels").to_str().unwrap(),
    ]);
    let out = text(&run);
    assert!(run.status.success(), "{out}");
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("picture"))
        .unwrap_or_else(|| panic!("no picture line in:\n{out}"));
    Path::new(line.split_whitespace().last().unwrap())
        .parent()
        .unwrap()
        .to_path_buf()
}

fn import(labels: &Path, kind: &str, export: &Path) -> Output {
    motorpool(&[
        "label",
        "import",
        labels.to_str().unwrap(),
        kind,
        export.to_str().unwrap(),
    ])
}

/// The one review version directory whose `review.json` names `export`.
fn review_dir(labels: &Path, export: &Path) -> PathBuf {
    let root = labels.parent().unwrap().parent().unwrap().join("review");
    std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|d| {
            json_file(&d.join("review.json"))["export"].as_str()
                == Some(std::fs::canonicalize(export).unwrap().to_str().unwrap())
        })
        .unwrap_or_else(|| panic!("no review of {}", export.display()))
}

#[test]
fn reviews_in_label_studio_come_back_as_a_new_version_with_the_diff() {
    let dir = tempfile::tempdir().unwrap();
    let labels = labeled_clip(dir.path());
    let store = dir.path().join("labels");

    // What reviewers get: images big enough to review, a copy with the labels drawn, polygons
    // inside the image, the labeling config, and the CVAT package.
    let tasks = json_file(&labels.join("label_studio.json"));
    let tasks = tasks.as_array().unwrap();
    assert!(tasks.len() >= 30, "{} tasks", tasks.len());
    let first = &tasks[0]["data"];
    let frame_png = std::fs::read(first["image_path"].as_str().unwrap()).unwrap();
    assert_eq!(png_size(&frame_png), (800, 800));
    let labeled_png = std::fs::read(labels.join(format!(
        "frames_labeled/{:06}.png",
        first["frame"].as_u64().unwrap()
    )))
    .unwrap();
    assert_eq!(png_size(&labeled_png), (800, 800));
    let mut polygons = 0;
    for t in tasks {
        for r in t["predictions"][0]["result"].as_array().unwrap() {
            polygons += 1;
            for p in r["value"]["points"].as_array().unwrap() {
                for v in p.as_array().unwrap() {
                    let v = v.as_f64().unwrap();
                    assert!((0.0..=100.0).contains(&v), "a point outside the image: {r}");
                }
            }
        }
    }
    assert!(polygons > 100, "{polygons} polygons");

    let ls = LabelStudio::start(&store, &dir.path().join("label-studio"));
    // Label Studio validates a project's labeling config: ours passes, a broken one does not.
    let config = std::fs::read_to_string(labels.join("label_studio_config.xml")).unwrap();
    let broken = config.replace("toName=\"image\"", "toName=\"picture\"");
    ls.json(
        "POST",
        "/api/projects",
        Some(&json!({"title": "broken config", "label_config": broken})),
        400,
    );
    let project = ls.json(
        "POST",
        "/api/projects",
        Some(&json!({"title": "parking slots", "label_config": config})),
        201,
    )["id"]
        .as_u64()
        .unwrap();
    // The images are served from the label store once a local storage covers them.
    ls.json(
        "POST",
        "/api/storages/localfiles",
        Some(
            &json!({"project": project, "title": "frames", "use_blob_urls": false,
                      "path": labels.join("frames").to_str().unwrap()}),
        ),
        201,
    );
    let imported = ls.json(
        "POST",
        &format!("/api/projects/{project}/import"),
        Some(&Value::Array(tasks.clone())),
        201,
    );
    assert_eq!(imported["task_count"], tasks.len(), "{imported}");
    assert_eq!(imported["prediction_count"], tasks.len(), "{imported}");
    let served = ls.json(
        "GET",
        &format!("/api/tasks?project={project}&fields=all&page_size=1000"),
        None,
        200,
    );
    let served: Vec<Value> = match served {
        Value::Array(a) => a,
        v => v["tasks"].as_array().cloned().unwrap_or_default(),
    };
    assert_eq!(served.len(), tasks.len());
    let (status, png) = ls.call("GET", served[0]["data"]["image"].as_str().unwrap(), None);
    assert_eq!(status, 200, "Label Studio serves the task's image");
    assert_eq!(png_size(&png), (800, 800));

    // Reviewers at work, on tasks with at least three whole polygons.
    let whole = |t: &Value| -> Vec<usize> {
        let r = t["predictions"][0]["result"].as_array().unwrap();
        (0..r.len())
            .filter(|&i| r[i]["meta"]["clipped"] == false)
            .collect()
    };
    let mut candidates = served.iter().filter(|t| whole(t).len() >= 3);
    let mut pick = || candidates.next().expect("a task with three whole slots");
    let (moved, edited, accepted, reordered, cancelled) = (pick(), pick(), pick(), pick(), pick());
    let slot_of =
        |t: &Value, i: usize| t["predictions"][0]["result"][i]["meta"]["slot_id"].as_u64();
    let annotate = |t: &Value, result: Value, cancelled: bool| {
        ls.json(
            "POST",
            &format!("/api/tasks/{}/annotations", t["id"]),
            Some(&json!({"result": result, "was_cancelled": cancelled})),
            201,
        );
    };
    let prediction = |t: &Value| t["predictions"][0]["result"].clone();
    // One slot moved 1% of the image to the right: 8 px, 0.2 m.
    let mut r = prediction(moved);
    let i_moved = whole(moved)[0];
    for p in r[i_moved]["value"]["points"].as_array_mut().unwrap() {
        p[0] = json!(p[0].as_f64().unwrap() + 1.0);
    }
    annotate(moved, r, false);
    // One slot deleted, one the machine missed drawn in (where the car is: no slot there).
    let mut r = prediction(edited);
    let i_deleted = whole(edited)[1];
    let deleted_slot = slot_of(edited, i_deleted);
    r.as_array_mut().unwrap().remove(i_deleted);
    r.as_array_mut().unwrap().push(json!({
        "from_name": "slot", "to_name": "image", "type": "polygonlabels",
        "original_width": 800, "original_height": 800, "image_rotation": 0,
        "value": {"points": [[46.0, 45.0], [54.0, 45.0], [54.0, 55.0], [46.0, 55.0]],
                  "polygonlabels": ["parking_slot"], "closed": true},
    }));
    annotate(edited, r, false);
    annotate(accepted, prediction(accepted), false);
    // One slot's corners put in another order: the far side named first.
    let mut r = prediction(reordered);
    let i_reordered = whole(reordered)[2];
    r[i_reordered]["value"]["points"]
        .as_array_mut()
        .unwrap()
        .rotate_left(2);
    annotate(reordered, r, false);
    // A review given up on counts as none.
    annotate(cancelled, json!([]), true);

    let (status, export) = ls.call(
        "GET",
        &format!("/api/projects/{project}/export?exportType=JSON"),
        None,
    );
    assert_eq!(status, 200);
    let export_path = dir.path().join("label-studio-export.json");
    std::fs::write(&export_path, &export).unwrap();
    drop(ls);

    let run = import(&labels, "--label-studio", &export_path);
    let out = text(&run);
    assert!(run.status.success(), "{out}");
    assert!(
        out.contains("Imported the review of clip synth-angled-s7"),
        "{out}"
    );
    assert!(
        out.contains(&format!("4 frames reviewed, {} not", tasks.len() - 4)),
        "{out}"
    );
    let review = review_dir(&labels, &export_path);
    let diff = json_file(&review.join("diff.json"));
    let s = &diff["summary"];
    assert_eq!(
        (&s["moved"], &s["reordered"], &s["added"], &s["deleted"]),
        (&json!(2), &json!(1), &json!(1), &json!(1)),
        "{s}"
    );
    let frame_of = |t: &Value| t["data"]["frame"].clone();
    let slots_of = |frame: Value| -> Vec<Value> {
        diff["frames"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["frame"] == frame)
            .unwrap_or_else(|| panic!("frame {frame} not in the diff"))["slots"]
            .as_array()
            .unwrap()
            .clone()
    };
    let moved_slot = slots_of(frame_of(moved))
        .into_iter()
        .find(|x| x["change"] == "moved")
        .unwrap();
    assert_eq!(moved_slot["slot_id"].as_u64(), slot_of(moved, i_moved));
    let d = moved_slot["moved_m"].as_f64().unwrap();
    assert!((d - 0.2).abs() < 0.005, "moved {d} m, not 0.2");
    let edited_slots = slots_of(frame_of(edited));
    assert!(
        edited_slots
            .iter()
            .any(|x| x["change"] == "deleted" && x["slot_id"].as_u64() == deleted_slot)
    );
    assert!(edited_slots.iter().any(|x| x["change"] == "added"));
    assert!(
        slots_of(frame_of(accepted))
            .iter()
            .all(|x| x["change"] == "unchanged")
    );
    let turned = slots_of(frame_of(reordered))
        .into_iter()
        .find(|x| x["reordered"] == true)
        .unwrap();
    assert_eq!(turned["slot_id"].as_u64(), slot_of(reordered, i_reordered));
    assert!(turned["moved_m"].as_f64().unwrap() < 0.01);
    // The new version holds the reviewed labels: the deleted slot is gone, the added one there.
    let reviewed = json_file(&review.join("labels.json"));
    assert_eq!(reviewed["format"], "motorpool.reviewed-labels.v1");
    let frame = reviewed["frames"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["frame"] == frame_of(edited))
        .unwrap();
    assert_eq!(
        frame["slots"].as_array().unwrap().len(),
        edited["predictions"][0]["result"].as_array().unwrap().len()
    );
    // The same export again: the same version, found.
    let again = import(&labels, "--label-studio", &export_path);
    assert!(
        text(&again).contains("Found (imported before)"),
        "{}",
        text(&again)
    );

    // Exports that do not fit these labels are refused and write nothing.
    let mut other = serde_json::from_slice::<Value>(&export).unwrap();
    other[0]["data"]["clip_id"] = json!("another-clip");
    let other_path = dir.path().join("other.json");
    std::fs::write(&other_path, other.to_string()).unwrap();
    let run = import(&labels, "--label-studio", &other_path);
    assert!(!run.status.success());
    assert!(
        text(&run).contains(
            "tasks of clip \"another-clip\"; these machine labels are of clip \"synth-angled-s7\""
        ),
        "{}",
        text(&run)
    );
    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, "{\"tasks\": [").unwrap();
    let run = import(&labels, "--label-studio", &garbage);
    assert!(text(&run).contains("is not valid JSON"), "{}", text(&run));
    let reviews = std::fs::read_dir(labels.parent().unwrap().parent().unwrap().join("review"))
        .unwrap()
        .count();
    assert_eq!(reviews, 1, "refused imports wrote nothing");

    // CVAT: the package's COCO keypoints, as a reviewer's export: one slot moved 10 px down
    // (0.25 m), one deleted.
    let zip = std::fs::read(labels.join("cvat_coco_keypoints.zip")).unwrap();
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zip)).unwrap();
    let mut coco = String::new();
    std::io::Read::read_to_string(
        &mut archive
            .by_name("annotations/person_keypoints_default.json")
            .unwrap(),
        &mut coco,
    )
    .unwrap();
    let images = json_file(&labels.join("coco_keypoints.json"))["images"]
        .as_array()
        .unwrap()
        .len();
    for i in 0..images {
        let png = archive.by_name(&format!("images/{:06}.png", {
            json_file(&labels.join("coco_keypoints.json"))["images"][i]["frame"]
                .as_u64()
                .unwrap()
        }));
        assert!(png.is_ok(), "image {i} is in the CVAT package");
    }
    let mut coco: Value = serde_json::from_str(&coco).unwrap();
    let annotations = coco["annotations"].as_array_mut().unwrap();
    let n = annotations.len();
    for k in annotations[0]["keypoints"]
        .as_array_mut()
        .unwrap()
        .chunks_mut(3)
    {
        k[1] = json!(k[1].as_f64().unwrap() + 10.0);
    }
    annotations.remove(n - 1);
    let cvat_export = dir.path().join("cvat-export.json");
    std::fs::write(&cvat_export, coco.to_string()).unwrap();
    let run = import(&labels, "--coco", &cvat_export);
    let out = text(&run);
    assert!(run.status.success(), "{out}");
    assert!(
        out.contains(&format!("{images} frames reviewed, 0 not")),
        "{out}"
    );
    assert!(
        out.contains(&format!("{} unchanged, 1 moved (mean 0.250 m", n - 2)),
        "{out}"
    );
    assert!(out.contains("0 added, 1 deleted"), "{out}");
}
