//! The projects file: which repositories may start CI jobs, with which secret, and which jobs
//! each event makes in which lane. It belongs to the platform's operators, not to the
//! repositories: a merge request cannot raise its own lane or make its results trusted by
//! editing a file in its branch (ADR 0011).
//!
//! ```toml
//! [[project]]
//! name = "av/monorepo"                 # GitLab path_with_namespace / GitHub full_name
//! forge = "gitlab"
//! secret_file = "monorepo.secret"      # relative to this file; mode 0600
//! trusted_branches = ["main", "release/*"]
//! release_labels = ["release"]
//! labels = { "priority::release" = "release", "priority::low" = "lint" }
//!
//! [[project.job]]
//! kind = "build"
//! targets = ["//..."]
//!
//! [[project.image]]                    # a fleet image built from each matching tag
//! name = "car"
//! dockerfile = "images/car/Dockerfile"
//! tags = ["v*"]
//! ```

use motorpool_messages::ci::{Forge, JobKind};
use motorpool_messages::exec::Lane;
use motorpool_messages::fleet::valid_id;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What kind of event a job template answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum On {
    MergeRequest,
    Push,
    Tag,
}

/// A job an event makes.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobTemplate {
    pub kind: JobKind,
    /// The Bazel command. Default: `test` for test jobs, `build` for the others.
    #[serde(default)]
    pub command: Option<String>,
    /// Default `//...`.
    #[serde(default = "all_targets")]
    pub targets: Vec<String>,
    #[serde(default)]
    pub flags: Vec<String>,
    /// Events that make this job. Default: tags for release jobs, merge requests and pushes to
    /// trusted branches for the others.
    #[serde(default)]
    pub on: Option<Vec<On>>,
}

fn all_targets() -> Vec<String> {
    vec!["//...".into()]
}

impl JobTemplate {
    pub fn command(&self) -> &str {
        self.command.as_deref().unwrap_or(match self.kind {
            JobKind::Test => "test",
            _ => "build",
        })
    }

    pub fn answers(&self, on: On) -> bool {
        match &self.on {
            Some(list) => list.contains(&on),
            None if self.kind == JobKind::Release => on == On::Tag,
            None => on != On::Tag,
        }
    }
}

/// A fleet image the project's tags build (`[[project.image]]`): the image builder makes it
/// from the tag's commit, into `channel`, as image `<name>-<tag>`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageTemplate {
    /// Short, unique within the project: the image id's first part and what API clients ask for.
    pub name: String,
    /// The Dockerfile and the build context, relative to the repository root.
    pub dockerfile: String,
    #[serde(default = "dot")]
    pub context: String,
    /// The release channel the image joins. Default `stable`.
    #[serde(default = "stable")]
    pub channel: String,
    /// Tags whose pushes build it: exact names, or a prefix ending in `*`. Default: every tag.
    #[serde(default = "every_tag")]
    pub tags: Vec<String>,
    #[serde(default)]
    pub build_args: BTreeMap<String, String>,
    /// The lane of the image builders' queue. Default `release`.
    #[serde(default = "release_lane", deserialize_with = "lane")]
    pub lane: Lane,
}

fn dot() -> String {
    ".".into()
}
fn stable() -> String {
    "stable".into()
}
fn every_tag() -> Vec<String> {
    vec!["*".into()]
}
fn release_lane() -> Lane {
    Lane::Release
}
fn lane<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Lane, D::Error> {
    let name = String::deserialize(d)?;
    Lane::from_name(&name).ok_or_else(|| {
        serde::de::Error::custom(format!("lane {name:?} is not release, build, test or lint"))
    })
}

/// True when `name` matches `pattern`: the same name, or a prefix ending in `*`.
pub fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    }
}

impl ImageTemplate {
    pub fn built_by(&self, tag: &str) -> bool {
        self.tags.iter().any(|p| matches(p, tag))
    }

    /// The id of the image built for `tag` at `commit`: `<name>-<tag>`, or `<name>-<12 hex of
    /// the commit>` when the tag has characters an image id may not (`/`, `+`, ...) or makes it
    /// longer than 27.
    pub fn image_id(&self, tag: &str, commit: &str) -> String {
        let id = format!("{}-{tag}", self.name);
        if valid_id(&id) {
            id
        } else {
            format!("{}-{}", self.name, &commit[..commit.len().min(12)])
        }
    }

    fn check(&self) -> Result<(), String> {
        // Room for `-` and 12 hex digits of a commit within an image id's 27.
        if !valid_id(&self.name) || self.name.len() > 14 {
            return Err(format!(
                "image name {:?} must be 1-14 of [A-Za-z0-9._-], not starting with '.'",
                self.name
            ));
        }
        if !valid_id(&self.channel) {
            return Err(format!(
                "image {:?}: channel {:?} is not a valid name",
                self.name, self.channel
            ));
        }
        for (what, path) in [("dockerfile", &self.dockerfile), ("context", &self.context)] {
            let p = Path::new(path);
            if path.is_empty()
                || p.is_absolute()
                || p.components().any(|c| c == std::path::Component::ParentDir)
            {
                return Err(format!(
                    "image {:?}: {what} {path:?} must be a path inside the repository",
                    self.name
                ));
            }
        }
        if self.tags.is_empty() {
            return Err(format!(
                "image {:?}: tags is empty, so no tag would build it",
                self.name
            ));
        }
        for k in self.build_args.keys() {
            if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!(
                    "image {:?}: build argument name {k:?} is not valid",
                    self.name
                ));
            }
        }
        Ok(())
    }
}

/// One project as written in the file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProjectEntry {
    name: String,
    forge: Forge,
    secret_file: PathBuf,
    /// Clone from here rather than from the URL the event names.
    #[serde(default)]
    clone_url: Option<String>,
    #[serde(default = "default_trusted")]
    trusted_branches: Vec<String>,
    #[serde(default = "default_release_labels")]
    release_labels: Vec<String>,
    /// Lane names (`release`, `build`, `test`, `lint`).
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default = "yes")]
    cancel_superseded: bool,
    #[serde(default, rename = "job")]
    jobs: Vec<JobTemplate>,
    #[serde(default, rename = "image")]
    images: Vec<ImageTemplate>,
}

fn default_trusted() -> Vec<String> {
    vec!["main".into(), "master".into()]
}
fn default_release_labels() -> Vec<String> {
    vec!["release".into()]
}
fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default, rename = "project")]
    projects: Vec<ProjectEntry>,
    #[serde(default, rename = "client")]
    clients: Vec<ClientEntry>,
}

/// An API client as written in the file: its token's SHA-256, never the token.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientEntry {
    id: String,
    sha256: String,
    #[serde(default)]
    projects: Vec<String>,
    #[serde(default = "default_client_lane")]
    max_lane: String,
    #[serde(default = "default_rate")]
    rate_per_minute: f64,
    #[serde(default = "default_burst")]
    burst: u32,
    #[serde(default)]
    images: bool,
}

fn default_client_lane() -> String {
    "build".into()
}
fn default_rate() -> f64 {
    30.0
}
fn default_burst() -> u32 {
    5
}

/// A client of `POST /api/v1/jobs`: who a bearer token is, what it may start, how often.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiClient {
    pub id: String,
    /// SHA-256 of its token.
    pub sha256: [u8; 32],
    /// Projects it may start jobs of; empty: all.
    pub projects: Vec<String>,
    /// The highest lane its jobs may ride (they ride their kind's lane, or a lower one asked
    /// for, never higher).
    pub max_lane: Lane,
    pub rate_per_minute: f64,
    pub burst: u32,
    /// Whether it may start image builds (`POST /api/v1/images`) of its projects' images.
    pub images: bool,
}

impl ApiClient {
    pub fn may_use(&self, project: &str) -> bool {
        self.projects.is_empty() || self.projects.iter().any(|p| p == project)
    }
}

/// What the projects file says: projects and API clients.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub projects: Vec<Project>,
    pub clients: Vec<ApiClient>,
}

/// A project, its secret read.
#[derive(Clone)]
pub struct Project {
    pub name: String,
    pub forge: Forge,
    pub secret: Vec<u8>,
    pub clone_url: Option<String>,
    /// Branches whose pushes build, trusted to write the action cache: exact names, or a
    /// prefix ending in `*`.
    pub trusted_branches: Vec<String>,
    /// Merge requests with one of these labels also get the release jobs.
    pub release_labels: Vec<String>,
    /// Merge-request label -> the lane all of that MR's jobs ride (the highest when several
    /// match).
    pub labels: BTreeMap<String, Lane>,
    /// A newer push to a merge request supersedes its jobs still queued.
    pub cancel_superseded: bool,
    pub jobs: Vec<JobTemplate>,
    /// Fleet images its tags build.
    pub images: Vec<ImageTemplate>,
}

impl std::fmt::Debug for Project {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Project")
            .field("name", &self.name)
            .field("forge", &self.forge)
            .finish_non_exhaustive()
    }
}

impl Project {
    pub fn trusts(&self, branch: &str) -> bool {
        self.trusted_branches.iter().any(|p| matches(p, branch))
    }
}

/// Why the projects file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("projects file {path}: {message}")]
pub struct ProjectsError {
    pub path: String,
    pub message: String,
}

/// Reads the projects file and every secret it names. Secrets must not be readable by others.
pub fn load(path: &Path) -> Result<Loaded, ProjectsError> {
    let err = |message: String| ProjectsError {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let file: File = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut out: Vec<Project> = Vec::new();
    for p in file.projects {
        if out.iter().any(|o| o.name == p.name) {
            return Err(err(format!("project {:?} appears twice", p.name)));
        }
        if p.name.is_empty() || p.name.starts_with('/') || p.name.contains("..") {
            return Err(err(format!("{:?} is not a project path", p.name)));
        }
        let secret_path = base.join(&p.secret_file);
        let secret =
            read_secret(&secret_path).map_err(|m| err(format!("project {:?}: {m}", p.name)))?;
        let jobs = if p.jobs.is_empty() {
            vec![
                JobTemplate {
                    kind: JobKind::Build,
                    command: None,
                    targets: all_targets(),
                    flags: Vec::new(),
                    on: None,
                },
                JobTemplate {
                    kind: JobKind::Test,
                    command: None,
                    targets: all_targets(),
                    flags: Vec::new(),
                    on: None,
                },
            ]
        } else {
            p.jobs
        };
        let mut labels = BTreeMap::new();
        for (label, lane) in p.labels {
            let lane = Lane::from_name(&lane).ok_or_else(|| {
                err(format!(
                    "project {:?}: label {label:?} names lane {lane:?}, not release, build, test or lint",
                    p.name
                ))
            })?;
            labels.insert(label, lane);
        }
        for j in &jobs {
            if j.targets.is_empty() || j.command().is_empty() {
                return Err(err(format!(
                    "project {:?}: a {} job needs a command and targets",
                    p.name, j.kind
                )));
            }
        }
        for (i, image) in p.images.iter().enumerate() {
            image
                .check()
                .map_err(|m| err(format!("project {:?}: {m}", p.name)))?;
            if p.images[..i].iter().any(|o| o.name == image.name) {
                return Err(err(format!(
                    "project {:?}: image {:?} appears twice",
                    p.name, image.name
                )));
            }
        }
        out.push(Project {
            name: p.name,
            forge: p.forge,
            secret,
            clone_url: p.clone_url,
            trusted_branches: p.trusted_branches,
            release_labels: p.release_labels,
            labels,
            cancel_superseded: p.cancel_superseded,
            jobs,
            images: p.images,
        });
    }
    let mut clients: Vec<ApiClient> = Vec::new();
    for c in file.clients {
        let mut sha256 = [0u8; 32];
        hex::decode_to_slice(c.sha256.trim(), &mut sha256).map_err(|_| {
            err(format!(
                "client {:?}: sha256 must be 64 hex digits (sha256sum of the token)",
                c.id
            ))
        })?;
        let max_lane = Lane::from_name(&c.max_lane).ok_or_else(|| {
            err(format!(
                "client {:?}: max_lane {:?} is not release, build, test or lint",
                c.id, c.max_lane
            ))
        })?;
        if clients.iter().any(|o| o.id == c.id || o.sha256 == sha256) {
            return Err(err(format!("client {:?} appears twice", c.id)));
        }
        if !c.rate_per_minute.is_finite() || c.rate_per_minute <= 0.0 || c.burst == 0 {
            return Err(err(format!(
                "client {:?}: rate_per_minute and burst must be positive",
                c.id
            )));
        }
        clients.push(ApiClient {
            id: c.id,
            sha256,
            projects: c.projects,
            max_lane,
            rate_per_minute: c.rate_per_minute,
            burst: c.burst,
            images: c.images,
        });
    }
    Ok(Loaded {
        projects: out,
        clients,
    })
}

fn read_secret(path: &Path) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("secret {}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "secret {} is readable by others (chmod 600 it)",
            path.display()
        ));
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("secret {}: {e}", path.display()))?;
    let secret = text.trim_end_matches(['\n', '\r']);
    if secret.len() < 16 {
        return Err(format!(
            "secret {} is shorter than 16 characters",
            path.display()
        ));
    }
    Ok(secret.as_bytes().to_vec())
}

/// What identifies a file's contents for reloading: length, modification time and inode.
pub type Stamp = Option<(u64, std::time::SystemTime, u64)>;

pub fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .ok()
        .and_then(|m| Some((m.len(), m.modified().ok()?, m.ino())))
}

/// The stamps of the projects file and of every secret file it names (a rotated secret reloads
/// too).
pub fn stamps(path: &Path) -> Vec<Stamp> {
    let mut out = vec![stamp(path)];
    if let Ok(text) = std::fs::read_to_string(path)
        && let Ok(file) = toml::from_str::<File>(&text)
    {
        let base = path.parent().unwrap_or(Path::new("."));
        out.extend(
            file.projects
                .iter()
                .map(|p| stamp(&base.join(&p.secret_file))),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write_secret(dir: &Path, name: &str, mode: u32) {
        let p = dir.join(name);
        std::fs::write(&p, "a-long-enough-secret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn the_documented_projects_file_loads() {
        let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/config/projects.toml");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("projects.toml");
        std::fs::copy(&doc, &file).unwrap();
        write_secret(dir.path(), "monorepo.secret", 0o600);
        write_secret(dir.path(), "tools.secret", 0o600);
        let loaded = load(&file).unwrap();
        assert_eq!(loaded.projects.len(), 2);
        assert_eq!(loaded.projects[0].jobs.len(), 4);
        assert_eq!(loaded.clients[0].max_lane, Lane::Build);
        let car = &loaded.projects[0].images[0];
        assert!(car.built_by("v2.1") && !car.built_by("nightly-3"));
        assert_eq!(car.lane, Lane::Release);
        assert!(loaded.clients[1].images && !loaded.clients[0].images);
    }

    #[test]
    fn projects_load_with_defaults_and_bad_files_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        write_secret(dir.path(), "s", 0o600);
        let file = dir.path().join("projects.toml");
        std::fs::write(
            &file,
            r#"
[[project]]
name = "av/monorepo"
forge = "gitlab"
secret_file = "s"
labels = { "priority::release" = "release" }

[[project]]
name = "av/tools"
forge = "github"
secret_file = "s"
trusted_branches = ["main", "release/*"]
[[project.job]]
kind = "lint"
command = "build"
flags = ["--config=lint"]
[[project.job]]
kind = "release"
targets = ["//release/..."]
"#,
        )
        .unwrap();
        let p = load(&file).unwrap().projects;
        assert_eq!(p[0].secret, b"a-long-enough-secret");
        assert_eq!(p[0].jobs.len(), 2, "build and test by default");
        assert_eq!(p[0].jobs[1].command(), "test");
        assert_eq!(p[0].labels["priority::release"], Lane::Release);
        assert!(p[0].trusts("main") && !p[0].trusts("feature"));
        assert!(p[1].trusts("release/2.1") && !p[1].trusts("releases"));
        assert!(p[1].jobs[0].answers(On::MergeRequest) && !p[1].jobs[0].answers(On::Tag));
        assert!(p[1].jobs[1].answers(On::Tag) && !p[1].jobs[1].answers(On::Push));

        for (text, says) in [
            (
                "[[project]]\nname = \"a/b\"\nforge = \"gitea\"\nsecret_file = \"s\"\n",
                "gitea",
            ),
            (
                "[[project]]\nname = \"a/b\"\nforge = \"gitlab\"\nsecret_file = \"missing\"\n",
                "missing",
            ),
            (
                "[[project]]\nname = \"a/b\"\nforge = \"gitlab\"\nsecret_file = \"s\"\nlabels = { x = \"urgent\" }\n",
                "urgent",
            ),
            (
                "[[project]]\nname = \"a/b\"\nforge = \"gitlab\"\nsecret_file = \"s\"\n[[project]]\nname = \"a/b\"\nforge = \"gitlab\"\nsecret_file = \"s\"\n",
                "twice",
            ),
            (
                "[[project]]\nname = \"a/b\"\nforge = \"gitlab\"\nsecret_file = \"s\"\nbranches = []\n",
                "branches",
            ),
            (
                "[[project]]\nname = \"a/b\"\nforge = \"gitlab\"\nsecret_file = \"s\"\n[[project.image]]\nname = \"a-very-long-image-name\"\ndockerfile = \"D\"\n",
                "1-14 of",
            ),
            (
                "[[project]]\nname = \"a/b\"\nforge = \"gitlab\"\nsecret_file = \"s\"\n[[project.image]]\nname = \"car\"\ndockerfile = \"../D\"\n",
                "inside the repository",
            ),
            (
                "[[project]]\nname = \"a/b\"\nforge = \"gitlab\"\nsecret_file = \"s\"\n[[project.image]]\nname = \"car\"\ndockerfile = \"D\"\ncontext = \"/\"\n",
                "inside the repository",
            ),
            (
                "[[project]]\nname = \"a/b\"\nforge = \"gitlab\"\nsecret_file = \"s\"\n[[project.image]]\nname = \"car\"\ndockerfile = \"D\"\nchannel = \"../x\"\n",
                "channel \"../x\"",
            ),
            (
                "[[project]]\nname = \"a/b\"\nforge = \"gitlab\"\nsecret_file = \"s\"\n[[project.image]]\nname = \"car\"\ndockerfile = \"D\"\ntags = []\n",
                "no tag would build it",
            ),
            (
                "[[project]]\nname = \"a/b\"\nforge = \"gitlab\"\nsecret_file = \"s\"\n[[project.image]]\nname = \"car\"\ndockerfile = \"D\"\nlane = \"urgent\"\n",
                "urgent",
            ),
            (
                "[[project]]\nname = \"a/b\"\nforge = \"gitlab\"\nsecret_file = \"s\"\n[[project.image]]\nname = \"car\"\ndockerfile = \"D\"\n[[project.image]]\nname = \"car\"\ndockerfile = \"E\"\n",
                "appears twice",
            ),
        ] {
            std::fs::write(&file, text).unwrap();
            let e = load(&file).unwrap_err().to_string();
            assert!(e.contains(says), "{says}: {e}");
        }
        write_secret(dir.path(), "open", 0o644);
        std::fs::write(
            &file,
            "[[project]]\nname = \"a/b\"\nforge = \"gitlab\"\nsecret_file = \"open\"\n",
        )
        .unwrap();
        let e = load(&file).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }
}
