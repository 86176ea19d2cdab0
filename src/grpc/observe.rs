//! RED metrics and request logs for every gRPC request, as the outermost layer: it sees
//! requests refused by authentication, shedding and start-up too.
//!
//! The status code is read where gRPC puts it: in the response headers for an
//! immediate error ("trailers-only"), otherwise in the trailers at the end of the body.
//! The request is counted when its response ends (or is dropped: `CANCELLED`).
//! tonic's `INTERNAL` for a request it could not read as framed is restated first as
//! the client's mistake (`codec::clients_framing_mistake`): answered, counted and
//! logged as such.
//! It keeps each call's deadline (`deadline`): one past it is answered, or its stream
//! ended, `DEADLINE_EXCEEDED`.
//! Logs carry service, method, code and latency: never headers (the `authorization`
//! token) and never a message (citizen ids).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use http_body::{Body, Frame, SizeHint};
use prost::Message;
use tonic::codegen::{http, BoxFuture, Bytes, Service};
use tonic::{Code, Status};
use tracing::Instrument;

use crate::grpc::connections::{self, Closer};
use crate::grpc::{codec, deadline};
use crate::limits::STREAM_END_TAKEN_WITHIN;
use crate::telemetry;

/// The layer for `Server::builder().layer(..)`: `request_timeout` bounds every call's
/// answer (`request_timeout_ms`).
#[derive(Clone, Copy, Debug)]
pub struct ObserveLayer {
    pub request_timeout: Duration,
}

impl<S> tower_layer::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            request_timeout: self.request_timeout,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Observe<S> {
    inner: S,
    request_timeout: Duration,
}

/// The metric handles of one method, registered once: recording a request is then a
/// few atomic operations, with no registry lookup.
struct MethodMetrics {
    service: &'static str,
    method: &'static str,
    handling: metrics::Histogram,
    /// By code number (0..=16), registered the first time a code is seen.
    handled: [OnceLock<metrics::Counter>; 17],
    /// Whether the method answers with a stream (which its deadline may end).
    streams: bool,
}

impl MethodMetrics {
    fn new(service: &'static str, method: &'static str, streams: bool) -> Self {
        Self {
            service,
            method,
            streams,
            handling: metrics::histogram!(telemetry::GRPC_HANDLING_SECONDS,
                "grpc_service" => service, "grpc_method" => method),
            handled: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    fn handled(&self, code: Code) -> &metrics::Counter {
        let index = (i32::from(code) as usize).min(self.handled.len() - 1);
        self.handled[index].get_or_init(|| {
            metrics::counter!(telemetry::GRPC_HANDLED, "grpc_service" => self.service,
                "grpc_method" => self.method, "grpc_code" => code_name(code))
        })
    }
}

/// The metrics of a request path. Only the methods the server declares get their own
/// labels, so a client cannot grow the label set with made-up paths. Built on the first
/// request, after the binary installed its recorder.
fn method_metrics(path: &str) -> &'static MethodMetrics {
    static KNOWN: OnceLock<HashMap<String, MethodMetrics>> = OnceLock::new();
    static UNKNOWN: OnceLock<MethodMetrics> = OnceLock::new();
    KNOWN
        .get_or_init(known_methods)
        .get(path)
        .unwrap_or_else(|| UNKNOWN.get_or_init(|| MethodMetrics::new("unknown", "unknown", false)))
}

#[cfg(test)]
fn labels(path: &str) -> (&'static str, &'static str) {
    let metrics = method_metrics(path);
    (metrics.service, metrics.method)
}

/// Every method of prenota's protos, of health and of reflection, by request path.
fn known_methods() -> HashMap<String, MethodMetrics> {
    let mut known = HashMap::new();
    let mut add = |service: &str, method: &str, streams: bool| {
        let service: &'static str = Box::leak(service.to_string().into_boxed_str());
        let method: &'static str = Box::leak(method.to_string().into_boxed_str());
        known.insert(
            format!("/{service}/{method}"),
            MethodMetrics::new(service, method, streams),
        );
    };
    for encoded in [
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ] {
        let Ok(set) = prost_types::FileDescriptorSet::decode(encoded) else {
            continue;
        };
        for file in set.file {
            for service in &file.service {
                let service_name = format!("{}.{}", file.package(), service.name());
                for method in &service.method {
                    add(&service_name, method.name(), method.server_streaming());
                }
            }
        }
    }
    for reflection in [
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        add(reflection, "ServerReflectionInfo", true);
    }
    known
}

impl<S, B> Service<http::Request<B>> for Observe<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Observed>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        // Taken before tonic's timeout layer takes its own (see `deadline`).
        let deadlines = deadline::of_call(
            request.headers(),
            self.request_timeout,
            tokio::time::Instant::now(),
        );
        let metrics = method_metrics(request.uri().path());
        let span = tracing::debug_span!(
            "request",
            grpc.service = metrics.service,
            grpc.method = metrics.method
        );
        let streams = metrics.streams;
        let closer = connections::closer_of_call(request.extensions()).filter(|_| streams);
        let response = self.inner.call(request).instrument(span.clone());
        let mut outcome = Outcome {
            metrics,
            started,
            span,
            recorded: false,
        };
        Box::pin(async move {
            // Begun past its deadline (a grpc-timeout of nanoseconds): not run at all.
            // Nothing inside has run yet either: tonic's router calls the services
            // (shedding, budgets, authentication) when this future is first polled.
            let begun_late = tokio::time::Instant::now() >= deadlines.answer_by;
            let answered = match begun_late {
                true => None,
                // Dropped before its response (the client reset the stream): CANCELLED.
                false => tokio::time::timeout_at(deadlines.answer_by, response)
                    .await
                    .ok(),
            };
            let mut response = match answered {
                Some(response) => response?,
                None => deadline::passed_before_answer().into_http(),
            };
            let ended = restated(response.headers_mut());
            if let Some(code) = ended {
                outcome.record(code); // trailers-only: an immediate error
            }
            let end_by = deadlines.stream_by.filter(|_| streams && ended.is_none());
            let closer = end_by.and(closer);
            Ok(response.map(|body| Observed::new(Answering::new(body, outcome), end_by, closer)))
        })
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?;
    let number: i32 = value.to_str().ok()?.parse().ok()?;
    Some(Code::from_i32(number))
}

/// The status code of `headers` (a trailers-only answer, or trailers), once a client's
/// framing mistake in them is restated as such (see `codec::clients_framing_mistake`).
fn restated(headers: &mut http::HeaderMap) -> Option<Code> {
    let code = grpc_status(headers)?;
    if code != Code::Internal {
        return Some(code);
    }
    let message = headers.get("grpc-message").map(|value| {
        percent_encoding::percent_decode(value.as_bytes())
            .decode_utf8_lossy()
            .into_owned()
    });
    let Some(status) = codec::clients_framing_mistake(message.as_deref().unwrap_or("")) else {
        return Some(code);
    };
    let written = status.add_header(headers);
    debug_assert!(written.is_ok(), "a restated status is a valid header");
    Some(status.code())
}

/// Counts one request, once: `CANCELLED` if it is dropped uncounted (the client went
/// away before the response, or before it ended).
struct Outcome {
    metrics: &'static MethodMetrics,
    started: Instant,
    span: tracing::Span,
    recorded: bool,
}

impl Outcome {
    fn record(&mut self, code: Code) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        let seconds = self.started.elapsed().as_secs_f64();
        let code_name = code_name(code);
        self.metrics.handled(code).increment(1);
        self.metrics.handling.record(seconds);
        let latency_us = (seconds * 1e6) as u64;
        let _entered = self.span.enter();
        match code {
            // The server's own failures: worth a line at the default level.
            Code::Internal | Code::Unknown | Code::DataLoss => {
                tracing::warn!(grpc.code = code_name, latency_us, "request failed")
            }
            _ => tracing::debug!(grpc.code = code_name, latency_us, "request answered"),
        }
    }
}

/// The response body, passed through untouched; reads the status from the trailers.
/// A response stream with a deadline (its client's `grpc-timeout`) is ended at it, by a
/// task of its own even while the client reads nothing (see `Answering::end_at_deadline`).
pub struct Observed {
    body: ObservedBody,
}

enum ObservedBody {
    Own(Answering),
    /// Shared with the task that ends it at `end_by`; dropping `_ended` stops that task.
    Bounded {
        answering: Arc<Mutex<Answering>>,
        end_by: tokio::time::Instant,
        _ended: tokio::sync::oneshot::Sender<()>,
    },
}

impl Observed {
    /// `answering`, ended at `end_by` if there is one; then, if its end is not taken
    /// within `STREAM_END_TAKEN_WITHIN` (its client keeps its window shut), its
    /// connection closed by `closer`.
    fn new(
        answering: Answering,
        end_by: Option<tokio::time::Instant>,
        closer: Option<Closer>,
    ) -> Self {
        let Some(end_by) = end_by else {
            return Self {
                body: ObservedBody::Own(answering),
            };
        };
        let answering = Arc::new(Mutex::new(answering));
        let (ended, stopped) = tokio::sync::oneshot::channel::<()>();
        // Weak: a stream that ends or is dropped gives back what it holds at once.
        let at_deadline = Arc::downgrade(&answering);
        tokio::spawn(async move {
            tokio::pin!(stopped);
            tokio::select! {
                () = tokio::time::sleep_until(end_by) => {}
                _ = &mut stopped => return,
            }
            let Some(answering) = at_deadline.upgrade() else {
                return;
            };
            let waker = lock(&answering).end_at_deadline();
            drop(answering);
            if let Some(waker) = waker {
                waker.wake();
            }
            tokio::select! {
                () = tokio::time::sleep(STREAM_END_TAKEN_WITHIN) => {
                    if let Some(closer) = closer {
                        closer.close();
                    }
                }
                _ = stopped => {}
            }
        });
        Self {
            body: ObservedBody::Bounded {
                answering,
                end_by,
                _ended: ended,
            },
        }
    }
}

/// A body's state; each critical section is one poll or one flag: a poisoned lock is sound.
fn lock(answering: &Mutex<Answering>) -> std::sync::MutexGuard<'_, Answering> {
    answering
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A response's body and how its call is counted.
struct Answering {
    /// `None` once the stream was ended at its deadline.
    inner: Option<tonic::body::Body>,
    outcome: Outcome,
    /// Its end was sent: nothing more is polled.
    ended: bool,
    /// The last poll's, woken when the deadline ends the stream.
    waker: Option<Waker>,
}

impl Answering {
    fn new(inner: tonic::body::Body, outcome: Outcome) -> Self {
        Self {
            inner: Some(inner),
            outcome,
            ended: false,
            waker: None,
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let Some(inner) = self.inner.as_mut() else {
            // Ended at its deadline (counted then): its trailers follow what was sent.
            self.ended = true;
            let mut trailers = http::HeaderMap::new();
            let written = deadline::passed_before_end().add_header(&mut trailers);
            debug_assert!(written.is_ok(), "a deadline's status is a valid header");
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        };
        let mut polled = Pin::new(inner).poll_frame(cx);
        match &mut polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_mut().and_then(restated) {
                    self.outcome.record(code);
                    self.ended = true;
                }
            }
            // A transport error on the stream: the client reset it or broke the
            // protocol. Its doing, not the server's: counted and logged as CANCELLED.
            Poll::Ready(Some(Err(_))) => {
                self.outcome.record(Code::Cancelled);
                self.ended = true;
            }
            // Ended without a status: gRPC clients read that as UNKNOWN.
            Poll::Ready(None) => {
                self.outcome.record(Code::Unknown);
                self.ended = true;
            }
            Poll::Pending => {}
        }
        polled
    }

    /// At the stream's deadline, unless it ended: counted DEADLINE_EXCEEDED, then its
    /// body is dropped, so what it holds (a place in a pool, the task producing it) is
    /// given back now, even if its client keeps its window shut and the transport polls
    /// it no more; its trailers go when it is next polled. The waker to wake (once the
    /// lock is let go) so that it is.
    fn end_at_deadline(&mut self) -> Option<Waker> {
        if self.ended || self.inner.is_none() {
            return None;
        }
        self.outcome.record(Code::DeadlineExceeded);
        drop(self.inner.take());
        self.waker.take()
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.as_ref().is_some_and(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map(Body::size_hint).unwrap_or_default()
    }
}

impl Body for Observed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match &mut self.get_mut().body {
            ObservedBody::Own(answering) => answering.poll_frame(cx),
            ObservedBody::Bounded {
                answering, end_by, ..
            } => {
                let mut answering = lock(answering);
                // A body always ready is ended here, the task may not have run yet.
                if tokio::time::Instant::now() >= *end_by {
                    let _polling_now = answering.end_at_deadline();
                }
                if !answering
                    .waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    answering.waker = Some(cx.waker().clone());
                }
                answering.poll_frame(cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.body {
            ObservedBody::Own(answering) => answering.is_end_stream(),
            ObservedBody::Bounded { answering, .. } => lock(answering).is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            ObservedBody::Own(answering) => answering.size_hint(),
            ObservedBody::Bounded { answering, .. } => lock(answering).size_hint(),
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        self.record(Code::Cancelled);
    }
}

/// The canonical upper-case name of a code, as grpc-ecosystem exporters label it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_methods_get_labels_and_made_up_paths_do_not() {
        assert_eq!(
            labels("/prenota.v1.BookingService/Book"),
            ("prenota.v1.BookingService", "Book")
        );
        assert_eq!(
            labels("/prenota.v1.CapacityService/ImportCapacity"),
            ("prenota.v1.CapacityService", "ImportCapacity")
        );
        assert_eq!(
            labels("/grpc.health.v1.Health/Check"),
            ("grpc.health.v1.Health", "Check")
        );
        assert_eq!(
            labels("/prenota.v1.BookingService/Book-0x1234"),
            ("unknown", "unknown")
        );
    }
}
