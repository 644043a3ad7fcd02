//! The Workload API socket's HTTP/2 server, on `h2` directly: one task per connection
//! accepting its streams, one per stream.
//!
//! `FetchX509SVID`, the call every workload makes first (and all of them at once when a node
//! starts), is answered straight from its stream: the security header is checked, the
//! request message read and the responses framed here, and [`WorkloadApi`] does the rest as
//! for any other call. Every other call goes to the tonic services sharing the socket (the
//! Workload API, SDS, health) through their router, with the caller's
//! [`WorkloadConnectInfo`] in the request's extensions as tonic's own server would put it;
//! so does a `FetchX509SVID` whose request names a compression, which tonic answers. A
//! deadline (`grpc-timeout`) is the client's to keep, on either path: it resets the stream
//! when the deadline passes, and the call is dropped.

use std::fmt::Display;
use std::future::poll_fn;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http_body::{Body, Frame};
use lanyard_metrics::rpc::{CallRecord, RpcMetricsLayer, RpcMetricsService};
use lanyard_proto::workload::X509svidRequest;
use prost::bytes::{Bytes, BytesMut};
use tokio::sync::watch;
use tonic::service::Routes;
use tonic::{Code, Status};
use tower::ServiceExt as _;

use super::{
    Delivery, Outlet, SECURITY_HEADER, Watch, WatchEnd, WorkloadApi, WorkloadConnectInfo,
    WorkloadConnection, X509Message, X509Stepper,
};

/// The path of the call answered without the router.
const FETCH_X509_SVID: &str = "/SpiffeWorkloadAPI/FetchX509SVID";
/// The largest request message read. `X509SVIDRequest` has no fields: a client's is empty,
/// and a stream cannot make the agent hold more than this for it.
const MAX_REQUEST_MESSAGE: usize = 64 << 10;
/// The gRPC message prefix: a compression flag and four bytes of length.
const MESSAGE_PREFIX: usize = 5;
/// The largest header block a client may send (hyper's default).
const MAX_HEADER_LIST_SIZE: u32 = 16 << 10;
/// Per-stream and per-connection receive windows (hyper's defaults).
const RECEIVE_WINDOW: u32 = 1 << 20;
/// The most a stream buffers for a client that does not read before its response waits for
/// room (hyper's default); past it the stream's producer waits, then stalls.
const MAX_SEND_BUFFER: usize = 400 << 10;

/// What every connection of one socket serves.
pub(super) struct Http2Server {
    routes: RpcMetricsService<Routes>,
    fast: Option<WorkloadApi>,
    metrics: RpcMetricsLayer,
    max_streams: u32,
}

impl Http2Server {
    /// Serves `routes` (behind `metrics`), answering `FetchX509SVID` from `fast` when given.
    pub(super) fn new(
        routes: Routes,
        fast: Option<WorkloadApi>,
        metrics: RpcMetricsLayer,
        max_streams: u32,
    ) -> Self {
        Self {
            routes: tower::Layer::layer(&metrics, routes),
            fast,
            metrics,
            max_streams,
        }
    }

    /// Serves `connection` until it ends: the client closes it, it fails, or the agent closes
    /// it. Once `draining` turns true it takes no new streams and ends when its open ones do.
    pub(super) async fn serve_connection(
        self: Arc<Self>,
        connection: WorkloadConnection,
        mut draining: watch::Receiver<bool>,
    ) {
        let info = connection.info.clone();
        let handshake = h2::server::Builder::new()
            .max_concurrent_streams(self.max_streams)
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .initial_window_size(RECEIVE_WINDOW)
            .initial_connection_window_size(RECEIVE_WINDOW)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .handshake::<_, Bytes>(connection);
        let mut connection = match handshake.await {
            Ok(connection) => connection,
            Err(error) => {
                tracing::debug!(%error, "Workload API connection ended before HTTP/2 began");
                return;
            }
        };
        // One wait for the whole connection: made anew at each stream, it would join and
        // leave the waiters every connection shares, under their lock, twice a stream.
        let mut drain = pin!(draining.wait_for(|draining| *draining));
        let mut drained = false;
        loop {
            let next = tokio::select! {
                next = connection.accept() => next,
                _ = &mut drain, if !drained => {
                    drained = true;
                    connection.graceful_shutdown();
                    continue;
                }
            };
            match next {
                Some(Ok((request, respond))) => {
                    let accepted = Box::new(Accepted {
                        info: info.clone(),
                        request,
                        respond,
                    });
                    tokio::spawn(Arc::clone(&self).serve_stream(accepted));
                }
                Some(Err(error)) => {
                    tracing::debug!(%error, "Workload API connection failed");
                    return;
                }
                None => return,
            }
        }
    }

    /// Serves one stream. Its task is as large as its future for as long as it lives (a
    /// `FetchX509SVID` stream's, as long as the workload runs), and an async function keeps
    /// room for its arguments in its future throughout, where the states of its awaits share
    /// room: so the stream comes boxed, and what only the call's start needs (the request and
    /// the attestation) takes no room while the watch runs.
    async fn serve_stream(self: Arc<Self>, accepted: Box<Accepted>) {
        let Accepted {
            info,
            request,
            respond,
        } = *accepted;
        match &self.fast {
            Some(api) if takes_fast_path(&request) => {
                let call = self.metrics.start_call(FETCH_X509_SVID);
                let started = start_x509svid(api, call, info, request, respond).await;
                if let Some((watch, mut outlet)) = started {
                    // A stream that ends without a status of its own (the agent is
                    // stopping) ends as tonic ends a response stream: with OK.
                    if watch.run(&mut outlet, None).await == WatchEnd::Gone {
                        outlet.finish(&Status::ok(""));
                    }
                }
            }
            _ => self.route(info, request, respond).await,
        }
    }

    /// Hands the call to the tonic services and sends back what they answer.
    async fn route(
        &self,
        info: WorkloadConnectInfo,
        request: http::Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
    ) {
        let (mut parts, body) = request.into_parts();
        parts.extensions.insert(info);
        let request = http::Request::from_parts(parts, RequestBody::new(body));
        let response = tokio::select! {
            response = self.routes.clone().oneshot(request) => response,
            _ = poll_fn(|cx| respond.poll_reset(cx)) => return,
        };
        let response = match response {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let (parts, body) = response.into_parts();
        let end = body.is_end_stream();
        let Ok(mut send) = respond.send_response(http::Response::from_parts(parts, ()), end) else {
            return;
        };
        if !end {
            pipe(body, &mut send).await;
        }
    }
}

/// Whether `request` is answered without the router: a `FetchX509SVID` whose request names
/// no compression.
fn takes_fast_path(request: &http::Request<RecvStream>) -> bool {
    request.uri().path() == FETCH_X509_SVID
        && request
            .headers()
            .get("grpc-encoding")
            .is_none_or(|encoding| encoding == "identity")
}

/// A stream as the connection accepted it.
struct Accepted {
    info: WorkloadConnectInfo,
    request: http::Request<RecvStream>,
    respond: SendResponse<Bytes>,
}

/// `FetchX509SVID`'s start on its stream: the same checks and statuses as through the
/// router. The watch to run and its outlet, with the response's headers sent, or nothing if
/// the call ended here (refused, or the client gone).
async fn start_x509svid(
    api: &WorkloadApi,
    call: CallRecord,
    info: WorkloadConnectInfo,
    request: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) -> Option<(Watch<X509Stepper>, Http2Outlet)> {
    let (mut parts, mut body) = request.into_parts();
    let started = async {
        if !super::one_true(parts.headers.get_all(SECURITY_HEADER).iter()) {
            return Err(super::WorkloadError::MissingSecurityHeader.into_status());
        }
        let message: X509svidRequest = read_request(&mut body).await?;
        parts.extensions.insert(info);
        let request = tonic::Request::from_http(http::Request::from_parts(parts, message));
        api.x509_watch(&request).await
    };
    let started = tokio::select! {
        started = started => started,
        _ = poll_fn(|cx| respond.poll_reset(cx)) => return None,
    };
    let mut outlet = Http2Outlet {
        respond,
        send: None,
        call: Some(call),
        broken: false,
    };
    match started {
        // The headers go out at once, as tonic sends a response stream's: a client waiting
        // for them learns that the call was taken.
        Ok(watch) => outlet.start().then_some((watch, outlet)),
        Err(status) => {
            outlet.finish(&status);
            None
        }
    }
}

/// A `FetchX509SVID` response on its HTTP/2 stream: the headers once the call is taken,
/// the status in trailers (or alone, for a call refused).
struct Http2Outlet {
    respond: SendResponse<Bytes>,
    send: Option<SendStream<Bytes>>,
    /// The call's record until its status is sent; dropped unfinished, it counts as
    /// canceled.
    call: Option<CallRecord>,
    /// Whether the stream failed (reset by the client, or the connection gone).
    broken: bool,
}

impl Http2Outlet {
    /// Ends the response with `status`, unless it has ended already.
    fn finish(&mut self, status: &Status) {
        let Some(call) = self.call.take() else { return };
        if self.broken {
            return;
        }
        call.finish(status.code() as i32);
        match &mut self.send {
            Some(send) => {
                let mut trailers = http::HeaderMap::new();
                if status.add_header(&mut trailers).is_ok() {
                    let _ = send.send_trailers(trailers);
                } else {
                    send.send_reset(Reason::INTERNAL_ERROR);
                }
            }
            None => {
                let _ = self.respond.send_response(status.clone().into_http(), true);
            }
        }
    }

    /// Sends the response's headers; false if the stream is gone.
    fn start(&mut self) -> bool {
        let headers = http::Response::builder()
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .body(());
        let Ok(headers) = headers else { return false };
        match self.respond.send_response(headers, false) {
            Ok(send) => {
                self.send = Some(send);
                true
            }
            Err(_) => false,
        }
    }

    /// Sends `framed` once the stream has room for it.
    async fn send(&mut self, framed: Bytes, timeout: std::time::Duration) -> Delivery {
        let Some(send) = &mut self.send else {
            return Delivery::Gone;
        };
        match tokio::time::timeout(timeout, room(send)).await {
            Ok(Ok(())) => {}
            Ok(Err(())) => return Delivery::Gone,
            Err(_) => return Delivery::Stalled,
        }
        if send.send_data(framed, false).is_err() {
            return Delivery::Gone;
        }
        Delivery::Sent
    }
}

impl Outlet<Arc<X509Message>> for &mut Http2Outlet {
    async fn deliver(
        &mut self,
        item: Result<Arc<X509Message>, Status>,
        timeout: std::time::Duration,
    ) -> Delivery {
        let status = match item.and_then(|message| message.framed()) {
            Ok(framed) => {
                let delivery = self.send(framed, timeout).await;
                if let Delivery::Gone = delivery {
                    self.broken = true;
                }
                return delivery;
            }
            Err(status) => status,
        };
        self.finish(&status);
        Delivery::Sent
    }

    async fn closed(&mut self) {
        match &mut self.send {
            Some(send) => {
                let _ = poll_fn(|cx| send.poll_reset(cx)).await;
            }
            None => {
                let _ = poll_fn(|cx| self.respond.poll_reset(cx)).await;
            }
        }
    }
}

/// Reads a unary request's one message to the end of its stream.
async fn read_request<M: prost::Message + Default>(body: &mut RecvStream) -> Result<M, Status> {
    let mut received = BytesMut::new();
    while let Some(data) = body.data().await {
        let data =
            data.map_err(|error| Status::cancelled(format!("reading the request: {error}")))?;
        let _ = body.flow_control().release_capacity(data.len());
        if received.len() + data.len() > MESSAGE_PREFIX + MAX_REQUEST_MESSAGE {
            return Err(Status::resource_exhausted(format!(
                "the request message is larger than {MAX_REQUEST_MESSAGE} bytes"
            )));
        }
        received.extend_from_slice(&data);
    }
    decode_request(&received)
}

/// The one message of a request's body: uncompressed, its length as its prefix says, nothing
/// after it.
fn decode_request<M: prost::Message + Default>(body: &[u8]) -> Result<M, Status> {
    let Some((&compressed, rest)) = body.split_first() else {
        return Err(Status::internal("Missing request message."));
    };
    if compressed != 0 {
        return Err(Status::internal(
            "the request message is compressed but the request names no grpc-encoding",
        ));
    }
    let Some((length, rest)) = rest.split_first_chunk::<4>() else {
        return Err(Status::internal(
            "the request message's length is cut short",
        ));
    };
    let length = u32::from_be_bytes(*length) as usize;
    let Some(message) = rest.get(..length) else {
        return Err(Status::internal(format!(
            "the request message is cut short: {} of {length} bytes",
            rest.len()
        )));
    };
    if rest.len() > length {
        return Err(Status::unimplemented(
            "the request carries more than one message; the call takes one",
        ));
    }
    M::decode(message).map_err(|error| Status::internal(format!("decoding the request: {error}")))
}

/// `message` as one gRPC message: no compression, four bytes of length, the message.
pub(super) fn framed(message: &impl prost::Message) -> Result<Bytes, Status> {
    let length = message.encoded_len();
    let prefix = u32::try_from(length)
        .map_err(|_| Status::new(Code::Internal, "a response message over 4 GiB"))?;
    let mut framed = Vec::with_capacity(MESSAGE_PREFIX + length);
    framed.push(0);
    framed.extend_from_slice(&prefix.to_be_bytes());
    message
        .encode(&mut framed)
        .map_err(|error| Status::internal(format!("encoding the response: {error}")))?;
    Ok(framed.into())
}

/// Waits until the stream may send at least one byte more: a client that does not read
/// leaves its stream without room once `MAX_SEND_BUFFER` is queued, which holds the
/// response's producer back (and, for a watch, ends in the stall timeout).
async fn room(send: &mut SendStream<Bytes>) -> Result<(), ()> {
    send.reserve_capacity(1);
    while send.capacity() == 0 {
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Err(()),
        }
    }
    Ok(())
}

/// Sends `body` on `send` until it ends, the client resets the stream, or it fails.
async fn pipe<B>(body: B, send: &mut SendStream<Bytes>)
where
    B: Body<Data = Bytes>,
    B::Error: Display,
{
    let mut body = pin!(body);
    loop {
        if room(send).await.is_err() {
            return;
        }
        let frame = tokio::select! {
            frame = poll_fn(|cx| body.as_mut().poll_frame(cx)) => frame,
            _ = poll_fn(|cx| send.poll_reset(cx)) => return,
        };
        let frame = match frame {
            Some(Ok(frame)) => frame,
            Some(Err(error)) => {
                tracing::debug!(%error, "a Workload API response failed");
                send.send_reset(Reason::INTERNAL_ERROR);
                return;
            }
            None => {
                let _ = send.send_data(Bytes::new(), true);
                return;
            }
        };
        match frame.into_data() {
            Ok(data) => {
                let end = body.is_end_stream();
                if send.send_data(data, end).is_err() || end {
                    return;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    send.reserve_capacity(0);
                    let _ = send.send_trailers(trailers);
                    return;
                }
            }
        }
    }
}

/// A request body read from its h2 stream, giving back receive window as it is read.
struct RequestBody {
    stream: RecvStream,
    data_done: bool,
}

impl RequestBody {
    fn new(stream: RecvStream) -> Self {
        Self {
            stream,
            data_done: false,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if !this.data_done {
            match ready!(this.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.stream.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => this.data_done = true,
            }
        }
        Poll::Ready(match ready!(this.stream.poll_trailers(cx)) {
            Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Ok(None) => None,
            Err(error) => Some(Err(error)),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use lanyard_proto::workload::X509svidResponse;

    use super::*;

    fn body(compressed: u8, length: u32, message: &[u8]) -> Vec<u8> {
        let mut body = vec![compressed];
        body.extend_from_slice(&length.to_be_bytes());
        body.extend_from_slice(message);
        body
    }

    /// The size of the future `f` returns, without calling it.
    fn future_size<F, A, B, Fut>(_: F) -> usize
    where
        F: FnOnce(A, B) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// A stream's task lives as long as its workload does: what only the call's start needs
    /// takes no room in it once the watch runs. Passed by value through the calls, the
    /// accepted stream and the call's start kept room in every open stream's task (5.5 kB in
    /// all); with the watch run from inside the start again it is 3.4 kB, and 2.6 kB as it
    /// is.
    #[test]
    fn a_streams_task_holds_little_beyond_its_watch() {
        let stream = future_size(Http2Server::serve_stream);
        assert!(stream < 3 << 10, "a stream's future takes {stream} bytes");
    }

    #[test]
    fn request_messages_decode_only_when_whole_and_alone() {
        let empty: X509svidRequest = decode_request(&body(0, 0, &[])).unwrap();
        assert_eq!(empty, X509svidRequest {});

        let refused = |bytes: &[u8]| decode_request::<X509svidRequest>(bytes).unwrap_err();
        assert_eq!(refused(&[]).message(), "Missing request message.");
        assert!(refused(&body(1, 0, &[])).message().contains("compressed"));
        assert!(refused(&[0, 0, 0]).message().contains("length"));
        assert!(
            refused(&body(0, 3, &[8]))
                .message()
                .contains("1 of 3 bytes")
        );
        assert_eq!(refused(&body(0, 0, &[0])).code(), Code::Unimplemented);
        // A field the request does not have is skipped, as protobuf wants; a broken one is not.
        let _: X509svidRequest = decode_request(&body(0, 2, &[8, 1])).unwrap();
        assert!(refused(&body(0, 1, &[8])).message().contains("decoding"));
    }

    #[test]
    fn responses_are_framed_with_their_length() {
        let response = X509svidResponse {
            crl: vec![vec![1, 2, 3]],
            ..X509svidResponse::default()
        };
        let framed = framed(&response).unwrap();
        let length = prost::Message::encoded_len(&response);
        assert_eq!(framed.len(), MESSAGE_PREFIX + length);
        assert_eq!(framed[0], 0);
        assert_eq!(framed[1..5], u32::try_from(length).unwrap().to_be_bytes());
        let decoded: X509svidResponse = prost::Message::decode(&framed[5..]).unwrap();
        assert_eq!(decoded, response);
    }
}
