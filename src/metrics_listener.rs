//! The metrics port: `GET /metrics` in Prometheus' text format. It needs no token, so
//! it is bounded like the gRPC port: at most `metrics_connections_max` connections at
//! once (more are closed at accept), each closed `metrics_connection_timeout_ms` after
//! it was accepted whatever it is doing, HTTP/1.1 with a small request buffer; a failed
//! accept (no file descriptor left) waits instead of spinning. Nothing is logged per
//! connection or bad request.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How long a failed accept waits before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The most bytes of a request kept (hyper's smallest buffer): a scrape is one line.
const REQUEST_BYTES_MAX: usize = 8 * 1024;

/// The metrics port's caps.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub connections_max: usize,
    pub connection_timeout: Duration,
}

/// Answers scrapes on `listener` with what `handle` renders, forever.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, bounds: Bounds) {
    let places = Arc::new(Semaphore::new(bounds.connections_max));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::debug!(%error, "metrics: accept failed");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        // Past the cap: dropped, so closed at once.
        let Ok(place) = Arc::clone(&places).try_acquire_owned() else {
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _place = place;
            let answer = hyper::service::service_fn(move |request| {
                std::future::ready(Ok::<_, Infallible>(answer(&request, &handle)))
            });
            let connection = hyper::server::conn::http1::Builder::new()
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
fn answer(request: &Request<Incoming>, handle: &PrometheusHandle) -> Response<Full<Bytes>> {
    let (status, body, kind) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            handle.render(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "GET only\n".to_string(),
            "text/plain",
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "GET /metrics\n".to_string(),
            "text/plain",
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static(kind));
    response
}
