//! Fuzz targets: every parser that a peer (agent, workload, load balancer, federated trust
//! domain) or an operator (config files, `--data` and declared entries files, audit logs)
//! feeds, one `pub fn <target>(data: &[u8])` each.
//!
//! A target never fails on bad input: it feeds the bytes to the real parser and, where cheap,
//! checks an invariant of what parsed (an ID re-parses from its text to the same value, a
//! bundle serialises and re-parses equal). A panic is a finding. The same functions run under
//! libFuzzer (`fuzz/harness`, see `fuzz/README.md`) and in the smoke run of `cargo test`
//! (`tests/it/smoke.rs`), which replays `corpus/<target>/` and `regressions/<target>/` and then
//! mutates the corpus for a few seconds per target.
//!
//! Time is fixed at [`fuzz_now`], so that the seed corpus (certificates and tokens made with
//! long validity by the corpus generator) verifies the same way on every run.

use std::net::SocketAddr;
use std::str::FromStr as _;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanyard_core::bundle::TrustBundle;
use lanyard_core::entry::EntryId;
use lanyard_core::id::{MAX_SPIFFE_ID_LEN, SpiffeId, TrustDomain};
use lanyard_core::keys::{KeyPair, KeyType};
use lanyard_core::selector::Selector;
use lanyard_core::x509;
use lanyard_core::x509pop;
use lanyard_server::proxy_protocol;

/// The time every target checks validity at: 2026-01-01T00:00:00Z.
pub const FUZZ_NOW_UNIX: u64 = 1_767_225_600;

/// [`FUZZ_NOW_UNIX`] as a `SystemTime`.
pub fn fuzz_now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(FUZZ_NOW_UNIX)
}

/// The trust domain of the fixtures and of parsers that need one.
pub const FUZZ_TRUST_DOMAIN: &str = "example.org";

/// The audience the `jwt` target validates tokens for.
pub const FUZZ_AUDIENCE: &str = "lanyard-fuzz";

/// The x509pop trust anchor (DER), a CA the corpus generator made; payloads in the seed corpus
/// chain to it, so mutations reach the challenge and the response.
pub const X509POP_CA_DER: &[u8] = include_bytes!("../fixtures/x509pop_ca.der");

/// The JWKS bundle the `jwt` target validates against; the seed tokens are signed by its key.
pub const JWT_BUNDLE_JSON: &str = include_str!("../fixtures/jwt_bundle.json");

/// A fuzz target: feeds the bytes to parsers and panics on a finding.
pub type Target = fn(&[u8]);

/// Every target, by name: `corpus/<name>/`, `regressions/<name>/` and the harness binary of the
/// same name.
pub const TARGETS: &[(&str, Target)] = &[
    ("spiffe_id", spiffe_id),
    ("selector", selector),
    ("csr", csr),
    ("x509_chain", x509_chain),
    ("x509_bundle", x509_bundle),
    ("bundle_json", bundle_json),
    ("jwt", jwt),
    ("x509pop", x509pop),
    ("server_config", server_config),
    ("agent_config", agent_config),
    ("entry_data", entry_data),
    ("federation_data", federation_data),
    ("federation_relationship", federation_relationship),
    ("declared_entries", declared_entries),
    ("h2_authority", h2_authority),
    ("h2_frames", h2_frames),
    ("proxy_protocol", proxy_protocol),
    ("audit_log", audit_log),
];

fn trust_domain() -> TrustDomain {
    TrustDomain::new(FUZZ_TRUST_DOMAIN).expect("the fuzz trust domain is valid")
}

/// SPIFFE IDs and trust domain names (`TrustDomain`, `SpiffeId`, `EntryId`, `KeyType`), as
/// every API, config file and certificate hands them over.
pub fn spiffe_id(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::from_str(text) {
        assert!(id.as_str().len() <= MAX_SPIFFE_ID_LEN, "{id:?} is too long");
        let text = id.to_string();
        let again = SpiffeId::from_str(&text).expect("an ID re-parses from its text");
        assert_eq!(again, id);
        let trust_domain = id.trust_domain();
        assert!(id.is_member_of(&trust_domain));
        assert_eq!(trust_domain.name(), id.trust_domain_name());
        let rebuilt = SpiffeId::from_path(&trust_domain, id.path())
            .expect("an ID rebuilds from its trust domain and path");
        assert_eq!(rebuilt, id);
        assert_eq!(id.is_trust_domain_id(), id.path().is_empty());
        let _ = (id.is_server_id(), id.is_agent_id(), id.is_reserved());
        let _ = id.join("segment");
    }
    if let Ok(trust_domain) = TrustDomain::new(text) {
        let again = TrustDomain::new(trust_domain.name()).expect("a name re-parses");
        assert_eq!(again, trust_domain);
        let id = trust_domain.id();
        assert!(id.is_trust_domain_id());
        assert_eq!(
            SpiffeId::from_str(id.as_str()).expect("the trust domain ID parses"),
            id
        );
        let _ = trust_domain.agent_id("fuzz", &[text]);
        let _ = trust_domain.join_token_agent_id(text);
    }
    if let Ok(entry_id) = EntryId::new(text) {
        assert_eq!(entry_id.as_str(), text);
    }
    let _ = KeyType::from_str(text);
}

/// Selectors (`type:value`) as entries, the CLI and attestors give them.
pub fn selector(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(selector) = Selector::from_str(text) {
        let again = Selector::from_str(&selector.to_string()).expect("a selector re-parses");
        assert_eq!(again, selector);
        let rebuilt =
            Selector::new(selector.kind(), selector.value()).expect("a selector rebuilds");
        assert_eq!(rebuilt, selector);
    }
    if let Some((kind, value)) = text.split_once('\n') {
        let _ = Selector::new(kind, value);
    }
}

/// The CA that signs SVIDs for CSRs in the `csr` target, made once.
static CSR_CA: LazyLock<x509::X509Ca> = LazyLock::new(|| {
    let key = KeyPair::generate(KeyType::EcP256).expect("ring generates a P-256 key");
    x509::X509Ca::self_signed(
        &trust_domain(),
        key,
        &x509::CaSubject::default(),
        fuzz_now(),
        Duration::from_secs(3600),
    )
    .expect("a self-signed CA")
});

/// PKCS#10 CSRs as agents send them to `BatchNewX509SVID`, `AttestAgent` and `RenewAgent`, and
/// minting an SVID for one that verifies.
pub fn csr(data: &[u8]) {
    let Ok(csr) = x509::parse_csr(data) else {
        return;
    };
    assert!(!csr.public_key_der().is_empty());
    let id = SpiffeId::from_str("spiffe://example.org/workload").expect("a valid ID");
    let svid = CSR_CA
        .mint_svid_from_csr(data, &id, &[], Duration::from_secs(600), fuzz_now())
        .expect("a CSR that verifies is signed");
    assert_eq!(svid.spiffe_id(), &id);
}

/// Splits concatenated DER into its top-level TLVs, without judging their contents, so that
/// malformed certificates still reach the parsers. Trailing garbage becomes the last item.
pub fn split_der(mut data: &[u8]) -> Vec<Vec<u8>> {
    let mut items = Vec::new();
    while !data.is_empty() {
        let len = der_tlv_len(data).unwrap_or(data.len()).min(data.len());
        let (item, rest) = data.split_at(len);
        items.push(item.to_vec());
        data = rest;
    }
    items
}

fn der_tlv_len(data: &[u8]) -> Option<usize> {
    let first = *data.get(1)?;
    if first < 0x80 {
        return Some(2 + usize::from(first));
    }
    let n_bytes = usize::from(first & 0x7f);
    if n_bytes == 0 || n_bytes > 4 {
        return None;
    }
    let mut len = 0usize;
    for byte in data.get(2..2 + n_bytes)? {
        len = (len << 8) | usize::from(*byte);
    }
    (2 + n_bytes).checked_add(len)
}

/// X.509 certificate chains as the agent and server receive them (SVIDs, CA chains): the
/// certificate helpers on each certificate, `X509Svid::from_chain`, and SVID chain
/// verification of all certificates but the last against the last as the authority.
pub fn x509_chain(data: &[u8]) {
    let certs = split_der(data);
    for der in &certs {
        let _ = x509::spiffe_id_of(der);
        let _ = x509::validity_of(der);
        let _ = x509::is_ca(der);
        let _ = x509::serial_decimal(der);
        let _ = x509::authority_id_of(der);
        let _ = x509::subject_key_id_hex(der);
        let _ = x509::fingerprint_sha1_hex(der);
        let _ = lanyard_core::X509Authority::new(der.clone());
    }
    if let Ok(svid) = x509::X509Svid::from_chain(certs.clone()) {
        assert_eq!(
            svid.leaf_der(),
            certs.first().map(Vec::as_slice).unwrap_or_default()
        );
    }
    if let Some((authority, chain)) = certs.split_last()
        && !chain.is_empty()
    {
        let trust_domain = chain
            .first()
            .and_then(|leaf| x509::spiffe_id_of(leaf).ok())
            .map_or_else(trust_domain, |id| id.trust_domain());
        if let Ok(verified) = x509::verify_svid_chain(
            chain,
            &trust_domain,
            std::slice::from_ref(authority),
            fuzz_now(),
        ) {
            assert!(verified.spiffe_id().is_member_of(&trust_domain));
            assert!(verified.not_before() <= fuzz_now() && fuzz_now() <= verified.not_after());
        }
    }
}

/// X.509 bundles in PEM (operator files, `bundle set`) and concatenated DER (the Workload
/// API's form); a bundle that parses re-parses equal from both serialisations.
pub fn x509_bundle(data: &[u8]) {
    let check = |bundle: &TrustBundle| {
        let der = bundle.x509_authorities_der_concat();
        let from_der = TrustBundle::from_x509_der_concat(trust_domain(), &der)
            .expect("a bundle's DER re-parses");
        assert_eq!(&from_der, bundle);
        let pem = bundle.x509_authorities_pem();
        let from_pem = TrustBundle::from_pem_certificates(trust_domain(), &pem)
            .expect("a bundle's PEM re-parses");
        assert_eq!(&from_pem, bundle);
    };
    if let Ok(bundle) = TrustBundle::from_x509_der_concat(trust_domain(), data) {
        check(&bundle);
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(bundle) = TrustBundle::from_pem_certificates(trust_domain(), text)
    {
        check(&bundle);
    }
}

/// SPIFFE bundles (JWK Sets) from federated trust domains and operators; a bundle that parses
/// serialises and re-parses equal.
pub fn bundle_json(data: &[u8]) {
    let Ok(bundle) = TrustBundle::from_jwks_json(trust_domain(), data) else {
        return;
    };
    let json = bundle.to_jwks_json();
    let again = TrustBundle::from_jwks_json(trust_domain(), json.as_bytes())
        .expect("a bundle's JWKS re-parses");
    assert_eq!(again, bundle);
    let jwt_only =
        TrustBundle::from_jwks_json(trust_domain(), bundle.jwt_only_jwks_json().as_bytes())
            .expect("the JWT-only JWKS re-parses");
    assert_eq!(jwt_only.jwt_authorities(), bundle.jwt_authorities());
}

static JWT_BUNDLE: LazyLock<TrustBundle> = LazyLock::new(|| {
    TrustBundle::from_jwks_json(trust_domain(), JWT_BUNDLE_JSON.as_bytes())
        .expect("the JWT fixture bundle parses")
});

/// JWT-SVIDs as workloads hand them to `ValidateJWTSVID` and the CLI's `jwt validate`,
/// validated against a bundle whose key signed the seed tokens.
pub fn jwt(data: &[u8]) {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(validated) = lanyard_core::jwt::validate_jwt_svid_with_bundle(
        token,
        FUZZ_AUDIENCE,
        &JWT_BUNDLE,
        fuzz_now(),
    ) {
        assert!(validated.spiffe_id.is_member_of(JWT_BUNDLE.trust_domain()));
        assert!(validated.audiences.iter().any(|a| a == FUZZ_AUDIENCE));
    }
}

/// The key an agent answers x509pop challenges with in the `x509pop` target.
static X509POP_AGENT_KEY: LazyLock<KeyPair> =
    LazyLock::new(|| KeyPair::generate(KeyType::EcP256).expect("ring generates a P-256 key"));

/// x509pop node attestation: the bytes up to the first newline are the agent's payload, which
/// the server checks against [`X509POP_CA_DER`] (`ServerAttestation::begin`); the rest is the
/// agent's response to the challenge (`finish`), and also a challenge the agent answers
/// (`answer_challenge`, the agent parsing what the server sent).
pub fn x509pop(data: &[u8]) {
    let (payload, response) = match data.iter().position(|b| *b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let _ = x509pop::answer_challenge(&X509POP_AGENT_KEY, response);
    let anchors = [X509POP_CA_DER.to_vec()];
    if let Ok((state, challenge)) =
        x509pop::ServerAttestation::begin(payload, &anchors, &trust_domain(), fuzz_now())
    {
        let challenge: x509pop::Challenge =
            serde_json::from_slice(&challenge).expect("the server's challenge is JSON");
        assert!(challenge.rsa_signature.is_some() != challenge.ecdsa_signature.is_some());
        if let Ok(result) = state.finish(response) {
            assert!(result.agent_id().is_agent_id());
        }
    }
}

/// The server's TOML config file.
pub fn server_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = lanyard_server::config::ServerConfig::parse(text);
    }
}

/// The agent's TOML config file.
pub fn agent_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = lanyard_agent::config::AgentConfig::parse(text);
    }
}

/// The JSON batch file of `lanyard entry create --data` and `entry update --data`.
pub fn entry_data(data: &[u8]) {
    let _ = lanyard_cli::fuzzing::parse_entry_data(data);
}

/// The JSON file of `lanyard federation create --data` and `federation update --data`
/// (`spire-server federation`'s format), each relationship built with its bundle.
pub fn federation_data(data: &[u8]) {
    let _ = lanyard_cli::fuzzing::parse_federation_data(data);
}

/// A `FederationRelationship` message as an admin sends it to the TrustDomain API, decoded
/// and checked as the server does; one that passes encodes and parses back equal, and its
/// endpoint URL re-parses from its text.
pub fn federation_relationship(data: &[u8]) {
    use lanyard_proto::convert::{
        federation_relationship_from_proto, federation_relationship_to_proto,
    };
    use prost::Message as _;

    let Ok(message) = lanyard_proto::spire::api::types::FederationRelationship::decode(data) else {
        return;
    };
    let Ok(relationship) = federation_relationship_from_proto(&message) else {
        return;
    };
    let again =
        federation_relationship_from_proto(&federation_relationship_to_proto(&relationship, None))
            .expect("a relationship's message parses back");
    assert_eq!(again, relationship);
    let url = relationship.bundle_endpoint_url();
    assert_eq!(
        url.as_str()
            .parse::<lanyard_core::BundleEndpointUrl>()
            .as_ref(),
        Ok(url)
    );
    let _ = relationship.check_foreign(&trust_domain());
}

/// The TOML declared entries file of `lanyard plan` and `lanyard apply`.
pub fn declared_entries(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = lanyard_cli::fuzzing::parse_declared_entries(text);
    }
}

/// The client connection preface and an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

/// The largest `:authority` the `h2_authority` target sends; HEADERS must fit in one frame.
const H2_MAX_AUTHORITY_LEN: usize = 8 * 1024;

/// The gRPC path of the Workload API's X.509 stream, as every request in `h2_authority` asks.
const H2_PATH: &str = "/SpiffeWorkloadAPI/FetchX509SVID";

fn hpack_integer(out: &mut Vec<u8>, flags: u8, prefix_bits: u32, mut value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(flags | u8::try_from(value).expect("below the prefix maximum"));
        return;
    }
    out.push(flags | u8::try_from(max).expect("a prefix of at most 7 bits"));
    value -= max;
    while value >= 0x80 {
        out.push(0x80 | u8::try_from(value & 0x7f).expect("seven bits"));
        value >>= 7;
    }
    out.push(u8::try_from(value).expect("below 0x80"));
}

/// A header as an HPACK literal without indexing, new name, no Huffman coding.
fn hpack_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    hpack_integer(out, 0, 7, name.len());
    out.extend_from_slice(name);
    hpack_integer(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

fn h2_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("a frame below 16 MiB");
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream_id.to_be_bytes());
    out.extend_from_slice(payload);
}

/// What an h2 server made of one connection's bytes: each request's authority and path, and
/// whether the connection ended in an error.
#[derive(Debug, Default)]
struct H2Outcome {
    requests: Vec<(Option<String>, String)>,
    connection_error: bool,
}

/// Serves `client_bytes` (preface included) to h2's server, the one under the Workload API
/// (the vendored copy, through the workspace's `[patch.crates-io]`), until it has consumed them
/// all, then closes the client's side.
///
/// h2 drops the streams it has not handed out once it sees the end of its input, so the client
/// stays open while requests are accepted: everything is in memory on one thread, with tokio's
/// cooperative budget off, so an accept that would block means every byte has been read.
fn h2_serve(client_bytes: &[u8]) -> H2Outcome {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
    runtime.block_on(tokio::task::unconstrained(async {
        use std::task::Poll;
        use tokio::io::AsyncWriteExt as _;
        // Room for everything the server writes back (SETTINGS, ACKs, resets), which it
        // never blocks on.
        let (mut client, server) = tokio::io::duplex(2 * client_bytes.len() + 64 * 1024);
        let mut outcome = H2Outcome::default();
        if client.write_all(client_bytes).await.is_err() {
            return outcome;
        }
        let handshake = h2::server::handshake(server);
        let mut handshake = std::pin::pin!(handshake);
        let mut connection =
            match std::future::poll_fn(|cx| Poll::Ready(handshake.as_mut().poll(cx))).await {
                Poll::Ready(Ok(connection)) => connection,
                Poll::Ready(Err(_)) => {
                    outcome.connection_error = true;
                    return outcome;
                }
                Poll::Pending => return outcome,
            };
        let mut responders = Vec::new();
        loop {
            match std::future::poll_fn(|cx| Poll::Ready(connection.poll_accept(cx))).await {
                Poll::Ready(Some(Ok((request, respond)))) => {
                    outcome.requests.push((
                        request.uri().authority().map(|a| a.as_str().to_owned()),
                        request.uri().path().to_owned(),
                    ));
                    responders.push(respond);
                }
                Poll::Ready(Some(Err(_))) => {
                    outcome.connection_error = true;
                    return outcome;
                }
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
        // The end of the input: h2's closing paths.
        if client.shutdown().await.is_ok() {
            while let Poll::Ready(Some(Ok(_))) =
                std::future::poll_fn(|cx| Poll::Ready(connection.poll_accept(cx))).await
            {
            }
        }
        drop(responders);
        outcome
    }))
}

fn h2_request_block(authority: &[u8]) -> Vec<u8> {
    let mut block = Vec::new();
    hpack_literal(&mut block, b":method", b"POST");
    hpack_literal(&mut block, b":scheme", b"http");
    hpack_literal(&mut block, b":path", H2_PATH.as_bytes());
    hpack_literal(&mut block, b":authority", authority);
    hpack_literal(&mut block, b"content-type", b"application/grpc");
    hpack_literal(&mut block, b"workload.spiffe.io", b"true");
    block
}

/// A gRPC request to the Workload API as one HEADERS frame on stream 1 (END_HEADERS and
/// END_STREAM), with `authority` as its `:authority`; the seed corpus builds on it.
pub fn h2_request_frame(authority: impl AsRef<[u8]>) -> Vec<u8> {
    let mut bytes = Vec::new();
    h2_frame(
        &mut bytes,
        0x1,
        0x1 | 0x4,
        1,
        &h2_request_block(authority.as_ref()),
    );
    bytes
}

/// [`h2_request_frame`] without END_STREAM: DATA frames may follow.
pub fn h2_request_frame_open(authority: impl AsRef<[u8]>) -> Vec<u8> {
    let mut bytes = Vec::new();
    h2_frame(
        &mut bytes,
        0x1,
        0x4,
        1,
        &h2_request_block(authority.as_ref()),
    );
    bytes
}

/// [`h2_request_frame`] split into HEADERS and a CONTINUATION frame.
pub fn h2_request_frames_continued(authority: impl AsRef<[u8]>) -> Vec<u8> {
    let block = h2_request_block(authority.as_ref());
    let (first, rest) = block.split_at(block.len() / 2);
    let mut bytes = Vec::new();
    h2_frame(&mut bytes, 0x1, 0x1, 1, first);
    h2_frame(&mut bytes, 0x9, 0x4, 1, rest);
    bytes
}

/// The Workload API's HTTP/2 `:authority` handling (the vendored h2 patch): the bytes are the
/// `:authority` of a gRPC request. Whatever it holds, a UTF-8 authority must not cost the
/// request: it is served with the authority `http` parses it to, or with none.
pub fn h2_authority(data: &[u8]) {
    let authority = &data[..data.len().min(H2_MAX_AUTHORITY_LEN)];
    let mut bytes = H2_PREFACE.to_vec();
    bytes.extend_from_slice(&h2_request_frame(authority));
    let outcome = h2_serve(&bytes);

    let Ok(text) = std::str::from_utf8(authority) else {
        return;
    };
    assert!(
        !outcome.connection_error,
        "a UTF-8 :authority {text:?} broke the connection"
    );
    let [(served_authority, path)] = outcome.requests.as_slice() else {
        panic!(
            "a request with :authority {text:?} was not served: {:?}",
            outcome.requests
        );
    };
    assert_eq!(path, H2_PATH);
    let expected = http::uri::Authority::try_from(text)
        .ok()
        .map(|a| a.as_str().to_owned());
    assert_eq!(served_authority, &expected, ":authority {text:?}");
}

/// Raw HTTP/2 frames after the client preface, as any local process can send them to the
/// Workload API's socket: h2's frame, HPACK and stream state parsing.
pub fn h2_frames(data: &[u8]) {
    let mut bytes = H2_PREFACE.to_vec();
    bytes.extend_from_slice(data);
    let _ = h2_serve(&bytes);
}

/// The PROXY protocol v2 header a load balancer sends before a TLS connection to the server;
/// an address header re-encodes to the same addresses.
pub fn proxy_protocol(data: &[u8]) {
    let _ = proxy_protocol::header_len(data);
    if let Ok(proxy_protocol::ProxiedAddress::Proxied {
        source,
        destination,
    }) = proxy_protocol::parse(data)
    {
        let encoded = proxy_protocol::encode(source, destination);
        let decoded: (SocketAddr, SocketAddr) = match proxy_protocol::parse(&encoded) {
            Ok(proxy_protocol::ProxiedAddress::Proxied {
                source,
                destination,
            }) => (source, destination),
            other => panic!("re-encoded header parses as {other:?}"),
        };
        assert_eq!(decoded, (source, destination));
    }
}

/// The server's hash-chained audit log, as `lanyard audit verify` and the server's start read
/// it from disk: a log the server resumes (its torn last line cut off) verifies after one more
/// line is appended.
pub fn audit_log(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = lanyard_core::audit::verify(text);
    let _ = lanyard_core::audit::events(text).count();
    if let Ok((mut chain, torn)) = lanyard_core::audit::Chain::resume(text) {
        let kept = text
            .get(..text.len() - torn)
            .expect("the torn line is a suffix of the log");
        let line = chain.append(fuzz_now(), &serde_json::json!({"event": "fuzz"}));
        let head = lanyard_core::audit::verify(&format!("{kept}{line}"))
            .expect("a resumed log verifies after an append");
        assert_eq!(head.to_string(), chain.head().to_string());
    }
}
