//! The server API's TCP listener: accepting connections, the TLS handshake, and the limits
//! that keep anonymous peers from using up the process's file descriptors.
//!
//! With `proxy_protocol = true`, every connection must open with a PROXY protocol v2 header
//! ([`crate::proxy_protocol`]), read byte-exactly before the TLS handshake; its source address
//! is the client address the API (and its rate limits) see. A connection without a valid
//! header is closed.
//!
//! A peer has `handshake_timeout` to send its PROXY header and finish the TLS handshake. Until it has presented a client
//! certificate it holds one of `max_unauthenticated_connections` slots, handshake included;
//! a connection that finds no free slot is closed at once. One client address holds at most
//! `max_unauthenticated_connections_per_ip` of them (the PROXY header's address when there is
//! one), so that one host cannot take every slot from agents that are bootstrapping. A
//! connection that carries no bytes
//! either way for `connection_idle_timeout` is closed: the server API has no long quiet
//! streams (attestation has its own 30 s limit; an agent's change stream repeats itself every
//! 50 s), and gRPC clients reconnect on their next call.
//! `accept` errors (out of descriptors) back off exponentially up to a second, logged once a
//! second, and the server raises its soft `RLIMIT_NOFILE` to the hard limit at start.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::caller::{PeerSvid, TlsPeer};

use crate::config::ServerConfig;
use crate::proxy_protocol::{self, ProxiedAddress};

/// The first pause after a failed `accept`; each further failure doubles it.
const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(50);
/// The longest pause after a failed `accept`.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How often a repeated problem (failed `accept`, connections over the cap) is logged.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// What the listener enforces, from `[limits]`.
#[derive(Debug, Clone)]
pub struct ListenerLimits {
    /// Time to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time without a byte either way before a connection is closed.
    pub idle_timeout: Duration,
    /// Connections without a client certificate, handshakes included, at once.
    pub max_unauthenticated: usize,
    /// The same, from one client address; 0 for no limit per address.
    pub max_unauthenticated_per_ip: usize,
    /// Whether connections open with a PROXY protocol v2 header.
    pub proxy_protocol: bool,
}

impl From<&ServerConfig> for ListenerLimits {
    fn from(config: &ServerConfig) -> Self {
        Self {
            handshake_timeout: config.limits.handshake_timeout,
            idle_timeout: config.limits.connection_idle_timeout,
            max_unauthenticated: config.limits.max_unauthenticated_connections,
            max_unauthenticated_per_ip: config.limits.max_unauthenticated_connections_per_ip,
            proxy_protocol: config.proxy_protocol,
        }
    }
}

/// Serves `router` over TLS on `listener` until `stopped`.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: crate::server::ApiRouter,
    limits: ListenerLimits,
    mut stopped: watch::Receiver<bool>,
) {
    raise_open_file_limit();
    let (tx, rx) = mpsc::channel(64);
    let accept_loop = tokio::spawn(accept_loop(
        listener,
        tokio_rustls::TlsAcceptor::from(tls),
        limits,
        tx,
        stopped.clone(),
    ));
    let result = router
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), async move {
            let _ = stopped.wait_for(|s| *s).await;
        })
        .await;
    accept_loop.abort();
    if let Err(error) = result {
        tracing::error!(%error, "TLS server failed");
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    limits: ListenerLimits,
    connections: mpsc::Sender<io::Result<ServerConnection>>,
    mut stopped: watch::Receiver<bool>,
) {
    let unauthenticated = Arc::new(Semaphore::new(limits.max_unauthenticated));
    let per_ip = PerIpSlots::new(limits.max_unauthenticated_per_ip);
    let mut backoff = Backoff::new(ACCEPT_BACKOFF_START, ACCEPT_BACKOFF_MAX);
    let mut accept_errors = Throttle::new(LOG_INTERVAL);
    let mut over_cap = Throttle::new(LOG_INTERVAL);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.wait_for(|s| *s) => return,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => {
                backoff.reset();
                pair
            }
            // The peer gave up before we accepted it; nothing is wrong with the listener.
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::Interrupted
                ) =>
            {
                tracing::debug!(%error, "accept failed");
                continue;
            }
            Err(error) => {
                let delay = backoff.next_delay();
                if let Some(failures) = accept_errors.hit(Instant::now()) {
                    tracing::warn!(
                        %error,
                        failures,
                        retry_in = ?delay,
                        "accepting connections failed (out of file descriptors?)"
                    );
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = stopped.wait_for(|s| *s) => return,
                }
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&unauthenticated).try_acquire_owned() else {
            drop(tcp);
            if let Some(refused) = over_cap.hit(Instant::now()) {
                tracing::warn!(
                    refused,
                    limit = limits.max_unauthenticated,
                    "closing connections at once: too many without a client certificate (limits.max_unauthenticated_connections)"
                );
            }
            continue;
        };
        // gRPC writes a response as several small frames; with Nagle's algorithm the
        // later ones wait for the client's delayed ACK, adding ~40 ms to every unary call.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, %error, "cannot disable Nagle's algorithm");
        }
        let acceptor = acceptor.clone();
        let connections = connections.clone();
        let limits = limits.clone();
        let per_ip = per_ip.clone();
        // Handshakes run on their own task so a slow client never blocks the others.
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(
                limits.handshake_timeout,
                handshake(&acceptor, tcp, peer, limits.proxy_protocol, &per_ip),
            );
            match handshake.await {
                Ok(Ok((stream, slot))) => {
                    // A verified client certificate: the peer is no longer anonymous.
                    let anonymous = match stream.get_ref().1.peer_certificates() {
                        Some(certs) if !certs.is_empty() => None,
                        _ => Some((permit, slot)),
                    };
                    let connection = ServerConnection::new(stream, anonymous, limits.idle_timeout);
                    let _ = connections.send(Ok(connection)).await;
                }
                Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    mut tcp: TcpStream,
    mut peer: SocketAddr,
    proxy_protocol: bool,
    per_ip: &PerIpSlots,
) -> io::Result<(TlsStream<PeerTcp>, Option<PerIpSlot>)> {
    if proxy_protocol
        && let ProxiedAddress::Proxied { source, .. } = read_proxy_header(&mut tcp).await?
    {
        peer = source;
    }
    let slot = per_ip.acquire(peer.ip())?;
    let stream = acceptor.accept(PeerTcp { tcp, peer }).await?;
    Ok((stream, slot))
}

/// Counts the anonymous connections of each client address, up to a limit per address.
#[derive(Debug, Clone)]
struct PerIpSlots {
    max: usize,
    held: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    over_cap: Arc<std::sync::Mutex<Throttle>>,
}

/// One anonymous connection of an address, counted until dropped.
#[derive(Debug)]
struct PerIpSlot {
    ip: IpAddr,
    held: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
}

impl PerIpSlots {
    fn new(max: usize) -> Self {
        Self {
            max,
            held: Arc::default(),
            over_cap: Arc::new(std::sync::Mutex::new(Throttle::new(LOG_INTERVAL))),
        }
    }

    /// A slot for `ip`, `None` when there is no limit per address, or an error (which closes
    /// the connection) when `ip` holds them all.
    fn acquire(&self, ip: IpAddr) -> io::Result<Option<PerIpSlot>> {
        if self.max == 0 {
            return Ok(None);
        }
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(ip).or_insert(0);
        if *count >= self.max {
            let throttle = self
                .over_cap
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .hit(Instant::now());
            if let Some(refused) = throttle {
                tracing::warn!(
                    %ip,
                    refused,
                    limit = self.max,
                    "closing connections at once: too many from one address without a client certificate (limits.max_unauthenticated_connections_per_ip)"
                );
            }
            return Err(io::Error::other(format!(
                "{ip} holds {} connections without a client certificate",
                self.max
            )));
        }
        *count += 1;
        Ok(Some(PerIpSlot {
            ip,
            held: Arc::clone(&self.held),
        }))
    }
}

impl Drop for PerIpSlot {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

/// Reads exactly one PROXY v2 header from `tcp`, leaving the bytes after it (the TLS
/// handshake) unread.
async fn read_proxy_header(tcp: &mut TcpStream) -> io::Result<ProxiedAddress> {
    use tokio::io::AsyncReadExt as _;

    let invalid =
        |e: proxy_protocol::ProxyHeaderError| io::Error::new(io::ErrorKind::InvalidData, e);
    let mut header = vec![0u8; proxy_protocol::FIXED_LEN];
    tcp.read_exact(&mut header).await?;
    let total = proxy_protocol::header_len(&header).map_err(invalid)?;
    header.resize(total, 0);
    if let Some(rest) = header.get_mut(proxy_protocol::FIXED_LEN..) {
        tcp.read_exact(rest).await?;
    }
    proxy_protocol::parse(&header).map_err(invalid)
}

/// A TCP stream and the client address the API sees for it.
#[derive(Debug)]
pub struct PeerTcp {
    tcp: TcpStream,
    peer: SocketAddr,
}

impl Connected for PeerTcp {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        TcpConnectInfo {
            local_addr: self.tcp.local_addr().ok(),
            remote_addr: Some(self.peer),
        }
    }
}

impl AsyncRead for PeerTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// An accepted TLS connection: it holds its unauthenticated slot while it has no client
/// certificate, and fails its next read once no byte has moved for the idle timeout, which
/// makes the HTTP/2 server drop it.
#[derive(Debug)]
pub struct ServerConnection {
    stream: TlsStream<PeerTcp>,
    peer: TlsPeer,
    idle_timeout: Duration,
    last_activity: Instant,
    idle: Pin<Box<Sleep>>,
    _unauthenticated: Option<(OwnedSemaphorePermit, Option<PerIpSlot>)>,
}

impl ServerConnection {
    fn new(
        stream: TlsStream<PeerTcp>,
        unauthenticated: Option<(OwnedSemaphorePermit, Option<PerIpSlot>)>,
        idle_timeout: Duration,
    ) -> Self {
        let now = Instant::now();
        let (tcp, tls) = stream.get_ref();
        // The verifier checked the chain; its leaf is read once for every call on the
        // connection.
        let peer = TlsPeer {
            remote_addr: Some(tcp.peer),
            svid: tls
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|leaf| PeerSvid::of_leaf(leaf)),
        };
        Self {
            stream,
            peer,
            idle_timeout,
            last_activity: now,
            idle: Box::pin(tokio::time::sleep_until(now + idle_timeout)),
            _unauthenticated: unauthenticated,
        }
    }

    /// Whether the idle timeout has passed, arming the timer for the current deadline when it
    /// has not (activity only records the time; the timer is moved lazily here).
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            let deadline = self.last_activity + self.idle_timeout;
            if self.idle.deadline() != deadline {
                self.idle.as_mut().reset(deadline);
            }
            if self.idle.as_mut().poll(cx).is_pending() {
                return false;
            }
            if self.last_activity + self.idle_timeout <= Instant::now() {
                return true;
            }
        }
    }
}

impl Connected for ServerConnection {
    type ConnectInfo = TlsPeer;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl AsyncRead for ServerConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.last_activity = Instant::now();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if this.poll_idle(cx) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection idle",
            ))),
            other => other,
        }
    }
}

impl AsyncWrite for ServerConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            this.last_activity = Instant::now();
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Exponential backoff between `start` and `max`.
#[derive(Debug)]
pub(crate) struct Backoff {
    start: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(start: Duration, max: Duration) -> Self {
        Self {
            start,
            max,
            next: start,
        }
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.start;
    }
}

/// Counts occurrences of a problem and says when to log it: at the first, then at most once
/// per interval, with how many happened since the last line.
#[derive(Debug)]
pub(crate) struct Throttle {
    interval: Duration,
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl Throttle {
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval,
            last_logged: None,
            unlogged: 0,
        }
    }

    /// Records one occurrence at `now`; `Some(count)` when a line is due, with the count
    /// since the last line.
    pub(crate) fn hit(&mut self, now: Instant) -> Option<u64> {
        self.unlogged = self.unlogged.saturating_add(1);
        let due = self
            .last_logged
            .is_none_or(|last| now.saturating_duration_since(last) >= self.interval);
        if !due {
            return None;
        }
        self.last_logged = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// Raises this process's soft limit on open files to its hard limit, once: every connection
/// is a descriptor, and the common soft default of 1024 is far below what a server needs.
pub fn raise_open_file_limit() {
    static RAISED: std::sync::Once = std::sync::Once::new();
    RAISED.call_once(|| match try_raise_open_file_limit() {
        Ok(Some(limit)) => tracing::info!(limit, "raised the open file limit"),
        Ok(None) => {}
        Err(error) => tracing::warn!(%error, "cannot raise the open file limit"),
    });
}

/// Sets the soft `RLIMIT_NOFILE` to the hard one; the new limit when it changed.
#[cfg(unix)]
fn try_raise_open_file_limit() -> io::Result<Option<u64>> {
    use rustix::process::{Resource, getrlimit, setrlimit};

    let limit = getrlimit(Resource::Nofile);
    // An unlimited hard limit cannot be the soft one on every platform (macOS caps it at
    // OPEN_MAX); leave such a process as it is.
    let Some(hard) = limit.maximum else {
        return Ok(None);
    };
    if limit.current.is_some_and(|soft| soft >= hard) {
        return Ok(None);
    }
    let mut raised = limit;
    raised.current = Some(hard);
    setrlimit(Resource::Nofile, raised)?;
    Ok(Some(hard))
}

#[cfg(not(unix))]
fn try_raise_open_file_limit() -> io::Result<Option<u64>> {
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_doubles_up_to_a_second_and_resets() {
        let mut backoff = Backoff::new(ACCEPT_BACKOFF_START, ACCEPT_BACKOFF_MAX);
        let delays: Vec<u128> = (0..7).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [50, 100, 200, 400, 800, 1000, 1000]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), ACCEPT_BACKOFF_START);
    }

    #[test]
    fn a_throttle_logs_the_first_hit_then_once_per_interval_with_the_count() {
        let start = Instant::now();
        let mut throttle = Throttle::new(Duration::from_secs(1));
        assert_eq!(throttle.hit(start), Some(1));
        for i in 1..100 {
            assert_eq!(throttle.hit(start + Duration::from_millis(i)), None);
        }
        assert_eq!(throttle.hit(start + Duration::from_secs(1)), Some(100));
        assert_eq!(throttle.hit(start + Duration::from_millis(1500)), None);
    }

    #[cfg(unix)]
    #[test]
    fn the_soft_open_file_limit_is_raised_to_the_hard_limit() {
        use rustix::process::{Resource, getrlimit, setrlimit};

        let before = getrlimit(Resource::Nofile);
        let Some(hard) = before.maximum else {
            return;
        };
        // Start below the hard limit so that raising it has something to do.
        let mut lowered = before;
        lowered.current = Some(hard.min(4096) / 2);
        setrlimit(Resource::Nofile, lowered).unwrap();
        assert_eq!(try_raise_open_file_limit().unwrap(), Some(hard));
        assert_eq!(getrlimit(Resource::Nofile).current, Some(hard));
        assert_eq!(try_raise_open_file_limit().unwrap(), None, "already raised");
    }
}
