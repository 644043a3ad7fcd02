//! The `--data` batch file of `entry create` and `entry update`: `{"entries": [{…}, …]}`.
//!
//! Each entry uses the field names of SPIRE's entry JSON (the protobuf JSON mapping of
//! `spire.api.types.Entry`, so `spire-server entry create -data` files work unchanged) plus
//! Lanyard's `owner`, `reason` and `ticket`:
//!
//! - proto names (`spiffe_id`) and their lowerCamelCase JSON names (`spiffeId`) both work;
//! - IDs are `{"trust_domain": "example.org", "path": "/web"}` or plain `"spiffe://…"` text;
//! - selectors are `{"type": "unix", "value": "uid:1000"}` or plain `"unix:uid:1000"` text;
//! - integers may be numbers or strings (protobuf JSON writes 64-bit ones as strings); TTLs
//!   also take humantime (`"1h"`) and `expires_at` RFC 3339;
//! - `null` means absent; `revision_number` and `created_at` are accepted and ignored (the
//!   server sets them), so the output of `entry show --output json` can be fed back;
//! - any other member is an error, as is a member given twice.

use anyhow::{Context as _, anyhow, bail};
use lanyard_proto::spire::api::types;
use serde_json::{Map, Value};

use crate::admin::EntrySpec;
use crate::cli::parse;

/// Parses a batch file into one spec per entry, in file order.
pub(crate) fn parse_entries(json: &[u8]) -> anyhow::Result<Vec<EntrySpec>> {
    let document = lanyard_core::bundle::parse_json_strict(json)
        .map_err(|err| anyhow!("not valid JSON: {err}"))?;
    let Value::Object(document) = document else {
        bail!("expected an object with an \"entries\" array");
    };
    let mut entries = None;
    for (key, value) in document {
        match key.as_str() {
            "entries" => entries = Some(value),
            other => bail!("unknown member {other:?} (expected \"entries\")"),
        }
    }
    let Some(Value::Array(entries)) = entries else {
        bail!("expected an object with an \"entries\" array");
    };
    if entries.is_empty() {
        bail!("\"entries\" is empty");
    }
    entries
        .iter()
        .enumerate()
        .map(|(index, entry)| parse_entry(entry).with_context(|| format!("entries[{index}]")))
        .collect()
}

fn parse_entry(value: &Value) -> anyhow::Result<EntrySpec> {
    let Value::Object(object) = value else {
        bail!("expected an object");
    };
    let mut spec = EntrySpec::default();
    for (key, value) in object {
        if value.is_null() {
            continue;
        }
        let field = snake_case(key);
        parse_field(&mut spec, &field, value).with_context(|| field.clone())?;
    }
    Ok(spec)
}

fn parse_field(spec: &mut EntrySpec, field: &str, value: &Value) -> anyhow::Result<()> {
    let entry = &mut spec.entry;
    let mask = &mut spec.fields;
    match field {
        "id" => entry.id = string(value)?,
        "spiffe_id" => {
            entry.spiffe_id = Some(spiffe_id(value)?);
            mask.spiffe_id = true;
        }
        "parent_id" => {
            entry.parent_id = Some(spiffe_id(value)?);
            mask.parent_id = true;
        }
        "selectors" => {
            entry.selectors = array(value)?
                .iter()
                .enumerate()
                .map(|(i, s)| selector(s).with_context(|| format!("[{i}]")))
                .collect::<anyhow::Result<_>>()?;
            mask.selectors = true;
        }
        "x509_svid_ttl" => {
            entry.x509_svid_ttl = ttl(value)?;
            mask.x509_svid_ttl = true;
        }
        "jwt_svid_ttl" => {
            entry.jwt_svid_ttl = ttl(value)?;
            mask.jwt_svid_ttl = true;
        }
        "federates_with" => {
            entry.federates_with = array(value)?
                .iter()
                .map(|v| parse::trust_domain(&string(v)?))
                .collect::<anyhow::Result<_>>()?;
            mask.federates_with = true;
        }
        "admin" => {
            entry.admin = boolean(value)?;
            mask.admin = true;
        }
        "downstream" => {
            entry.downstream = boolean(value)?;
            mask.downstream = true;
        }
        "store_svid" => {
            entry.store_svid = boolean(value)?;
            mask.store_svid = true;
        }
        "expires_at" => {
            entry.expires_at = match value {
                Value::Number(n) => n.as_i64().context("not a 64-bit integer")?,
                Value::String(text) => parse::unix_time(text)?,
                _ => bail!("expected Unix seconds or RFC 3339 text"),
            };
            mask.expires_at = true;
        }
        "dns_names" => {
            entry.dns_names = array(value)?
                .iter()
                .map(string)
                .collect::<anyhow::Result<_>>()?;
            mask.dns_names = true;
        }
        "hint" => {
            entry.hint = string(value)?;
            mask.hint = true;
        }
        "owner" => spec.metadata.owner = non_empty(string(value)?),
        "reason" => spec.metadata.reason = non_empty(string(value)?),
        "ticket" => spec.metadata.ticket = non_empty(string(value)?),
        // Set by the server, or (source) by whatever writes the entry; accepted so that
        // `entry show --output json` can be fed back.
        "revision_number" | "created_at" | "source" => {}
        _ => bail!("unknown member"),
    }
    Ok(())
}

/// `spiffeId` → `spiffe_id`, `x509SvidTtl` → `x509_svid_ttl`; proto names pass unchanged.
fn snake_case(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    for c in key.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn string(value: &Value) -> anyhow::Result<String> {
    match value {
        Value::String(text) => Ok(text.clone()),
        _ => bail!("expected a string"),
    }
}

fn non_empty(text: String) -> Option<String> {
    if text.is_empty() { None } else { Some(text) }
}

fn boolean(value: &Value) -> anyhow::Result<bool> {
    match value {
        Value::Bool(b) => Ok(*b),
        _ => bail!("expected true or false"),
    }
}

fn array(value: &Value) -> anyhow::Result<&Vec<Value>> {
    match value {
        Value::Array(items) => Ok(items),
        _ => bail!("expected an array"),
    }
}

fn ttl(value: &Value) -> anyhow::Result<i32> {
    match value {
        Value::Number(n) => {
            let seconds = n.as_i64().context("not an integer number of seconds")?;
            i32::try_from(seconds)
                .ok()
                .filter(|s| *s >= 0)
                .with_context(|| format!("{seconds} is out of range"))
        }
        Value::String(text) => parse::ttl_seconds(text),
        _ => bail!("expected seconds or a duration such as \"1h\""),
    }
}

fn spiffe_id(value: &Value) -> anyhow::Result<types::Spiffeid> {
    match value {
        Value::String(text) => parse::spiffe_id(text),
        Value::Object(object) => {
            let (trust_domain, path) = id_parts(object)?;
            parse::spiffe_id(&format!("spiffe://{trust_domain}{path}"))
        }
        _ => bail!("expected \"spiffe://…\" text or {{\"trust_domain\", \"path\"}}"),
    }
}

fn id_parts(object: &Map<String, Value>) -> anyhow::Result<(String, String)> {
    let mut trust_domain = None;
    let mut path = String::new();
    for (key, value) in object {
        match snake_case(key).as_str() {
            "trust_domain" => trust_domain = Some(string(value).context("trust_domain")?),
            "path" => path = string(value).context("path")?,
            _ => bail!("unknown member {key:?} (expected trust_domain and path)"),
        }
    }
    let trust_domain = trust_domain.context("trust_domain is missing")?;
    if !path.is_empty() && !path.starts_with('/') {
        bail!("path {path:?} must start with '/'");
    }
    Ok((trust_domain, path))
}

fn selector(value: &Value) -> anyhow::Result<types::Selector> {
    match value {
        Value::String(text) => parse::selector(text),
        Value::Object(object) => {
            let mut kind = None;
            let mut selector_value = None;
            for (key, value) in object {
                match key.as_str() {
                    "type" => kind = Some(string(value).context("type")?),
                    "value" => selector_value = Some(string(value).context("value")?),
                    _ => bail!("unknown member {key:?} (expected type and value)"),
                }
            }
            let kind = kind.context("type is missing")?;
            let selector_value = selector_value.context("value is missing")?;
            parse::selector(&format!("{kind}:{selector_value}"))
        }
        _ => bail!("expected \"type:value\" text or {{\"type\", \"value\"}}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::entry::tests::metadata;
    use crate::cli::output::entry_json;
    use crate::cli::output::tests::{sample_entry, sample_metadata};

    fn id(trust_domain: &str, path: &str) -> types::Spiffeid {
        types::Spiffeid {
            trust_domain: trust_domain.into(),
            path: path.into(),
        }
    }

    #[test]
    fn spire_batch_files_parse() {
        let json = br#"{
          "entries": [
            {
              "selectors": [{"type": "unix", "value": "uid:1111"}],
              "spiffe_id": {"trust_domain": "example.org", "path": "/Blog"},
              "parent_id": {"trust_domain": "example.org", "path": "/spire/agent/join_token/TokenBlog"},
              "x509_svid_ttl": 200,
              "jwt_svid_ttl": 30,
              "admin": true,
              "owner": "team-blog",
              "reason": "publishes posts",
              "ticket": "CHG-7"
            },
            {
              "spiffeId": "spiffe://example.org/db",
              "parentId": "spiffe://example.org/spire/server",
              "selectors": ["unix:uid:1112", "unix:gid:50"],
              "x509SvidTtl": "1h",
              "expiresAt": "2030-01-01T00:00:00Z",
              "dnsNames": ["db.example.org"],
              "federatesWith": ["partner.org"],
              "hint": null
            }
          ]
        }"#;
        let specs = parse_entries(json).expect("parses");
        assert_eq!(specs.len(), 2);

        let blog = &specs[0];
        assert_eq!(blog.entry.spiffe_id, Some(id("example.org", "/Blog")));
        assert_eq!(
            blog.entry.parent_id,
            Some(id("example.org", "/spire/agent/join_token/TokenBlog"))
        );
        assert_eq!(blog.entry.selectors.len(), 1);
        assert_eq!(blog.entry.selectors[0].r#type, "unix");
        assert_eq!(blog.entry.selectors[0].value, "uid:1111");
        assert_eq!(blog.entry.x509_svid_ttl, 200);
        assert_eq!(blog.entry.jwt_svid_ttl, 30);
        assert!(blog.entry.admin);
        assert_eq!(
            blog.metadata,
            metadata("team-blog", "publishes posts", "CHG-7")
        );
        assert!(blog.fields.admin && blog.fields.jwt_svid_ttl && !blog.fields.hint);

        let db = &specs[1];
        assert_eq!(db.entry.spiffe_id, Some(id("example.org", "/db")));
        assert_eq!(db.entry.selectors.len(), 2);
        assert_eq!(db.entry.x509_svid_ttl, 3600);
        assert_eq!(db.entry.expires_at, 1_893_456_000);
        assert_eq!(db.entry.dns_names, ["db.example.org"]);
        assert_eq!(db.entry.federates_with, ["partner.org"]);
        assert!(db.metadata.is_empty());
        assert!(!db.fields.hint, "null means absent");
    }

    #[test]
    fn show_output_feeds_back_into_create() {
        let document = serde_json::json!({
            "entries": [entry_json(&sample_entry(), Some(&sample_metadata()))]
        });
        let specs = parse_entries(document.to_string().as_bytes()).expect("parses");
        let spec = &specs[0];
        let mut expected = sample_entry();
        // Server-set fields are dropped.
        expected.revision_number = 0;
        expected.created_at = 0;
        assert_eq!(spec.entry, expected);
        assert_eq!(
            spec.metadata,
            metadata("team-web", "serves the storefront", "CHG-42")
        );
    }

    #[test]
    fn errors_point_at_the_item_and_field() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"entries": [{"spiffe_id": "spiffe://Example.org/x"}]}"#,
                "entries[0]: spiffe_id: ",
            ),
            (
                r#"{"entries": [{}, {"selectors": ["unix"]}]}"#,
                "entries[1]: selectors: [0]: invalid selector \"unix\"",
            ),
            (
                r#"{"entries": [{"x509_svid_ttl": "soon"}]}"#,
                "entries[0]: x509_svid_ttl: invalid duration \"soon\"",
            ),
            (
                r#"{"entries": [{"owners": "me"}]}"#,
                "entries[0]: owners: unknown member",
            ),
            (
                r#"{"entries": [{"admin": "yes"}]}"#,
                "entries[0]: admin: expected true or false",
            ),
            (r#"{"entries": [{"id": "a", "id": "b"}]}"#, "not valid JSON"),
            (r#"{"entry": []}"#, "unknown member \"entry\""),
            (r#"{"entries": []}"#, "\"entries\" is empty"),
            (r#"[]"#, "expected an object"),
        ];
        for (json, expected) in cases {
            let err = parse_entries(json.as_bytes()).expect_err(json);
            let message = format!("{err:#}");
            assert!(message.starts_with(expected), "{json}: {message}");
            assert!(!message.contains('\n'), "{message}");
        }
    }
}
