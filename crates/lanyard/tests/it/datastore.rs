//! `lanyard datastore check` and `migrate`: the real binary on a real SQLite file and a real
//! PostgreSQL database (the cluster of `lanyard-server/tests/it/pg.rs`).

use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use lanyard_core::{EntryId, RegistrationEntry, Selector, SpiffeId, TrustDomain};
use lanyard_server::datastore::{Datastore, SqlStore};

fn lanyard(args: &[&str], url: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lanyard"));
    command.args(args).env_remove("LANYARD_DATASTORE_URL");
    if let Some(url) = url {
        command.env("LANYARD_DATASTORE_URL", url);
    }
    command.output().expect("the lanyard binary runs")
}

fn tables(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    json["tables"].clone()
}

#[tokio::test]
async fn check_counts_and_migrate_moves_a_sqlite_datastore_to_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("datastore.sqlite3");
    let store = SqlStore::open(&path).await.unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    for i in 0..2 {
        store
            .create_entry(RegistrationEntry::new(
                EntryId::generate(),
                SpiffeId::from_path(&td, &format!("/w/{i}")).unwrap(),
                SpiffeId::from_path(&td, "/spire/agent/x").unwrap(),
                [Selector::new("unix", "uid:1000").unwrap()]
                    .into_iter()
                    .collect(),
                SystemTime::now(),
            ))
            .await
            .unwrap();
    }
    store
        .create_join_token("a-token", SystemTime::now() + Duration::from_secs(600))
        .await
        .unwrap();
    store
        .create_federation_relationship(lanyard_core::FederationRelationship::new(
            TrustDomain::new("partner.example").unwrap(),
            "https://partner.example/bundle".parse().unwrap(),
            lanyard_core::BundleEndpointProfile::HttpsWeb,
        ))
        .await
        .unwrap();
    store.close().await;
    let sqlite = path.to_str().unwrap();

    let source = tables(&lanyard(
        &["datastore", "check", "--sqlite", sqlite, "--output", "json"],
        None,
    ));
    assert_eq!(source["registered_entries"], 2);
    assert_eq!(source["entry_selectors"], 2);
    assert_eq!(source["join_tokens"], 1);
    assert_eq!(source["federation_relationships"], 1);

    // The URL comes from the environment, out of the process list.
    let url = crate::pg::fresh_database().await;
    let migrated = lanyard(&["datastore", "migrate", "--from", sqlite], Some(&url));
    let stdout = String::from_utf8_lossy(&migrated.stdout);
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    assert!(stdout.contains("the counts match"), "{stdout}");
    assert!(stdout.contains("registered_entries"), "{stdout}");
    let target = tables(&lanyard(
        &["datastore", "check", "--postgres", &url, "--output", "json"],
        None,
    ));
    assert_eq!(target, source);

    // Once is enough: a second run is one clear error line and changes nothing.
    let again = lanyard(&["datastore", "migrate", "--from", sqlite], Some(&url));
    assert_eq!(again.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("not empty") && stderr.contains("--replace"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let unchanged = tables(&lanyard(
        &["datastore", "check", "--output", "json"],
        Some(&url),
    ));
    assert_eq!(unchanged, source);
}

#[test]
fn check_needs_a_datastore_and_refuses_a_missing_file() {
    let none = lanyard(&["datastore", "check"], None);
    assert_eq!(none.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&none.stderr).contains("--sqlite"));
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("gone.sqlite3");
    let output = lanyard(
        &["datastore", "check", "--sqlite", missing.to_str().unwrap()],
        None,
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot read"));
    assert!(!missing.exists(), "checking never creates a datastore");
}
