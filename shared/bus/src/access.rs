//! Who may say what on the bus: every service connects as its own NATS user (an nkey), and the
//! server lets each user publish and subscribe only where its role needs.
//!
//! - [`Role`]: what a connection is (`gateway`, `worker:<id>`, `shard:<id>`, ...), and
//!   [`Role::permissions`], the subjects it may publish to and subscribe to. Ids are part of the
//!   subjects, so a worker reports only on its own `job.done.<id>`, and a shard registers and
//!   beats only as itself; the receiving side checks the message against the subject's id.
//! - [`Credentials`]: an nkey seed (the standard `.nk` file: one line, `SU...`). The server knows
//!   only the public key; nothing secret is in its configuration.
//! - [`Realm`]: the users one deployment knows (name, role, public key), kept as TOML by
//!   `motorpool keys bus` and `motorpool up`, and rendered into nats-server's `authorization`
//!   block by [`Realm::server_config`]. nats-server re-reads it on `--signal reload` (SIGHUP):
//!   adding, rotating and removing users needs no restart.
//!
//! Each user's replies come to its own inbox prefix, `_INBOX.<public key>`, and only that user
//! may subscribe there, so no one can read another service's replies. JetStream is reached
//! through its API subjects, per stream: a role gets the streams and KV buckets it uses, and
//! within a KV bucket only the keys it may write.

use crate::subjects;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// What a bus connection is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The REAPI gateway: creates operations, talks to every shard.
    Gateway,
    /// The scheduler: assigns jobs, updates operations, raises alerts.
    Scheduler,
    /// The reindexer: drops dead registry entries, moves blobs between shards.
    Reindexer,
    /// A worker (also a CAS shard) with this id.
    Worker(String),
    /// A dedicated CAS shard with this id.
    Shard(String),
    /// A labeling stage (`mapping`, `prelabel`, `annotate`).
    Stage(String),
    /// The fleet image builder.
    ImageBuilder,
    /// A disk burner with this id.
    Burner(String),
    /// The webhook service: turns forge events into CI jobs.
    Webhook,
    /// A CI runner with this id: takes CI jobs, holds workspaces of its pool.
    Runner(String),
    /// A person's command line: submits label and image jobs, reads statuses and alerts.
    Operator,
    /// The alert relay: reads the alerts stream, delivers alerts to people's sinks.
    AlertRelay,
    /// Everything (debugging, tests, migrations).
    Admin,
}

/// Why a role or realm could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(
        "unknown bus role {0:?}: gateway, scheduler, reindexer, worker:<id>, shard:<id>, stage:<mapping|prelabel|annotate>, image-builder, burner:<id>, webhook, runner:<id>, operator, alert-relay or admin"
    )]
    UnknownRole(String),
    #[error("bus role {role}: {id:?} is not an id (letters, digits, - and _; at most 64)")]
    BadId { role: String, id: String },
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("not an nkey user seed: {0}")]
    Seed(String),
    #[error("the realm has no user {0:?}")]
    NoSuchUser(String),
}

const STAGES: [&str; 3] = ["mapping", "prelabel", "annotate"];

impl FromStr for Role {
    type Err = AccessError;

    fn from_str(s: &str) -> Result<Role, AccessError> {
        let (kind, id) = match s.split_once(':') {
            Some((k, i)) => (k, Some(i)),
            None => (s, None),
        };
        let id_of = |role: &str| -> Result<String, AccessError> {
            let id = id.unwrap_or_default();
            if subjects::valid_id(id) {
                Ok(id.to_string())
            } else {
                Err(AccessError::BadId {
                    role: role.into(),
                    id: id.into(),
                })
            }
        };
        let with_id = matches!(kind, "worker" | "shard" | "burner" | "stage" | "runner");
        if id.is_some() != with_id {
            return Err(AccessError::UnknownRole(s.into()));
        }
        let role = match kind {
            "gateway" => Role::Gateway,
            "scheduler" => Role::Scheduler,
            "reindexer" => Role::Reindexer,
            "image-builder" => Role::ImageBuilder,
            "webhook" => Role::Webhook,
            "operator" => Role::Operator,
            "alert-relay" => Role::AlertRelay,
            "admin" => Role::Admin,
            "worker" => Role::Worker(id_of(kind)?),
            "shard" => Role::Shard(id_of(kind)?),
            "burner" => Role::Burner(id_of(kind)?),
            "runner" => Role::Runner(id_of(kind)?),
            "stage" => {
                let stage = id.unwrap_or_default();
                if !STAGES.contains(&stage) {
                    return Err(AccessError::UnknownRole(s.into()));
                }
                Role::Stage(stage.into())
            }
            _ => return Err(AccessError::UnknownRole(s.into())),
        };
        Ok(role)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Gateway => f.write_str("gateway"),
            Role::Scheduler => f.write_str("scheduler"),
            Role::Reindexer => f.write_str("reindexer"),
            Role::ImageBuilder => f.write_str("image-builder"),
            Role::Webhook => f.write_str("webhook"),
            Role::Operator => f.write_str("operator"),
            Role::AlertRelay => f.write_str("alert-relay"),
            Role::Admin => f.write_str("admin"),
            Role::Worker(id) => write!(f, "worker:{id}"),
            Role::Shard(id) => write!(f, "shard:{id}"),
            Role::Stage(s) => write!(f, "stage:{s}"),
            Role::Burner(id) => write!(f, "burner:{id}"),
            Role::Runner(id) => write!(f, "runner:{id}"),
        }
    }
}

/// The subjects one user may publish to and subscribe to (NATS wildcards), and whether it may
/// answer the requests it receives.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

impl Permissions {
    fn publish(&mut self, subjects: impl IntoIterator<Item = impl Into<String>>) {
        self.publish.extend(subjects.into_iter().map(Into::into));
    }
    fn subscribe(&mut self, subjects: impl IntoIterator<Item = impl Into<String>>) {
        self.subscribe.extend(subjects.into_iter().map(Into::into));
    }

    /// Creates (or updates) and reads a JetStream stream: info, direct and stored-message gets,
    /// consumers (watches, pull consumers), their acks and flow control.
    fn use_stream(&mut self, stream: &str) {
        self.publish(
            [
                "STREAM.INFO.{s}",
                "STREAM.CREATE.{s}",
                "STREAM.UPDATE.{s}",
                "STREAM.MSG.GET.{s}",
                "DIRECT.GET.{s}",
                "DIRECT.GET.{s}.>",
                "CONSUMER.CREATE.{s}",
                "CONSUMER.CREATE.{s}.>",
                "CONSUMER.DURABLE.CREATE.{s}.>",
                "CONSUMER.INFO.{s}.>",
                "CONSUMER.DELETE.{s}.>",
                "CONSUMER.MSG.NEXT.{s}.>",
            ]
            .map(|t| format!("$JS.API.{}", t.replace("{s}", stream))),
        );
        self.publish([format!("$JS.ACK.{stream}.>"), format!("$JS.FC.{stream}.>")]);
    }

    /// Reads a KV bucket (gets, watches).
    fn read_kv(&mut self, bucket: &str) {
        self.use_stream(&format!("KV_{bucket}"));
    }

    /// Reads a KV bucket and writes (puts, deletes) the keys matching `keys`.
    fn write_kv(&mut self, bucket: &str, keys: &str) {
        self.read_kv(bucket);
        self.publish([format!("$KV.{bucket}.{keys}")]);
    }
}

/// Every request subject a shard answers, for shard `id` (`*` = any shard).
fn shard_requests(id: &str) -> Vec<String> {
    ["blob", "chunk", "upload", "action"]
        .map(|noun| format!("mp.v1.cas.{noun}.*.{id}"))
        .to_vec()
}

impl Role {
    /// The user name this role gets in a realm made by `motorpool up`.
    pub fn default_name(&self) -> String {
        match self {
            Role::Worker(id) | Role::Shard(id) | Role::Burner(id) | Role::Runner(id) => id.clone(),
            Role::Stage(s) => s.clone(),
            other => other.to_string(),
        }
    }

    /// What this role may publish and subscribe to. Everyone may also answer requests it
    /// received (`allow_responses`) and subscribe to its own inbox; see [`Realm::server_config`].
    pub fn permissions(&self) -> Permissions {
        use subjects::{bes, cas, ci, exec, fleet, label, ops};
        let mut p = Permissions::default();
        // Account information (limits, usage): what a JetStream client asks first.
        p.publish(["$JS.API.INFO"]);
        match self {
            Role::Admin => {
                p.publish([">"]);
                p.subscribe([">"]);
            }
            Role::Gateway => {
                p.write_kv(exec::OPERATIONS_BUCKET, "*");
                // Build events and the invocations they make.
                p.use_stream(bes::STREAM);
                p.publish(["mp.v1.bes.*.*.*"]);
                // The sweep removes the oldest invocations' events past the count kept.
                p.publish([format!("$JS.API.STREAM.PURGE.{}", bes::STREAM)]);
                p.write_kv(bes::INVOCATIONS_BUCKET, "*");
                // The pages: workers, alerts, drive bays, image builds, labeling jobs.
                p.read_kv(exec::WORKERS_BUCKET);
                p.use_stream(ops::ALERTS_STREAM);
                p.read_kv(fleet::DRIVES_BUCKET);
                p.read_kv(fleet::BUILDS_BUCKET);
                p.read_kv(label::STATUS_BUCKET);
                p.read_kv(cas::REGISTRY_BUCKET);
                p.publish(shard_requests("*"));
                p.subscribe([cas::all_news().to_string()]);
                p.publish([
                    exec::admit().to_string(),
                    exec::cancel().to_string(),
                    exec::queue_stats().to_string(),
                ]);
            }
            Role::Scheduler => {
                p.write_kv(exec::OPERATIONS_BUCKET, "*");
                p.write_kv(exec::LEASE_BUCKET, exec::LEASE_KEY);
                p.read_kv(exec::WORKERS_BUCKET);
                p.use_stream(ops::ALERTS_STREAM);
                p.publish([
                    exec::assign("*").to_string(),
                    exec::stop("*").to_string(),
                    ops::all_alerts().to_string(),
                ]);
                p.subscribe([
                    exec::job_done("*").to_string(),
                    exec::cancel().to_string(),
                    exec::admit().to_string(),
                    exec::queue_stats().to_string(),
                    exec::all_heartbeats().to_string(),
                ]);
            }
            Role::Reindexer => {
                // It removes the entries of dead members, which a KV write is.
                p.write_kv(cas::REGISTRY_BUCKET, "*");
                p.write_kv(exec::WORKERS_BUCKET, "*");
                p.publish(shard_requests("*"));
                // A shard's removals (a blob found corrupt) call for a sweep soon.
                p.subscribe([cas::all_news().to_string()]);
            }
            Role::Shard(id) => shard(&mut p, id),
            Role::Worker(id) => {
                shard(&mut p, id);
                p.write_kv(exec::WORKERS_BUCKET, id);
                p.publish(shard_requests("*"));
                p.publish([
                    exec::job_done(id).to_string(),
                    exec::heartbeat(id).to_string(),
                ]);
                p.subscribe([exec::assign(id).to_string(), exec::stop(id).to_string()]);
            }
            Role::Stage(stage) => {
                p.use_stream(label::JOBS_STREAM);
                p.write_kv(label::STATUS_BUCKET, &format!("*.{stage}"));
                let next = STAGES
                    .iter()
                    .position(|s| s == stage)
                    .and_then(|i| STAGES.get(i + 1));
                if let Some(next) = next {
                    p.publish([format!("mp.v1.label.{next}.run.*")]);
                    p.publish([format!("$KV.{}.*.{next}", label::STATUS_BUCKET)]);
                }
            }
            Role::ImageBuilder => {
                p.use_stream(fleet::BUILDS_STREAM);
                p.write_kv(fleet::BUILDS_BUCKET, "*");
            }
            Role::Webhook => {
                p.use_stream(ci::JOBS_STREAM);
                p.publish(["mp.v1.ci.job.run.*"]);
                p.write_kv(ci::JOBS_BUCKET, "*");
                p.write_kv(ci::DELIVERIES_BUCKET, "*");
                p.write_kv(ci::MERGE_REQUESTS_BUCKET, ">");
                // Tags and API clients queue image builds.
                p.use_stream(fleet::BUILDS_STREAM);
                p.publish(["mp.v1.fleet.image.build.*"]);
                p.write_kv(fleet::BUILDS_BUCKET, "*");
            }
            Role::Runner(_) => {
                p.use_stream(ci::JOBS_STREAM);
                p.write_kv(ci::JOBS_BUCKET, "*");
                p.write_kv(ci::WORKSPACES_BUCKET, ">");
                p.publish([ops::alert("ci_retries_exhausted").to_string()]);
            }
            Role::Burner(id) => {
                p.write_kv(fleet::DRIVES_BUCKET, &format!("{id}.*"));
                p.read_kv(fleet::BUILDS_BUCKET);
                p.publish([fleet::drive_state(id).to_string()]);
            }
            Role::AlertRelay => {
                p.use_stream(ops::ALERTS_STREAM);
            }
            Role::Operator => {
                p.use_stream(label::JOBS_STREAM);
                p.write_kv(label::STATUS_BUCKET, "*.mapping");
                p.publish(["mp.v1.label.mapping.run.*"]);
                p.use_stream(fleet::BUILDS_STREAM);
                p.write_kv(fleet::BUILDS_BUCKET, "*");
                p.publish(["mp.v1.fleet.image.build.*"]);
                p.read_kv(fleet::DRIVES_BUCKET);
                p.subscribe(["mp.v1.fleet.drive.state.*"]);
                p.use_stream(ops::ALERTS_STREAM);
                p.read_kv(exec::WORKERS_BUCKET);
                p.read_kv(cas::REGISTRY_BUCKET);
            }
        }
        p
    }
}

/// A shard's own subjects: it answers requests addressed to it, registers and beats as itself.
fn shard(p: &mut Permissions, id: &str) {
    use subjects::cas;
    p.subscribe(shard_requests(id));
    p.write_kv(cas::REGISTRY_BUCKET, id);
    p.publish([cas::heartbeat(id).to_string(), cas::news(id).to_string()]);
}

/// The inbox prefix of the user with this public key: replies to its requests come there, and
/// only it may subscribe.
pub fn inbox_prefix(public_key: &str) -> String {
    format!("_INBOX.{public_key}")
}

/// An nkey user seed: the secret a service connects with.
#[derive(Clone)]
pub struct Credentials {
    seed: String,
    public_key: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// A new random user key.
    pub fn generate() -> Credentials {
        let kp = nkeys::KeyPair::new_user();
        Credentials {
            seed: kp.seed().expect("a new key pair has a seed"),
            public_key: kp.public_key(),
        }
    }

    /// Parses a seed (`SU...`).
    pub fn from_seed(seed: &str) -> Result<Credentials, AccessError> {
        let seed = seed.trim();
        let kp = nkeys::KeyPair::from_seed(seed).map_err(|e| AccessError::Seed(e.to_string()))?;
        if kp.key_pair_type() != nkeys::KeyPairType::User {
            return Err(AccessError::Seed("the seed is not a user's (SU...)".into()));
        }
        Ok(Credentials {
            seed: seed.to_string(),
            public_key: kp.public_key(),
        })
    }

    /// Reads a `.nk` seed file. The file must not be readable by others.
    pub fn load(path: &Path) -> Result<Credentials, AccessError> {
        let err = |message: String| AccessError::File {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .map_err(|e| err(e.to_string()))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(err(format!(
                    "mode {:o} lets others read the seed; chmod 600 it",
                    mode & 0o777
                )));
            }
        }
        Credentials::from_seed(&text).map_err(|e| err(e.to_string()))
    }

    /// Writes the seed to `path` (mode 0600, replacing it atomically).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        write_private(path, format!("{}\n", self.seed).as_bytes())
    }

    /// The public key (`U...`), what the server's configuration holds.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    pub(crate) fn seed(&self) -> &str {
        &self.seed
    }
}

/// Writes `bytes` to `path` with mode 0600 through a temporary file and a rename.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// One user of the bus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub role: Role,
    /// The nkey public key (`U...`).
    pub nkey: String,
}

/// The users one deployment's bus knows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Realm {
    pub users: Vec<User>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct RealmFile {
    #[serde(default, rename = "user")]
    users: Vec<UserFile>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct UserFile {
    name: String,
    role: String,
    nkey: String,
}

impl Realm {
    /// Reads a realm file; a missing file is an empty realm.
    pub fn load(path: &Path) -> Result<Realm, AccessError> {
        let err = |message: String| AccessError::File {
            path: path.display().to_string(),
            message,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Realm::default()),
            Err(e) => return Err(err(e.to_string())),
        };
        let file: RealmFile = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        let mut realm = Realm::default();
        for u in file.users {
            let role = u
                .role
                .parse()
                .map_err(|e: AccessError| err(e.to_string()))?;
            if nkeys::KeyPair::from_public_key(&u.nkey).is_err() || !u.nkey.starts_with('U') {
                return Err(err(format!(
                    "user {:?}: {:?} is not an nkey user public key",
                    u.name, u.nkey
                )));
            }
            realm.users.push(User {
                name: u.name,
                role,
                nkey: u.nkey,
            });
        }
        Ok(realm)
    }

    /// Writes the realm file (mode 0600: it names every service).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let file = RealmFile {
            users: self
                .users
                .iter()
                .map(|u| UserFile {
                    name: u.name.clone(),
                    role: u.role.to_string(),
                    nkey: u.nkey.clone(),
                })
                .collect(),
        };
        let text = toml::to_string(&file).map_err(std::io::Error::other)?;
        write_private(path, text.as_bytes())
    }

    /// Adds `name` with `role` and `nkey`, replacing a user of that name (a rotation).
    pub fn upsert(&mut self, name: &str, role: Role, nkey: &str) {
        self.users.retain(|u| u.name != name);
        self.users.push(User {
            name: name.to_string(),
            role,
            nkey: nkey.to_string(),
        });
    }

    /// Removes `name`.
    pub fn remove(&mut self, name: &str) -> Result<(), AccessError> {
        let before = self.users.len();
        self.users.retain(|u| u.name != name);
        if self.users.len() == before {
            return Err(AccessError::NoSuchUser(name.into()));
        }
        Ok(())
    }

    /// nats-server's `authorization` block for these users: nkey, subject permissions, the own
    /// inbox, answers to received requests. A connection without one of these keys is refused.
    pub fn server_config(&self) -> String {
        let list = |v: &[String]| {
            v.iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut out = String::from("authorization {\n  users = [\n");
        for u in &self.users {
            let mut p = u.role.permissions();
            p.subscribe.push(format!("{}.>", inbox_prefix(&u.nkey)));
            out.push_str(&format!(
                "    # {} ({})\n    {{ nkey: {:?}, permissions: {{ publish: {{ allow: [{}] }}, subscribe: {{ allow: [{}] }}, allow_responses: true }} }}\n",
                u.name,
                u.role,
                u.nkey,
                list(&p.publish),
                list(&p.subscribe),
            ));
        }
        out.push_str("  ]\n}\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_and_bad_ones_say_what_is_allowed() {
        for r in [
            "gateway",
            "worker:w-1",
            "shard:cas-0",
            "stage:prelabel",
            "burner:rack_2",
            "webhook",
            "runner:ci-1",
            "admin",
        ] {
            assert_eq!(r.parse::<Role>().unwrap().to_string(), r);
        }
        for bad in [
            "root",
            "worker",
            "worker:a.b",
            "worker:>",
            "stage:x",
            "gateway:1",
        ] {
            let e = bad.parse::<Role>().unwrap_err().to_string();
            assert!(e.contains(bad.split(':').nth(1).unwrap_or(bad)), "{e}");
        }
    }

    #[test]
    fn a_worker_may_report_and_register_only_as_itself() {
        let p = Role::Worker("w1".into()).permissions();
        assert!(p.publish.contains(&"mp.v1.exec.job.done.w1".to_string()));
        assert!(p.publish.contains(&"$KV.mp_v1_cas_shards.w1".to_string()));
        assert!(p.publish.contains(&"$KV.mp_v1_exec_workers.w1".to_string()));
        assert!(!p.publish.iter().any(|s| s.contains("job.done.*")
            || s.contains("assign")
            || s == "$KV.mp_v1_cas_shards.*"
            || s.contains("ops.alert")
            || s.contains("mp_v1_exec_operations")));
        assert!(
            p.subscribe
                .contains(&"mp.v1.exec.job.assign.w1".to_string())
        );
        assert!(
            !p.subscribe
                .iter()
                .any(|s| s.ends_with(".*") && s.contains("assign"))
        );
        // A dedicated shard reaches no other shard.
        let s = Role::Shard("cas-0".into()).permissions();
        assert!(!s.publish.iter().any(|x| x.starts_with("mp.v1.cas.blob")));
    }

    #[test]
    fn the_webhook_queues_ci_jobs_and_image_builds_and_nothing_of_the_build_platform() {
        let p = Role::Webhook.permissions();
        assert!(p.publish.contains(&"mp.v1.ci.job.run.*".to_string()));
        assert!(p.publish.contains(&"$KV.mp_v1_ci_jobs.*".to_string()));
        assert!(p.publish.contains(&"$KV.mp_v1_ci_deliveries.*".to_string()));
        assert!(p.publish.contains(&"mp.v1.fleet.image.build.*".to_string()));
        assert!(p.publish.contains(&"$KV.mp_v1_fleet_builds.*".to_string()));
        assert!(!p.publish.iter().any(|s| s.starts_with("mp.v1.cas")
            || s.starts_with("mp.v1.exec")
            || s.starts_with("mp.v1.fleet.drive")
            || s.contains("mp_v1_fleet_drives")
            || s.contains("ops.alert")
            || s.contains("mp_v1_exec_operations")));
        assert!(p.subscribe.is_empty());
    }

    #[test]
    fn realm_renders_every_user_with_its_own_inbox() {
        let a = Credentials::generate();
        let b = Credentials::generate();
        let mut realm = Realm::default();
        realm.upsert("gateway", Role::Gateway, a.public_key());
        realm.upsert("worker-0", Role::Worker("worker-0".into()), b.public_key());
        let conf = realm.server_config();
        assert!(conf.contains(&format!("\"_INBOX.{}.>\"", a.public_key())));
        assert!(conf.contains(&format!("nkey: \"{}\"", b.public_key())));
        assert_eq!(conf.matches("allow_responses: true").count(), 2);
        // Rotation replaces, removal removes.
        let c = Credentials::generate();
        realm.upsert("gateway", Role::Gateway, c.public_key());
        assert_eq!(realm.users.len(), 2);
        assert!(!realm.server_config().contains(a.public_key()));
        realm.remove("gateway").unwrap();
        assert!(realm.remove("gateway").is_err());
    }

    #[test]
    fn seeds_are_checked_and_kept_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.nk");
        let c = Credentials::generate();
        c.save(&path).unwrap();
        assert_eq!(
            Credentials::load(&path).unwrap().public_key(),
            c.public_key()
        );
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            Credentials::load(&path)
                .unwrap_err()
                .to_string()
                .contains("chmod 600")
        );
        assert!(Credentials::from_seed("SUnotaseed").is_err());
        assert!(Credentials::from_seed(c.public_key()).is_err());
    }
}
