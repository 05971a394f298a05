//! Who is calling, and what for: API keys with roles per instance name.
//!
//! Every gRPC call passes [`AuthLayer`] first. It finds the caller's key (`authorization: Bearer
//! <key>`, as Bazel sends `--remote_header=authorization=Bearer <key>`, or `x-api-key: <key>`),
//! looks its SHA-256 up among the configured keys, and refuses the call before any handler runs
//! when the key is unknown (UNAUTHENTICATED) or lacks the role the method needs
//! (PERMISSION_DENIED, by method: [`needed`]). The [`Identity`] then rides in the request's
//! extensions; handlers check the instance name against it ([`crate::Gateway::allow`]), scope
//! operations to it, and take the execution lane ceiling and the API rate-limit identity from it
//! rather than from headers a client sets for itself.
//!
//! Keys are kept only as SHA-256 hashes, so a keys file or a log line never holds a usable key,
//! and a lookup compares hashes (what a timing difference could reveal is a hash, not a key).
//! The keys file is re-read when it changes: keys rotate without a restart.

use motorpool_cas_client::ApiError;
use motorpool_config::{Anonymous, AuthConfig};
use motorpool_messages::exec::Lane;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::Poll;
use tonic::codegen::{BoxFuture, Service, http};

/// What a role allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Capabilities, FindMissingBlobs, BatchReadBlobs, GetTree, ByteStream Read, GetActionResult.
    Read,
    /// BatchUpdateBlobs, ByteStream Write and QueryWriteStatus.
    WriteCas,
    /// UpdateActionResult: results that no execution here produced (CI's, say).
    WriteAc,
    /// Execute, WaitExecution, and the caller's own operations.
    Execute,
    /// Everything, and every caller's operations.
    Admin,
}

/// One key in the keys file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// Who holds the key (a team, a CI system, a service); names its operations. No `:`.
    pub id: String,
    /// SHA-256 of the key, lower-case hex.
    pub sha256: String,
    pub roles: Vec<Role>,
    /// Instance names the key may use; empty: all.
    #[serde(default)]
    pub instances: Vec<String>,
    /// The highest lane the key's executions may ride (`release`, `build`, `test`, `lint`).
    #[serde(default = "release")]
    pub max_lane: String,
    /// Its executions are API-triggered: rate-limited by the scheduler under the key's id.
    #[serde(default)]
    pub api: bool,
}

fn release() -> String {
    "release".into()
}

/// The keys file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    #[serde(default)]
    pub keys: Vec<KeyEntry>,
}

impl KeysFile {
    pub fn read(path: &Path) -> anyhow::Result<KeysFile> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("read keys file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("keys file {}: {e}", path.display()))
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, toml::to_string(self)?)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

/// A caller, as the gateway knows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Identity {
    pub id: String,
    roles: Vec<Role>,
    instances: Vec<String>,
    pub max_lane: Lane,
    pub api: bool,
    /// No key was presented.
    pub anonymous: bool,
}

impl Identity {
    /// The caller when no key is required (`anonymous = "all"`): as before keys existed.
    pub fn everyone() -> Identity {
        Identity {
            id: "anonymous".into(),
            roles: vec![Role::Admin],
            instances: Vec::new(),
            max_lane: Lane::Release,
            api: false,
            anonymous: true,
        }
    }

    /// A caller without a key where one is allowed (build events): no role, no id. What it
    /// sends belongs to whoever the invocation turns out to be (see `crate::bes`).
    pub fn keyless() -> Identity {
        Identity {
            id: String::new(),
            roles: Vec::new(),
            instances: Vec::new(),
            max_lane: Lane::Lint,
            api: false,
            anonymous: true,
        }
    }

    fn from_entry(e: &KeyEntry) -> anyhow::Result<Identity> {
        anyhow::ensure!(
            !e.id.is_empty() && !e.id.contains(':'),
            "key id {:?} must be non-empty and without ':'",
            e.id
        );
        let max_lane = Lane::from_name(&e.max_lane).ok_or_else(|| {
            anyhow::anyhow!(
                "key {}: max_lane {:?} is not release, build, test or lint",
                e.id,
                e.max_lane
            )
        })?;
        Ok(Identity {
            id: e.id.clone(),
            roles: e.roles.clone(),
            instances: e.instances.clone(),
            max_lane,
            api: e.api,
            anonymous: false,
        })
    }

    /// Whether the caller holds `role` (admins hold every role).
    pub fn may(&self, role: Role) -> bool {
        self.roles.iter().any(|r| *r == role || *r == Role::Admin)
    }

    /// Whether the caller may use instance `name`.
    pub fn may_use(&self, name: &str) -> bool {
        self.instances.is_empty() || self.instances.iter().any(|i| i == name)
    }

    /// The id under which the caller's operations are recorded: its own, or, for a caller that
    /// names sub-clients (`x-motorpool-client`, an invocation id), `<id>:<client>`. An
    /// API-triggered key always records its bare id, the scheduler's rate-limit key.
    pub fn client_id(&self, asked: &str) -> String {
        if self.anonymous {
            asked.to_string()
        } else if self.api || asked.is_empty() {
            self.id.clone()
        } else {
            format!("{}:{asked}", self.id)
        }
    }

    /// Whether an operation recorded for `client` is this caller's to see.
    pub fn owns(&self, client: &str) -> bool {
        self.may(Role::Admin)
            || client == self.id
            || client
                .strip_prefix(self.id.as_str())
                .is_some_and(|rest| rest.starts_with(':'))
    }

    /// Fails unless the caller may use instance `name`.
    pub fn check_instance(&self, name: &str) -> Result<(), ApiError> {
        if self.may_use(name) {
            Ok(())
        } else {
            Err(ApiError::PermissionDenied(format!(
                "{} may not use instance {name:?}",
                self.id
            )))
        }
    }

    /// `lane`, or the caller's ceiling when it asked for more.
    pub fn cap_lane(&self, lane: Lane) -> Lane {
        if lane.rank() > self.max_lane.rank() {
            self.max_lane
        } else {
            lane
        }
    }
}

/// The role a gRPC method needs, by its path.
pub fn needed(path: &str) -> Role {
    match path {
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs"
        | "/google.bytestream.ByteStream/Write"
        | "/google.bytestream.ByteStream/QueryWriteStatus" => Role::WriteCas,
        "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult" => Role::WriteAc,
        p if p.starts_with("/build.bazel.remote.execution.v2.Execution/")
            || p.starts_with("/google.longrunning.Operations/") =>
        {
            Role::Execute
        }
        _ => Role::Read,
    }
}

/// SHA-256 of a key, as the keys file holds it.
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A new random key: `mp_` and 32 random bytes in hex.
pub fn new_key() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("mp_{}", hex::encode(bytes))
}

type KeyMap = HashMap<[u8; 32], Arc<Identity>>;

/// The configured keys and anonymous access.
pub struct Auth {
    anonymous: Option<Arc<Identity>>,
    keys: RwLock<Arc<KeyMap>>,
    file: Option<PathBuf>,
    /// The keys file's modification time and length when last read.
    seen: Mutex<Option<(std::time::SystemTime, u64)>>,
    /// Build events may come without a key (Bazel before 5 sends its `--remote_header`s only
    /// to the cache and executor): they are taken as [`Identity::keyless`].
    keyless_build_events: std::sync::atomic::AtomicBool,
}

/// The Build Event Service's methods.
pub const BUILD_EVENTS: &str = "/google.devtools.build.v1.PublishBuildEvent/";

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("keys", &self.keys.read().len())
            .finish_non_exhaustive()
    }
}

fn load(path: &Path) -> anyhow::Result<KeyMap> {
    let mut map = KeyMap::new();
    for e in KeysFile::read(path)?.keys {
        let mut hash = [0u8; 32];
        hex::decode_to_slice(e.sha256.trim(), &mut hash)
            .map_err(|_| anyhow::anyhow!("key {}: sha256 is not 64 hex digits", e.id))?;
        map.insert(hash, Arc::new(Identity::from_entry(&e)?));
    }
    Ok(map)
}

fn file_stamp(path: &Path) -> Option<(std::time::SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl Auth {
    /// Loads the keys. Fails on a keys file that does not parse, and where nobody could call:
    /// no keys file and no anonymous access.
    pub fn open(config: &AuthConfig) -> anyhow::Result<Arc<Auth>> {
        anyhow::ensure!(
            config.keys_file.is_some() || config.anonymous != Anonymous::None,
            "auth.keys_file is unset and auth.anonymous is \"none\": no caller could use this \
             gateway (write keys with `motorpool keys add`, or set auth.anonymous)"
        );
        let anonymous = match config.anonymous {
            Anonymous::None => None,
            Anonymous::Read => Some(Arc::new(Identity {
                roles: vec![Role::Read],
                ..Identity::everyone()
            })),
            Anonymous::All => Some(Arc::new(Identity::everyone())),
        };
        let keys = match &config.keys_file {
            Some(p) => load(p)?,
            None => KeyMap::new(),
        };
        Ok(Arc::new(Auth {
            anonymous,
            keys: RwLock::new(Arc::new(keys)),
            seen: Mutex::new(config.keys_file.as_deref().and_then(file_stamp)),
            file: config.keys_file.clone(),
            keyless_build_events: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Lets build events in without a key (`bes.keyless`).
    pub fn allow_keyless_build_events(&self, allow: bool) {
        self.keyless_build_events
            .store(allow, std::sync::atomic::Ordering::Relaxed);
    }

    /// Re-reads the keys file if it changed. A file that no longer parses keeps the keys in
    /// force (and says why), so a bad edit locks nobody out.
    pub fn reload_if_changed(&self) {
        let Some(path) = &self.file else { return };
        let now = file_stamp(path);
        if now == *self.seen.lock() {
            return;
        }
        match load(path) {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), file = %path.display(), "Reloaded the API keys");
                *self.keys.write() = Arc::new(keys);
                *self.seen.lock() = now;
            }
            Err(error) => {
                tracing::error!(%error, "The keys file does not load; the keys in force stay");
            }
        }
    }

    /// The caller behind these headers.
    pub fn identify(&self, headers: &http::HeaderMap) -> Result<Arc<Identity>, ApiError> {
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
        match presented {
            Some(key) => self
                .keys
                .read()
                .get(&hash_key(key.trim()))
                .cloned()
                .ok_or_else(|| ApiError::Unauthenticated("the API key is not valid".into())),
            None => self.anonymous.clone().ok_or_else(|| {
                ApiError::Unauthenticated(
                    "this gateway needs an API key: --remote_header=authorization=Bearer <key>"
                        .into(),
                )
            }),
        }
    }

    /// The caller of `req`, if it may call its method.
    fn admit<B>(&self, req: &http::Request<B>) -> Result<Arc<Identity>, ApiError> {
        let keyless = !req.headers().contains_key(http::header::AUTHORIZATION)
            && !req.headers().contains_key("x-api-key");
        if keyless
            && self.anonymous.is_none()
            && req.uri().path().starts_with(BUILD_EVENTS)
            && self
                .keyless_build_events
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Ok(Arc::new(Identity::keyless()));
        }
        let who = self.identify(req.headers())?;
        let role = needed(req.uri().path());
        if !who.may(role) {
            return Err(ApiError::PermissionDenied(format!(
                "{} may not call {}: it needs the {role:?} role",
                who.id,
                req.uri().path()
            )));
        }
        Ok(who)
    }
}

/// The identity of a call, as [`AuthLayer`] put it in the request's extensions.
pub fn identity(ext: &http::Extensions) -> Result<Arc<Identity>, ApiError> {
    ext.get::<Arc<Identity>>()
        .cloned()
        .ok_or_else(|| ApiError::Internal("a call reached a handler without an identity".into()))
}

/// The identity of a gRPC call.
pub fn caller<T>(req: &tonic::Request<T>) -> Result<Arc<Identity>, ApiError> {
    identity(req.extensions())
}

/// Identifies every call and refuses those whose caller may not make them.
#[derive(Clone, Debug)]
pub struct AuthLayer(pub Arc<Auth>);

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            auth: self.0.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Auth>,
}

impl<S, B, R> Service<http::Request<B>> for AuthService<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>, Error = Infallible>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = Infallible;
    type Future = BoxFuture<http::Response<R>, Infallible>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        match self.auth.admit(&req) {
            Ok(who) => {
                req.extensions_mut().insert(who);
                Box::pin(self.inner.call(req))
            }
            Err(e) => {
                metrics::counter!(crate::metric_names::GATEWAY_AUTH_REFUSED_TOTAL).increment(1);
                let status = tonic::Status::from(e);
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// id, key, roles, instances, max lane, api.
    type Entry<'a> = (&'a str, &'a str, &'a [Role], &'a [&'a str], &'a str, bool);

    fn keys_file(dir: &Path, entries: &[Entry<'_>]) -> PathBuf {
        let file = KeysFile {
            keys: entries
                .iter()
                .map(|(id, key, roles, instances, lane, api)| KeyEntry {
                    id: id.to_string(),
                    sha256: hex::encode(hash_key(key)),
                    roles: roles.to_vec(),
                    instances: instances.iter().map(|s| s.to_string()).collect(),
                    max_lane: lane.to_string(),
                    api: *api,
                })
                .collect(),
        };
        let p = dir.join("keys.toml");
        file.write(&p).unwrap();
        p
    }

    fn headers(k: &str, v: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
        h
    }

    #[test]
    fn keys_map_to_identities_with_their_roles_instances_and_lanes() {
        let dir = tempfile::tempdir().unwrap();
        let p = keys_file(
            dir.path(),
            &[
                (
                    "dev",
                    "k-dev",
                    &[Role::Read, Role::WriteCas, Role::Execute],
                    &["prod"],
                    "build",
                    false,
                ),
                (
                    "ci",
                    "k-ci",
                    &[Role::Read, Role::WriteAc],
                    &[],
                    "release",
                    true,
                ),
            ],
        );
        let auth = Auth::open(&AuthConfig {
            keys_file: Some(p.clone()),
            anonymous: Anonymous::None,
        })
        .unwrap();
        let dev = auth
            .identify(&headers("authorization", "Bearer k-dev"))
            .unwrap();
        assert_eq!(dev.id, "dev");
        assert!(dev.may(Role::Execute) && !dev.may(Role::WriteAc) && !dev.may(Role::Admin));
        assert!(dev.may_use("prod") && !dev.may_use("test"));
        assert_eq!(
            dev.cap_lane(Lane::Release),
            Lane::Build,
            "a header cannot raise the lane"
        );
        assert_eq!(dev.cap_lane(Lane::Lint), Lane::Lint, "but it may lower it");
        assert_eq!(dev.client_id("inv-1"), "dev:inv-1");
        assert!(
            dev.owns("dev:inv-1") && dev.owns("dev") && !dev.owns("devops:x") && !dev.owns("ci")
        );
        let ci = auth.identify(&headers("x-api-key", "k-ci")).unwrap();
        assert_eq!(
            ci.client_id("whatever"),
            "ci",
            "an API key is rate-limited under its id"
        );
        for bad in [
            headers("authorization", "Bearer nope"),
            http::HeaderMap::new(),
        ] {
            let e = auth.identify(&bad).unwrap_err();
            assert!(matches!(e, ApiError::Unauthenticated(_)), "{e}");
        }

        // Rotation: the file changes, the old key stops working and the new one starts.
        std::thread::sleep(std::time::Duration::from_millis(20));
        keys_file(
            dir.path(),
            &[("dev", "k-dev-2", &[Role::Read], &[], "release", false)],
        );
        auth.reload_if_changed();
        assert!(
            auth.identify(&headers("authorization", "Bearer k-dev"))
                .is_err()
        );
        assert_eq!(
            auth.identify(&headers("authorization", "Bearer k-dev-2"))
                .unwrap()
                .id,
            "dev"
        );
        // A broken edit keeps the keys in force.
        std::fs::write(&p, "this is not toml [").unwrap();
        auth.reload_if_changed();
        assert!(
            auth.identify(&headers("authorization", "Bearer k-dev-2"))
                .is_ok()
        );
    }

    #[test]
    fn anonymous_access_is_none_read_or_all_and_methods_need_their_roles() {
        assert!(
            Auth::open(&AuthConfig::default()).is_err(),
            "nobody could call"
        );
        let read = Auth::open(&AuthConfig {
            keys_file: None,
            anonymous: Anonymous::Read,
        })
        .unwrap();
        let who = read.identify(&http::HeaderMap::new()).unwrap();
        assert!(who.may(Role::Read) && !who.may(Role::WriteCas));
        let req = |path: &str| http::Request::builder().uri(path).body(()).unwrap();
        for (path, ok) in [
            (
                "/build.bazel.remote.execution.v2.ActionCache/GetActionResult",
                true,
            ),
            (
                "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
                true,
            ),
            ("/google.bytestream.ByteStream/Read", true),
            (
                "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult",
                false,
            ),
            (
                "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs",
                false,
            ),
            ("/google.bytestream.ByteStream/Write", false),
            ("/build.bazel.remote.execution.v2.Execution/Execute", false),
            ("/google.longrunning.Operations/ListOperations", false),
        ] {
            let r = read.admit(&req(path));
            assert_eq!(r.is_ok(), ok, "{path}");
            if let Err(e) = r {
                assert!(matches!(e, ApiError::PermissionDenied(_)), "{e}");
            }
        }
        let all = Auth::open(&AuthConfig {
            keys_file: None,
            anonymous: Anonymous::All,
        })
        .unwrap();
        let who = all.identify(&http::HeaderMap::new()).unwrap();
        assert!(who.may(Role::WriteAc) && who.owns("anyone"));
        assert_eq!(who.client_id("inv-2"), "inv-2");
    }
}
