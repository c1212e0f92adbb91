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

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_util::sync::CancellationToken;

mod activity;

use activity::{Activity, Counted, Watch, Watched};

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
        let io = TokioIo::new(Watched::new(io, Arc::clone(&activity)));
        let service = Counted::new(
            self.router.clone(),
            Arc::clone(&activity),
            self.draining.clone(),
        );
        let conn = self.builder.serve_connection(io, service);
        tokio::pin!(conn);
        let mut watch = Watch::new(accepted, self.limits.header_read_timeout);
        let timer = tokio::time::sleep_until(watch.deadline());
        tokio::pin!(timer);
        let mut closing = false;
        loop {
            tokio::select! {
                served = conn.as_mut() => {
                    if let Err(err) = served {
                        tracing::debug!(%err, "connection ended with an error");
                    }
                    // The stream's last bytes were hyper's, not yet the
                    // client's: a connection the client broke off means it
                    // left before reading them. (A stream cut before its
                    // end counts where its body is dropped.)
                    if activity.dropped_a_stream() {
                        crate::telemetry::disconnected();
                    }
                    return;
                }
                () = activity.changed() => {
                    if let Some(deadline) = watch.update(&activity, self.limits)
                        && !closing
                    {
                        timer.as_mut().reset(deadline);
                    }
                }
                () = &mut timer, if closing || !watch.busy() => {
                    if closing {
                        tracing::debug!("connection did not close in time; dropped");
                        return;
                    }
                    tracing::debug!(busy = watch.busy(), "connection timed out");
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
