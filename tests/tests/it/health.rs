//! The HTTP health checks (`health_address`) of a server and an agent as processes: both
//! live and ready; the server killed, the agent stays live but turns unready once its last
//! sync is stale, and ready again when the server is back.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use lanyard_e2e::{Cluster, free_port, poll};

/// `GET path` on 127.0.0.1:`port`: the status code and body.
fn get(port: u16, path: &str) -> Result<(u16, String), String> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut response = String::new();
    tcp.read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

fn wait_for(port: u16, path: &str, status: u16) -> String {
    poll(
        &format!("GET {path} on :{port} to answer {status}"),
        Duration::from_secs(45),
        || match get(port, path) {
            Ok((got, body)) if got == status => Ok(body),
            Ok((got, body)) => Err(format!("{got} {body}")),
            Err(e) => Err(e),
        },
    )
}

#[test]
fn health_checks_over_http_follow_the_server_and_the_agent() {
    let (server_port, agent_port) = (free_port(), free_port());
    let mut cluster = Cluster::start_with(
        &format!("health_address = \"127.0.0.1:{server_port}\""),
        &format!("health_address = \"127.0.0.1:{agent_port}\""),
    );
    assert_eq!(wait_for(server_port, "/live", 200), "live\n");
    assert_eq!(wait_for(server_port, "/ready", 200), "ready\n");
    assert_eq!(wait_for(agent_port, "/live", 200), "live\n");
    assert_eq!(wait_for(agent_port, "/ready", 200), "ready\n");
    assert_eq!(get(agent_port, "/nope").map(|(status, _)| status), Ok(404));

    // The server goes: the agent keeps serving what it holds, so it stays live, but its sync
    // goes stale and it says so.
    cluster.server.kill();
    let reason = wait_for(agent_port, "/ready", 503);
    assert!(reason.contains("last successful sync"), "{reason}");
    assert_eq!(get(agent_port, "/live").map(|(status, _)| status), Ok(200));
    assert!(get(server_port, "/live").is_err(), "a dead server answers");

    cluster.server.start_again();
    wait_for(server_port, "/ready", 200);
    wait_for(agent_port, "/ready", 200);
}
