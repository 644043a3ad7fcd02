//! The authorization index follows the datastore's change log: every write, this server's or
//! another's sharing the datastore, reaches it in revision order, whatever order writers
//! finish in.

use std::time::{Duration, Instant, SystemTime};

use lanyard_core::{EntryId, RegistrationEntry, Selector, SpiffeId};
use lanyard_proto::spire::api::server::entry::v1::GetAuthorizedEntriesRequest;
use lanyard_proto::spire::api::server::entry::v1::entry_client::EntryClient;
use lanyard_proto::spire::api::types::permission_denied_details::Reason;
use lanyard_server::api::errors::denial_reason;
use lanyard_server::datastore::{Datastore, SqlStore};

use crate::issuance::{create_entry, sync_ids};
use crate::support::{TestServer, trust_domain};

fn entry(path: &str, parent: &SpiffeId) -> RegistrationEntry {
    RegistrationEntry::new(
        EntryId::generate(),
        SpiffeId::from_path(&trust_domain(), path).unwrap(),
        parent.clone(),
        [Selector::new("unix", "uid:1000").unwrap()]
            .into_iter()
            .collect(),
        SystemTime::now(),
    )
}

/// Another server's handle on the same SQLite datastore.
async fn other_server_store(server: &TestServer) -> SqlStore {
    SqlStore::open(&server.config.datastore_path())
        .await
        .unwrap()
}

#[tokio::test]
async fn writes_by_another_server_reach_the_index_within_the_poll_interval() {
    let server = TestServer::start().await;
    let agent = server.attest_new_agent().await;
    let other = other_server_store(&server).await;

    let created = other
        .create_entry(entry("/elsewhere", &agent.id))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while sync_ids(&server, &agent).await != vec![created.id.as_str().to_owned()] {
        assert!(
            Instant::now() < deadline,
            "the other server's entry never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    other.delete_entry(&created.id, None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sync_ids(&server, &agent).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the other server's deletion never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        server.server().state().index.revision().await,
        server
            .server()
            .state()
            .store
            .current_revision()
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn an_update_that_loses_the_race_to_a_delete_leaves_nothing_in_the_index() {
    let server = TestServer::start().await;
    let agent = server.attest_new_agent().await;
    let id = create_entry(&server, "/raced", &agent.id, 0).await;
    let id = EntryId::new(&id).unwrap();
    let state = server.server().state();
    let mut updated = state.store.get_entry(&id).await.unwrap().unwrap();
    updated.hint = "updated".to_owned();

    // An update commits, then another server deletes the entry before this one has applied
    // the update to its index: applied late, the update must not bring the entry back.
    state.store.update_entry(updated, None).await.unwrap();
    let other = other_server_store(&server).await;
    other.delete_entry(&id, None).await.unwrap();
    state.catch_up().await.unwrap();
    assert!(sync_ids(&server, &agent).await.is_empty());
    assert_eq!(state.index.read().entry_count(), 0);

    // Catching up again changes nothing: each change is applied once, in order.
    let revision = state.index.revision().await;
    state.catch_up().await.unwrap();
    assert_eq!(state.index.revision().await, revision);
}

#[tokio::test]
async fn an_acknowledged_write_is_in_the_index_before_the_answer() {
    let server = TestServer::start().await;
    let agent = server.attest_new_agent().await;
    for i in 0..20 {
        let id = create_entry(&server, &format!("/w{i}"), &agent.id, 0).await;
        assert!(
            sync_ids(&server, &agent).await.contains(&id),
            "entry {i} is served as soon as its creation is answered"
        );
    }
}

/// The agent's answer to `GetAuthorizedEntries` on `server`: how many entries, or the reason
/// it was refused.
async fn agent_call(
    server: &TestServer,
    agent: &crate::support::AttestedAgentIdentity,
) -> Result<usize, Option<Reason>> {
    let mut client = EntryClient::new(server.tls(Some((&agent.chain, &agent.key))).await);
    client
        .get_authorized_entries(GetAuthorizedEntriesRequest { output_mask: None })
        .await
        .map(|answer| answer.into_inner().entries.len())
        .map_err(|status| denial_reason(&status))
}

/// Polls `agent_call` until it is refused for `reason`; panics after 5 s.
async fn refused_within_the_poll_interval(
    server: &TestServer,
    agent: &crate::support::AttestedAgentIdentity,
    reason: Reason,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match agent_call(server, agent).await {
            Err(Some(refused)) if refused == reason => return,
            other => assert!(
                Instant::now() < deadline,
                "still {other:?} 5 s after another server's write; expected {reason:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// The agent authorizer trusts the index's agent records: a ban or an eviction written by
// another server must reach it through the change feed, not wait for a restart.
#[tokio::test]
async fn a_ban_or_eviction_through_another_server_ends_the_agents_access_here() {
    let server = TestServer::start().await;
    let banned = server.attest_new_agent().await;
    let evicted = server.attest_new_agent().await;
    assert_eq!(agent_call(&server, &banned).await, Ok(0));
    assert_eq!(agent_call(&server, &evicted).await, Ok(0));
    let other = other_server_store(&server).await;

    other.ban_agent(&banned.id).await.unwrap();
    refused_within_the_poll_interval(&server, &banned, Reason::AgentBanned).await;
    other.delete_agent(&evicted.id).await.unwrap();
    refused_within_the_poll_interval(&server, &evicted, Reason::AgentNotAttested).await;
}
