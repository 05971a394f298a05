//! The connected bus: typed publish, request/reply with timeouts, subscriptions, JetStream set-up.

use crate::Subject;
use crate::access::{self, Credentials};
use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use motorpool_messages::{CodecError, Message, Request, WireError, codec};
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

/// What can go wrong talking on the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("publish on {subject} failed: {message}")]
    Publish { subject: String, message: String },
    #[error("request on {subject} timed out after {timeout:?}")]
    Timeout { subject: String, timeout: Duration },
    #[error("no service is listening on {subject}")]
    NoResponders { subject: String },
    #[error("request on {subject} failed: {message}")]
    Request { subject: String, message: String },
    #[error("subscribe to {subject} failed: {message}")]
    Subscribe { subject: String, message: String },
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("{0}")]
    Remote(WireError),
    #[error("JetStream: {0}")]
    JetStream(String),
    #[error("bus credentials: {0}")]
    Credentials(String),
    #[error(
        "NATS at {url} refused {name}: {source} (no credentials, or an nkey the server's realm does not hold)"
    )]
    Refused {
        url: String,
        name: String,
        #[source]
        source: async_nats::ConnectError,
    },
}

impl BusError {
    /// True for errors a retry against the same or another peer may cure.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            BusError::Timeout { .. } | BusError::NoResponders { .. } | BusError::Request { .. }
        )
    }
}

/// A connected NATS client with Motorpool's typed operations.
#[derive(Clone)]
pub struct Bus {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    request_timeout: Duration,
    /// Copies JetStream keeps of each stream and KV bucket this connection creates.
    replicas: usize,
    /// When the connection was last (re)established.
    connected_at: Arc<parking_lot::Mutex<std::time::Instant>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl Bus {
    /// Connects as `name` (shown in the server's connection list), without credentials (a bus
    /// that lets anyone in: tests' own servers, a deployment that has not turned access on).
    /// Reconnects forever in the background after the first success.
    pub async fn connect(
        url: &str,
        name: &str,
        request_timeout: Duration,
    ) -> Result<Bus, BusError> {
        Self::connect_with(url, name, None, None, request_timeout).await
    }

    /// [`Bus::connect`] as the nkey user whose seed is in `nkey_file`, if given (the server then
    /// lets this connection do only what that user's role allows, and its replies come to the
    /// user's own inbox), over TLS when `tls_ca_file` is given (the server's certificate must
    /// chain to that CA, PEM; a server that does not speak TLS is refused). What a service's
    /// `nats_nkey_file` and `nats_tls_ca_file` configure.
    pub async fn connect_service(
        url: &str,
        name: &str,
        nkey_file: Option<&std::path::Path>,
        tls_ca_file: Option<&std::path::Path>,
        request_timeout: Duration,
    ) -> Result<Bus, BusError> {
        let creds = match nkey_file {
            Some(path) => {
                Some(Credentials::load(path).map_err(|e| BusError::Credentials(e.to_string()))?)
            }
            None => None,
        };
        Self::connect_with(url, name, creds.as_ref(), tls_ca_file, request_timeout).await
    }

    /// [`Bus::connect`] with these credentials and this TLS CA, if any.
    pub async fn connect_with(
        url: &str,
        name: &str,
        creds: Option<&Credentials>,
        tls_ca_file: Option<&std::path::Path>,
        request_timeout: Duration,
    ) -> Result<Bus, BusError> {
        ensure_crypto_provider();
        let connected_at = Arc::new(parking_lot::Mutex::new(std::time::Instant::now()));
        let options = || {
            let at = connected_at.clone();
            let mut o = async_nats::ConnectOptions::new().event_callback(move |event| {
                let at = at.clone();
                async move {
                    if matches!(event, async_nats::Event::Connected) {
                        *at.lock() = std::time::Instant::now();
                    }
                }
            });
            if let Some(c) = creds {
                o = o
                    .nkey(c.seed().to_string())
                    .custom_inbox_prefix(access::inbox_prefix(c.public_key()));
            }
            if let Some(ca) = tls_ca_file {
                o = o.add_root_certificates(ca.to_path_buf()).require_tls(true);
            }
            o.name(name)
                .request_timeout(Some(request_timeout))
                .connection_timeout(Duration::from_secs(5))
        };
        // One try first: a server that refuses these credentials is an answer, not a reason to
        // keep trying; a server not up yet is tried again below. Several servers (a cluster)
        // are given comma-separated; the client also learns the rest from the server.
        let servers = server_addrs(url)?;
        let client = match options().connect(&servers[..]).await {
            Ok(client) => client,
            Err(source)
                if matches!(
                    source.kind(),
                    async_nats::ConnectErrorKind::AuthorizationViolation
                        | async_nats::ConnectErrorKind::Authentication
                ) =>
            {
                return Err(BusError::Refused {
                    url: url.to_string(),
                    name: name.to_string(),
                    source,
                });
            }
            Err(_) => Self::connect_retrying(url, &servers, options()).await?,
        };
        let jetstream = jetstream::new(client.clone());
        let replicas = replicas(&client, servers.len())?;
        Ok(Bus {
            client,
            jetstream,
            request_timeout,
            replicas,
            connected_at,
        })
    }

    /// How long this connection has been up since it was last (re)established. What others
    /// sent while it was down (heartbeats) never arrived: silence from before is no evidence.
    pub fn connected_for(&self) -> Duration {
        self.connected_at.lock().elapsed()
    }

    /// How many copies JetStream keeps of what this connection creates: `MOTORPOOL_NATS_REPLICAS`
    /// when set, else 3 in a cluster of three or more servers and 1 on one server.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// Connects, trying again in the background until the server answers (bounded: 10 s).
    async fn connect_retrying(
        url: &str,
        servers: &[async_nats::ServerAddr],
        options: async_nats::ConnectOptions,
    ) -> Result<async_nats::Client, BusError> {
        let client = options
            .retry_on_initial_connect()
            .connect(servers)
            .await
            .map_err(|source| BusError::Connect {
                url: url.to_string(),
                source,
            })?;
        // `retry_on_initial_connect` returns at once; wait (bounded) for the first connection so
        // callers learn about a wrong URL instead of silently queueing.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while client.connection_state() != async_nats::connection::State::Connected {
            if tokio::time::Instant::now() > deadline {
                return Err(BusError::Request {
                    subject: String::new(),
                    message: format!("no connection to NATS at {url} after 10s"),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(client)
    }

    /// The raw client, for the rare caller that needs it.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// The server's payload limit: no single message may exceed it.
    pub fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }

    /// Default request timeout.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Publishes a typed message.
    pub async fn publish<M: Message>(&self, subject: &Subject, msg: &M) -> Result<(), BusError> {
        let payload = Bytes::from(codec::encode(msg)?);
        self.publish_raw(
            subject.as_str().to_string(),
            payload,
            crate::trace::headers(),
        )
        .await
    }

    /// Publishes a frame, with `headers` when given (a broadcast's trace context; a reply
    /// carries none).
    pub(crate) async fn publish_raw(
        &self,
        subject: String,
        payload: Bytes,
        headers: Option<async_nats::HeaderMap>,
    ) -> Result<(), BusError> {
        metrics::counter!(crate::metric_names::BUS_SENT_BYTES_TOTAL)
            .increment(payload.len() as u64);
        let sent = match headers {
            Some(h) => {
                self.client
                    .publish_with_headers(subject.clone(), h, payload)
                    .await
            }
            None => self.client.publish(subject.clone(), payload).await,
        };
        sent.map_err(|e| BusError::Publish {
            subject,
            message: e.to_string(),
        })
    }

    /// Publishes a typed message to a JetStream stream and waits for the server to store it: for
    /// work that must not be lost.
    pub async fn enqueue<M: Message>(&self, subject: &Subject, msg: &M) -> Result<(), BusError> {
        self.enqueue_with(subject, msg, async_nats::HeaderMap::new())
            .await
    }

    /// [`Bus::enqueue`] under a message id: JetStream stores a message whose id it has seen
    /// within the stream's duplicate window only once, so publishing the same work again (a
    /// retry after a crash, a redelivered event) queues it once.
    pub async fn enqueue_once<M: Message>(
        &self,
        subject: &Subject,
        msg: &M,
        id: &str,
    ) -> Result<(), BusError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        self.enqueue_with(subject, msg, headers).await
    }

    async fn enqueue_with<M: Message>(
        &self,
        subject: &Subject,
        msg: &M,
        mut headers: async_nats::HeaderMap,
    ) -> Result<(), BusError> {
        let payload = Bytes::from(codec::encode(msg)?);
        crate::trace::inject(&mut headers);
        let subject_name = subject.as_str().to_string();
        let failed = |e: String| BusError::Publish {
            subject: subject_name.clone(),
            message: e,
        };
        let ack = self
            .jetstream
            .publish_with_headers(subject_name.clone(), headers, payload)
            .await
            .map_err(|e| failed(e.to_string()))?;
        ack.await.map(|_| ()).map_err(|e| failed(e.to_string()))
    }

    /// Sends a request and waits (default timeout) for its typed reply. A remote error comes
    /// back as [`BusError::Remote`].
    pub async fn request<R: Request>(
        &self,
        subject: &Subject,
        req: &R,
    ) -> Result<R::Reply, BusError> {
        self.request_with_timeout(subject, req, self.request_timeout)
            .await
    }

    /// [`Bus::request`] with an explicit timeout.
    pub async fn request_with_timeout<R: Request>(
        &self,
        subject: &Subject,
        req: &R,
        timeout: Duration,
    ) -> Result<R::Reply, BusError> {
        let payload = Bytes::from(codec::encode(req)?);
        metrics::counter!(crate::metric_names::BUS_SENT_BYTES_TOTAL)
            .increment(payload.len() as u64);
        let mut request = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(timeout));
        if let Some(h) = crate::trace::headers() {
            request = request.headers(h);
        }
        let reply = self
            .client
            .send_request(subject.as_str().to_string(), request)
            .await
            .map_err(|e| {
                let subject = subject.to_string();
                match e.kind() {
                    async_nats::RequestErrorKind::TimedOut => {
                        BusError::Timeout { subject, timeout }
                    }
                    async_nats::RequestErrorKind::NoResponders => {
                        BusError::NoResponders { subject }
                    }
                    _ => BusError::Request {
                        subject,
                        message: e.to_string(),
                    },
                }
            })?;
        metrics::counter!(crate::metric_names::BUS_RECEIVED_BYTES_TOTAL)
            .increment(reply.payload.len() as u64);
        codec::decode::<Result<R::Reply, WireError>>(&reply.payload)?.map_err(BusError::Remote)
    }

    /// Subscribes to every message on `subject` (a broadcast).
    pub async fn subscribe<M: Message>(
        &self,
        subject: &Subject,
    ) -> Result<TypedSubscriber<M>, BusError> {
        let inner = self
            .client
            .subscribe(subject.as_str().to_string())
            .await
            .map_err(|e| BusError::Subscribe {
                subject: subject.to_string(),
                message: e.to_string(),
            })?;
        Ok(TypedSubscriber {
            inner,
            _m: PhantomData,
        })
    }

    pub(crate) async fn raw_subscribe(
        &self,
        subject: &Subject,
        group: Option<&str>,
    ) -> Result<async_nats::Subscriber, BusError> {
        let s = subject.as_str().to_string();
        let res = match group {
            Some(g) => self.client.queue_subscribe(s, g.to_string()).await,
            None => self.client.subscribe(s).await,
        };
        res.map_err(|e| BusError::Subscribe {
            subject: subject.to_string(),
            message: e.to_string(),
        })
    }

    /// Creates (or updates to this configuration) a KV bucket, with [`Bus::replicas`] copies
    /// unless the configuration asks for more than one itself.
    pub async fn ensure_kv(
        &self,
        mut config: jetstream::kv::Config,
    ) -> Result<jetstream::kv::Store, BusError> {
        if config.num_replicas <= 1 {
            config.num_replicas = self.replicas;
        }
        config.num_replicas = config
            .num_replicas
            .max(self.replicas_of(&format!("KV_{}", config.bucket)).await);
        let bucket = config.bucket.clone();
        settle(|| self.jetstream.create_or_update_key_value(config.clone()))
            .await
            .map_err(|e| BusError::JetStream(format!("KV bucket {bucket}: {e}")))
    }

    /// The replica count of an existing stream (0 when it does not exist or cannot be asked):
    /// set-up never lowers it, whatever a service that connected while the cluster was forming
    /// believed.
    async fn replicas_of(&self, stream: &str) -> usize {
        match self.jetstream.get_stream(stream).await {
            Ok(s) => s.cached_info().config.num_replicas,
            Err(_) => 0,
        }
    }

    /// Every value of the KV bucket `bucket`, decoded as `M`; values that do not decode are
    /// skipped. A bucket no service has made yet (no burner ever ran, say) holds nothing.
    pub async fn kv_values<M: Message>(&self, bucket: &str) -> Result<Vec<M>, BusError> {
        use async_nats::jetstream::context::{GetStreamError, GetStreamErrorKind};
        let kv = match self.jetstream.get_key_value(bucket).await {
            Ok(kv) => kv,
            Err(e) => {
                let missing = std::error::Error::source(&e)
                    .and_then(|s| s.downcast_ref::<GetStreamError>())
                    .is_some_and(|s| {
                        matches!(s.kind(), GetStreamErrorKind::JetStream(j)
                            if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
                    });
                if missing {
                    return Ok(Vec::new());
                }
                return Err(BusError::JetStream(format!("KV bucket {bucket}: {e}")));
            }
        };
        kv_values(&kv).await
    }

    /// Creates (or updates to this configuration) a stream, with [`Bus::replicas`] copies unless
    /// the configuration asks for more than one itself.
    pub async fn ensure_stream(
        &self,
        mut config: jetstream::stream::Config,
    ) -> Result<jetstream::stream::Stream, BusError> {
        if config.num_replicas <= 1 {
            config.num_replicas = self.replicas;
        }
        config.num_replicas = config
            .num_replicas
            .max(self.replicas_of(&config.name).await);
        let name = config.name.clone();
        settle(|| self.jetstream.create_or_update_stream(config.clone()))
            .await
            .map_err(|e| BusError::JetStream(format!("stream {name}: {e}")))?;
        self.jetstream
            .get_stream(&name)
            .await
            .map_err(|e| BusError::JetStream(format!("stream {name}: {e}")))
    }

    /// Flushes buffered publishes to the server.
    pub async fn flush(&self) -> Result<(), BusError> {
        self.client.flush().await.map_err(|e| BusError::Publish {
            subject: String::new(),
            message: e.to_string(),
        })
    }
}

/// Runs a JetStream set-up call until it answers, for up to 30 s: a cluster that is electing
/// leaders (just started, or a server lost) times out or says it is unavailable meanwhile.
pub(crate) async fn settle<
    T,
    E: std::fmt::Display,
    F: std::future::Future<Output = Result<T, E>>,
>(
    call: impl Fn() -> F,
) -> Result<T, E> {
    through_elections(Duration::from_secs(30), false, call).await
}

/// Runs a JetStream call until it answers, for up to `within`, while the error says the cluster
/// is electing leaders: timed out, temporarily unavailable, no responders, and, when
/// `stream_may_vanish`, a stream not found (what a KV bucket's stream looks like for a moment
/// after the server that led it was lost). Other errors, and the last one, are returned.
pub async fn through_elections<
    T,
    E: std::fmt::Display,
    F: std::future::Future<Output = Result<T, E>>,
>(
    within: Duration,
    stream_may_vanish: bool,
    call: impl Fn() -> F,
) -> Result<T, E> {
    let deadline = tokio::time::Instant::now() + within;
    let mut pause = Duration::from_millis(100);
    loop {
        match call().await {
            Err(e)
                if tokio::time::Instant::now() < deadline && {
                    let text = e.to_string();
                    text.contains("timed out")
                        || text.contains("temporarily unavailable")
                        || text.contains("no responders")
                        || (stream_may_vanish && text.contains("no stream found"))
                } =>
            {
                tracing::debug!(error = %e, "JetStream not ready; asking again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

/// The servers of a comma-separated URL list (`nats://a:4222,nats://b:4222`).
fn server_addrs(url: &str) -> Result<Vec<async_nats::ServerAddr>, BusError> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| BusError::Request {
                    subject: String::new(),
                    message: format!("NATS URL {u:?}: {e}"),
                })
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|v| {
            if v.is_empty() {
                Err(BusError::Request {
                    subject: String::new(),
                    message: "no NATS URL given".into(),
                })
            } else {
                Ok(v)
            }
        })
}

/// The replica count for what a connection creates: `MOTORPOOL_NATS_REPLICAS`, else 3 when the
/// cluster has three or more servers (counting the URLs this connection was `given` and the
/// peers the server named when it connected), else 1.
///
/// The server's count alone is not enough: a member whose routes are not up yet names no peers,
/// and a service started beside its cluster would create one-copy streams for good.
fn replicas(client: &async_nats::Client, given: usize) -> Result<usize, BusError> {
    if let Ok(v) = std::env::var("MOTORPOOL_NATS_REPLICAS") {
        return v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=5).contains(n))
            .ok_or_else(|| BusError::Request {
                subject: String::new(),
                message: format!("MOTORPOOL_NATS_REPLICAS={v:?}: must be 1 to 5"),
            });
    }
    let info = client.server_info();
    let servers = info.connect_urls.len().max(given);
    if servers < 3 && info.cluster.is_some() {
        tracing::warn!(
            cluster = ?info.cluster,
            servers,
            "Connected to a clustered NATS server that names fewer than three servers: streams \
             and buckets created now get one copy. Give every member's URL, or set \
             MOTORPOOL_NATS_REPLICAS"
        );
    }
    Ok(if servers >= 3 { 3 } else { 1 })
}

/// Every value of a KV bucket, decoded as `M`; values that do not decode (or vanish while
/// being listed) are skipped.
pub async fn kv_values<M: Message>(kv: &jetstream::kv::Store) -> Result<Vec<M>, BusError> {
    let mut keys = kv
        .keys()
        .await
        .map_err(|e| BusError::JetStream(format!("list keys: {e}")))?;
    let mut out = Vec::new();
    while let Some(Ok(k)) = keys.next().await {
        if let Ok(Some(b)) = kv.get(&k).await
            && let Ok(v) = codec::decode::<M>(&b)
        {
            out.push(v);
        }
    }
    Ok(out)
}

/// A subscription that yields typed messages; frames that do not decode are logged, counted and
/// skipped.
pub struct TypedSubscriber<M> {
    inner: async_nats::Subscriber,
    _m: PhantomData<M>,
}

impl<M: Message> TypedSubscriber<M> {
    /// The next well-formed message, or `None` when the subscription ends.
    pub async fn next(&mut self) -> Option<M> {
        self.next_from().await.map(|(_, m)| m)
    }

    /// [`TypedSubscriber::next`] with the last token of its subject: the id of the service that
    /// sent it, where the bus lets only that service publish there.
    pub async fn next_from(&mut self) -> Option<(String, M)> {
        loop {
            let msg = self.inner.next().await?;
            match codec::decode::<M>(&msg.payload) {
                Ok(m) => return Some((last_token(&msg.subject).to_string(), m)),
                Err(error) => {
                    metrics::counter!(crate::metric_names::BUS_MALFORMED_TOTAL, "message" => M::NAME)
                        .increment(1);
                    tracing::warn!(subject = %msg.subject, %error, "Dropped a malformed message");
                }
            }
        }
    }
}

/// The last `.`-separated token of a subject.
pub(crate) fn last_token(subject: &str) -> &str {
    subject.rsplit('.').next().unwrap_or(subject)
}

/// Makes `ring` the process's default TLS provider unless one is set. The NATS client builds its
/// TLS configuration from the process default, and rustls has none of its own once two
/// providers are compiled in (the object-store client brings `aws-lc-rs` beside the `ring` the
/// platform uses everywhere else).
pub fn ensure_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn calls_are_repeated_through_an_election_and_nothing_else() {
        // Two answers of a cluster electing leaders, then success.
        let calls = AtomicU32::new(0);
        let r: Result<u32, String> = through_elections(Duration::from_secs(15), true, || async {
            match calls.fetch_add(1, Ordering::Relaxed) {
                0 => Err("failed getting entry: no stream found for given subject".into()),
                1 => Err("JetStream system temporarily unavailable".into()),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(r, Ok(2));
        // A vanished stream is final where it may not vanish; so is any other error.
        for (may_vanish, error) in [(false, "no stream found"), (true, "wrong last sequence")] {
            let calls = AtomicU32::new(0);
            let r: Result<(), String> =
                through_elections(Duration::from_secs(15), may_vanish, || async {
                    calls.fetch_add(1, Ordering::Relaxed);
                    Err(error.to_string())
                })
                .await;
            assert_eq!(r, Err(error.to_string()));
            assert_eq!(calls.load(Ordering::Relaxed), 1, "{error}");
        }
        // An election that does not end gives up at the deadline with its last error.
        let calls = AtomicU32::new(0);
        let r: Result<(), String> = through_elections(Duration::from_secs(1), true, || async {
            calls.fetch_add(1, Ordering::Relaxed);
            Err("timed out".to_string())
        })
        .await;
        assert_eq!(r, Err("timed out".to_string()));
        assert!(calls.load(Ordering::Relaxed) > 2);
    }
}
