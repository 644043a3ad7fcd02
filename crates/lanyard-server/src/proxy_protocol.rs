//! The PROXY protocol version 2 header (HAProxy's `proxy-protocol.txt`, section 2.2), which a
//! load balancer sends before the client's first byte so that the server learns the client's
//! address. Only the binary version 2 is accepted, as the spec asks of a receiver that is told
//! to expect it; with `proxy_protocol = true` every connection must start with one.
//!
//! Layout: a 12-byte signature, a version/command byte (`0x20` LOCAL, `0x21` PROXY), an
//! address family/transport byte, a big-endian length of what follows, then the addresses
//! (IPv4: 12 bytes, IPv6: 36 bytes; source, destination, source port, destination port) and
//! optional TLVs, which are skipped. LOCAL (the balancer's own health checks) and the
//! unspecified family keep the connection's own address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The signature every version 2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The fixed part: signature, version/command, family/transport, length.
pub const FIXED_LEN: usize = 16;
/// The most bytes accepted after the fixed part: addresses plus the TLVs load balancers
/// add (AWS's VPC endpoint ID, Azure's link ID, TLS details) fit many times over.
pub const MAX_PAYLOAD_LEN: usize = 1024;

const IPV4_ADDRESSES_LEN: usize = 12;
const IPV6_ADDRESSES_LEN: usize = 36;

/// Why a PROXY header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyHeaderError {
    /// The connection does not start with the version 2 signature.
    #[error("the connection does not start with a PROXY protocol v2 header")]
    Signature,
    /// A version other than 2.
    #[error("PROXY protocol version {0} is not supported; only version 2 is")]
    Version(u8),
    /// A command other than LOCAL or PROXY.
    #[error("unknown PROXY protocol command {0:#x}")]
    Command(u8),
    /// A family or transport the server cannot use (UNIX sockets, datagrams, unknown).
    #[error("unsupported PROXY protocol address family/transport {0:#04x}")]
    Family(u8),
    /// A header longer than [`MAX_PAYLOAD_LEN`] allows.
    #[error("PROXY protocol header of {0} bytes after the fixed part is too long")]
    TooLong(usize),
    /// Fewer bytes than the header's length or its address family need.
    #[error("truncated PROXY protocol header")]
    Truncated,
}

/// What a header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxiedAddress {
    /// The connection's own address stands (LOCAL, or PROXY with no address family).
    Unchanged,
    /// The client's address and port, and the address it connected to.
    Proxied {
        /// The client.
        source: SocketAddr,
        /// Where the client connected (the balancer's front end).
        destination: SocketAddr,
    },
}

/// The total length of the header whose fixed part is `fixed` (which must be
/// [`FIXED_LEN`] bytes), after checking the signature, version and length bound.
pub fn header_len(fixed: &[u8]) -> Result<usize, ProxyHeaderError> {
    let (Some(signature), Some(&version_command), Some(length)) =
        (fixed.get(..12), fixed.get(12), fixed.get(14..16))
    else {
        return Err(ProxyHeaderError::Truncated);
    };
    if signature != SIGNATURE {
        return Err(ProxyHeaderError::Signature);
    }
    if version_command >> 4 != 2 {
        return Err(ProxyHeaderError::Version(version_command >> 4));
    }
    let payload = usize::from(u16::from_be_bytes([length[0], length[1]]));
    if payload > MAX_PAYLOAD_LEN {
        return Err(ProxyHeaderError::TooLong(payload));
    }
    Ok(FIXED_LEN + payload)
}

/// Parses one complete header, exactly `header_len` bytes long.
pub fn parse(header: &[u8]) -> Result<ProxiedAddress, ProxyHeaderError> {
    let total = header_len(header.get(..FIXED_LEN).unwrap_or(header))?;
    if header.len() < total {
        return Err(ProxyHeaderError::Truncated);
    }
    let (Some(&version_command), Some(&family), Some(payload)) =
        (header.get(12), header.get(13), header.get(FIXED_LEN..total))
    else {
        return Err(ProxyHeaderError::Truncated);
    };
    match version_command & 0x0f {
        0x0 => return Ok(ProxiedAddress::Unchanged),
        0x1 => {}
        command => return Err(ProxyHeaderError::Command(command)),
    }
    match family {
        // UNSPEC: the sender could not tell; keep the connection's address.
        0x00 => Ok(ProxiedAddress::Unchanged),
        // TCP over IPv4.
        0x11 => {
            let addresses = payload
                .get(..IPV4_ADDRESSES_LEN)
                .ok_or(ProxyHeaderError::Truncated)?;
            let ip = |at: usize| -> Result<IpAddr, ProxyHeaderError> {
                let octets: [u8; 4] = addresses
                    .get(at..at + 4)
                    .and_then(|b| b.try_into().ok())
                    .ok_or(ProxyHeaderError::Truncated)?;
                Ok(IpAddr::V4(Ipv4Addr::from(octets)))
            };
            let (source_port, destination_port) = ports(addresses, 8)?;
            Ok(ProxiedAddress::Proxied {
                source: SocketAddr::new(ip(0)?, source_port),
                destination: SocketAddr::new(ip(4)?, destination_port),
            })
        }
        // TCP over IPv6.
        0x21 => {
            let addresses = payload
                .get(..IPV6_ADDRESSES_LEN)
                .ok_or(ProxyHeaderError::Truncated)?;
            let ip = |at: usize| -> Result<IpAddr, ProxyHeaderError> {
                let octets: [u8; 16] = addresses
                    .get(at..at + 16)
                    .and_then(|b| b.try_into().ok())
                    .ok_or(ProxyHeaderError::Truncated)?;
                Ok(IpAddr::V6(Ipv6Addr::from(octets)))
            };
            let (source_port, destination_port) = ports(addresses, 32)?;
            Ok(ProxiedAddress::Proxied {
                source: SocketAddr::new(ip(0)?, source_port),
                destination: SocketAddr::new(ip(16)?, destination_port),
            })
        }
        other => Err(ProxyHeaderError::Family(other)),
    }
}

fn ports(addresses: &[u8], at: usize) -> Result<(u16, u16), ProxyHeaderError> {
    match addresses.get(at..at + 4) {
        Some(&[a, b, c, d]) => Ok((u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]))),
        _ => Err(ProxyHeaderError::Truncated),
    }
}

/// Encodes a PROXY command header for `source` → `destination` (both of one family), for
/// tests and tools that stand in for a load balancer.
pub fn encode(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut header = SIGNATURE.to_vec();
    header.push(0x21);
    let mut addresses = Vec::new();
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            header.push(0x11);
            addresses.extend_from_slice(&s.octets());
            addresses.extend_from_slice(&d.octets());
        }
        (s, d) => {
            header.push(0x21);
            addresses.extend_from_slice(&to_v6(s).octets());
            addresses.extend_from_slice(&to_v6(d).octets());
        }
    }
    addresses.extend_from_slice(&source.port().to_be_bytes());
    addresses.extend_from_slice(&destination.port().to_be_bytes());
    let length = u16::try_from(addresses.len()).unwrap_or(u16::MAX);
    header.extend_from_slice(&length.to_be_bytes());
    header.extend_from_slice(&addresses);
    header
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_whole(bytes: &[u8]) -> Result<ProxiedAddress, ProxyHeaderError> {
        let total = header_len(bytes.get(..FIXED_LEN).ok_or(ProxyHeaderError::Truncated)?)?;
        parse(bytes.get(..total).ok_or(ProxyHeaderError::Truncated)?)
    }

    #[test]
    fn valid_ipv4_and_ipv6_headers_give_the_client_address() {
        let v4_source: SocketAddr = "203.0.113.7:40000".parse().unwrap();
        let v4_destination: SocketAddr = "10.0.0.1:8081".parse().unwrap();
        let header = encode(v4_source, v4_destination);
        assert_eq!(header.len(), FIXED_LEN + 12);
        assert_eq!(
            parse_whole(&header),
            Ok(ProxiedAddress::Proxied {
                source: v4_source,
                destination: v4_destination
            })
        );

        let v6_source: SocketAddr = "[2001:db8::7]:40000".parse().unwrap();
        let v6_destination: SocketAddr = "[2001:db8::1]:8081".parse().unwrap();
        let header = encode(v6_source, v6_destination);
        assert_eq!(header.len(), FIXED_LEN + 36);
        assert_eq!(
            parse_whole(&header),
            Ok(ProxiedAddress::Proxied {
                source: v6_source,
                destination: v6_destination
            })
        );
    }

    #[test]
    fn tlvs_are_skipped_and_local_keeps_the_connection_address() {
        let source: SocketAddr = "198.51.100.1:1".parse().unwrap();
        let mut header = encode(source, "10.0.0.1:2".parse().unwrap());
        // A PP2_TYPE_AUTHORITY TLV ("lb") after the addresses.
        header.extend_from_slice(&[0x02, 0x00, 0x02, b'l', b'b']);
        header[14..16].copy_from_slice(&(12u16 + 5).to_be_bytes());
        assert!(matches!(
            parse_whole(&header),
            Ok(ProxiedAddress::Proxied { source: s, .. }) if s == source
        ));

        let mut local = SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(parse_whole(&local), Ok(ProxiedAddress::Unchanged));
        let mut unspecified = SIGNATURE.to_vec();
        unspecified.extend_from_slice(&[0x21, 0x00, 0x00, 0x00]);
        assert_eq!(parse_whole(&unspecified), Ok(ProxiedAddress::Unchanged));
    }

    #[test]
    fn malformed_truncated_and_oversized_headers_are_refused() {
        let good = encode(
            "192.0.2.1:1".parse().unwrap(),
            "192.0.2.2:2".parse().unwrap(),
        );

        let mut bad_signature = good.clone();
        bad_signature[0] = b'X';
        assert_eq!(
            parse_whole(&bad_signature),
            Err(ProxyHeaderError::Signature)
        );
        // A TLS ClientHello where a header should be.
        assert_eq!(
            header_len(&[
                0x16, 0x03, 0x01, 0x02, 0x00, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
            ]),
            Err(ProxyHeaderError::Signature)
        );
        // Version 1's text form is not accepted either.
        assert_eq!(
            parse_whole(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n"),
            Err(ProxyHeaderError::Signature)
        );

        let mut version_one = good.clone();
        version_one[12] = 0x11;
        assert_eq!(parse_whole(&version_one), Err(ProxyHeaderError::Version(1)));
        let mut bad_command = good.clone();
        bad_command[12] = 0x2f;
        assert_eq!(
            parse_whole(&bad_command),
            Err(ProxyHeaderError::Command(0xf))
        );
        for family in [0x12, 0x22, 0x31, 0x32, 0x41, 0x13] {
            let mut bad_family = good.clone();
            bad_family[13] = family;
            assert_eq!(
                parse_whole(&bad_family),
                Err(ProxyHeaderError::Family(family)),
                "{family:#x}"
            );
        }

        // Every strict prefix is truncated.
        for cut in 0..good.len() {
            assert_eq!(
                parse_whole(&good[..cut]),
                Err(ProxyHeaderError::Truncated),
                "{cut}"
            );
        }
        // A length too short for the family's addresses.
        let mut short = good.clone();
        short[14..16].copy_from_slice(&4u16.to_be_bytes());
        assert_eq!(parse_whole(&short), Err(ProxyHeaderError::Truncated));
        // IPv6 addresses announced, IPv4 addresses sent.
        let mut wrong_family = good.clone();
        wrong_family[13] = 0x21;
        assert_eq!(parse_whole(&wrong_family), Err(ProxyHeaderError::Truncated));

        let mut oversized = good;
        oversized[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(
            parse_whole(&oversized),
            Err(ProxyHeaderError::TooLong(usize::from(u16::MAX)))
        );
        let mut just_over = SIGNATURE.to_vec();
        just_over.extend_from_slice(&[0x21, 0x11]);
        just_over.extend_from_slice(&u16::try_from(MAX_PAYLOAD_LEN + 1).unwrap().to_be_bytes());
        assert_eq!(
            header_len(&just_over),
            Err(ProxyHeaderError::TooLong(MAX_PAYLOAD_LEN + 1))
        );
    }
}
