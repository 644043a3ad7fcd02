//! Revocations on the server: the certificate revocation lists (CRLs) it signs with each X.509
//! authority whose key it holds, those the other servers of the trust domain publish for
//! theirs, and the newest revocation sequence, which agents compare with the one they have
//! applied.
//!
//! A server signs its own lists from the datastore (every serial a live revocation names) when
//! a revocation is made or gains serials (here or, through the change feed, on another server
//! sharing the datastore), when the CA rotates, and at least every [`CRL_REFRESH`]; it signs
//! with its active and prepared authorities and with the one it retired last, until that one
//! expires, so an SVID still signed by it has a list. Each is valid for [`CRL_VALIDITY`] from
//! its `thisUpdate`, so a verifier that reads a list (nginx's `ssl_crl`) always holds one that
//! is current while its agent reaches a server.
//!
//! Each server publishes what it signs into the datastore ([`Datastore::publish_crls`]) and
//! serves, beside its own, the published lists of the bundle's other authorities: verifiers
//! such as nginx want a list from every issuer they meet, and with several servers a workload
//! may hold an SVID from any of them. A server re-reads the published lists when the change
//! feed shows one moved, without signing anything (so servers never answer each other's
//! publications with their own).

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanyard_core::revocation::RevokedSerial;
use lanyard_core::x509::X509Ca;

use crate::ca::CaManager;
use crate::datastore::{Datastore, DatastoreError, PublishedCrl};

/// How long a CRL is valid after its `thisUpdate` (its `nextUpdate`).
pub const CRL_VALIDITY: Duration = Duration::from_secs(3600);

/// How often the CRLs are signed anew even when nothing changed, at least.
pub const CRL_REFRESH: Duration = Duration::from_secs(20 * 60);

/// How long a published list is kept past its `nextUpdate` (its authority has usually left
/// the bundle by then, and a server that signs it would have replaced it long before).
pub const PUBLISHED_CRL_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// One authority's signed list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCrl {
    /// The authority (subject key ID, hex) that signed it.
    pub authority_id: String,
    /// The DER CRL.
    pub der: Vec<u8>,
}

/// The CRLs in force.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Crls {
    /// An opaque version of the whole set of lists that moves whenever one of them does: what
    /// agents hold and compare (`crl_number` on the wire). 0 when there are none.
    pub version: u64,
    /// When this server last signed its own lists.
    pub this_update: Option<SystemTime>,
    /// The CRL number of this server's own lists.
    pub number: u64,
    /// The lists of the authorities whose keys this server holds, one each, then those other
    /// servers sharing the datastore published for the bundle's other authorities.
    pub lists: Vec<SignedCrl>,
    /// How many of `lists` (the first ones) this server signed.
    pub own: usize,
    /// The serials this server's lists carry.
    pub serials: usize,
}

impl Crls {
    /// These lists, with the `published` ones of the authorities in `in_bundle` that this
    /// server does not sign put after its own, and the version computed.
    fn with_published(mut self, published: Vec<PublishedCrl>, in_bundle: &[String]) -> Self {
        self.lists.truncate(self.own);
        for crl in published {
            let signed_here = self.lists[..self.own]
                .iter()
                .any(|list| list.authority_id == crl.authority_id);
            if !signed_here && in_bundle.contains(&crl.authority_id) {
                self.lists.push(SignedCrl {
                    authority_id: crl.authority_id,
                    der: crl.der,
                });
            }
        }
        self.version = version_of(&self.lists);
        self
    }
}

/// A version for a set of lists: 0 for none, else a digest of every list's DER.
fn version_of(lists: &[SignedCrl]) -> u64 {
    if lists.is_empty() {
        return 0;
    }
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for list in lists {
        context.update(&(list.der.len() as u64).to_be_bytes());
        context.update(&list.der);
    }
    let digest = context.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_be_bytes(first).max(1)
}

/// Signs one CRL per authority in `cas`, each listing the serials of `serials` that it
/// issued (or whose issuer is unknown), numbered `number`, valid from `now` for
/// [`CRL_VALIDITY`]. Pure but for the signatures.
pub fn sign_crls(
    cas: &[Arc<X509Ca>],
    serials: &[RevokedSerial],
    number: u64,
    now: SystemTime,
) -> Result<Vec<SignedCrl>, lanyard_core::x509::X509Error> {
    let mut lists = Vec::with_capacity(cas.len());
    for ca in cas {
        let authority_id = ca.authority_id();
        let mut listed: Vec<RevokedSerial> = serials
            .iter()
            .filter(|s| s.listed_by(&authority_id))
            .cloned()
            .collect();
        listed.sort_by(|a, b| a.serial.cmp(&b.serial));
        listed.dedup_by(|a, b| a.serial == b.serial);
        let der = ca.sign_crl(&listed, number, now, now + CRL_VALIDITY)?;
        lists.push(SignedCrl { authority_id, der });
    }
    Ok(lists)
}

/// The server's revocation state.
#[derive(Debug, Default)]
pub struct RevocationState {
    crls: RwLock<Arc<Crls>>,
    /// The highest revocation sequence in the datastore at the last refresh.
    sequence: std::sync::atomic::AtomicI64,
    refresh_lock: tokio::sync::Mutex<()>,
}

impl RevocationState {
    /// No revocations known and no CRLs yet: [`RevocationState::refresh`] fills it.
    pub fn new() -> Self {
        Self::default()
    }

    /// The CRLs in force.
    pub fn crls(&self) -> Arc<Crls> {
        Arc::clone(&self.crls.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The highest revocation sequence at the last refresh (0 when there is none).
    pub fn sequence(&self) -> i64 {
        self.sequence.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether this server's lists are due to be signed again at `now`.
    pub fn due(&self, now: SystemTime) -> bool {
        self.crls()
            .this_update
            .is_none_or(|signed| now.duration_since(signed).unwrap_or_default() >= CRL_REFRESH)
    }

    /// Reads the revocations from `store`, signs this server's lists anew with every X.509
    /// authority of `ca` whose key it holds ([`CaManager::crl_signers`]), publishes them, and
    /// takes the other authorities' published lists. On failure the CRLs in force stay.
    pub async fn refresh(
        &self,
        store: &dyn Datastore,
        ca: &CaManager,
        now: SystemTime,
    ) -> Result<(), DatastoreError> {
        let _one_at_a_time = self.refresh_lock.lock().await;
        let sequence = store
            .list_revocations(self.sequence())
            .await?
            .last()
            .map_or(self.sequence(), |r| r.sequence);
        let serials = store.list_revoked_serials(None).await?;
        let cas = ca.crl_signers(now);
        let previous = self.crls();
        // Increasing for each issuer: the signing second, or one more than the last.
        let seconds = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        let number = seconds.max(previous.number + 1);
        let lists = sign_crls(&cas, &serials, number, now)
            .map_err(|e| DatastoreError::Backend(format!("signing the CRLs failed: {e}")))?;
        let next_update = now + CRL_VALIDITY;
        let publish: Vec<PublishedCrl> = lists
            .iter()
            .map(|list| PublishedCrl {
                authority_id: list.authority_id.clone(),
                der: list.der.clone(),
                number,
                next_update,
            })
            .collect();
        store.publish_crls(&publish).await?;
        let published = store.list_published_crls().await?;
        let own = lists.len();
        let crls = Crls {
            version: 0,
            this_update: Some(now),
            number,
            lists,
            own,
            serials: serials.len(),
        }
        .with_published(published, &bundle_authorities(ca));
        *self.crls.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(crls);
        self.sequence
            .fetch_max(sequence, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }

    /// Takes the lists other servers published anew (the change feed showed one moved),
    /// signing nothing. Returns whether the set in force changed.
    pub async fn reload_published(
        &self,
        store: &dyn Datastore,
        ca: &CaManager,
    ) -> Result<bool, DatastoreError> {
        let _one_at_a_time = self.refresh_lock.lock().await;
        let published = store.list_published_crls().await?;
        let previous = self.crls();
        let crls = (*previous)
            .clone()
            .with_published(published, &bundle_authorities(ca));
        let changed = crls.version != previous.version;
        *self.crls.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(crls);
        Ok(changed)
    }
}

/// The authority IDs of the trust domain's X.509 authorities.
fn bundle_authorities(ca: &CaManager) -> Vec<String> {
    ca.bundle()
        .map(|bundle| {
            bundle
                .x509_authorities()
                .iter()
                .filter_map(|a| lanyard_core::x509::authority_id_of(a.der()).ok())
                .collect()
        })
        .unwrap_or_default()
}
