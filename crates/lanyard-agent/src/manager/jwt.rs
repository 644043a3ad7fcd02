//! JWT-SVIDs for the Workload API: minted by the server (`NewJWTSVID`) and cached per
//! (SPIFFE ID, audience set), as SPIRE's agent does.
//!
//! A cached token is reused until its jittered half-life; after that a new one is minted,
//! and if the server cannot be reached the cached token is still returned while it has not
//! expired. Tokens signed by a key that the bundle no longer holds, or marks tainted, are
//! not reused. The cache holds at most `jwt_svid_cache_size` tokens; when full, expired
//! tokens go first, then the least recently used.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanyard_core::jwt::{self, JwtSvid};
use lanyard_core::rotation::{Jitter, renewal_time};
use lanyard_core::{SpiffeId, TrustBundle};
use lanyard_proto::convert::spiffe_id_from_proto;
use lanyard_proto::spire::api::types;
use tokio::sync::watch;
use tonic::Code;

use super::Clock;
use super::client::{self, ClientError, ServerClient};
use crate::cache::{CachedEntry, JwtMintError, JwtMinter, Snapshot};

/// The cache key: the subject and the sorted, deduplicated audiences.
type CacheKey = (SpiffeId, Vec<String>);

struct CachedToken {
    svid: JwtSvid,
    renew_at: SystemTime,
    last_used: u64,
}

struct TokenCache {
    capacity: usize,
    tokens: HashMap<CacheKey, CachedToken>,
    uses: u64,
}

impl TokenCache {
    fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            tokens: HashMap::new(),
            uses: 0,
        }
    }

    /// The token for `key` if it is unexpired and, with `fresh`, not yet due for renewal and
    /// signed by a key the bundle still trusts untainted.
    fn get(
        &mut self,
        key: &CacheKey,
        now: SystemTime,
        bundle: &TrustBundle,
        fresh: bool,
    ) -> Option<JwtSvid> {
        self.uses += 1;
        let uses = self.uses;
        let token = self.tokens.get_mut(key)?;
        if token.svid.expires_at <= now {
            return None;
        }
        if fresh {
            let trusted = bundle
                .jwt_authority(&token.svid.key_id)
                .is_some_and(|authority| !authority.is_tainted());
            if !trusted || now >= token.renew_at {
                return None;
            }
        }
        token.last_used = uses;
        Some(token.svid.clone())
    }

    fn insert(&mut self, key: CacheKey, svid: JwtSvid, now: SystemTime) {
        self.uses += 1;
        if !self.tokens.contains_key(&key) && self.tokens.len() >= self.capacity {
            self.tokens.retain(|_, token| token.svid.expires_at > now);
            if self.tokens.len() >= self.capacity
                && let Some(oldest) = self
                    .tokens
                    .iter()
                    .min_by_key(|(_, token)| token.last_used)
                    .map(|(key, _)| key.clone())
            {
                self.tokens.remove(&oldest);
            }
        }
        let renew_at = renewal_time(svid.issued_at, svid.expires_at, Jitter::random());
        self.tokens.insert(
            key,
            CachedToken {
                svid,
                renew_at,
                last_used: self.uses,
            },
        );
    }
}

/// The manager's [`JwtMinter`].
pub(crate) struct ManagerJwtMinter {
    client: Arc<ServerClient>,
    clock: Clock,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    cache: Mutex<TokenCache>,
}

impl fmt::Debug for ManagerJwtMinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManagerJwtMinter").finish_non_exhaustive()
    }
}

impl ManagerJwtMinter {
    pub(crate) fn new(
        client: Arc<ServerClient>,
        clock: Clock,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        capacity: usize,
    ) -> Self {
        Self {
            client,
            clock,
            snapshots,
            cache: Mutex::new(TokenCache::new(capacity)),
        }
    }

    /// How many tokens the cache holds, expired ones included until they are evicted.
    pub(crate) fn cached_tokens(&self) -> usize {
        self.cache().tokens.len()
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, TokenCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn mint(
        &self,
        entry: &CachedEntry,
        audiences: &[String],
        bundle: &TrustBundle,
    ) -> Result<JwtSvid, JwtMintError> {
        let channel = self.client.channel().map_err(mint_error(entry))?;
        let result = client::with_deadline(
            "NewJWTSVID",
            client::new_jwt_svid(channel, entry.id.as_str(), audiences),
        )
        .await;
        let response = match result {
            Ok(response) => response,
            Err(e) => {
                self.client.reset();
                return Err(mint_error(entry)(e));
            }
        };
        svid_from_response(&response, entry, audiences, bundle, (self.clock)())
            .map_err(|reason| JwtMintError::Server(format!("NewJWTSVID: {reason}")))
    }
}

#[tonic::async_trait]
impl JwtMinter for ManagerJwtMinter {
    async fn jwt_svid(
        &self,
        entry: &CachedEntry,
        audiences: &[String],
    ) -> Result<JwtSvid, JwtMintError> {
        if audiences.is_empty() || audiences.iter().any(String::is_empty) {
            return Err(JwtMintError::Server(
                "at least one non-empty audience is required".into(),
            ));
        }
        let mut sorted = audiences.to_vec();
        sorted.sort();
        sorted.dedup();
        let key = (entry.spiffe_id.clone(), sorted);
        let (bundle, revoked) = {
            let snapshot = self.snapshots.borrow();
            (
                Arc::clone(&snapshot.bundle),
                Arc::clone(&snapshot.revoked_jtis),
            )
        };
        let now = (self.clock)();
        let is_revoked = |svid: &JwtSvid| revoked.get(&svid.jti).is_some_and(|until| *until > now);
        if let Some(svid) = self.cache().get(&key, now, &bundle, true)
            && !is_revoked(&svid)
        {
            return Ok(svid);
        }
        match self.mint(entry, audiences, &bundle).await {
            Ok(svid) => {
                self.cache().insert(key, svid.clone(), (self.clock)());
                Ok(svid)
            }
            Err(error) => {
                let fallback = self
                    .cache()
                    .get(&key, (self.clock)(), &bundle, false)
                    .filter(|svid| !is_revoked(svid));
                match fallback {
                    Some(svid) => {
                        tracing::warn!(
                            entry_id = %entry.id,
                            %error,
                            "could not renew a JWT-SVID; returning the cached one"
                        );
                        Ok(svid)
                    }
                    None => Err(error),
                }
            }
        }
    }
}

fn mint_error(entry: &CachedEntry) -> impl Fn(ClientError) -> JwtMintError + '_ {
    move |error| match error.code() {
        Some(Code::NotFound) => JwtMintError::NotAuthorized(entry.id.clone()),
        Some(Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown)
        | None => JwtMintError::Unavailable(error.to_string()),
        Some(_) => JwtMintError::Server(error.to_string()),
    }
}

/// Checks a `NewJWTSVID` answer: the subject must be the entry's, and the token must verify
/// against the trust domain's bundle (which also yields its key ID and claims).
fn svid_from_response(
    response: &types::Jwtsvid,
    entry: &CachedEntry,
    audiences: &[String],
    bundle: &TrustBundle,
    now: SystemTime,
) -> Result<JwtSvid, String> {
    if let Some(id) = response.id.as_ref() {
        let id = spiffe_id_from_proto(id).map_err(|e| e.to_string())?;
        if id != entry.spiffe_id {
            return Err(format!("asked for {}, got {id}", entry.spiffe_id));
        }
    }
    let audience = audiences.first().map_or("", String::as_str);
    let validated = jwt::validate_jwt_svid_with_bundle(&response.token, audience, bundle, now)
        .map_err(|e| format!("the token does not verify against the bundle: {e}"))?;
    if validated.spiffe_id != entry.spiffe_id {
        return Err(format!(
            "the token is for {}, not {}",
            validated.spiffe_id, entry.spiffe_id
        ));
    }
    let seconds = |secs: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    let jti = validated
        .claims
        .get("jti")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    jwt_svid(
        response.token.clone(),
        validated.spiffe_id,
        validated.audiences,
        seconds(response.expires_at),
        seconds(response.issued_at),
        jti,
        validated.key_id,
    )
}

/// A `JwtSvid` for a token the server minted, described by the fields read from it.
fn jwt_svid(
    token: String,
    spiffe_id: SpiffeId,
    audiences: Vec<String>,
    expires_at: SystemTime,
    issued_at: SystemTime,
    jti: String,
    key_id: String,
) -> Result<JwtSvid, String> {
    Ok(JwtSvid::from_parts(
        token, spiffe_id, audiences, expires_at, issued_at, jti, key_id,
    ))
}

#[cfg(test)]
mod tests {
    use lanyard_core::TrustDomain;
    use lanyard_core::bundle::JwtAuthority;

    use super::*;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn svid(sub: &str, kid: &str, issued: u64, expires: u64) -> JwtSvid {
        jwt_svid(
            format!("token-{sub}-{issued}"),
            sub.parse().unwrap(),
            vec!["a".into()],
            t(expires),
            t(issued),
            "jti".into(),
            kid.into(),
        )
        .unwrap()
    }

    fn bundle_with(kid: &str, tainted: bool) -> TrustBundle {
        let key =
            lanyard_core::keys::KeyPair::generate(lanyard_core::keys::KeyType::EcP256).unwrap();
        let mut bundle = TrustBundle::new(TrustDomain::new("example.org").unwrap());
        bundle
            .add_jwt_authority(
                JwtAuthority::new(kid.to_owned(), &key.public_key_der(), None)
                    .unwrap()
                    .with_tainted(tainted),
            )
            .unwrap();
        bundle
    }

    fn key(sub: &str) -> CacheKey {
        (sub.parse().unwrap(), vec!["a".into()])
    }

    #[test]
    fn tokens_are_reused_until_half_life_and_returned_until_expiry() {
        let bundle = bundle_with("k1", false);
        let mut cache = TokenCache::new(10);
        cache.insert(
            key("spiffe://example.org/w"),
            svid("spiffe://example.org/w", "k1", 1000, 1100),
            t(1000),
        );
        let k = key("spiffe://example.org/w");
        assert!(cache.get(&k, t(1010), &bundle, true).is_some());
        // Past the jittered half-life (at most 55 s in) it is no longer fresh …
        assert!(cache.get(&k, t(1056), &bundle, true).is_none());
        // … but still usable as a fallback until it expires.
        assert!(cache.get(&k, t(1099), &bundle, false).is_some());
        assert!(cache.get(&k, t(1100), &bundle, false).is_none());
    }

    #[test]
    fn tokens_of_unknown_or_tainted_keys_are_not_reused() {
        let mut cache = TokenCache::new(10);
        let k = key("spiffe://example.org/w");
        cache.insert(
            k.clone(),
            svid("spiffe://example.org/w", "k1", 1000, 1100),
            t(1000),
        );
        assert!(
            cache
                .get(&k, t(1001), &bundle_with("k2", false), true)
                .is_none()
        );
        assert!(
            cache
                .get(&k, t(1001), &bundle_with("k1", true), true)
                .is_none()
        );
        assert!(
            cache
                .get(&k, t(1001), &bundle_with("k1", false), true)
                .is_some()
        );
    }

    #[test]
    fn the_cache_is_bounded_expired_first_then_least_recently_used() {
        let bundle = bundle_with("k", false);
        let mut cache = TokenCache::new(2);
        cache.insert(
            key("spiffe://example.org/expired"),
            svid("spiffe://example.org/expired", "k", 0, 10),
            t(0),
        );
        cache.insert(
            key("spiffe://example.org/old"),
            svid("spiffe://example.org/old", "k", 100, 1000),
            t(100),
        );
        cache.insert(
            key("spiffe://example.org/new"),
            svid("spiffe://example.org/new", "k", 100, 1000),
            t(100),
        );
        assert_eq!(cache.tokens.len(), 2);
        assert!(
            !cache
                .tokens
                .contains_key(&key("spiffe://example.org/expired"))
        );
        // Using "old" makes "new" the least recently used.
        assert!(
            cache
                .get(&key("spiffe://example.org/old"), t(101), &bundle, true)
                .is_some()
        );
        cache.insert(
            key("spiffe://example.org/third"),
            svid("spiffe://example.org/third", "k", 100, 1000),
            t(101),
        );
        assert_eq!(cache.tokens.len(), 2);
        assert!(cache.tokens.contains_key(&key("spiffe://example.org/old")));
        assert!(!cache.tokens.contains_key(&key("spiffe://example.org/new")));
    }

    #[test]
    fn built_svids_carry_every_part() {
        let built = svid("spiffe://example.org/w", "kid-1", 5, 10);
        assert_eq!(built.token, "token-spiffe://example.org/w-5");
        assert_eq!(built.spiffe_id.as_str(), "spiffe://example.org/w");
        assert_eq!(built.key_id, "kid-1");
        assert_eq!(built.issued_at, t(5));
        assert_eq!(built.expires_at, t(10));
        assert_eq!(built.audiences, ["a"]);
        assert_eq!(built.jti, "jti");
    }
}
