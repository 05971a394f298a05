//! What one client may hold of the gateway: connections, and time without sending.
//!
//! - **Connections**: at most `max_connections` are served. Up to [`OVER_LIMIT_GRACE`] more are
//!   accepted only to be told so: every call on them gets RESOURCE_EXHAUSTED naming the limit
//!   (a client sees why, instead of a reset). Beyond that, connections are closed at accept.
//! - **Idle request bodies**: a call whose client stops sending its request (a stalled upload, a
//!   unary message announced and never finished) fails with DEADLINE_EXCEEDED after `idle`
//!   without a byte, and frees what it held.
//!
//! HTTP/2 keepalive (dead peers), `max_concurrent_streams` per connection and the message size
//! limit are tonic's own settings, applied where the server is built (`lib.rs`).

use bytes::Bytes;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

/// Connections past the limit that are still accepted, to be answered with a status.
pub const OVER_LIMIT_GRACE: usize = 64;

/// Counts open connections.
#[derive(Debug)]
pub struct Connections {
    open: AtomicUsize,
    limit: usize,
}

impl Connections {
    pub fn new(limit: usize) -> Arc<Connections> {
        Arc::new(Connections {
            open: AtomicUsize::new(0),
            limit: limit.max(1),
        })
    }

    /// Takes a place for a new connection: `None` when even the grace is used up (close it).
    pub fn admit(self: &Arc<Self>, stream: TcpStream) -> Option<Counted> {
        let n = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        if n > self.limit + OVER_LIMIT_GRACE {
            self.open.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!(crate::metric_names::GATEWAY_CONNECTIONS_REFUSED_TOTAL).increment(1);
            return None;
        }
        metrics::gauge!(crate::metric_names::GATEWAY_CONNECTIONS).set(n as f64);
        Some(Counted {
            stream,
            over: (n > self.limit).then_some(self.limit),
            connections: self.clone(),
        })
    }
}

/// An accepted connection, counted until it closes.
#[derive(Debug)]
pub struct Counted {
    stream: TcpStream,
    over: Option<usize>,
    connections: Arc<Connections>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let n = self.connections.open.fetch_sub(1, Ordering::AcqRel) - 1;
        metrics::gauge!(crate::metric_names::GATEWAY_CONNECTIONS).set(n as f64);
    }
}

/// What every call learns of its connection.
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    pub tcp: TcpConnectInfo,
    /// `Some(limit)` when this connection is past the connection limit.
    pub over_limit: Option<usize>,
}

impl Connected for Counted {
    type ConnectInfo = ConnectionInfo;
    fn connect_info(&self) -> ConnectionInfo {
        ConnectionInfo {
            tcp: self.stream.connect_info(),
            over_limit: self.over,
        }
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A request body that fails when its client sends nothing for `idle`.
pub struct IdleBody {
    inner: tonic::body::Body,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl IdleBody {
    pub fn new(inner: tonic::body::Body, idle: Duration) -> IdleBody {
        IdleBody {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

impl http_body::Body for IdleBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + this.idle;
                this.timer.as_mut().reset(deadline);
                Poll::Ready(frame)
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    metrics::counter!(crate::metric_names::GATEWAY_IDLE_REQUESTS_TOTAL)
                        .increment(1);
                    Poll::Ready(Some(Err(tonic::Status::deadline_exceeded(format!(
                        "the request sent nothing for {:?} (the gateway's bounds.idle_timeout_ms)",
                        this.idle
                    )))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

use std::future::Future;

/// Applies the bounds to every call.
#[derive(Clone, Debug)]
pub struct BoundsLayer {
    pub idle: Duration,
}

impl<S> tower_layer::Layer<S> for BoundsLayer {
    type Service = BoundsService<S>;
    fn layer(&self, inner: S) -> BoundsService<S> {
        BoundsService {
            inner,
            idle: self.idle,
        }
    }
}

#[derive(Clone, Debug)]
pub struct BoundsService<S> {
    inner: S,
    idle: Duration,
}

impl<S, R> Service<http::Request<tonic::body::Body>> for BoundsService<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<R>, Error = Infallible>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = Infallible;
    type Future = BoxFuture<http::Response<R>, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let ext = req.extensions();
        let info = ext.get::<ConnectionInfo>().or_else(|| {
            ext.get::<TlsConnectInfo<ConnectionInfo>>()
                .map(TlsConnectInfo::get_ref)
        });
        if let Some(limit) = info.and_then(|c| c.over_limit) {
            let status = tonic::Status::resource_exhausted(format!(
                "the gateway serves at most {limit} connections (its max_connections) and this \
                 one is over; close idle connections or retry later"
            ));
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let idle = self.idle;
        let req = req.map(|b| tonic::body::Body::new(IdleBody::new(b, idle)));
        Box::pin(self.inner.call(req))
    }
}
