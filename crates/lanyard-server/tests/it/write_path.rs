//! The shape of the server's write path, checked on its source: entry writes have one door
//! (`writes::EntryWriter`), federation relationship writes another
//! (`relationships::RelationshipWriter`), and the modules below the API do not depend on it.

use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`, with its path relative to `src/`.
fn sources(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
    for item in std::fs::read_dir(dir).unwrap() {
        let path = item.unwrap().path();
        if path.is_dir() {
            sources(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            // Unit tests may set up a datastore any way they like; only shipped code counts.
            let shipped = match text.find("#[cfg(test)]") {
                Some(at) => text[..at].to_owned(),
                None => text,
            };
            let name = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.push((name, shipped));
        }
    }
}

fn server_sources() -> Vec<(String, String)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    sources(&root, &root, &mut out);
    assert!(out.len() > 20, "the server's sources were found");
    out
}

#[test]
fn only_the_entry_writer_writes_entries() {
    let calls = [
        ".create_entry(",
        ".update_entry(",
        ".delete_entry(",
        ".prune_entries(",
    ];
    let mut offenders = Vec::new();
    for (name, text) in server_sources() {
        if name.starts_with("datastore/") || name == "writes.rs" {
            continue;
        }
        for call in calls {
            if text.contains(call) {
                offenders.push(format!("{name} calls {call}…)"));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "entry writes outside writes::EntryWriter skip its checks, policy, index or audit: {offenders:?}"
    );
    // The check itself finds what it looks for.
    let writer = server_sources()
        .into_iter()
        .find(|(name, _)| name == "writes.rs")
        .unwrap();
    assert!(writer.1.contains(".create_entry("));
}

#[test]
fn only_the_relationship_writer_writes_federation_relationships() {
    let calls = [
        ".create_federation_relationship(",
        ".update_federation_relationship(",
        ".delete_federation_relationship(",
    ];
    let mut offenders = Vec::new();
    for (name, text) in server_sources() {
        if name.starts_with("datastore/") || name == "relationships.rs" {
            continue;
        }
        for call in calls {
            if text.contains(call) {
                offenders.push(format!("{name} calls {call}…)"));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "relationship writes outside relationships::RelationshipWriter skip its checks, change \
         feed or audit: {offenders:?}"
    );
    let writer = server_sources()
        .into_iter()
        .find(|(name, _)| name == "relationships.rs")
        .unwrap();
    for call in calls {
        assert!(writer.1.contains(call), "the writer calls {call}…)");
    }
}

#[test]
fn the_modules_below_the_api_do_not_depend_on_it() {
    // The services and the server that assembles them use the API; nothing they build on does.
    let mut offenders = Vec::new();
    for (name, text) in server_sources() {
        if name.starts_with("api/") || name == "server.rs" || name == "lib.rs" {
            continue;
        }
        if text.contains("crate::api") || text.contains("super::api") {
            offenders.push(name);
        }
    }
    assert!(offenders.is_empty(), "{offenders:?} import crate::api");
}

/// Entry metadata and `CreateJoinToken`'s alias entry are entry writes like any other: the
/// index serves them at once and the audit log records them, with the method that made them.
#[tokio::test]
async fn metadata_and_join_token_aliases_are_written_like_any_entry() {
    use lanyard_proto::lanyard::api::v1::entry_metadata_service_client::EntryMetadataServiceClient;
    use lanyard_proto::lanyard::api::v1::{EntryMetadata, SetEntryMetadataRequest};
    use lanyard_proto::spire::api::server::agent::v1::CreateJoinTokenRequest;
    use lanyard_proto::spire::api::server::agent::v1::agent_client::AgentClient;

    let server = crate::support::TestServer::start().await;
    let agent = server.attest_new_agent().await;
    let id = crate::issuance::create_entry(&server, "/described", &agent.id, 0).await;
    let revision = || async {
        let entry_id = lanyard_core::EntryId::new(&id).unwrap();
        let state = server.server().state();
        state
            .store
            .get_entry(&entry_id)
            .await
            .unwrap()
            .unwrap()
            .revision_number
    };
    let set = || async {
        EntryMetadataServiceClient::new(server.admin().await)
            .set_entry_metadata(SetEntryMetadataRequest {
                metadata: vec![EntryMetadata {
                    entry_id: id.clone(),
                    owner: "team-web".into(),
                    reason: "serves the site".into(),
                    ..Default::default()
                }],
            })
            .await
            .unwrap()
            .into_inner()
            .results
    };
    assert_eq!(set().await[0].status.as_ref().unwrap().code, 0);
    assert_eq!(revision().await, 1);
    // The same values again write nothing: no new revision, no new record.
    assert_eq!(set().await[0].status.as_ref().unwrap().code, 0);
    assert_eq!(revision().await, 1);

    let token = AgentClient::new(server.admin().await)
        .create_join_token(CreateJoinTokenRequest {
            ttl: 600,
            agent_id: Some(lanyard_proto::convert::spiffe_id_to_proto(
                &"spiffe://example.org/node/alias"
                    .parse::<lanyard_core::SpiffeId>()
                    .unwrap(),
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let alias_agent = format!(
        "spiffe://example.org/spire/agent/join_token/{}",
        token.value
    );
    let log = std::fs::read_to_string(server.config.audit_log_path()).unwrap();
    lanyard_core::audit::verify(&log).unwrap();
    let records: Vec<serde_json::Value> = lanyard_core::audit::events(&log)
        .map(|(_, _, record)| record)
        .filter(|record| record["action"] == "entry updated" || record["action"] == "entry created")
        .collect();
    let by_method = |method: &str| {
        records
            .iter()
            .filter(|r| {
                r["details"]["method"]
                    .as_str()
                    .unwrap_or("")
                    .ends_with(method)
            })
            .collect::<Vec<_>>()
    };
    let metadata = by_method("/SetEntryMetadata");
    assert_eq!(metadata.len(), 1, "{records:?}");
    assert_eq!(metadata[0]["action"], "entry updated");
    assert_eq!(metadata[0]["details"]["owner"], "team-web");
    assert_eq!(metadata[0]["details"]["reason"], "serves the site");
    let alias = by_method("/CreateJoinToken");
    assert_eq!(alias.len(), 1, "{records:?}");
    assert_eq!(
        alias[0]["details"]["spiffe_id"],
        "spiffe://example.org/node/alias"
    );
    assert_eq!(alias[0]["details"]["parent_id"], alias_agent.as_str());
    // The alias is in the index as soon as the token is answered.
    let alias_id = lanyard_core::EntryId::new(alias[0]["details"]["entry_id"].as_str().unwrap());
    assert!(
        server
            .server()
            .state()
            .index
            .read()
            .entry(&alias_id.unwrap())
            .is_some()
    );
}
