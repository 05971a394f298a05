//! Versioned stage outputs: `<root>/<clip id>/<stage>/v<version>-<input hash>/`.
//!
//! The input hash covers everything a stage's output depends on (the content of its input files,
//! the earlier stages' output keys, the parameters it uses). So a re-run with the same inputs
//! finds its output and recomputes nothing, and a re-run of another version or other inputs
//! writes beside it, never over it. A stage writes into a temporary sibling directory and renames
//! it into place with its `manifest.json`: an output directory is complete or absent.

use motorpool_messages::label::Stage;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Written last into every output directory.
pub const MANIFEST: &str = "manifest.json";

/// What an output directory holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputManifest {
    pub clip_id: String,
    pub stage: Stage,
    pub version: u32,
    pub key: String,
    pub job_id: String,
    pub created_ms: u64,
    pub elapsed_ms: u64,
    /// Files and their sizes, relative to the directory.
    pub files: Vec<(String, u64)>,
    /// The job's settings (every fusion and AVM knob) this output was made with; absent in
    /// outputs written before they were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<motorpool_messages::label::LabelParams>,
}

/// Builds an input hash.
#[derive(Debug, Default)]
pub struct InputHash(blake3::Hasher);

impl InputHash {
    pub fn new(stage: Stage, version: u32) -> InputHash {
        let mut h = blake3::Hasher::new();
        h.update(stage.name().as_bytes());
        h.update(&version.to_le_bytes());
        InputHash(h)
    }

    /// A labelled value (parameters, an earlier output key).
    pub fn value(&mut self, label: &str, v: &impl Serialize) -> &mut Self {
        self.0.update(label.as_bytes());
        let bytes = serde_json::to_vec(v).unwrap_or_default();
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(&bytes);
        self
    }

    /// The content of a file (its name relative to `base` and its bytes).
    pub fn file(&mut self, base: &Path, rel: &str) -> std::io::Result<&mut Self> {
        let mut f = std::fs::File::open(base.join(rel))?;
        self.0.update(rel.as_bytes());
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            self.0.update(&buf[..n]);
        }
        self.0.update(b"\0");
        Ok(self)
    }

    /// 16 bytes of the hash as 32 hex characters.
    pub fn finish(&self) -> String {
        hex::encode(&self.0.finalize().as_bytes()[..16])
    }
}

/// Where a stage's output for `key` lives.
pub fn output_dir(root: &Path, clip_id: &str, stage: Stage, version: u32, key: &str) -> PathBuf {
    root.join(clip_id)
        .join(stage.name())
        .join(format!("v{version}-{key}"))
}

/// The manifest of a complete output directory.
pub fn read_manifest(dir: &Path) -> Option<OutputManifest> {
    let bytes = std::fs::read(dir.join(MANIFEST)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Lists the files of `dir` (recursively, relative names, sorted).
pub fn list_files(dir: &Path) -> std::io::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let ty = e.file_type()?;
            if ty.is_dir() {
                stack.push(e.path());
            } else if ty.is_file() {
                let rel = e
                    .path()
                    .strip_prefix(dir)
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                out.push((rel, e.metadata()?.len()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Moves a finished temporary directory into place with its manifest. Returns false when another
/// run finished the same output first (the temporary directory is removed; theirs stands).
pub fn commit(tmp: &Path, dir: &Path, manifest: &OutputManifest) -> std::io::Result<bool> {
    let mut manifest = manifest.clone();
    manifest.files = list_files(tmp)?;
    std::fs::write(
        tmp.join(MANIFEST),
        serde_json::to_vec_pretty(&manifest).unwrap_or_default(),
    )?;
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if read_manifest(dir).is_some() {
        std::fs::remove_dir_all(tmp)?;
        return Ok(false);
    }
    // A directory without a manifest is the leftover of a crash: replace it.
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    match std::fs::rename(tmp, dir) {
        Ok(()) => Ok(true),
        Err(_) if read_manifest(dir).is_some() => {
            std::fs::remove_dir_all(tmp)?;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_inputs_and_commit_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"one").unwrap();
        let key = |params: u32| {
            InputHash::new(Stage::Mapping, 1)
                .value("params", &params)
                .file(dir.path(), "a")
                .unwrap()
                .finish()
        };
        let k1 = key(1);
        assert_eq!(k1, key(1));
        assert_ne!(k1, key(2));
        std::fs::write(dir.path().join("a"), b"two").unwrap();
        assert_ne!(k1, key(1), "changed input, changed key");

        let root = dir.path().join("store");
        let out = output_dir(&root, "clip", Stage::Mapping, 1, &k1);
        let manifest = OutputManifest {
            clip_id: "clip".into(),
            stage: Stage::Mapping,
            version: 1,
            key: k1.clone(),
            job_id: "j1".into(),
            created_ms: 0,
            elapsed_ms: 0,
            files: vec![],
            params: None,
        };
        let tmp1 = dir.path().join("tmp1");
        std::fs::create_dir_all(&tmp1).unwrap();
        std::fs::write(tmp1.join("x"), b"first").unwrap();
        assert!(commit(&tmp1, &out, &manifest).unwrap());
        let tmp2 = dir.path().join("tmp2");
        std::fs::create_dir_all(&tmp2).unwrap();
        std::fs::write(tmp2.join("x"), b"second").unwrap();
        assert!(!commit(&tmp2, &out, &manifest).unwrap());
        assert_eq!(std::fs::read(out.join("x")).unwrap(), b"first");
        assert!(!tmp2.exists());
        assert_eq!(read_manifest(&out).unwrap().files, [("x".to_string(), 5)]);
    }
}
