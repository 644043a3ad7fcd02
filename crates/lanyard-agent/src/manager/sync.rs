//! Fetching the authorized entries with `SyncAuthorizedEntries`, exactly as SPIRE v1.13's
//! agent does it (`pkg/agent/client/client.go`), and turning them into [`CachedEntry`]s.
//!
//! The first request carries SPIRE's output mask and no IDs. A reply with entries and no
//! revisions is the complete set. Otherwise the server sends pages of `(id, revision,
//! created_at)`; the agent asks, in sorted batches no larger than the first page, for every
//! entry it does not have or whose revision or creation time differs, reads each answer
//! until `more` is false, and then cancels the stream rather than half-closing it. Entries
//! not listed are gone.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanyard_core::EntryId;
use lanyard_proto::convert::{selectors_from_proto, spiffe_id_from_proto, trust_domain_from_proto};
use lanyard_proto::spire::api::server::entry::v1::entry_client::EntryClient;
use lanyard_proto::spire::api::server::entry::v1::{
    SyncAuthorizedEntriesRequest, SyncAuthorizedEntriesResponse,
};
use lanyard_proto::spire::api::types;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

use super::client::ClientError;
use crate::cache::CachedEntry;

pub(crate) const SYNC_AUTHORIZED_ENTRIES: &str = "SyncAuthorizedEntries";

/// The fields SPIRE's agent asks for: no parent ID, TTLs, DNS names or expiry.
pub(crate) fn sync_output_mask() -> types::EntryMask {
    types::EntryMask {
        spiffe_id: true,
        parent_id: false,
        selectors: true,
        x509_svid_ttl: false,
        federates_with: true,
        admin: true,
        downstream: true,
        expires_at: false,
        dns_names: false,
        revision_number: true,
        store_svid: true,
        jwt_svid_ttl: false,
        hint: true,
        created_at: true,
    }
}

/// One side of a sync stream. The gRPC implementation is [`GrpcSync`]; tests play the
/// server.
pub(crate) trait SyncTransport {
    /// Sends a request.
    async fn send(&mut self, request: SyncAuthorizedEntriesRequest) -> Result<(), ClientError>;
    /// The next response; `None` when the server ended the stream.
    async fn recv(&mut self) -> Result<Option<SyncAuthorizedEntriesResponse>, ClientError>;
}

/// A `SyncAuthorizedEntries` stream over a channel. The RPC starts on the first `recv`,
/// after the first request is queued (the server reads it before answering). Dropping it
/// cancels the RPC.
pub(crate) struct GrpcSync {
    // Fields drop in order: the response stream goes first, which resets the HTTP/2 stream
    // (a cancellation) before the request side could be seen as a half-close.
    responses: Option<Streaming<SyncAuthorizedEntriesResponse>>,
    client: EntryClient<Channel>,
    requests: mpsc::Sender<SyncAuthorizedEntriesRequest>,
    outbound: Option<mpsc::Receiver<SyncAuthorizedEntriesRequest>>,
}

impl GrpcSync {
    /// A stream on `channel`, not started yet.
    pub(crate) fn new(channel: Channel) -> Self {
        let (requests, outbound) = mpsc::channel(4);
        Self {
            responses: None,
            client: EntryClient::new(channel),
            requests,
            outbound: Some(outbound),
        }
    }
}

impl SyncTransport for GrpcSync {
    async fn send(&mut self, request: SyncAuthorizedEntriesRequest) -> Result<(), ClientError> {
        self.requests
            .send(request)
            .await
            .map_err(|_| ClientError::InvalidResponse {
                rpc: SYNC_AUTHORIZED_ENTRIES,
                reason: "the server closed the stream".into(),
            })
    }

    async fn recv(&mut self) -> Result<Option<SyncAuthorizedEntriesResponse>, ClientError> {
        let rpc_error = |status| ClientError::Rpc {
            rpc: SYNC_AUTHORIZED_ENTRIES,
            status,
        };
        if self.responses.is_none() {
            let outbound = self
                .outbound
                .take()
                .ok_or_else(|| ClientError::InvalidResponse {
                    rpc: SYNC_AUTHORIZED_ENTRIES,
                    reason: "the stream could not be opened".into(),
                })?;
            let responses = self
                .client
                .sync_authorized_entries(ReceiverStream::new(outbound))
                .await
                .map_err(rpc_error)?
                .into_inner();
            self.responses = Some(responses);
        }
        match self.responses.as_mut() {
            Some(responses) => responses.message().await.map_err(rpc_error),
            None => Ok(None),
        }
    }
}

fn invalid(reason: &str) -> ClientError {
    ClientError::InvalidResponse {
        rpc: SYNC_AUTHORIZED_ENTRIES,
        reason: reason.to_owned(),
    }
}

/// Runs one sync over `transport` against the agent's `cached` entries and returns the
/// complete new set. Unchanged entries are taken from `cached`; malformed ones are dropped
/// with a warning. The caller drops the transport afterwards, which cancels the stream.
pub(crate) async fn sync_entries<T: SyncTransport>(
    transport: &mut T,
    cached: &BTreeMap<EntryId, Arc<CachedEntry>>,
) -> Result<BTreeMap<EntryId, Arc<CachedEntry>>, ClientError> {
    transport
        .send(SyncAuthorizedEntriesRequest {
            output_mask: Some(sync_output_mask()),
            ids: Vec::new(),
        })
        .await?;
    let first = transport
        .recv()
        .await?
        .ok_or_else(|| invalid("the stream ended without a response"))?;
    if first.entry_revisions.is_empty() {
        // The complete set in one message; nothing else is read.
        return Ok(parse_entries(first.entries, None));
    }
    if !first.entries.is_empty() {
        return Err(invalid("a revision page also carries entries"));
    }
    let page_size = first.entry_revisions.len();
    let mut more = first.more;
    let mut revisions = first.entry_revisions;
    while more {
        let page = transport
            .recv()
            .await?
            .ok_or_else(|| invalid("the stream ended before the last revision page"))?;
        if !page.entries.is_empty() {
            return Err(invalid("a revision page also carries entries"));
        }
        revisions.extend(page.entry_revisions);
        more = page.more;
    }

    let mut entries = BTreeMap::new();
    let mut needed = BTreeSet::new();
    for revision in &revisions {
        if revision.id.is_empty() || revision.revision_number < 0 {
            continue;
        }
        let unchanged = EntryId::new(&revision.id)
            .ok()
            .and_then(|id| cached.get(&id))
            .filter(|entry| {
                entry.revision_number == revision.revision_number
                    && (revision.created_at == 0
                        || revision.created_at == unix_seconds(entry.created_at))
            });
        match unchanged {
            Some(entry) => {
                entries.insert(entry.id.clone(), Arc::clone(entry));
            }
            None => {
                needed.insert(revision.id.clone());
            }
        }
    }
    let needed: Vec<String> = needed.into_iter().collect();
    for batch in needed.chunks(page_size) {
        transport
            .send(SyncAuthorizedEntriesRequest {
                output_mask: None,
                ids: batch.to_vec(),
            })
            .await?;
        let requested: BTreeSet<&str> = batch.iter().map(String::as_str).collect();
        loop {
            let message = transport
                .recv()
                .await?
                .ok_or_else(|| invalid("the stream ended before the requested entries"))?;
            if !message.entry_revisions.is_empty() {
                return Err(invalid("an entry page also carries revisions"));
            }
            entries.extend(parse_entries(message.entries, Some(&requested)));
            if !message.more {
                break;
            }
        }
    }
    Ok(entries)
}

/// Parses entries, dropping (with a warning) malformed ones and, when `only` is given, any
/// that were not asked for.
fn parse_entries(
    entries: Vec<types::Entry>,
    only: Option<&BTreeSet<&str>>,
) -> BTreeMap<EntryId, Arc<CachedEntry>> {
    let mut out = BTreeMap::new();
    for entry in entries {
        if only.is_some_and(|only| !only.contains(entry.id.as_str())) {
            tracing::debug!(entry_id = %entry.id, "ignoring an entry that was not requested");
            continue;
        }
        match parse_entry(&entry) {
            Ok(parsed) => {
                out.insert(parsed.id.clone(), Arc::new(parsed));
            }
            Err(reason) => {
                tracing::warn!(
                    entry_id = %entry.id,
                    %reason,
                    "dropping a malformed entry from the server"
                );
            }
        }
    }
    out
}

/// An entry as the sync mask returns it. Like SPIRE's agent, refuses an empty or invalid
/// ID, a missing or invalid SPIFFE ID, no selectors or an invalid one, and an invalid
/// federated trust domain.
pub(crate) fn parse_entry(entry: &types::Entry) -> Result<CachedEntry, String> {
    let id = EntryId::new(&entry.id).map_err(|e| format!("id: {e}"))?;
    let spiffe_id = spiffe_id_from_proto(
        entry
            .spiffe_id
            .as_ref()
            .ok_or_else(|| "missing spiffe_id".to_owned())?,
    )
    .map_err(|e| e.to_string())?;
    if entry.selectors.is_empty() {
        return Err("selectors cannot be empty".into());
    }
    let selectors =
        selectors_from_proto("selectors", &entry.selectors).map_err(|e| e.to_string())?;
    let federates_with = entry
        .federates_with
        .iter()
        .map(|td| trust_domain_from_proto("federates_with", td))
        .collect::<Result<BTreeSet<_>, _>>()
        .map_err(|e| e.to_string())?;
    let created_at = u64::try_from(entry.created_at)
        .ok()
        .and_then(|secs| UNIX_EPOCH.checked_add(Duration::from_secs(secs)))
        .unwrap_or(UNIX_EPOCH);
    Ok(CachedEntry {
        id,
        spiffe_id,
        selectors,
        federates_with,
        revision_number: entry.revision_number,
        hint: entry.hint.clone(),
        created_at,
        admin: entry.admin,
        downstream: entry.downstream,
        store_svid: entry.store_svid,
    })
}

fn unix_seconds(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use lanyard_proto::spire::api::server::entry::v1::EntryRevision;

    use super::*;

    /// A server entry: ID, revision, created_at.
    #[derive(Clone)]
    struct ServerEntry {
        id: &'static str,
        revision: i64,
        created_at: i64,
    }

    fn proto_entry(e: &ServerEntry) -> types::Entry {
        types::Entry {
            id: e.id.to_owned(),
            spiffe_id: Some(types::Spiffeid {
                trust_domain: "example.org".into(),
                path: format!("/{}", e.id),
            }),
            selectors: vec![types::Selector {
                r#type: "unix".into(),
                value: "uid:1000".into(),
            }],
            revision_number: e.revision,
            created_at: e.created_at,
            ..Default::default()
        }
    }

    /// Plays SPIRE's server side of the exchange with a small page size and records what
    /// the agent asked for.
    struct FakeServer {
        entries: Vec<ServerEntry>,
        extra_entries: Vec<types::Entry>,
        page_size: usize,
        requests: Vec<SyncAuthorizedEntriesRequest>,
        outbox: VecDeque<SyncAuthorizedEntriesResponse>,
    }

    impl FakeServer {
        fn new(entries: Vec<ServerEntry>, page_size: usize) -> Self {
            Self {
                entries,
                extra_entries: Vec::new(),
                page_size,
                requests: Vec::new(),
                outbox: VecDeque::new(),
            }
        }

        fn pages<T: Clone>(
            items: &[T],
            size: usize,
            build: impl Fn(Vec<T>, bool) -> SyncAuthorizedEntriesResponse,
        ) -> Vec<SyncAuthorizedEntriesResponse> {
            let n_pages = items.len().div_ceil(size).max(1);
            (0..n_pages)
                .map(|i| {
                    let page = items.iter().skip(i * size).take(size).cloned().collect();
                    build(page, i + 1 < n_pages)
                })
                .collect()
        }
    }

    impl SyncTransport for FakeServer {
        async fn send(&mut self, request: SyncAuthorizedEntriesRequest) -> Result<(), ClientError> {
            let first = self.requests.is_empty();
            self.requests.push(request.clone());
            if first {
                let mut all: Vec<types::Entry> = self.entries.iter().map(proto_entry).collect();
                all.extend(self.extra_entries.iter().cloned());
                if all.len() <= self.page_size {
                    self.outbox.push_back(SyncAuthorizedEntriesResponse {
                        entries: all,
                        ..Default::default()
                    });
                } else {
                    let revisions: Vec<EntryRevision> = self
                        .entries
                        .iter()
                        .map(|e| EntryRevision {
                            id: e.id.to_owned(),
                            revision_number: e.revision,
                            created_at: e.created_at,
                        })
                        .collect();
                    self.outbox
                        .extend(Self::pages(&revisions, self.page_size, |page, more| {
                            SyncAuthorizedEntriesResponse {
                                entry_revisions: page,
                                entries: Vec::new(),
                                more,
                            }
                        }));
                }
            } else {
                let found: Vec<types::Entry> = request
                    .ids
                    .iter()
                    .filter_map(|id| self.entries.iter().find(|e| e.id == id))
                    .map(proto_entry)
                    .collect();
                self.outbox
                    .extend(Self::pages(&found, self.page_size, |page, more| {
                        SyncAuthorizedEntriesResponse {
                            entry_revisions: Vec::new(),
                            entries: page,
                            more,
                        }
                    }));
            }
            Ok(())
        }

        async fn recv(&mut self) -> Result<Option<SyncAuthorizedEntriesResponse>, ClientError> {
            Ok(self.outbox.pop_front())
        }
    }

    fn cached(entries: &[ServerEntry]) -> BTreeMap<EntryId, Arc<CachedEntry>> {
        entries
            .iter()
            .map(|e| {
                let parsed = parse_entry(&proto_entry(e)).unwrap();
                (parsed.id.clone(), Arc::new(parsed))
            })
            .collect()
    }

    fn summary(entries: &BTreeMap<EntryId, Arc<CachedEntry>>) -> Vec<(String, i64)> {
        entries
            .values()
            .map(|e| (e.id.to_string(), e.revision_number))
            .collect()
    }

    fn e(id: &'static str, revision: i64, created_at: i64) -> ServerEntry {
        ServerEntry {
            id,
            revision,
            created_at,
        }
    }

    #[tokio::test]
    async fn a_small_set_arrives_whole_in_one_message() {
        let mut server = FakeServer::new(vec![e("a", 0, 10), e("b", 3, 10)], 2);
        let synced = sync_entries(&mut server, &BTreeMap::new()).await.unwrap();
        assert_eq!(summary(&synced), [("a".into(), 0), ("b".into(), 3)]);
        assert_eq!(server.requests.len(), 1);
        let first = &server.requests[0];
        assert!(first.ids.is_empty());
        assert_eq!(first.output_mask, Some(sync_output_mask()));

        // An empty answer means no entries at all.
        let mut server = FakeServer::new(Vec::new(), 2);
        let synced = sync_entries(&mut server, &cached(&[e("a", 0, 10)]))
            .await
            .unwrap();
        assert!(synced.is_empty());
    }

    #[tokio::test]
    async fn revisions_select_new_and_changed_entries_in_sorted_batches() {
        let server_entries = vec![
            e("e", 0, 10),
            e("a", 1, 10),
            e("b", 2, 10),
            e("c", 0, 20),
            e("d", 5, 10),
        ];
        let mut server = FakeServer::new(server_entries, 2);
        // Cached: a unchanged, b at an older revision, c deleted and recreated (same ID and
        // revision, another created_at), z deleted on the server.
        let before = cached(&[e("a", 1, 10), e("b", 1, 10), e("c", 0, 10), e("z", 0, 10)]);
        let synced = sync_entries(&mut server, &before).await.unwrap();
        assert_eq!(
            summary(&synced),
            [
                ("a".into(), 1),
                ("b".into(), 2),
                ("c".into(), 0),
                ("d".into(), 5),
                ("e".into(), 0)
            ]
        );
        assert!(Arc::ptr_eq(
            &synced[&EntryId::new("a").unwrap()],
            &before[&EntryId::new("a").unwrap()]
        ));
        assert_eq!(
            synced[&EntryId::new("c").unwrap()].created_at,
            UNIX_EPOCH + Duration::from_secs(20)
        );
        let asked: Vec<Vec<String>> = server
            .requests
            .iter()
            .skip(1)
            .map(|r| r.ids.clone())
            .collect();
        assert_eq!(
            asked,
            [
                vec!["b".to_owned(), "c".to_owned()],
                vec!["d".to_owned(), "e".to_owned()]
            ]
        );
        assert!(
            server
                .requests
                .iter()
                .skip(1)
                .all(|r| r.output_mask.is_none())
        );
    }

    #[tokio::test]
    async fn nothing_is_requested_when_nothing_changed() {
        let entries = vec![e("a", 1, 10), e("b", 2, 10), e("c", 0, 10)];
        let mut server = FakeServer::new(entries.clone(), 2);
        let synced = sync_entries(&mut server, &cached(&entries)).await.unwrap();
        assert_eq!(synced.len(), 3);
        assert_eq!(server.requests.len(), 1);
    }

    #[tokio::test]
    async fn malformed_entries_are_dropped() {
        let mut server = FakeServer::new(vec![e("good", 0, 10)], 10);
        let mut no_selectors = proto_entry(&e("no-selectors", 0, 10));
        no_selectors.selectors.clear();
        let mut bad_selector = proto_entry(&e("bad-selector", 0, 10));
        bad_selector.selectors[0].r#type = "un:ix".into();
        let mut empty_value = proto_entry(&e("empty-value", 0, 10));
        empty_value.selectors[0].value.clear();
        let mut no_id = proto_entry(&e("x", 0, 10));
        no_id.id.clear();
        let mut bad_spiffe_id = proto_entry(&e("bad-spiffe-id", 0, 10));
        bad_spiffe_id.spiffe_id = Some(types::Spiffeid {
            trust_domain: "Bad Domain".into(),
            path: "/x".into(),
        });
        let mut missing_spiffe_id = proto_entry(&e("missing-spiffe-id", 0, 10));
        missing_spiffe_id.spiffe_id = None;
        let mut bad_federation = proto_entry(&e("bad-federation", 0, 10));
        bad_federation.federates_with = vec!["not a domain".into()];
        let mut federated = proto_entry(&e("federated", 0, 10));
        federated.federates_with = vec!["spiffe://other.org".into(), "third.org".into()];
        server.extra_entries = vec![
            no_selectors,
            bad_selector,
            empty_value,
            no_id,
            bad_spiffe_id,
            missing_spiffe_id,
            bad_federation,
            federated,
        ];
        let synced = sync_entries(&mut server, &BTreeMap::new()).await.unwrap();
        let ids: Vec<String> = synced.keys().map(ToString::to_string).collect();
        assert_eq!(ids, ["federated", "good"]);
        let federates: Vec<String> = synced[&EntryId::new("federated").unwrap()]
            .federates_with
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(federates, ["other.org", "third.org"]);
    }

    struct Scripted(VecDeque<SyncAuthorizedEntriesResponse>);

    impl SyncTransport for Scripted {
        async fn send(&mut self, _: SyncAuthorizedEntriesRequest) -> Result<(), ClientError> {
            Ok(())
        }
        async fn recv(&mut self) -> Result<Option<SyncAuthorizedEntriesResponse>, ClientError> {
            Ok(self.0.pop_front())
        }
    }

    #[tokio::test]
    async fn protocol_violations_fail_the_sync() {
        let revision = |id: &str| EntryRevision {
            id: id.into(),
            revision_number: 0,
            created_at: 1,
        };
        let cases = [
            // No answer at all.
            vec![],
            // A revision page that also carries entries.
            vec![SyncAuthorizedEntriesResponse {
                entry_revisions: vec![revision("a")],
                entries: vec![proto_entry(&e("a", 0, 1))],
                more: false,
            }],
            // The stream ends before the last revision page.
            vec![SyncAuthorizedEntriesResponse {
                entry_revisions: vec![revision("a")],
                entries: Vec::new(),
                more: true,
            }],
            // An entry page that carries revisions.
            vec![
                SyncAuthorizedEntriesResponse {
                    entry_revisions: vec![revision("a")],
                    entries: Vec::new(),
                    more: false,
                },
                SyncAuthorizedEntriesResponse {
                    entry_revisions: vec![revision("a")],
                    entries: Vec::new(),
                    more: false,
                },
            ],
            // The stream ends before the requested entries.
            vec![SyncAuthorizedEntriesResponse {
                entry_revisions: vec![revision("a")],
                entries: Vec::new(),
                more: false,
            }],
        ];
        for (i, script) in cases.into_iter().enumerate() {
            let result = sync_entries(&mut Scripted(script.into()), &BTreeMap::new()).await;
            assert!(result.is_err(), "case {i}");
        }
    }
}
