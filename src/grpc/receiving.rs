//! What one-message calls hold until their reply is written. Such a call is received
//! whole before it takes its place (`grpc::shed`), so no count of places bounds what it
//! holds meanwhile: its stream and headers, then its message (up to
//! `message_size_bytes_max`). Without a bound, headers and half-sent messages on every
//! stream of every connection (4,096 × 1,024) could hold terabytes until
//! `request_timeout_ms`.
//!
//! So each such call reserves what it holds as it arrives: its headers (about as HTTP/2
//! counts a header list, plus [`CALL_STATE_BYTES`]) and the start of its message when it
//! starts, then the buffer its message is copied into as it grows, from
//! `receiving_bytes_max` in all and from its peer's `receiving_bytes_per_peer_max` (an
//! IPv4 address, an IPv6 /64). A call that would pass either is shed at once
//! (UNAVAILABLE / OVERLOADED with a RetryInfo) and gives back what it held; a call
//! received holds it, and its reply's message too, until the transport has written
//! the message or dropped it ([`held_until_sent`]: a watch of slots or events until its
//! first message is written; the streaming replies of `shed::STREAMING_REPLIES` give it
//! back once their headers are ready, their own pools bound them). The budgets count
//! the message as it was sent, so they bound memory closely, not exactly: tonic copies
//! the message once more to decode it, the decoded message may be larger, and a buffer
//! that grows holds its old and new copies for a moment.
//! Health checks have budgets of their own (`health_receiving_bytes_max`), so calls that
//! fill these never shed a health check, nor the reverse; and a listed load balancer's
//! own checks (v2 `LOCAL`, `grpc::proxy_protocol`) and a listed health checker's
//! (`health_checks_from`) one more, so others filling the health budget never make the
//! balancer or the kubelet take the node for down.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt as _;
use tonic::codegen::{http, Bytes};
use tonic::Status;

use crate::grpc::connections::{self, Closer, ReplyWaiting};
use crate::grpc::peers::{PeerCaps, PeerPlace, Peers};
use crate::service::ServiceError;

/// What a call holds besides its headers and message: its HTTP/2 stream, its request's
/// parts and the futures serving it. Measured: 40,000 calls of headers only (about 150
/// bytes of them each) grew the server's RSS by 4.6 KB a call.
pub const CALL_STATE_BYTES: usize = 4608;

/// A gRPC message's frame: a flag byte and a 4-byte length before the message.
const GRPC_FRAME_PREFIX_BYTES: usize = 5;

/// The budgets calls reserve from until answered, shared by every service they wrap.
pub struct Receiving {
    total: Arc<Budget>,
    /// With peers counted, the last part of the total, kept for light peers: what a
    /// call of a peer holding little takes once `total` is spent
    /// ([`crate::limits::RECEIVING_LIGHT_PEERS_RESERVE_PARTS`]). Peers each holding
    /// their share (replies left unread and taken just before `reply_write_timeout_ms`:
    /// 17 addresses shed 94% of others' calls, an outside test, 2026-12-07) fill
    /// `total`, and their admitted calls' replies held past it never take this.
    light: Option<Arc<Budget>>,
    /// `None`: no cap per peer.
    peers: Option<Arc<Peers>>,
    /// How long a message may take to arrive, from the call's headers (`None`: until
    /// `request_timeout_ms`).
    within: Option<Duration>,
    /// Calls on a listed load balancer's own connections (v2 `LOCAL`) and a listed
    /// health checker's, if apart: a budget of their own, as large as the total, so
    /// others filling the total never shed them (health checks: the checker would take
    /// the node for down).
    checkers: Option<Arc<Budget>>,
}

/// Bytes taken of `max`; nothing ever waits for them: a take past `max` fails at once
/// (a plain atomic: cheaper than a semaphore, whose release takes a lock). Only calls
/// whose peer holds at most `peer_holds_max` take it (the reserve for light peers).
struct Budget {
    taken: AtomicUsize,
    max: usize,
    peer_holds_max: usize,
}

impl Budget {
    /// Whether a call whose peer holds `peer_holds` may take it.
    fn admits(&self, peer_holds: Option<usize>) -> bool {
        peer_holds.is_none_or(|holds| holds <= self.peer_holds_max)
    }

    fn new(max: usize, peer_holds_max: usize) -> Self {
        let taken = AtomicUsize::new(0);
        Self {
            taken,
            max,
            peer_holds_max,
        }
    }

    /// `bytes` more, for a call whose peer holds `peer_holds` with them (`None`: no
    /// peers counted); refused (nothing taken) past the budget, or for a peer holding
    /// too much to take it.
    fn take(&self, bytes: usize, peer_holds: Option<usize>) -> bool {
        if !self.admits(peer_holds) {
            return false;
        }
        let max = self.max;
        let within = |taken: usize| taken.checked_add(bytes).filter(|&sum| sum <= max);
        let update = self
            .taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, within);
        update.is_ok()
    }

    fn give(&self, bytes: usize) {
        let before = self.taken.fetch_sub(bytes, Ordering::AcqRel);
        debug_assert!(before >= bytes, "a budget is given back what was taken");
    }
}

/// Reserved with a call's headers for the start of its message, so a small message
/// (most are) costs no second reservation.
const MESSAGE_START_BYTES: usize = 1024;

/// What one call holds of the budgets; given back when dropped.
pub struct Reserved {
    /// How long its message may take to arrive (`Receiving::within`).
    within: Option<Duration>,
    /// Taken of `budget`, and of the peer's in `peer` (with `spilled`).
    bytes: usize,
    /// The total, or the checkers' own budget, or the reserve for light peers.
    budget: Arc<Budget>,
    peer: Option<PeerPlace>,
    /// Reserved, not yet grown into.
    spare: usize,
    /// Taken of the reserve: the total, which its reply takes, past it, once its peer
    /// holds too much for the reserve (`spilled` bytes), so that replies left unread do
    /// not fill the reserve.
    spill: Option<Arc<Budget>>,
    spilled: usize,
}

impl Receiving {
    /// `total_max` bytes in all, `per_peer` per peer (and IPv6 /48).
    pub fn new(total_max: usize, per_peer: PeerCaps) -> Self {
        use crate::limits::{RECEIVING_LIGHT_PEERS_RESERVE_PARTS, RECEIVING_LIGHT_PEER_PARTS};
        assert!(total_max >= 1, "receiving_bytes_max is checked at start-up");
        // No reserve where a light peer could not hold even one call (with 1 KiB of
        // headers), and none that would keep a peer from holding its whole share (its
        // largest message: `limits` checks the share holds it).
        let light_peer_max = per_peer.per_peer_max / RECEIVING_LIGHT_PEER_PARTS;
        let reserve = (total_max / RECEIVING_LIGHT_PEERS_RESERVE_PARTS)
            .min(total_max.saturating_sub(per_peer.per_peer_max));
        let smallest_call = CALL_STATE_BYTES + MESSAGE_START_BYTES + 1024;
        let (total, light) = match light_peer_max < smallest_call || reserve == 0 {
            true => (total_max, None),
            false => {
                let light = Budget::new(reserve, light_peer_max);
                (total_max - reserve, Some(Arc::new(light)))
            }
        };
        Self {
            total: Arc::new(Budget::new(total, usize::MAX)),
            light,
            peers: per_peer.peers(),
            within: None,
            checkers: None,
        }
    }

    /// Messages must arrive `within` this of their call's headers
    /// (`message_receive_timeout_ms`), so a stalled one holds its share no longer.
    pub fn with_deadline(self, within: Duration) -> Self {
        let within = Some(within);
        Self { within, ..self }
    }

    /// Calls on connections whose checks are apart (a listed load balancer's own, a
    /// listed health checker's: `ConnectionInfo::checks_apart`) take a budget of their
    /// own, as large as the total (and their peer's share), not the total.
    pub fn with_checkers_apart(self) -> Self {
        let max = self.total.max + self.light.as_ref().map_or(0, |light| light.max);
        let checkers = Some(Arc::new(Budget::new(max, usize::MAX)));
        Self { checkers, ..self }
    }

    /// The reservation of a call starting with `parts` (and the start of its message);
    /// `None` when a budget is spent (or, with a cap per peer, its peer's address is
    /// gone: a dead socket).
    pub fn reserve(&self, parts: &http::request::Parts) -> Option<Reserved> {
        let bytes = call_bytes(parts) + MESSAGE_START_BYTES;
        let (peer, peer_holds) = match &self.peers {
            None => (None, None),
            Some(peers) => {
                let address = connections::peer_address(&parts.extensions)?;
                let mut place = Peers::place(peers, address);
                let holds = place.grow(bytes).ok()?;
                (Some(place), Some(holds))
            }
        };
        // `None`: `peer` gives its bytes back as it drops.
        let budget = self.budget_taking(&parts.extensions, bytes, peer_holds)?;
        let of_reserve = self.light.as_ref().is_some_and(|l| Arc::ptr_eq(l, budget));
        Some(Reserved {
            within: self.within,
            bytes,
            budget: Arc::clone(budget),
            peer,
            spare: MESSAGE_START_BYTES,
            spill: of_reserve.then(|| Arc::clone(&self.total)),
            spilled: 0,
        })
    }

    /// The budget `bytes` were taken of for a call whose peer holds `peer_holds` with
    /// them: a listed checker's own, else the total, else (a light peer's call) the
    /// reserve for light peers; `None` when none had room.
    fn budget_taking(
        &self,
        extensions: &http::Extensions,
        bytes: usize,
        peer_holds: Option<usize>,
    ) -> Option<&Arc<Budget>> {
        if let Some(own) = &self.checkers {
            if connections::checks_apart(extensions) {
                return own.take(bytes, peer_holds).then_some(own);
            }
        }
        let budgets = std::iter::once(&self.total).chain(&self.light);
        budgets
            .into_iter()
            .find(|budget| budget.take(bytes, peer_holds))
    }

    /// Bytes free in the total budget (and the reserve for light peers).
    pub fn available(&self) -> usize {
        let free = |budget: &Budget| {
            budget
                .max
                .saturating_sub(budget.taken.load(Ordering::Acquire))
        };
        free(&self.total) + self.light.as_deref().map_or(0, free)
    }
}

impl Reserved {
    /// `bytes` more (of the message's buffer): from the spare first; `false`, nothing
    /// more taken, when a budget would be passed.
    fn grow(&mut self, bytes: usize) -> bool {
        let from_spare = bytes.min(self.spare);
        let more = bytes - from_spare;
        if more > 0 {
            let peer_holds = match &mut self.peer {
                None => None,
                Some(peer) => match peer.grow(more) {
                    Ok(holds) => Some(holds),
                    Err(_) => return false,
                },
            };
            if !self.budget.take(more, peer_holds) {
                if let Some(peer) = &mut self.peer {
                    peer.give(more);
                }
                return false;
            }
            self.bytes += more;
        }
        self.spare -= from_spare;
        true
    }

    /// `bytes` more, past the budgets if need be (a reply already made, waiting for its
    /// client to read it): from the spare first, like `grow`; the calls that come next
    /// are shed until it is given back.
    pub fn hold_past(&mut self, bytes: usize) {
        let from_spare = bytes.min(self.spare);
        let more = bytes - from_spare;
        self.spare -= from_spare;
        if more == 0 {
            return;
        }
        let peer_holds = self.peer.as_mut().map(|peer| peer.grow_past(more));
        match &self.spill {
            Some(total) if !self.budget.admits(peer_holds) => {
                total.taken.fetch_add(more, Ordering::AcqRel);
                self.spilled += more;
            }
            _ => {
                self.budget.taken.fetch_add(more, Ordering::AcqRel);
                self.bytes += more;
            }
        }
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.budget.give(self.bytes);
        if let Some(total) = &self.spill {
            total.give(self.spilled);
        }
    }
}

/// What a call's headers take, about as HTTP/2 counts a header list (RFC 7540 §6.5.2:
/// each field's name and value and 32 bytes; the pseudo-headers but the path are in
/// [`CALL_STATE_BYTES`]), with its path and [`CALL_STATE_BYTES`].
fn call_bytes(parts: &http::request::Parts) -> usize {
    let headers: usize = parts
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum();
    CALL_STATE_BYTES + parts.uri.path().len() + headers
}

/// A one-message call's body, whole, copied into one buffer whose every byte is
/// reserved in `reserved` before it is allocated (a piece is never kept as it came: a
/// slice keeps h2's whole read buffer alive): refused as tonic refuses a message it will
/// not decode (OUT_OF_RANGE) once its 5-byte prefix declares more than
/// `message_bytes_max` or more arrives, without reading the rest; shed (UNAVAILABLE /
/// OVERLOADED) when the buffer would pass a budget; CANCELLED if the client broke the
/// stream; DEADLINE_EXCEEDED if it has not all come within the deadline.
pub async fn receive(
    body: tonic::body::Body,
    largest: MessageLimit,
    reserved: &mut Reserved,
) -> Result<Bytes, Status> {
    let Some(within) = reserved.within else {
        return receive_whole(body, largest, reserved).await;
    };
    let received = receive_whole(body, largest, reserved);
    tokio::time::timeout(within, received)
        .await
        .unwrap_or_else(|_| {
            metrics::counter!(crate::telemetry::MESSAGES_LATE).increment(1);
            Err(Status::deadline_exceeded(
                "the request's message did not arrive in time (message_receive_timeout_ms)",
            ))
        })
}

/// The largest message a call may send, and the limit's name (said to a client that
/// sends more): `message_size_bytes_max`, or for health `probe_message_size_bytes_max`.
pub type MessageLimit = (usize, &'static str);

/// [`receive`] without its deadline.
async fn receive_whole(
    mut body: tonic::body::Body,
    (message_bytes_max, limit): MessageLimit,
    reserved: &mut Reserved,
) -> Result<Bytes, Status> {
    let too_large = || {
        Status::out_of_range(format!(
            "the message is too large: at most {message_bytes_max} bytes ({limit})"
        ))
    };
    let after_it =
        || Status::invalid_argument("a call takes one request message: more bytes came after it");
    let limit = message_bytes_max.saturating_add(GRPC_FRAME_PREFIX_BYTES);
    let (mut message, mut declared) = (Vec::new(), None);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| {
            Status::cancelled(format!("the request's message was not received: {error}"))
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers: a gRPC request has none that matter here
        };
        // The most the buffer may hold: the limit, then what the prefix declares.
        let most = declared.map_or(limit, |length| length + GRPC_FRAME_PREFIX_BYTES);
        if message.len() + data.len() > most {
            return Err(declared.map_or_else(too_large, |_| after_it()));
        }
        let room = make_room(&mut message, data.len(), most, |more| reserved.grow(more));
        if !room {
            return Err(shed());
        }
        message.extend_from_slice(&data);
        if declared.is_none() && message.len() >= GRPC_FRAME_PREFIX_BYTES {
            let length = declared_length(&message).unwrap_or(usize::MAX);
            if length > message_bytes_max {
                return Err(too_large());
            }
            if message.len() > length + GRPC_FRAME_PREFIX_BYTES {
                return Err(after_it());
            }
            declared = Some(length);
        }
    }
    Ok(Bytes::from(message))
}

/// Room in `message` for `more` bytes: its capacity at least doubles (but not past
/// `most`, unless the bytes need it), each byte it gains first taken by `reserve`;
/// `false`, nothing grown, when `reserve` refuses.
fn make_room(
    message: &mut Vec<u8>,
    more: usize,
    most: usize,
    mut reserve: impl FnMut(usize) -> bool,
) -> bool {
    let needed = message.len() + more;
    let before = message.capacity();
    if needed <= before {
        return true;
    }
    let target = needed.max(before.saturating_mul(2).min(most));
    if !reserve(target - before) {
        return false;
    }
    message.reserve_exact(target - message.len());
    true
}

/// `reply`, whose body holds `reserved`, grown by its message, until the transport has
/// written the message or dropped it: the reservation goes inside the message's bytes
/// ([`Sending`]), which hyper and h2 keep until then. A client that keeps its window
/// shut, or open by one byte (hyper 1.12 hands the whole message to h2 once the window
/// has a byte, and asks for the trailers at once), so leaves its replies unsent, has
/// them count against its peer's share and the total like messages half-sent, and its
/// next calls are shed, rather than each of its streams holding a reply (a page of
/// slots: 36 KB; 64,000 of them held 2.5 GB) for as long as its connection lives.
/// From now (ready, polled or not), the reply also waits on its connection's `closer`,
/// which closes the connection once it has waited `reply_write_timeout_ms`
/// (`connections::close_stalled_replies`).
pub fn held_until_sent(
    reply: http::Response<tonic::body::Body>,
    reserved: Reserved,
    closer: Option<Closer>,
) -> http::Response<tonic::body::Body> {
    reply.map(|inner| {
        tonic::body::Body::new(Unsent {
            inner,
            reserved: Some((reserved, closer.map(Closer::reply_waiting))),
        })
    })
}

struct Unsent {
    inner: tonic::body::Body,
    /// Until the first message is taken: then they go with it ([`Sending`]); a reply
    /// without one (an error's trailers) gives them back when they are taken.
    reserved: Option<(Reserved, Option<ReplyWaiting>)>,
}

impl http_body::Body for Unsent {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        // Held while the reply is being made; a reply that streams (a watch) holds it
        // until its first message is written, as a one-reply call does its one.
        let std::task::Poll::Ready(polled) = std::pin::Pin::new(&mut self.inner).poll_frame(cx)
        else {
            return std::task::Poll::Pending;
        };
        let this = &mut *self;
        let Some(Ok(frame)) = polled else {
            this.reserved = None;
            return std::task::Poll::Ready(polled);
        };
        let message = match frame.into_data() {
            Ok(message) => message,
            Err(other) => {
                this.reserved = None;
                return std::task::Poll::Ready(Some(Ok(other)));
            }
        };
        let message = match this.reserved.take() {
            Some((mut reserved, waiting)) => {
                let (message, held) = compacted(message);
                reserved.hold_past(held);
                Bytes::from_owner(Sending {
                    message,
                    _reserved: reserved,
                    _waiting: waiting,
                })
            }
            None => message,
        };
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(message))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A reply's `message` as it will be held, and what it holds: tonic encodes into a
/// buffer of 8 KiB that doubles as it grows, and the message's bytes keep all of it, so
/// a small one (a booking, a health check) is copied out and holds its length, a large
/// one keeps the buffer and holds its length rounded up so.
fn compacted(message: Bytes) -> (Bytes, usize) {
    match message.len() <= COPIED_REPLY_BYTES_MAX {
        true => {
            let copy = Bytes::copy_from_slice(&message);
            let held = copy.len();
            (copy, held)
        }
        false => {
            let held = message.len().max(TONIC_ENCODE_BUFFER_BYTES);
            (message, held.next_power_of_two())
        }
    }
}

/// Replies up to this long are copied out of tonic's buffer (a copy costs less than
/// the 8 KiB it would keep).
const COPIED_REPLY_BYTES_MAX: usize = 2 * 1024;

/// tonic's encoding buffer to start with (`BufferSettings`' default).
const TONIC_ENCODE_BUFFER_BYTES: usize = 8 * 1024;

/// A reply's message with what its call holds: given back when the transport drops it,
/// written or not (a stream reset, a connection closed).
struct Sending {
    message: Bytes,
    _reserved: Reserved,
    _waiting: Option<ReplyWaiting>,
}

impl AsRef<[u8]> for Sending {
    fn as_ref(&self) -> &[u8] {
        &self.message
    }
}

/// UNAVAILABLE / OVERLOADED, counted as shed.
pub fn shed() -> Status {
    metrics::counter!(crate::telemetry::SHED).increment(1);
    Status::from(ServiceError::Shed)
}

/// The length a gRPC frame's 5-byte prefix declares (after its compression flag).
fn declared_length(message: &[u8]) -> Option<usize> {
    let length: [u8; 4] = message.get(1..GRPC_FRAME_PREFIX_BYTES)?.try_into().ok()?;
    Some(u32::from_be_bytes(length) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts_from(address: &str) -> http::request::Parts {
        parts_on(address, false)
    }

    /// A call's parts on a connection from `address` (a listed balancer's or health
    /// checker's own if `checks_apart`).
    fn parts_on(address: &str, checks_apart: bool) -> http::request::Parts {
        let request = http::Request::post("/prenota.v1.BookingService/Book")
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        let (mut parts, ()) = request.into_parts();
        let tcp = tonic::transport::server::TcpConnectInfo {
            local_addr: None,
            remote_addr: Some(address.parse().unwrap()),
        };
        let closer = connections::Closer::default();
        parts.extensions.insert(connections::ConnectionInfo {
            tcp,
            closer,
            checks_apart,
        });
        parts
    }

    /// A call from each of three peers.
    fn fill_from_three_peers(receiving: &Receiving) -> Vec<Reserved> {
        let peers = ["192.0.2.1:1", "192.0.2.2:1", "192.0.2.3:1"];
        let parts = peers.map(parts_from);
        parts
            .iter()
            .map(|parts| receiving.reserve(parts).unwrap())
            .collect()
    }

    #[test]
    fn a_balancers_and_checkers_own_calls_have_a_budget_apart_within_their_share() {
        let headers = "content-type".len() + "application/grpc".len() + 32;
        let path = "/prenota.v1.BookingService/Book".len();
        let call = CALL_STATE_BYTES + path + headers + MESSAGE_START_BYTES;
        let caps = PeerCaps {
            per_peer_max: 2 * call,
            shares_per_ipv6_48: 0,
        };
        // No reserve for light peers: a share's 64th holds no call.
        let apart = Receiving::new(3 * call, caps).with_checkers_apart();
        let _others = fill_from_three_peers(&apart);
        assert_eq!(apart.available(), 0, "the total filled by others");
        let client = apart.reserve(&parts_on("10.0.0.9:2", false));
        assert!(
            client.is_none(),
            "a call the balancer passes on for a client"
        );
        let mut own = Vec::new();
        while let Some(reserved) = apart.reserve(&parts_on("10.0.0.9:1", true)) {
            own.push(reserved);
        }
        assert_eq!(own.len(), 2, "the balancer's own calls, up to its share");
        drop(own);
        assert_eq!(apart.available(), 0, "never taken of the total");
        let together = Receiving::new(3 * call, caps);
        let _others = fill_from_three_peers(&together);
        let own = together.reserve(&parts_on("10.0.0.9:1", true));
        assert!(own.is_none(), "checkers not apart");
        let unshared = Receiving::new(3 * call, PeerCaps::NONE).with_checkers_apart();
        let _others = fill_from_three_peers(&unshared);
        let own: Vec<_> = (0..5)
            .map_while(|_| unshared.reserve(&parts_on("10.0.0.9:1", true)))
            .collect();
        assert_eq!(
            own.len(),
            3,
            "without shares, the checkers' own budget bounds them"
        );
    }

    /// The size of a call of [`parts_from`]'s, and caps of 128 such calls a peer (so a
    /// peer holding two calls is light, three heavy), 8 peers' for an IPv6 /48.
    fn call_and_caps() -> (usize, PeerCaps) {
        let headers = "content-type".len() + "application/grpc".len() + 32;
        let path = "/prenota.v1.BookingService/Book".len();
        let call = CALL_STATE_BYTES + path + headers + MESSAGE_START_BYTES;
        let caps = PeerCaps {
            per_peer_max: crate::limits::RECEIVING_LIGHT_PEER_PARTS * 2 * call,
            shares_per_ipv6_48: 8,
        };
        (call, caps)
    }

    /// Three heavy peers' calls filling the total but its reserve (3 × 128 calls of 512).
    fn filled_but_the_reserve(receiving: &Receiving) -> Vec<Reserved> {
        let heavy = ["192.0.2.1:1", "192.0.2.2:1", "192.0.2.3:1"].map(parts_from);
        let held: Vec<_> = heavy
            .iter()
            .flat_map(|parts| (0..140).map_while(|_| receiving.reserve(parts)))
            .collect();
        assert_eq!(held.len(), 384, "heavy peers fill three quarters");
        held
    }

    #[test]
    fn the_last_quarter_of_a_budget_is_kept_for_peers_holding_little() {
        let (call, caps) = call_and_caps();
        let receiving = Receiving::new(512 * call, caps);
        let held = filled_but_the_reserve(&receiving);
        let light = parts_from("192.0.2.9:1");
        let mut first = receiving.reserve(&light).expect("a light peer's call");
        let second = receiving.reserve(&light).expect("its second");
        let third = receiving.reserve(&light);
        assert!(third.is_none(), "its third makes it heavy");
        assert!(!first.grow(3 * call), "nor may its message make it heavy");
        let other = receiving.reserve(&parts_from("192.0.2.10:1"));
        assert!(other.is_some(), "another light peer's call");
        assert_eq!(receiving.available(), 125 * call);
        // A reply that makes its peer heavy is held past the total, not the reserve.
        first.hold_past(10 * call);
        assert_eq!(receiving.available(), 125 * call, "the reserve untouched");
        drop((held, first, second, other));
        let all = 512 * call;
        assert_eq!(receiving.available(), all, "everything is given back");
        // Without shares per peer, nothing is kept: one client fills it all.
        let unshared = Receiving::new(8 * call, PeerCaps::NONE);
        let heavy = parts_from("192.0.2.1:1");
        let all: Vec<_> = (0..9).map_while(|_| unshared.reserve(&heavy)).collect();
        assert_eq!(all.len(), 8);
        // Nor where it would keep a peer from its whole share.
        let small = Receiving::new(128 * call, caps);
        let all: Vec<_> = (0..140).map_while(|_| small.reserve(&heavy)).collect();
        assert_eq!(all.len(), 128);
    }

    /// Each /64 of an IPv6 /48 is a peer, and every one holding one call is light: the
    /// /48 takes of the reserve only as one light peer scaled to its 8 peers' caps.
    #[test]
    fn the_slash_64s_of_one_slash_48_share_one_light_peers_room_in_the_reserve() {
        let (call, caps) = call_and_caps();
        let receiving = Receiving::new(512 * call, caps);
        let _held = filled_but_the_reserve(&receiving);
        let slash_64s = (1..=30).map(|n| parts_from(&format!("[2001:db8:0:{n:x}::1]:1")));
        let admitted: Vec<_> = slash_64s.map_while(|p| receiving.reserve(&p)).collect();
        assert_eq!(admitted.len(), 16, "8 light peers' calls of the /48");
        let other = receiving.reserve(&parts_from("[2001:db8:1::1]:1"));
        assert!(other.is_some(), "another /48's");
    }

    #[test]
    fn a_call_reserves_its_headers_and_gives_them_back() {
        let receiving = Receiving::new(1 << 20, PeerCaps::NONE);
        let parts = parts_from("192.0.2.1:4000");
        let mut reserved = receiving.reserve(&parts).expect("room");
        let headers = "content-type".len() + "application/grpc".len() + 32;
        let path = "/prenota.v1.BookingService/Book".len();
        let call = CALL_STATE_BYTES + path + headers + MESSAGE_START_BYTES;
        assert_eq!(receiving.available(), (1 << 20) - call);
        assert!(reserved.grow(MESSAGE_START_BYTES), "the spare");
        assert_eq!(
            receiving.available(),
            (1 << 20) - call,
            "taken with the headers"
        );
        assert!(reserved.grow(10));
        assert_eq!(
            receiving.available(),
            (1 << 20) - call - 10,
            "past the spare"
        );
        drop(reserved);
        assert_eq!(receiving.available(), 1 << 20);
    }

    /// The reply's message carries what the call holds: a reply not yet made holds it
    /// (a watch's first poll is pending), asking for the trailers gives nothing back
    /// (hyper asks once it has handed h2 the message, sent or not); the message's bytes
    /// do when the last of them is dropped (written, or the stream gone). The message
    /// counts as tonic's 8 KiB buffer it keeps.
    #[tokio::test]
    async fn a_reply_holds_its_share_until_its_message_is_dropped() {
        use bytes::Buf as _;
        let receiving = Receiving::new(1 << 20, PeerCaps::NONE);
        let reserved = receiving.reserve(&parts_from("192.0.2.1:4000")).unwrap();
        let call = (1 << 20) - receiving.available();
        let (send, frames) = tokio::sync::mpsc::channel(1);
        let reply =
            http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(frames));
        let reply = http::Response::new(tonic::body::Body::new(reply));
        let closer = Closer::default();
        let mut body = held_until_sent(reply, reserved, Some(closer.clone())).into_body();
        assert_eq!(
            closer.replies_waiting_now(),
            1,
            "waiting once ready, before a poll"
        );
        let mut waiting = std::task::Context::from_waker(std::task::Waker::noop());
        let polled = http_body::Body::poll_frame(std::pin::Pin::new(&mut body), &mut waiting);
        assert!(polled.is_pending());
        assert_eq!(
            receiving.available(),
            (1 << 20) - call,
            "held while pending"
        );
        let data = http_body::Frame::data(Bytes::from(vec![7u8; 3_000]));
        send.send(Ok::<_, Status>(data)).await.unwrap();
        let mut message = body.frame().await.unwrap().unwrap().into_data().unwrap();
        let held = receiving.available();
        let grown = 8 * 1024 - MESSAGE_START_BYTES;
        assert_eq!(held, (1 << 20) - call - grown, "grown by tonic's buffer");
        drop(send);
        assert!(body.frame().await.is_none(), "the reply's end");
        drop(body);
        message.advance(2_000); // as h2 keeps what it has yet to write
        assert_eq!(receiving.available(), held, "still held");
        assert_eq!(closer.replies_waiting_now(), 1, "still waiting");
        drop(message);
        assert_eq!(receiving.available(), 1 << 20, "given back");
        assert_eq!(closer.replies_waiting_now(), 0, "written");
    }

    #[test]
    fn a_small_reply_is_copied_out_of_tonics_buffer_and_a_large_one_counts_it() {
        let mut buffer = bytes::BytesMut::with_capacity(TONIC_ENCODE_BUFFER_BYTES);
        buffer.extend_from_slice(&[1; 7]);
        let (small, held) = compacted(buffer.split_to(7).freeze());
        assert_eq!((&small[..], held), (&[1u8; 7][..], 7));
        let (_, held) = compacted(Bytes::from(vec![0; 3_000]));
        assert_eq!(held, 8 * 1024, "tonic's first buffer");
        let (_, held) = compacted(Bytes::from(vec![0; 36_000]));
        assert_eq!(held, 64 * 1024, "doubled up to it");
    }

    #[test]
    fn pieces_past_a_budget_are_refused_and_taken_nowhere() {
        let per_peer = 10_000;
        let caps = PeerCaps {
            per_peer_max: per_peer,
            shares_per_ipv6_48: 0,
        };
        let receiving = Receiving::new(25_000, caps);
        let mut first = receiving.reserve(&parts_from("192.0.2.1:4000")).unwrap();
        let taken = 25_000 - receiving.available();
        assert!(
            first.grow(per_peer - taken + MESSAGE_START_BYTES),
            "up to the peer's cap"
        );
        assert!(!first.grow(1), "past the peer's cap");
        assert_eq!(
            receiving.available(),
            25_000 - per_peer,
            "the refused byte is back"
        );
        let same_peer = receiving.reserve(&parts_from("192.0.2.1:4001"));
        assert!(same_peer.is_none(), "the peer's cap is spent");
        let other = receiving.reserve(&parts_from("192.0.2.2:4000"));
        assert!(other.is_some(), "another peer has room");
        drop((first, other));
        assert_eq!(receiving.available(), 25_000, "everything is given back");
        assert!(receiving.reserve(&parts_from("192.0.2.1:4000")).is_some());

        let receiving = Receiving::new(10_000, PeerCaps::NONE);
        let mut first = receiving.reserve(&parts_from("192.0.2.1:4000")).unwrap();
        let spare = MESSAGE_START_BYTES;
        assert!(first.grow(receiving.available() - 100 + spare));
        assert!(!first.grow(101), "past the total");
        let other = receiving.reserve(&parts_from("192.0.2.2:4000"));
        assert!(other.is_none(), "the total is spent, whoever asks");
        drop(first);
        assert_eq!(receiving.available(), 10_000);
    }

    /// A health check's message past its limit was told of `message_size_bytes_max`, a
    /// limit it does not meet: the refusal names the limit the call has.
    #[tokio::test]
    async fn a_message_too_large_is_told_the_limit_it_passed() {
        let receiving = Receiving::new(1 << 20, PeerCaps::NONE);
        let mut reserved = receiving.reserve(&parts_from("192.0.2.1:4000")).unwrap();
        let mut message = vec![0u8; GRPC_FRAME_PREFIX_BYTES];
        message[1..].copy_from_slice(&100u32.to_be_bytes());
        let body = tonic::body::Body::new(http_body_util::Full::new(Bytes::from(message)));
        let limit = (10, "probe_message_size_bytes_max");
        let refused = receive(body, limit, &mut reserved).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::OutOfRange);
        let text = refused.message();
        assert!(
            text.contains("at most 10 bytes (probe_message_size_bytes_max)"),
            "{text}"
        );
    }

    /// How `receive` answers `message` sent whole, with `total` bytes of budget.
    async fn received(message: Vec<u8>, total: usize) -> Result<Bytes, tonic::Code> {
        let receiving = Receiving::new(total, PeerCaps::NONE);
        let mut reserved = receiving.reserve(&parts_from("192.0.2.1:4000")).unwrap();
        let body = tonic::body::Body::new(http_body_util::Full::new(Bytes::from(message)));
        let received = receive(body, (100_000, "message_size_bytes_max"), &mut reserved).await;
        received.map_err(|status| status.code())
    }

    fn framed(declared: u32, bytes: usize) -> Vec<u8> {
        let mut message = vec![0];
        message.extend_from_slice(&declared.to_be_bytes());
        message.resize(5 + bytes, 7);
        message
    }

    #[tokio::test]
    async fn a_message_is_received_whole_or_refused_with_its_reason() {
        let whole = framed(50_000, 50_000);
        assert_eq!(
            received(whole.clone(), 1 << 20).await,
            Ok(Bytes::from(whole))
        );
        let code = received(framed(100_001, 10), 1 << 20).await;
        assert_eq!(code, Err(tonic::Code::OutOfRange), "declared too large");
        let code = received(framed(10, 20), 1 << 20).await;
        assert_eq!(code, Err(tonic::Code::InvalidArgument), "bytes after it");
        let code = received(framed(50_000, 50_000), 40_000).await;
        assert_eq!(code, Err(tonic::Code::Unavailable), "past the budget");
        assert_eq!(
            received(framed(0, 0), 1 << 20).await.map(|b| b.len()),
            Ok(5)
        );
    }

    #[test]
    fn the_declared_length_follows_the_flag_byte() {
        assert_eq!(declared_length(&[0, 0, 1, 0, 2, 9]), Some(0x0001_0002));
        assert_eq!(declared_length(&[0, 0, 0]), None);
    }

    /// Every byte of capacity is reserved before it is allocated; the buffer doubles
    /// (so many small pieces cost few reservations) but not past what the message may
    /// take.
    #[test]
    fn the_buffer_grows_by_doubling_and_reserves_all_it_gains() {
        let (mut message, mut reserved) = (Vec::new(), 0);
        let mut reserve = |more| {
            reserved += more;
            true
        };
        let mut capacities = Vec::new();
        for piece in [3usize, 100, 1, 0, 150, 300] {
            assert!(make_room(&mut message, piece, 600, &mut reserve));
            message.extend(std::iter::repeat_n(7u8, piece));
            capacities.push(message.capacity());
        }
        assert_eq!(message.len(), 554);
        assert_eq!(
            capacities,
            [3, 103, 206, 206, 412, 600],
            "doubled, held to most"
        );
        assert!(
            make_room(&mut message, 100, 600, &mut reserve),
            "more than most"
        );
        assert_eq!(
            message.capacity(),
            654,
            "only what the bytes need past most"
        );
        assert_eq!(reserved, message.capacity());
        let before = message.capacity();
        assert!(!make_room(&mut message, 1_000, 4_000, |_| false));
        assert_eq!(message.capacity(), before, "refused: nothing allocated");
    }
}
