//! `lanyard server healthcheck`: the standard `grpc.health.v1.Health/Check` on the admin
//! socket, for probes and scripts.

use std::io::Write;

use clap::Args;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::admin::describe_status;
use crate::cli::client::SocketArgs;

#[derive(Debug, Args)]
pub(crate) struct HealthcheckArgs {
    #[command(flatten)]
    socket: SocketArgs,
}

/// Why the server is not healthy. Printed as it is (`Server is unhealthy: …`), not as a
/// generic `error:` line, so that probes can match SPIRE's wording.
#[derive(Debug)]
pub(crate) struct Unhealthy(String);

impl std::fmt::Display for Unhealthy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Server is unhealthy: {}", self.0)
    }
}

impl std::error::Error for Unhealthy {}

pub(crate) async fn healthcheck(args: &HealthcheckArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let client = args
        .socket
        .connect()
        .await
        .map_err(|err| Unhealthy(format!("{err:#}")))?;
    // The empty service name asks about the server as a whole, which is all SPIRE answers.
    let request = HealthCheckRequest {
        service: String::new(),
    };
    let response = client
        .health()
        .check(request)
        .await
        .map_err(|status| Unhealthy(describe_status(status.code(), status.message())))?
        .into_inner();
    match ServingStatus::try_from(response.status) {
        Ok(ServingStatus::Serving) => {
            writeln!(out, "Server is healthy.")?;
            Ok(())
        }
        Ok(status) => Err(Unhealthy(format!("status is {}", status.as_str_name())).into()),
        Err(_) => Err(Unhealthy(format!("unknown status {}", response.status)).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhealthy_reads_like_spire() {
        let err = anyhow::Error::new(Unhealthy("status is NOT_SERVING".into()));
        assert_eq!(
            err.to_string(),
            "Server is unhealthy: status is NOT_SERVING"
        );
        assert!(err.downcast_ref::<Unhealthy>().is_some());
    }
}
