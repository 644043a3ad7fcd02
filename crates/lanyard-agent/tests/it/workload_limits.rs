//! What one caller may take of the Workload API, on a real socket with small configured
//! limits: connections per uid, a stream the workload never reads, calls per second.

use std::path::Path;
use std::time::Duration;

use lanyard_agent::config::WorkloadApiConfig;
use lanyard_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use lanyard_proto::workload::{JwtsvidRequest, X509svidRequest};
use tonic::transport::{Channel, Endpoint};

use crate::workload_api::{Agent, Pki, WAIT, my_uid_selector, with_header, within};

/// A new connection to `socket` that has been served one X.509 message; the channel keeps
/// the connection open. Errors are the client's description of what failed.
async fn served_connection(socket: &Path) -> Result<Channel, String> {
    let channel = Endpoint::from_shared(format!("unix://{}", socket.display()))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut client = SpiffeWorkloadApiClient::new(channel.clone());
    let mut stream = within(client.fetch_x509svid(with_header(X509svidRequest {})))
        .await
        .map_err(|status| format!("FetchX509SVID: {status}"))?
        .into_inner();
    match within(stream.message()).await {
        Ok(Some(_)) => Ok(channel),
        Ok(None) => Err("the stream ended at once".to_owned()),
        Err(status) => Err(format!("first message: {status}")),
    }
}

#[tokio::test]
async fn a_uid_over_its_connection_cap_is_refused_until_one_of_its_connections_closes() {
    let pki = Pki::new();
    let web = pki.entry("web", "/web", &[my_uid_selector()], "");
    let limits = WorkloadApiConfig {
        max_connections_per_uid: 2,
        ..WorkloadApiConfig::default()
    };
    let agent = Agent::start_with(&pki, pki.snapshot(&[web]), |api| api.with_limits(limits)).await;

    let first = served_connection(&agent.socket).await.unwrap();
    let _second = served_connection(&agent.socket).await.unwrap();
    let refused = served_connection(&agent.socket).await;
    assert!(
        refused.is_err(),
        "a third connection of the same uid was served"
    );

    // Closing one makes room for one more, and only one.
    drop(first);
    let deadline = tokio::time::Instant::now() + WAIT;
    let _third = loop {
        match served_connection(&agent.socket).await {
            Ok(channel) => break channel,
            Err(error) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no connection was served after one closed: {error}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(served_connection(&agent.socket).await.is_err());
    agent.stop().await;
}

/// How a stream that the attacker finally reads turns out.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// Closed by the server (cleanly or with an error).
    Closed,
    /// Still open after `WAIT`.
    StillOpen,
}

#[tokio::test]
async fn a_stream_the_workload_never_reads_is_closed_and_the_agent_lets_go_of_it() {
    let pki = Pki::new();
    // Each message carries a fresh SVID and a hint larger than the attacker's 64 KiB stream
    // window, so a stream nobody reads fills up after one message.
    let big_hint = "h".repeat(80 * 1024);
    let snapshot = |n: u32| {
        let web = pki.entry(
            "web",
            "/web",
            &[my_uid_selector()],
            &format!("{n}{big_hint}"),
        );
        pki.snapshot(&[web])
    };
    let limits = WorkloadApiConfig {
        stream_send_timeout: Duration::from_millis(300),
        ..WorkloadApiConfig::default()
    };
    let agent = Agent::start_with(&pki, snapshot(0), |api| api.with_limits(limits)).await;

    // A workload that reads.
    let mut good = agent.raw_client().await;
    let mut good_stream = within(good.fetch_x509svid(with_header(X509svidRequest {})))
        .await
        .unwrap()
        .into_inner();
    within(good_stream.message()).await.unwrap().unwrap();
    let metrics = tokio::runtime::Handle::current().metrics();
    let tasks_before = metrics.num_alive_tasks();

    // One that opens a stream and never reads it, from its own runtime, so that the tasks
    // counted here are the agent's (and the good workload's).
    let socket = agent.socket.clone();
    let (opened, is_open) = tokio::sync::oneshot::channel::<()>();
    let (read_now, reading) = tokio::sync::oneshot::channel::<()>();
    let attacker = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            // HTTP/2's default 64 KiB windows (hyper's client asks for megabytes), so that
            // the agent soon has more to send than the workload lets it.
            let channel = Endpoint::from_shared(format!("unix://{}", socket.display()))
                .unwrap()
                .initial_stream_window_size(65_535)
                .initial_connection_window_size(65_535)
                .connect()
                .await
                .unwrap();
            let mut client = SpiffeWorkloadApiClient::new(channel);
            let mut stream = within(client.fetch_x509svid(with_header(X509svidRequest {})))
                .await
                .unwrap()
                .into_inner();
            opened.send(()).unwrap();
            let _ = reading.await;
            loop {
                match tokio::time::timeout(WAIT, stream.message()).await {
                    Ok(Ok(Some(_))) => {}
                    Ok(Ok(None) | Err(_)) => return Ending::Closed,
                    Err(_) => return Ending::StillOpen,
                }
            }
        })
    });
    within(is_open).await.unwrap();

    // The agent pushes new SVIDs; the good workload gets every one of them meanwhile.
    for n in 1..=5 {
        agent.publish(snapshot(n));
        let message = within(good_stream.message()).await.unwrap().unwrap();
        assert!(message.svids[0].hint.starts_with(&n.to_string()));
    }

    // The unread stream's connection is closed and everything the agent held for it
    // (connection, stream and watch tasks) is gone.
    let deadline = tokio::time::Instant::now() + WAIT;
    while metrics.num_alive_tasks() > tasks_before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent still holds {} tasks for the unread stream",
            metrics.num_alive_tasks() - tasks_before
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    read_now.send(()).unwrap();
    let ending = tokio::task::spawn_blocking(move || attacker.join().unwrap())
        .await
        .unwrap();
    assert_eq!(ending, Ending::Closed);

    // The good workload is still served.
    agent.publish(snapshot(6));
    let message = within(good_stream.message()).await.unwrap().unwrap();
    assert!(message.svids[0].hint.starts_with('6'));
    agent.stop().await;
}

#[tokio::test]
async fn calls_over_the_rate_fail_with_resource_exhausted() {
    let pki = Pki::new();
    let web = pki.entry("web", "/web", &[my_uid_selector()], "");
    let limits = WorkloadApiConfig {
        requests_per_second_per_uid: 1,
        request_burst_per_uid: 3,
        ..WorkloadApiConfig::default()
    };
    let agent = Agent::start_with(&pki, pki.snapshot(&[web]), |api| api.with_limits(limits)).await;
    let mut client = agent.raw_client().await;
    let fetch_jwt = || JwtsvidRequest {
        audience: vec!["api".to_owned()],
        spiffe_id: String::new(),
    };

    // The burst, then refusals: ten calls cannot all fit in three plus one per second.
    let mut outcomes = Vec::new();
    for _ in 0..10 {
        outcomes.push(within(client.fetch_jwtsvid(with_header(fetch_jwt()))).await);
    }
    assert!(outcomes.iter().take(3).all(Result::is_ok), "{outcomes:?}");
    let status = outcomes
        .iter()
        .find_map(|outcome| outcome.as_ref().err())
        .expect("no call was refused");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("rate limit exceeded"),
        "{status:?}"
    );

    // Streams count too.
    let status = within(client.fetch_x509svid(with_header(X509svidRequest {})))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    agent.stop().await;
}
