//! The server's audit log: every admin change lands in `<data_dir>/audit.log` as a
//! hash-chained line that verifies; a restart continues the chain; a tampered log keeps the
//! server from starting, naming the broken line.

use lanyard_core::audit;
use lanyard_proto::spire::api::server::agent::v1::CreateJoinTokenRequest;
use lanyard_proto::spire::api::server::agent::v1::agent_client::AgentClient;
use lanyard_proto::spire::api::server::entry::v1::entry_client::EntryClient;
use lanyard_proto::spire::api::server::entry::v1::{
    BatchCreateEntryRequest, BatchDeleteEntryRequest,
};
use lanyard_proto::spire::api::types;
use lanyard_server::Server;

use crate::support::TestServer;

fn actions(log: &str) -> Vec<String> {
    audit::events(log)
        .map(|(_, _, event)| event["action"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn admin_changes_are_chained_into_the_audit_log_and_survive_a_restart() {
    let mut server = TestServer::start().await;
    let path = server.config.audit_log_path();
    assert_eq!(path, server.config.data_dir.join("audit.log"));

    let channel = server.admin().await;
    let created = EntryClient::new(channel.clone())
        .batch_create_entry(BatchCreateEntryRequest {
            entries: vec![types::Entry {
                spiffe_id: Some(types::Spiffeid {
                    trust_domain: "example.org".into(),
                    path: "/audited".into(),
                }),
                parent_id: Some(types::Spiffeid {
                    trust_domain: "example.org".into(),
                    path: "/spire/server".into(),
                }),
                selectors: vec![types::Selector {
                    r#type: "unix".into(),
                    value: "uid:1000".into(),
                }],
                ..Default::default()
            }],
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let entry_id = created[0].entry.as_ref().unwrap().id.clone();
    AgentClient::new(channel.clone())
        .create_join_token(CreateJoinTokenRequest {
            ttl: 600,
            ..Default::default()
        })
        .await
        .unwrap();

    let log = std::fs::read_to_string(&path).unwrap();
    let head = audit::verify(&log).unwrap();
    assert_eq!(actions(&log), ["entry created", "join token created"]);
    let first = audit::events(&log).next().unwrap().2;
    assert_eq!(
        first["caller"],
        "local uid 0".replace('0', &current_uid().to_string())
    );
    assert_eq!(first["details"]["entry_id"], entry_id.as_str());
    assert_eq!(
        first["details"]["spiffe_id"],
        "spiffe://example.org/audited"
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    // After a restart the chain continues from the same head.
    server.restart().await;
    EntryClient::new(server.admin().await)
        .batch_delete_entry(BatchDeleteEntryRequest {
            ids: vec![entry_id],
        })
        .await
        .unwrap();
    let log = std::fs::read_to_string(&path).unwrap();
    let after = audit::verify(&log).unwrap();
    assert_eq!(after.lines, head.lines + 1);
    assert_eq!(
        actions(&log),
        ["entry created", "join token created", "entry deleted"]
    );

    // An edited line: the server refuses to start rather than append to a broken chain.
    if let Some(running) = server.server.take() {
        running.shutdown().await;
    }
    std::fs::write(&path, log.replacen("/audited", "/innocent", 1)).unwrap();
    let error = Server::start(server.config.clone(), server.clock.clock())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("tampered") && error.contains("line 2"),
        "{error}"
    );
}

fn current_uid() -> u32 {
    std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap())
}
