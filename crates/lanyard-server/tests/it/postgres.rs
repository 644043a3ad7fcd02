//! The server on PostgreSQL: a real cluster (see `pg.rs`), the server's whole life on it, and
//! what two servers sharing one database must get right. The datastore's own behaviour on
//! PostgreSQL is the conformance suite's (`datastore.rs`, module `pg_store`).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use lanyard_core::{EntryId, RegistrationEntry, Selector, SpiffeId};
use lanyard_server::config::{ConnectionString, DatastoreKind};
use lanyard_server::datastore::{Datastore, DatastoreError, PgStore};

use crate::issuance::{create_entry, sync_ids};
use crate::pg::fresh_database;
use crate::support::{TestServer, trust_domain};

async fn server_on(url: &str) -> TestServer {
    server_polling(url, Duration::from_secs(1)).await
}

async fn server_polling(url: &str, poll_interval: Duration) -> TestServer {
    let url = url.to_owned();
    TestServer::start_with(move |config| {
        config.datastore.kind = DatastoreKind::Postgres;
        config.datastore.connection_string = Some(ConnectionString::new(url));
        config.datastore.poll_interval = poll_interval;
    })
    .await
}

#[tokio::test]
async fn a_server_on_postgres_keeps_its_entries_agents_and_ca_across_restarts() {
    let url = fresh_database().await;
    let mut server = server_on(&url).await;
    let agent = server.attest_new_agent().await;
    let id = create_entry(&server, "/pg/web", &agent.id, 0).await;
    assert_eq!(sync_ids(&server, &agent).await, vec![id.clone()]);
    let authorities = server.authorities();

    server.restart().await;
    assert_eq!(server.authorities(), authorities, "the CA is the same");
    assert_eq!(sync_ids(&server, &agent).await, vec![id]);
    // Nothing was written to a SQLite file on the side.
    assert!(!server.config.datastore_path().exists());
}

#[tokio::test]
async fn two_servers_redeem_a_join_token_exactly_once() {
    let url = fresh_database().await;
    let a = Arc::new(PgStore::connect(&url, 4).await.unwrap());
    let b = Arc::new(PgStore::connect(&url, 4).await.unwrap());
    for round in 0..5 {
        let token = format!("token-{round}");
        a.create_join_token(&token, SystemTime::now() + Duration::from_secs(600))
            .await
            .unwrap();
        let mut takes = tokio::task::JoinSet::new();
        for i in 0..16 {
            let store = if i % 2 == 0 {
                Arc::clone(&a)
            } else {
                Arc::clone(&b)
            };
            let token = token.clone();
            takes.spawn(async move { store.take_join_token(&token).await });
        }
        let mut redeemed = 0;
        while let Some(result) = takes.join_next().await {
            match result.unwrap() {
                Ok(_) => redeemed += 1,
                Err(DatastoreError::NotFound(_)) => {}
                Err(other) => panic!("unexpected error: {other}"),
            }
        }
        assert_eq!(
            redeemed, 1,
            "round {round}: one agent, whichever server it asked"
        );
    }
}

#[tokio::test]
async fn a_write_through_another_server_is_announced_not_polled_for() {
    // The poll never fires during the test: only PostgreSQL's announcement can deliver it.
    let url = fresh_database().await;
    let server = server_polling(&url, Duration::from_secs(3600)).await;
    let agent = server.attest_new_agent().await;
    let other = PgStore::connect(&url, 2).await.unwrap();
    let entry = RegistrationEntry::new(
        EntryId::generate(),
        SpiffeId::from_path(&trust_domain(), "/written/elsewhere").unwrap(),
        agent.id.clone(),
        [Selector::new("unix", "uid:1000").unwrap()]
            .into_iter()
            .collect(),
        SystemTime::now(),
    );
    let created = other.create_entry(entry).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while sync_ids(&server, &agent).await != vec![created.id.as_str().to_owned()] {
        assert!(
            Instant::now() < deadline,
            "the other server's entry never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_unreachable_or_malformed_database_is_a_clear_error() {
    let error = PgStore::connect("mysql://nope", 2).await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("invalid PostgreSQL connection string"),
        "{error}"
    );
    // A port nobody listens on: refused at once, and the password is not in the message.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://lanyard:s3cret@127.0.0.1:{port}/lanyard?connect_timeout=2");
    let error = PgStore::connect(&url, 2).await.unwrap_err().to_string();
    assert!(error.contains("cannot connect to PostgreSQL"), "{error}");
    assert!(!error.contains("s3cret"), "{error}");
}

#[tokio::test]
async fn servers_connecting_together_migrate_once_and_a_newer_schema_is_refused() {
    let url = fresh_database().await;
    let connects: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PgStore::connect(&url, 2).await })
        })
        .collect();
    for connect in connects {
        connect.await.unwrap().unwrap();
    }
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let expected: Vec<i64> = (1..=PgStore::schema_version()).collect();
    assert_eq!(versions, expected, "each migration applied exactly once");

    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (999999, 'from the future', true, '\\x00', 0)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let error = PgStore::connect(&url, 2).await.unwrap_err().to_string();
    assert!(error.contains("migration"), "{error}");
}

#[tokio::test]
async fn a_sqlite_datastore_moves_to_postgres_with_everything_in_it() {
    use lanyard_server::datastore::transfer::{
        inventory_postgres, inventory_sqlite, migrate_sqlite_to_postgres,
    };

    // A server on SQLite with an agent, entries, a pending join token and its CA.
    let mut server = TestServer::start().await;
    let agent = server.attest_new_agent().await;
    for i in 0..3 {
        create_entry(&server, &format!("/moved/{i}"), &agent.id, 0).await;
    }
    server.join_token(600).await;
    let authorities = server.authorities();
    let mut served = sync_ids(&server, &agent).await;
    served.sort();
    assert_eq!(served.len(), 3);
    if let Some(running) = server.server.take() {
        running.shutdown().await;
    }
    let sqlite = server.config.datastore_path();
    let source = inventory_sqlite(&sqlite).await.unwrap();
    let rows = |inventory: &lanyard_server::datastore::transfer::Inventory, table: &str| {
        inventory
            .tables
            .iter()
            .find(|(name, _)| *name == table)
            .map(|(_, rows)| *rows)
            .unwrap()
    };
    assert_eq!(rows(&source, "registered_entries"), 3);
    assert_eq!(rows(&source, "attested_agents"), 1);
    assert!(rows(&source, "join_tokens") >= 1);
    assert!(rows(&source, "ca_journals") >= 1);

    let url = fresh_database().await;
    let copied = migrate_sqlite_to_postgres(&sqlite, &url, false)
        .await
        .unwrap();
    assert_eq!(copied.tables, source.tables);
    assert_eq!(copied.revision, source.revision);
    assert_eq!(inventory_postgres(&url).await.unwrap(), copied);

    // A second copy into the now full database is refused, and changes nothing; with
    // `replace` it starts over and ends the same.
    let error = migrate_sqlite_to_postgres(&sqlite, &url, false)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("not empty"), "{error}");
    assert_eq!(inventory_postgres(&url).await.unwrap(), copied);
    let replaced = migrate_sqlite_to_postgres(&sqlite, &url, true)
        .await
        .unwrap();
    assert_eq!(replaced, copied);

    // The same keys over the moved datastore: the same CA, the same agent, the same entries.
    server.config.datastore.kind = DatastoreKind::Postgres;
    server.config.datastore.connection_string = Some(ConnectionString::new(url));
    server.server = Some(
        lanyard_server::server::Server::start(server.config.clone(), server.clock.clock())
            .await
            .unwrap(),
    );
    assert_eq!(server.authorities(), authorities);
    let mut after = sync_ids(&server, &agent).await;
    after.sort();
    assert_eq!(after, served);
}

#[tokio::test]
async fn migrating_from_nothing_is_refused_without_creating_it() {
    use lanyard_server::datastore::transfer::migrate_sqlite_to_postgres;

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.sqlite3");
    let url = fresh_database().await;
    let error = migrate_sqlite_to_postgres(&missing, &url, false)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("cannot read"), "{error}");
    assert!(!missing.exists());
}

async fn server_named(url: &str, instance: &str) -> Result<TestServer, String> {
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::support::config_in(dir.path());
    config.datastore.kind = DatastoreKind::Postgres;
    config.datastore.connection_string = Some(ConnectionString::new(url));
    config.instance = instance.to_owned();
    let clock = crate::support::TestClock::new();
    let server = lanyard_server::server::Server::start(config.clone(), clock.clock())
        .await
        .map_err(|e| e.to_string())?;
    Ok(TestServer {
        server: Some(server),
        _dir: dir,
        clock,
        config,
    })
}

fn sorted(mut items: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    items.sort();
    items
}

#[tokio::test]
async fn two_servers_with_their_own_keys_serve_one_trust_domain() {
    let url = fresh_database().await;
    let a = server_named(&url, "a").await.unwrap();
    let b = server_named(&url, "b").await.unwrap();

    // Each publishes its own authority in the shared bundle and serves the other's too.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (of_a, of_b) = (sorted(a.authorities()), sorted(b.authorities()));
        if of_a.len() == 2 && of_a == of_b {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the servers never agreed on a bundle with both authorities: {} and {}",
            of_a.len(),
            of_b.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // An agent attested through A (its SVID signed by A's CA) is served by B, with an entry
    // written through B; and by A, which hears of the entry from B.
    let agent = a.attest_new_agent().await;
    let id = create_entry(&b, "/via/b", &agent.id, 0).await;
    assert_eq!(sync_ids(&b, &agent).await, vec![id.clone()]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while sync_ids(&a, &agent).await != vec![id.clone()] {
        assert!(Instant::now() < deadline, "A never served B's entry");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // An SVID minted by B verifies against the bundle A serves.
    let minted = crate::issuance::mint(&b, &agent, &id).await;
    let chain = &minted.svid.as_ref().expect("minted").cert_chain;
    let roots = a.authorities();
    let root_refs: Vec<&[u8]> = roots.iter().map(Vec::as_slice).collect();
    lanyard_core::x509::verify_svid_chain(chain, &trust_domain(), &root_refs, SystemTime::now())
        .expect("B's SVID verifies against A's bundle");
}

#[tokio::test]
async fn each_server_serves_the_crls_of_every_servers_authority() {
    use lanyard_proto::lanyard::api::v1::agent_revocation_service_client::AgentRevocationServiceClient;
    use lanyard_proto::lanyard::api::v1::revocation_service_client::RevocationServiceClient;
    use lanyard_proto::lanyard::api::v1::{FetchRevocationsRequest, RevokeRequest};

    let url = fresh_database().await;
    let a = server_named(&url, "a").await.unwrap();
    let b = server_named(&url, "b").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.authorities().len() < 2 || b.authorities().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the servers never shared a bundle"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let agent = a.attest_new_agent().await;
    let id = create_entry(&a, "/web", &agent.id, 0).await;
    let by_a = crate::issuance::mint(&a, &agent, &id).await;
    let by_a = by_a.svid.unwrap().cert_chain;
    let deadline = Instant::now() + Duration::from_secs(5);
    while sync_ids(&b, &agent).await != vec![id.clone()] {
        assert!(Instant::now() < deadline, "B never served A's entry");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let by_b = crate::issuance::mint(&b, &agent, &id).await;
    let by_b = by_b.svid.unwrap().cert_chain;
    // Each server revokes the serial its own authority signed.
    for (server, chain) in [(&a, &by_a), (&b, &by_b)] {
        let serial = lanyard_core::x509::serial_decimal(&chain[0]).unwrap();
        RevocationServiceClient::new(server.admin().await)
            .revoke(RevokeRequest {
                kind: "x509-serial".to_owned(),
                value: serial,
                owner: "security".to_owned(),
                reason: "key leaked".to_owned(),
                ticket: String::new(),
                dry_run: false,
            })
            .await
            .unwrap();
    }
    // Through either server the agent gets lists that refuse both: a verifier meeting an SVID
    // of either server's authority finds its issuer's list.
    for server in [&a, &b] {
        let roots = server.authorities();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let fetched = AgentRevocationServiceClient::new(
                server.tls(Some((&agent.chain, &agent.key))).await,
            )
            .fetch_revocations(FetchRevocationsRequest {
                after_sequence: 0,
                crl_number: 0,
            })
            .await
            .unwrap()
            .into_inner();
            let refused = [&by_a, &by_b].into_iter().all(|chain| {
                matches!(
                    lanyard_core::x509::verify_svid_chain_with_crls(
                        chain,
                        &trust_domain(),
                        &roots,
                        &fetched.crls,
                        SystemTime::now(),
                    ),
                    Err(lanyard_core::x509::X509Error::Revoked)
                )
            });
            if refused {
                assert_eq!(fetched.crls.len(), 2, "one list per authority");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} never served lists refusing both servers' SVIDs",
                server.config.instance
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn a_second_server_under_the_same_instance_name_is_refused() {
    let url = fresh_database().await;
    let _a = server_named(&url, "same").await.unwrap();
    // Another data directory, so other keys: the journal names keys it does not have.
    let error = server_named(&url, "same").await.err().expect("refused");
    assert!(error.contains("key"), "{error}");
}

#[tokio::test]
async fn a_rotation_on_one_server_does_not_invalidate_the_others() {
    use lanyard_server::ca::AuthorityKind;

    let url = fresh_database().await;
    let a = server_named(&url, "a").await.unwrap();
    let b = server_named(&url, "b").await.unwrap();
    let agree_on = |count: usize| {
        let (a, b) = (&a, &b);
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let (of_a, of_b) = (sorted(a.authorities()), sorted(b.authorities()));
                if of_a.len() == count && of_a == of_b {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "no agreement on {count} authorities: {} and {}",
                    of_a.len(),
                    of_b.len()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    agree_on(2).await;
    let agent = a.attest_new_agent().await;
    let id = create_entry(&a, "/rotated", &agent.id, 0).await;

    // A prepares and activates a new authority: B serves it too, and A's old one stays.
    let ca = &a.server().state().ca;
    let prepared = ca
        .prepare_authority(AuthorityKind::X509, SystemTime::now())
        .await
        .unwrap();
    ca.activate_authority(
        AuthorityKind::X509,
        &prepared.authority_id,
        SystemTime::now(),
    )
    .await
    .unwrap();
    agree_on(3).await;

    // The agent's SVID from A's old authority still works with B, and an SVID from A's new
    // authority verifies against B's bundle.
    assert_eq!(sync_ids(&b, &agent).await, vec![id.clone()]);
    let minted = crate::issuance::mint(&a, &agent, &id).await;
    let chain = &minted.svid.as_ref().expect("minted").cert_chain;
    let roots = b.authorities();
    let root_refs: Vec<&[u8]> = roots.iter().map(Vec::as_slice).collect();
    lanyard_core::x509::verify_svid_chain(chain, &trust_domain(), &root_refs, SystemTime::now())
        .expect("A's new authority is in B's bundle");
}

#[tokio::test]
async fn admin_listings_read_the_replica_and_authorization_never_does() {
    use lanyard_proto::spire::api::server::entry::v1::CountEntriesRequest;
    use lanyard_proto::spire::api::server::entry::v1::entry_client::EntryClient;

    // A stand-in for a replica that has not caught up: another database with the schema and
    // nothing in it. What the server reads from it shows which reads go there.
    let primary = fresh_database().await;
    let replica = fresh_database().await;
    PgStore::connect(&replica, 2).await.unwrap();
    let (primary_url, replica_url) = (primary.clone(), replica.clone());
    let mut server = TestServer::start_with(move |config| {
        config.datastore.kind = DatastoreKind::Postgres;
        config.datastore.connection_string = Some(ConnectionString::new(primary_url));
        config.datastore.read_connection_string = Some(ConnectionString::new(replica_url));
    })
    .await;
    let agent = server.attest_new_agent().await;
    let id = create_entry(&server, "/replicated", &agent.id, 0).await;

    // The index a server loads at start comes from the primary too: a replica behind the
    // change log would leave it without what the catch-up will never bring again.
    server.restart().await;

    // Sync and issuance decide on the primary: the entry is served at once.
    assert_eq!(sync_ids(&server, &agent).await, vec![id.clone()]);
    crate::issuance::mint(&server, &agent, &id)
        .await
        .svid
        .expect("minted from the primary's entry");
    // The admin count reads the replica, which has not seen it.
    let count = EntryClient::new(server.admin().await)
        .count_entries(CountEntriesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .count;
    assert_eq!(count, 0);
    let on_primary = PgStore::connect(&primary, 2).await.unwrap();
    assert_eq!(
        on_primary
            .count_entries(&lanyard_server::datastore::EntryFilter::default())
            .await
            .unwrap(),
        1
    );
}

#[tokio::test]
async fn a_server_rides_out_a_postgres_crash_and_restart() {
    use lanyard_proto::spire::api::server::entry::v1 as entry_pb;
    use lanyard_proto::spire::api::server::entry::v1::entry_client::EntryClient;
    use lanyard_proto::spire::api::types;

    let cluster = crate::pg::Dedicated::start().unwrap();
    let url = cluster.fresh_database().await;
    // Only announcements bring other servers' writes in quickly: they must work again too.
    let server = server_polling(&url, Duration::from_secs(3600)).await;
    let agent = server.attest_new_agent().await;
    let before = create_entry(&server, "/before", &agent.id, 0).await;

    let try_create = |path: &'static str| {
        let server = &server;
        let parent = agent.id.clone();
        async move {
            let id = SpiffeId::from_path(&trust_domain(), path).unwrap();
            let response = EntryClient::new(server.admin().await)
                .batch_create_entry(entry_pb::BatchCreateEntryRequest {
                    entries: vec![types::Entry {
                        spiffe_id: Some(lanyard_proto::convert::spiffe_id_to_proto(&id)),
                        parent_id: Some(lanyard_proto::convert::spiffe_id_to_proto(&parent)),
                        selectors: vec![types::Selector {
                            r#type: "unix".into(),
                            value: "uid:1000".into(),
                        }],
                        ..Default::default()
                    }],
                    output_mask: None,
                })
                .await
                .expect("the server answers, whatever the datastore does")
                .into_inner();
            let result = response.results.into_iter().next().unwrap();
            (result.status.unwrap().code == 0).then(|| result.entry.unwrap().id)
        }
    };

    cluster.kill();
    // While PostgreSQL is down, a write fails with an answer: no hang, no crash.
    assert_eq!(try_create("/during").await, None);

    cluster.start_again();
    // The server reconnects by itself: writes succeed again...
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        if let Some(id) = try_create("/after").await {
            break id;
        }
        assert!(Instant::now() < deadline, "writes never worked again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // ...and hears other servers' announcements again.
    let other = PgStore::connect(&url, 2).await.unwrap();
    let elsewhere = other
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
    let mut expected = vec![before, after, elsewhere.id.as_str().to_owned()];
    expected.sort();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut served = sync_ids(&server, &agent).await;
        served.sort();
        if served == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the restart, served {served:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
