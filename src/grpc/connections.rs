//! The listener's connections:
//! - at most `connections_max` open at once: past it a new connection is closed as soon
//!   as it is accepted (and counted), so idle or slow sockets can never pin more file
//!   descriptors and connection state than the limit allows;
//! - at most `connections_per_peer_max` of them from one peer, and a few peers' worth
//!   from one IPv6 /48 (`grpc::peers`), so one machine cannot take every place;
//! - a new connection must send its first bytes within `connection_opening_timeout_ms`;
//! - a connection is closed `connection_age_max_ms` + `connection_age_grace_ms` after it
//!   is admitted, whatever its streams are doing (tonic sends the GOAWAY at the age; its
//!   own grace would close the connection at the end without any GOAWAY first);
//! - a listed load balancer's connection (`proxy_protocol_from`) must first send a PROXY
//!   protocol header (`grpc::proxy_protocol`), and counts for the client it names;
//! - a listed health checker's connection (`health_checks_from`: the peer, or the client
//!   a header names) is marked so its health checks take a budget apart;
//! - a request may close its own connection ([`Closer`]): an export whose client stopped
//!   reading does, since no stream of a connection whose window stays shut can be ended
//!   any other way (the transport stops polling its body);
//! - a connection on which a reply has waited unwritten for `reply_write_timeout_ms`
//!   (its client answers pings but grants no window, or reads nothing) is closed
//!   ([`close_stalled_replies`]): the reply holds its share until it is written, and
//!   closing is the only way to end its stream;
//! - shutdown closes every connection still open once its drain is over
//!   ([`OpenConnections`]): a client that never answers the GOAWAY's ping (an idle
//!   HTTP/2 connection is enough) would otherwise hold the engine past it.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Sleep;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming, TlsConnectInfo};

use crate::grpc::peers::{Cap, PeerCaps, PeerPlace, Peers};
use crate::grpc::proxy_protocol;
use crate::service::clock::boot_ms;

/// Closes one connection: its next read or write fails, and the transport drops it
/// with every stream on it.
#[derive(Clone, Debug, Default)]
pub struct Closer(Arc<CloserState>);

#[derive(Debug, Default)]
struct CloserState {
    closed: AtomicBool,
    reader: AtomicWaker,
    /// When each reply handed to the transport and not yet written began to wait (ms
    /// since boot, `clock::boot_ms`): at most one per stream.
    replies_waiting: Mutex<slab::Slab<i64>>,
}

impl Closer {
    pub fn close(&self) {
        self.0.closed.store(true, Ordering::Release);
        self.0.reader.wake(); // the transport always has a read pending
    }

    fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::Acquire)
    }

    /// A reply ready for the transport: it waits until the guard is dropped (the
    /// transport wrote the reply, or dropped it).
    pub fn reply_waiting(self) -> ReplyWaiting {
        let key = self.replies_waiting().insert(boot_ms());
        ReplyWaiting { closer: self, key }
    }

    /// Whether a reply has waited `timeout_ms` or more at `now_ms`.
    fn stalled(&self, now_ms: i64, timeout_ms: i64) -> bool {
        let waiting = self.replies_waiting();
        waiting
            .iter()
            .any(|(_, &since)| now_ms - since >= timeout_ms)
    }

    /// How many of its replies wait to be written.
    #[cfg(test)]
    pub fn replies_waiting_now(&self) -> usize {
        self.replies_waiting().len()
    }

    fn replies_waiting(&self) -> MutexGuard<'_, slab::Slab<i64>> {
        // One insert, remove or scan at a time: a poisoned lock guards sound data.
        self.0
            .replies_waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A reply that waits to be written, on its connection's [`Closer`].
#[derive(Debug)]
pub struct ReplyWaiting {
    closer: Closer,
    key: usize,
}

impl Drop for ReplyWaiting {
    fn drop(&mut self) {
        self.closer.replies_waiting().remove(self.key);
    }
}

/// Every `timeout / 4` (at least 100 ms), closes each open connection on which a reply
/// has waited unwritten for `timeout` (so within a quarter more): its client answers
/// pings (so keepalive keeps it) but grants no window, or reads nothing. Until then the
/// reply holds its share of what calls may hold (`grpc::receiving`), which would last
/// the connection's age. A zero `timeout`: never.
pub async fn close_stalled_replies(open: OpenConnections, timeout: Duration) -> Infallible {
    if timeout.is_zero() {
        return std::future::pending().await;
    }
    let every = (timeout / 4).max(Duration::from_millis(100));
    let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
    loop {
        tokio::time::sleep(every).await;
        let closed = open.close_stalled(boot_ms(), timeout_ms);
        if closed > 0 {
            tracing::debug!(closed, "closed connections whose replies waited unwritten");
        }
    }
}

/// Every open connection's [`Closer`], so shutdown can close those still open when its
/// drain is over; one closed later than that is closed as it opens.
#[derive(Clone, Debug, Default)]
pub struct OpenConnections(Arc<std::sync::Mutex<OpenState>>);

#[derive(Debug, Default)]
struct OpenState {
    next: u64,
    closers: std::collections::HashMap<u64, Closer>,
    all_closed: bool,
}

impl OpenConnections {
    fn enter(&self) -> OpenPlace {
        let mut state = self.lock();
        let id = state.next;
        state.next += 1;
        let closer = Closer::default();
        if state.all_closed {
            closer.close();
        }
        state.closers.insert(id, closer.clone());
        OpenPlace {
            id,
            closer,
            open: self.clone(),
        }
    }

    /// Closes every open connection (their next read or write fails); how many.
    pub fn close_all(&self) -> usize {
        let mut state = self.lock();
        state.all_closed = true;
        state.closers.values().for_each(Closer::close);
        state.closers.len()
    }

    /// Closes every open connection on which a reply has waited `timeout_ms` at
    /// `now_ms`; how many.
    /// Counted before they close: whoever sees one closed finds it counted.
    fn close_stalled(&self, now_ms: i64, timeout_ms: i64) -> usize {
        let open: Vec<Closer> = self.lock().closers.values().cloned().collect();
        let stalled: Vec<Closer> = (open.into_iter())
            .filter(|closer| !closer.is_closed() && closer.stalled(now_ms, timeout_ms))
            .collect();
        metrics::counter!(crate::telemetry::CONNECTIONS_STALLED).increment(stalled.len() as u64);
        stalled.iter().for_each(Closer::close);
        stalled.len()
    }

    fn lock(&self) -> MutexGuard<'_, OpenState> {
        // Each critical section is one map operation: a poisoned lock guards sound data.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A connection's entry in [`OpenConnections`], removed when it is dropped.
#[derive(Debug)]
struct OpenPlace {
    id: u64,
    closer: Closer,
    open: OpenConnections,
}

impl Drop for OpenPlace {
    fn drop(&mut self) {
        self.open.lock().closers.remove(&self.id);
    }
}

/// What requests learn of their connection (in their extensions).
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    pub tcp: TcpConnectInfo,
    pub closer: Closer,
    /// A listed load balancer's own connection (v2 `LOCAL`), or a listed health
    /// checker's (`health_checks_from`): its health checks have a budget apart
    /// (`grpc::receiving`).
    pub checks_apart: bool,
}

/// A request's connection, from what its extensions hold: the plain connection's info,
/// or the TLS one's (tonic's request and HTTP extensions are two types).
fn connection<'a>(
    plain: Option<&'a ConnectionInfo>,
    tls: Option<&'a TlsConnectInfo<ConnectionInfo>>,
) -> Option<&'a ConnectionInfo> {
    plain.or_else(|| tls.map(TlsConnectInfo::get_ref))
}

/// The closer of the connection an HTTP request came on (plain or TLS).
pub fn closer_of_call(extensions: &tonic::codegen::http::Extensions) -> Option<Closer> {
    let info = connection(extensions.get(), extensions.get())?;
    Some(info.closer.clone())
}

/// The closer of the connection `extensions` came on (plain or TLS).
pub fn closer_of(extensions: &tonic::Extensions) -> Option<Closer> {
    let info = connection(extensions.get(), extensions.get())?;
    Some(info.closer.clone())
}

/// Whether `extensions`' request came on a listed load balancer's own connection.
pub fn checks_apart(extensions: &tonic::codegen::http::Extensions) -> bool {
    connection(extensions.get(), extensions.get()).is_some_and(|info| info.checks_apart)
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
    /// The client: the peer, or the one a listed proxy's header named.
    client: Option<SocketAddr>,
    /// Bytes read past a proxy's header, read again before the socket's.
    replay: Vec<u8>,
    /// A listed proxy's own connection, or a listed health checker's.
    checks_apart: bool,
    _permit: OwnedSemaphorePermit,
    _peer_place: Option<PeerPlace>,
    /// Its closer, listed among the open connections.
    open: OpenPlace,
    /// Until its first `OPENING_BYTES` arrive.
    opening: Option<Pin<Box<Sleep>>>,
    received: usize,
    /// When it is closed, whatever its streams are doing (its age and grace passed).
    ends: Pin<Box<Sleep>>,
    /// Last, so dropped last: its places are given back before the peer sees it close.
    stream: TcpStream,
}

/// The caps on open connections: `connections_max` in all, `connections_per_peer_max`
/// per peer (0: none) and its shares per IPv6 /48; the load balancers whose
/// connections name their client (`proxy_protocol_from`); the health checkers whose
/// checks have a budget apart (`health_checks_from`).
pub struct Caps {
    pub max: usize,
    pub per_peer: PeerCaps,
    pub proxies: Vec<IpNet>,
    pub health_checkers: Vec<IpNet>,
}

/// The accepted connections of `listener` (TCP_NODELAY on), within `caps`, each closed if
/// it sends nothing within `opening_timeout` (a listed proxy's: its header, then the
/// rest of its opening).
pub fn capped(listener: TcpListener, caps: Caps, (opening_timeout, lifetime): Times) -> Accepting {
    assert!(caps.max >= 1, "connections_max is checked at start-up");
    Accepting {
        // Without TCP_NODELAY, small responses wait on Nagle + delayed ACK (~40 ms).
        incoming: TcpIncoming::from(listener).with_nodelay(Some(true)),
        permits: Arc::new(Semaphore::new(caps.max)),
        peers: caps.per_peer.peers(),
        proxies: caps.proxies,
        health_checkers: caps.health_checkers,
        opening_timeout,
        lifetime,
        reading: JoinSet::new(),
        open: OpenConnections::default(),
    }
}

/// How long a connection has to open (`connection_opening_timeout_ms`), and to live
/// (`connection_age_max_ms` + `connection_age_grace_ms`).
pub type Times = (Duration, Duration);

/// The listener's connections, each counted under the caps once its client is known:
/// at once, or, for a listed proxy's, once its PROXY header has been read (in a task of
/// its own, so a slow one holds up no other; each holds its `connections_max` place
/// meanwhile).
pub struct Accepting {
    incoming: TcpIncoming,
    permits: Arc<Semaphore>,
    peers: Option<Arc<Peers>>,
    proxies: Vec<IpNet>,
    health_checkers: Vec<IpNet>,
    opening_timeout: Duration,
    lifetime: Duration,
    /// The headers being read; dropped with the listener (their tasks abort).
    reading: JoinSet<Option<Opened>>,
    open: OpenConnections,
}

/// A connection with its place under `connections_max`, whose client is known (a
/// listed proxy's: once its header is read).
struct Opened {
    client: SocketAddr,
    replay: Vec<u8>,
    /// A listed proxy's own connection (v2 `LOCAL`); a listed health checker's once
    /// admitted.
    checks_apart: bool,
    permit: OwnedSemaphorePermit,
    /// A listed proxy's connection whose header is being read holds a place under the
    /// proxy's own cap meanwhile, so silent ones cannot take every `connections_max`
    /// place.
    proxy_place: Option<PeerPlace>,
    opening: Pin<Box<Sleep>>,
    /// Last, so dropped last: its places are given back before the peer sees it close.
    stream: TcpStream,
}

impl Stream for Accepting {
    type Item = io::Result<Counted>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            // A header read: its connection goes on (an error or a refusal: closed).
            if let Poll::Ready(Some(read)) = this.reading.poll_join_next(cx) {
                match read.ok().flatten().and_then(|opened| this.admit(opened)) {
                    Some(counted) => return Poll::Ready(Some(Ok(counted))),
                    None => continue,
                }
            }
            match Pin::new(&mut this.incoming).poll_next(cx) {
                Poll::Ready(Some(Ok(stream))) => {
                    if let Some(counted) = this.accepted(stream) {
                        return Poll::Ready(Some(Ok(counted)));
                    }
                    // Closed, or its header is being read: `reading` is polled again,
                    // so a new task's end wakes this stream.
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Accepting {
    /// The connections it admitted that are still open.
    pub fn open_connections(&self) -> OpenConnections {
        self.open.clone()
    }

    /// A connection just accepted: counted, or being read (a listed proxy's), or closed.
    fn accepted(&mut self, stream: TcpStream) -> Option<Counted> {
        let peer = stream.peer_addr().ok()?; // an error: the peer is gone
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
            return refused("connections_max", peer); // dropped: closed at once
        };
        let opening = Box::pin(tokio::time::sleep(self.opening_timeout));
        let mut opened = Opened {
            stream,
            client: peer,
            replay: Vec::new(),
            checks_apart: false,
            permit,
            proxy_place: None,
            opening,
        };
        if !listed(&self.proxies, peer) {
            return self.admit(opened);
        }
        opened.proxy_place = self.place_of(peer)?;
        self.reading.spawn(read_proxy_header(opened));
        None
    }

    /// `opened` under its client's caps, or closed past one.
    fn admit(&self, mut opened: Opened) -> Option<Counted> {
        opened.proxy_place = None; // the client's place, taken below, replaces it
        let peer_place = self.place_of(opened.client)?;
        let checker = listed(&self.health_checkers, opened.client);
        Some(Counted {
            stream: opened.stream,
            client: Some(opened.client),
            replay: opened.replay,
            checks_apart: opened.checks_apart || checker,
            _permit: opened.permit,
            _peer_place: peer_place,
            open: self.open.enter(),
            opening: Some(opened.opening),
            received: 0,
            ends: Box::pin(tokio::time::sleep(self.lifetime)),
        })
    }

    /// A place for a connection of `peer` under its caps (none when there are no
    /// per-peer caps); `None`, counted, past one.
    fn place_of(&self, peer: SocketAddr) -> Option<Option<PeerPlace>> {
        let Some(peers) = &self.peers else {
            return Some(None);
        };
        match Peers::enter(peers, peer.ip()) {
            Ok(place) => Some(Some(place)),
            Err(Cap::Peer) => refused("connections_per_peer_max", peer),
            Err(Cap::Ipv6Prefix48) => refused("peer_shares_per_ipv6_48_max", peer),
        }
    }
}

/// `opened` (a listed proxy's connection) for the client its header names (the proxy
/// itself for its own connections); `None`, closed, without a valid header before its
/// opening deadline (only a bad header is counted: a balancer's TCP health check sends
/// nothing).
async fn read_proxy_header(mut opened: Opened) -> Option<Opened> {
    let header = tokio::select! {
        header = proxy_protocol::read_header(&mut opened.stream) => header,
        () = opened.opening.as_mut() => Err(io::ErrorKind::TimedOut.into()),
    };
    match header {
        Ok(header) => {
            opened.checks_apart = header.local;
            opened.client = header.client.unwrap_or(opened.client);
            opened.replay = header.rest;
            Some(opened)
        }
        Err(error) if error.kind() == io::ErrorKind::InvalidData => {
            tracing::debug!(%error, "a listed proxy's connection with a bad PROXY header");
            refused("proxy_protocol", opened.client)
        }
        Err(error) => {
            tracing::debug!(%error, "a listed proxy's connection ended before its header");
            None
        }
    }
}

/// Whether `peer` is in one of `networks` (an IPv4-mapped address as IPv4).
fn listed(networks: &[IpNet], peer: SocketAddr) -> bool {
    let address = peer.ip().to_canonical();
    networks.iter().any(|network| network.contains(&address))
}

/// Counts a connection refused at accept, by the limit that refused it.
fn refused<T>(limit: &'static str, peer: SocketAddr) -> Option<T> {
    metrics::counter!(crate::telemetry::CONNECTIONS_REFUSED, "limit" => limit).increment(1);
    tracing::debug!(limit, %peer, "connection refused at accept");
    None
}

impl Connected for Counted {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        let tcp = TcpConnectInfo {
            local_addr: self.stream.local_addr().ok(),
            remote_addr: self.client,
        };
        ConnectionInfo {
            tcp,
            closer: self.open.closer.clone(),
            checks_apart: self.checks_apart,
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
        self.open.closer.0.reader.register(cx.waker());
        // Before reading: a client that keeps sending must meet them too.
        if let Some(shut) = self.shut(cx) {
            return Poll::Ready(Err(shut));
        }
        if !self.replay.is_empty() && buf.remaining() > 0 {
            let replayed = buf.remaining().min(self.replay.len());
            buf.put_slice(&self.replay[..replayed]);
            self.replay.drain(..replayed);
            if self.replay.is_empty() {
                self.replay = Vec::new(); // its buffer goes
            }
            self.count_received(replayed);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) {
            self.count_received(buf.filled().len() - before);
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

/// The error a connection past its age and grace meets.
fn too_old() -> io::Error {
    let old = "connection_age_max_ms + connection_age_grace_ms passed";
    io::Error::new(io::ErrorKind::TimedOut, old)
}

impl Counted {
    /// Whether its age and grace have passed. Asked on writes too: a transport that
    /// cannot write (a client that reads nothing, its socket's buffer full) reads no
    /// more, but keeps trying to write.
    fn ended(&mut self, cx: &mut Context<'_>) -> bool {
        self.ends.as_mut().poll(cx).is_ready()
    }

    /// Why its next read or write must fail, if it must: closed by a request, or past
    /// its age and grace.
    fn shut(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        match self.open.closer.is_closed() {
            true => Some(closed()),
            false => self.ended(cx).then(too_old),
        }
    }

    fn count_received(&mut self, bytes: usize) {
        self.received += bytes;
        if self.received >= OPENING_BYTES {
            self.opening = None;
        }
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(shut) = self.shut(cx) {
            return Poll::Ready(Err(shut));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.ended(cx) {
            return Poll::Ready(Err(too_old()));
        }
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
        if let Some(shut) = self.shut(cx) {
            return Poll::Ready(Err(shut));
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
    fn a_connection_is_stalled_while_a_reply_has_waited_past_the_timeout() {
        let open = OpenConnections::default();
        let (first, second) = (open.enter(), open.enter());
        let now = boot_ms();
        let waiting = first.closer.clone().reply_waiting();
        let written = second.closer.clone().reply_waiting();
        drop(written);
        assert_eq!(open.close_stalled(now + 999, 1_000), 0, "not yet");
        assert_eq!(open.close_stalled(now + 60_000, 1_000), 1, "the first only");
        assert!(first.closer.is_closed() && !second.closer.is_closed());
        drop(waiting);
        assert_eq!(open.close_stalled(now + 60_000, 1_000), 0, "closed once");
        assert!(!second.closer.stalled(now + 60_000, 1_000));
    }
}
