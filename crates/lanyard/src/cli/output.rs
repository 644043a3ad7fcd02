//! How results are printed: `pretty` text for people (SPIRE's layout of aligned `Label : value`
//! lines) or `json` for scripts.
//!
//! The JSON mirrors the protobuf messages with their proto field names, as SPIRE's
//! `-output json` does (`spiffe_id` is `{"trust_domain", "path"}`, selectors are
//! `{"type", "value"}`), with two differences: 64-bit integers are JSON numbers rather than
//! strings, and entries carry Lanyard's `owner`, `reason` and `ticket` when they have any. An
//! `entry show --output json` document is accepted as-is by `entry create --data`.

use std::io::Write;

use base64::Engine as _;
use clap::{Args, ValueEnum};
use lanyard_core::RegistrationEntry;
use lanyard_core::TrustBundle;
use lanyard_core::agent::AttestedAgent;
use lanyard_proto::convert::{entry_metadata_to_proto, entry_to_proto, spiffe_id_to_proto};
use lanyard_proto::lanyard::api::v1::EntryMetadata;
use lanyard_proto::spire::api::types;
use serde_json::{Map, Value, json};

use crate::cli::parse::{format_ttl, format_unix_time, spiffe_id_text};

/// The output format of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub(crate) enum OutputFormat {
    /// Text for people.
    #[default]
    Pretty,
    /// One JSON document.
    Json,
}

/// The `--output` option.
#[derive(Debug, Clone, Copy, Args)]
pub(crate) struct OutputArgs {
    /// Output format.
    #[arg(long = "output", value_name = "FORMAT", value_enum, default_value_t)]
    pub(crate) output: OutputFormat,
}

impl OutputArgs {
    pub(crate) fn is_json(self) -> bool {
        self.output == OutputFormat::Json
    }
}

/// Writes a JSON document, indented, with a final newline.
pub(crate) fn write_json(out: &mut dyn Write, value: &Value) -> anyhow::Result<()> {
    // Standard output is line-buffered: unbuffered, a listing of 100,000 entries would take
    // a write(2) per line of pretty JSON.
    let mut buffered = std::io::BufWriter::new(out);
    serde_json::to_writer_pretty(&mut buffered, value)?;
    writeln!(buffered)?;
    buffered.flush()?;
    Ok(())
}

/// Writes one aligned `Label : value` line.
pub(crate) fn write_field(out: &mut dyn Write, label: &str, value: &str) -> anyhow::Result<()> {
    writeln!(out, "{label:<17}: {value}")?;
    Ok(())
}

/// `n thing` or `n things`.
pub(crate) fn count_noun(n: usize, singular: &str, plural: &str) -> String {
    if n == 1 {
        format!("{n} {singular}")
    } else {
        format!("{n} {plural}")
    }
}

pub(crate) fn spiffe_id_json(id: Option<&types::Spiffeid>) -> Value {
    match id {
        Some(id) => json!({ "trust_domain": id.trust_domain, "path": id.path }),
        None => Value::Null,
    }
}

pub(crate) fn selectors_json(selectors: &[types::Selector]) -> Value {
    selectors
        .iter()
        .map(|s| json!({ "type": s.r#type, "value": s.value }))
        .collect()
}

/// A per-item batch status as JSON; an absent status is OK.
pub(crate) fn status_json(status: Option<&types::Status>) -> Value {
    match status {
        Some(status) => json!({ "code": status.code, "message": status.message }),
        None => json!({ "code": 0, "message": "OK" }),
    }
}

/// `(code: AlreadyExists, msg: "…")`, SPIRE's wording for a failed batch item.
pub(crate) fn status_text(status: Option<&types::Status>) -> String {
    let (code, message) = match status {
        Some(status) => (tonic::Code::from_i32(status.code), status.message.as_str()),
        None => (tonic::Code::Ok, ""),
    };
    format!("(code: {code:?}, msg: {message:?})")
}

/// A stored entry as JSON, with its governance fields: what [`entry_json`] prints of the
/// entry's wire encoding and its metadata.
pub(crate) fn stored_entry_json(entry: &RegistrationEntry) -> Value {
    entry_json(
        &entry_to_proto(entry, None),
        Some(&entry_metadata_to_proto(entry)),
    )
}

/// An entry as JSON, with its governance metadata when it has any.
pub(crate) fn entry_json(entry: &types::Entry, metadata: Option<&EntryMetadata>) -> Value {
    let mut object = Map::new();
    object.insert("id".into(), json!(entry.id));
    object.insert("spiffe_id".into(), spiffe_id_json(entry.spiffe_id.as_ref()));
    object.insert("parent_id".into(), spiffe_id_json(entry.parent_id.as_ref()));
    object.insert("selectors".into(), selectors_json(&entry.selectors));
    object.insert("x509_svid_ttl".into(), json!(entry.x509_svid_ttl));
    object.insert("jwt_svid_ttl".into(), json!(entry.jwt_svid_ttl));
    object.insert("federates_with".into(), json!(entry.federates_with));
    object.insert("admin".into(), json!(entry.admin));
    object.insert("downstream".into(), json!(entry.downstream));
    object.insert("expires_at".into(), json!(entry.expires_at));
    object.insert("dns_names".into(), json!(entry.dns_names));
    object.insert("revision_number".into(), json!(entry.revision_number));
    object.insert("store_svid".into(), json!(entry.store_svid));
    object.insert("hint".into(), json!(entry.hint));
    object.insert("created_at".into(), json!(entry.created_at));
    if let Some(metadata) = metadata {
        object.insert("owner".into(), json!(metadata.owner));
        object.insert("reason".into(), json!(metadata.reason));
        object.insert("ticket".into(), json!(metadata.ticket));
        object.insert("source".into(), json!(metadata.source));
    }
    Value::Object(object)
}

/// An entry as aligned text lines, SPIRE's layout plus Lanyard's governance fields. Fields
/// left at their zero value are left out, except the TTLs, which print as `default`.
pub(crate) fn write_entry_pretty(
    out: &mut dyn Write,
    entry: &types::Entry,
    metadata: Option<&EntryMetadata>,
) -> anyhow::Result<()> {
    write_field(out, "Entry ID", or_none(&entry.id))?;
    write_field(out, "SPIFFE ID", &spiffe_id_text(entry.spiffe_id.as_ref()))?;
    write_field(out, "Parent ID", &spiffe_id_text(entry.parent_id.as_ref()))?;
    write_field(out, "Revision", &entry.revision_number.to_string())?;
    if entry.downstream {
        write_field(out, "Downstream", "true")?;
    }
    write_field(out, "X509-SVID TTL", &format_ttl(entry.x509_svid_ttl))?;
    write_field(out, "JWT-SVID TTL", &format_ttl(entry.jwt_svid_ttl))?;
    if entry.expires_at != 0 {
        write_field(out, "Expiration time", &format_unix_time(entry.expires_at))?;
    }
    for selector in &entry.selectors {
        write_field(
            out,
            "Selector",
            &format!("{}:{}", selector.r#type, selector.value),
        )?;
    }
    for trust_domain in &entry.federates_with {
        write_field(out, "FederatesWith", trust_domain)?;
    }
    for dns_name in &entry.dns_names {
        write_field(out, "DNS name", dns_name)?;
    }
    if entry.admin {
        write_field(out, "Admin", "true")?;
    }
    if entry.store_svid {
        write_field(out, "StoreSvid", "true")?;
    }
    if !entry.hint.is_empty() {
        write_field(out, "Hint", &entry.hint)?;
    }
    if entry.created_at != 0 {
        write_field(out, "Created at", &format_unix_time(entry.created_at))?;
    }
    if let Some(metadata) = metadata {
        if !metadata.owner.is_empty() {
            write_field(out, "Owner", &metadata.owner)?;
        }
        if !metadata.reason.is_empty() {
            write_field(out, "Reason", &metadata.reason)?;
        }
        if !metadata.ticket.is_empty() {
            write_field(out, "Ticket", &metadata.ticket)?;
        }
        if !metadata.source.is_empty() {
            write_field(out, "Source", &metadata.source)?;
        }
    }
    Ok(())
}

/// An agent as JSON, in the field names of SPIRE's `Agent` message.
pub(crate) fn agent_json(agent: &AttestedAgent) -> Value {
    json!({
        "id": spiffe_id_json(Some(&spiffe_id_to_proto(&agent.spiffe_id))),
        "attestation_type": agent.attestation_type,
        "x509svid_serial_number": agent.serial,
        "x509svid_expires_at": unix_time(agent.not_after),
        "selectors": agent.selectors.iter().map(|s| json!({"type": s.kind(), "value": s.value()})).collect::<Vec<_>>(),
        "banned": agent.is_banned(),
        "can_reattest": agent.can_reattest,
    })
}

/// An agent as aligned text lines; selectors only with `with_selectors` (SPIRE lists them in
/// `agent show`, not in `agent list`).
pub(crate) fn write_agent_pretty(
    out: &mut dyn Write,
    agent: &AttestedAgent,
    with_selectors: bool,
) -> anyhow::Result<()> {
    write_field(out, "SPIFFE ID", agent.spiffe_id.as_ref())?;
    write_field(out, "Attestation type", or_none(&agent.attestation_type))?;
    write_field(
        out,
        "Expiration time",
        &format_unix_time(unix_time(agent.not_after)),
    )?;
    write_field(out, "Serial number", or_none(&agent.serial))?;
    write_field(out, "Can re-attest", &agent.can_reattest.to_string())?;
    if agent.is_banned() {
        write_field(out, "Banned", "true")?;
    }
    if with_selectors {
        for selector in agent.selectors.iter() {
            write_field(out, "Selectors", &selector.to_string())?;
        }
    }
    Ok(())
}

/// A time in whole Unix seconds, as the JSON output carries times; 0 for a time before 1970.
pub(crate) fn unix_time(time: std::time::SystemTime) -> i64 {
    i64::try_from(lanyard_core::policy::unix_seconds(time)).unwrap_or(i64::MAX)
}

/// An optional time in whole Unix seconds; 0 for none, as the wire has it.
pub(crate) fn unix_time_or_zero(time: Option<std::time::SystemTime>) -> i64 {
    time.map_or(0, unix_time)
}

/// A bundle as JSON, in the field names of SPIRE's `Bundle` message, with certificates and
/// public keys in standard base64 (protojson's form of `bytes`).
pub(crate) fn bundle_json(bundle: &TrustBundle) -> Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    let x509: Vec<Value> = bundle
        .x509_authorities()
        .iter()
        .map(|a| json!({ "asn1": b64.encode(a.der()), "tainted": a.is_tainted() }))
        .collect();
    let jwt: Vec<Value> = bundle
        .jwt_authorities()
        .iter()
        .map(|k| {
            json!({
                "public_key": b64.encode(k.public_key_der()),
                "key_id": k.key_id(),
                "expires_at": unix_time_or_zero(k.expires_at()),
                "tainted": k.is_tainted(),
            })
        })
        .collect();
    json!({
        "trust_domain": bundle.trust_domain().name(),
        "x509_authorities": x509,
        "jwt_authorities": jwt,
        "refresh_hint": bundle.refresh_hint().map_or(0, |hint| hint.as_secs()),
        "sequence_number": bundle.sequence_number(),
    })
}

fn or_none(value: &str) -> &str {
    if value.is_empty() { "(none)" } else { value }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample_entry() -> types::Entry {
        types::Entry {
            id: "6f0b7c1e-2b1a-4c7e-9d62-0c4b3f1a9e10".into(),
            spiffe_id: Some(types::Spiffeid {
                trust_domain: "example.org".into(),
                path: "/web".into(),
            }),
            parent_id: Some(types::Spiffeid {
                trust_domain: "example.org".into(),
                path: "/spire/agent/join_token/abc".into(),
            }),
            selectors: vec![
                types::Selector {
                    r#type: "unix".into(),
                    value: "uid:1000".into(),
                },
                types::Selector {
                    r#type: "unix".into(),
                    value: "gid:1000".into(),
                },
            ],
            x509_svid_ttl: 3600,
            federates_with: vec!["partner.org".into()],
            admin: true,
            downstream: false,
            expires_at: 1_700_000_000,
            dns_names: vec!["web.example.org".into()],
            revision_number: 2,
            store_svid: false,
            jwt_svid_ttl: 0,
            hint: "external".into(),
            created_at: 1_690_000_000,
        }
    }

    pub(crate) fn sample_metadata() -> EntryMetadata {
        EntryMetadata {
            entry_id: "6f0b7c1e-2b1a-4c7e-9d62-0c4b3f1a9e10".into(),
            owner: "team-web".into(),
            reason: "serves the storefront".into(),
            ticket: "CHG-42".into(),
            source: String::new(),
        }
    }

    fn render(f: impl FnOnce(&mut dyn Write) -> anyhow::Result<()>) -> String {
        let mut buffer = Vec::new();
        f(&mut buffer).expect("writes");
        String::from_utf8(buffer).expect("utf-8")
    }

    #[test]
    fn entry_pretty_lists_every_set_field() {
        let text = render(|out| write_entry_pretty(out, &sample_entry(), Some(&sample_metadata())));
        let expected = "\
Entry ID         : 6f0b7c1e-2b1a-4c7e-9d62-0c4b3f1a9e10
SPIFFE ID        : spiffe://example.org/web
Parent ID        : spiffe://example.org/spire/agent/join_token/abc
Revision         : 2
X509-SVID TTL    : 1h
JWT-SVID TTL     : default
Expiration time  : 2023-11-14T22:13:20Z
Selector         : unix:uid:1000
Selector         : unix:gid:1000
FederatesWith    : partner.org
DNS name         : web.example.org
Admin            : true
Hint             : external
Created at       : 2023-07-22T04:26:40Z
Owner            : team-web
Reason           : serves the storefront
Ticket           : CHG-42
";
        assert_eq!(text, expected);
    }

    #[test]
    fn entry_pretty_without_metadata_has_no_governance_lines() {
        let text = render(|out| write_entry_pretty(out, &sample_entry(), None));
        assert!(!text.contains("Owner"));
        assert!(text.starts_with("Entry ID         : 6f0b7c1e"));
    }

    #[test]
    fn entry_json_uses_proto_field_names() {
        let value = entry_json(&sample_entry(), Some(&sample_metadata()));
        assert_eq!(
            value,
            json!({
                "id": "6f0b7c1e-2b1a-4c7e-9d62-0c4b3f1a9e10",
                "spiffe_id": { "trust_domain": "example.org", "path": "/web" },
                "parent_id": {
                    "trust_domain": "example.org",
                    "path": "/spire/agent/join_token/abc"
                },
                "selectors": [
                    { "type": "unix", "value": "uid:1000" },
                    { "type": "unix", "value": "gid:1000" }
                ],
                "x509_svid_ttl": 3600,
                "jwt_svid_ttl": 0,
                "federates_with": ["partner.org"],
                "admin": true,
                "downstream": false,
                "expires_at": 1_700_000_000,
                "dns_names": ["web.example.org"],
                "revision_number": 2,
                "store_svid": false,
                "hint": "external",
                "created_at": 1_690_000_000,
                "owner": "team-web",
                "reason": "serves the storefront",
                "ticket": "CHG-42",
                "source": ""
            })
        );
        let without = entry_json(&sample_entry(), None);
        assert!(without.get("owner").is_none());
    }

    fn sample_agent() -> AttestedAgent {
        let mut agent = AttestedAgent::new(
            "spiffe://example.org/spire/agent/join_token/abc"
                .parse()
                .unwrap(),
            "join_token",
            "1234567890",
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
        );
        agent.selectors = ["spiffe_id:spiffe://example.org/spire/agent/join_token/abc"
            .parse()
            .unwrap()]
        .into_iter()
        .collect();
        agent
    }

    #[test]
    fn agent_pretty_matches_spire_layout() {
        let text = render(|out| write_agent_pretty(out, &sample_agent(), true));
        let expected = "\
SPIFFE ID        : spiffe://example.org/spire/agent/join_token/abc
Attestation type : join_token
Expiration time  : 2023-11-14T22:13:20Z
Serial number    : 1234567890
Can re-attest    : false
Selectors        : spiffe_id:spiffe://example.org/spire/agent/join_token/abc
";
        assert_eq!(text, expected);
        let mut banned = sample_agent();
        banned.serial.clear();
        let text = render(|out| write_agent_pretty(out, &banned, false));
        assert!(text.contains("Serial number    : (none)\n"));
        assert!(text.contains("Banned           : true\n"));
        assert!(!text.contains("Selectors"));
    }

    #[test]
    fn agent_json_uses_proto_field_names() {
        assert_eq!(
            agent_json(&sample_agent()),
            json!({
                "id": { "trust_domain": "example.org", "path": "/spire/agent/join_token/abc" },
                "attestation_type": "join_token",
                "x509svid_serial_number": "1234567890",
                "x509svid_expires_at": 1_700_000_000,
                "selectors": [{
                    "type": "spiffe_id",
                    "value": "spiffe://example.org/spire/agent/join_token/abc"
                }],
                "banned": false,
                "can_reattest": false
            })
        );
    }

    #[test]
    fn failed_items_read_like_spire() {
        let status = types::Status {
            code: 6,
            message: "similar entry already exists".into(),
        };
        assert_eq!(
            status_text(Some(&status)),
            "(code: AlreadyExists, msg: \"similar entry already exists\")"
        );
        assert_eq!(status_json(None), json!({ "code": 0, "message": "OK" }));
    }
}
