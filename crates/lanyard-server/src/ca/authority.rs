//! Forced rotation of the local authorities, as SPIRE's LocalAuthority API drives it:
//! prepare a new authority, activate it, then taint the old one (agents re-sign everything
//! it signed) and finally revoke it (it leaves the bundle). Each kind — the X.509 CA and the
//! JWT key — has an *active* and a *prepared* slot; any other authority of the trust domain
//! still in the bundle is *old*.
//!
//! An X.509 authority's ID is its subject key identifier in hex (what the usage ledger
//! records as the signer of every SVID, so `lanyard report holders --authority ID` shows who
//! holds SVIDs from an authority before it is tainted); a JWT authority's ID is its key ID.

use std::time::SystemTime;

use lanyard_core::x509;

use super::{CaError, CaManager, Slot};

/// An authority as the LocalAuthority API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityInfo {
    /// The subject key ID (X.509, hex) or key ID (JWT).
    pub authority_id: String,
    /// When it expires.
    pub expires_at: SystemTime,
    /// Whether the bundle marks it tainted.
    pub tainted: bool,
}

/// The authorities of one kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthorityStates {
    /// The one that signs.
    pub active: Option<AuthorityInfo>,
    /// The one that will sign next.
    pub prepared: Option<AuthorityInfo>,
    /// The most recent other authority still in the bundle.
    pub old: Option<AuthorityInfo>,
}

/// Why a LocalAuthority operation was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityError {
    /// The request names no authority, or one that cannot be used this way.
    #[error("{0}")]
    InvalidArgument(String),
    /// The authorities are not in a state that allows the operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The CA failed.
    #[error(transparent)]
    Ca(#[from] CaError),
}

/// Which kind of authority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorityKind {
    /// The X.509 CA.
    X509,
    /// The JWT signing key.
    Jwt,
}

impl AuthorityKind {
    fn name(self) -> &'static str {
        match self {
            Self::X509 => "X.509",
            Self::Jwt => "JWT",
        }
    }
}

impl CaManager {
    /// The active, prepared and old authorities of `kind`.
    pub fn authority_states(&self, kind: AuthorityKind) -> AuthorityStates {
        let (active, prepared) = self.slot_infos(kind);
        let old = self
            .bundle_authorities(kind)
            .into_iter()
            .filter(|info| {
                Some(&info.authority_id) != active.as_ref().map(|a| &a.authority_id)
                    && Some(&info.authority_id) != prepared.as_ref().map(|p| &p.authority_id)
            })
            .max_by_key(|info| info.expires_at);
        AuthorityStates {
            active,
            prepared,
            old,
        }
    }

    /// Prepares a new authority of `kind` in the slot the active one does not use (replacing
    /// any prepared one) and publishes it in the bundle.
    pub async fn prepare_authority(
        &self,
        kind: AuthorityKind,
        now: SystemTime,
    ) -> Result<AuthorityInfo, AuthorityError> {
        let _guard = self.write_lock.lock().await;
        match kind {
            AuthorityKind::X509 => {
                let slot = self
                    .read()
                    .x509_current
                    .as_ref()
                    .map_or(Slot::A, |c| c.slot.other());
                let prepared = self.prepare_x509(slot, now)?;
                self.write().x509_next = Some(prepared);
            }
            AuthorityKind::Jwt => {
                let slot = self
                    .read()
                    .jwt_current
                    .as_ref()
                    .map_or(Slot::A, |c| c.slot.other());
                let prepared = self.prepare_jwt(slot, now)?;
                self.write().jwt_next = Some(prepared);
            }
        }
        self.save_journal().await?;
        self.publish_bundle(now).await?;
        self.slot_infos(kind).1.ok_or_else(|| {
            CaError::FailedPrecondition("the prepared authority vanished".into()).into()
        })
    }

    /// Makes the prepared authority `authority_id` the active one; the previous active one
    /// stays in the bundle as old.
    pub async fn activate_authority(
        &self,
        kind: AuthorityKind,
        authority_id: &str,
        now: SystemTime,
    ) -> Result<AuthorityInfo, AuthorityError> {
        require_id(authority_id)?;
        let _guard = self.write_lock.lock().await;
        let (_, prepared) = self.slot_infos(kind);
        let Some(prepared) = prepared else {
            return Err(AuthorityError::FailedPrecondition(format!(
                "no prepared {} authority to activate",
                kind.name()
            )));
        };
        if prepared.authority_id != authority_id {
            return Err(AuthorityError::InvalidArgument(format!(
                "{authority_id:?} is not the prepared {} authority ({})",
                kind.name(),
                prepared.authority_id
            )));
        }
        {
            let mut state = self.write();
            match kind {
                AuthorityKind::X509 => {
                    if let Some(next) = state.x509_next.take() {
                        state.x509_retired = state.x509_current.replace(next);
                    }
                }
                AuthorityKind::Jwt => {
                    if let Some(next) = state.jwt_next.take() {
                        state.jwt_current = Some(next);
                    }
                }
            }
        }
        self.save_journal().await?;
        self.publish_bundle(now).await?;
        Ok(prepared)
    }

    /// Marks the old authority `authority_id` tainted in the bundle: agents replace every
    /// SVID it signed. The active and prepared authorities cannot be tainted.
    pub async fn taint_authority(
        &self,
        kind: AuthorityKind,
        authority_id: &str,
    ) -> Result<AuthorityInfo, AuthorityError> {
        let old = self.old_authority(kind, authority_id, "taint")?;
        if old.tainted {
            return Err(AuthorityError::FailedPrecondition(format!(
                "{} authority {authority_id:?} is already tainted",
                kind.name()
            )));
        }
        let target = self.bundle_key(kind, authority_id);
        self.edit_bundle(move |bundle| {
            match &target {
                BundleKey::X509(der) => bundle.taint_x509_authority(der),
                BundleKey::Jwt(key_id) => bundle.taint_jwt_authority(key_id),
            };
            Ok(())
        })
        .await?;
        Ok(AuthorityInfo {
            tainted: true,
            ..old
        })
    }

    /// Removes the tainted old authority `authority_id` from the bundle.
    pub async fn revoke_authority(
        &self,
        kind: AuthorityKind,
        authority_id: &str,
    ) -> Result<AuthorityInfo, AuthorityError> {
        let old = self.old_authority(kind, authority_id, "revoke")?;
        if !old.tainted {
            return Err(AuthorityError::FailedPrecondition(format!(
                "{} authority {authority_id:?} must be tainted before it is revoked",
                kind.name()
            )));
        }
        let target = self.bundle_key(kind, authority_id);
        self.edit_bundle(move |bundle| {
            match &target {
                BundleKey::X509(der) => bundle.remove_x509_authority(der),
                BundleKey::Jwt(key_id) => bundle.remove_jwt_authority(key_id),
            };
            Ok(())
        })
        .await?;
        Ok(old)
    }

    /// The bundle authority `authority_id` of `kind` if it is neither active nor prepared.
    fn old_authority(
        &self,
        kind: AuthorityKind,
        authority_id: &str,
        verb: &str,
    ) -> Result<AuthorityInfo, AuthorityError> {
        require_id(authority_id)?;
        let (active, prepared) = self.slot_infos(kind);
        for (which, info) in [("current", active), ("prepared", prepared)] {
            if info.is_some_and(|info| info.authority_id == authority_id) {
                return Err(AuthorityError::InvalidArgument(format!(
                    "unable to {verb} the {which} local {} authority",
                    kind.name()
                )));
            }
        }
        self.bundle_authorities(kind)
            .into_iter()
            .find(|info| info.authority_id == authority_id)
            .ok_or_else(|| {
                AuthorityError::InvalidArgument(format!(
                    "no {} authority {authority_id:?} in the bundle",
                    kind.name()
                ))
            })
    }

    fn slot_infos(&self, kind: AuthorityKind) -> (Option<AuthorityInfo>, Option<AuthorityInfo>) {
        // Read before taking the state lock: the bundle sits behind the same lock.
        let in_bundle = self.bundle_authorities(kind);
        let tainted = |id: &str| {
            in_bundle
                .iter()
                .any(|info| info.authority_id == id && info.tainted)
        };
        let state = self.read();
        match kind {
            AuthorityKind::X509 => {
                let info = |slot: &Option<std::sync::Arc<super::X509Slot>>| {
                    slot.as_ref().map(|slot| {
                        let authority_id = slot.ca.authority_id();
                        AuthorityInfo {
                            tainted: tainted(&authority_id),
                            authority_id,
                            expires_at: slot.ca.not_after(),
                        }
                    })
                };
                (info(&state.x509_current), info(&state.x509_next))
            }
            AuthorityKind::Jwt => {
                let info = |slot: &Option<std::sync::Arc<super::JwtKey>>| {
                    slot.as_ref().map(|key| AuthorityInfo {
                        tainted: tainted(&key.key_id),
                        authority_id: key.key_id.clone(),
                        expires_at: key.not_after,
                    })
                };
                (info(&state.jwt_current), info(&state.jwt_next))
            }
        }
    }

    /// Every authority of `kind` in the published bundle.
    fn bundle_authorities(&self, kind: AuthorityKind) -> Vec<AuthorityInfo> {
        let Some(bundle) = self.bundle() else {
            return Vec::new();
        };
        match kind {
            AuthorityKind::X509 => bundle
                .x509_authorities()
                .iter()
                .filter_map(|authority| {
                    let authority_id = x509::authority_id_of(authority.der()).ok()?;
                    let (_, expires_at) = x509::validity_of(authority.der()).ok()?;
                    Some(AuthorityInfo {
                        authority_id,
                        expires_at,
                        tainted: authority.is_tainted(),
                    })
                })
                .collect(),
            AuthorityKind::Jwt => bundle
                .jwt_authorities()
                .iter()
                .map(|authority| AuthorityInfo {
                    authority_id: authority.key_id().to_owned(),
                    expires_at: authority.expires_at().unwrap_or(SystemTime::UNIX_EPOCH),
                    tainted: authority.is_tainted(),
                })
                .collect(),
        }
    }

    /// How the bundle keys the authority `authority_id` of `kind`: X.509 authorities by their
    /// certificate (an ID not in the bundle matches nothing), JWT ones by key ID.
    fn bundle_key(&self, kind: AuthorityKind, authority_id: &str) -> BundleKey {
        match kind {
            AuthorityKind::X509 => BundleKey::X509(
                self.bundle()
                    .and_then(|bundle| {
                        bundle
                            .x509_authorities()
                            .iter()
                            .find(|a| {
                                x509::authority_id_of(a.der()).is_ok_and(|id| id == authority_id)
                            })
                            .map(|a| a.der().to_vec())
                    })
                    .unwrap_or_default(),
            ),
            AuthorityKind::Jwt => BundleKey::Jwt(authority_id.to_owned()),
        }
    }
}

/// An authority as the bundle stores it.
enum BundleKey {
    X509(Vec<u8>),
    Jwt(String),
}

fn require_id(authority_id: &str) -> Result<(), AuthorityError> {
    if authority_id.is_empty() {
        return Err(AuthorityError::InvalidArgument(
            "no authority ID provided".to_owned(),
        ));
    }
    Ok(())
}
