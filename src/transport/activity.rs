//! What a connection's task knows of its connection: requests in flight,
//! counted by the service until their response bodies are done, and the
//! first byte of the next request, noticed by the socket; and the deadline
//! that follows from them.

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
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use super::{Limits, SHED_AFTER};

/// What the connection's reader and service tell its task.
pub(super) struct Activity {
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
    /// An event stream's body was handed to hyper whole on this
    /// connection: if the connection then breaks, its client may not have
    /// read the end.
    pub(super) stream_handed_over: AtomicBool,
    /// A read or write failed because the client broke the connection
    /// off (hyper takes a reset on an idle connection for a close).
    pub(super) broken: AtomicBool,
    wake: Notify,
}

impl Activity {
    fn note_error(&self, err: &io::Error) {
        if matches!(
            err.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionAborted
        ) {
            self.broken.store(true, Ordering::Release);
        }
    }

    /// Whether the connection ended with a client that left before it had
    /// read an event stream the server had handed over whole.
    pub(super) fn dropped_a_stream(&self) -> bool {
        self.broken.load(Ordering::Acquire) && self.stream_handed_over.load(Ordering::Acquire)
    }

    pub(super) fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            begun: AtomicUsize::new(0),
            awaiting_bytes: AtomicBool::new(true),
            stream_handed_over: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            http2: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }

    /// Resolves when a request begins or ends, or a first byte arrives.
    pub(super) fn changed(&self) -> Notified<'_> {
        self.wake.notified()
    }
}

/// The connection task's view of its timers.
pub(super) struct Watch {
    busy: bool,
    /// `Activity::begun` at the last look.
    begun: usize,
    /// When the connection last became idle (or was accepted).
    since: Instant,
    /// When an idle or half-sent connection is closed.
    deadline: Instant,
}

impl Watch {
    /// A connection accepted at `accepted`: its first head is due within
    /// `header_read_timeout`.
    pub(super) fn new(accepted: Instant, header_read_timeout: Duration) -> Self {
        Self {
            busy: false,
            begun: 0,
            since: accepted,
            deadline: accepted + header_read_timeout,
        }
    }

    pub(super) fn busy(&self) -> bool {
        self.busy
    }

    pub(super) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Follows a change of `activity`; returns the new deadline, if any.
    pub(super) fn update(&mut self, activity: &Activity, limits: Limits) -> Option<Instant> {
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
    pub(super) fn silent(&self, activity: &Activity) -> bool {
        !self.busy
            && activity.awaiting_bytes.load(Ordering::Acquire)
            && self.since.elapsed() >= SHED_AFTER
    }
}

/// The socket, telling `Activity` when a request's first byte arrives.
pub(super) struct Watched<I> {
    io: I,
    activity: Arc<Activity>,
}

impl<I> Watched<I> {
    pub(super) fn new(io: I, activity: Arc<Activity>) -> Self {
        Self { io, activity }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Err(err)) = &polled {
            self.activity.note_error(err);
        }
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
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Err(err)) = &polled {
            self.activity.note_error(err);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Err(err)) = &polled {
            self.activity.note_error(err);
        }
        polled
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
pub(super) struct Counted {
    router: Router,
    activity: Arc<Activity>,
    /// Cancelled when shutdown begins.
    draining: CancellationToken,
}

impl Counted {
    pub(super) fn new(
        router: Router,
        activity: Arc<Activity>,
        draining: CancellationToken,
    ) -> Self {
        Self {
            router,
            activity,
            draining,
        }
    }
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
            let stream = response
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            Ok(response.map(|body| {
                Body::new(Tracked {
                    body,
                    stream,
                    guard,
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
    /// An event stream: its end is noted on the connection.
    stream: bool,
    /// Counts the request in flight while the body lives.
    guard: InFlight,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if self.stream && matches!(polled, Poll::Ready(None)) {
            self.guard
                .0
                .stream_handed_over
                .store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        max_connections: 1,
    };

    fn first_byte(activity: &Activity) {
        activity.awaiting_bytes.store(false, Ordering::Release);
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_the_connection() {
        let activity = Arc::new(Activity::new());
        let accepted = Instant::now();
        let mut watch = Watch::new(accepted, LIMITS.header_read_timeout);
        assert_eq!(watch.deadline(), accepted + LIMITS.header_read_timeout);

        // The first head is due from the connection, not from its first byte.
        tokio::time::advance(Duration::from_secs(3)).await;
        first_byte(&activity);
        assert_eq!(watch.update(&activity, LIMITS), None);

        // Busy: no deadline. Done: idle from then.
        let request = InFlight::begin(&activity);
        assert_eq!(watch.update(&activity, LIMITS), None);
        assert!(watch.busy());
        tokio::time::advance(Duration::from_secs(100)).await;
        drop(request);
        let done = Instant::now();
        assert_eq!(
            watch.update(&activity, LIMITS),
            Some(done + LIMITS.idle_timeout)
        );

        // The next request's first byte brings the head deadline forward.
        tokio::time::advance(Duration::from_secs(20)).await;
        first_byte(&activity);
        let head = Instant::now() + LIMITS.header_read_timeout;
        assert_eq!(watch.update(&activity, LIMITS), Some(head));

        // A request that came and went between two looks is not missed.
        drop(InFlight::begin(&activity));
        tokio::time::advance(Duration::from_secs(1)).await;
        let idle = Instant::now() + LIMITS.idle_timeout;
        assert_eq!(watch.update(&activity, LIMITS), Some(idle));
    }

    #[tokio::test(start_paused = true)]
    async fn http2_frames_between_requests_are_no_head_and_silence_is_shed() {
        let activity = Arc::new(Activity::new());
        let mut watch = Watch::new(Instant::now(), LIMITS.header_read_timeout);
        assert!(!watch.silent(&activity), "not silent for long enough yet");
        tokio::time::advance(SHED_AFTER).await;
        assert!(watch.silent(&activity));

        first_byte(&activity);
        activity.http2.store(true, Ordering::Release);
        drop(InFlight::begin(&activity));
        let idle = Instant::now() + LIMITS.idle_timeout;
        assert_eq!(watch.update(&activity, LIMITS), Some(idle));
        first_byte(&activity);
        assert_eq!(watch.update(&activity, LIMITS), None, "a ping is no head");
        tokio::time::advance(SHED_AFTER).await;
        assert!(!watch.silent(&activity), "it has sent something");
    }
}
