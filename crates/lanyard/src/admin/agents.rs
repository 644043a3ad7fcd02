//! Attested agents through SPIRE's Agent API (Lanyard's server and SPIRE's alike), as
//! `lanyard-core`'s [`AttestedAgent`].

use anyhow::Context as _;
use lanyard_core::SpiffeId;
use lanyard_core::agent::AttestedAgent;
use lanyard_proto::convert::{agent_from_proto, spiffe_id_to_proto};
use lanyard_proto::spire::api::server::agent::v1::{
    BanAgentRequest, CountAgentsRequest, DeleteAgentRequest, GetAgentRequest, ListAgentsRequest,
    count_agents_request, list_agents_request,
};
use lanyard_proto::spire::api::types;

use super::{Admin, Page, list_all, rpc_error};

impl Admin {
    /// Every agent matching `filter`, page by page.
    pub(crate) async fn agents(
        &self,
        filter: list_agents_request::Filter,
    ) -> anyhow::Result<Vec<AttestedAgent>> {
        let agents = list_all(|page_size, page_token| {
            let request = ListAgentsRequest {
                filter: Some(filter.clone()),
                output_mask: None,
                page_size,
                page_token,
            };
            async move {
                let response = self
                    .agent()
                    .list_agents(request)
                    .await
                    .map_err(|status| rpc_error("ListAgents failed", &status))?
                    .into_inner();
                Ok(Page {
                    items: response.agents,
                    next_page_token: response.next_page_token,
                })
            }
        })
        .await?;
        agents.iter().map(read_agent).collect()
    }

    /// The agent with SPIFFE ID `id`.
    pub(crate) async fn agent_by_id(&self, id: &SpiffeId) -> anyhow::Result<AttestedAgent> {
        let agent = self
            .agent()
            .get_agent(GetAgentRequest {
                id: Some(spiffe_id_to_proto(id)),
                output_mask: None,
            })
            .await
            .map_err(|status| rpc_error(&format!("cannot get agent {id}"), &status))?
            .into_inner();
        read_agent(&agent)
    }

    /// Bans the agent: it can neither renew its SVID nor attest again until evicted.
    pub(crate) async fn ban_agent(&self, id: &SpiffeId) -> anyhow::Result<()> {
        self.agent()
            .ban_agent(BanAgentRequest {
                id: Some(spiffe_id_to_proto(id)),
            })
            .await
            .map_err(|status| rpc_error(&format!("cannot ban agent {id}"), &status))?;
        Ok(())
    }

    /// Evicts the agent: deletes its record, so that it must attest again.
    pub(crate) async fn evict_agent(&self, id: &SpiffeId) -> anyhow::Result<()> {
        self.agent()
            .delete_agent(DeleteAgentRequest {
                id: Some(spiffe_id_to_proto(id)),
            })
            .await
            .map_err(|status| rpc_error(&format!("cannot evict agent {id}"), &status))?;
        Ok(())
    }

    /// How many agents match `filter`.
    pub(crate) async fn count_agents(
        &self,
        filter: count_agents_request::Filter,
    ) -> anyhow::Result<i32> {
        Ok(self
            .agent()
            .count_agents(CountAgentsRequest {
                filter: Some(filter),
            })
            .await
            .map_err(|status| rpc_error("CountAgents failed", &status))?
            .into_inner()
            .count)
    }
}

fn read_agent(agent: &types::Agent) -> anyhow::Result<AttestedAgent> {
    agent_from_proto(agent).with_context(|| {
        format!(
            "the server returned an unreadable agent {:?}",
            agent
                .id
                .as_ref()
                .map(|id| format!("{}{}", id.trust_domain, id.path))
        )
    })
}
