//! The TLS listener's limits against hostile peers: handshake and idle timeouts, and the cap
//! on connections without a client certificate.

use std::sync::Arc;
use std::time::Duration;

use lanyard_core::tls::{InsecureBootstrapVerifier, client_config};
use lanyard_proto::spire::api::server::bundle::v1::GetBundleRequest;
use lanyard_proto::spire::api::server::bundle::v1::bundle_client::BundleClient;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::support::{TestServer, attest_join_token, trust_domain, try_tls_channel};

/// Longer than any limit a test configures, and far shorter than the defaults those limits
/// replace, so a test fails rather than hangs when a limit is not enforced.
const PATIENCE: Duration = Duration::from_secs(5);

/// Whether the server closes `stream` within `within`: reads (discarding what the server
/// sends) until end of stream or an error.
async fn closed_within(stream: &mut (impl AsyncRead + Unpin), within: Duration) -> bool {
    let drain = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, drain).await.is_ok()
}

fn bootstrap_client_config() -> rustls::ClientConfig {
    let verifier = InsecureBootstrapVerifier::new(trust_domain().server_id());
    client_config(Arc::new(verifier), None).unwrap()
}

async fn get_bundle_over_admin_socket(server: &TestServer) {
    BundleClient::new(server.admin().await)
        .get_bundle(GetBundleRequest::default())
        .await
        .unwrap();
}

/// Attests a new agent over a fresh anonymous connection, retrying while the server is still
/// releasing the slots of connections a test just closed.
async fn attest_when_a_slot_is_free(server: &TestServer) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let token = server.join_token(600).await;
    loop {
        let attempt = match try_tls_channel(server.addr(), bootstrap_client_config()).await {
            Ok(channel) => attest_join_token(channel, &token)
                .await
                .map_err(|e| e.to_string()),
            Err(error) => Err(error.to_string()),
        };
        match attempt {
            Ok(_) => return,
            Err(error) if tokio::time::Instant::now() > deadline => {
                panic!("no anonymous connection got through: {error}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test]
async fn a_peer_that_connects_and_sends_nothing_is_closed_after_the_handshake_timeout() {
    let server = TestServer::start_with(|config| {
        config.limits.handshake_timeout = Duration::from_millis(300);
    })
    .await;
    let mut silent = TcpStream::connect(server.addr()).await.unwrap();
    assert!(
        closed_within(&mut silent, PATIENCE).await,
        "a silent peer kept its connection past the handshake timeout"
    );
    // A peer that starts a handshake and stalls fares no better.
    let mut stalled = TcpStream::connect(server.addr()).await.unwrap();
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .unwrap();
    assert!(closed_within(&mut stalled, PATIENCE).await);
}

#[tokio::test]
async fn connections_beyond_the_unauthenticated_cap_are_closed_at_once() {
    const CAP: usize = 4;
    const FLOOD: usize = 12;
    let server = TestServer::start_with(|config| {
        config.limits.max_unauthenticated_connections = CAP;
        config.limits.handshake_timeout = Duration::from_secs(60);
    })
    .await;
    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        flood.push(TcpStream::connect(server.addr()).await.unwrap());
    }
    let (closed, flood) = count_closed(flood).await;
    assert_eq!(
        closed,
        FLOOD - CAP,
        "every connection beyond the cap is closed at once, those within it wait for their handshake"
    );

    // The admin socket answers while the cap is held.
    get_bundle_over_admin_socket(&server).await;

    // Once the flood goes away, anonymous clients get through again.
    drop(flood);
    attest_when_a_slot_is_free(&server).await;
}

#[tokio::test]
async fn one_address_cannot_take_every_anonymous_slot() {
    const PER_IP: usize = 3;
    const FLOOD: usize = 8;
    let server = TestServer::start_with(|config| {
        config.limits.max_unauthenticated_connections_per_ip = PER_IP;
        config.limits.handshake_timeout = Duration::from_secs(60);
    })
    .await;
    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        flood.push(TcpStream::connect(server.addr()).await.unwrap());
    }
    let (closed, flood) = count_closed(flood).await;
    assert_eq!(
        closed,
        FLOOD - PER_IP,
        "beyond its share, an address is closed at once"
    );

    // Another address still gets a slot while the first holds its share.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let other = socket.connect(server.addr()).await.unwrap();
    let (closed, _other) = count_closed(vec![other]).await;
    assert_eq!(closed, 0, "another address is not refused");

    drop(flood);
    attest_when_a_slot_is_free(&server).await;
}

/// How many of `streams` the server closes within [`PATIENCE`], watching all at once; the
/// streams come back, so those still open stay open.
async fn count_closed(streams: Vec<TcpStream>) -> (usize, Vec<TcpStream>) {
    let mut watchers = tokio::task::JoinSet::new();
    for mut stream in streams {
        watchers.spawn(async move {
            let closed = closed_within(&mut stream, PATIENCE).await;
            (closed, stream)
        });
    }
    let mut closed = 0;
    let mut streams = Vec::new();
    while let Some(result) = watchers.join_next().await {
        let (was_closed, stream) = result.unwrap();
        closed += usize::from(was_closed);
        streams.push(stream);
    }
    (closed, streams)
}

#[tokio::test]
async fn a_connection_with_a_client_certificate_does_not_hold_an_anonymous_slot() {
    let server = TestServer::start_with(|config| {
        config.limits.max_unauthenticated_connections = 1;
    })
    .await;
    let agent = server.attest_new_agent().await;
    // The agent's connection stays open, authenticated. Its handshake needs the slot, which
    // the attestation's connection holds until the server sees it close.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let agent_channel = loop {
        match server.try_tls(Some((&agent.chain, &agent.key))).await {
            Ok(channel) => break channel,
            Err(error) if tokio::time::Instant::now() > deadline => panic!("{error}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    BundleClient::new(agent_channel.clone())
        .get_bundle(GetBundleRequest::default())
        .await
        .unwrap();
    // The one anonymous slot is still free for the next node's attestation.
    attest_when_a_slot_is_free(&server).await;
    BundleClient::new(agent_channel)
        .get_bundle(GetBundleRequest::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn an_idle_tls_connection_without_streams_is_closed_after_the_idle_timeout() {
    let server = TestServer::start_with(|config| {
        config.limits.connection_idle_timeout = Duration::from_millis(500);
    })
    .await;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(bootstrap_client_config()));
    let tcp = TcpStream::connect(server.addr()).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("lanyard-server").unwrap(), tcp)
        .await
        .unwrap();
    // An HTTP/2 client preface and an empty SETTINGS frame: a connection, and no stream.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    assert!(
        closed_within(&mut tls, PATIENCE).await,
        "an idle connection stayed open past the idle timeout"
    );
}
