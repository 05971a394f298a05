//! The documented clip format (docs/labeling.md, docs/schema/*.schema.json, docs/examples/clip)
//! and the reader agree: the example clip and what `label synth` writes pass the schemas and
//! open; broken documents fail both the schema and the reader.

use motorpool_labeling::Clip;
use motorpool_labeling::synth::{Layout, SynthOptions, generate};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

fn docs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs")
}

fn schema(name: &str) -> jsonschema::Validator {
    let path = docs().join("schema").join(name);
    let schema: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    jsonschema::meta::validate(&schema).unwrap_or_else(|e| panic!("{name} is no schema: {e}"));
    jsonschema::validator_for(&schema).unwrap()
}

fn read(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn errors(v: &jsonschema::Validator, doc: &Value) -> Vec<String> {
    v.iter_errors(doc).map(|e| e.to_string()).collect()
}

/// Copies a clip directory (flat files and one level of subdirectories).
fn copy_clip(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
            copy_clip(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[test]
fn the_documented_example_clip_and_synthetic_clips_pass_the_schemas_and_open() {
    let (clip_schema, slots_schema) = (schema("clip.schema.json"), schema("slots.schema.json"));
    let example = docs().join("examples/clip");
    let synth_dir = tempfile::tempdir().unwrap();
    generate(&SynthOptions {
        seed: 2,
        layout: Layout::Angled,
        frames: 20,
        ..Default::default()
    })
    .write(synth_dir.path())
    .unwrap();
    for dir in [example.as_path(), synth_dir.path()] {
        let manifest = read(&dir.join("clip.json"));
        assert_eq!(errors(&clip_schema, &manifest), Vec::<String>::new());
        for file in ["detections/bevslots.json", "detections/avm.json"] {
            assert_eq!(
                errors(&slots_schema, &read(&dir.join(file))),
                Vec::<String>::new(),
                "{file}"
            );
        }
        let clip = Clip::open(dir).unwrap();
        assert_eq!(clip.id(), manifest["clip_id"]);
        let bevslots = clip.slots("detections/bevslots.json").unwrap();
        assert!(bevslots.iter().flatten().count() > 0);
        clip.slots("detections/avm.json").unwrap();
    }
    // The example shows what the docs say it does: 4 frames, AVM without frame 1, a detection
    // starting at the far side.
    let clip = Clip::open(&example).unwrap();
    assert_eq!(clip.frames().len(), 4);
    assert!(clip.slots("detections/avm.json").unwrap()[1].is_none());
    let doc = std::fs::read_to_string(docs().join("labeling.md")).unwrap();
    assert!(doc.contains("\"clip_id\": \"example-lot-a-0001\""));
}

#[test]
fn documents_the_schemas_refuse_the_reader_refuses_too() {
    let clip_schema = schema("clip.schema.json");
    let slots_schema = schema("slots.schema.json");
    let example = docs().join("examples/clip");
    let manifest = read(&example.join("clip.json"));
    let detections = read(&example.join("detections/bevslots.json"));
    type Edit = fn(&mut Value);
    let broken_manifests: [(&str, Edit); 5] = [
        ("a points path leaving the clip", |m| {
            m["frames"][0]["points"] = json!("../../etc/passwd")
        }),
        ("an absolute points path", |m| {
            m["frames"][1]["points"] = json!("/etc/passwd")
        }),
        ("a clip id naming a directory elsewhere", |m| {
            m["clip_id"] = json!("../x")
        }),
        ("no frames", |m| m["frames"] = json!([])),
        ("another format", |m| {
            m["format"] = json!("motorpool.clip.v2")
        }),
    ];
    let broken_slots: [(&str, Edit); 4] = [
        ("three corners", |d| {
            d["frames"][0]["slots"][0]["corners"]
                .as_array_mut()
                .unwrap()
                .pop();
        }),
        ("a score over 1", |d| {
            d["frames"][0]["slots"][0]["score"] = json!(1.5)
        }),
        ("a corner that is null (NaN written by a tool)", |d| {
            d["frames"][0]["slots"][0]["corners"][2][0] = Value::Null
        }),
        ("another format", |d| {
            d["format"] = json!("motorpool.slots.v0")
        }),
    ];
    for (what, edit) in broken_manifests {
        let dir = tempfile::tempdir().unwrap();
        copy_clip(&example, dir.path());
        let mut m = manifest.clone();
        edit(&mut m);
        assert!(!clip_schema.is_valid(&m), "the schema takes {what}");
        std::fs::write(
            dir.path().join("clip.json"),
            serde_json::to_vec(&m).unwrap(),
        )
        .unwrap();
        assert!(Clip::open(dir.path()).is_err(), "the reader takes {what}");
    }
    for (what, edit) in broken_slots {
        let dir = tempfile::tempdir().unwrap();
        copy_clip(&example, dir.path());
        let mut d = detections.clone();
        edit(&mut d);
        assert!(!slots_schema.is_valid(&d), "the schema takes {what}");
        std::fs::write(
            dir.path().join("detections/bevslots.json"),
            serde_json::to_vec(&d).unwrap(),
        )
        .unwrap();
        let clip = Clip::open(dir.path()).unwrap();
        assert!(
            clip.slots("detections/bevslots.json").is_err(),
            "the reader takes {what}"
        );
    }
}
