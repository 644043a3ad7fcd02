//! A small in-memory stand-in for a SPIRE server's admin socket: SPIRE's Entry API and
//! grpc.health, no Lanyard services, enough to drive the CLI's SPIRE path with exact control
//! over what the server answers. It pages ListEntries one entry at a time to exercise page
//! tokens. The Lanyard path runs against a real server (`real_server.rs`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lanyard_proto::spire::api::server::entry::v1::entry_server::{Entry, EntryServer};
use lanyard_proto::spire::api::server::entry::v1::{
    BatchCreateEntryRequest, BatchCreateEntryResponse, BatchDeleteEntryRequest,
    BatchDeleteEntryResponse, BatchUpdateEntryRequest, BatchUpdateEntryResponse,
    CountEntriesRequest, CountEntriesResponse, GetAuthorizedEntriesRequest,
    GetAuthorizedEntriesResponse, GetEntryRequest, ListEntriesRequest, ListEntriesResponse,
    SyncAuthorizedEntriesRequest, SyncAuthorizedEntriesResponse, batch_create_entry_response,
    batch_delete_entry_response, batch_update_entry_response,
};
use lanyard_proto::spire::api::types;
use tokio::net::UnixListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

/// Everything the fake server stores, shared with the test for assertions.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) entries: Vec<types::Entry>,
    pub(crate) next_id: u32,
    pub(crate) update_masks: Vec<types::EntryMask>,
}

#[derive(Debug, Clone, Default)]
struct Service {
    state: Arc<Mutex<State>>,
}

impl Service {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("state lock")
    }
}

fn ok() -> types::Status {
    types::Status {
        code: 0,
        message: "OK".into(),
    }
}

fn failure(code: tonic::Code, message: &str) -> types::Status {
    types::Status {
        code: code as i32,
        message: message.into(),
    }
}

#[tonic::async_trait]
impl Entry for Service {
    async fn count_entries(
        &self,
        _request: Request<CountEntriesRequest>,
    ) -> Result<Response<CountEntriesResponse>, Status> {
        let count = i32::try_from(self.lock().entries.len()).unwrap_or(i32::MAX);
        Ok(Response::new(CountEntriesResponse { count }))
    }

    async fn list_entries(
        &self,
        request: Request<ListEntriesRequest>,
    ) -> Result<Response<ListEntriesResponse>, Status> {
        let request = request.into_inner();
        let state = self.lock();
        let wanted = request
            .filter
            .and_then(|filter| filter.by_spiffe_id)
            .map(|id| (id.trust_domain, id.path));
        let matching: Vec<&types::Entry> = state
            .entries
            .iter()
            .filter(|entry| {
                wanted.as_ref().is_none_or(|(td, path)| {
                    entry
                        .spiffe_id
                        .as_ref()
                        .is_some_and(|id| &id.trust_domain == td && &id.path == path)
                })
            })
            .collect();
        let start: usize = if request.page_token.is_empty() {
            0
        } else {
            request
                .page_token
                .parse()
                .map_err(|_| Status::invalid_argument("bad page token"))?
        };
        let entries: Vec<types::Entry> = matching
            .iter()
            .skip(start)
            .take(1)
            .map(|e| (*e).clone())
            .collect();
        let next_page_token = if start + 1 < matching.len() {
            (start + 1).to_string()
        } else {
            String::new()
        };
        Ok(Response::new(ListEntriesResponse {
            entries,
            next_page_token,
        }))
    }

    async fn get_entry(
        &self,
        request: Request<GetEntryRequest>,
    ) -> Result<Response<types::Entry>, Status> {
        let id = request.into_inner().id;
        self.lock()
            .entries
            .iter()
            .find(|entry| entry.id == id)
            .cloned()
            .map(Response::new)
            .ok_or_else(|| Status::not_found("entry not found"))
    }

    async fn batch_create_entry(
        &self,
        request: Request<BatchCreateEntryRequest>,
    ) -> Result<Response<BatchCreateEntryResponse>, Status> {
        let mut state = self.lock();
        let mut results = Vec::new();
        for mut entry in request.into_inner().entries {
            let duplicate = state.entries.iter().find(|existing| {
                existing.spiffe_id == entry.spiffe_id
                    && existing.parent_id == entry.parent_id
                    && existing.selectors == entry.selectors
            });
            if let Some(existing) = duplicate {
                results.push(batch_create_entry_response::Result {
                    status: Some(failure(
                        tonic::Code::AlreadyExists,
                        "similar entry already exists",
                    )),
                    entry: Some(existing.clone()),
                });
                continue;
            }
            if entry.id.is_empty() {
                state.next_id += 1;
                entry.id = format!("entry-{}", state.next_id);
            }
            entry.created_at = 1_700_000_000;
            state.entries.push(entry.clone());
            results.push(batch_create_entry_response::Result {
                status: Some(ok()),
                entry: Some(entry),
            });
        }
        Ok(Response::new(BatchCreateEntryResponse { results }))
    }

    async fn batch_update_entry(
        &self,
        request: Request<BatchUpdateEntryRequest>,
    ) -> Result<Response<BatchUpdateEntryResponse>, Status> {
        let request = request.into_inner();
        let mask = request.input_mask.unwrap_or_default();
        let mut state = self.lock();
        state.update_masks.push(mask);
        let mut results = Vec::new();
        for update in request.entries {
            let Some(entry) = state.entries.iter_mut().find(|e| e.id == update.id) else {
                results.push(batch_update_entry_response::Result {
                    status: Some(failure(tonic::Code::NotFound, "entry not found")),
                    entry: None,
                });
                continue;
            };
            if mask.hint {
                entry.hint = update.hint;
            }
            if mask.x509_svid_ttl {
                entry.x509_svid_ttl = update.x509_svid_ttl;
            }
            if mask.selectors {
                entry.selectors = update.selectors;
            }
            if mask.admin {
                entry.admin = update.admin;
            }
            entry.revision_number += 1;
            results.push(batch_update_entry_response::Result {
                status: Some(ok()),
                entry: Some(entry.clone()),
            });
        }
        Ok(Response::new(BatchUpdateEntryResponse { results }))
    }

    async fn batch_delete_entry(
        &self,
        request: Request<BatchDeleteEntryRequest>,
    ) -> Result<Response<BatchDeleteEntryResponse>, Status> {
        let mut state = self.lock();
        let mut results = Vec::new();
        for id in request.into_inner().ids {
            let before = state.entries.len();
            state.entries.retain(|entry| entry.id != id);
            let status = if state.entries.len() < before {
                ok()
            } else {
                failure(tonic::Code::NotFound, "entry not found")
            };
            results.push(batch_delete_entry_response::Result {
                status: Some(status),
                id,
            });
        }
        Ok(Response::new(BatchDeleteEntryResponse { results }))
    }

    async fn get_authorized_entries(
        &self,
        _request: Request<GetAuthorizedEntriesRequest>,
    ) -> Result<Response<GetAuthorizedEntriesResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    type SyncAuthorizedEntriesStream = tonic::codegen::BoxStream<SyncAuthorizedEntriesResponse>;

    async fn sync_authorized_entries(
        &self,
        _request: Request<tonic::Streaming<SyncAuthorizedEntriesRequest>>,
    ) -> Result<Response<Self::SyncAuthorizedEntriesStream>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
}

/// A fake server listening on a socket in a temporary directory until dropped.
#[derive(Debug)]
pub(crate) struct FakeServer {
    pub(crate) socket: PathBuf,
    pub(crate) state: Arc<Mutex<State>>,
    shutdown: Option<oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl FakeServer {
    /// Starts serving.
    pub(crate) async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("api.sock");
        let listener = UnixListener::bind(&socket).expect("bind the socket");
        let service = Service::default();
        let state = Arc::clone(&service.state);
        let (_reporter, health) = tonic_health::server::health_reporter();
        let (shutdown, stopped) = oneshot::channel::<()>();
        let router = tonic::transport::Server::builder()
            .add_service(health)
            .add_service(EntryServer::new(service));
        tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await
                .expect("fake server runs");
        });
        Self {
            socket,
            state,
            shutdown: Some(shutdown),
            _dir: dir,
        }
    }

    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}
