//! A typed mailbox: the request side of an actor. A (queue-group) subscription whose requests are
//! decoded, handled with bounded concurrency, and answered; a frame that does not decode is
//! answered with an `InvalidArgument` error that says why, and never reaches the handler.

use crate::{Bus, BusError, Subject};
use bytes::Bytes;
use futures::StreamExt;
use motorpool_messages::{Request, WireError, codec};
use std::future::Future;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How a mailbox takes its work.
#[derive(Clone, Debug)]
pub struct MailboxOptions {
    /// Queue group: one member of the group handles each request. `None` = every subscriber does.
    pub queue_group: Option<String>,
    /// Requests handled at once; further ones wait in the subscription's buffer.
    pub concurrency: usize,
}

impl Default for MailboxOptions {
    fn default() -> Self {
        MailboxOptions {
            queue_group: None,
            concurrency: 64,
        }
    }
}

/// Serves `R` requests on `subject` until `shutdown` fires, then waits for in-flight handlers.
pub async fn serve<R, F, Fut>(
    bus: &Bus,
    subject: Subject,
    options: MailboxOptions,
    shutdown: CancellationToken,
    handler: F,
) -> Result<JoinHandle<()>, BusError>
where
    R: Request,
    F: Fn(R) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R::Reply, WireError>> + Send + 'static,
{
    serve_from(bus, subject, options, shutdown, move |_, req| handler(req)).await
}

/// [`serve`] for a wildcard subject whose last token names the sender (`job.done.<worker>`):
/// the handler gets that token with each request. Where the bus's permissions let only that
/// sender publish there, the token is who sent it, whatever the message claims.
pub async fn serve_from<R, F, Fut>(
    bus: &Bus,
    subject: Subject,
    options: MailboxOptions,
    shutdown: CancellationToken,
    handler: F,
) -> Result<JoinHandle<()>, BusError>
where
    R: Request,
    F: Fn(String, R) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R::Reply, WireError>> + Send + 'static,
{
    let mut sub = bus
        .raw_subscribe(&subject, options.queue_group.as_deref())
        .await?;
    let bus = bus.clone();
    let handler = Arc::new(handler);
    let capacity = options.concurrency.max(1);
    let permits = Arc::new(Semaphore::new(capacity));
    Ok(tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = sub.next() => match m { Some(m) => m, None => break },
            };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let Some(reply_to) = msg.reply.clone() else {
                tracing::warn!(subject = %msg.subject, "Dropped a request without a reply subject");
                continue;
            };
            let bus = bus.clone();
            let handler = handler.clone();
            let span = crate::trace::follow(msg.headers.as_ref(), || {
                tracing::info_span!(
                    "bus.request",
                    otel.name = R::NAME,
                    otel.kind = "server",
                    messaging.system = "nats",
                    messaging.destination.name = %msg.subject,
                )
            });
            let work = async move {
                let _permit = permit;
                let answer: Result<R::Reply, WireError> = match codec::decode::<R>(&msg.payload) {
                    Ok(req) => {
                        let sender = crate::bus::last_token(&msg.subject).to_string();
                        handler(sender, req).await
                    }
                    Err(e) => {
                        metrics::counter!(crate::metric_names::BUS_MALFORMED_TOTAL, "message" => R::NAME)
                            .increment(1);
                        Err(WireError::invalid(e.to_string()))
                    }
                };
                let frame = codec::encode(&answer).unwrap_or_else(|e| {
                    let err: Result<R::Reply, WireError> = Err(WireError::internal(e.to_string()));
                    codec::encode(&err).unwrap_or_default()
                });
                if let Err(error) = bus
                    .publish_raw(reply_to.to_string(), Bytes::from(frame), None)
                    .await
                {
                    tracing::warn!(%error, "Could not answer a request");
                }
            };
            tokio::spawn(tracing::Instrument::instrument(work, span));
        }
        let _ = sub.unsubscribe().await;
        // Wait for in-flight handlers to answer.
        let _ = permits.acquire_many(capacity as u32).await;
    }))
}
