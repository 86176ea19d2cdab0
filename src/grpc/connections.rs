//! The listener's connections:
//! - at most `connections_max` open at once: past it a new connection is closed as soon
//!   as it is accepted (and counted), so idle or slow sockets can never pin more file
//!   descriptors and connection state than the limit allows;
//! - at most `connections_per_peer_max` of them from one peer, and a few peers' worth
//!   from one IPv6 /48 (`grpc::peers`), so one machine cannot take every place;
//! - a new connection must send its first bytes within `connection_opening_timeout_ms`;
//! - a request may close its own connection ([`Closer`]): an export whose client stopped
//!   reading does, since no stream of a connection whose window stays shut can be ended
//!   any other way (the transport stops polling its body).

use std::future::Future;
use std::io;
use std::net::IpAddr;
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

use crate::grpc::peers::{Cap, PeerCaps, PeerPlace, Peers};

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

/// A request's connection, from what its extensions hold: the plain connection's info,
/// or the TLS one's (tonic's request and HTTP extensions are two types).
fn connection<'a>(
    plain: Option<&'a ConnectionInfo>,
    tls: Option<&'a TlsConnectInfo<ConnectionInfo>>,
) -> Option<&'a ConnectionInfo> {
    plain.or_else(|| tls.map(TlsConnectInfo::get_ref))
}

/// The closer of the connection `extensions` came on (plain or TLS).
pub fn closer_of(extensions: &tonic::Extensions) -> Option<Closer> {
    let info = connection(extensions.get(), extensions.get())?;
    Some(info.closer.clone())
}

/// The address of the peer `extensions`' request came from (plain or TLS).
pub fn peer_address(extensions: &tonic::codegen::http::Extensions) -> Option<IpAddr> {
    let info = connection(extensions.get(), extensions.get())?;
    Some(info.tcp.remote_addr()?.ip())
}

/// Bytes a connection must send before `connection_opening_timeout_ms`: the HTTP/2
/// preface (a TLS ClientHello is longer), so one byte cannot hold a socket open.
const OPENING_BYTES: usize = 24;

/// An accepted connection and its places under the caps.
pub struct Counted {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    _peer_place: Option<PeerPlace>,
    closer: Closer,
    /// Until its first `OPENING_BYTES` arrive.
    opening: Option<Pin<Box<Sleep>>>,
    received: usize,
}

/// The caps on open connections: `connections_max` in all, `connections_per_peer_max`
/// per peer (0: none) and its shares per IPv6 /48.
pub struct Caps {
    pub max: usize,
    pub per_peer: PeerCaps,
}

/// The accepted connections of `listener` (TCP_NODELAY on), within `caps`, each closed if
/// it sends nothing within `opening_timeout`.
pub fn capped(
    listener: TcpListener,
    caps: Caps,
    opening_timeout: Duration,
) -> impl Stream<Item = io::Result<Counted>> {
    assert!(caps.max >= 1, "connections_max is checked at start-up");
    let permits = Arc::new(Semaphore::new(caps.max));
    let peers = caps.per_peer.peers();
    // Without TCP_NODELAY, small responses wait on Nagle + delayed ACK (~40 ms).
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio_stream::StreamExt::filter_map(incoming, move |accepted| {
        let stream = match accepted {
            Ok(stream) => stream,
            Err(error) => return Some(Err(error)),
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            return refused("connections_max"); // dropped: the socket is closed at once
        };
        let peer_place = match &peers {
            None => None,
            Some(peers) => {
                let peer = stream.peer_addr().ok()?.ip(); // an error: the peer is gone
                match Peers::enter(peers, peer) {
                    Ok(place) => Some(place),
                    Err(Cap::Peer) => return refused("connections_per_peer_max"),
                    Err(Cap::Ipv6Prefix48) => return refused("peer_shares_per_ipv6_48_max"),
                }
            }
        };
        Some(Ok(Counted {
            stream,
            _permit: permit,
            _peer_place: peer_place,
            closer: Closer::default(),
            opening: Some(Box::pin(tokio::time::sleep(opening_timeout))),
            received: 0,
        }))
    })
}

/// Counts a connection refused at accept, by the limit that refused it.
fn refused(limit: &'static str) -> Option<io::Result<Counted>> {
    metrics::counter!(crate::telemetry::CONNECTIONS_REFUSED, "limit" => limit).increment(1);
    tracing::debug!(limit, "connection refused at accept");
    None
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
