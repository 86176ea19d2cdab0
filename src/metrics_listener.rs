//! The metrics port: `GET /metrics` in Prometheus' text format. It needs no token, so
//! it is bounded like the gRPC port: at most `metrics_connections_max` connections at
//! once, `metrics_connections_per_peer_max` of them from one peer (more are closed at
//! accept), each closed `metrics_connection_timeout_ms` after
//! it was accepted whatever it is doing, HTTP/1.1 with a small request buffer and one
//! request per connection; the page is rendered at most once per `RENDERED_FOR` and
//! shared (pipelined scrapes rendered a page each, starving the bookings); a failed
//! accept (no file descriptor left) waits instead of spinning. Nothing is logged per
//! connection or bad request. The page is the recorder's, then what `more` renders (the
//! per-site gauges: `telemetry::site_gauges`).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::grpc::peers::{PeerCaps, Peers};

/// How long a failed accept waits before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The most bytes of a request kept (hyper's smallest buffer): a scrape is one line.
const REQUEST_BYTES_MAX: usize = 8 * 1024;

/// How long a rendered page is served before it is rendered again.
const RENDERED_FOR: Duration = Duration::from_secs(1);

/// The last page rendered, and when.
struct Page {
    handle: PrometheusHandle,
    more: fn() -> Arc<str>,
    last: Mutex<Option<(Instant, Bytes)>>,
}

impl Page {
    /// The page, rendered again if older than `RENDERED_FOR`.
    fn current(&self) -> Bytes {
        // A poisoned lock holds a whole page or none.
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match &*last {
            Some((at, page)) if at.elapsed() < RENDERED_FOR => page.clone(),
            _ => {
                let (mut page, more) = (self.handle.render(), (self.more)());
                page.reserve_exact(more.len());
                page.push_str(&more);
                let page = Bytes::from(page);
                *last = Some((Instant::now(), page.clone()));
                page
            }
        }
    }
}

/// The metrics port's caps.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub connections_max: usize,
    pub per_peer: PeerCaps,
    pub connection_timeout: Duration,
}

impl Bounds {
    /// The `metrics_*` limits.
    pub fn of(limits: &crate::config::Limits) -> Self {
        Self {
            connections_max: limits.metrics_connections_max,
            per_peer: PeerCaps {
                per_peer_max: limits.metrics_connections_per_peer_max,
                // Its 16 places are few: one /48's /64s together hold one peer's.
                shares_per_ipv6_48: limits.peer_shares_per_ipv6_48_max.min(1),
            },
            connection_timeout: Duration::from_millis(limits.metrics_connection_timeout_ms),
        }
    }
}

/// Answers scrapes on `listener` with what `handle` renders, then `more`, forever.
pub async fn serve(
    listener: TcpListener,
    (handle, more): (PrometheusHandle, fn() -> Arc<str>),
    bounds: Bounds,
) {
    let places = Arc::new(Semaphore::new(bounds.connections_max));
    let peers = bounds.per_peer.peers();
    let page = Arc::new(Page {
        handle,
        more,
        last: Mutex::new(None),
    });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::debug!(%error, "metrics: accept failed");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        // Past a cap: dropped, so closed at once.
        let peer_place = match &peers {
            Some(peers) => match Peers::enter(peers, peer.ip()) {
                Ok(place) => Some(place),
                Err(_) => continue,
            },
            None => None,
        };
        let Ok(place) = Arc::clone(&places).try_acquire_owned() else {
            continue;
        };
        let page = Arc::clone(&page);
        tokio::spawn(async move {
            let _places = (place, peer_place);
            let answer = hyper::service::service_fn(move |request| {
                std::future::ready(Ok::<_, Infallible>(answer(&request, &page)))
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .timer(TokioTimer::new())
                .header_read_timeout(bounds.connection_timeout)
                .max_buf_size(REQUEST_BYTES_MAX)
                .serve_connection(TokioIo::new(stream), answer);
            // Its errors (a bad request, a reset) are the client's: not logged.
            let _ = tokio::time::timeout(bounds.connection_timeout, connection).await;
        });
    }
}

/// `GET /metrics`: the metrics; anything else: a short refusal.
fn answer(request: &Request<Incoming>, page: &Page) -> Response<Full<Bytes>> {
    let (status, body, kind) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            page.current(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            Bytes::from_static(b"GET only\n"),
            "text/plain",
        ),
        _ => (
            StatusCode::NOT_FOUND,
            Bytes::from_static(b"GET /metrics\n"),
            "text/plain",
        ),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static(kind));
    response
}
