//! `AgentChangeService.WatchChanges`: an attested agent is told of every applied change at
//! once, its own server's writes and another server's alike; nobody else may listen; a reader
//! that falls behind still reaches the newest revision, in order; the stream ends when the
//! server stops.

use std::time::{Duration, SystemTime};

use lanyard_core::{EntryId, RegistrationEntry, Selector, SpiffeId};
use lanyard_proto::lanyard::api::v1::agent_change_service_client::AgentChangeServiceClient;
use lanyard_proto::lanyard::api::v1::{ChangeNotice, WatchChangesRequest};
use lanyard_proto::spire::api::server::localauthority::v1 as authority_pb;
use lanyard_proto::spire::api::server::localauthority::v1::local_authority_client::LocalAuthorityClient;
use lanyard_server::api::changes::MAX_STREAMS_PER_AGENT;
use lanyard_server::datastore::{Datastore, SqlStore};
use tonic::Streaming;

use crate::issuance::create_entry;
use crate::support::{AttestedAgentIdentity, TestServer, trust_domain};

/// How long a notice may take before the test gives up; a pushed notice arrives in
/// milliseconds, and the test asserts only that it arrives.
const PATIENCE: Duration = Duration::from_secs(10);

async fn watch(server: &TestServer, agent: &AttestedAgentIdentity) -> Streaming<ChangeNotice> {
    let channel = server.tls(Some((&agent.chain, &agent.key))).await;
    AgentChangeServiceClient::new(channel)
        .watch_changes(WatchChangesRequest {})
        .await
        .unwrap()
        .into_inner()
}

async fn next(stream: &mut Streaming<ChangeNotice>) -> Option<i64> {
    next_notice(stream).await.map(|notice| notice.revision)
}

async fn next_notice(stream: &mut Streaming<ChangeNotice>) -> Option<ChangeNotice> {
    tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("a notice or the end of the stream")
        .ok()
        .flatten()
}

#[tokio::test]
async fn agents_are_told_of_each_change_as_it_is_applied() {
    let server = TestServer::start().await;
    let agent = server.attest_new_agent().await;
    let mut notices = watch(&server, &agent).await;
    let first = next(&mut notices).await.expect("a notice at once");
    assert_eq!(
        first,
        server.server().state().index.revision().await,
        "the first notice is where the server stands"
    );

    // A write through this server.
    create_entry(&server, "/pushed", &agent.id, 0).await;
    let second = next(&mut notices).await.expect("a notice for the write");
    assert!(second > first, "{second} after {first}");

    // A write by another server sharing the datastore, applied by this one's next pass.
    let other = SqlStore::open(&server.config.datastore_path())
        .await
        .unwrap();
    other
        .create_entry(RegistrationEntry::new(
            EntryId::generate(),
            SpiffeId::from_path(&trust_domain(), "/elsewhere").unwrap(),
            agent.id.clone(),
            [Selector::new("unix", "uid:1000").unwrap()]
                .into_iter()
                .collect(),
            SystemTime::now(),
        ))
        .await
        .unwrap();
    let third = next(&mut notices)
        .await
        .expect("a notice for the other write");
    assert!(third > second, "{third} after {second}");
}

#[tokio::test]
async fn a_reader_that_falls_behind_still_reaches_the_newest_revision_in_order() {
    let server = TestServer::start().await;
    let agent = server.attest_new_agent().await;
    let mut notices = watch(&server, &agent).await;
    let first = next(&mut notices).await.unwrap();
    // Twenty writes while the agent reads nothing.
    for i in 0..20 {
        create_entry(&server, &format!("/burst/{i}"), &agent.id, 0).await;
    }
    let now = server.server().state().index.revision().await;
    let mut seen = vec![first];
    while seen.last() != Some(&now) {
        seen.push(next(&mut notices).await.expect("notices up to the newest"));
    }
    // Each notice moves on: none is repeated and none goes back, however they were grouped.
    assert!(seen.windows(2).all(|pair| pair[0] < pair[1]), "{seen:?}");
    assert!(seen.len() <= 21, "at most one notice per write: {seen:?}");
}

/// An exception that lapses changes what agents may obtain without any write: the notice moves
/// its sequence, the revision stays.
#[tokio::test]
async fn an_exception_lapsing_is_announced_without_a_write() {
    let server = crate::governance::governed_server().await;
    let agent = server.attest_new_agent().await;
    let mut notices = watch(&server, &agent).await;
    next_notice(&mut notices).await.unwrap();
    crate::governance::create_exception(
        &server,
        crate::governance::exception(
            &["admin-needs-exception"],
            "spiffe://example.org/ops/*",
            "CHG-1",
            1,
            &server,
        ),
    )
    .await
    .unwrap();
    // The exception alone changes nothing this agent may obtain; the entry it allows does.
    let mut admin = crate::governance::entry(&server, "/ops/admin", &agent.id, 30);
    admin.admin = true;
    let result = crate::governance::create_governed(
        &server,
        admin,
        crate::governance::metadata("ops", "break glass"),
    )
    .await;
    assert_eq!(result.status.unwrap().code, 0);
    let created = next_notice(&mut notices).await.expect("the entry's write");
    server.clock.advance(Duration::from_secs(2 * 86_400));
    let lapsed = next_notice(&mut notices).await.expect("the lapse");
    assert_eq!(lapsed.revision, created.revision, "no write");
    assert!(
        lapsed.sequence > created.sequence,
        "{lapsed:?} after {created:?}"
    );
}

/// One agent holds a bounded number of streams; a slot comes back when a stream is dropped.
#[tokio::test]
async fn an_agent_cannot_open_streams_without_bound() {
    let server = TestServer::start().await;
    let agent = server.attest_new_agent().await;
    let channel = server.tls(Some((&agent.chain, &agent.key))).await;
    let mut open = Vec::new();
    for _ in 0..MAX_STREAMS_PER_AGENT {
        let mut stream = AgentChangeServiceClient::new(channel.clone())
            .watch_changes(WatchChangesRequest {})
            .await
            .unwrap()
            .into_inner();
        next(&mut stream).await.expect("a notice");
        open.push(stream);
    }
    let refused = AgentChangeServiceClient::new(channel.clone())
        .watch_changes(WatchChangesRequest {})
        .await
        .expect_err("one stream too many");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    // Another agent is not affected.
    let other = server.attest_new_agent().await;
    next(&mut watch(&server, &other).await)
        .await
        .expect("a notice");

    drop(open.pop());
    tokio::time::timeout(PATIENCE, async {
        loop {
            let again = AgentChangeServiceClient::new(channel.clone())
                .watch_changes(WatchChangesRequest {})
                .await;
            if again.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the dropped stream's slot comes back");
}

#[tokio::test]
async fn only_attested_agents_may_watch() {
    let server = TestServer::start().await;
    let refused = AgentChangeServiceClient::new(server.bootstrap_tls().await)
        .watch_changes(WatchChangesRequest {})
        .await
        .expect_err("no client certificate, no stream");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
}

#[tokio::test]
async fn streams_end_when_the_server_stops() {
    let mut server = TestServer::start().await;
    let agent = server.attest_new_agent().await;
    let mut notices = watch(&server, &agent).await;
    next(&mut notices).await.unwrap();
    // The restart stops the server first: its shutdown must not wait on the open stream.
    tokio::time::timeout(PATIENCE, server.restart())
        .await
        .expect("the server stops with a change stream open");
    assert_eq!(next(&mut notices).await, None, "the stream ended");
}

/// Waits `QUIET` for a notice that should not come; fails if one does.
async fn assert_quiet(stream: &mut Streaming<ChangeNotice>, what: &str) {
    const QUIET: Duration = Duration::from_millis(700);
    if let Ok(notice) = tokio::time::timeout(QUIET, stream.message()).await {
        panic!("{what}: expected no notice, got {notice:?}");
    }
}

/// A write is announced to the agents it concerns: one whose entries it does not touch hears
/// nothing, and its next notice jumps to the revision that concerns it. A bundle change
/// concerns every agent.
#[tokio::test]
async fn agents_hear_only_of_changes_that_concern_them() {
    let server = TestServer::start().await;
    let quiet = server.attest_new_agent().await;
    let busy = server.attest_new_agent().await;
    let mut quiet_notices = watch(&server, &quiet).await;
    let mut busy_notices = watch(&server, &busy).await;
    let quiet_first = next(&mut quiet_notices).await.unwrap();
    next(&mut busy_notices).await.unwrap();

    for i in 0..3 {
        create_entry(&server, &format!("/busy/{i}"), &busy.id, 0).await;
    }
    let busy_now = server.server().state().index.revision().await;
    while next(&mut busy_notices).await.unwrap() < busy_now {}
    assert_quiet(&mut quiet_notices, "another agent's entries").await;

    create_entry(&server, "/quiet", &quiet.id, 0).await;
    let revision = server.server().state().index.revision().await;
    assert_eq!(next(&mut quiet_notices).await, Some(revision));
    assert!(revision > quiet_first + 3);
    assert_quiet(&mut busy_notices, "another agent's entry").await;

    // A prepared authority goes into the bundle: both are told.
    LocalAuthorityClient::new(server.admin().await)
        .prepare_x509_authority(authority_pb::PrepareX509AuthorityRequest {})
        .await
        .unwrap();
    assert!(
        next(&mut quiet_notices).await.is_some(),
        "the bundle changed"
    );
    assert!(
        next(&mut busy_notices).await.is_some(),
        "the bundle changed"
    );
}
