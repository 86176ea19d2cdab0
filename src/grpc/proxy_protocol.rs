//! The PROXY protocol header (HAProxy's, v1 text or v2 binary; parsed by the `ppp`
//! crate) that a load balancer listed in `[server] proxy_protocol_from` sends first on
//! each connection: it names the client the connection is for, so the per-peer caps
//! (`grpc::peers`) count clients, not the load balancer.
//!
//! Only listed addresses are read this way: anyone else's header is not believed (the
//! connection then does not start as HTTP/2 and is closed). A listed address's
//! connection must start with a valid header (as HAProxy's `accept-proxy` and Envoy's
//! listener filter require by default): one that does not is closed, so a balancer
//! that forgot to send headers is seen at once, rather than its clients sending their
//! own. Its own connections say so: v2 `LOCAL` (HAProxy's `check-send-proxy` health
//! checks), or a header that names no IP address (v1 `UNKNOWN`).

use std::io;
use std::net::SocketAddr;

use ppp::{v1, v2, PartialResult};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest header read: a v1 line is at most 107 bytes, a v2 header 16 bytes, its
/// addresses (36 for IPv6) and TLVs, which load balancers keep short (AWS's endpoint
/// id, HAProxy's TLS details: a few hundred bytes).
pub const HEADER_BYTES_MAX: usize = 4096;

/// What a header said.
#[derive(Debug, PartialEq, Eq)]
pub struct Proxied {
    /// The client the connection is for; `None` when the header names no IP address
    /// (v2 `LOCAL`, v1 `UNKNOWN`, a Unix socket's): the connection then counts for the
    /// balancer.
    pub client: Option<SocketAddr>,
    /// v2 `LOCAL`: the balancer's own connection (its health checks), not one it
    /// relays for a client.
    pub local: bool,
    /// Bytes read past the header: the start of the connection's own.
    pub rest: Vec<u8>,
}

/// Reads the header `stream` starts with: an error (`InvalidData`) when it does not
/// start with a valid one within `HEADER_BYTES_MAX` bytes; `UnexpectedEof` when it ends
/// first (a balancer's connect-only health check sends nothing).
pub async fn read_header(stream: &mut (impl AsyncRead + Unpin)) -> io::Result<Proxied> {
    let mut read = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let more = stream.read(&mut chunk).await?;
        if more == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        read.extend_from_slice(&chunk[..more]);
        let header = match starts_a_header(&read) {
            Some(false) => {
                return Err(invalid("the connection does not start with a PROXY header"))
            }
            Some(true) => parse(&read)?,
            None => None, // too short to tell
        };
        if let Some(header) = header {
            let rest = read.split_off(header.length);
            let (client, local) = (header.client, header.local);
            return Ok(Proxied {
                client,
                local,
                rest,
            });
        }
        debug_assert!(
            read.len() < HEADER_BYTES_MAX,
            "the parsers refuse longer ones"
        );
    }
}

/// A v2 header's bytes before its addresses: the signature, version and command,
/// family and protocol, length.
const V2_FIXED_BYTES: usize = 16;

/// How a v1 header starts.
const V1_SIGNATURE: &[u8] = b"PROXY ";

/// Whether `read` starts with a header's signature (v1 or v2); `None` while it is too
/// short to tell.
fn starts_a_header(read: &[u8]) -> Option<bool> {
    for signature in [V1_SIGNATURE, v2::PROTOCOL_PREFIX] {
        let compared = read.len().min(signature.len());
        if read[..compared] == signature[..compared] {
            return (read.len() >= signature.len()).then_some(true);
        }
    }
    Some(false)
}

/// The longest v1 line, its CRLF included.
const V1_LINE_BYTES_MAX: usize = 107;

/// A header read whole.
struct Header {
    length: usize,
    client: Option<SocketAddr>,
    local: bool,
}

/// The header `read` starts with (its signature read); `None` while it is incomplete.
fn parse(read: &[u8]) -> io::Result<Option<Header>> {
    match read.starts_with(V1_SIGNATURE) {
        true => parse_v1(read),
        false => parse_v2(read),
    }
}

/// A v1 line is parsed whole, once its CRLF has come (`ppp` takes a line cut short,
/// `PROXY TCP`, for a bad one, and a bad whole line for an incomplete one).
fn parse_v1(read: &[u8]) -> io::Result<Option<Header>> {
    let searched = &read[..read.len().min(V1_LINE_BYTES_MAX)];
    let Some(end) = searched.windows(2).position(|pair| pair == b"\r\n") else {
        return match read.len() < V1_LINE_BYTES_MAX {
            true => Ok(None),
            false => Err(invalid("a PROXY v1 line longer than 107 bytes")),
        };
    };
    let header =
        v1::Header::try_from(&read[..end + 2]).map_err(|_| invalid("a bad PROXY v1 line"))?;
    let client = match header.addresses {
        v1::Addresses::Tcp4(ip) => Some((ip.source_address, ip.source_port).into()),
        v1::Addresses::Tcp6(ip) => Some((ip.source_address, ip.source_port).into()),
        v1::Addresses::Unknown => None,
    };
    let length = header.header.len();
    Ok(Some(Header {
        length,
        client,
        local: false,
    }))
}

fn parse_v2(read: &[u8]) -> io::Result<Option<Header>> {
    // Its length is in its 15th and 16th bytes: refused at once if too long.
    if let Some(length) = read.get(14..16) {
        let declared = usize::from(u16::from_be_bytes([length[0], length[1]]));
        if V2_FIXED_BYTES + declared > HEADER_BYTES_MAX {
            return Err(invalid("a PROXY v2 header longer than HEADER_BYTES_MAX"));
        }
    }
    let header = v2::Header::try_from(read);
    if header.is_incomplete() {
        return Ok(None);
    }
    let header = header.map_err(|_| invalid("a bad PROXY v2 header"))?;
    let local = header.command == v2::Command::Local;
    let client = match header.addresses {
        _ if local => None,
        v2::Addresses::IPv4(ip) => Some((ip.source_address, ip.source_port).into()),
        v2::Addresses::IPv6(ip) => Some((ip.source_address, ip.source_port).into()),
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    };
    Ok(Some(Header {
        length: header.len(),
        client,
        local,
    }))
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn v2_header(client: &str) -> Vec<u8> {
        let client: SocketAddr = client.parse().unwrap();
        let server: SocketAddr = match client {
            SocketAddr::V4(_) => "10.0.0.1:443".parse().unwrap(),
            SocketAddr::V6(_) => "[2001:db8::1]:443".parse().unwrap(),
        };
        let command = v2::Version::Two | v2::Command::Proxy;
        v2::Builder::with_addresses(command, v2::Protocol::Stream, (client, server))
            .build()
            .unwrap()
    }

    async fn read(bytes: &[u8]) -> io::Result<Proxied> {
        read_header(&mut &bytes[..]).await
    }

    /// A reader that hands out one byte a read: a header split anywhere.
    struct Trickle<'a>(&'a [u8]);

    impl AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            if let Some((first, rest)) = self.0.split_first() {
                buf.put_slice(&[*first]);
                self.0 = rest;
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_v2_header_names_the_client_and_what_follows_is_kept() {
        for client in ["192.0.2.7:50000", "[2001:db8:7::9]:50001"] {
            let mut bytes = v2_header(client);
            bytes.extend_from_slice(PREFACE);
            let proxied = read(&bytes).await.unwrap();
            assert_eq!(proxied.client, Some(client.parse().unwrap()));
            assert_eq!(proxied.rest, PREFACE);
            let trickled = read_header(&mut Trickle(&bytes)).await.unwrap();
            assert_eq!(trickled.client, proxied.client, "read a byte at a time");
        }
    }

    #[tokio::test]
    async fn a_v1_header_names_the_client_and_unknown_names_none() {
        let mut bytes = b"PROXY TCP4 192.0.2.7 10.0.0.1 50000 443\r\n".to_vec();
        bytes.extend_from_slice(PREFACE);
        let proxied = read(&bytes).await.unwrap();
        assert_eq!(proxied.client, Some("192.0.2.7:50000".parse().unwrap()));
        assert_eq!(proxied.rest, PREFACE);
        let trickled = read_header(&mut Trickle(&bytes)).await.unwrap();
        assert_eq!(trickled.client, proxied.client, "read a byte at a time");
        assert!(trickled.rest.is_empty(), "nothing read past the line");
        let unknown = read(b"PROXY UNKNOWN\r\nPRI").await.unwrap();
        assert_eq!((unknown.client, unknown.local), (None, false));
        assert_eq!(unknown.rest, b"PRI");
    }

    #[tokio::test]
    async fn a_v2_local_header_is_the_load_balancers_own_connection() {
        let command = v2::Version::Two | v2::Command::Local;
        let local =
            v2::Builder::with_addresses(command, v2::Protocol::Stream, v2::Addresses::Unspecified)
                .build()
                .unwrap();
        let proxied = read(&local).await.unwrap();
        assert_eq!((proxied.client, proxied.local), (None, true));
        let mut unspecified = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        unspecified.extend([0x21, 0x00, 0, 0]); // PROXY, unspecified family, no addresses
        let proxied = read(&unspecified).await.unwrap();
        assert_eq!(
            (proxied.client, proxied.local),
            (None, false),
            "relayed, no address"
        );
    }

    #[tokio::test]
    async fn a_connection_without_a_header_is_refused() {
        for start in [
            PREFACE,
            &[0x16, 0x03, 0x01, 0x02, 0x00][..],
            b"PRI",
            b"\r\n\r\nX",
        ] {
            let error = read(start).await.unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{start:?}");
        }
        let trickled = read_header(&mut Trickle(PREFACE)).await.unwrap_err();
        assert_eq!(
            trickled.kind(),
            io::ErrorKind::InvalidData,
            "told at its third byte"
        );
    }

    #[tokio::test]
    async fn a_bad_header_is_refused_and_an_early_end_is_told_apart() {
        let refused = |result: io::Result<Proxied>| {
            result.is_err_and(|error| error.kind() == io::ErrorKind::InvalidData)
        };
        assert!(refused(read(b"PROXY TCP4 not-an-address\r\n").await));
        let ended = read(b"PROXY TCP4 192.0.2.7").await.unwrap_err();
        assert_eq!(ended.kind(), io::ErrorKind::UnexpectedEof, "ends first");
        assert_eq!(
            read(b"").await.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        let long_line = [&b"PROXY TCP4 "[..], &[b'1'; 200]].concat();
        assert!(refused(read(&long_line).await), "a v1 line over 107 bytes");
        let too_long = [&v2_header("192.0.2.7:1")[..12], &[0x21, 0x11, 0x10, 0x00]].concat();
        assert!(
            refused(read(&too_long).await),
            "a v2 header declaring 4,096 bytes more"
        );
    }
}
