//! The admin client: one connection to a server's admin API over its Unix socket, which the
//! commands of the CLI use for every call, and which answers in `lanyard-core` types.
//!
//! - **One connection, one detection.** [`Admin::flavor`] asks once whether the server offers
//!   Lanyard's governed services or is a SPIRE server; every fallback to SPIRE's API is decided
//!   from that answer, in this module and its children, never by a command.
//! - **Paging in one place.** Every list call goes through [`list_all`] with a page size of
//!   [`PAGE_SIZE`]: SPIRE's and Lanyard's servers answer a page size of 0 with everything in
//!   one message, which fails past gRPC's 4 MB message limit (about 27,000 entries).
//! - **Core types out.** Entries come back as [`RegistrationEntry`] with their governance
//!   fields, agents as [`AttestedAgent`], exceptions as [`Exception`], usage and issuances as
//!   the ledger's records; the rules over them (similarity, exception status and scope,
//!   update masks) are `lanyard-core`'s and `lanyard-proto`'s, not re-stated here.
//! - **Errors worded once.** A failed call ends as `<what>: <server message> (<code>)`.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use lanyard_proto::lanyard::api::v1::GetEntryMetadataRequest;
use lanyard_proto::lanyard::api::v1::entry_metadata_service_client::EntryMetadataServiceClient;
use lanyard_proto::lanyard::api::v1::exception_service_client::ExceptionServiceClient;
use lanyard_proto::lanyard::api::v1::governed_entry_service_client::GovernedEntryServiceClient;
use lanyard_proto::lanyard::api::v1::usage_service_client::UsageServiceClient;
use lanyard_proto::spire::api::server::agent::v1::agent_client::AgentClient;
use lanyard_proto::spire::api::server::bundle::v1::bundle_client::BundleClient;
use lanyard_proto::spire::api::server::entry::v1::entry_client::EntryClient;
use lanyard_proto::spire::api::server::svid::v1::svid_client::SvidClient;
use lanyard_proto::spire::api::server::trustdomain::v1::trust_domain_client::TrustDomainClient;
use lanyard_proto::spire::api::types;
use tokio::sync::OnceCell;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_client::HealthClient;

mod agents;
mod bundles;
mod entries;
mod federation;
mod governance;
mod revocations;
mod writes;

pub(crate) use revocations::{RevocationDetail, Revoked};

pub(crate) use entries::fetch_metadata;
pub(crate) use writes::{
    CHANGED_SINCE_READ, EntrySpec, ItemOutcome, MetadataSpec, governed_entry, is_ok, mask_is_empty,
};
#[cfg(test)]
pub(crate) use writes::{create_request, update_requests};

/// Where the server listens for local admin calls unless told otherwise.
pub(crate) const DEFAULT_SERVER_SOCKET: &str = "/tmp/lanyard/server/private/api.sock";

/// How long one call may take before the command gives up on a stuck server.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Items the CLI asks for per page of a list call: SPIRE's CLI pages entries by 500 too, and
/// 500 of the largest entries the server accepts stay well under gRPC's 4 MB message limit.
pub(crate) const PAGE_SIZE: i32 = 500;

/// One page of a list call: its items, and the token of the next page (empty after the last).
#[derive(Debug)]
pub(crate) struct Page<T> {
    pub(crate) items: Vec<T>,
    pub(crate) next_page_token: String,
}

/// Every item of a paged list call. `fetch_page(page_size, page_token)` makes one call; it is
/// called with [`PAGE_SIZE`] and an empty token, then with each page's `next_page_token` until
/// one is empty. A server that hands back the token it was given would loop forever, so that
/// ends the listing with an error.
pub(crate) async fn list_all<T, F, Fut>(mut fetch_page: F) -> anyhow::Result<Vec<T>>
where
    F: FnMut(i32, String) -> Fut,
    Fut: Future<Output = anyhow::Result<Page<T>>>,
{
    let mut items = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = fetch_page(PAGE_SIZE, page_token.clone()).await?;
        items.extend(page.items);
        if page.next_page_token.is_empty() {
            return Ok(items);
        }
        if page.next_page_token == page_token {
            bail!("the server returned the same page token twice");
        }
        page_token = page.next_page_token;
    }
}

/// What a server offers on its admin socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavor {
    /// A Lanyard server: SPIRE's APIs and Lanyard's governed services (`lanyard.api.v1`).
    Lanyard,
    /// A SPIRE server, or any server with SPIRE's APIs only.
    Spire,
}

/// An open HTTP/2 connection to the admin socket; hands out one typed client per service.
#[derive(Debug, Clone)]
pub(crate) struct Admin {
    channel: Channel,
    flavor: Arc<OnceCell<Flavor>>,
}

impl Admin {
    /// Connects now, so that a missing or refused socket is reported before any request is
    /// built, with the path in the message.
    pub(crate) async fn connect(socket: &Path) -> anyhow::Result<Self> {
        let path = socket.to_str().with_context(|| {
            format!(
                "socket path {} is not valid UTF-8",
                socket.to_string_lossy()
            )
        })?;
        // tonic dials `unix:` endpoints itself; the authority it sends is a placeholder.
        let endpoint = Endpoint::from_shared(format!("unix:{path}"))
            .with_context(|| format!("invalid socket path {path}"))?
            .timeout(CALL_TIMEOUT);
        let channel = endpoint.connect().await.map_err(|err| {
            anyhow!(
                "cannot connect to the server at {path}: {}",
                root_cause_message(&err)
            )
        })?;
        Ok(Self {
            channel,
            flavor: Arc::default(),
        })
    }

    /// Whether the server offers Lanyard's governed services, asked once per connection: a
    /// `GetEntryMetadata` for no entries, which a Lanyard server answers and a SPIRE server
    /// refuses as `Unimplemented`. Any other failure (the server is down, the caller is not
    /// allowed) is an error, not a guess.
    pub(crate) async fn flavor(&self) -> anyhow::Result<Flavor> {
        self.probe_flavor()
            .await
            .map_err(|status| rpc_error("cannot tell what the server offers", &status))
    }

    /// [`Admin::flavor`], failing with the probe's status.
    pub(crate) async fn probe_flavor(&self) -> Result<Flavor, tonic::Status> {
        self.flavor
            .get_or_try_init(|| async {
                let probe = GetEntryMetadataRequest {
                    entry_ids: Vec::new(),
                };
                match self.entry_metadata().get_entry_metadata(probe).await {
                    Ok(_) => Ok(Flavor::Lanyard),
                    Err(status) if is_unimplemented(&status) => Ok(Flavor::Spire),
                    Err(status) => Err(status),
                }
            })
            .await
            .copied()
    }

    pub(crate) fn entry_service(&self) -> EntryClient<Channel> {
        EntryClient::new(self.channel.clone())
    }

    pub(crate) fn entry_metadata(&self) -> EntryMetadataServiceClient<Channel> {
        EntryMetadataServiceClient::new(self.channel.clone())
    }

    pub(crate) fn governed_entry(&self) -> GovernedEntryServiceClient<Channel> {
        GovernedEntryServiceClient::new(self.channel.clone())
    }

    pub(crate) fn exception(&self) -> ExceptionServiceClient<Channel> {
        ExceptionServiceClient::new(self.channel.clone())
    }

    pub(crate) fn usage_service(&self) -> UsageServiceClient<Channel> {
        UsageServiceClient::new(self.channel.clone())
    }

    pub(crate) fn agent(&self) -> AgentClient<Channel> {
        AgentClient::new(self.channel.clone())
    }

    pub(crate) fn bundle_service(&self) -> BundleClient<Channel> {
        BundleClient::new(self.channel.clone())
    }

    pub(crate) fn svid(&self) -> SvidClient<Channel> {
        SvidClient::new(self.channel.clone())
    }

    pub(crate) fn trust_domain(&self) -> TrustDomainClient<Channel> {
        TrustDomainClient::new(self.channel.clone())
    }

    pub(crate) fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel.clone())
    }
}

/// The innermost cause of a transport error, which is the useful part ("No such file or
/// directory (os error 2)") under tonic's generic "transport error".
fn root_cause_message(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current = err;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

/// The error for a failed call: `<what>: <server message> (<code>)`.
pub(crate) fn rpc_error(what: &str, status: &tonic::Status) -> anyhow::Error {
    anyhow!(
        "{what}: {}",
        describe_status(status.code(), status.message())
    )
}

/// `<message> (<code name>)`, or the code's description when the server sent no message.
pub(crate) fn describe_status(code: tonic::Code, message: &str) -> String {
    if message.is_empty() {
        format!("{} ({code:?})", code.description())
    } else {
        format!("{message} ({code:?})")
    }
}

/// The gRPC code of a per-item batch status; an absent status counts as OK, as in SPIRE's
/// clients.
pub(crate) fn item_code(status: Option<&types::Status>) -> tonic::Code {
    status.map_or(tonic::Code::Ok, |status| tonic::Code::from_i32(status.code))
}

/// Whether a failed call means the server lacks the service: a SPIRE server has no
/// `lanyard.api.v1` services, and reads of Lanyard-only data are skipped against it.
pub(crate) fn is_unimplemented(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unimplemented
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_descriptions_name_the_code() {
        assert_eq!(
            describe_status(tonic::Code::NotFound, "entry not found"),
            "entry not found (NotFound)"
        );
        assert_eq!(
            describe_status(tonic::Code::Unavailable, ""),
            "The service is currently unavailable (Unavailable)"
        );
    }

    /// A fake list of `n_items` numbered items served `page_size` at a time, recording the
    /// requests it was sent.
    async fn serve_page(
        n_items: u32,
        page_size: i32,
        page_token: String,
        requests: &std::sync::Mutex<Vec<(i32, String)>>,
    ) -> anyhow::Result<Page<u32>> {
        requests
            .lock()
            .expect("not poisoned")
            .push((page_size, page_token.clone()));
        let start: u32 = if page_token.is_empty() {
            0
        } else {
            page_token.parse()?
        };
        let end = n_items.min(start + u32::try_from(page_size)?);
        Ok(Page {
            items: (start..end).collect(),
            next_page_token: if end < n_items {
                end.to_string()
            } else {
                String::new()
            },
        })
    }

    #[tokio::test]
    async fn listing_follows_page_tokens_to_the_end_with_a_bounded_page_size() {
        let requests = std::sync::Mutex::new(Vec::new());
        let n_items = 3 * PAGE_SIZE as u32 + 7;
        let items = list_all(|size, token| serve_page(n_items, size, token, &requests))
            .await
            .expect("listed");
        assert_eq!(items, (0..n_items).collect::<Vec<_>>());
        let requests = requests.into_inner().expect("not poisoned");
        assert_eq!(requests.len(), 4);
        assert!(requests.iter().all(|(size, _)| *size == PAGE_SIZE));
        assert_eq!(requests[0].1, "");
    }

    #[tokio::test]
    async fn a_repeated_page_token_ends_the_listing_with_an_error() {
        let err = list_all(|_, _| async {
            Ok(Page {
                items: vec![1],
                next_page_token: "same".to_owned(),
            })
        })
        .await
        .expect_err("a loop is refused");
        assert_eq!(
            err.to_string(),
            "the server returned the same page token twice"
        );
    }

    #[tokio::test]
    async fn connecting_to_a_missing_socket_names_the_path() {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("absent.sock");
        let err = Admin::connect(&socket)
            .await
            .expect_err("nothing listens there");
        let message = format!("{err:#}");
        assert!(message.contains(&socket.display().to_string()), "{message}");
        assert!(message.contains("No such file or directory"), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }
}
