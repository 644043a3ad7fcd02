//! `lanyard.api.v1.AgentChangeService`: changes pushed to agents. An attested agent holds one
//! `WatchChanges` stream open; the server sends the change-log revision at once and again
//! whenever it applies a change ([`ServerState::catch_up`]) that moves what that agent can
//! see ([`ServerState::agent_view`]: its authorized entries, its standing, the bundles), and
//! the agent syncs on each notice instead of waiting for its interval. A write that concerns
//! other agents only is not announced to this one. The stream carries no entries: what an
//! agent obtains is still decided, and audited, by its sync.
//!
//! A stream costs the server a small task and a `watch` receiver, and one agent holds at most
//! [`MAX_STREAMS_PER_AGENT`]. Notices are coalesced: an
//! agent that stops reading holds at most its HTTP/2 flow-control window of them plus one,
//! after which the revisions it misses collapse into the newest. A quiet stream repeats the
//! current revision every [`KEEPALIVE_INTERVAL`], which keeps its connection from counting as
//! idle. Streams end when the server stops, so they never hold up a shutdown.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use lanyard_core::SpiffeId;

use lanyard_proto::lanyard::api::v1::agent_change_service_server::{
    AgentChangeService as AgentChangeRpc, AgentChangeServiceServer,
};
use lanyard_proto::lanyard::api::v1::{ChangeNotice, WatchChangesRequest};
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::Authorizer;
use crate::state::ServerState;

const WATCH_CHANGES: &str = "/lanyard.api.v1.AgentChangeService/WatchChanges";

/// How often a quiet stream repeats the current revision: well within the listener's
/// `connection_idle_timeout` (120 s by default), so that an agent's open stream is not taken
/// for an idle connection. An agent ignores a notice that does not move the revision.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(50);

/// How many change streams one agent may hold open at once. An agent needs one; a few more
/// cover a reconnect racing the old stream's end. Beyond that a stream is refused with
/// `ResourceExhausted`, so one agent cannot tie up a task per stream without bound.
pub const MAX_STREAMS_PER_AGENT: usize = 4;

/// Open streams per agent.
type OpenStreams = Arc<std::sync::Mutex<HashMap<SpiffeId, usize>>>;

/// One open stream of an agent, counted until it is dropped (when its task ends).
struct StreamSlot {
    open: OpenStreams,
    agent: SpiffeId,
}

impl StreamSlot {
    fn take(open: &OpenStreams, agent: &SpiffeId) -> Option<Self> {
        let mut counts = open.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(agent.clone()).or_default();
        if *count >= MAX_STREAMS_PER_AGENT {
            return None;
        }
        *count += 1;
        Some(Self {
            open: Arc::clone(open),
            agent: agent.clone(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut counts = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.agent) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.agent);
            }
        }
    }
}

/// The change service.
#[derive(Debug, Clone)]
pub struct AgentChangeService {
    state: Arc<ServerState>,
    auth: Authorizer,
    stopped: watch::Receiver<bool>,
    open: OpenStreams,
}

impl AgentChangeService {
    /// A service over `state` whose streams end once `stopped` turns true.
    pub fn new(state: Arc<ServerState>, stopped: watch::Receiver<bool>) -> Self {
        let auth = Authorizer::new(Arc::clone(&state));
        Self {
            state,
            auth,
            stopped,
            open: OpenStreams::default(),
        }
    }

    /// The tonic service.
    pub fn into_server(self) -> AgentChangeServiceServer<Self> {
        AgentChangeServiceServer::new(self)
    }
}

type NoticeStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<ChangeNotice, Status>> + Send>>;

#[tonic::async_trait]
impl AgentChangeRpc for AgentChangeService {
    type WatchChangesStream = NoticeStream;

    async fn watch_changes(
        &self,
        request: Request<WatchChangesRequest>,
    ) -> Result<Response<Self::WatchChangesStream>, Status> {
        let caller = self.auth.agent(&request, WATCH_CHANGES).await?;
        let slot = StreamSlot::take(&self.open, caller.id()).ok_or_else(|| {
            Status::resource_exhausted(format!(
                "{MAX_STREAMS_PER_AGENT} change streams are open for this agent already"
            ))
        })?;
        let mut changes = self.state.watch_changes();
        let mut stopped = self.stopped.clone();
        let state = Arc::clone(&self.state);
        let agent_id = caller.id().clone();
        // One notice in flight: while the agent has not read it, later revisions coalesce in
        // the watch and the newest goes next.
        let (notices, receiver) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let _slot = slot;
            // What the agent was last told, and what it could see then.
            let mut announced = *changes.borrow_and_update();
            let mut view = state.agent_view(&agent_id, announced);
            loop {
                let notice = ChangeNotice {
                    revision: announced.revision,
                    sequence: announced.sequence,
                    revocation_sequence: announced.revocations,
                    crl_number: announced.crls,
                };
                tokio::select! {
                    sent = notices.send(Ok(notice)) => {
                        if sent.is_err() {
                            return;
                        }
                    }
                    _ = stopped.wait_for(|stopped| *stopped) => return,
                }
                // Until a change this agent can see, or the keepalive (which repeats the
                // last notice, so the agent does not sync for it).
                let keepalive = tokio::time::sleep(KEEPALIVE_INTERVAL);
                tokio::pin!(keepalive);
                loop {
                    tokio::select! {
                        changed = changes.changed() => {
                            if changed.is_err() {
                                return;
                            }
                        }
                        () = &mut keepalive => break,
                        () = notices.closed() => return,
                        _ = stopped.wait_for(|stopped| *stopped) => return,
                    }
                    let point = *changes.borrow_and_update();
                    if state.change_notices_held() {
                        continue;
                    }
                    let seen = state.agent_view(&agent_id, point);
                    if seen != view {
                        announced = point;
                        view = seen;
                        break;
                    }
                }
            }
        });
        let notices = ReceiverStream::new(receiver);
        Ok(Response::new(Box::pin(notices)))
    }
}
