//! OIDC discovery of a real server process, checked by a real OpenID Connect relying party:
//! go-oidc v3 (`tests/interop/oidc`, built once per machine by
//! [`lanyard_e2e::toolchain::oidc_verifier`]), given only the issuer URL and the CA of the
//! issuer's TLS certificate, discovers the keys and verifies a JWT-SVID minted by Lanyard;
//! after the JWT key that signed it is rotated out and revoked (SPIRE's LocalAuthority API),
//! the keys no longer hold it and go-oidc refuses the token, while a new token verifies.
//!
//! Without Go the test fails and says how to install it, unless `LANYARD_E2E_SKIP_GO=1`.

use std::path::Path;
use std::process::Command;

use lanyard_e2e::https::{TestCa, write_key_pair};
use lanyard_e2e::toolchain::{SKIP_GO_VAR, oidc_verifier};
use lanyard_e2e::{CliOutput, Server, TestDir, block_on, free_port, spiffe_id, toml_string};
use lanyard_proto::spire::api::server::localauthority::v1 as pb;
use lanyard_proto::spire::api::server::localauthority::v1::local_authority_client::LocalAuthorityClient;
use serde_json::Value;
use tonic::transport::{Channel, Endpoint};

const AUDIENCE: &str = "relying-party";

/// A tonic channel to the server's admin socket.
async fn admin_channel(socket: &Path) -> Channel {
    let socket = socket.to_owned();
    Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

/// `lanyard jwt mint` for `id` and [`AUDIENCE`], written to `path`.
fn mint(server: &Server, id: &str, path: &Path) {
    server
        .cli([
            "jwt",
            "mint",
            "--spiffe-id",
            id,
            "--audience",
            AUDIENCE,
            "--write",
            path.to_str().unwrap(),
        ])
        .expect_success();
}

/// go-oidc's verdict on the token in `token`, for `audience`.
fn verify(verifier: &Path, issuer: &str, ca: &Path, audience: &str, token: &Path) -> CliOutput {
    CliOutput::run(
        Command::new(verifier)
            .arg(issuer)
            .arg(ca)
            .arg(audience)
            .arg(token),
    )
}

#[test]
fn go_oidc_verifies_jwt_svids_through_discovery_until_their_key_is_revoked() {
    if std::env::var_os(SKIP_GO_VAR).is_some_and(|value| value == "1") {
        return;
    }
    let verifier = oidc_verifier();
    let dir = TestDir::new();
    let ca = TestCa::new("oidc");
    let tls_dir = dir.subdir("tls");
    let ca_path = tls_dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let (cert, key) = ca.issue("oidc");
    let (cert_path, key_path) = write_key_pair(&tls_dir, "oidc", &cert, &key);
    let port = free_port();
    let issuer = format!("https://localhost:{port}");
    let server = Server::start_with(
        &dir.join("server"),
        &format!(
            "jwt_issuer = {}\n\
             [oidc_discovery]\n\
             address = \"127.0.0.1:{port}\"\n\
             certificate_path = {}\n\
             private_key_path = {}\n",
            toml_string(&issuer),
            toml_string(cert_path.to_str().unwrap()),
            toml_string(key_path.to_str().unwrap()),
        ),
    );

    let id = spiffe_id("/e2e/oidc-client");
    let first_token = dir.join("first.jwt");
    mint(&server, &id, &first_token);
    let verified = verify(verifier, &issuer, &ca_path, AUDIENCE, &first_token);
    let claims: Value = verified.json();
    assert_eq!(claims["subject"], id.as_str(), "{verified}");
    assert_eq!(claims["issuer"], issuer.as_str(), "{verified}");
    assert_eq!(
        claims["audience"],
        serde_json::json!([AUDIENCE]),
        "{verified}"
    );
    let other_audience = verify(verifier, &issuer, &ca_path, "someone-else", &first_token);
    assert!(!other_audience.success(), "{other_audience}");
    assert!(
        other_audience.stderr.contains("audience"),
        "{other_audience}"
    );

    // Rotate the JWT key out: prepare and activate the next, taint and revoke the first.
    block_on(async {
        let mut local_authority =
            LocalAuthorityClient::new(admin_channel(server.admin_socket()).await);
        let state = local_authority
            .get_jwt_authority_state(pb::GetJwtAuthorityStateRequest {})
            .await
            .unwrap()
            .into_inner();
        let first = state.active.unwrap().authority_id;
        let prepared = local_authority
            .prepare_jwt_authority(pb::PrepareJwtAuthorityRequest {})
            .await
            .unwrap()
            .into_inner()
            .prepared_authority
            .unwrap()
            .authority_id;
        local_authority
            .activate_jwt_authority(pb::ActivateJwtAuthorityRequest {
                authority_id: prepared,
            })
            .await
            .unwrap();
        local_authority
            .taint_jwt_authority(pb::TaintJwtAuthorityRequest {
                authority_id: first.clone(),
            })
            .await
            .unwrap();
        local_authority
            .revoke_jwt_authority(pb::RevokeJwtAuthorityRequest {
                authority_id: first,
            })
            .await
            .unwrap();
    });

    let refused = verify(verifier, &issuer, &ca_path, AUDIENCE, &first_token);
    assert!(
        !refused.success(),
        "a token signed by a revoked key must not verify: {refused}"
    );
    assert!(refused.stderr.contains("verify"), "{refused}");
    let second_token = dir.join("second.jwt");
    mint(&server, &id, &second_token);
    let verified = verify(verifier, &issuer, &ca_path, AUDIENCE, &second_token);
    assert_eq!(verified.json()["subject"], id.as_str(), "{verified}");
}
