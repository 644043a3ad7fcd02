//! Certificate revocation lists for the example: read from a PEM file (the one `lanyard helper`
//! writes with `crl_file_name`), read again whenever the file changes, and checked after each
//! handshake that spiffe-rustls accepted, with rustls-webpki: the peer's chain is verified again
//! against the trust bundles, this time with the CRLs, and a certificate its issuer's list
//! names is refused. A list is trusted only if its issuer's key signed it; a certificate whose
//! issuer has no list here passes (SPIRE's agents serve none), and a list past its
//! `nextUpdate` still refuses what it names.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::{Context as _, bail};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use spiffe::X509Source;
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, KeyUsage, OwnedCertRevocationList,
    RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy,
};

/// The lists in a file, followed as it changes.
#[derive(Debug)]
pub(crate) struct CrlFile {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    stamp: Option<(SystemTime, u64)>,
    lists: Arc<Vec<CertRevocationList<'static>>>,
}

impl CrlFile {
    /// Reads `path`, which must hold at least one well-formed CRL.
    pub(crate) fn open(path: &Path) -> anyhow::Result<Self> {
        let stamp = stamp(path).with_context(|| format!("reading {}", path.display()))?;
        let lists = read(path)?;
        Ok(Self {
            path: path.to_owned(),
            loaded: Mutex::new(Loaded {
                stamp: Some(stamp),
                lists: Arc::new(lists),
            }),
        })
    }

    /// The lists as the file holds them now. A file that has become unreadable or malformed
    /// leaves the last good lists in force, with a message.
    pub(crate) fn lists(&self) -> Arc<Vec<CertRevocationList<'static>>> {
        let mut loaded = self
            .loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = stamp(&self.path).ok();
        if now.is_some() && now != loaded.stamp {
            match read(&self.path) {
                Ok(lists) => loaded.lists = Arc::new(lists),
                Err(error) => eprintln!("keeping the last good CRLs: {error:#}"),
            }
            loaded.stamp = now;
        }
        Arc::clone(&loaded.lists)
    }
}

fn stamp(path: &Path) -> std::io::Result<(SystemTime, u64)> {
    let metadata = std::fs::metadata(path)?;
    Ok((metadata.modified()?, metadata.len()))
}

fn read(path: &Path) -> anyhow::Result<Vec<CertRevocationList<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lists = Vec::new();
    for der in CertificateRevocationListDer::pem_slice_iter(&pem) {
        let der = der.with_context(|| format!("{} is not PEM", path.display()))?;
        let list = OwnedCertRevocationList::from_der(der.as_ref())
            .map_err(|error| anyhow::anyhow!("{}: a malformed CRL: {error:?}", path.display()))?;
        lists.push(CertRevocationList::from(list));
    }
    if lists.is_empty() {
        bail!("{} holds no X509 CRL", path.display());
    }
    Ok(lists)
}

/// Which end of the connection the peer is.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Peer {
    Client,
    Server,
}

/// Refuses `chain` (a peer spiffe-rustls has accepted) if a CRL of `crls` names a certificate
/// on it, verifying it against every trust bundle `source` holds.
pub(crate) fn check(
    source: &X509Source,
    crls: &CrlFile,
    chain: Option<&[CertificateDer<'_>]>,
    peer: Peer,
) -> anyhow::Result<()> {
    let Some((leaf, intermediates)) = chain.and_then(<[_]>::split_first) else {
        bail!("the peer presented no certificate");
    };
    let bundles = source.bundle_set()?;
    let roots: Vec<CertificateDer<'_>> = bundles
        .iter()
        .flat_map(|(_, bundle)| bundle.authorities().iter())
        .map(|authority| CertificateDer::from(authority.as_ref()))
        .collect();
    let anchors = roots
        .iter()
        .filter_map(|root| webpki::anchor_from_trusted_cert(root).ok())
        .collect::<Vec<_>>();
    let lists = crls.lists();
    let list_refs: Vec<&CertRevocationList<'_>> = lists.iter().collect();
    let revocation = RevocationOptionsBuilder::new(&list_refs)
        .map_err(|error| anyhow::anyhow!("{error:?}"))?
        .with_depth(RevocationCheckDepth::Chain)
        .with_status_policy(UnknownStatusPolicy::Allow)
        .with_expiration_policy(ExpirationPolicy::Ignore)
        .build();
    let end_entity = EndEntityCert::try_from(leaf).map_err(|error| anyhow::anyhow!("{error}"))?;
    let usage = match peer {
        Peer::Client => KeyUsage::client_auth(),
        Peer::Server => KeyUsage::server_auth(),
    };
    match end_entity.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        intermediates,
        UnixTime::now(),
        usage,
        Some(revocation),
        None,
    ) {
        Ok(_) => Ok(()),
        Err(webpki::Error::CertRevoked) => bail!("the peer's certificate is revoked"),
        Err(error) => bail!("the peer's certificate failed the revocation check: {error}"),
    }
}
