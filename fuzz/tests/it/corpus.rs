//! The seed corpus under `fuzz/corpus/<target>/` and the fixtures under `fuzz/fixtures/`.
//!
//! Certificates, CSRs, tokens and bundles in the corpus are made here, with keys that exist
//! only while the generator runs, validity around `fuzz_now()` (the fixed time every target
//! checks at) and lifetimes of decades, so the corpus does not expire. Text seeds (IDs,
//! selectors, configs, entry files, HTTP/2 authorities) are written out as listed here; the
//! configs and the declared entries file are the examples in `deploy/`.
//!
//! `LANYARD_FUZZ_REGENERATE_CORPUS=1 cargo test -p lanyard-fuzz --test it corpus::` rewrites
//! the generated seeds and the fixtures (the x509pop CA and the JWT bundle change together
//! with the seeds that depend on them); `LANYARD_FUZZ_REGENERATE_CORPUS=<target>,…` rewrites
//! only those targets' seeds; otherwise the test checks that they are in place.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use lanyard_core::audit::Chain;
use lanyard_core::bundle::{JwtAuthority, TrustBundle, X509Authority};
use lanyard_core::jwt::{JwtSigningKey, JwtSvidParams, mint_jwt_svid};
use lanyard_core::keys::{KeyPair, KeyType, pem_encode};
use lanyard_core::x509::{self, CaSubject, SvidParams, X509Ca};
use lanyard_core::{SpiffeId, TrustDomain};
use lanyard_fuzz::{FUZZ_AUDIENCE, FUZZ_TRUST_DOMAIN, TARGETS, fuzz_now};

use crate::smoke::read_dir_inputs;

const DECADES: Duration = Duration::from_secs(40 * 365 * 24 * 3600);
const A_MONTH: Duration = Duration::from_secs(30 * 24 * 3600);

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_owned()
}

fn td() -> TrustDomain {
    TrustDomain::new(FUZZ_TRUST_DOMAIN).expect("valid")
}

fn id(text: &str) -> SpiffeId {
    text.parse().expect("valid ID")
}

fn key(key_type: KeyType) -> KeyPair {
    KeyPair::generate(key_type).expect("key generation")
}

fn root_ca(trust_domain: &TrustDomain, key_type: KeyType) -> X509Ca {
    X509Ca::self_signed(
        trust_domain,
        key(key_type),
        &CaSubject::default(),
        fuzz_now() - A_MONTH,
        DECADES,
    )
    .expect("root CA")
}

fn intermediate_ca(parent: &X509Ca) -> X509Ca {
    let key = key(KeyType::EcP256);
    let trust_domain = parent.trust_domain().cloned().unwrap_or_else(td);
    let der = x509::create_intermediate_ca(
        &trust_domain,
        &key.public_key_der(),
        &CaSubject::default(),
        parent,
        fuzz_now() - A_MONTH,
        DECADES,
    )
    .expect("intermediate CA");
    X509Ca::new(der, key, parent.issued_chain()).expect("intermediate CA wraps")
}

/// An SVID chain (leaf first, up to but without the root).
fn svid(ca: &X509Ca, spiffe_id: &str, dns_names: &[&str]) -> Vec<Vec<u8>> {
    svid_for_key(ca, &key(KeyType::EcP256), spiffe_id, dns_names)
}

fn svid_for_key(ca: &X509Ca, key: &KeyPair, spiffe_id: &str, dns_names: &[&str]) -> Vec<Vec<u8>> {
    let mut params = SvidParams::new(id(spiffe_id), key.public_key_der(), DECADES);
    params.dns_names = dns_names.iter().map(|s| (*s).to_owned()).collect();
    ca.mint_svid(&params, fuzz_now() - A_MONTH)
        .expect("SVID")
        .cert_chain()
        .to_vec()
}

fn concat(items: &[&[u8]]) -> Vec<u8> {
    items.concat()
}

/// The seeds of every target: (target, file name, bytes), plus the fixtures.
struct Generated {
    seeds: Vec<(&'static str, String, Vec<u8>)>,
    x509pop_ca_der: Vec<u8>,
    jwt_bundle_json: String,
}

impl Generated {
    fn add(&mut self, target: &'static str, name: &str, bytes: impl Into<Vec<u8>>) {
        self.seeds.push((target, name.to_owned(), bytes.into()));
    }
}

fn read_repo_file(relative: &str) -> Vec<u8> {
    let path = fuzz_dir().join("..").join(relative);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn generate() -> Generated {
    let mut out = Generated {
        seeds: Vec::new(),
        x509pop_ca_der: Vec::new(),
        jwt_bundle_json: String::new(),
    };

    // SPIFFE IDs, trust domains and entry IDs: valid, and each rule of the grammar broken once.
    let ids: &[(&str, &str)] = &[
        ("workload", "spiffe://example.org/workload"),
        ("trust-domain-id", "spiffe://example.org"),
        (
            "agent",
            "spiffe://example.org/spire/agent/join_token/4d0b8a1e",
        ),
        ("server", "spiffe://example.org/spire/server"),
        (
            "deep",
            "spiffe://prod.example-1.org/ns/default/sa/web_frontend.v2",
        ),
        ("uppercase-td", "spiffe://Example.org/workload"),
        ("uppercase-scheme", "SPIFFE://example.org/workload"),
        ("empty-segment", "spiffe://example.org/a//b"),
        ("dot-segment", "spiffe://example.org/a/./b"),
        ("trailing-slash", "spiffe://example.org/a/"),
        ("port", "spiffe://example.org:8443/workload"),
        ("userinfo", "spiffe://user@example.org/workload"),
        ("query", "spiffe://example.org/workload?x=1"),
        ("percent", "spiffe://example.org/w%20rk"),
        ("http", "https://example.org/workload"),
        ("bare-td", "example.org"),
        ("entry-id", "0f1c8a2e-6b1d-4c57-9d2c-0a9e6f1b2c3d"),
        ("key-type", "ec-p256"),
    ];
    for (name, text) in ids {
        out.add("spiffe_id", name, *text);
    }

    let selectors: &[(&str, &str)] = &[
        ("unix-uid", "unix:uid:1000"),
        ("unix-gid", "unix:gid:0"),
        ("k8s", "k8s:ns:default"),
        ("x509pop-san", "x509pop:san:uri:spiffe://example.org/host"),
        ("docker-label", "docker:label:com.example.name:web"),
        ("no-value", "unix:"),
        ("no-type", ":uid:1000"),
        ("no-colon", "unix"),
        ("new-form", "unix\nuid:1000"),
    ];
    for (name, text) in selectors {
        out.add("selector", name, *text);
    }

    // CSRs: agent (no SAN) and workload (SPIFFE ID), P-256 and P-384.
    let workload = id("spiffe://example.org/workload");
    for (name, key_type, spiffe_id) in [
        ("p256-workload", KeyType::EcP256, Some(&workload)),
        ("p384-workload", KeyType::EcP384, Some(&workload)),
        ("p256-agent", KeyType::EcP256, None),
    ] {
        let der = x509::build_csr(&key(key_type), spiffe_id).expect("CSR");
        out.add("csr", name, der);
    }

    // X.509 chains: leaf(s) then the root as the authority.
    let root = root_ca(&td(), KeyType::EcP256);
    let root_p384 = root_ca(&td(), KeyType::EcP384);
    let intermediate = intermediate_ca(&root);
    let leaf = svid(&root, "spiffe://example.org/workload", &["web.example.org"]);
    let leaf_p384 = svid(&root_p384, "spiffe://example.org/db", &[]);
    let leaf_via_intermediate = svid(&intermediate, "spiffe://example.org/ns/sa/web", &[]);
    let chain = |svid: &[Vec<u8>], root: &X509Ca| {
        let mut items: Vec<&[u8]> = svid.iter().map(Vec::as_slice).collect();
        items.push(root.cert_der());
        concat(&items)
    };
    out.add("x509_chain", "leaf-root", chain(&leaf, &root));
    out.add(
        "x509_chain",
        "leaf-root-p384",
        chain(&leaf_p384, &root_p384),
    );
    out.add(
        "x509_chain",
        "leaf-intermediate-root",
        chain(&leaf_via_intermediate, &root),
    );
    out.add("x509_chain", "wrong-root", chain(&leaf, &root_p384));
    out.add("x509_chain", "root-only", root.cert_der().to_vec());

    // X.509 bundles: PEM and concatenated DER.
    let mut bundle = TrustBundle::new(td());
    bundle.add_x509_authority(X509Authority::new(root.cert_der().to_vec()).expect("CA"));
    bundle.add_x509_authority(X509Authority::new(root_p384.cert_der().to_vec()).expect("CA"));
    out.add(
        "x509_bundle",
        "two-roots.pem",
        bundle.x509_authorities_pem(),
    );
    out.add(
        "x509_bundle",
        "two-roots.der",
        bundle.x509_authorities_der_concat(),
    );
    out.add(
        "x509_bundle",
        "with-key.pem",
        format!(
            "{}{}",
            pem_encode("PRIVATE KEY", b"not a key"),
            pem_encode("CERTIFICATE", root.cert_der())
        ),
    );

    // SPIFFE bundles (JWKS).
    let jwt_key = key(KeyType::EcP256);
    let jwt_key_p384 = key(KeyType::EcP384);
    let mut jwks = bundle.clone();
    jwks.add_jwt_authority(JwtAuthority::from_key_pair("jwt-p256", &jwt_key, None).expect("JWK"))
        .expect("added");
    jwks.add_jwt_authority(
        JwtAuthority::from_key_pair("jwt-p384", &jwt_key_p384, None).expect("JWK"),
    )
    .expect("added");
    jwks.set_sequence_number(42);
    jwks.set_refresh_hint(Some(Duration::from_secs(300)));
    out.add("bundle_json", "full.json", jwks.to_jwks_json());
    out.add("bundle_json", "jwt-only.json", jwks.jwt_only_jwks_json());
    out.add("bundle_json", "empty.json", r#"{"keys":[]}"#);
    out.add(
        "bundle_json",
        "unknown-use.json",
        r#"{"keys":[{"kty":"EC","use":"enc","crv":"P-256","x":"","y":""}],"spiffe_sequence":1}"#,
    );
    out.add(
        "bundle_json",
        "rsa-jwt.json",
        r#"{"keys":[{"kty":"RSA","use":"jwt-svid","kid":"r","n":"sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw","e":"AQAB"}]}"#,
    );

    // The JWT fixture bundle and tokens signed by its keys.
    let mut jwt_bundle = TrustBundle::new(td());
    jwt_bundle
        .add_jwt_authority(JwtAuthority::from_key_pair("jwt-p256", &jwt_key, None).expect("JWK"))
        .expect("added");
    jwt_bundle
        .add_jwt_authority(
            JwtAuthority::from_key_pair("jwt-p384", &jwt_key_p384, None).expect("JWK"),
        )
        .expect("added");
    out.jwt_bundle_json = jwt_bundle.to_jwks_json();
    let audiences = [FUZZ_AUDIENCE.to_owned(), "other".to_owned()];
    let mint = |key: &KeyPair, key_id: &str, subject: &str, ttl: Duration, issuer| {
        mint_jwt_svid(
            &JwtSigningKey {
                key,
                key_id,
                expires_at: None,
            },
            &JwtSvidParams {
                spiffe_id: &id(subject),
                audiences: &audiences,
                ttl,
                issuer,
            },
            fuzz_now() - Duration::from_secs(60),
        )
        .expect("JWT-SVID")
        .token
    };
    let valid = mint(
        &jwt_key,
        "jwt-p256",
        "spiffe://example.org/workload",
        DECADES,
        None,
    );
    out.add("jwt", "es256", valid.clone());
    out.add(
        "jwt",
        "es384-issuer",
        mint(
            &jwt_key_p384,
            "jwt-p384",
            "spiffe://example.org/db",
            DECADES,
            Some("https://oidc.example.org"),
        ),
    );
    out.add(
        "jwt",
        "expired",
        mint(
            &jwt_key,
            "jwt-p256",
            "spiffe://example.org/workload",
            Duration::from_secs(1),
            None,
        ),
    );
    out.add(
        "jwt",
        "other-trust-domain",
        mint(
            &jwt_key,
            "jwt-p256",
            "spiffe://other.org/workload",
            DECADES,
            None,
        ),
    );
    let claims = valid.split('.').nth(1).expect("three parts").to_owned();
    let header_none = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","kid":"jwt-p256","typ":"JWT"}"#);
    out.add("jwt", "alg-none", format!("{header_none}.{claims}."));

    // x509pop: payloads that chain to the fixture CA, each with a response line.
    let x509pop_ca = root_ca(&td(), KeyType::EcP256);
    let x509pop_intermediate = intermediate_ca(&x509pop_ca);
    out.x509pop_ca_der = x509pop_ca.cert_der().to_vec();
    let nonce = STANDARD.encode([7u8; 32]);
    let ecdsa_response = format!(
        r#"{{"rsa_signature":null,"ecdsa_signature":{{"nonce":"{nonce}","r":"{r}","s":"{s}"}}}}"#,
        r = STANDARD.encode([1u8; 32]),
        s = STANDARD.encode([2u8; 32]),
    );
    let ecdsa_challenge =
        format!(r#"{{"rsa_signature":null,"ecdsa_signature":{{"nonce":"{nonce}"}}}}"#);
    let rsa_response = format!(
        r#"{{"rsa_signature":{{"nonce":"{nonce}","signature":"{sig}"}},"ecdsa_signature":null}}"#,
        sig = STANDARD.encode([3u8; 256]),
    );
    let payload_direct = lanyard_core::x509pop::build_attestation_payload(&svid(
        &x509pop_ca,
        "spiffe://example.org/host/node-1",
        &["node-1.example.org"],
    ));
    let payload_intermediate = lanyard_core::x509pop::build_attestation_payload(&svid(
        &x509pop_intermediate,
        "spiffe://example.org/host/node-2",
        &[],
    ));
    let rsa_key = {
        use rsa::pkcs8::EncodePrivateKey as _;
        let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("RSA key");
        let der = private.to_pkcs8_der().expect("PKCS#8");
        KeyPair::from_pkcs8_der(der.as_bytes()).expect("RSA key pair")
    };
    let payload_rsa = lanyard_core::x509pop::build_attestation_payload(&svid_for_key(
        &x509pop_ca,
        &rsa_key,
        "spiffe://example.org/host/node-rsa",
        &[],
    ));
    let line = |payload: &[u8], rest: &str| concat(&[payload, b"\n", rest.as_bytes()]);
    out.add("x509pop", "rsa-leaf", line(&payload_rsa, &rsa_response));
    out.add(
        "x509pop",
        "ecdsa-response",
        line(&payload_direct, &ecdsa_response),
    );
    out.add(
        "x509pop",
        "ecdsa-challenge",
        line(&payload_direct, &ecdsa_challenge),
    );
    out.add(
        "x509pop",
        "intermediate",
        line(&payload_intermediate, &ecdsa_response),
    );
    out.add(
        "x509pop",
        "rsa-response",
        line(&payload_direct, &rsa_response),
    );
    out.add(
        "x509pop",
        "untrusted",
        line(
            &lanyard_core::x509pop::build_attestation_payload(&leaf),
            &ecdsa_response,
        ),
    );

    // Configs and entry files: the examples in deploy/ plus small variants.
    out.add(
        "server_config",
        "deploy-server.toml",
        read_repo_file("deploy/server.toml"),
    );
    out.add(
        "server_config",
        "minimal.toml",
        "trust_domain = \"example.org\"\ndata_dir = \"/var/lib/lanyard\"\n",
    );
    out.add(
        "agent_config",
        "deploy-agent.toml",
        read_repo_file("deploy/agent.toml"),
    );
    out.add(
        "declared_entries",
        "deploy-entries.toml",
        read_repo_file("deploy/entries.example.toml"),
    );
    out.add(
        "declared_entries",
        "minimal.toml",
        "source = \"team-web\"\n\n[[entry]]\nspiffe_id = \"spiffe://example.org/web\"\n\
         parent_id = \"spiffe://example.org/spire/agent/join_token/abc\"\n\
         selectors = [\"unix:uid:1000\"]\nx509_svid_ttl = \"1h\"\n\
         expires_at = 2030-01-01T00:00:00Z\n",
    );
    out.add(
        "entry_data",
        "spire-form.json",
        r#"{"entries":[{"selectors":[{"type":"unix","value":"uid:1111"}],"spiffe_id":{"trust_domain":"example.org","path":"/Blog"},"parent_id":{"trust_domain":"example.org","path":"/spire/agent/join_token/TokenBlog"},"x509_svid_ttl":200,"jwt_svid_ttl":30,"admin":true,"owner":"team-blog","reason":"publishes posts","ticket":"CHG-7"}]}"#,
    );
    out.add(
        "entry_data",
        "camel-case.json",
        r#"{"entries":[{"spiffeId":"spiffe://example.org/db","parentId":"spiffe://example.org/spire/server","selectors":["unix:uid:1112","unix:gid:50"],"x509SvidTtl":"1h","expiresAt":"2030-01-01T00:00:00Z","dnsNames":["db.example.org"],"federatesWith":["partner.org"],"hint":null,"revision_number":"3","storeSvid":false,"downstream":false}]}"#,
    );

    // Federation relationships: SPIRE's data file, and the messages of the TrustDomain API.
    out.add(
        "federation_data",
        "spire-form.json",
        r#"{"federationRelationships":[{"trustDomain":"partner.example","bundleEndpointURL":"https://partner.example:8443","bundleEndpointProfile":"https_spiffe","endpointSPIFFEID":"spiffe://partner.example/spire/server"},{"trust_domain":"web.example","bundle_endpoint_url":"https://web.example/bundle","bundle_endpoint_profile":"https_web"}]}"#,
    );
    out.add(
        "federation_data",
        "spiffe-bundle.json",
        format!(
            r#"{{"federationRelationships":[{{"trustDomain":"example.org","bundleEndpointURL":"https://example.org/bundle","bundleEndpointProfile":"https_web","trustDomainBundle":{},"trustDomainBundleFormat":"spiffe"}}]}}"#,
            out.jwt_bundle_json
        ),
    );
    {
        use lanyard_proto::spire::api::types;
        use lanyard_proto::spire::api::types::federation_relationship::BundleEndpointProfile;
        use prost::Message as _;

        let spiffe = types::FederationRelationship {
            trust_domain: "partner.example".to_owned(),
            bundle_endpoint_url: "https://partner.example:8443/bundle".to_owned(),
            bundle_endpoint_profile: Some(BundleEndpointProfile::HttpsSpiffe(
                types::HttpsspiffeProfile {
                    endpoint_spiffe_id: "spiffe://partner.example/spire/server".to_owned(),
                },
            )),
            trust_domain_bundle: Some(types::Bundle {
                trust_domain: "partner.example".to_owned(),
                refresh_hint: 300,
                sequence_number: 2,
                ..types::Bundle::default()
            }),
        };
        let web = types::FederationRelationship {
            trust_domain: "spiffe://web.example".to_owned(),
            bundle_endpoint_url: "https://[2001:db8::1]/bundle".to_owned(),
            bundle_endpoint_profile: Some(BundleEndpointProfile::HttpsWeb(
                types::HttpsWebProfile {},
            )),
            trust_domain_bundle: None,
        };
        out.add(
            "federation_relationship",
            "https-spiffe",
            spiffe.encode_to_vec(),
        );
        out.add("federation_relationship", "https-web", web.encode_to_vec());
    }

    // HTTP/2 authorities: grpc-core's percent-encoded socket path and ordinary ones.
    let authorities: &[(&str, &str)] = &[
        (
            "grpc-core-socket",
            "tmp%2Flanyard%2Fagent%2Fpublic%2Fapi.sock",
        ),
        ("localhost", "localhost"),
        ("host-port", "example.org:8081"),
        ("ipv6", "[::1]:50051"),
        ("userinfo", "user@localhost"),
        ("unix-scheme", "unix:/tmp/agent.sock"),
        ("space", "a b"),
        ("empty", ""),
    ];
    for (name, text) in authorities {
        out.add("h2_authority", name, *text);
    }

    // HTTP/2 frames after the preface: a request, then frames of every kind.
    let request = lanyard_fuzz::h2_request_frame("tmp%2Fagent.sock");
    out.add("h2_frames", "request", request.clone());
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut bytes = (u32::try_from(payload.len()).expect("small")).to_be_bytes()[1..].to_vec();
        bytes.push(kind);
        bytes.push(flags);
        bytes.extend_from_slice(&stream.to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes
    };
    let grpc_message = [0u8, 0, 0, 0, 0];
    out.add(
        "h2_frames",
        "request-data-ping-window",
        concat(&[
            &lanyard_fuzz::h2_request_frame_open("localhost"),
            &frame(0x0, 0x1, 1, &grpc_message),
            &frame(0x6, 0x0, 0, &[0u8; 8]),
            &frame(0x8, 0x0, 0, &[0, 0, 0x10, 0]),
            &frame(0x8, 0x0, 1, &[0, 0, 0x10, 0]),
        ]),
    );
    out.add(
        "h2_frames",
        "settings-priority-rst-goaway",
        concat(&[
            &frame(0x4, 0x0, 0, &[0, 3, 0, 0, 0, 100, 0, 4, 0, 1, 0, 0]),
            &frame(0x4, 0x1, 0, &[]),
            &frame(0x2, 0x0, 3, &[0, 0, 0, 1, 16]),
            &request,
            &frame(0x3, 0x0, 1, &[0, 0, 0, 8]),
            &frame(0x7, 0x0, 0, &[0, 0, 0, 1, 0, 0, 0, 0]),
        ]),
    );
    out.add(
        "h2_frames",
        "continuation",
        lanyard_fuzz::h2_request_frames_continued("localhost"),
    );

    // PROXY protocol v2 headers.
    let v4 = lanyard_server::proxy_protocol::encode(
        "192.0.2.10:40000".parse().expect("address"),
        "198.51.100.1:8081".parse().expect("address"),
    );
    let v6 = lanyard_server::proxy_protocol::encode(
        "[2001:db8::1]:40000".parse().expect("address"),
        "[2001:db8::2]:8081".parse().expect("address"),
    );
    let mut local = lanyard_server::proxy_protocol::SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    let mut with_tlv = v4.clone();
    with_tlv[15] += 7;
    with_tlv.extend_from_slice(&[0x05, 0x00, 0x04, b'v', b'p', b'c', b'e']);
    out.add("proxy_protocol", "ipv4", v4);
    out.add("proxy_protocol", "ipv6", v6);
    out.add("proxy_protocol", "local", local);
    out.add("proxy_protocol", "ipv4-tlv", with_tlv);

    // Audit logs: a chain, and one with a torn last line.
    let mut chain = Chain::new();
    let mut log = String::new();
    for event in [
        serde_json::json!({"kind": "entry created", "entry_id": "a", "by": "admin socket uid 0"}),
        serde_json::json!({"kind": "agent attested", "agent": "spiffe://example.org/spire/agent/x509pop/ab"}),
        serde_json::json!({"kind": "policy decision", "allowed": false, "violations": ["owner"]}),
    ] {
        log.push_str(&chain.append(fuzz_now(), &event));
    }
    out.add("audit_log", "chain.log", log.clone());
    out.add("audit_log", "torn.log", format!("{log}{{\"seq\":3,\"ti"));
    out
}

/// Whether this run rewrites the corpus and fixtures.
fn regenerating() -> bool {
    std::env::var_os("LANYARD_FUZZ_REGENERATE_CORPUS").is_some_and(|v| v == "1")
}

/// The targets whose seeds alone this run rewrites (`LANYARD_FUZZ_REGENERATE_CORPUS=<target>,…`),
/// so that a new target gets its seeds without new keys for every other target's.
fn regenerating_targets() -> Option<Vec<String>> {
    let value = std::env::var("LANYARD_FUZZ_REGENERATE_CORPUS").ok()?;
    (value != "1").then(|| value.split(',').map(str::to_owned).collect())
}

#[test]
fn corpus_is_in_place_for_every_target() {
    let dir = fuzz_dir();
    if let Some(only) = regenerating_targets() {
        for (target, name, bytes) in generate()
            .seeds
            .iter()
            .filter(|(target, _, _)| only.iter().any(|name| name == target))
        {
            let target_dir = dir.join("corpus").join(target);
            std::fs::create_dir_all(&target_dir).expect("corpus directory");
            std::fs::write(target_dir.join(name), bytes).expect("seed written");
        }
    }
    if regenerating() {
        let generated = generate();
        for (target, name, bytes) in &generated.seeds {
            let target_dir = dir.join("corpus").join(target);
            std::fs::create_dir_all(&target_dir).expect("corpus directory");
            std::fs::write(target_dir.join(name), bytes).expect("seed written");
        }
        std::fs::create_dir_all(dir.join("fixtures")).expect("fixtures directory");
        std::fs::write(
            dir.join("fixtures/x509pop_ca.der"),
            &generated.x509pop_ca_der,
        )
        .expect("fixture written");
        std::fs::write(
            dir.join("fixtures/jwt_bundle.json"),
            &generated.jwt_bundle_json,
        )
        .expect("fixture written");
    }
    let mut total_bytes = 0;
    for (target, _) in TARGETS {
        let seeds = read_dir_inputs(&dir.join("corpus").join(target));
        assert!(
            !seeds.is_empty(),
            "fuzz/corpus/{target}/ is empty; regenerate it with \
             LANYARD_FUZZ_REGENERATE_CORPUS=1 cargo test -p lanyard-fuzz --test it corpus::"
        );
        total_bytes += seeds.iter().map(|(_, bytes)| bytes.len()).sum::<usize>();
    }
    assert!(
        total_bytes < 512 * 1024,
        "the seed corpus is {total_bytes} bytes; keep it small (minimise with cargo fuzz cmin)"
    );
    // The fixtures must be usable, or the jwt and x509pop targets only ever see refusals.
    assert!(x509::is_ca(lanyard_fuzz::X509POP_CA_DER).expect("the x509pop CA parses"));
    let bundle = TrustBundle::from_jwks_json(td(), lanyard_fuzz::JWT_BUNDLE_JSON.as_bytes())
        .expect("the JWT bundle parses");
    assert!(!bundle.jwt_authorities().is_empty());
}

#[test]
fn seed_tokens_and_payloads_verify_against_the_fixtures() {
    let corpus = fuzz_dir().join("corpus");
    if regenerating() {
        // The other test is rewriting the files.
        return;
    }
    let bundle = TrustBundle::from_jwks_json(td(), lanyard_fuzz::JWT_BUNDLE_JSON.as_bytes())
        .expect("the JWT bundle parses");
    let es256 = std::fs::read_to_string(corpus.join("jwt/es256")).expect("seed");
    lanyard_core::jwt::validate_jwt_svid_with_bundle(&es256, FUZZ_AUDIENCE, &bundle, fuzz_now())
        .expect("the seed token validates at fuzz_now()");
    for name in ["ecdsa-response", "intermediate", "rsa-leaf"] {
        let seed = std::fs::read(corpus.join("x509pop").join(name)).expect("seed");
        let payload = seed.split(|b| *b == b'\n').next().expect("a payload line");
        lanyard_core::x509pop::ServerAttestation::begin(
            payload,
            &[lanyard_fuzz::X509POP_CA_DER.to_vec()],
            &td(),
            fuzz_now(),
        )
        .unwrap_or_else(|e| panic!("x509pop/{name} does not chain to the fixture CA: {e}"));
    }
    let chain = std::fs::read(corpus.join("x509_chain/leaf-intermediate-root")).expect("seed");
    let certs = lanyard_fuzz::split_der(&chain);
    let (root, rest) = certs.split_last().expect("certificates");
    x509::verify_svid_chain(rest, &td(), std::slice::from_ref(root), fuzz_now())
        .expect("the seed chain verifies at fuzz_now()");
}

#[test]
fn federation_seeds_are_accepted_so_that_mutations_start_deep() {
    use prost::Message as _;

    let corpus = fuzz_dir().join("corpus");
    for (name, bytes) in read_dir_inputs(&corpus.join("federation_data")) {
        let parsed = lanyard_cli::fuzzing::parse_federation_data(&bytes);
        assert!(parsed.is_ok(), "{}: {parsed:?}", name.display());
    }
    for (name, bytes) in read_dir_inputs(&corpus.join("federation_relationship")) {
        let message = lanyard_proto::spire::api::types::FederationRelationship::decode(&*bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", name.display()));
        let parsed = lanyard_proto::convert::federation_relationship_from_proto(&message);
        assert!(parsed.is_ok(), "{}: {parsed:?}", name.display());
    }
}
