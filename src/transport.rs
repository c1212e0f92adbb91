//! Client connections: HTTP/1.1 and h2c (or TLS with ALPN) on one port, a
//! cap on open connections, the header-read and idle timeouts, backoff on
//! accept errors, and closing every connection once the drain is over.
//!
//! hyper's own HTTP/1 header timer is left off: it also runs while a
//! kept-alive connection waits for its next request, so it cannot be shorter
//! than the idle timeout. Each connection's task watches instead (as Go's
//! `net/http` does): a new connection must complete its first request head
//! within the header-read timeout; between requests it may stay silent for
//! the idle timeout, and once the next request's first byte arrives its head
//! must be complete within the header-read timeout. Request bodies have
//! their own deadline where they are read (`api::extract`).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::http::{HeaderValue, Request, Response, Version, header};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// How long a connection told to close may take to finish its response
/// before it is dropped.
const CLOSE_MARGIN: Duration = Duration::from_secs(1);
/// At the connection cap, a connection that has sent nothing for this long
/// is closed to make room.
const SHED_AFTER: Duration = Duration::from_secs(1);
/// Accept errors (out of descriptors) back off from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));
/// hyper's HTTP/1 buffer cap (its default is ~400 KB). It bounds a request
/// head; an idle connection holds far less.
pub const MAX_HEAD_BYTES: usize = 32 * 1024;
/// HTTP/2 pings find a vanished peer of a quiet connection.
const H2_PING: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(20));
/// Descriptors kept back from the connection cap for upstream connections,
/// logs and the model file.
const DESCRIPTOR_RESERVE: usize = 64;

/// Limits on each connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// The connection cap when none is configured: half of what the descriptor
/// limit leaves (a relayed stream may hold an upstream socket too), at most
/// 10000.
pub fn default_max_connections() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|n| n.parse::<usize>().ok())
        });
    match soft {
        Some(soft) => (soft.saturating_sub(DESCRIPTOR_RESERVE) / 2).clamp(1, 10_000),
        None => 10_000,
    }
}

/// Serves connections until `close_all`; shared by the accept loop and every
/// connection task.
pub struct Connections {
    router: Router,
    builder: Builder<TokioExecutor>,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    permits: Arc<Semaphore>,
    /// Cancelled when shutdown begins: HTTP/1 answers from then on carry
    /// `Connection: close`.
    draining: CancellationToken,
    /// Cancelled when the drain is over: every connection closes.
    close: CancellationToken,
    /// Woken at the connection cap: connections that have sent nothing for
    /// `SHED_AFTER` close.
    shed: Notify,
}

impl Connections {
    pub fn new(
        router: Router,
        tls: Option<Arc<ServerConfig>>,
        limits: Limits,
        draining: CancellationToken,
    ) -> Arc<Self> {
        let mut builder = Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size(MAX_HEAD_BYTES)
            // Queue body chunks rather than copying them into one buffer
            // that then stays at its largest size.
            .writev(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(H2_PING.0)
            .keep_alive_timeout(H2_PING.1);
        Arc::new(Self {
            router,
            builder,
            limits,
            tls: tls.map(TlsAcceptor::from),
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            draining,
            close: CancellationToken::new(),
            shed: Notify::new(),
        })
    }

    /// Accepts connections until `stop` resolves, then drops the listener.
    pub async fn accept(self: &Arc<Self>, listener: TcpListener, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut backoff = Duration::ZERO;
        let mut at_cap = false;
        loop {
            let permit = match Arc::clone(&self.permits).try_acquire_owned() {
                Ok(permit) => {
                    at_cap = false;
                    permit
                }
                Err(_) => {
                    if !at_cap {
                        tracing::warn!(
                            max_connections = self.limits.max_connections,
                            "connection limit reached; closing connections that send nothing"
                        );
                        at_cap = true;
                    }
                    self.shed.notify_waiters();
                    let freed = Arc::clone(&self.permits).acquire_owned();
                    tokio::select! {
                        () = &mut stop => return,
                        freed = tokio::time::timeout(SHED_AFTER, freed) => match freed {
                            Ok(Ok(permit)) => permit,
                            _ => continue,
                        },
                    }
                }
            };
            let accepted = tokio::select! {
                () = &mut stop => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((tcp, _)) => {
                    backoff = Duration::ZERO;
                    // Each token is a small write that must leave at once:
                    // without NODELAY, Nagle holds it for the client's
                    // delayed ACK (~40 ms).
                    if let Err(err) = tcp.set_nodelay(true) {
                        tracing::debug!(%err, "cannot set TCP_NODELAY");
                    }
                    tokio::spawn(Arc::clone(self).connection(tcp, permit));
                }
                // The client gave up before it was accepted: nothing to wait for.
                Err(err) if is_per_connection(&err) => {}
                Err(err) => {
                    backoff = (backoff * 2).clamp(BACKOFF.0, BACKOFF.1);
                    if backoff == BACKOFF.0 {
                        tracing::warn!(%err, "accept failed; backing off");
                    } else {
                        tracing::debug!(%err, ?backoff, "accept failed again");
                    }
                    // Out of descriptors: silent connections give theirs back.
                    self.shed.notify_waiters();
                    drop(permit);
                    tokio::select! {
                        () = &mut stop => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                }
            }
        }
    }

    /// Tells every connection to close once its current response is done,
    /// and waits until they have, at most `CLOSE_MARGIN` and a little more.
    pub async fn close_all(&self) {
        self.close.cancel();
        let all = u32::try_from(self.limits.max_connections).unwrap_or(u32::MAX);
        let closed = self.permits.acquire_many(all);
        if tokio::time::timeout(CLOSE_MARGIN * 2, closed)
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.limits.max_connections - self.permits.available_permits(),
                "connections still open after the drain; leaving them"
            );
        }
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, permit: OwnedSemaphorePermit) {
        let accepted = Instant::now();
        match &self.tls {
            None => self.drive(tcp, accepted).await,
            // Boxed, so that a plain connection's task is not sized for
            // TLS state it never has.
            Some(acceptor) => {
                let deadline = accepted + self.limits.header_read_timeout;
                let handshake = Box::pin(tokio::time::timeout_at(deadline, acceptor.accept(tcp)));
                let handshake = tokio::select! {
                    () = self.close.cancelled() => return,
                    tls = handshake => tls,
                };
                match handshake {
                    Ok(Ok(tls)) => Box::pin(self.drive(tls, accepted)).await,
                    Ok(Err(err)) => tracing::debug!(%err, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            }
        }
        drop(permit);
    }

    /// Serves one connection until it ends, times out, is shed or is told
    /// to close.
    async fn drive<I>(&self, io: I, accepted: Instant)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Watched {
            io,
            activity: Arc::clone(&activity),
        });
        let service = Counted {
            router: self.router.clone(),
            activity: Arc::clone(&activity),
            draining: self.draining.clone(),
        };
        let conn = self.builder.serve_connection(io, service);
        tokio::pin!(conn);
        let mut watch = Watch {
            busy: false,
            begun: 0,
            since: accepted,
            deadline: accepted + self.limits.header_read_timeout,
        };
        let timer = tokio::time::sleep_until(watch.deadline);
        tokio::pin!(timer);
        let mut closing = false;
        loop {
            tokio::select! {
                served = conn.as_mut() => {
                    if let Err(err) = served {
                        tracing::debug!(%err, "connection ended with an error");
                    }
                    return;
                }
                () = activity.wake.notified() => {
                    if let Some(deadline) = watch.update(&activity, self.limits)
                        && !closing
                    {
                        timer.as_mut().reset(deadline);
                    }
                }
                () = &mut timer, if closing || !watch.busy => {
                    if closing {
                        tracing::debug!("connection did not close in time; dropped");
                        return;
                    }
                    tracing::debug!(busy = watch.busy, "connection timed out");
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                    timer.as_mut().reset(Instant::now() + CLOSE_MARGIN);
                }
                // Checked once woken: a guard would be read only when the
                // loop comes round, which for a silent connection is never.
                () = self.shed.notified(), if !closing => {
                    if watch.silent(&activity) {
                        tracing::debug!("silent connection shed at the connection limit");
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                        timer.as_mut().reset(Instant::now() + CLOSE_MARGIN);
                    }
                }
                () = self.close.cancelled(), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                    timer.as_mut().reset(Instant::now() + CLOSE_MARGIN);
                }
            }
        }
    }
}

/// `accept` errors that concern one connection, not the listener.
fn is_per_connection(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// What the connection's reader and service tell its task.
struct Activity {
    /// Requests whose response has not been fully sent.
    in_flight: AtomicUsize,
    /// Requests begun, so that one that came and went between two looks is
    /// not missed.
    begun: AtomicUsize,
    /// Set while the connection waits for the first byte of a request;
    /// the reader clears it and wakes the task.
    awaiting_bytes: AtomicBool,
    /// The connection has carried an HTTP/2 request: its frames between
    /// requests (pings, window updates) are no request head.
    http2: AtomicBool,
    wake: Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            begun: AtomicUsize::new(0),
            awaiting_bytes: AtomicBool::new(true),
            http2: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }
}

/// The connection task's view of its timers.
struct Watch {
    busy: bool,
    /// `Activity::begun` at the last look.
    begun: usize,
    /// When the connection last became idle (or was accepted).
    since: Instant,
    /// When an idle or half-sent connection is closed.
    deadline: Instant,
}

impl Watch {
    /// Follows a change of `activity`; returns the new deadline, if any.
    fn update(&mut self, activity: &Activity, limits: Limits) -> Option<Instant> {
        let now = Instant::now();
        // `begun` first: a request counted there is already in flight.
        let begun = activity.begun.load(Ordering::Acquire);
        let served = std::mem::replace(&mut self.begun, begun) != begun;
        if activity.in_flight.load(Ordering::Acquire) > 0 {
            self.busy = true;
            return None;
        }
        if self.busy || served {
            self.busy = false;
            self.since = now;
            self.deadline = now + limits.idle_timeout;
            return Some(self.deadline);
        }
        let head_begun = !activity.awaiting_bytes.load(Ordering::Acquire)
            && !activity.http2.load(Ordering::Acquire);
        let head_deadline = now + limits.header_read_timeout;
        if head_begun && head_deadline < self.deadline {
            self.deadline = head_deadline;
            return Some(head_deadline);
        }
        None
    }

    /// Idle, has sent nothing since, and for long enough to be shed.
    fn silent(&self, activity: &Activity) -> bool {
        !self.busy
            && activity.awaiting_bytes.load(Ordering::Acquire)
            && self.since.elapsed() >= SHED_AFTER
    }
}

/// The socket, telling `Activity` when a request's first byte arrives.
struct Watched<I> {
    io: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before
            && self.activity.awaiting_bytes.load(Ordering::Relaxed)
            && self.activity.awaiting_bytes.swap(false, Ordering::AcqRel)
        {
            self.activity.wake.notify_one();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The router, counting each request as in flight until its response body
/// has been sent (or dropped).
#[derive(Clone)]
struct Counted {
    router: Router,
    activity: Arc<Activity>,
    draining: CancellationToken,
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for Counted {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Answer;

    fn call(&self, req: Request<Incoming>) -> Answer {
        let guard = InFlight::begin(&self.activity);
        let http1 = req.version() < Version::HTTP_2;
        if !http1 {
            self.activity.http2.store(true, Ordering::Release);
        }
        let router = self.router.clone();
        let draining = self.draining.clone();
        Box::pin(async move {
            let mut response = router.oneshot(req).await?;
            if http1 && draining.is_cancelled() {
                // Shutting down: the client should take its next request
                // elsewhere.
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(response.map(|body| {
                Body::new(Tracked {
                    body,
                    _guard: guard,
                })
            }))
        })
    }
}

/// One request in flight on its connection.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.begun.fetch_add(1, Ordering::AcqRel);
        activity.wake.notify_one();
        Self(Arc::clone(activity))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Armed before the count drops, so a byte of the next request that
        // arrives at once is noticed.
        self.0.awaiting_bytes.store(true, Ordering::Release);
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.wake.notify_one();
        }
    }
}

/// A response body that holds its request's `InFlight`.
struct Tracked {
    body: Body,
    _guard: InFlight,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
