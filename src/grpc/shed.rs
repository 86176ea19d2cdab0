//! Load shedding: at most `in_flight_requests_max` requests are served at once over
//! every connection; the next one is answered at once with UNAVAILABLE / OVERLOADED and a
//! RetryInfo, instead of queueing until everything is slow.
//!
//! A call with one request message counts from when its message has arrived (a client
//! that sends the headers and never the message holds no place, only its stream, until
//! `message_receive_timeout_ms`; what it holds until its reply is bounded by
//! `grpc::receiving`): a one-reply call until its reply is ready (a client that never
//! reads it holds nothing), a streaming reply ([`STREAMING_REPLIES`]) until the stream
//! ends, so it is admitted by its own bound too: exports by `exports_max`, reflection
//! and health watches by their own small pools ([`Shed::streams_only`] takes no place
//! for health checks, and holds a peer to `health_watches_per_peer_max` of its
//! watches). A streamed request ([`STREAMED_REQUESTS`]: an import, reflection) counts
//! from its headers, an import within a pool of its own too (`imports_max`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;

use crate::grpc::auth::Caller;
use crate::grpc::connections;
use crate::grpc::peers::{PeerCaps, PeerPlace, Peers};
use crate::grpc::receiving::{self, Receiving};
use crate::grpc::stream_end;
use crate::service::exports::{ExportKind, ExportPermit, Exports};

/// The methods whose reply is a stream the client may keep open.
pub const STREAMING_REPLIES: &[&str] = &[
    "/prenota.v1.CapacityService/ExportBookings",
    "/prenota.v1.CapacityService/ExportAuditLog",
    "/prenota.v1.CapacityService/ExportBackup",
    "/prenota.v1.CapacityService/ExportRegistrations",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.health.v1.Health/Watch",
];

/// The methods whose request is a stream of messages (not received whole first).
pub const STREAMED_REQUESTS: &[&str] = &[
    "/prenota.v1.CapacityService/ImportCapacity",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

fn streams(path: &str) -> bool {
    STREAMING_REPLIES.contains(&path)
}

/// Every method whose reply is a stream: once shutdown begins each ends with
/// UNAVAILABLE / SHUTTING_DOWN (the graceful drain waits for every stream, and health
/// and reflection streams never end by themselves).
fn ends_at_shutdown(path: &str) -> bool {
    streams(path)
        || path == "/prenota.v1.BookingService/WatchAvailability"
        || path == "/prenota.v1.CapacityService/WatchEvents"
}

#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    permits: Arc<Semaphore>,
    /// One-reply calls take a permit too, once their message has arrived; `false`: only
    /// streams do.
    unary_counted: bool,
    /// A one-message call's message is received, under `receiving`'s budgets, before the
    /// call is served: at most this many bytes.
    message_bytes_max: receiving::MessageLimit,
    receiving: Arc<Receiving>,
    /// When set, a peer's streams hold at most so many of the permits.
    peers: Option<Arc<Peers>>,
    /// When set, a streamed request (an import) also takes one of these places, in all
    /// and of its caller's (by token), so requests counted from their headers hold only
    /// so many of the permits, and one token not all of those.
    streamed: Option<Arc<Exports>>,
    /// When set, turns true when shutdown begins: reply streams end then.
    closing: Option<watch::Receiver<bool>>,
    /// When set, a listed load balancer's own connection's streams, and a listed health
    /// checker's (`connections::checks_apart`), take these instead of `permits`, and no
    /// peer's place: others filling `permits` never shed the health watches they rely on.
    apart: Option<Arc<Semaphore>>,
}

/// What a counted call holds until its reply is ready (or its reply stream ends).
struct Place {
    _permit: OwnedSemaphorePermit,
    _peer: Option<PeerPlace>,
    _streamed: Option<ExportPermit>,
}

impl Place {
    fn of(permit: OwnedSemaphorePermit) -> Self {
        Self {
            _permit: permit,
            _peer: None,
            _streamed: None,
        }
    }
}

impl<S> Shed<S> {
    /// Every call takes one of `permits` (shared by every service it wraps); a
    /// one-message call once its message of at most `message_bytes_max` has arrived.
    pub fn new(
        inner: S,
        permits: Arc<Semaphore>,
        (message_bytes_max, receiving): (usize, &Arc<Receiving>),
    ) -> Self {
        Self {
            inner,
            permits,
            unary_counted: true,
            message_bytes_max: (message_bytes_max, "message_size_bytes_max"),
            receiving: Arc::clone(receiving),
            peers: None,
            streamed: None,
            closing: None,
            apart: None,
        }
    }

    /// Streamed requests (imports) also take one of `pool`'s places (by their caller's
    /// token): however they stall, they hold at most that many of the permits.
    pub fn with_streamed_pool(self, pool: &Arc<Exports>) -> Self {
        let streamed = Some(Arc::clone(pool));
        Self { streamed, ..self }
    }

    /// Only streaming replies take one of `permits`, within `per_peer`'s caps (a peer's,
    /// an IPv6 /48's); one-reply calls pass once their message (at most
    /// `message_bytes_max`) has arrived.
    pub fn streams_only(
        inner: S,
        (permits, per_peer): (Arc<Semaphore>, PeerCaps),
        (message_bytes_max, receiving): (usize, &Arc<Receiving>),
    ) -> Self {
        Self {
            inner,
            permits,
            unary_counted: false,
            message_bytes_max: (message_bytes_max, "probe_message_size_bytes_max"),
            receiving: Arc::clone(receiving),
            peers: per_peer.peers(),
            streamed: None,
            closing: None,
            apart: None,
        }
    }

    /// Listed balancers' and checkers' streams take `permits` instead (see `apart`).
    pub fn apart_for_checkers(self, permits: Arc<Semaphore>) -> Self {
        Self {
            apart: Some(permits),
            ..self
        }
    }

    /// Reply streams end with UNAVAILABLE / SHUTTING_DOWN once `closing` turns true.
    pub fn ending_streams_on(self, closing: watch::Receiver<bool>) -> Self {
        Self {
            closing: Some(closing),
            ..self
        }
    }
}

/// A call as tonic's router takes it, and its reply.
type Call = http::Request<tonic::body::Body>;
type Reply = http::Response<tonic::body::Body>;

/// What a `Shed` wraps: tonic's router of the services.
pub trait Routes:
    Service<Call, Response = Reply, Future: Send + 'static> + Clone + Send + 'static
{
}

impl<S: Service<Call, Response = Reply, Future: Send + 'static> + Clone + Send + 'static> Routes
    for S
{
}

type ShedFuture<S> = BoxFuture<Reply, <S as Service<Call>>::Error>;

impl<S: Routes, B> Service<http::Request<B>> for Shed<S>
where
    B: http_body::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = Reply;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let (streaming, streamed) = (streams(path), STREAMED_REQUESTS.contains(&path));
        let closing = match ends_at_shutdown(path) {
            true => self.closing.clone(),
            false => None,
        };
        let request = request.map(tonic::body::Body::new);
        let request = match streamed {
            true => stream_end::watched(request),
            false => request,
        };
        // A stream both ways (reflection) ends once its request stream does.
        let request = match (&closing, streamed) {
            (Some(closing), true) => request.map(|inner| {
                tonic::body::Body::new(EndedAtShutdown::request(inner, closing.clone()))
            }),
            _ => request,
        };
        let reply = match streamed || (streaming && !self.unary_counted) {
            true => self.call_counted(request, (streaming, streamed)),
            false => self.call_once_received(request, streaming),
        };
        match closing {
            None => reply,
            Some(closing) => Box::pin(async move {
                let reply = reply.await?;
                Ok(reply
                    .map(|inner| tonic::body::Body::new(EndedAtShutdown::reply(inner, closing))))
            }),
        }
    }
}

impl<S: Routes> Shed<S> {
    /// A call with one request message: it is received (at most `message_bytes_max`,
    /// under `receiving`'s budgets, which it holds until its reply's message has been
    /// written: `receiving::held_until_sent`) before the
    /// call takes a place (when one-reply calls are counted, or it is `streaming`),
    /// which it holds until its reply is ready, or, when `streaming`, until its reply
    /// stream ends.
    fn call_once_received(&mut self, request: Call, streaming: bool) -> ShedFuture<S> {
        // The clone is ready for the next call; this one was readied by `poll_ready`.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let permits = self.unary_counted.then(|| Arc::clone(&self.permits));
        let (message_bytes_max, receiving) = (self.message_bytes_max, Arc::clone(&self.receiving));
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let closer = connections::closer_of_call(&parts.extensions);
            let Some(mut reserved) = receiving.reserve(&parts) else {
                return Ok(shed());
            };
            let received = match receiving::receive(body, message_bytes_max, &mut reserved).await {
                Ok(received) => received,
                Err(refused) => return Ok(refused.into_http()),
            };
            let body = tonic::body::Body::new(http_body_util::Full::new(received));
            let request = http::Request::from_parts(parts, body);
            let permit = match permits.map(Semaphore::try_acquire_owned) {
                None => None,
                Some(Ok(permit)) => Some(permit),
                Some(Err(_)) => return Ok(shed()),
            };
            let response = inner.call(request).await?;
            let response = match streaming {
                false => receiving::held_until_sent(response, reserved, closer),
                true => response, // `reserved` given back: its headers are ready
            };
            Ok(match permit {
                Some(permit) => counted(response, Place::of(permit), streaming),
                None => response,
            })
        })
    }

    /// A call that counts from its headers: a streaming reply until its stream ends, a
    /// streamed request until its reply is ready.
    fn call_counted(
        &mut self,
        request: Call,
        (streaming, streamed): (bool, bool),
    ) -> ShedFuture<S> {
        let Some(place) = self.place_from_headers(request.extensions(), streamed) else {
            let refused = shed();
            return Box::pin(async move { Ok(refused) });
        };
        let response = self.inner.call(request);
        Box::pin(async move { Ok(counted(response.await?, place, streaming)) })
    }

    /// The places of a call counted from its headers: its peer's (when peers are
    /// counted), its pool's (a `streamed` request, when there is one: by the caller the
    /// gate recorded) and a permit; `None` when one is full (or its address is gone: a
    /// dead socket).
    fn place_from_headers(&self, extensions: &http::Extensions, streamed: bool) -> Option<Place> {
        if let Some(apart) = (self.apart.as_ref()).filter(|_| connections::checks_apart(extensions))
        {
            return Some(Place::of(Arc::clone(apart).try_acquire_owned().ok()?));
        }
        let peer = match &self.peers {
            None => None,
            Some(peers) => Some(Peers::enter(peers, connections::peer_address(extensions)?).ok()?),
        };
        let streamed = match (&self.streamed, streamed) {
            (Some(pool), true) => {
                let caller = extensions.get::<Caller>();
                debug_assert!(caller.is_some(), "the gate records every caller");
                let token = caller?.actor();
                Some(pool.admit(&token, ExportKind::Records).ok()?)
            }
            _ => None,
        };
        let permit = Arc::clone(&self.permits).try_acquire_owned().ok()?;
        Some(Place {
            _permit: permit,
            _peer: peer,
            _streamed: streamed,
        })
    }
}

/// `response`, holding its place until its stream ends when `streaming`; else the reply
/// is ready and the place goes here.
fn counted(response: Reply, place: Place, streaming: bool) -> Reply {
    match streaming {
        true => response.map(|inner| tonic::body::Body::new(Counted { inner, place })),
        false => response,
    }
}

/// The answer to a call past `in_flight_requests_max` (or a pool, or a budget of
/// `grpc::receiving`): UNAVAILABLE / OVERLOADED.
fn shed() -> Reply {
    receiving::shed().into_http()
}

/// A response body that holds its request's place until it is dropped.
struct Counted {
    inner: tonic::body::Body,
    place: Place,
}

impl http_body::Body for Counted {
    type Data = <tonic::body::Body as http_body::Body>::Data;
    type Error = <tonic::body::Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let _counted = &self.place;
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A reply stream that ends with UNAVAILABLE / SHUTTING_DOWN once shutdown begins: at
/// once when it has nothing ready, else after the one message it had (a health watch's
/// NOT_SERVING). A reply whose producer stopped for the shutdown first ends OK by
/// itself: that end is replaced too, so a reader never takes a stream cut short for a
/// whole one (a complete export ending at that instant is read again: safe). As a
/// request stream, it just ends.
struct EndedAtShutdown {
    inner: tonic::body::Body,
    /// Wakes the stream when shutdown begins.
    closing: Option<BoxFuture<(), std::convert::Infallible>>,
    /// Whether it has begun, read directly: `send_replace` stores the value before it
    /// wakes the waits one notify shard after another, so a producer woken first may
    /// end the stream while this one's wait still polls Pending.
    closing_now: watch::Receiver<bool>,
    state: Ending,
    /// A reply ends with the trailers; a request without.
    reply: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ending {
    Open,
    /// Shutdown began: the trailers go next.
    Closing,
    Ended,
}

impl EndedAtShutdown {
    fn reply(inner: tonic::body::Body, closing: watch::Receiver<bool>) -> Self {
        Self::new(inner, closing, true)
    }

    fn request(inner: tonic::body::Body, closing: watch::Receiver<bool>) -> Self {
        Self::new(inner, closing, false)
    }

    fn new(inner: tonic::body::Body, mut closing: watch::Receiver<bool>, reply: bool) -> Self {
        let closing_now = closing.clone();
        let closing: BoxFuture<(), std::convert::Infallible> = Box::pin(async move {
            // An error: the sender is gone, so is the server.
            let _ = closing.wait_for(|closing| *closing).await;
            Ok(())
        });
        Self {
            inner,
            closing: Some(closing),
            closing_now,
            state: Ending::Open,
            reply,
        }
    }

    /// The end: the trailers of a reply, nothing more of a request.
    fn end(
        &mut self,
    ) -> Poll<Option<Result<http_body::Frame<tonic::codegen::Bytes>, tonic::Status>>> {
        self.state = Ending::Ended;
        match self.reply {
            true => Poll::Ready(Some(Ok(http_body::Frame::trailers(
                shutting_down_trailers(),
            )))),
            false => Poll::Ready(None),
        }
    }

    /// Whether shutdown has begun (polls the wait until it has, then never again).
    fn closed(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(closing) = self.closing.as_mut() else {
            return true;
        };
        if closing.as_mut().poll(cx).is_pending() && !self.closing_now() {
            return false;
        }
        self.closing = None;
        true
    }

    fn closing_now(&self) -> bool {
        *self.closing_now.borrow()
    }
}

/// Whether `frame` is the trailers of a reply that ended OK.
fn ends_ok<T>(frame: &http_body::Frame<T>) -> bool {
    frame
        .trailers_ref()
        .and_then(|trailers| trailers.get("grpc-status"))
        .is_some_and(|status| status == "0")
}

fn shutting_down_trailers() -> http::HeaderMap {
    let status = tonic::Status::from(crate::service::error::ServiceError::from(
        crate::store::StoreError::Closed,
    ));
    let mut trailers = http::HeaderMap::new();
    // Only fails on a message that is not a header value; this one is.
    let _ = status.add_header(&mut trailers);
    trailers
}

impl http_body::Body for EndedAtShutdown {
    type Data = <tonic::body::Body as http_body::Body>::Data;
    type Error = <tonic::body::Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        match self.state {
            Ending::Ended => return Poll::Ready(None),
            Ending::Closing => return self.end(),
            Ending::Open => {}
        }
        let closed = self.closed(cx);
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) if frame.is_data() && closed => {
                self.state = Ending::Closing;
                Poll::Ready(Some(Ok(frame)))
            }
            // Its producer ended it because shutdown began (stored before any wake).
            Poll::Ready(Some(Ok(frame))) if ends_ok(&frame) && (closed || self.closing_now()) => {
                self.end()
            }
            Poll::Pending if closed => self.end(),
            Poll::Ready(None) => {
                self.state = Ending::Ended;
                Poll::Ready(None)
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        match self.state {
            Ending::Ended => true,
            Ending::Closing => false,
            Ending::Open => self.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<S: NamedService> NamedService for Shed<S> {
    const NAME: &'static str = S::NAME;
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::future::{ready, Ready};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tonic::codegen::Bytes;

    use super::*;

    /// Notes what the budget has free while it serves a call.
    #[derive(Clone)]
    struct Observe {
        receiving: Arc<Receiving>,
        free_while_served: Arc<AtomicUsize>,
    }

    impl Service<http::Request<tonic::body::Body>> for Observe {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
            let free = self.receiving.available();
            self.free_while_served.store(free, Ordering::SeqCst);
            ready(Ok(http::Response::new(tonic::body::Body::empty())))
        }
    }

    /// The frames `body` yields until it ends.
    async fn frames(mut body: EndedAtShutdown) -> Vec<http_body::Frame<Bytes>> {
        let mut frames = Vec::new();
        use http_body::Body as _;
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            frames.push(frame.expect("a frame"));
        }
        frames
    }

    /// A reply whose producer stopped for the shutdown (its messages all read, its
    /// stream ended, so tonic ends it OK) ends UNAVAILABLE / SHUTTING_DOWN; the same
    /// reply before shutdown ends OK, and one that ended with an error keeps it.
    #[tokio::test]
    async fn a_reply_cut_short_by_the_shutdown_never_ends_ok() {
        let reply = |status: &'static str| {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static(status));
            let frames: Vec<Result<_, tonic::Status>> =
                vec![Ok(http_body::Frame::<Bytes>::trailers(trailers))];
            let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
            tonic::body::Body::new(body)
        };
        let status_of = |frames: &[http_body::Frame<Bytes>]| {
            let trailers = frames
                .last()
                .and_then(|f| f.trailers_ref())
                .expect("trailers");
            let status = trailers["grpc-status"].to_str().unwrap().to_string();
            (frames.len(), status)
        };
        let (_keep, open) = watch::channel(false);
        let served = frames(EndedAtShutdown::reply(reply("0"), open)).await;
        assert_eq!(status_of(&served), (1, "0".to_string()));
        let (_keep, closing) = watch::channel(true);
        let cut = frames(EndedAtShutdown::reply(reply("0"), closing.clone())).await;
        let unavailable = (tonic::Code::Unavailable as i32).to_string();
        assert_eq!(status_of(&cut), (1, unavailable));
        let failed = frames(EndedAtShutdown::reply(reply("9"), closing.clone())).await;
        assert_eq!(status_of(&failed), (1, "9".to_string()));
        // Shutdown began, but this stream's wait has not been woken yet (tokio wakes
        // the waits shard by shard, a producer's first): the value decides.
        let not_yet_woken = EndedAtShutdown {
            closing: Some(Box::pin(std::future::pending())),
            ..EndedAtShutdown::reply(reply("0"), closing)
        };
        let cut = frames(not_yet_woken).await;
        assert_eq!(
            status_of(&cut),
            (1, (tonic::Code::Unavailable as i32).to_string())
        );
    }

    fn call_to(path: &str) -> http::Request<http_body_util::Full<Bytes>> {
        let message = Bytes::from_static(&[0, 0, 0, 0, 2, 8, 1]);
        let body = http_body_util::Full::new(message);
        http::Request::post(path).body(body).unwrap()
    }

    /// A call holds its reservation until its reply is ready, counted or not (a
    /// health check), and gives it all back once its reply is gone (here: dropped).
    #[tokio::test]
    async fn a_call_holds_what_it_reserved_until_its_reply_is_ready() {
        const TOTAL: usize = 1 << 20;
        let receiving = Arc::new(Receiving::new(TOTAL, PeerCaps::NONE));
        let observe = Observe {
            receiving: Arc::clone(&receiving),
            free_while_served: Arc::new(AtomicUsize::new(usize::MAX)),
        };
        let permits = Arc::new(Semaphore::new(4));
        let counted = Shed::new(observe.clone(), Arc::clone(&permits), (4096, &receiving));
        let health = Shed::streams_only(
            observe.clone(),
            (permits, PeerCaps::NONE),
            (4096, &receiving),
        );
        let calls = [
            (counted, "/prenota.v1.BookingService/Book"),
            (health, "/grpc.health.v1.Health/Check"),
        ];
        for (mut shed, path) in calls {
            shed.call(call_to(path)).await.unwrap();
            let free_while_served = observe.free_while_served.load(Ordering::SeqCst);
            assert!(free_while_served < TOTAL, "{path}: held while served");
            assert_eq!(receiving.available(), TOTAL, "{path}: all given back");
        }
    }
}
