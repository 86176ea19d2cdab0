//! Load shedding: at most `in_flight_requests_max` requests are served at once over
//! every connection; the next one is answered at once with UNAVAILABLE / OVERLOADED and a
//! RetryInfo, instead of queueing until everything is slow.
//!
//! A call with one request message counts from when its message has arrived (a client
//! that sends the headers and never the message holds no place, only its stream, until
//! `request_timeout_ms`): a one-reply call until its reply is ready (a client that never
//! reads it holds nothing), a streaming reply ([`STREAMING_REPLIES`]) until the stream
//! ends, so it is admitted by its own bound too: exports by `exports_max`, reflection and
//! health watches by their own small pools ([`Shed::streams_only`] leaves health checks
//! free, and holds a peer to `health_watches_per_peer_max` of its watches). A streamed
//! request ([`STREAMED_REQUESTS`]: an import, reflection) counts from its headers.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body_util::BodyExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;
use tonic::Status;

use crate::grpc::connections::{self, PeerPlace, Peers};
use crate::service::ServiceError;

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

/// A gRPC message's frame: a flag byte and a 4-byte length before the message.
const GRPC_FRAME_PREFIX_BYTES: usize = 5;

#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    permits: Arc<Semaphore>,
    /// One-reply calls take a permit too, once their message (at most this many bytes)
    /// has arrived; `None`: only streams do.
    unary: Option<usize>,
    /// When set, a peer's streams hold at most so many of the permits.
    peers: Option<Arc<Peers>>,
}

impl<S> Shed<S> {
    /// Every call takes one of `permits` (shared by every service it wraps); a
    /// one-message call once its message of at most `message_bytes_max` has arrived.
    pub fn new(inner: S, permits: Arc<Semaphore>, message_bytes_max: usize) -> Self {
        Self {
            inner,
            permits,
            unary: Some(message_bytes_max),
            peers: None,
        }
    }

    /// Only streaming replies take one of `permits`, at most `per_peer_max` of them per
    /// peer (0: no such cap); one-reply calls pass.
    pub fn streams_only(inner: S, permits: Arc<Semaphore>, per_peer_max: usize) -> Self {
        Self {
            inner,
            permits,
            unary: None,
            peers: (per_peer_max > 0).then(|| Arc::new(Peers::new(per_peer_max))),
        }
    }
}

type ShedFuture<S> = BoxFuture<
    http::Response<tonic::body::Body>,
    <S as Service<http::Request<tonic::body::Body>>>::Error,
>;

impl<S, B> Service<http::Request<B>> for Shed<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let (streaming, streamed) = (streams(path), STREAMED_REQUESTS.contains(&path));
        let request = request.map(tonic::body::Body::new);
        match self.unary {
            _ if streamed => self.call_counted(request, streaming),
            Some(message_bytes_max) => {
                self.call_once_received(request, (message_bytes_max, streaming))
            }
            None if streaming => self.call_counted(request, streaming),
            None => Box::pin(self.inner.call(request)),
        }
    }
}

impl<S> Shed<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    /// A call with one request message: it is received (at most `message_bytes_max`)
    /// before the call takes a place, which it holds until its reply is ready, or, when
    /// `streaming`, until its reply stream ends.
    fn call_once_received(
        &mut self,
        request: http::Request<tonic::body::Body>,
        (message_bytes_max, streaming): (usize, bool),
    ) -> ShedFuture<S> {
        // The clone is ready for the next call; this one was readied by `poll_ready`.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let permits = Arc::clone(&self.permits);
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let received = match receive(body, message_bytes_max).await {
                Ok(received) => received,
                Err(refused) => return Ok(refused.into_http()),
            };
            let Ok(permit) = permits.try_acquire_owned() else {
                return Ok(shed());
            };
            let body = tonic::body::Body::new(http_body_util::Full::new(received));
            let response = inner.call(http::Request::from_parts(parts, body)).await?;
            Ok(counted(response, (permit, None), streaming))
        })
    }

    /// A call that counts from its headers: a streaming reply until its stream ends, a
    /// streamed request until its reply is ready.
    fn call_counted(
        &mut self,
        request: http::Request<tonic::body::Body>,
        streaming: bool,
    ) -> ShedFuture<S> {
        let Some(peer_place) = self.peer_place(request.extensions()) else {
            let refused = shed();
            return Box::pin(async move { Ok(refused) });
        };
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => {
                let response = self.inner.call(request);
                let place = (permit, peer_place);
                Box::pin(async move { Ok(counted(response.await?, place, streaming)) })
            }
            Err(_) => {
                let refused = shed();
                Box::pin(async move { Ok(refused) })
            }
        }
    }

    /// The call's place under its peer's cap: `Some(None)` when peers are not counted,
    /// `None` when its peer has all its places (or its address is gone: a dead socket).
    fn peer_place(&self, extensions: &http::Extensions) -> Option<Option<PeerPlace>> {
        let Some(peers) = &self.peers else {
            return Some(None);
        };
        let address = connections::peer_address(extensions)?;
        Peers::enter(peers, address).map(Some)
    }
}

/// `response`, holding its place (a permit, and its peer's when counted) until its
/// stream ends when `streaming`; else the reply is ready and the place goes here.
fn counted(
    response: http::Response<tonic::body::Body>,
    place: (OwnedSemaphorePermit, Option<PeerPlace>),
    streaming: bool,
) -> http::Response<tonic::body::Body> {
    match streaming {
        true => response.map(|inner| tonic::body::Body::new(Counted { inner, place })),
        false => response,
    }
}

/// The answer to a call past `in_flight_requests_max`: UNAVAILABLE / OVERLOADED.
fn shed() -> http::Response<tonic::body::Body> {
    metrics::counter!(crate::telemetry::SHED).increment(1);
    Status::from(ServiceError::Shed).into_http()
}

/// A one-message call's body, whole: refused as tonic refuses a message it will not
/// decode (OUT_OF_RANGE) once its 5-byte prefix declares more than `message_bytes_max`
/// or more arrives, without reading the rest; CANCELLED if the client broke the stream.
async fn receive(
    mut body: tonic::body::Body,
    message_bytes_max: usize,
) -> Result<tonic::codegen::Bytes, Status> {
    let too_large = || {
        Status::out_of_range(format!(
            "the message is too large: at most {message_bytes_max} bytes (message_size_bytes_max)"
        ))
    };
    let limit = message_bytes_max.saturating_add(GRPC_FRAME_PREFIX_BYTES);
    let (mut received, mut bytes, mut checked) = (Vec::new(), 0, false);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| {
            Status::cancelled(format!("the request's message was not received: {error}"))
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers: a gRPC request has none that matter here
        };
        bytes += data.len();
        received.push(data);
        if bytes > limit {
            return Err(too_large());
        }
        if !checked && bytes >= GRPC_FRAME_PREFIX_BYTES {
            checked = true;
            let prefix: Vec<u8> = received
                .iter()
                .flat_map(|data| data.iter())
                .take(GRPC_FRAME_PREFIX_BYTES)
                .copied()
                .collect();
            if declared_length(&prefix).is_some_and(|declared| declared > message_bytes_max) {
                return Err(too_large());
            }
        }
    }
    // Usually one frame: kept as it is, without a copy.
    Ok(match received.len() {
        1 => received.remove(0),
        _ => received.concat().into(),
    })
}

/// The length a gRPC frame's 5-byte prefix declares (after its compression flag).
fn declared_length(prefix: &[u8]) -> Option<usize> {
    let length: [u8; 4] = prefix.get(1..GRPC_FRAME_PREFIX_BYTES)?.try_into().ok()?;
    Some(u32::from_be_bytes(length) as usize)
}

/// A response body that holds its request's place until it is dropped.
struct Counted {
    inner: tonic::body::Body,
    place: (OwnedSemaphorePermit, Option<PeerPlace>),
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

impl<S: NamedService> NamedService for Shed<S> {
    const NAME: &'static str = S::NAME;
}
