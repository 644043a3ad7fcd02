//! The agent's end of `lanyard.api.v1.AgentChangeService.WatchChanges`: one stream to the
//! server, kept open while the agent runs, whose notices become the machine's push events.
//!
//! - The first notice of a stream is `PushConnected` then `PushNotified`: whatever changed
//!   while no stream was open is caught by that sync.
//! - Later notices are `PushNotified` when they move the revision, the sequence (a policy
//!   reloaded, an exception lapsing), the revocation sequence or the CRL number (lists signed
//!   anew); the server's keepalive repeats ask for nothing.
//! - A stream that ends or fails is `PushLost` (the machine polls at `sync_interval` again) and
//!   is opened again after a backoff (1 s doubling to 1 min, reset by a stream that worked).
//! - A server without the service (SPIRE's) answers `Unimplemented`: the agent polls as SPIRE's
//!   agents do, and asks again every [`UNSUPPORTED_RETRY`] in case it now talks to another
//!   server of the trust domain.

use std::sync::Arc;
use std::time::Duration;

use lanyard_proto::lanyard::api::v1::WatchChangesRequest;
use lanyard_proto::lanyard::api::v1::agent_change_service_client::AgentChangeServiceClient;
use tokio::sync::{mpsc, watch};

use super::client::ServerClient;
use super::machine::Event;

/// The first wait before a failed or ended stream is opened again.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between attempts.
const MAX_RETRY: Duration = Duration::from_secs(60);
/// How long the agent waits before asking a server that lacks the service again.
const UNSUPPORTED_RETRY: Duration = Duration::from_secs(5 * 60);

/// Keeps a change stream open to the server until `stop`, sending what it hears to `events`.
/// Returns when `stop` turns true or the runner stops listening.
pub(super) async fn watch_changes(
    client: Arc<ServerClient>,
    events: mpsc::Sender<Event>,
    mut stop: watch::Receiver<bool>,
) {
    let mut retry = FIRST_RETRY;
    let mut told_unsupported = false;
    loop {
        let wait = match stream_once(&client, &events, &mut stop).await {
            Outcome::Stopped => return,
            Outcome::Ended { worked: true } => {
                retry = FIRST_RETRY;
                retry
            }
            Outcome::Ended { worked: false } => {
                let wait = retry;
                retry = (retry * 2).min(MAX_RETRY);
                wait
            }
            Outcome::Unsupported => {
                if !told_unsupported {
                    tracing::info!(
                        "the server pushes no changes (it has no lanyard.api.v1.AgentChangeService); polling every sync interval"
                    );
                    told_unsupported = true;
                }
                UNSUPPORTED_RETRY
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
    }
}

enum Outcome {
    /// The agent is stopping, or the runner is gone.
    Stopped,
    /// The stream could not be opened or ended; `worked` when it delivered a notice.
    Ended { worked: bool },
    /// The server has no change service.
    Unsupported,
}

async fn stream_once(
    client: &ServerClient,
    events: &mpsc::Sender<Event>,
    stop: &mut watch::Receiver<bool>,
) -> Outcome {
    let Ok(channel) = client.channel() else {
        return Outcome::Ended { worked: false };
    };
    let mut changes = AgentChangeServiceClient::new(channel);
    let opened = tokio::select! {
        opened = changes.watch_changes(WatchChangesRequest {}) => opened,
        _ = stop.wait_for(|stopped| *stopped) => return Outcome::Stopped,
    };
    let mut stream = match opened {
        Ok(response) => response.into_inner(),
        Err(status) if status.code() == tonic::Code::Unimplemented => return Outcome::Unsupported,
        Err(status) => {
            tracing::debug!(%status, "cannot open the change stream");
            return Outcome::Ended { worked: false };
        }
    };
    let mut last: Option<(i64, u64, i64, u64)> = None;
    loop {
        let message = tokio::select! {
            message = stream.message() => message,
            _ = stop.wait_for(|stopped| *stopped) => return Outcome::Stopped,
        };
        let event = match message {
            Ok(Some(notice)) => {
                if last.is_none() && events.send(Event::PushConnected).await.is_err() {
                    return Outcome::Stopped;
                }
                let point = (
                    notice.revision,
                    notice.sequence,
                    notice.revocation_sequence,
                    notice.crl_number,
                );
                let moved = last != Some(point);
                last = Some(point);
                if !moved {
                    continue;
                }
                Event::PushNotified
            }
            Ok(None) | Err(_) => {
                if last.is_some() && events.send(Event::PushLost).await.is_err() {
                    return Outcome::Stopped;
                }
                return Outcome::Ended {
                    worked: last.is_some(),
                };
            }
        };
        if events.send(event).await.is_err() {
            return Outcome::Stopped;
        }
    }
}
