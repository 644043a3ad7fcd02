//! Mutual TLS between two workloads whose identities come from the SPIFFE Workload API.
//!
//! Both sides build their rustls configuration with `spiffe-rustls` from a `spiffe::X509Source`.
//! The source keeps a stream open to the Workload API (the socket named by
//! `SPIFFE_ENDPOINT_SOCKET`), so every handshake uses the SVID and trust bundle current at that
//! moment: certificates rotate under a running process, with no restart and no files. Peers are
//! authorized by SPIFFE ID, never by host name. README.md runs it against `lanyard dev`.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a command-line example reports on stdout and stderr"
)]

mod crl;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::{Parser, Subcommand};
use spiffe::x509_source::SvidPicker;
use spiffe::{SpiffeId, X509Source, X509Svid};
use spiffe_rustls::{AllowList, LocalOnly, authorizer, mtls_client, mtls_server};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// How long to wait for a first SVID: an entry created moments ago takes a sync to arrive.
const INITIAL_SYNC_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on one connection, so a stalled peer cannot hang either side.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Use the X.509-SVID with this hint when the Workload API serves this process several
    /// (for example two entries for the same uid); by default the first one.
    #[arg(long, global = true, value_name = "HINT")]
    svid_hint: Option<String>,
    /// Also refuse a peer whose certificate a CRL in this PEM file names (the file `lanyard
    /// helper` writes with `crl_file_name`), read again whenever it changes.
    #[arg(long, global = true, value_name = "PATH")]
    crl_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Accept mTLS connections and greet each authorized client by its SPIFFE ID.
    Server {
        /// Address to listen on; port 0 picks a free port (the chosen address is printed).
        #[arg(long, value_name = "ADDR")]
        listen: SocketAddr,
        /// A client SPIFFE ID to accept; repeat for several. Other clients fail the handshake.
        #[arg(long, value_name = "SPIFFE_ID", required = true)]
        allow: Vec<SpiffeId>,
    },
    /// Connect to a server, with a fresh handshake each time, and print its greeting.
    Client {
        /// The server's address.
        #[arg(long, value_name = "ADDR")]
        connect: SocketAddr,
        /// The SPIFFE ID the server must present.
        #[arg(long, value_name = "SPIFFE_ID")]
        server_id: SpiffeId,
        /// How many connections to make; the first failure ends the run with status 1.
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// Pause between connections, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 1000)]
        interval_ms: u64,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let crls = cli
        .crl_file
        .as_deref()
        .map(crl::CrlFile::open)
        .transpose()?
        .map(Arc::new);
    let source = x509_source(cli.svid_hint).await?;
    let outcome = match cli.command {
        Command::Server { listen, allow } => serve(&source, listen, allow, crls).await,
        Command::Client {
            connect,
            server_id,
            count,
            interval_ms,
        } => {
            let interval = Duration::from_millis(interval_ms);
            let checks = Checks {
                source: &source,
                crls: crls.as_deref(),
            };
            run_client(checks, connect, &server_id, count, interval).await
        }
    };
    source.shutdown().await;
    outcome
}

/// Connects to the Workload API at `SPIFFE_ENDPOINT_SOCKET` and waits for a first SVID.
async fn x509_source(svid_hint: Option<String>) -> anyhow::Result<X509Source> {
    let mut builder = X509Source::builder().initial_sync_timeout(INITIAL_SYNC_TIMEOUT);
    if let Some(hint) = svid_hint {
        builder = builder.picker(HintPicker { hint });
    }
    builder.build().await.context(
        "no X.509-SVID from the Workload API: is SPIFFE_ENDPOINT_SOCKET set, and is an \
         entry registered for this process?",
    )
}

/// Picks the SVID whose entry carries `hint`; the source re-picks on every rotation.
#[derive(Debug)]
struct HintPicker {
    hint: String,
}

impl SvidPicker for HintPicker {
    fn pick_svid(&self, svids: &[Arc<X509Svid>]) -> Option<usize> {
        svids
            .iter()
            .position(|svid| svid.hint() == Some(self.hint.as_str()))
    }
}

/// What a side checks beyond spiffe-rustls: the peer against the CRLs, when given.
#[derive(Clone, Copy)]
struct Checks<'a> {
    source: &'a X509Source,
    crls: Option<&'a crl::CrlFile>,
}

impl Checks<'_> {
    fn revocation(
        &self,
        chain: Option<&[CertificateDer<'_>]>,
        peer: crl::Peer,
    ) -> anyhow::Result<()> {
        match self.crls {
            Some(crls) => crl::check(self.source, crls, chain, peer),
            None => Ok(()),
        }
    }
}

async fn serve(
    source: &X509Source,
    listen: SocketAddr,
    allow: Vec<SpiffeId>,
    crls: Option<Arc<crl::CrlFile>>,
) -> anyhow::Result<()> {
    // Verify client chains only against the bundles of the trust domains we accept clients
    // from (defense in depth under federation), then authorize the exact IDs.
    let trust_domains: BTreeSet<_> = allow.iter().map(|id| id.trust_domain().clone()).collect();
    let config = mtls_server(source.clone())
        .authorize(authorizer::exact(allow)?)
        .trust_domain_policy(AllowList(trust_domains))
        .build()?;
    let acceptor = TlsAcceptor::from(Arc::new(config));

    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    println!(
        "listening on {} as {}",
        listener.local_addr()?,
        source.svid()?.spiffe_id()
    );
    let shutdown = tokio::signal::ctrl_c();
    tokio::pin!(shutdown);
    loop {
        let (tcp, client_address) = tokio::select! {
            accepted = listener.accept() => accepted.context("accepting a connection")?,
            _ = &mut shutdown => return Ok(()),
        };
        let acceptor = acceptor.clone();
        let source = source.clone();
        let crls = crls.clone();
        tokio::spawn(async move {
            let checks = Checks {
                source: &source,
                crls: crls.as_deref(),
            };
            match tokio::time::timeout(CONNECTION_TIMEOUT, greet(&acceptor, checks, tcp)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => eprintln!("{client_address}: {error:#}"),
                Err(_elapsed) => eprintln!("{client_address}: timed out"),
            }
        });
    }
}

/// Serves one connection: the handshake, where spiffe-rustls verifies the client's chain and
/// authorizes its SPIFFE ID, the CRL check when asked for (a revoked client's connection is
/// closed without a greeting), then one line naming the client.
async fn greet(acceptor: &TlsAcceptor, checks: Checks<'_>, tcp: TcpStream) -> anyhow::Result<()> {
    let mut tls = acceptor.accept(tcp).await.context("TLS handshake")?;
    let peer = tls.get_ref().1.peer_certificates();
    let (client_id, serial) = peer_identity(peer)?;
    if let Err(error) = checks.revocation(peer, crl::Peer::Client) {
        println!("refused {client_id} (certificate serial {serial}): {error:#}");
        tls.shutdown().await?;
        return Ok(());
    }
    println!("accepted {client_id} (certificate serial {serial})");
    tls.write_all(format!("hello {client_id}\n").as_bytes())
        .await?;
    tls.shutdown().await?;
    Ok(())
}

async fn run_client(
    checks: Checks<'_>,
    address: SocketAddr,
    server_id: &SpiffeId,
    count: u64,
    interval: Duration,
) -> anyhow::Result<()> {
    let config = mtls_client(checks.source.clone())
        .authorize(authorizer::exact([server_id.clone()])?)
        .trust_domain_policy(LocalOnly(server_id.trust_domain().clone()))
        .build()?;
    let connector = TlsConnector::from(Arc::new(config));
    for n in 1..=count {
        if n > 1 {
            tokio::time::sleep(interval).await;
        }
        let exchanged =
            tokio::time::timeout(CONNECTION_TIMEOUT, exchange(&connector, checks, address))
                .await
                .unwrap_or_else(|_elapsed| Err(anyhow!("timed out")));
        let (serial, greeting) =
            exchanged.with_context(|| format!("connection {n} of {count} to {address}"))?;
        println!("{n}/{count} {server_id} (certificate serial {serial}) says: {greeting}");
    }
    Ok(())
}

/// One connection: a full handshake, where spiffe-rustls verifies the server's chain and its
/// SPIFFE ID, then the server's greeting. Returns the server certificate's serial and the
/// greeting.
async fn exchange(
    connector: &TlsConnector,
    checks: Checks<'_>,
    address: SocketAddr,
) -> anyhow::Result<(String, String)> {
    let tcp = TcpStream::connect(address).await.context("connecting")?;
    // rustls wants a server name; spiffe-rustls checks the SPIFFE ID instead, so any will do.
    let server_name = ServerName::IpAddress(address.ip().into());
    let mut tls = connector
        .connect(server_name, tcp)
        .await
        .context("TLS handshake")?;
    let peer = tls.get_ref().1.peer_certificates();
    let (_, serial) = peer_identity(peer)?;
    checks.revocation(peer, crl::Peer::Server)?;
    // In TLS 1.3 the server checks our certificate after our side of the handshake is done,
    // so a rejection shows up here, as an alert or an empty read.
    let mut greeting = String::new();
    BufReader::new(&mut tls)
        .read_line(&mut greeting)
        .await
        .context("reading the greeting")?;
    if greeting.is_empty() {
        bail!("the server closed the connection without a greeting (did it reject our SPIFFE ID?)");
    }
    Ok((serial, greeting.trim_end().to_owned()))
}

/// The SPIFFE ID and serial number of a verified peer's leaf certificate.
fn peer_identity(chain: Option<&[CertificateDer<'_>]>) -> anyhow::Result<(SpiffeId, String)> {
    let leaf = chain
        .and_then(|chain| chain.first())
        .context("the peer presented no certificate")?;
    let spiffe_id = spiffe::cert::spiffe_id_from_der(leaf)?;
    let (_, certificate) = x509_parser::parse_x509_certificate(leaf)?;
    Ok((spiffe_id, format!("{:x}", certificate.serial)))
}
