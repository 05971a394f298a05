//! The connected bus: typed publish, request/reply with timeouts, subscriptions, JetStream set-up.

use crate::Subject;
use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use motorpool_messages::{CodecError, Message, Request, WireError, codec};
use std::marker::PhantomData;
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
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl Bus {
    /// Connects as `name` (shown in the server's connection list). Reconnects forever in the
    /// background after the first success.
    pub async fn connect(
        url: &str,
        name: &str,
        request_timeout: Duration,
    ) -> Result<Bus, BusError> {
        let client = async_nats::ConnectOptions::new()
            .name(name)
            .request_timeout(Some(request_timeout))
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
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
        let jetstream = jetstream::new(client.clone());
        Ok(Bus {
            client,
            jetstream,
            request_timeout,
        })
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
        self.publish_raw(subject.as_str().to_string(), payload)
            .await
    }

    pub(crate) async fn publish_raw(
        &self,
        subject: String,
        payload: Bytes,
    ) -> Result<(), BusError> {
        metrics::counter!("motorpool_bus_sent_bytes_total").increment(payload.len() as u64);
        self.client
            .publish(subject.clone(), payload)
            .await
            .map_err(|e| BusError::Publish {
                subject,
                message: e.to_string(),
            })
    }

    /// Publishes a typed message to a JetStream stream and waits for the server to store it: for
    /// work that must not be lost.
    pub async fn enqueue<M: Message>(&self, subject: &Subject, msg: &M) -> Result<(), BusError> {
        let payload = Bytes::from(codec::encode(msg)?);
        let subject_name = subject.as_str().to_string();
        let ack = self
            .jetstream
            .publish(subject_name.clone(), payload)
            .await
            .map_err(|e| BusError::Publish {
                subject: subject_name.clone(),
                message: e.to_string(),
            })?;
        ack.await.map(|_| ()).map_err(|e| BusError::Publish {
            subject: subject_name,
            message: e.to_string(),
        })
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
        metrics::counter!("motorpool_bus_sent_bytes_total").increment(payload.len() as u64);
        let request = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(timeout));
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
        metrics::counter!("motorpool_bus_received_bytes_total")
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

    /// Creates (or updates to this configuration) a KV bucket.
    pub async fn ensure_kv(
        &self,
        config: jetstream::kv::Config,
    ) -> Result<jetstream::kv::Store, BusError> {
        let bucket = config.bucket.clone();
        self.jetstream
            .create_or_update_key_value(config)
            .await
            .map_err(|e| BusError::JetStream(format!("KV bucket {bucket}: {e}")))
    }

    /// Creates (or updates to this configuration) a stream.
    pub async fn ensure_stream(
        &self,
        config: jetstream::stream::Config,
    ) -> Result<jetstream::stream::Stream, BusError> {
        let name = config.name.clone();
        self.jetstream
            .create_or_update_stream(config)
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

/// A subscription that yields typed messages; frames that do not decode are logged, counted and
/// skipped.
pub struct TypedSubscriber<M> {
    inner: async_nats::Subscriber,
    _m: PhantomData<M>,
}

impl<M: Message> TypedSubscriber<M> {
    /// The next well-formed message, or `None` when the subscription ends.
    pub async fn next(&mut self) -> Option<M> {
        loop {
            let msg = self.inner.next().await?;
            match codec::decode::<M>(&msg.payload) {
                Ok(m) => return Some(m),
                Err(error) => {
                    metrics::counter!("motorpool_bus_malformed_total", "message" => M::NAME)
                        .increment(1);
                    tracing::warn!(subject = %msg.subject, %error, "Dropped a malformed message");
                }
            }
        }
    }
}
