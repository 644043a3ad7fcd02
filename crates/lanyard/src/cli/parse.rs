//! Parsing of command-line values (SPIFFE IDs, selectors, durations, timestamps) into the
//! protobuf types the server API takes. Values are parsed here rather than by clap so that a
//! bad value is reported in the same one-line shape as every other error.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanyard_core::entry::{MAX_EXPIRES_AT_TEXT, MAX_EXPIRES_AT_UNIX};

use anyhow::{Context as _, anyhow, bail};
use clap::ValueEnum;
use lanyard_core::{Selector, SpiffeId, TrustDomain};
use lanyard_proto::spire::api::types::{self, federates_with_match, selector_match};

/// How a filter's set of selectors or trust domains is compared with each candidate's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub(crate) enum MatchMode {
    /// The candidate's set equals the given one.
    Exact,
    /// The candidate's set is within the given one.
    Subset,
    /// The candidate's set holds all of the given ones.
    #[default]
    Superset,
    /// The candidate's set shares at least one with the given one.
    Any,
}

impl MatchMode {
    pub(crate) fn selector_match(self) -> selector_match::MatchBehavior {
        match self {
            Self::Exact => selector_match::MatchBehavior::MatchExact,
            Self::Subset => selector_match::MatchBehavior::MatchSubset,
            Self::Superset => selector_match::MatchBehavior::MatchSuperset,
            Self::Any => selector_match::MatchBehavior::MatchAny,
        }
    }

    pub(crate) fn federates_with_match(self) -> federates_with_match::MatchBehavior {
        match self {
            Self::Exact => federates_with_match::MatchBehavior::MatchExact,
            Self::Subset => federates_with_match::MatchBehavior::MatchSubset,
            Self::Superset => federates_with_match::MatchBehavior::MatchSuperset,
            Self::Any => federates_with_match::MatchBehavior::MatchAny,
        }
    }
}

/// The value of `flag`, trimmed; an empty or blank value is refused.
pub(crate) fn non_empty(flag: &str, value: &str) -> anyhow::Result<String> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        anyhow::bail!("{flag} must not be empty");
    }
    Ok(trimmed.to_owned())
}

/// Parses a SPIFFE ID (`spiffe://example.org/workload`).
pub(crate) fn core_spiffe_id(value: &str) -> anyhow::Result<SpiffeId> {
    value
        .parse()
        .with_context(|| format!("{value:?} is not a valid SPIFFE ID"))
}

/// Parses a SPIFFE ID (`spiffe://example.org/workload`) into its protobuf form.
pub(crate) fn spiffe_id(value: &str) -> anyhow::Result<types::Spiffeid> {
    Ok(lanyard_proto::convert::spiffe_id_to_proto(&core_spiffe_id(
        value,
    )?))
}

/// The `spiffe://` text of a protobuf SPIFFE ID, as the server sent it.
pub(crate) fn spiffe_id_text(id: Option<&types::Spiffeid>) -> String {
    match id {
        Some(id) => format!("spiffe://{}{}", id.trust_domain, id.path),
        None => String::new(),
    }
}

/// Parses a `type:value` selector; the value may hold further colons.
pub(crate) fn selector(value: &str) -> anyhow::Result<types::Selector> {
    let selector: Selector = value
        .parse()
        .map_err(|err| anyhow!("invalid selector {value:?}: {err}"))?;
    Ok(types::Selector {
        r#type: selector.kind().to_owned(),
        value: selector.value().to_owned(),
    })
}

/// Parses every selector of a list.
pub(crate) fn selectors(values: &[String]) -> anyhow::Result<Vec<types::Selector>> {
    values.iter().map(|value| selector(value)).collect()
}

/// Checks a trust domain name (`example.org`, no scheme) and returns it as the server wants it.
/// A `spiffe://` prefix is tolerated, as SPIRE's CLI tolerates it.
pub(crate) fn trust_domain(value: &str) -> anyhow::Result<String> {
    let name = value.strip_prefix("spiffe://").unwrap_or(value);
    let trust_domain = TrustDomain::new(name)
        .map_err(|err| anyhow!("{value:?} is not a valid trust domain name: {err}"))?;
    Ok(trust_domain.name().to_owned())
}

/// Parses a duration: a bare integer is seconds (SPIRE's flags take seconds), anything else
/// is humantime (`90s`, `1h`, `1h 30m`).
pub(crate) fn duration(value: &str) -> anyhow::Result<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        let seconds: u64 = value
            .parse()
            .with_context(|| format!("duration {value:?} is too large"))?;
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(value).map_err(|err| {
        anyhow!("invalid duration {value:?}: {err} (use seconds or a unit, e.g. 90s, 1h)")
    })
}

/// Parses a duration into whole seconds as the API's `int32` TTL fields carry them.
pub(crate) fn ttl_seconds(value: &str) -> anyhow::Result<i32> {
    let duration = duration(value)?;
    if duration.subsec_nanos() != 0 {
        bail!("duration {value:?} is not a whole number of seconds");
    }
    i32::try_from(duration.as_secs()).map_err(|_| {
        anyhow!(
            "duration {value:?} is too long (at most {} seconds)",
            i32::MAX
        )
    })
}

/// Parses a point in time as Unix seconds: a bare integer is taken as Unix seconds, anything
/// else must be RFC 3339 (`2030-01-01T00:00:00Z`, offsets allowed).
pub(crate) fn unix_time(value: &str) -> anyhow::Result<i64> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return value
            .parse()
            .with_context(|| format!("time {value:?} is out of range"));
    }
    let parsed = time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
        .map_err(|err| anyhow!("invalid time {value:?}: {err} (use RFC 3339 or Unix seconds)"))?;
    Ok(parsed.unix_timestamp())
}

/// A point in time (see [`unix_time`]) in the layout SPIRE's `by_expires_before` filters take,
/// Go's `2006-01-02 15:04:05 -0700 -07`, in UTC. SPIRE's server ignores a value it cannot
/// parse in that layout, silently dropping the filter, so the CLI never passes one through.
pub(crate) fn spire_filter_time(value: &str) -> anyhow::Result<String> {
    let seconds =
        u64::try_from(unix_time(value)?).map_err(|_| anyhow!("time {value:?} is before 1970"))?;
    let time = UNIX_EPOCH
        .checked_add(Duration::from_secs(seconds))
        .filter(|_| seconds <= MAX_EXPIRES_AT_UNIX)
        .ok_or_else(|| anyhow!("time {value:?} is after {MAX_EXPIRES_AT_TEXT}"))?;
    // `2023-11-14T22:13:20Z` → `2023-11-14 22:13:20 +0000 +00`.
    let rfc3339 = humantime::format_rfc3339_seconds(time).to_string();
    let (date, clock) = rfc3339
        .trim_end_matches('Z')
        .split_once('T')
        .ok_or_else(|| anyhow!("time {value:?} is out of range"))?;
    Ok(format!("{date} {clock} +0000 +00"))
}

/// Formats Unix seconds as RFC 3339 UTC, or `never` for 0 (the API's "not set"). A time
/// RFC 3339 cannot write (before 1970 here, or past year 9999) is shown as Unix seconds: the
/// server may hold any i64, and printing one must never fail.
pub(crate) fn format_unix_time(seconds: i64) -> String {
    if seconds == 0 {
        return "never".to_owned();
    }
    match u64::try_from(seconds) {
        Ok(positive) if positive <= MAX_EXPIRES_AT_UNIX => {
            match UNIX_EPOCH.checked_add(Duration::from_secs(positive)) {
                Some(time) => humantime::format_rfc3339_seconds(time).to_string(),
                None => format!("{seconds} (Unix seconds)"),
            }
        }
        _ => format!("{seconds} (Unix seconds)"),
    }
}

/// Formats a point in time (a certificate's validity, say) as RFC 3339 UTC, or as Unix seconds
/// when RFC 3339 cannot write it (see [`format_unix_time`]). The epoch itself is
/// `1970-01-01T00:00:00Z`, not `never`.
pub(crate) fn format_system_time(time: SystemTime) -> String {
    match time.duration_since(UNIX_EPOCH) {
        Ok(since) if since.as_secs() == 0 => "1970-01-01T00:00:00Z".to_owned(),
        Ok(since) => format_unix_time(i64::try_from(since.as_secs()).unwrap_or(i64::MAX)),
        Err(before) => {
            let seconds = i64::try_from(before.duration().as_secs()).map_or(i64::MIN, |s| -s);
            format_unix_time(seconds)
        }
    }
}

/// Formats an API TTL in seconds for people: `1h 30m`, or `default` for 0.
pub(crate) fn format_ttl(seconds: i32) -> String {
    match u64::try_from(seconds) {
        Ok(0) => "default".to_owned(),
        Ok(positive) => humantime::format_duration(Duration::from_secs(positive)).to_string(),
        Err(_) => format!("{seconds}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_split_into_trust_domain_and_path() {
        let id = spiffe_id("spiffe://example.org/ns/prod/web").expect("valid");
        assert_eq!(id.trust_domain, "example.org");
        assert_eq!(id.path, "/ns/prod/web");
        assert_eq!(
            spiffe_id_text(Some(&id)),
            "spiffe://example.org/ns/prod/web"
        );
        let err = spiffe_id("http://example.org/x").expect_err("wrong scheme");
        assert_eq!(
            format!("{err:#}"),
            "\"http://example.org/x\" is not a valid SPIFFE ID: scheme is missing or invalid"
        );
    }

    #[test]
    fn selectors_split_at_the_first_colon() {
        let selector = selector("k8s:pod-label:app:web").expect("valid");
        assert_eq!(selector.r#type, "k8s");
        assert_eq!(selector.value, "pod-label:app:web");
        let err = super::selector("unix").expect_err("no colon");
        assert!(format!("{err:#}").starts_with("invalid selector \"unix\""));
        assert!(super::selector(":uid:0").is_err());
        assert!(super::selector("unix:").is_err());
    }

    #[test]
    fn durations_take_seconds_or_units() {
        assert_eq!(ttl_seconds("600").expect("seconds"), 600);
        assert_eq!(ttl_seconds("90s").expect("units"), 90);
        assert_eq!(ttl_seconds("1h 30m").expect("units"), 5400);
        assert_eq!(ttl_seconds("0").expect("zero"), 0);
        let err = ttl_seconds("ten minutes").expect_err("not a duration");
        assert!(format!("{err:#}").starts_with("invalid duration \"ten minutes\""));
        assert!(ttl_seconds("1500ms").is_err());
        assert!(ttl_seconds("100000000000").is_err());
        assert!(ttl_seconds("-5").is_err());
    }

    #[test]
    fn times_take_rfc3339_or_unix_seconds() {
        assert_eq!(unix_time("1700000000").expect("unix"), 1_700_000_000);
        assert_eq!(
            unix_time("2023-11-14T22:13:20Z").expect("rfc3339"),
            1_700_000_000
        );
        assert_eq!(
            unix_time("2023-11-15T00:13:20+02:00").expect("offset"),
            1_700_000_000
        );
        assert!(unix_time("tomorrow").is_err());
        assert_eq!(format_unix_time(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(format_unix_time(0), "never");
    }

    #[test]
    fn every_time_the_server_can_hold_formats_without_panicking() {
        // The last second RFC 3339 (and X.509) can write, and everything around it.
        assert_eq!(format_unix_time(253_402_300_799), "9999-12-31T23:59:59Z");
        assert_eq!(
            format_unix_time(253_402_300_800),
            "253402300800 (Unix seconds)"
        );
        assert_eq!(
            format_unix_time(i64::MAX),
            "9223372036854775807 (Unix seconds)"
        );
        assert_eq!(format_unix_time(1), "1970-01-01T00:00:01Z");
        assert_eq!(format_unix_time(-1), "-1 (Unix seconds)");
        assert_eq!(
            format_unix_time(i64::MIN),
            "-9223372036854775808 (Unix seconds)"
        );
        assert_eq!(format_unix_time(0), "never");

        let at = |seconds: u64| UNIX_EPOCH + Duration::from_secs(seconds);
        assert_eq!(format_system_time(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            format_system_time(at(1_700_000_000)),
            "2023-11-14T22:13:20Z"
        );
        assert_eq!(
            format_system_time(at(253_402_300_800)),
            "253402300800 (Unix seconds)"
        );
        assert_eq!(
            format_system_time(at(u64::try_from(i64::MAX).expect("fits"))),
            "9223372036854775807 (Unix seconds)"
        );
        assert_eq!(
            format_system_time(UNIX_EPOCH - Duration::from_secs(86_400)),
            "-86400 (Unix seconds)"
        );
    }

    #[test]
    fn expiry_filters_past_year_9999_are_refused() {
        for value in ["253402300800", "9223372036854775807"] {
            let err = spire_filter_time(value).expect_err("past year 9999");
            assert!(
                format!("{err:#}").contains("9999-12-31T23:59:59Z"),
                "{err:#}"
            );
        }
        assert!(spire_filter_time("99999999999999999999").is_err());
        assert_eq!(
            spire_filter_time("253402300799").expect("the last second"),
            "9999-12-31 23:59:59 +0000 +00"
        );
    }

    #[test]
    fn expiry_filters_use_spires_layout() {
        assert_eq!(
            spire_filter_time("1700000000").expect("unix"),
            "2023-11-14 22:13:20 +0000 +00"
        );
        assert_eq!(
            spire_filter_time("2023-11-15T00:13:20+02:00").expect("offset"),
            "2023-11-14 22:13:20 +0000 +00"
        );
        assert!(spire_filter_time("2030-01-02 15:04:05 -0700 -07").is_err());
    }

    #[test]
    fn trust_domains_are_checked() {
        assert_eq!(trust_domain("example.org").expect("valid"), "example.org");
        assert_eq!(
            trust_domain("spiffe://example.org").expect("prefix tolerated"),
            "example.org"
        );
        assert!(trust_domain("Example.org").is_err());
    }

    #[test]
    fn ttls_format_for_people() {
        assert_eq!(format_ttl(0), "default");
        assert_eq!(format_ttl(3600), "1h");
        assert_eq!(format_ttl(90), "1m 30s");
    }
}
