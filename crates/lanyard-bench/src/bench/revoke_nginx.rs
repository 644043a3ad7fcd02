//! `revoke`'s end-to-end figure: from an admin's revocation of a serial to a real nginx
//! refusing that certificate. A Lanyard agent serves the SVID of one entry, `lanyard helper`
//! writes it (and the trust domain's CRLs, `crl_file_name`) for Debian's nginx and signals nginx
//! on every change, and nginx requires client certificates from the bundle, checked against the
//! CRL file (`ssl_crl`). Each round presents the current SVID as a client certificate until
//! nginx accepts it, revokes its serial through the admin API, and times the handshakes (one
//! every 5 ms) until nginx refuses it: the change stream, the agent's fetch and replacement,
//! the helper's write and nginx's reload, as an operator would see them.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use lanyard_core::KeyPair;
use lanyard_core::tls::{SpiffeServerVerifier, client_config};
use lanyard_proto::lanyard::api::v1::RevokeRequest;
use lanyard_proto::lanyard::api::v1::revocation_service_client::RevocationServiceClient;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use tokio::time::Instant;

use crate::harness::{Target, current_uid, entry_message, scratch_dir, trust_domain};
use crate::report::Report;
use crate::stats::Samples;
use crate::workload::wait_for_socket;

/// The default agent sync interval: how long a revocation would take to reach an agent that
/// only polls.
const SYNC_INTERVAL: Duration = Duration::from_secs(5);

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Measures `rounds` revocations against nginx, with `lanyard` as the helper.
pub(crate) async fn run(
    report: &mut Report,
    target: &Target,
    lanyard: &Path,
    rounds: usize,
) -> anyhow::Result<()> {
    let Some(nginx) = lanyard_e2e::nginx::nginx_or_skip("the revoke benchmark's nginx round")
    else {
        report
            .notes
            .push("revoke → nginx refuses: skipped (LANYARD_E2E_SKIP_NGINX=1)".to_owned());
        return Ok(());
    };
    let dir = scratch_dir("lanyard-bench-revoke-nginx")?;
    let mut agent = crate::bench::start_agent(target, dir.path(), SYNC_INTERVAL).await?;
    wait_for_socket(&mut agent, Duration::from_secs(30)).await?;
    let selectors = vec![format!("unix:uid:{}", current_uid())];
    let entry = entry_message(agent.agent_id.as_str(), "/bench/revoke/nginx", &selectors);
    target.create_entries(vec![entry]).await?;

    let certs = dir.path().join("certs");
    let nginx_dir = dir.path().join("nginx");
    std::fs::create_dir_all(&certs)?;
    std::fs::create_dir_all(&nginx_dir)?;
    let port = lanyard_e2e::free_port();
    let conf = nginx_dir.join("nginx.conf");
    std::fs::write(
        &conf,
        lanyard_e2e::nginx::mtls_config(&nginx_dir, &certs, port, true),
    )?;
    let helper_conf = dir.path().join("helper.toml");
    std::fs::write(
        &helper_conf,
        format!(
            "agent_address = {socket:?}\ncert_dir = {certs:?}\ncrl_file_name = \"crl.pem\"\n\
             cmd = {nginx:?}\ncmd_args = {args:?}\nrenew_signal = \"SIGHUP\"\n",
            socket = agent.socket.display().to_string(),
            certs = certs.display().to_string(),
            nginx = nginx.display().to_string(),
            args = format!("-c {}", conf.display()),
        ),
    )?;
    let helper = Killed(
        Command::new(lanyard)
            .arg("helper")
            .arg("--config")
            .arg(&helper_conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("helper.log"))?)
            .spawn()
            .with_context(|| format!("starting {} helper", lanyard.display()))?,
    );

    let mut admin = RevocationServiceClient::new(target.admin().await?);
    let mut refused = Samples::new();
    let mut last_revoked = String::new();
    for _ in 0..rounds {
        // The current SVID (the replacement, after the round before), accepted by nginx.
        let (certs_now, skip) = (certs.clone(), last_revoked.clone());
        let (serial, config) = poll(Duration::from_secs(60), move || {
            let (serial, config) = current_client(&certs_now).ok()?;
            (serial != skip && accepted(port, &config)).then_some((serial, config))
        })
        .await
        .with_context(|| {
            format!(
                "nginx never accepted a current SVID; helper log: {}",
                std::fs::read_to_string(dir.path().join("helper.log")).unwrap_or_default()
            )
        })?;
        let started = Instant::now();
        admin
            .revoke(RevokeRequest {
                kind: "x509-serial".to_owned(),
                value: serial.clone(),
                owner: "bench".to_owned(),
                reason: "benchmark".to_owned(),
                ticket: String::new(),
                dry_run: false,
            })
            .await?;
        let revoked = Arc::clone(&config);
        poll(Duration::from_secs(60), move || {
            (!accepted(port, &revoked)).then_some(())
        })
        .await
        .context("nginx still accepts the revoked certificate after 60 s")?;
        refused.push(started.elapsed());
        last_revoked = serial;
    }
    drop(helper);
    // The helper's nginx, should it outlive the helper.
    if let Ok(pid) = std::fs::read_to_string(nginx_dir.join("nginx.pid")) {
        let _ = Command::new("kill").arg(pid.trim()).status();
    }
    drop(agent);

    let mut bench = report.bench("revoke");
    for (key, p) in [("p50", 50.0), ("p99", 99.0)] {
        bench.versus(
            &format!("nginx_refuses_{key}_ms"),
            &format!(
                "revoke → nginx refuses the certificate (helper's CRL file, `ssl_crl`), {key} of {rounds} rounds"
            ),
            refused.percentile_ms(p),
            "ms",
            (
                "agent sync interval (default)",
                SYNC_INTERVAL.as_secs_f64() * 1e3,
                "ms",
            ),
        );
    }
    Ok(())
}

/// Polls `check` every 5 ms, off the runtime's threads (it makes blocking handshakes), until
/// it gives something or `limit` passes.
async fn poll<T: Send + 'static>(
    limit: Duration,
    check: impl Fn() -> Option<T> + Send + Sync + 'static,
) -> anyhow::Result<T> {
    let check = Arc::new(check);
    let deadline = Instant::now() + limit;
    loop {
        let attempt = Arc::clone(&check);
        if let Some(found) = tokio::task::spawn_blocking(move || attempt()).await? {
            return Ok(found);
        }
        anyhow::ensure!(Instant::now() < deadline, "gave up after {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The serial of the SVID in `certs` and a client config presenting it.
fn current_client(certs: &Path) -> anyhow::Result<(String, Arc<rustls::ClientConfig>)> {
    let chain: Vec<Vec<u8>> = CertificateDer::pem_file_iter(certs.join("svid.pem"))?
        .map(|cert| cert.map(|cert| cert.as_ref().to_vec()))
        .collect::<Result<_, _>>()?;
    let key = KeyPair::from_pkcs8_pem(&std::fs::read_to_string(certs.join("svid_key.pem"))?)?;
    let bundle: Vec<Vec<u8>> = CertificateDer::pem_file_iter(certs.join("svid_bundle.pem"))?
        .map(|cert| cert.map(|cert| cert.as_ref().to_vec()))
        .collect::<Result<_, _>>()?;
    let leaf = chain.first().context("an empty svid.pem")?;
    let serial = lanyard_core::x509::serial_decimal(leaf)?;
    // nginx presents the same identity; the client checks only that it is of the trust domain.
    let server_id = lanyard_core::x509::verify_svid_chain(
        &chain,
        &trust_domain(),
        &bundle,
        std::time::SystemTime::now(),
    )?
    .spiffe_id()
    .clone();
    let verifier = SpiffeServerVerifier::new(server_id, Arc::new(move || bundle.clone()));
    let mut config = client_config(Arc::new(verifier), Some((&chain, &key)))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((serial, Arc::new(config)))
}

/// Whether nginx on `port` completes a request with `config`'s client certificate.
fn accepted(port: u16, config: &Arc<rustls::ClientConfig>) -> bool {
    use std::io::{Read as _, Write as _};

    let attempt = || -> anyhow::Result<String> {
        let name = rustls::pki_types::ServerName::try_from("localhost")?;
        let connection = rustls::ClientConnection::new(Arc::clone(config), name)?;
        let tcp = std::net::TcpStream::connect(("127.0.0.1", port))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut tls = rustls::StreamOwned::new(connection, tcp);
        tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        tls.read_to_string(&mut response)?;
        Ok(response)
    };
    attempt().is_ok_and(|response| response.contains("client verified: SUCCESS"))
}
