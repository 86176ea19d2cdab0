//! The listener's connections:
//! - at most `connections_max` open at once: past it a new connection is closed as soon
//!   as it is accepted (and counted), so idle or slow sockets can never pin more file
//!   descriptors and connection state than the limit allows;
//! - a new connection must send its first bytes within `connection_opening_timeout_ms`;
//! - a request may close its own connection ([`Closer`]): an export whose client stopped
//!   reading does, since no stream of a connection whose window stays shut can be ended
//!   any other way (the transport stops polling its body).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming, TlsConnectInfo};

/// Closes one connection: its next read or write fails, and the transport drops it
/// with every stream on it.
#[derive(Clone, Debug, Default)]
pub struct Closer(Arc<CloserState>);

#[derive(Debug, Default)]
struct CloserState {
    closed: AtomicBool,
    reader: AtomicWaker,
}

impl Closer {
    pub fn close(&self) {
        self.0.closed.store(true, Ordering::Release);
        self.0.reader.wake(); // the transport always has a read pending
    }

    fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::Acquire)
    }
}

/// What requests learn of their connection (in their extensions).
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    pub tcp: TcpConnectInfo,
    pub closer: Closer,
}

/// The closer of the connection `extensions` came on (plain or TLS).
pub fn closer_of(extensions: &tonic::Extensions) -> Option<Closer> {
    let info = extensions.get::<ConnectionInfo>().or_else(|| {
        extensions
            .get::<TlsConnectInfo<ConnectionInfo>>()
            .map(TlsConnectInfo::get_ref)
    })?;
    Some(info.closer.clone())
}

/// Bytes a connection must send before `connection_opening_timeout_ms`: the HTTP/2
/// preface (a TLS ClientHello is longer), so one byte cannot hold a socket open.
const OPENING_BYTES: usize = 24;

/// An accepted connection and its place under the cap.
pub struct Counted {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    closer: Closer,
    /// Until its first `OPENING_BYTES` arrive.
    opening: Option<Pin<Box<Sleep>>>,
    received: usize,
}

/// The accepted connections of `listener` (TCP_NODELAY on), at most `max` open at once,
/// each closed if it sends nothing within `opening_timeout`.
pub fn capped(
    listener: TcpListener,
    max: usize,
    opening_timeout: Duration,
) -> impl Stream<Item = io::Result<Counted>> {
    assert!(max >= 1, "connections_max is checked at start-up");
    let permits = Arc::new(Semaphore::new(max));
    // Without TCP_NODELAY, small responses wait on Nagle + delayed ACK (~40 ms).
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio_stream::StreamExt::filter_map(incoming, move |accepted| match accepted {
        Ok(stream) => match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => Some(Ok(Counted {
                stream,
                _permit: permit,
                closer: Closer::default(),
                opening: Some(Box::pin(tokio::time::sleep(opening_timeout))),
                received: 0,
            })),
            Err(_) => {
                metrics::counter!(crate::telemetry::CONNECTIONS_REFUSED).increment(1);
                tracing::debug!("connection refused: connections_max reached");
                None // dropped: the socket is closed at once
            }
        },
        Err(error) => Some(Err(error)),
    })
}

impl Connected for Counted {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        ConnectionInfo {
            tcp: self.stream.connect_info(),
            closer: self.closer.clone(),
        }
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "closed by the server")
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.closer.0.reader.register(cx.waker());
        if self.closer.is_closed() {
            return Poll::Ready(Err(closed()));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) {
            self.received += buf.filled().len() - before;
            if self.received >= OPENING_BYTES {
                self.opening = None;
            }
        }
        // Data already there is read first: only a silent client meets the deadline.
        if let (Poll::Pending, Some(opening)) = (&read, &mut self.opening) {
            if opening.as_mut().poll(cx).is_ready() {
                let silent = "sent too little within connection_opening_timeout_ms";
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, silent)));
            }
        }
        read
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.closer.is_closed() {
            return Poll::Ready(Err(closed()));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.closer.is_closed() {
            return Poll::Ready(Err(closed()));
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Closes the request's connection when its stream's reader stalls past the idle
/// timeout: the only way to end a stream whose client keeps its window shut
/// (`service::exports`).
pub fn close_on_idle<T>(request: &tonic::Request<T>) -> Option<crate::service::exports::OnIdle> {
    let closer = closer_of(request.extensions())?;
    Some(Arc::new(move || closer.close()))
}

/// `stream`, holding `permit` (a place in some bound) for as long as the stream lives.
pub fn holding<S: tokio_stream::Stream, P: Send>(
    stream: S,
    permit: P,
) -> impl tokio_stream::Stream<Item = S::Item> {
    use tokio_stream::StreamExt;
    stream.map(move |item| {
        let _held = &permit;
        item
    })
}
