//! Test support: the real stack as `motorpool up` runs it, gRPC clients, and blob helpers.
#![allow(dead_code)]

pub mod bes;
pub mod browser;
pub mod ci;
pub mod exec;
pub mod otlp;
pub mod workspace;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::bytestream as bs;
use motorpool_messages::{BlobDigest, DigestFunction};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// A channel whose calls carry an API key, as Bazel's `--remote_header` sends it.
pub type AuthChannel = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer <key>` to every call (nothing for an empty key).
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    pub fn new(key: &str) -> Bearer {
        Bearer((!key.is_empty()).then(|| format!("Bearer {key}").parse().unwrap()))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The API keys `motorpool up` made (its `credentials.toml`).
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Keys {
    pub developer: String,
    pub ci: String,
    pub admin: String,
}

pub const MAX_MSG: usize = 256 * 1024 * 1024;

/// Runs the `motorpool` command line with `args`, to its end.
pub fn motorpool(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_motorpool"))
        .args(args)
        .output()
        .expect("run motorpool")
}

/// A command's stdout then stderr, as text.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A free loopback address.
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `motorpool up` in a temp dir on free ports; stopped with SIGTERM on drop.
/// Prints the stack's log when the test panics while it is alive.
pub struct LogOnPanic<'a>(pub &'a Stack);

impl Drop for LogOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("motorpool up's log:\n{}", self.0.log());
        }
    }
}

pub struct Stack {
    child: Option<Child>,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// The webhook service: forges post to `/hooks/<project>`.
    pub webhook: SocketAddr,
    /// The first CI runner's HTTP port (`/api/v1/workspaces`, job logs).
    pub runner: SocketAddr,
    pub dir: tempfile::TempDir,
    /// The stack's keys; [`Stack::channel`]'s calls carry `admin`.
    pub keys: Keys,
}

impl Stack {
    pub fn up(extra: &[&str]) -> Stack {
        Self::up_in(tempfile::tempdir().unwrap(), extra)
    }

    /// [`Stack::up`] with environment variables for every service (`MOTORPOOL_SCHEDULER_...`).
    pub fn up_with_env(extra: &[&str], env: &[(&str, &str)]) -> Stack {
        Self::start(tempfile::tempdir().unwrap(), extra, env)
    }

    /// Starts the stack in `dir`. Free ports are only free when asked; if another process takes
    /// one first, `motorpool up` exits during start-up and this tries again on new ports.
    pub fn up_in(dir: tempfile::TempDir, extra: &[&str]) -> Stack {
        Self::start(dir, extra, &[])
    }

    fn start(mut dir: tempfile::TempDir, extra: &[&str], env: &[(&str, &str)]) -> Stack {
        let mut failures = String::new();
        for _ in 0..3 {
            let grpc = free_addr();
            let http = free_addr();
            let webhook = free_addr();
            let runner = free_addr();
            let log_path = dir.path().join("up.log");
            let log = std::fs::File::create(&log_path).unwrap();
            let child = Command::new(env!("CARGO_BIN_EXE_motorpool"))
                .arg("up")
                .arg("--data-dir")
                .arg(dir.path().join("data"))
                .args(["--nats-port", "0"])
                .arg("--grpc-addr")
                .arg(grpc.to_string())
                .arg("--http-addr")
                .arg(http.to_string())
                .arg("--webhook-addr")
                .arg(webhook.to_string())
                .arg("--runner-addr")
                .arg(runner.to_string())
                .args(["--metrics-addr", "127.0.0.1:0"])
                .args(extra)
                .env("RUST_LOG", "warn")
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("run motorpool up");
            let mut stack = Stack {
                child: Some(child),
                grpc,
                http,
                webhook,
                runner,
                dir,
                keys: Keys {
                    developer: String::new(),
                    ci: String::new(),
                    admin: String::new(),
                },
            };
            match stack.wait_ready() {
                Ok(()) => {
                    let creds = stack.dir.path().join("data/credentials.toml");
                    stack.keys = toml::from_str(&std::fs::read_to_string(creds).unwrap()).unwrap();
                    return stack;
                }
                Err(log) => {
                    failures.push_str(&log);
                    stack.stop();
                    dir = std::mem::replace(&mut stack.dir, tempfile::tempdir().unwrap());
                }
            }
        }
        panic!("motorpool up did not start in 3 attempts:\n{failures}");
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let start = Instant::now();
        loop {
            let log = std::fs::read_to_string(self.dir.path().join("up.log")).unwrap_or_default();
            if log.contains("Motorpool is up") {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(format!("motorpool up exited with {status}:\n{log}"));
            }
            if start.elapsed() > Duration::from_secs(90) {
                return Err(format!("motorpool up not ready after 90 s:\n{log}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// A channel whose calls carry the admin key.
    pub async fn channel(&self) -> AuthChannel {
        self.channel_as(&self.keys.admin).await
    }

    /// A channel whose calls carry `key` (empty: none).
    pub async fn channel_as(&self, key: &str) -> AuthChannel {
        let ch = self.plain_channel(16 * 1024).await;
        tonic::service::interceptor::InterceptedService::new(ch, Bearer::new(key))
    }

    /// `--remote_header` for Bazel, with `key`.
    pub fn bazel_auth(&self, key: &str) -> String {
        format!("--remote_header=authorization=Bearer {key}")
    }

    /// Bazel's flags for building `//...` with every action executed on this stack, under
    /// `instance`, as CI (whose key may write the action cache).
    pub fn remote_build_flags(&self, instance: &str) -> Vec<String> {
        vec![
            "//...".to_string(),
            format!("--remote_executor=grpc://{}", self.grpc),
            format!("--remote_instance_name={instance}"),
            "--spawn_strategy=remote".to_string(),
            "--jobs=8".to_string(),
            self.bazel_auth(&self.keys.ci),
        ]
    }

    /// A channel that accepts HTTP/2 frames of up to `max_frame` bytes (16 KiB, the protocol's
    /// default and what Bazel's netty accepts, in [`Stack::channel`]).
    pub async fn channel_with_frames(&self, max_frame: u32) -> AuthChannel {
        let ch = self.plain_channel(max_frame).await;
        tonic::service::interceptor::InterceptedService::new(ch, Bearer::new(&self.keys.admin))
    }

    /// A channel to a stack started with `--tls`, trusting the CA it made, whose calls carry
    /// `key`; it accepts HTTP/2 frames of 1 MiB, as [`Stack::channel_with_frames`] can.
    pub async fn tls_channel_as(&self, key: &str) -> AuthChannel {
        let ca = std::fs::read(self.dir.path().join("data/tls/ca.pem")).unwrap();
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name("localhost");
        let ch = Channel::from_shared(format!("https://{}", self.grpc))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .max_frame_size(Some(1 << 20))
            .initial_stream_window_size(Some(8 * 1024 * 1024))
            .initial_connection_window_size(Some(16 * 1024 * 1024))
            .connect()
            .await
            .unwrap();
        tonic::service::interceptor::InterceptedService::new(ch, Bearer::new(key))
    }

    /// A channel without a key.
    pub async fn plain_channel(&self, max_frame: u32) -> Channel {
        Channel::from_shared(self.endpoint())
            .unwrap()
            .initial_stream_window_size(Some(8 * 1024 * 1024))
            .initial_connection_window_size(Some(16 * 1024 * 1024))
            .max_frame_size(Some(max_frame))
            .connect()
            .await
            .unwrap()
    }

    pub async fn clients(&self) -> Clients {
        Clients::over(self.channel().await)
    }

    /// The text of `GET path` on the HTTP port: over TLS, trusting the stack's CA, on a stack
    /// started with `--tls`.
    pub fn http_get(&self, path: &str) -> String {
        match self.tls_ca() {
            Some(ca) => self.https_get(&ca, path).expect("an HTTPS answer"),
            None => self.plain_http_get(path),
        }
    }

    /// The text of a plaintext `GET path` on the HTTP port (whatever the port speaks).
    /// The value of an unlabelled counter or gauge on the gateway's `/metrics` (0 before its
    /// first increment).
    pub fn metric(&self, name: &str) -> f64 {
        self.http_get("/metrics")
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits (up to 10 s) until the gateway has heard news from `n` shards: only then does it
    /// remember the action results it verifies (ADR 0012).
    pub fn wait_for_shard_news(&self, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.metric("motorpool_gateway_shards_heard") < n as f64 {
            assert!(
                std::time::Instant::now() < deadline,
                "the gateway heard no news from {n} shard(s)"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn plain_http_get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.http).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // A TLS port may close the connection before the request is written: no answer either.
        let _ = write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The text of `GET path` over TLS to the HTTP port, trusting only the CA in `ca`, or the
    /// handshake's error.
    pub fn https_get(&self, ca: &Path, path: &str) -> Result<String, String> {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        use std::io::{Read, Write};
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let conn = rustls::ClientConnection::new(
            std::sync::Arc::new(config),
            "localhost".try_into().unwrap(),
        )
        .unwrap();
        let tcp = std::net::TcpStream::connect(self.http).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        // The answer counts even when the server closes without a close_notify.
        if let Err(e) = s.read_to_end(&mut out)
            && out.is_empty()
        {
            return Err(e.to_string());
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// The NATS URL `motorpool up` printed.
    pub fn nats_url(&self) -> String {
        self.log()
            .lines()
            .find_map(|l| l.trim().strip_prefix("NATS "))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string)
            .expect("motorpool up prints the NATS URL")
    }

    /// The seed file of the stack's bus user `name` (`gateway`, `worker-0`, `operator`,
    /// `admin`, ...).
    pub fn nkey(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("data/bus/{name}.nk"))
    }

    /// A bus connection as the stack's user `name` (over TLS on a `--tls` stack).
    pub async fn bus_as(&self, name: &str) -> motorpool_bus::Bus {
        motorpool_bus::Bus::connect_service(
            &self.nats_url(),
            &format!("test-as-{name}"),
            Some(&self.nkey(name)),
            self.tls_ca().as_deref(),
            Duration::from_secs(5),
        )
        .await
        .unwrap()
    }

    /// The CA a `--tls` stack made.
    pub fn tls_ca(&self) -> Option<std::path::PathBuf> {
        Some(self.dir.path().join("data/tls/ca.pem")).filter(|p| p.exists())
    }

    /// Adds a bus user with `role` through `motorpool keys bus add`, as an operator would, and
    /// returns its seed file once the stack's NATS accepts it (`motorpool up` reloads the realm
    /// when it changes).
    pub async fn add_bus_user(&self, role: &str) -> std::path::PathBuf {
        let name = role.rsplit(':').next().unwrap();
        let out = self.dir.path().join(format!("{name}.nk"));
        let status = Command::new(env!("CARGO_BIN_EXE_motorpool"))
            .args(["keys", "bus", "add", "--role", role, "--realm"])
            .arg(self.dir.path().join("data/bus/realm.toml"))
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "motorpool keys bus add --role {role}");
        // `motorpool up` reloads NATS within a second of the realm's change.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match motorpool_bus::Bus::connect_service(
                &self.nats_url(),
                &format!("test-as-{name}"),
                Some(&out),
                self.tls_ca().as_deref(),
                Duration::from_secs(5),
            )
            .await
            {
                Ok(_) => return out,
                Err(e) if Instant::now() > deadline => {
                    panic!("NATS never accepted the new user {role}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Bus permission violations the stack's own services met (nats-server logs each): a
    /// service that needs a subject its role does not allow. Connections the tests make on
    /// purpose (`test-...`, `intruder...`) are not counted.
    pub fn bus_violations(&self) -> Vec<String> {
        let log =
            std::fs::read_to_string(self.dir.path().join("data/nats.log")).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("Violation"))
            .filter(|l| !l.contains(":rust:test") && !l.contains(":rust:intruder"))
            .map(str::to_string)
            .collect()
    }

    /// Pid of the `motorpool up` process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Pid of the stack's child process whose command line contains every one of `words`.
    pub fn child_pid(&self, words: &[&str]) -> Option<u32> {
        let up = self.child.as_ref()?.id();
        for e in std::fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Field 4 (after the parenthesised name) is the parent pid.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid != Some(up) {
                continue;
            }
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if words.iter().all(|w| cmd.split(' ').any(|a| a == *w)) {
                return Some(pid);
            }
        }
        None
    }

    /// The pids of `motorpool up`'s children whose command is `program` (the NATS cluster's
    /// `nats-server`s), in start order.
    pub fn children_running(&self, program: &str) -> Vec<u32> {
        let Some(up) = self.child.as_ref().map(Child::id) else {
            return Vec::new();
        };
        let mut out: Vec<u32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
            .filter(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                    .and_then(|p| p.parse::<u32>().ok());
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let argv0 = cmd.split(|b| *b == 0).next().unwrap_or_default();
                ppid == Some(up) && Path::new(&*String::from_utf8_lossy(argv0)).ends_with(program)
            })
            .collect();
        out.sort();
        out
    }

    /// A metric summed over the services whose name starts with `service`, scraped from the
    /// `/metrics` addresses `motorpool up` lists for Prometheus. `series` is a metric name
    /// (every series of it counts) or one series with its labels.
    pub fn metric_sum(&self, service: &str, series: &str) -> f64 {
        let targets: serde_json::Value = serde_json::from_slice(
            &std::fs::read(self.dir.path().join("data/prometheus/targets.json")).unwrap(),
        )
        .unwrap();
        targets
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| {
                t["labels"]["service"]
                    .as_str()
                    .unwrap()
                    .starts_with(service)
            })
            .map(|t| {
                let addr = t["targets"][0].as_str().unwrap().parse().unwrap();
                let text = ci::http(addr, "GET", "/metrics", &[], b"").1;
                text.lines()
                    .filter(|l| l.starts_with(series))
                    .filter(|l| l[series.len()..].starts_with(['{', ' ']))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>()
            })
            .sum()
    }

    /// SIGKILLs the child matching `words`; `motorpool up` restarts it.
    pub fn kill9(&self, words: &[&str]) -> u32 {
        let pid = self
            .child_pid(words)
            .unwrap_or_else(|| panic!("no child process {words:?}"));
        let ok = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -9 {pid}");
        pid
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("up.log")).unwrap_or_default()
    }

    /// Stops the stack (SIGTERM) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate_child(&mut c);
        }
    }
}

fn terminate_child(c: &mut Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(c.id().to_string())
        .status();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop();
        // Every stack test also checks that the services' bus permissions fit what they do.
        let denied = self.bus_violations();
        if !denied.is_empty() && !std::thread::panicking() {
            panic!(
                "the stack's services were refused on the bus:\n{}",
                denied.join("\n")
            );
        }
    }
}

pub struct Clients {
    pub cas: re::content_addressable_storage_client::ContentAddressableStorageClient<AuthChannel>,
    pub bs: bs::byte_stream_client::ByteStreamClient<AuthChannel>,
    pub ac: re::action_cache_client::ActionCacheClient<AuthChannel>,
    pub caps: re::capabilities_client::CapabilitiesClient<AuthChannel>,
}

impl Clients {
    /// The REAPI clients over `ch` (messages up to [`MAX_MSG`]).
    pub fn over(ch: AuthChannel) -> Clients {
        Clients {
            cas: re::content_addressable_storage_client::ContentAddressableStorageClient::new(
                ch.clone(),
            )
            .max_decoding_message_size(MAX_MSG)
            .max_encoding_message_size(MAX_MSG),
            bs: bs::byte_stream_client::ByteStreamClient::new(ch.clone())
                .max_decoding_message_size(MAX_MSG)
                .max_encoding_message_size(MAX_MSG),
            ac: re::action_cache_client::ActionCacheClient::new(ch.clone()),
            caps: re::capabilities_client::CapabilitiesClient::new(ch),
        }
    }

    /// How many of `digests` the CAS says are missing.
    pub async fn missing(&mut self, digests: &[BlobDigest]) -> usize {
        self.cas
            .find_missing_blobs(re::FindMissingBlobsRequest {
                blob_digests: digests.iter().map(proto).collect(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .missing_blob_digests
            .len()
    }
}

pub fn sha(data: &[u8]) -> BlobDigest {
    DigestFunction::Sha256.digest_of(data)
}

pub fn proto(d: &BlobDigest) -> re::Digest {
    re::Digest {
        hash: d.hex(),
        size_bytes: d.size as i64,
    }
}

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn read_name(instance: &str, d: &BlobDigest) -> String {
    let prefix = if instance.is_empty() {
        String::new()
    } else {
        format!("{instance}/")
    };
    match d.function {
        DigestFunction::Sha256 => format!("{prefix}blobs/{}/{}", d.hex(), d.size),
        f => format!("{prefix}blobs/{}/{}/{}", f.name(), d.hex(), d.size),
    }
}

pub fn write_name(instance: &str, d: &BlobDigest, upload: &str) -> String {
    let prefix = if instance.is_empty() {
        String::new()
    } else {
        format!("{instance}/")
    };
    match d.function {
        DigestFunction::Sha256 => format!("{prefix}uploads/{upload}/blobs/{}/{}", d.hex(), d.size),
        f => format!(
            "{prefix}uploads/{upload}/blobs/{}/{}/{}",
            f.name(),
            d.hex(),
            d.size
        ),
    }
}

/// WriteRequests for `data` from `offset`, in `chunk`-byte messages, finishing at the end.
pub fn write_requests(
    name: &str,
    data: &[u8],
    offset: usize,
    chunk: usize,
) -> Vec<bs::WriteRequest> {
    let mut out = Vec::new();
    let mut at = offset;
    loop {
        let end = (at + chunk).min(data.len());
        out.push(bs::WriteRequest {
            resource_name: if at == offset {
                name.to_string()
            } else {
                String::new()
            },
            write_offset: at as i64,
            finish_write: end == data.len(),
            data: data[at..end].to_vec(),
        });
        at = end;
        if at == data.len() {
            return out;
        }
    }
}

/// Writes a whole blob with ByteStream.
pub async fn bs_write(
    c: &mut Clients,
    instance: &str,
    d: &BlobDigest,
    data: &[u8],
) -> Result<i64, tonic::Status> {
    let name = write_name(instance, d, &uuid::Uuid::new_v4().to_string());
    let reqs = write_requests(&name, data, 0, 16 * 1024);
    c.bs.write(futures::stream::iter(reqs))
        .await
        .map(|r| r.into_inner().committed_size)
}

/// Reads a blob (or part) with ByteStream.
pub async fn bs_read(
    c: &mut Clients,
    name: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<u8>, tonic::Status> {
    use futures::StreamExt;
    let mut s =
        c.bs.read(bs::ReadRequest {
            resource_name: name.to_string(),
            read_offset: offset,
            read_limit: limit,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.next().await {
        out.extend_from_slice(&m?.data);
    }
    Ok(out)
}

/// Fails the test, saying how to get it, when Bazel is not installed.
/// Held by a test that times what a whole stack does under a real build (a process killed
/// mid-build, a takeover): on two cores, two of them at once starve each other's stacks of CPU
/// and measure the machine, not the platform. Tests of one binary take it in turn.
pub fn one_stack_build_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn require_bazel() {
    assert!(
        which("bazel").is_some(),
        "bazel is required (apt-get install bazel-bootstrap bazel-platforms); .ci/run installs it"
    );
}

/// Runs `cmd`; its output, or a panic naming the command and saying what it printed.
pub fn succeed(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// True when `path` exists and is executable (for finding tools).
pub fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

pub fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// CPU seconds of a process, from `/proc/<pid>/stat`: `(its own, its reaped children's)`.
/// `/proc` counts in USER_HZ, which is 100 on Linux.
pub fn cpu_of(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<f64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .map(|x| x.parse().unwrap_or(0.0))
                .collect()
        })
        .unwrap_or_default();
    // After the name: state, ppid, ... utime is field 14 of the line, i.e. index 11 here.
    if f.len() < 15 {
        return (0.0, 0.0);
    }
    ((f[11] + f[12]) / 100.0, (f[13] + f[14]) / 100.0)
}
