//! Workload attestation by the kernel: processes under different uids get their own identities,
//! a process with no entry gets PermissionDenied, and a request without the Workload API's
//! security header is refused with InvalidArgument before any attestation.

use std::collections::BTreeSet;
use std::io::Write as _;

use lanyard_e2e::{
    Cluster, FetchedSvid, RunAs, block_on, current_gid, current_uid, running_as_root, uid_selector,
    within,
};
use lanyard_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use lanyard_proto::workload::{JwtsvidRequest, X509svidRequest};
use tonic::transport::Endpoint;

/// Two users with identities and one without, all unprivileged (nobody and the uids below it).
const ALICE: RunAs = RunAs {
    uid: 65534,
    gid: 65534,
};
const BOB: RunAs = RunAs {
    uid: 65533,
    gid: 65533,
};
const NOBODY_REGISTERED: RunAs = RunAs {
    uid: 65532,
    gid: 65532,
};

#[test]
fn each_process_gets_the_identity_of_its_uid_and_no_other() {
    let cluster = Cluster::start();
    if running_as_root() {
        processes_under_other_uids(&cluster);
    } else {
        let _ = writeln!(
            std::io::stderr(),
            "identities: running as uid {} (not root), so no workloads under other uids: \
             checking this process's identity against entries for other uids instead",
            current_uid()
        );
        this_process_among_other_uids(&cluster);
    }
    requests_without_the_security_header_are_refused(&cluster);
}

/// Root runs `lanyard fetch x509` as three other users.
fn processes_under_other_uids(cluster: &Cluster) {
    let alice = cluster.register_uid("/e2e/alice", ALICE.uid, &[]);
    let bob = cluster.register_uid("/e2e/bob", BOB.uid, &[]);
    // Selectors are a subset rule: all of an entry's selectors must be the caller's.
    let alice_in_group = cluster.register(
        "/e2e/alice-in-her-group",
        &[&uid_selector(ALICE.uid), &format!("unix:gid:{}", ALICE.gid)],
        &[],
    );
    cluster.register(
        "/e2e/alice-in-bobs-group",
        &[&uid_selector(ALICE.uid), &format!("unix:gid:{}", BOB.gid)],
        &[],
    );

    let alices = cluster
        .agent
        .wait_for_svids(Some(ALICE), &[&alice, &alice_in_group]);
    let bobs = cluster.agent.wait_for_svids(Some(BOB), &[&bob]);
    let leaves: BTreeSet<&[u8]> = alices.iter().chain(&bobs).map(FetchedSvid::leaf).collect();
    assert_eq!(leaves.len(), 3, "every identity has its own certificate");
    for svid in alices.iter().chain(&bobs) {
        svid.verify();
    }

    // Everything is synced by now (all entries were created before the waits above), so an
    // unregistered uid is refused for good, not for lack of a sync.
    let refused = cluster
        .agent
        .fetch_x509_as(NOBODY_REGISTERED)
        .expect_err("a uid without entries must get no SVID");
    assert!(
        refused.stderr.contains("PermissionDenied"),
        "expected PermissionDenied: {refused}"
    );
    // And this process (root) has no entry either.
    let refused = cluster
        .agent
        .fetch_x509()
        .expect_err("root has no entry here");
    assert!(
        refused.stderr.contains("PermissionDenied"),
        "expected PermissionDenied: {refused}"
    );
}

/// Without root: this process, an entry for another uid, and one of ours with a group we lack.
fn this_process_among_other_uids(cluster: &Cluster) {
    // No entries yet, and the agent answers (the cluster waited for it): no identity for us.
    let refused = cluster
        .agent
        .fetch_x509()
        .expect_err("no entries exist yet");
    assert!(
        refused.stderr.contains("PermissionDenied"),
        "expected PermissionDenied: {refused}"
    );

    let me = current_uid();
    let other = if me == ALICE.uid { BOB.uid } else { ALICE.uid };
    cluster.register_uid("/e2e/someone-else", other, &[]);
    let not_my_gid = if current_gid() == ALICE.gid {
        BOB.gid
    } else {
        ALICE.gid
    };
    cluster.register(
        "/e2e/me-in-another-group",
        &[&uid_selector(me), &format!("unix:gid:{not_my_gid}")],
        &[],
    );
    let mine = cluster.register_uid("/e2e/me", me, &[]);
    // Exactly ours: created last, so its arrival means the others were synced too.
    let svids = cluster.agent.wait_for_svids(None, &[&mine]);
    svids[0].verify();
}

/// The raw Workload API without `workload.spiffe.io: true`: InvalidArgument, whoever asks;
/// with it, the same call gets past the check (and is judged on the caller's identity).
fn requests_without_the_security_header_are_refused(cluster: &Cluster) {
    let socket = cluster.agent.socket_path().to_owned();
    block_on(async {
        let channel = within(
            "connecting",
            Endpoint::from_shared(format!("unix:{}", socket.display()))
                .expect("a valid endpoint")
                .connect(),
        )
        .await
        .expect("connecting to the Workload API");
        let mut client = SpiffeWorkloadApiClient::new(channel);

        let status = match within("FetchX509SVID", client.fetch_x509svid(X509svidRequest {})).await
        {
            Err(status) => status,
            // A stream may also carry the refusal as its first item.
            Ok(response) => within("the first message", response.into_inner().message())
                .await
                .expect_err("FetchX509SVID without the security header must fail"),
        };
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

        let status = within(
            "FetchJWTSVID",
            client.fetch_jwtsvid(JwtsvidRequest {
                audience: vec!["e2e".to_owned()],
                spiffe_id: String::new(),
            }),
        )
        .await
        .expect_err("FetchJWTSVID without the security header must fail");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

        // The same call with the header is not refused as malformed.
        let mut request = tonic::Request::new(JwtsvidRequest {
            audience: vec!["e2e".to_owned()],
            spiffe_id: String::new(),
        });
        request
            .metadata_mut()
            .insert("workload.spiffe.io", "true".parse().expect("ASCII"));
        let outcome = within("FetchJWTSVID", client.fetch_jwtsvid(request)).await;
        if let Err(status) = outcome {
            assert_ne!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        }
    });
}
