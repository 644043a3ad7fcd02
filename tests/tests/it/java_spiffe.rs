//! java-spiffe, the Java SPIFFE library (`io.spiffe:java-spiffe-core` over grpc-java and Netty
//! epoll), as a workload of a real agent: the program in `tests/interop/java-spiffe` (built
//! once per machine with Maven by [`lanyard_e2e::toolchain::java_spiffe_client`]) fetches an
//! X.509-SVID, the X.509 bundles and a JWT-SVID through `DefaultWorkloadApiClient`, and
//! validates the JWT through the Workload API and offline; the test checks what it saw against
//! the server.
//!
//! grpc-java sends the raw socket path as `:authority` over Unix sockets, so this also guards
//! the agent's HTTP/2 layer against refusing it (see `vendor/README.md`).
//!
//! Without a JDK and Maven the test fails and says how to install them, unless
//! `LANYARD_E2E_SKIP_JAVA=1`.

use std::time::Duration;

use lanyard_e2e::toolchain::{JavaClient, SKIP_JAVA_VAR, java_spiffe_client};
use lanyard_e2e::{ChildProcess, Cluster, assert_client_jwt, assert_client_x509, current_uid};
use serde_json::Value;

const AUDIENCE: &str = "e2e-java";

/// The program bounds itself at 20 s; the JVM's start on a busy two-core machine comes on top.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn java_spiffe_fetches_svids_and_validates_a_jwt() {
    let Some(client) = client() else { return };
    let cluster = Cluster::start();
    let id = cluster.register_uid("/e2e/java", current_uid(), &["--hint", "java"]);
    cluster.agent.wait_for_svids(None, &[&id]);

    let seen = run(&cluster, client);

    // X.509: exactly our identity, a chain that verifies against the server's authorities,
    // and exactly those authorities as the trust domain's bundle.
    assert_eq!(seen["x509_spiffe_id"], id.as_str(), "{seen}");
    assert_eq!(seen["x509_hint"], "java", "{seen}");
    assert_eq!(seen["x509_context_svids"], 1, "{seen}");
    assert_client_x509(&cluster.server, &seen, &id, "java-spiffe");

    // JWT: minted for us and the audience, valid through the agent, offline in Java and
    // against the server's own bundle, and refused by the agent for another audience.
    assert_client_jwt(&cluster.server, &seen, &id, AUDIENCE, "java-spiffe");
    let refusal = seen["wrong_audience_error"].as_str().unwrap_or_default();
    assert!(
        refusal.contains("INVALID_ARGUMENT"),
        "ValidateJWTSVID for another audience should fail with INVALID_ARGUMENT: {seen}"
    );
}

/// The java-spiffe client, built if needed; `None` when `LANYARD_E2E_SKIP_JAVA=1`.
fn client() -> Option<&'static JavaClient> {
    if std::env::var_os(SKIP_JAVA_VAR).is_some_and(|value| value == "1") {
        skip_notice();
        return None;
    }
    Some(java_spiffe_client())
}

#[allow(clippy::print_stderr)]
fn skip_notice() {
    eprintln!("lanyard-e2e: {SKIP_JAVA_VAR}=1, skipping the java-spiffe test");
}

/// Runs the program against the cluster's agent (bounded; its output goes to `java.log` in the
/// cluster's directory, shown on failure) and returns the JSON object it printed.
fn run(cluster: &Cluster, client: &JavaClient) -> Value {
    let mut command = client.command();
    command
        .arg(AUDIENCE)
        .env("SPIFFE_ENDPOINT_SOCKET", cluster.agent.endpoint());
    let mut process = ChildProcess::new("java-spiffe client", cluster.dir().join("java.log"));
    process.start(command);
    let status = process.wait_for_exit(RUN_TIMEOUT);
    let log = process.log();
    assert!(
        status.success(),
        "java-spiffe failed against the agent ({status}){}\n{}\n{}",
        if log.contains("PROTOCOL_ERROR") || log.contains("RST_STREAM") {
            " (a reset stream is the agent's HTTP/2 layer refusing the request; grpc-java \
             sends the raw socket path as `:authority` over Unix sockets)"
        } else {
            ""
        },
        process.log_tail(60),
        cluster.logs()
    );
    let objects: Vec<Value> = log
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    match objects.as_slice() {
        [seen] => seen.clone(),
        _ => panic!("expected one JSON object from java-spiffe:\n{log}"),
    }
}
