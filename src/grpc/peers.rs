//! What each peer holds, under a cap per peer: its open connections
//! (`connections_per_peer_max`), its health watches (`health_watches_per_peer_max`), or
//! the bytes of its calls being received (`receiving_bytes_per_peer_max`,
//! `grpc::receiving`).
//!
//! A peer is an IPv4 address or an IPv6 /64, what one host or one network is usually
//! given. But whoever holds an IPv6 /48 (a site's usual allocation, a few euros a month
//! from some hosts) holds 65,536 /64s: so every /64 of one /48 together holds at most
//! `peer_shares_per_ipv6_48_max` peers' caps (8 by default; 0: no cap per /48), and one
//! such holder gets a few peers' worth, not 65,536. The price: the /48's other /64s
//! share that.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

/// The caps one peer's holders share: `per_peer_max` units for one peer (0: no caps at
/// all), and, for IPv6, `per_peer_max` × `shares_per_ipv6_48` for every /64 of one /48
/// together (0: no cap per /48).
#[derive(Clone, Copy, Debug)]
pub struct PeerCaps {
    pub per_peer_max: usize,
    pub shares_per_ipv6_48: usize,
}

impl PeerCaps {
    /// No cap per peer.
    pub const NONE: PeerCaps = PeerCaps {
        per_peer_max: 0,
        shares_per_ipv6_48: 0,
    };

    /// The peers counted under these caps; `None` when there is no cap per peer.
    pub fn peers(self) -> Option<Arc<Peers>> {
        (self.per_peer_max > 0).then(|| Arc::new(Peers::new(self)))
    }
}

/// Which cap refused a holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    /// Its peer's (`per_peer_max`).
    Peer,
    /// Its IPv6 /48's (`per_peer_max` × `shares_per_ipv6_48`).
    Ipv6Prefix48,
}

/// What the holders of each peer, and of each IPv6 /48, hold.
pub struct Peers {
    max: usize,
    /// What every /64 of one IPv6 /48 may hold together, if capped.
    prefix_max: Option<usize>,
    held: Mutex<HashMap<Holder, usize, foldhash::fast::RandomState>>,
}

/// What a count is kept for: a peer, or the IPv6 /48 (its first 48 bits) of IPv6 peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Holder {
    Peer(IpAddr),
    Ipv6Prefix48(u64),
}

/// What one holder (a connection, a call) holds under its peer's caps, given back when
/// it is dropped.
pub struct PeerPlace {
    peers: Arc<Peers>,
    peer: IpAddr,
    units: usize,
}

impl Peers {
    pub fn new(caps: PeerCaps) -> Self {
        assert!(caps.per_peer_max >= 1, "0 means no cap: no Peers then");
        let prefix_max = (caps.shares_per_ipv6_48 > 0)
            .then(|| caps.per_peer_max.saturating_mul(caps.shares_per_ipv6_48));
        Self {
            max: caps.per_peer_max,
            prefix_max,
            held: Mutex::default(),
        }
    }

    /// A place for a connection (or a watch) from `address`; refused when its peer, or
    /// its IPv6 /48, holds its cap.
    pub fn enter(peers: &Arc<Peers>, address: IpAddr) -> Result<PeerPlace, Cap> {
        Self::take(peers, address, 1)
    }

    /// `units` for a holder from `address`; refused (nothing taken) when its peer, or its
    /// IPv6 /48, would pass its cap.
    pub fn take(peers: &Arc<Peers>, address: IpAddr, units: usize) -> Result<PeerPlace, Cap> {
        let mut place = Self::place(peers, address);
        if units > 0 {
            place.grow(units)?;
        }
        Ok(place)
    }

    /// A holder from `address` holding nothing yet.
    pub fn place(peers: &Arc<Peers>, address: IpAddr) -> PeerPlace {
        PeerPlace {
            peers: Arc::clone(peers),
            peer: peer_of(address),
            units: 0,
        }
    }

    /// The counts a holder from `peer` is under, each with its cap.
    fn caps_of(&self, peer: IpAddr) -> impl Iterator<Item = (Holder, usize, Cap)> {
        let prefix = match (peer, self.prefix_max) {
            (IpAddr::V6(v6), Some(max)) => {
                let prefix = Holder::Ipv6Prefix48((v6.to_bits() >> 80) as u64);
                Some((prefix, max, Cap::Ipv6Prefix48))
            }
            _ => None,
        };
        std::iter::once((Holder::Peer(peer), self.max, Cap::Peer)).chain(prefix)
    }

    /// Peers holding something.
    #[cfg(test)]
    fn peers(&self) -> usize {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.keys().filter(|h| matches!(h, Holder::Peer(_))).count()
    }

    /// Counts kept (peers and IPv6 /48s).
    #[cfg(test)]
    fn counts(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl PeerPlace {
    /// `units` more for this holder; refused (nothing taken) when its peer, or its IPv6
    /// /48, would pass its cap. Answers what its peer holds now, with them.
    pub fn grow(&mut self, units: usize) -> Result<usize, Cap> {
        self.add(units, true)
    }

    /// `units` more (at least 1), past the caps if need be: the places asked next are
    /// refused until they are given back. Answers what its peer holds now, as `grow`.
    pub fn grow_past(&mut self, units: usize) -> usize {
        let added = self.add(units, false);
        debug_assert!(added.is_ok(), "only a capped add is refused");
        added.unwrap_or(usize::MAX)
    }

    /// `units` more, checked against the caps first when `capped` (under one lock).
    /// Answers what its peer holds now, in one peer's cap: the larger of its own count
    /// and its IPv6 /48's scaled to one peer's cap (the /48 holding a 64th of its cap is
    /// as light as a peer holding a 64th of its own).
    fn add(&mut self, units: usize, capped: bool) -> Result<usize, Cap> {
        debug_assert!(units > 0, "nothing to add is not asked for");
        let peers = &self.peers;
        let mut held = peers.held.lock().unwrap_or_else(|p| p.into_inner());
        if capped {
            for (holder, max, cap) in peers.caps_of(self.peer) {
                let now = held.get(&holder).copied().unwrap_or(0);
                if now.checked_add(units).is_none_or(|grown| grown > max) {
                    return Err(cap);
                }
            }
        }
        for (holder, _, _) in peers.caps_of(self.peer) {
            *held.entry(holder).or_insert(0) += units;
        }
        self.units += units;
        let scaled = peers.caps_of(self.peer).map(|(holder, max, _)| {
            let count = held.get(&holder).copied().unwrap_or(0) as u128;
            (count * peers.max as u128 / max as u128) as usize
        });
        Ok(scaled.max().unwrap_or(0))
    }

    /// Gives back `units` of what this holder holds (a grow that another budget refused).
    pub fn give(&mut self, units: usize) {
        assert!(
            units <= self.units,
            "a holder gives back at most what it holds"
        );
        if units == 0 {
            return;
        }
        let peers = &self.peers;
        let mut held = peers.held.lock().unwrap_or_else(|p| p.into_inner());
        for (holder, _, _) in peers.caps_of(self.peer) {
            let Some(count) = held.get_mut(&holder) else {
                debug_assert!(false, "a place's counts are kept while it holds units");
                continue;
            };
            debug_assert!(*count >= units, "a count holds what its holders hold");
            *count -= units;
            if *count == 0 {
                held.remove(&holder);
            }
        }
        self.units -= units;
    }
}

impl Drop for PeerPlace {
    fn drop(&mut self) {
        self.give(self.units);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(per_peer_max: usize, shares_per_ipv6_48: usize) -> Arc<Peers> {
        let caps = PeerCaps {
            per_peer_max,
            shares_per_ipv6_48,
        };
        caps.peers().expect("a cap per peer")
    }

    fn address(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_peer_is_an_ipv4_address_or_an_ipv6_slash_64() {
        let peer = |text: &str| peer_of(address(text));
        assert_eq!(peer("192.0.2.1"), address("192.0.2.1"));
        assert_eq!(peer("::ffff:192.0.2.1"), address("192.0.2.1"));
        assert_eq!(
            peer("2001:db8:1:2::1"),
            peer("2001:db8:1:2:ffff:ffff:ffff:ffff")
        );
        assert_eq!(peer("2001:db8:1:2::1"), address("2001:db8:1:2::"));
        assert_ne!(peer("2001:db8:1:2::1"), peer("2001:db8:1:3::1"));
    }

    #[test]
    fn a_peer_holds_at_most_max_places_and_gets_them_back_when_they_close() {
        let peers = peers(2, 0);
        let (a, b) = (address("192.0.2.1"), address("2001:db8::1"));
        let first = Peers::enter(&peers, a).expect("a place");
        let second = Peers::enter(&peers, a).expect("a place");
        assert_eq!(Peers::enter(&peers, a).err(), Some(Cap::Peer), "a third");
        let other = Peers::enter(&peers, b).expect("another peer's place");
        assert_eq!(peers.peers(), 2);
        drop(first);
        let again = Peers::enter(&peers, a).expect("the place given back");
        drop((second, again, other));
        assert_eq!(peers.counts(), 0, "peers with nothing open are forgotten");
    }

    #[test]
    fn a_peer_holds_at_most_max_units_in_all_its_holders() {
        let peers = peers(100, 0);
        let a = address("192.0.2.1");
        let mut first = Peers::take(&peers, a, 60).expect("60 of 100");
        assert!(Peers::take(&peers, a, 41).is_err(), "101 of 100");
        assert_eq!(peers.peers(), 1, "a refused take leaves nothing behind");
        assert!(first.grow(41).is_err(), "101 of 100");
        let second = Peers::take(&peers, a, 40).expect("100 of 100");
        assert!(first.grow(1).is_err(), "past max");
        drop(second);
        assert!(first.grow(40).is_ok(), "what the second held is back");
        assert!(Peers::take(&peers, a, usize::MAX).is_err(), "no overflow");
        drop(first);
        assert_eq!(peers.counts(), 0);
        assert!(Peers::take(&peers, a, 101).is_err());
        assert_eq!(peers.counts(), 0, "a refused first take leaves no entry");
    }

    #[test]
    fn the_slash_64s_of_one_ipv6_slash_48_hold_its_shares_together() {
        let peers = peers(2, 3); // one /48: 6 places in all
        let in_48 = |subnet: u16| address(&format!("2001:db8:7:{subnet:x}::1"));
        let mut held: Vec<PeerPlace> = Vec::new();
        for subnet in 0..3 {
            held.push(Peers::enter(&peers, in_48(subnet)).expect("a first place"));
            held.push(Peers::enter(&peers, in_48(subnet)).expect("a second place"));
            assert_eq!(Peers::enter(&peers, in_48(subnet)).err(), Some(Cap::Peer));
        }
        let fourth = Peers::enter(&peers, in_48(0xffff));
        assert_eq!(
            fourth.err(),
            Some(Cap::Ipv6Prefix48),
            "a fourth /64 of the /48"
        );
        let other_48 = Peers::enter(&peers, address("2001:db8:8::1")).expect("another /48");
        let ipv4 = Peers::enter(&peers, address("192.0.2.1")).expect("IPv4 has no /48");
        assert!(
            Peers::take(&peers, in_48(0xffff), 0).is_ok(),
            "nothing is room"
        );
        held.swap_remove(0);
        let place = Peers::enter(&peers, in_48(0xffff)).expect("a place of the /48 back");
        drop((held, place, other_48, ipv4));
        assert_eq!(peers.counts(), 0, "the /48s' counts are forgotten too");
    }

    #[test]
    fn without_shares_per_slash_48_each_slash_64_is_a_peer_of_its_own() {
        let peers = peers(1, 0);
        let held: Vec<PeerPlace> = (0..100u16)
            .map(|subnet| address(&format!("2001:db8:7:{subnet:x}::1")))
            .map(|a| Peers::enter(&peers, a).expect("a place per /64"))
            .collect();
        assert_eq!(peers.peers(), 100);
        drop(held);
        assert_eq!(peers.counts(), 0);
    }

    #[test]
    fn a_slash_48_cap_never_overflows() {
        let peers = peers(usize::MAX, usize::MAX);
        let a = address("2001:db8::1");
        let place = Peers::take(&peers, a, usize::MAX).expect("the whole cap");
        assert!(Peers::take(&peers, address("2001:db8:0:1::1"), 1).is_err());
        drop(place);
    }
}
