//! Rotation seen by a real client: with a 20 s X.509-SVID TTL, an open `FetchX509SVID` stream
//! (the spiffe crate's `stream_x509_contexts`) gets a new SVID before the current one expires,
//! for longer than the first SVID lives, and never an expired one.

use std::time::{Duration, SystemTime};

use lanyard_core::x509::{validity_of, verify_svid_chain};
use lanyard_e2e::{Cluster, TRUST_DOMAIN, block_on, current_uid, trust_domain, within};
use tokio_stream::StreamExt as _;

const TTL: &str = "20s";

/// One SVID as the stream delivered it.
struct Seen {
    received: SystemTime,
    leaf: Vec<u8>,
    not_after: SystemTime,
}

#[test]
fn a_streaming_client_gets_each_new_svid_before_the_old_one_expires() {
    let cluster = Cluster::start();
    let id = cluster.register_uid("/e2e/short-lived", current_uid(), &["--x509-svid-ttl", TTL]);
    cluster.agent.wait_for_svids(None, &[&id]);
    let server_authorities = cluster.server.bundle_der();
    let endpoint = cluster.agent.endpoint();

    let seen = block_on(async {
        let client = within(
            "connecting",
            spiffe::WorkloadApiClient::connect_to(&endpoint),
        )
        .await
        .expect("the spiffe crate connects to the agent");
        let mut stream = within("FetchX509SVID", client.stream_x509_contexts())
            .await
            .expect("a stream of X.509 contexts");
        let own = spiffe::TrustDomain::new(TRUST_DOMAIN).unwrap();
        let mut seen: Vec<Seen> = Vec::new();
        loop {
            // The current SVID must be replaced before it expires: wait no longer than that.
            let wait = seen.last().map_or(Duration::from_secs(30), |last| {
                last.not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
            });
            let Ok(next) = tokio::time::timeout(wait, stream.next()).await else {
                let last = seen.last().expect("a deadline only once an SVID was seen");
                panic!(
                    "no new SVID before the current one expired at {}; {} SVID(s) seen",
                    humanize(last.not_after),
                    seen.len()
                );
            };
            let received = SystemTime::now();
            let context = next
                .expect("the stream stays open")
                .expect("every update is a valid X.509 context");
            assert_eq!(context.svids().len(), 1, "one identity");
            let svid = context.default_svid().expect("a default SVID");
            assert_eq!(svid.spiffe_id().to_string(), id);
            let leaf = svid.leaf().as_bytes().to_vec();
            let (_, not_after) = validity_of(&leaf).expect("a parsable leaf");
            assert!(
                not_after > received,
                "received an SVID that expired at {}",
                humanize(not_after)
            );
            let authorities: Vec<Vec<u8>> = context
                .bundle_set()
                .get(&own)
                .expect("the bundle comes with every update")
                .authorities()
                .iter()
                .map(|c| c.as_bytes().to_vec())
                .collect();
            let chain: Vec<&[u8]> = svid.cert_chain().iter().map(|c| c.as_bytes()).collect();
            for roots in [&authorities, &server_authorities] {
                verify_svid_chain(&chain, &trust_domain(), roots, received)
                    .expect("every SVID verifies when it arrives");
            }
            if seen.last().is_none_or(|last| last.leaf != leaf) {
                seen.push(Seen {
                    received,
                    leaf,
                    not_after,
                });
            }
            // Done once the stream has outlived the first SVID, on a fresh one.
            if received > seen[0].not_after && seen.len() > 1 {
                return seen;
            }
        }
    });

    for pair in seen.windows(2) {
        let (old, new) = (&pair[0], &pair[1]);
        assert!(
            new.received < old.not_after,
            "an SVID arrived at {} after its predecessor expired at {}",
            humanize(new.received),
            humanize(old.not_after)
        );
    }
}

fn humanize(time: SystemTime) -> String {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:03}", since.as_secs(), since.subsec_millis())
}
