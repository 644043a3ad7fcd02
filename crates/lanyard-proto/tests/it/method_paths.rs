//! gRPC service names, method sets and streaming shapes must equal SPIRE's
//! and SPIFFE's: clients address methods by `/<package>.<Service>/<Method>`.

use lanyard_proto::envoy::service::secret::v3::secret_discovery_service_server;
use lanyard_proto::lanyard::api::v1::{
    entry_metadata_service_server, exception_service_server, governed_entry_service_server,
    usage_service_server,
};
use lanyard_proto::spire::api::server::{
    agent::v1::agent_server, bundle::v1::bundle_server, debug::v1::debug_server,
    entry::v1::entry_server, localauthority::v1::local_authority_server, svid::v1::svid_server,
    trustdomain::v1::trust_domain_server,
};
use lanyard_proto::workload::spiffe_workload_api_server;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Unary,
    ServerStreaming,
    Bidi,
}
use Shape::{Bidi, ServerStreaming, Unary};

struct Service {
    service_name: &'static str,
    generated_name: &'static str,
    source: &'static str,
    methods: &'static [(&'static str, Shape)],
}

const SERVICES: &[Service] = &[
    Service {
        service_name: "spire.api.server.agent.v1.Agent",
        generated_name: agent_server::SERVICE_NAME,
        source: include_str!("../../src/gen/spire.api.server.agent.v1.rs"),
        methods: &[
            ("CountAgents", Unary),
            ("ListAgents", Unary),
            ("GetAgent", Unary),
            ("DeleteAgent", Unary),
            ("BanAgent", Unary),
            ("AttestAgent", Bidi),
            ("RenewAgent", Unary),
            ("CreateJoinToken", Unary),
            ("PostStatus", Unary),
        ],
    },
    Service {
        service_name: "spire.api.server.entry.v1.Entry",
        generated_name: entry_server::SERVICE_NAME,
        source: include_str!("../../src/gen/spire.api.server.entry.v1.rs"),
        methods: &[
            ("CountEntries", Unary),
            ("ListEntries", Unary),
            ("GetEntry", Unary),
            ("BatchCreateEntry", Unary),
            ("BatchUpdateEntry", Unary),
            ("BatchDeleteEntry", Unary),
            ("GetAuthorizedEntries", Unary),
            ("SyncAuthorizedEntries", Bidi),
        ],
    },
    Service {
        service_name: "spire.api.server.svid.v1.SVID",
        generated_name: svid_server::SERVICE_NAME,
        source: include_str!("../../src/gen/spire.api.server.svid.v1.rs"),
        methods: &[
            ("MintX509SVID", Unary),
            ("MintJWTSVID", Unary),
            ("BatchNewX509SVID", Unary),
            ("NewJWTSVID", Unary),
            ("NewDownstreamX509CA", Unary),
        ],
    },
    Service {
        service_name: "spire.api.server.bundle.v1.Bundle",
        generated_name: bundle_server::SERVICE_NAME,
        source: include_str!("../../src/gen/spire.api.server.bundle.v1.rs"),
        methods: &[
            ("CountBundles", Unary),
            ("GetBundle", Unary),
            ("AppendBundle", Unary),
            ("PublishJWTAuthority", Unary),
            ("ListFederatedBundles", Unary),
            ("GetFederatedBundle", Unary),
            ("BatchCreateFederatedBundle", Unary),
            ("BatchUpdateFederatedBundle", Unary),
            ("BatchSetFederatedBundle", Unary),
            ("BatchDeleteFederatedBundle", Unary),
        ],
    },
    Service {
        service_name: "spire.api.server.trustdomain.v1.TrustDomain",
        generated_name: trust_domain_server::SERVICE_NAME,
        source: include_str!("../../src/gen/spire.api.server.trustdomain.v1.rs"),
        methods: &[
            ("ListFederationRelationships", Unary),
            ("GetFederationRelationship", Unary),
            ("BatchCreateFederationRelationship", Unary),
            ("BatchUpdateFederationRelationship", Unary),
            ("BatchDeleteFederationRelationship", Unary),
            ("RefreshBundle", Unary),
        ],
    },
    Service {
        service_name: "spire.api.server.localauthority.v1.LocalAuthority",
        generated_name: local_authority_server::SERVICE_NAME,
        source: include_str!("../../src/gen/spire.api.server.localauthority.v1.rs"),
        methods: &[
            ("GetJWTAuthorityState", Unary),
            ("PrepareJWTAuthority", Unary),
            ("ActivateJWTAuthority", Unary),
            ("TaintJWTAuthority", Unary),
            ("RevokeJWTAuthority", Unary),
            ("GetX509AuthorityState", Unary),
            ("PrepareX509Authority", Unary),
            ("ActivateX509Authority", Unary),
            ("TaintX509Authority", Unary),
            ("TaintX509UpstreamAuthority", Unary),
            ("RevokeX509Authority", Unary),
            ("RevokeX509UpstreamAuthority", Unary),
        ],
    },
    Service {
        service_name: "spire.api.server.debug.v1.Debug",
        generated_name: debug_server::SERVICE_NAME,
        source: include_str!("../../src/gen/spire.api.server.debug.v1.rs"),
        methods: &[("GetInfo", Unary)],
    },
    Service {
        service_name: "SpiffeWorkloadAPI",
        generated_name: spiffe_workload_api_server::SERVICE_NAME,
        source: include_str!("../../src/gen/_.rs"),
        methods: &[
            ("FetchX509SVID", ServerStreaming),
            ("FetchX509Bundles", ServerStreaming),
            ("FetchJWTSVID", Unary),
            ("FetchJWTBundles", ServerStreaming),
            ("ValidateJWTSVID", Unary),
            ("FetchWITSVID", ServerStreaming),
            ("FetchWITBundles", ServerStreaming),
        ],
    },
    Service {
        service_name: "envoy.service.secret.v3.SecretDiscoveryService",
        generated_name: secret_discovery_service_server::SERVICE_NAME,
        source: include_str!("../../src/gen/envoy.service.secret.v3.rs"),
        methods: &[
            ("DeltaSecrets", Bidi),
            ("StreamSecrets", Bidi),
            ("FetchSecrets", Unary),
        ],
    },
    Service {
        service_name: "lanyard.api.v1.EntryMetadataService",
        generated_name: entry_metadata_service_server::SERVICE_NAME,
        source: include_str!("../../src/gen/lanyard.api.v1.rs"),
        methods: &[
            ("SetEntryMetadata", Unary),
            ("GetEntryMetadata", Unary),
            ("ListEntryMetadata", Unary),
        ],
    },
    Service {
        service_name: "lanyard.api.v1.GovernedEntryService",
        generated_name: governed_entry_service_server::SERVICE_NAME,
        source: include_str!("../../src/gen/lanyard.api.v1.rs"),
        methods: &[
            ("CreateGovernedEntries", Unary),
            ("UpdateGovernedEntries", Unary),
            ("DeleteGovernedEntries", Unary),
        ],
    },
    Service {
        service_name: "lanyard.api.v1.ExceptionService",
        generated_name: exception_service_server::SERVICE_NAME,
        source: include_str!("../../src/gen/lanyard.api.v1.rs"),
        methods: &[
            ("CreateException", Unary),
            ("GetException", Unary),
            ("ListExceptions", Unary),
            ("ExtendException", Unary),
            ("RevokeException", Unary),
        ],
    },
    Service {
        service_name: "lanyard.api.v1.UsageService",
        generated_name: usage_service_server::SERVICE_NAME,
        source: include_str!("../../src/gen/lanyard.api.v1.rs"),
        methods: &[
            ("ReportUsage", Unary),
            ("ListUsage", Unary),
            ("ListIssuances", Unary),
        ],
    },
];

/// Every `"/<service>/<Method>"` literal in the generated source.
fn method_paths_in(source: &str, service_name: &str) -> Vec<String> {
    let prefix = format!("\"/{service_name}/");
    let mut paths: Vec<String> = source
        .match_indices(&prefix)
        .filter_map(|(start, _)| {
            let rest = source.get(start + 1..)?;
            let end = rest.find('"')?;
            rest.get(..end).map(str::to_owned)
        })
        .collect();
    paths.sort();
    paths.dedup();
    paths
}

/// Which tonic server trait the generated handler for `method` implements.
fn shape_of(source: &str, method: &str) -> Option<Shape> {
    let normalized = source.split_whitespace().collect::<Vec<_>>().join(" ");
    let handler = normalized.find(&format!(" for {method}Svc<T>"))?;
    let before = normalized.get(..handler)?;
    let trait_start = before.rfind("tonic::server::")? + "tonic::server::".len();
    let trait_name = before.get(trait_start..)?.split('<').next()?;
    match trait_name {
        "UnaryService" => Some(Unary),
        "ServerStreamingService" => Some(ServerStreaming),
        "StreamingService" => Some(Bidi),
        _ => None,
    }
}

#[test]
fn service_names_match_spire_and_spiffe() {
    for service in SERVICES {
        assert_eq!(service.generated_name, service.service_name);
    }
}

#[test]
fn method_sets_match_spire_and_spiffe() {
    for service in SERVICES {
        let mut expected: Vec<String> = service
            .methods
            .iter()
            .map(|(method, _)| format!("/{}/{method}", service.service_name))
            .collect();
        expected.sort();
        assert_eq!(
            method_paths_in(service.source, service.service_name),
            expected,
            "method set of {}",
            service.service_name
        );
    }
}

#[test]
fn streaming_shapes_match_spire_and_spiffe() {
    for service in SERVICES {
        for &(method, shape) in service.methods {
            assert_eq!(
                shape_of(service.source, method),
                Some(shape),
                "{}/{method}",
                service.service_name
            );
        }
    }
}

#[test]
fn well_known_paths_are_exact() {
    let all_sources: String = SERVICES.iter().map(|service| service.source).collect();
    for path in [
        "/spire.api.server.agent.v1.Agent/AttestAgent",
        "/spire.api.server.entry.v1.Entry/SyncAuthorizedEntries",
        "/spire.api.server.svid.v1.SVID/BatchNewX509SVID",
        "/spire.api.server.bundle.v1.Bundle/GetBundle",
        "/SpiffeWorkloadAPI/FetchX509SVID",
        "/SpiffeWorkloadAPI/FetchJWTSVID",
    ] {
        assert!(
            all_sources.contains(&format!("\"{path}\"")),
            "no generated handler for {path}"
        );
    }
}
