//! Who is calling, as the transport tells it: the admin socket's peer credentials or the TLS
//! client's verified SVID. Every service and the write path take a [`Caller`]; nothing here
//! depends on the services.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use lanyard_core::SpiffeId;
use lanyard_core::policy::CallerInput;
use tonic::Request;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};

use crate::admin_socket::AdminConnectInfo;
use crate::config::AdminSocketConfig;

/// Who is calling, as far as the transport can tell.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A process on this host, over the admin Unix socket.
    Local {
        /// The caller's uid, from the kernel.
        uid: Option<u32>,
        /// The named admin socket it came through (`[[admin_socket]]`); `None` for the main
        /// one.
        socket: Option<Arc<AdminSocketConfig>>,
    },
    /// A TLS client that presented an X.509-SVID the TLS layer verified against the bundle.
    Svid(PeerSvid),
    /// A TLS client without a certificate.
    Anonymous,
    /// The server itself, applying its configuration file at start (the federation
    /// relationships of `[federation.trust_domains]`).
    Configuration,
}

/// The verified SVID a TLS peer presented.
#[derive(Debug, Clone)]
pub struct PeerSvid {
    /// Its SPIFFE ID.
    pub id: SpiffeId,
    /// Its serial number in decimal, as SPIRE compares agent serials.
    pub serial: String,
    /// Its expiry.
    pub not_after: SystemTime,
}

impl PeerSvid {
    /// What a verified leaf certificate says of its holder; `None` if it is no SVID.
    pub fn of_leaf(leaf: &[u8]) -> Option<Self> {
        let (id, serial, not_after) = lanyard_core::x509::svid_identity(leaf).ok()?;
        Some(Self {
            id,
            serial,
            not_after,
        })
    }
}

/// What the API sees of a connection on the TLS listener, taken once when it is accepted:
/// the client's address (the PROXY header's, with `proxy_protocol`) and the SVID it
/// presented, if any.
#[derive(Debug, Clone)]
pub struct TlsPeer {
    /// The client's address.
    pub remote_addr: Option<SocketAddr>,
    /// The verified SVID the client presented.
    pub svid: Option<PeerSvid>,
}

/// The client address of `request`: the TLS listener's view of it, or what tonic knows for
/// other transports.
pub fn remote_ip<T>(request: &Request<T>) -> Option<IpAddr> {
    match request.extensions().get::<TlsPeer>() {
        Some(peer) => peer.remote_addr.map(|addr| addr.ip()),
        None => request.remote_addr().map(|addr| addr.ip()),
    }
}

impl Caller {
    /// Identifies the caller of `request`.
    pub fn of<T>(request: &Request<T>) -> Caller {
        if let Some(info) = request.extensions().get::<AdminConnectInfo>() {
            return Caller::Local {
                uid: info.uid,
                socket: info.socket.clone(),
            };
        }
        // The services served on a plain Unix listener (embedders, tests): a local admin.
        if let Some(info) = request.extensions().get::<UdsConnectInfo>() {
            return Caller::Local {
                uid: info.peer_cred.map(|c| c.uid()),
                socket: None,
            };
        }
        let svid = match request.extensions().get::<TlsPeer>() {
            Some(peer) => peer.svid.clone(),
            // A TLS stream served without the server's listener (an embedder's): the
            // verifier checked the chain; read what it verified.
            None => request
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.peer_certs())
                .and_then(|certs| certs.first().and_then(|leaf| PeerSvid::of_leaf(leaf))),
        };
        svid.map_or(Caller::Anonymous, Caller::Svid)
    }

    /// A short description for audit logs.
    pub fn describe(&self) -> String {
        match self {
            Caller::Local { uid, socket } => {
                let mut described = match uid {
                    Some(uid) => format!("local uid {uid}"),
                    None => "local".to_owned(),
                };
                if let Some(socket) = socket {
                    described.push_str(&format!(" via admin socket {}", socket.name));
                }
                described
            }
            Caller::Svid(svid) => svid.id.to_string(),
            Caller::Anonymous => "anonymous".to_owned(),
            Caller::Configuration => "server configuration".to_owned(),
        }
    }
}

/// What the policy sees of `caller`.
pub fn caller_input(caller: &Caller) -> CallerInput {
    match caller {
        Caller::Local { socket, .. } => CallerInput {
            id: None,
            local: true,
            socket: socket.as_ref().map(|s| s.name.clone()),
        },
        Caller::Svid(svid) => CallerInput {
            id: Some(svid.id.to_string()),
            local: false,
            socket: None,
        },
        Caller::Anonymous => CallerInput::default(),
        // The operator's own file, read on this host.
        Caller::Configuration => CallerInput {
            id: None,
            local: true,
            socket: None,
        },
    }
}
