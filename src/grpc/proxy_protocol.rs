//! The PROXY protocol header (HAProxy's, v1 text or v2 binary; parsed by the `ppp`
//! crate) that a load balancer listed in `[server] proxy_protocol_from` sends first on
//! each connection: it names the client the connection is for, so the per-peer caps
//! (`grpc::peers`) count clients, not the load balancer.
//!
//! Only listed addresses are read this way: anyone else's header is not believed (the
//! connection then does not start as HTTP/2 and is closed), and a listed address's
//! connection without a valid header is closed.

use std::io;
use std::net::SocketAddr;

use ppp::{v1, v2, HeaderResult, PartialResult};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest header read: a v1 line is at most 107 bytes, a v2 header 16 bytes, its
/// addresses (36 for IPv6) and TLVs, which load balancers keep short (AWS's endpoint
/// id, Envoy's few).
pub const HEADER_BYTES_MAX: usize = 2048;

/// What a header said.
#[derive(Debug, PartialEq, Eq)]
pub struct Proxied {
    /// The client the connection is for; `None` for the load balancer's own
    /// connections (v2 `LOCAL`, v1 `UNKNOWN`: its health checks) and for addresses
    /// that are not IP (a Unix socket).
    pub client: Option<SocketAddr>,
    /// Bytes read past the header: the start of the connection's own.
    pub rest: Vec<u8>,
}

/// Reads the header `stream` starts with; an error when it does not start with a valid
/// one within `HEADER_BYTES_MAX` bytes, or ends first.
pub async fn read_header(stream: &mut (impl AsyncRead + Unpin)) -> io::Result<Proxied> {
    let mut read = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let more = stream.read(&mut chunk).await?;
        if more == 0 {
            return Err(invalid("the connection ended before its PROXY header"));
        }
        read.extend_from_slice(&chunk[..more]);
        match parse(&read)? {
            Some((length, client)) => {
                let rest = read.split_off(length);
                return Ok(Proxied { client, rest });
            }
            None if read.len() >= HEADER_BYTES_MAX => {
                return Err(invalid("no PROXY header within its first 2,048 bytes"));
            }
            None => {}
        }
    }
}

/// The longest v1 line, its CRLF included.
const V1_LINE_BYTES_MAX: usize = 107;

/// The header's length and client, `None` while it is incomplete.
fn parse(read: &[u8]) -> io::Result<Option<(usize, Option<SocketAddr>)>> {
    // A v1 line is parsed whole: `ppp` takes a line cut short (`PROXY TCP`) for a bad one.
    let v1 = read.starts_with(b"PROXY") || b"PROXY".starts_with(read);
    if v1
        && !read[..read.len().min(V1_LINE_BYTES_MAX)]
            .windows(2)
            .any(|w| w == b"\r\n")
    {
        return match read.len() < V1_LINE_BYTES_MAX {
            true => Ok(None),
            false => Err(invalid("a PROXY v1 line longer than 107 bytes")),
        };
    }
    let header = HeaderResult::parse(read);
    if header.is_incomplete() {
        return Ok(None);
    }
    match header {
        HeaderResult::V1(Ok(header)) => Ok(Some((header.header.len(), v1_client(&header)))),
        HeaderResult::V2(Ok(header)) => Ok(Some((header.len(), v2_client(&header)))),
        _ => Err(invalid("the connection does not start with a PROXY header")),
    }
}

fn v1_client(header: &v1::Header<'_>) -> Option<SocketAddr> {
    match header.addresses {
        v1::Addresses::Tcp4(ip) => Some((ip.source_address, ip.source_port).into()),
        v1::Addresses::Tcp6(ip) => Some((ip.source_address, ip.source_port).into()),
        v1::Addresses::Unknown => None,
    }
}

fn v2_client(header: &v2::Header<'_>) -> Option<SocketAddr> {
    if header.command == v2::Command::Local {
        return None;
    }
    match header.addresses {
        v2::Addresses::IPv4(ip) => Some((ip.source_address, ip.source_port).into()),
        v2::Addresses::IPv6(ip) => Some((ip.source_address, ip.source_port).into()),
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    }
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
        assert_eq!((unknown.client, unknown.rest), (None, b"PRI".to_vec()));
    }

    #[tokio::test]
    async fn a_v2_local_header_is_the_load_balancers_own_connection() {
        let command = v2::Version::Two | v2::Command::Local;
        let local =
            v2::Builder::with_addresses(command, v2::Protocol::Stream, v2::Addresses::Unspecified)
                .build()
                .unwrap();
        assert_eq!(read(&local).await.unwrap().client, None);
    }

    #[tokio::test]
    async fn anything_else_is_refused() {
        assert!(read(PREFACE).await.is_err(), "HTTP/2 without a header");
        assert!(read(b"PROXY TCP4 not-an-address\r\n").await.is_err());
        assert!(read(b"PROXY TCP4 192.0.2.7").await.is_err(), "ends first");
        assert!(read(&[b'\r'; 4096]).await.is_err(), "never complete");
        let long_line = [&b"PROXY TCP4 "[..], &[b'1'; 200]].concat();
        assert!(read(&long_line).await.is_err(), "a v1 line over 107 bytes");
        let endless = [&v2_header("192.0.2.7:1")[..12], &[0x21, 0x11, 0xff, 0xff]].concat();
        let mut long = endless.clone();
        long.resize(HEADER_BYTES_MAX + 600, 0);
        assert!(read(&long).await.is_err(), "a header over HEADER_BYTES_MAX");
    }
}
