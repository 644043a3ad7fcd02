//! Node attestation: how the agent authenticates the server before it has an SVID, proves
//! the node's identity (join token, x509pop or k8s_psat) with `AttestAgent`, fetches the bundle on the
//! same connection and checks the SVID it got.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lanyard_core::keys::{KeyPair, KeyType};
use lanyard_core::rotation::{self, Jitter};
use lanyard_core::x509::{self, X509Svid};
use lanyard_core::{TrustBundle, TrustDomain, k8s_psat};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use tokio::time::Instant;
use tonic::Code;

use super::client::{self, AgentCredentials, Attestor, ClientError, ServerClient, ServerTrust};
use super::storage::StoredSvid;
use super::{AGENT_SVID_EXPIRY_MARGIN, Clock, ManagerError};
use crate::config::AgentConfig;

/// How long the first attestation is retried on transient errors before the agent gives up
/// (SPIRE: one minute).
const ATTESTATION_RETRY_PERIOD: Duration = Duration::from_secs(60);

/// The first and the longest wait between attestation attempts at start.
const ATTESTATION_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(10));

/// An attestation's outcome.
pub(super) struct Attestation {
    pub(super) credentials: AgentCredentials,
    pub(super) reattestable: bool,
    pub(super) bundle: TrustBundle,
}

/// The stored SVID if it is still good for at least a moment and chains to the stored
/// bundle.
pub(super) fn usable_svid(
    svid: StoredSvid,
    bundle: &TrustBundle,
    now: SystemTime,
) -> Option<AgentCredentials> {
    let credentials = match credentials_from_chain(svid.chain, svid.key, bundle, now) {
        Ok(credentials) => credentials,
        Err(reason) => {
            tracing::info!(%reason, "the stored agent SVID cannot be used; attesting again");
            return None;
        }
    };
    if now + AGENT_SVID_EXPIRY_MARGIN >= credentials.svid.not_after() {
        tracing::info!("the stored agent SVID has expired; attesting again");
        return None;
    }
    Some(credentials)
}

/// Checks an agent SVID chain against the trust domain's bundle.
pub(super) fn credentials_from_chain(
    chain: Vec<Vec<u8>>,
    key: Arc<KeyPair>,
    bundle: &TrustBundle,
    now: SystemTime,
) -> Result<AgentCredentials, String> {
    let verified = x509::verify_svid_chain(
        &chain,
        bundle.trust_domain(),
        &authorities(bundle, false),
        now,
    )
    .map_err(|e| format!("the agent SVID does not verify against the bundle: {e}"))?;
    let svid = X509Svid::from_chain(chain).map_err(|e| e.to_string())?;
    Ok(AgentCredentials {
        svid,
        not_before: verified.not_before(),
        key,
    })
}

pub(super) fn authorities(bundle: &TrustBundle, untainted_only: bool) -> Vec<Vec<u8>> {
    bundle
        .x509_authorities()
        .iter()
        .filter(|a| !(untainted_only && a.is_tainted()))
        .map(|a| a.der().to_vec())
        .collect()
}

/// How to authenticate the server for the first attestation, in SPIRE's order: the stored
/// bundle, the configured bootstrap bundle, or (insecure) the server's ID alone.
pub(super) fn bootstrap_trust(
    config: &AgentConfig,
    stored_bundle: Option<TrustBundle>,
) -> Result<(ServerTrust, Option<TrustBundle>), ManagerError> {
    if let Some(bundle) = stored_bundle.filter(|b| !b.x509_authorities().is_empty()) {
        return Ok((ServerTrust::Bundle, Some(bundle)));
    }
    if let Some(path) = &config.trust_bundle_path {
        let error = |reason: String| ManagerError::TrustBundle {
            path: path.clone(),
            reason,
        };
        let pem = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        let bundle = TrustBundle::from_pem_certificates(config.trust_domain.clone(), &pem)
            .map_err(|e| error(e.to_string()))?;
        return Ok((ServerTrust::Bundle, Some(bundle)));
    }
    if config.insecure_bootstrap {
        tracing::warn!(
            "insecure_bootstrap: the server is not authenticated on first contact, only its SPIFFE ID is checked"
        );
        return Ok((ServerTrust::InsecureBootstrap, None));
    }
    Err(ManagerError::NoBootstrapTrust)
}

/// The configured way to attest. x509pop files and the k8s_psat token are read anew each
/// time, so a renewed node certificate or a rotated token is picked up at the next
/// re-attestation.
pub(super) fn load_attestor(config: &AgentConfig) -> Result<Attestor, ManagerError> {
    if let Some(psat) = &config.node_attestor.k8s_psat {
        let token =
            read_psat_token(&psat.token_path).map_err(|reason| ManagerError::K8sPsatToken {
                path: psat.token_path.clone(),
                reason,
            })?;
        return Ok(Attestor::K8sPsat(k8s_psat::Payload {
            cluster: psat.cluster.clone(),
            token,
        }));
    }
    if let Some(x509pop) = &config.node_attestor.x509pop {
        let cert_error = |reason: String| ManagerError::X509Pop {
            key: "certificate_path",
            path: x509pop.certificate_path.clone(),
            reason,
        };
        let pem =
            std::fs::read(&x509pop.certificate_path).map_err(|e| cert_error(e.to_string()))?;
        let chain = CertificateDer::pem_slice_iter(&pem)
            .map(|cert| cert.map(|c| c.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| cert_error(e.to_string()))?;
        if chain.is_empty() {
            return Err(cert_error("no CERTIFICATE block found".into()));
        }
        let key_error = |reason: String| ManagerError::X509Pop {
            key: "private_key_path",
            path: x509pop.private_key_path.clone(),
            reason,
        };
        let key_pem = std::fs::read_to_string(&x509pop.private_key_path)
            .map_err(|e| key_error(e.to_string()))?;
        // The error names the problem, never the key's bytes.
        let key = KeyPair::from_pkcs8_pem(&key_pem).map_err(|e| key_error(e.to_string()))?;
        return Ok(Attestor::X509Pop {
            chain,
            key: Box::new(key),
        });
    }
    match &config.join_token {
        Some(token) => Ok(Attestor::JoinToken(token.clone())),
        None => Err(ManagerError::NoAttestor),
    }
}

/// The token file's content, bounded, without surrounding whitespace. The error never holds
/// the token.
fn read_psat_token(path: &Path) -> Result<String, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    let limit = u64::try_from(k8s_psat::MAX_TOKEN_LEN).unwrap_or(u64::MAX);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() > k8s_psat::MAX_TOKEN_LEN {
        return Err(format!(
            "larger than {} bytes; not a service account token",
            k8s_psat::MAX_TOKEN_LEN
        ));
    }
    let token = String::from_utf8(bytes).map_err(|_| "not UTF-8".to_owned())?;
    let token = token.trim();
    if token.is_empty() {
        return Err("the file is empty".into());
    }
    Ok(token.to_owned())
}

/// One attestation: `AttestAgent` on a connection without a client certificate, then
/// `GetBundle` on the same connection.
pub(super) async fn attest_once(
    client: &ServerClient,
    attestor: &Attestor,
    trust: ServerTrust,
    trust_domain: &TrustDomain,
    now: impl Fn() -> SystemTime,
) -> Result<Attestation, ClientError> {
    let key = KeyPair::generate(KeyType::EcP256)
        .map_err(|e| ClientError::Local(format!("generating the agent key: {e}")))?;
    let channel = client.bootstrap_channel(trust)?;
    let attested = client::with_deadline(
        "AttestAgent",
        client::attest_agent(channel.clone(), attestor, &key),
    )
    .await?;
    let bundle =
        client::with_deadline("GetBundle", client::get_bundle(channel, trust_domain)).await?;
    let credentials = credentials_from_chain(attested.chain, Arc::new(key), &bundle, now())
        .map_err(|reason| ClientError::InvalidResponse {
            rpc: "AttestAgent",
            reason,
        })?;
    Ok(Attestation {
        credentials,
        reattestable: attested.reattestable,
        bundle,
    })
}

/// Whether an attestation error is the server's final word (SPIRE's agent exits at once on
/// `PermissionDenied`); anything else is worth retrying.
pub(super) fn attestation_refused(error: &ClientError) -> bool {
    matches!(
        error.code(),
        Some(
            Code::PermissionDenied
                | Code::InvalidArgument
                | Code::Unauthenticated
                | Code::Unimplemented
                | Code::FailedPrecondition
        )
    )
}

pub(super) async fn attest_at_start(
    client: &ServerClient,
    config: &AgentConfig,
    trust: ServerTrust,
    clock: &Clock,
) -> Result<Attestation, ManagerError> {
    let attestor = load_attestor(config)?;
    let give_up_at = Instant::now() + ATTESTATION_RETRY_PERIOD;
    let mut attempt = 0;
    loop {
        match attest_once(client, &attestor, trust, &config.trust_domain, || clock()).await {
            Ok(attestation) => return Ok(attestation),
            Err(error) if attestation_refused(&error) || Instant::now() >= give_up_at => {
                return Err(ManagerError::Attestation(error.to_string()));
            }
            Err(error) => {
                let delay = rotation::backoff(
                    attempt,
                    ATTESTATION_BACKOFF.0,
                    ATTESTATION_BACKOFF.1,
                    Jitter::random(),
                );
                tracing::warn!(%error, retry_in = ?delay, "node attestation failed; retrying");
                attempt += 1;
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psat_token_is_read_fresh_trimmed_and_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "eyJ.first.sig\n").expect("write");
        assert_eq!(read_psat_token(&path).as_deref(), Ok("eyJ.first.sig"));
        // The kubelet rotates the token in place; the next attestation sees the new one.
        std::fs::write(&path, "eyJ.second.sig").expect("write");
        assert_eq!(read_psat_token(&path).as_deref(), Ok("eyJ.second.sig"));
        std::fs::write(&path, " \n").expect("write");
        assert!(read_psat_token(&path).is_err());
        std::fs::write(&path, "a".repeat(k8s_psat::MAX_TOKEN_LEN + 1)).expect("write");
        let error = read_psat_token(&path).err().unwrap_or_default();
        assert!(error.contains("larger than"), "{error}");
        assert!(read_psat_token(&dir.path().join("missing")).is_err());
    }
}
