//! The listener's connections:
//! - at most `connections_max` open at once: past it a new connection is closed as soon
//!   as it is accepted (and counted), so idle or slow sockets can never pin more file
//!   descriptors and connection state than the limit allows;
//! - at most `connections_per_peer_max` of them from one peer ([`Peers`]), so one machine
//!   cannot take every place;
//! - a new connection must send its first bytes within `connection_opening_timeout_ms`;
//! - a request may close its own connection ([`Closer`]): an export whose client stopped
//!   reading does, since no stream of a connection whose window stays shut can be ended
//!   any other way (the transport stops polling its body).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
/// per peer (0: none).
pub struct Caps {
    pub max: usize,
    pub per_peer_max: usize,
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
    let peers = (caps.per_peer_max > 0).then(|| Arc::new(Peers::new(caps.per_peer_max)));
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
                    Some(place) => Some(place),
                    None => return refused("connections_per_peer_max"),
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

/// What each peer holds, under a cap per peer: its open connections
/// (`connections_per_peer_max`), its health watches, or the bytes of its calls being
/// received (`grpc::receiving`).
pub struct Peers {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize, foldhash::fast::RandomState>>,
}

/// What one holder (a connection, a call) holds under its peer's cap, given back when
/// it is dropped.
pub struct PeerPlace {
    peers: Arc<Peers>,
    peer: IpAddr,
    units: usize,
}

impl Peers {
    pub fn new(max: usize) -> Self {
        assert!(max >= 1, "0 means no cap: no Peers then");
        Self {
            max,
            open: Mutex::default(),
        }
    }

    /// A place for a connection from `address`; `None` when its peer has `max` open.
    pub fn enter(peers: &Arc<Peers>, address: IpAddr) -> Option<PeerPlace> {
        Self::take(peers, address, 1)
    }

    /// `units` of `max` for a holder from `address`; `None` when its peer would pass
    /// `max`.
    pub fn take(peers: &Arc<Peers>, address: IpAddr, units: usize) -> Option<PeerPlace> {
        let peer = peer_of(address);
        let mut place = PeerPlace {
            peers: Arc::clone(peers),
            peer,
            units: 0,
        };
        place.grow(units).then_some(place)
    }

    /// Peers with a connection open.
    #[cfg(test)]
    fn peers(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl PeerPlace {
    /// `units` more for this holder; `false` (nothing taken) when its peer would pass
    /// `max`.
    pub fn grow(&mut self, units: usize) -> bool {
        let mut open = self.peers.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(self.peer).or_insert(0);
        match count.checked_add(units) {
            Some(grown) if grown <= self.peers.max => {
                *count = grown;
                self.units += units;
                true
            }
            _ => {
                if *count == 0 {
                    open.remove(&self.peer);
                }
                false
            }
        }
    }
}

impl Drop for PeerPlace {
    fn drop(&mut self) {
        let mut open = self.peers.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.peer) {
            debug_assert!(*count >= self.units, "a peer holds what its holders hold");
            *count -= self.units;
            if *count == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

/// The peer an address counts for: an IPv4 address (an IPv4-mapped IPv6 one too), or an
/// IPv6 address's /64.
fn peer_of(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(v6.to_bits() & !u128::from(u64::MAX))),
        },
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_an_ipv4_address_or_an_ipv6_slash_64() {
        let peer = |text: &str| peer_of(text.parse().unwrap());
        assert_eq!(peer("192.0.2.7"), peer("::ffff:192.0.2.7"), "IPv4-mapped");
        assert_ne!(peer("192.0.2.7"), peer("192.0.2.8"));
        assert_eq!(
            peer("2001:db8:1:2::1"),
            peer("2001:db8:1:2:ffff:ffff:ffff:ffff")
        );
        assert_eq!(
            peer("2001:db8:1:2::1"),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
        assert_ne!(peer("2001:db8:1:2::1"), peer("2001:db8:1:3::1"));
    }

    #[test]
    fn a_peer_holds_at_most_max_places_and_gets_them_back_when_they_close() {
        let peers = Arc::new(Peers::new(2));
        let (a, b) = ("192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap());
        let first = Peers::enter(&peers, a).expect("a place");
        let second = Peers::enter(&peers, a).expect("a place");
        assert!(Peers::enter(&peers, a).is_none(), "a third place");
        let other = Peers::enter(&peers, b).expect("another peer's place");
        assert_eq!(peers.peers(), 2);
        drop(first);
        let again = Peers::enter(&peers, a).expect("the place given back");
        drop((second, again, other));
        assert_eq!(peers.peers(), 0, "peers with nothing open are forgotten");
    }

    #[test]
    fn a_peer_holds_at_most_max_units_in_all_its_holders() {
        let peers = Arc::new(Peers::new(100));
        let a = "192.0.2.1".parse().unwrap();
        let mut first = Peers::take(&peers, a, 60).expect("60 of 100");
        assert!(Peers::take(&peers, a, 41).is_none(), "101 of 100");
        assert_eq!(peers.peers(), 1, "a refused take leaves nothing behind");
        assert!(!first.grow(41), "101 of 100");
        let second = Peers::take(&peers, a, 40).expect("100 of 100");
        assert!(!first.grow(1), "past max");
        drop(second);
        assert!(first.grow(40), "what the second held is back");
        assert!(Peers::take(&peers, a, usize::MAX).is_none(), "no overflow");
        drop(first);
        assert_eq!(peers.peers(), 0);
        assert!(Peers::take(&peers, a, 101).is_none());
        assert_eq!(peers.peers(), 0, "a refused first take leaves no entry");
    }
}
