//! The published `spiffe` crate as the workload: it fetches an X.509-SVID and a JWT-SVID from
//! a real agent, and both are checked independently of the agent: the SVID chain against the
//! server's bundle, the JWT offline (with the spiffe crate's verifier and the agent's JWT
//! bundles, and with `lanyard-core`'s and the server's SPIFFE bundle) and online through
//! `ValidateJWTSVID`.

use std::time::SystemTime;

use lanyard_core::jwt::validate_jwt_svid_with_bundle;
use lanyard_core::x509::verify_svid_chain;
use lanyard_e2e::{CliOutput, Cluster, TRUST_DOMAIN, block_on, current_uid, trust_domain, within};

const AUDIENCE: &str = "e2e-service";

#[test]
fn the_spiffe_crate_gets_svids_that_verify_offline_and_online() {
    let cluster = Cluster::start();
    let web = cluster.register_uid("/e2e/web", current_uid(), &["--hint", "web"]);
    // The CLI waits out the agent's first sync; the spiffe crate then asks a warm agent.
    cluster.agent.wait_for_svids(None, &[&web]);
    let server_authorities = cluster.server.bundle_der();
    let server_bundle = cluster.server.spiffe_bundle();
    let endpoint = cluster.agent.endpoint();

    let token = block_on(async {
        let client = within(
            "connecting",
            spiffe::WorkloadApiClient::connect_to(&endpoint),
        )
        .await
        .expect("the spiffe crate connects to the agent");

        // X.509: exactly our identity, with the server's bundle, chaining to it.
        let context = within("FetchX509SVID", client.fetch_x509_context())
            .await
            .expect("an X.509 context");
        assert_eq!(context.svids().len(), 1, "only this process's identity");
        let svid = context.default_svid().expect("a default SVID");
        assert_eq!(svid.spiffe_id().to_string(), web);
        assert_eq!(svid.hint(), Some("web"));
        let own = spiffe::TrustDomain::new(TRUST_DOMAIN).unwrap();
        let served = context
            .bundle_set()
            .get(&own)
            .expect("the agent serves the trust domain's bundle");
        let mut served: Vec<Vec<u8>> = served
            .authorities()
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect();
        served.sort();
        let mut expected = server_authorities.clone();
        expected.sort();
        assert_eq!(served, expected, "the agent serves the server's bundle");
        let chain: Vec<&[u8]> = svid.cert_chain().iter().map(|c| c.as_bytes()).collect();
        let verified = verify_svid_chain(
            &chain,
            &trust_domain(),
            &server_authorities,
            SystemTime::now(),
        )
        .expect("the X.509-SVID chains to the server's bundle");
        assert_eq!(verified.spiffe_id().as_str(), web);

        // JWT: minted for our identity and audience.
        let jwt = within("FetchJWTSVID", client.fetch_jwt_svid([AUDIENCE], None))
            .await
            .expect("a JWT-SVID");
        assert_eq!(jwt.spiffe_id().to_string(), web);
        assert!(jwt.audience().iter().any(|a| a == AUDIENCE), "{jwt:?}");
        let token = jwt.token().to_owned();

        // Offline, with the spiffe crate's verifier and the JWT bundles the agent serves.
        let jwt_bundles = within("FetchJWTBundles", client.fetch_jwt_bundles())
            .await
            .expect("JWT bundles");
        let offline = spiffe::JwtSvid::parse_and_validate(&token, &jwt_bundles, &[AUDIENCE])
            .expect("the JWT-SVID validates offline (spiffe crate)");
        assert_eq!(offline.spiffe_id().to_string(), web);
        assert!(
            spiffe::JwtSvid::parse_and_validate(&token, &jwt_bundles, &["someone-else"]).is_err(),
            "a token for another audience must not validate"
        );

        // Offline, with lanyard-core and the server's SPIFFE bundle: nothing from the agent.
        let validated =
            validate_jwt_svid_with_bundle(&token, AUDIENCE, &server_bundle, SystemTime::now())
                .expect("the JWT-SVID validates against the server's SPIFFE bundle");
        assert_eq!(validated.spiffe_id.as_str(), web);
        assert!(
            validate_jwt_svid_with_bundle(
                &token,
                "someone-else",
                &server_bundle,
                SystemTime::now()
            )
            .is_err(),
            "a token for another audience must not validate"
        );

        // Online: ValidateJWTSVID.
        let online = within(
            "ValidateJWTSVID",
            client.validate_jwt_token(AUDIENCE, &token),
        )
        .await
        .expect("ValidateJWTSVID accepts the token");
        assert_eq!(online.spiffe_id().to_string(), web);
        let refused = within(
            "ValidateJWTSVID",
            client.validate_jwt_token("someone-else", &token),
        )
        .await;
        assert!(refused.is_err(), "wrong audience accepted: {refused:?}");
        token
    });

    // The CLI's workload commands agree.
    let mut validate = cluster.agent.workload_command(None);
    validate.args(["validate", "jwt", "--audience", AUDIENCE, "--svid", &token]);
    let output = CliOutput::run(&mut validate);
    assert!(
        output
            .expect_success()
            .contains(&format!("SPIFFE ID : {web}")),
        "{output}"
    );
    let mut fetch = cluster.agent.workload_command(None);
    fetch.args(["fetch", "jwt", "--audience", AUDIENCE, "--output", "json"]);
    let fetched = CliOutput::run(&mut fetch).json();
    let cli_token = fetched["svids"][0]["svid"]
        .as_str()
        .unwrap_or_else(|| panic!("no token in {fetched}"));
    let validated =
        validate_jwt_svid_with_bundle(cli_token, AUDIENCE, &server_bundle, SystemTime::now())
            .expect("the CLI's JWT-SVID validates against the server's SPIFFE bundle");
    assert_eq!(validated.spiffe_id.as_str(), web);
}
