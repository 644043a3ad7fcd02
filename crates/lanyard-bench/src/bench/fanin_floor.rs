//! The floors under `fanin`'s first-SVID figures: the same burst of workload clients against a
//! server that does nothing but answer `FetchX509SVID` with a fixed message (the one the agent
//! sent a lone workload) on the same kind of Unix socket, on two worker threads of its own in
//! this process. [`FloorServer::Tonic`] is the agent's own stack (tonic, hyper and h2): what
//! the transport costs the agent, whose figure over it is what attestation, the snapshot and
//! the stream cost on top. [`FloorServer::Http2`] answers on h2 alone, without hyper's and
//! tonic's layers: what HTTP/2 itself costs, with the clients on the same cores.

use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lanyard_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use lanyard_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, WitBundlesRequest, WitBundlesResponse, WitsvidRequest,
    WitsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svidRequest, X509svidResponse,
};
use tokio::time::Instant;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::stats::Samples;
use crate::workload::{Gate, workload_client};

/// The floor's result for a burst of `workloads`.
#[derive(Debug, Clone)]
pub(crate) struct Floor {
    pub(crate) first: Samples,
    /// The server's CPU per first message.
    pub(crate) server_us: f64,
}

/// Which server a floor is measured on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FloorServer {
    /// tonic's server, as the agent runs it.
    Tonic,
    /// An h2 server that writes the gRPC response's headers and message itself.
    Http2,
}

/// Serves `response` on a fresh socket and measures `workloads` clients' first message, each
/// on its own connection, released at once.
pub(crate) async fn measure(
    dir: &Path,
    response: X509svidResponse,
    workloads: usize,
    max_streams: u32,
    server: FloorServer,
) -> anyhow::Result<Floor> {
    let socket = dir.join("floor.sock");
    let _ = std::fs::remove_file(&socket);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(SERVER_THREADS)
        .enable_all()
        .build()?;
    let listener = {
        let _entered = runtime.enter();
        tokio::net::UnixListener::bind(&socket)?
    };
    match server {
        FloorServer::Tonic => {
            runtime.spawn(
                tonic::transport::Server::builder()
                    .max_concurrent_streams(max_streams)
                    .add_service(SpiffeWorkloadApiServer::new(FixedAnswer {
                        response: Arc::new(response),
                    }))
                    .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
            );
        }
        FloorServer::Http2 => {
            runtime.spawn(serve_http2(listener, grpc_message(&response)?, max_streams));
        }
    }
    let server_cpu = crate::cpu::CpuMeter::Threads(vec![SERVER_THREADS]);
    let result = burst(&socket, workloads, &server_cpu).await;
    runtime.shutdown_background();
    let _ = std::fs::remove_file(&socket);
    result
}

const SERVER_THREADS: &str = "lanyard-floor";

async fn burst(
    socket: &Path,
    workloads: usize,
    server_cpu: &crate::cpu::CpuMeter,
) -> anyhow::Result<Floor> {
    let gate = Gate::new(workloads);
    let latencies: Arc<Mutex<Samples>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workloads {
        let socket = socket.to_owned();
        let gate = gate.clone();
        let latencies = Arc::clone(&latencies);
        tasks.spawn(async move {
            let client = workload_client(&socket).await;
            gate.pass().await;
            let mut client = client?;
            let started = Instant::now();
            let mut stream = client
                .fetch_x509svid(X509svidRequest {})
                .await?
                .into_inner();
            stream
                .message()
                .await?
                .ok_or_else(|| anyhow::anyhow!("the floor server sent nothing"))?;
            if let Ok(mut samples) = latencies.lock() {
                samples.push(started.elapsed());
            }
            // Held open, as a workload's stream is, until every client has its message.
            let _ = tokio::time::timeout(Duration::from_secs(30), stream.message()).await;
            Ok::<_, anyhow::Error>(())
        });
    }
    gate.connected().await;
    let before = server_cpu.cpu_time();
    gate.release().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = latencies.lock().map(|l| l.len()).unwrap_or_default();
        if done >= workloads {
            break;
        }
        if let Some(result) = tasks.try_join_next() {
            result??;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the floor server answered {done} of {workloads} clients"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let server_us =
        server_cpu.cpu_time().saturating_sub(before).as_secs_f64() * 1e6 / workloads.max(1) as f64;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let first = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    Ok(Floor { first, server_us })
}

/// `message` as one gRPC length-prefixed message: no compression, four bytes of length.
fn grpc_message(message: &X509svidResponse) -> anyhow::Result<prost::bytes::Bytes> {
    let length = u32::try_from(prost::Message::encoded_len(message))?;
    let mut framed = Vec::with_capacity(5 + length as usize);
    framed.push(0);
    framed.extend_from_slice(&length.to_be_bytes());
    prost::Message::encode(message, &mut framed)?;
    Ok(framed.into())
}

/// Answers every stream on every connection with `message` after gRPC's response headers, and
/// holds the streams open until their connection ends.
async fn serve_http2(
    listener: tokio::net::UnixListener,
    message: prost::bytes::Bytes,
    max_streams: u32,
) {
    while let Ok((stream, _)) = listener.accept().await {
        let message = message.clone();
        tokio::spawn(async move {
            let handshake = h2::server::Builder::new()
                .max_concurrent_streams(max_streams)
                .handshake::<_, prost::bytes::Bytes>(stream);
            let Ok(mut connection) = handshake.await else {
                return;
            };
            let mut open = Vec::new();
            while let Some(Ok((_request, mut respond))) = connection.accept().await {
                let headers = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(());
                let Ok(headers) = headers else { continue };
                if let Ok(mut stream) = respond.send_response(headers, false)
                    && stream.send_data(message.clone(), false).is_ok()
                {
                    open.push(stream);
                }
            }
        });
    }
}

/// A Workload API that answers `FetchX509SVID` with one fixed message and holds the stream.
#[derive(Debug, Clone)]
struct FixedAnswer {
    response: Arc<X509svidResponse>,
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for FixedAnswer {
    type FetchX509SVIDStream = Boxed<X509svidResponse>;
    type FetchX509BundlesStream = Boxed<X509BundlesResponse>;
    type FetchJWTBundlesStream = Boxed<JwtBundlesResponse>;
    type FetchWITSVIDStream = Boxed<WitsvidResponse>;
    type FetchWITBundlesStream = Boxed<WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        _request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let first = tokio_stream::once(Ok((*self.response).clone()));
        Ok(Response::new(Box::pin(tokio_stream::StreamExt::chain(
            first,
            tokio_stream::pending(),
        ))))
    }

    async fn fetch_x509_bundles(
        &self,
        _request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(Status::unimplemented("floor"))
    }

    async fn fetch_jwtsvid(
        &self,
        _request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        Err(Status::unimplemented("floor"))
    }

    async fn fetch_jwt_bundles(
        &self,
        _request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented("floor"))
    }

    async fn validate_jwtsvid(
        &self,
        _request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented("floor"))
    }

    async fn fetch_witsvid(
        &self,
        _request: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(Status::unimplemented("floor"))
    }

    async fn fetch_wit_bundles(
        &self,
        _request: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(Status::unimplemented("floor"))
    }
}
