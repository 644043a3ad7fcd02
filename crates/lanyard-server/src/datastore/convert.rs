//! Conversions shared by the stores: times as whole unix seconds, and the stored form of
//! entries, agents, bundles and federation relationships, so that every store hands back
//! exactly the same values.

use std::time::{Duration, SystemTime};

use lanyard_core::bundle::{JwtAuthority, TrustBundle, X509Authority};
use lanyard_core::federation::FederationRelationship;
use lanyard_core::policy::Exception;
use lanyard_core::{RegistrationEntry, TrustDomain};

use super::{AttestedAgent, DatastoreError, Result};

/// `time` as unix seconds, rounded down (towards the past, also before 1970).
pub(crate) fn unix_seconds(time: SystemTime) -> Result<i64> {
    let out_of_range = || DatastoreError::Invalid(format!("time {time:?}: out of range"));
    match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).map_err(|_| out_of_range()),
        Err(before) => {
            let before = before.duration();
            let whole = i64::try_from(before.as_secs()).map_err(|_| out_of_range())?;
            let floor = if before.subsec_nanos() > 0 {
                whole.checked_add(1).ok_or_else(out_of_range)?
            } else {
                whole
            };
            Ok(-floor)
        }
    }
}

/// The instant `seconds` after (or, if negative, before) the unix epoch.
pub(crate) fn from_unix_seconds(seconds: i64) -> Result<SystemTime> {
    let magnitude = Duration::from_secs(seconds.unsigned_abs());
    let time = if seconds >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(magnitude)
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(magnitude)
    };
    time.ok_or_else(|| DatastoreError::Backend(format!("stored time {seconds}: out of range")))
}

/// `time` truncated to the second, as a store gives it back.
pub(crate) fn whole_second(time: SystemTime) -> Result<SystemTime> {
    from_unix_seconds(unix_seconds(time)?)
}

/// A duration as whole seconds for storage.
pub(crate) fn duration_seconds(duration: Duration) -> Result<i64> {
    i64::try_from(duration.as_secs())
        .map_err(|_| DatastoreError::Invalid(format!("duration {duration:?}: out of range")))
}

/// A stored number of seconds as a duration.
pub(crate) fn seconds_duration(seconds: i64) -> Result<Duration> {
    u64::try_from(seconds)
        .map(Duration::from_secs)
        .map_err(|_| DatastoreError::Backend(format!("stored duration {seconds}s is negative")))
}

/// The entry as a store gives it back: times and TTLs truncated to whole seconds.
pub(crate) fn normalize_entry(mut entry: RegistrationEntry) -> Result<RegistrationEntry> {
    entry.created_at = whole_second(entry.created_at)?;
    entry.expires_at = entry.expires_at.map(whole_second).transpose()?;
    entry.x509_svid_ttl = entry
        .x509_svid_ttl
        .map(|ttl| duration_seconds(ttl).and_then(seconds_duration))
        .transpose()?;
    entry.jwt_svid_ttl = entry
        .jwt_svid_ttl
        .map(|ttl| duration_seconds(ttl).and_then(seconds_duration))
        .transpose()?;
    Ok(entry)
}

/// The exception as a store gives it back: times truncated to whole seconds; an empty ID is
/// refused.
pub(crate) fn normalize_exception(mut exception: Exception) -> Result<Exception> {
    if exception.id.is_empty() {
        return Err(DatastoreError::Invalid("exception: empty ID".to_owned()));
    }
    exception.expires_at = whole_second(exception.expires_at)?;
    exception.created_at = whole_second(exception.created_at)?;
    exception.revoked_at = exception.revoked_at.map(whole_second).transpose()?;
    Ok(exception)
}

/// The revocation as a store keeps it: checked, times truncated to whole seconds.
pub(crate) fn normalize_revocation(
    mut revocation: lanyard_core::revocation::Revocation,
) -> Result<lanyard_core::revocation::Revocation> {
    if revocation.id.is_empty() {
        return Err(DatastoreError::Invalid("revocation: empty ID".to_owned()));
    }
    revocation.created_at = whole_second(revocation.created_at)?;
    revocation.expires_at = whole_second(revocation.expires_at)?;
    revocation
        .validate()
        .map_err(|e| DatastoreError::Invalid(format!("revocation: {e}")))?;
    Ok(revocation)
}

/// Revoked serials as a store keeps them: serials checked and without leading zeros, times
/// truncated to whole seconds.
pub(crate) fn normalize_revoked_serials(
    serials: &[lanyard_core::revocation::RevokedSerial],
) -> Result<Vec<lanyard_core::revocation::RevokedSerial>> {
    serials
        .iter()
        .map(|s| {
            Ok(lanyard_core::revocation::RevokedSerial {
                serial: lanyard_core::revocation::normalize_serial(&s.serial)
                    .map_err(|e| DatastoreError::Invalid(e.to_string()))?,
                authority_id: s.authority_id.clone(),
                revoked_at: whole_second(s.revoked_at)?,
            })
        })
        .collect()
}

/// A published CRL as a store keeps it: `next_update` in whole seconds, the number within a
/// signed 64-bit column.
pub(crate) fn normalize_published_crl(crl: &super::PublishedCrl) -> Result<super::PublishedCrl> {
    if i64::try_from(crl.number).is_err() {
        return Err(DatastoreError::Invalid(format!(
            "CRL number {} is out of range",
            crl.number
        )));
    }
    if crl.authority_id.is_empty() {
        return Err(DatastoreError::Invalid(
            "a published CRL needs its authority ID".to_owned(),
        ));
    }
    Ok(super::PublishedCrl {
        next_update: whole_second(crl.next_update)?,
        ..crl.clone()
    })
}

/// The agent as a store gives it back: times truncated to whole seconds.
pub(crate) fn normalize_agent(mut agent: AttestedAgent) -> Result<AttestedAgent> {
    agent.not_after = whole_second(agent.not_after)?;
    agent.new_not_after = agent.new_not_after.map(whole_second).transpose()?;
    agent.created_at = whole_second(agent.created_at)?;
    agent.updated_at = whole_second(agent.updated_at)?;
    Ok(agent)
}

/// The stored form of an X.509 authority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct X509AuthorityRecord {
    pub(crate) der: Vec<u8>,
    pub(crate) tainted: bool,
}

/// The stored form of a JWT authority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JwtAuthorityRecord {
    pub(crate) key_id: String,
    pub(crate) public_key_der: Vec<u8>,
    pub(crate) expires_at: Option<i64>,
    pub(crate) tainted: bool,
}

/// The stored form of a bundle. Unlike the JWKS it keeps taint flags and JWT key expiries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BundleRecord {
    pub(crate) trust_domain: String,
    /// The u64 sequence number, bit for bit (SQL integers are signed).
    pub(crate) sequence_number: i64,
    pub(crate) refresh_hint: Option<i64>,
    pub(crate) x509_authorities: Vec<X509AuthorityRecord>,
    pub(crate) jwt_authorities: Vec<JwtAuthorityRecord>,
}

impl BundleRecord {
    pub(crate) fn from_bundle(bundle: &TrustBundle) -> Result<Self> {
        Ok(Self {
            trust_domain: bundle.trust_domain().name().to_owned(),
            sequence_number: bundle.sequence_number().cast_signed(),
            refresh_hint: bundle.refresh_hint().map(duration_seconds).transpose()?,
            x509_authorities: bundle
                .x509_authorities()
                .iter()
                .map(|a| X509AuthorityRecord {
                    der: a.der().to_vec(),
                    tainted: a.is_tainted(),
                })
                .collect(),
            jwt_authorities: bundle
                .jwt_authorities()
                .iter()
                .map(|a| {
                    Ok(JwtAuthorityRecord {
                        key_id: a.key_id().to_owned(),
                        public_key_der: a.public_key_der().to_vec(),
                        expires_at: a.expires_at().map(unix_seconds).transpose()?,
                        tainted: a.is_tainted(),
                    })
                })
                .collect::<Result<_>>()?,
        })
    }

    pub(crate) fn into_bundle(self) -> Result<TrustBundle> {
        let corrupt = |what: &str, e: &dyn std::fmt::Display| {
            DatastoreError::Backend(format!(
                "stored bundle of {:?} has an invalid {what}: {e}",
                self.trust_domain
            ))
        };
        let trust_domain =
            TrustDomain::new(&self.trust_domain).map_err(|e| corrupt("trust domain", &e))?;
        let mut bundle = TrustBundle::new(trust_domain);
        for authority in &self.x509_authorities {
            let x509 = X509Authority::new(authority.der.clone())
                .map_err(|e| corrupt("X.509 authority", &e))?
                .with_tainted(authority.tainted);
            bundle.add_x509_authority(x509);
        }
        for authority in &self.jwt_authorities {
            let expires_at = authority.expires_at.map(from_unix_seconds).transpose()?;
            let jwt = JwtAuthority::new(
                authority.key_id.clone(),
                &authority.public_key_der,
                expires_at,
            )
            .map_err(|e| corrupt("JWT authority", &e))?
            .with_tainted(authority.tainted);
            bundle
                .add_jwt_authority(jwt)
                .map_err(|e| corrupt("JWT authority", &e))?;
        }
        bundle.set_refresh_hint(self.refresh_hint.map(seconds_duration).transpose()?);
        // Adding authorities bumped the sequence number; restore the stored one last.
        bundle.set_sequence_number(self.sequence_number.cast_unsigned());
        Ok(bundle)
    }
}

/// Checks a bundle before storing it, so that a bad one fails the write rather than later
/// reads. Authorities were validated when built; this only needs the round trip to work.
pub(crate) fn checked_bundle(bundle: &TrustBundle) -> Result<(BundleRecord, TrustBundle)> {
    let record = BundleRecord::from_bundle(bundle)?;
    let normalized = record.clone().into_bundle().map_err(|e| match e {
        DatastoreError::Backend(message) => DatastoreError::Invalid(message),
        other => other,
    })?;
    Ok((record, normalized))
}

/// `relationship` carrying its trust domain's `bundle` as stored (none if there is none).
pub(crate) fn with_stored_bundle(
    relationship: FederationRelationship,
    bundle: Option<TrustBundle>,
) -> Result<FederationRelationship> {
    let relationship = relationship.without_trust_domain_bundle();
    match bundle {
        None => Ok(relationship),
        Some(bundle) => relationship
            .with_trust_domain_bundle(bundle)
            .map_err(|e| DatastoreError::Backend(format!("stored bundle: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_seconds_round_down_on_both_sides_of_the_epoch() {
        let epoch = SystemTime::UNIX_EPOCH;
        assert_eq!(unix_seconds(epoch).unwrap(), 0);
        assert_eq!(
            unix_seconds(epoch + Duration::from_millis(1500)).unwrap(),
            1
        );
        assert_eq!(
            unix_seconds(epoch - Duration::from_millis(500)).unwrap(),
            -1
        );
        assert_eq!(unix_seconds(epoch - Duration::from_secs(2)).unwrap(), -2);
        for seconds in [-5, 0, 7, 1_700_000_000] {
            assert_eq!(
                unix_seconds(from_unix_seconds(seconds).unwrap()).unwrap(),
                seconds
            );
        }
        assert_eq!(
            whole_second(epoch + Duration::from_millis(2999)).unwrap(),
            epoch + Duration::from_secs(2)
        );
    }
}
