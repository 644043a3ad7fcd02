//! Usage reports end to end: a workload fetching its SVID from a whole agent (manager and
//! Workload API) against an in-process server makes the server's `ListUsage` show when that
//! agent last served the entry, and nothing for an entry no workload fetched.

use std::os::unix::fs::MetadataExt as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanyard_proto::lanyard::api::v1::usage_service_client::UsageServiceClient;
use lanyard_proto::lanyard::api::v1::{EntryUsage, ListUsageRequest};
use lanyard_proto::spire::api::types;

use crate::manager::{Env, SYNC_INTERVAL, WAIT, join_token_agent};

fn unix_now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

fn uid_selector(uid: u32) -> types::Selector {
    types::Selector {
        r#type: "unix".into(),
        value: format!("uid:{uid}"),
    }
}

async fn usage_of(env: &Env, entry_ids: &[&str]) -> Vec<EntryUsage> {
    UsageServiceClient::new(env.admin().await)
        .list_usage(ListUsageRequest {
            entry_ids: entry_ids.iter().map(|id| (*id).to_owned()).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .usage
}

#[tokio::test]
async fn a_workload_fetching_its_svid_shows_in_the_servers_usage() {
    let env = Env::start().await;
    let token = env.join_token().await;
    let agent_id = join_token_agent(&token);
    let my_uid = std::fs::metadata("/proc/self").unwrap().uid();
    let served = env
        .create_entry(&agent_id, "served", |e| {
            e.selectors = vec![uid_selector(my_uid)];
        })
        .await;
    // Minted by the agent like the other, but no workload of this UID exists.
    let idle = env
        .create_entry(&agent_id, "idle", |e| {
            e.selectors = vec![uid_selector(my_uid.wrapping_add(4_000_000))];
        })
        .await;

    let mut config = env.agent_config("agent");
    config.join_token = Some(token);
    config.socket_path = env.dir.path().join("workload").join("api.sock");
    let socket = config.socket_path.clone();
    let agent = lanyard_agent::Agent::start(config).await.unwrap();

    let before_fetch = unix_now();
    let client = spiffe::WorkloadApiClient::connect_to(format!("unix://{}", socket.display()))
        .await
        .unwrap();
    let context = tokio::time::timeout(WAIT, client.fetch_x509_context())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        context.default_svid().unwrap().spiffe_id().to_string(),
        "spiffe://example.org/served"
    );
    let fetched = tokio::time::Instant::now();

    // The agent reports after its next sync; allow a few intervals for a busy machine.
    let deadline = fetched + (SYNC_INTERVAL * 10).max(Duration::from_secs(10));
    let record = loop {
        let usage = usage_of(&env, &[&served, &idle]).await;
        let found = usage
            .iter()
            .find(|u| u.entry_id == served && u.last_served_at > 0)
            .cloned();
        if let Some(record) = found {
            // Nothing was served for the idle entry, though its SVID was issued.
            let idle_usage: Vec<&EntryUsage> =
                usage.iter().filter(|u| u.entry_id == idle).collect();
            assert!(
                idle_usage.iter().all(|u| u.last_served_at == 0),
                "{idle_usage:?}"
            );
            break record;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server never heard that the entry was served: {usage:?}"
        );
        tokio::time::sleep(SYNC_INTERVAL / 2).await;
    };
    assert_eq!(record.agent_id, agent_id.to_string());
    assert!(
        record.last_served_at >= before_fetch && record.last_served_at <= unix_now(),
        "{record:?}"
    );
    assert!(
        record.issued >= 1 && record.last_issued_at > 0,
        "{record:?}"
    );

    agent.shutdown().await;
}
