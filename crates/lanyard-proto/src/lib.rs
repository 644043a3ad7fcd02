//! Generated protobuf messages and tonic clients and servers for every API
//! Lanyard speaks: the SPIFFE Workload API, SPIRE's server API and
//! Lanyard's own `lanyard.api.v1` services.
//!
//! The `.proto` sources live in `proto/` at the workspace root. The Rust in
//! `src/gen/` is generated from them and committed, so building needs no
//! `protoc`. The `regenerate` test in `tests/it` rebuilds it with
//! `tonic-prost-build` and `protox` and fails on any drift; run
//! `LANYARD_REGENERATE_PROTO=1 cargo test -p lanyard-proto` after editing a
//! `.proto` file to rewrite `src/gen/`.
//!
//! Modules mirror protobuf packages, because gRPC method paths
//! (`/spire.api.server.agent.v1.Agent/AttestAgent`) and `Any` type URLs are
//! derived from the package names and must match SPIRE's exactly.

/// Encoded `FileDescriptorSet` of every file under `proto/` plus its
/// imports, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("gen/descriptor.bin");

pub mod convert;

/// SPIRE's APIs (`spire.api.*`).
pub mod spire {
    /// SPIRE's API packages.
    pub mod api {
        /// Messages shared by SPIRE's server APIs (`spire.api.types`).
        #[allow(clippy::all, clippy::pedantic, clippy::nursery, missing_docs)]
        pub mod types {
            include!("gen/spire.api.types.rs");
        }

        /// SPIRE's server APIs (`spire.api.server.*`).
        pub mod server {
            /// Agent API: node attestation and agent management.
            pub mod agent {
                /// `spire.api.server.agent.v1`.
                #[allow(clippy::all, clippy::pedantic, clippy::nursery, missing_docs)]
                pub mod v1 {
                    include!("gen/spire.api.server.agent.v1.rs");
                }
            }

            /// Bundle API: own and federated trust bundles.
            pub mod bundle {
                /// `spire.api.server.bundle.v1`.
                #[allow(clippy::all, clippy::pedantic, clippy::nursery, missing_docs)]
                pub mod v1 {
                    include!("gen/spire.api.server.bundle.v1.rs");
                }
            }

            /// Debug API: server state for troubleshooting.
            pub mod debug {
                /// `spire.api.server.debug.v1`.
                #[allow(clippy::all, clippy::pedantic, clippy::nursery, missing_docs)]
                pub mod v1 {
                    include!("gen/spire.api.server.debug.v1.rs");
                }
            }

            /// Entry API: registration entries and authorized-entry sync.
            pub mod entry {
                /// `spire.api.server.entry.v1`.
                #[allow(clippy::all, clippy::pedantic, clippy::nursery, missing_docs)]
                pub mod v1 {
                    include!("gen/spire.api.server.entry.v1.rs");
                }
            }

            /// LocalAuthority API: manual authority rotation.
            pub mod localauthority {
                /// `spire.api.server.localauthority.v1`.
                #[allow(clippy::all, clippy::pedantic, clippy::nursery, missing_docs)]
                pub mod v1 {
                    include!("gen/spire.api.server.localauthority.v1.rs");
                }
            }

            /// SVID API: X509-SVID and JWT-SVID issuance.
            pub mod svid {
                /// `spire.api.server.svid.v1`.
                #[allow(clippy::all, clippy::pedantic, clippy::nursery, missing_docs)]
                pub mod v1 {
                    include!("gen/spire.api.server.svid.v1.rs");
                }
            }

            /// TrustDomain API: federation relationships.
            pub mod trustdomain {
                /// `spire.api.server.trustdomain.v1`.
                #[allow(clippy::all, clippy::pedantic, clippy::nursery, missing_docs)]
                pub mod v1 {
                    include!("gen/spire.api.server.trustdomain.v1.rs");
                }
            }
        }
    }
}

/// The SPIFFE Workload API (`SpiffeWorkloadAPI`, which has no protobuf package).
#[allow(clippy::all, clippy::pedantic, clippy::nursery, missing_docs)]
pub mod workload {
    include!("gen/_.rs");
}

/// Lanyard's own APIs (`lanyard.*`).
pub mod lanyard {
    /// Lanyard's API packages.
    pub mod api {
        /// `lanyard.api.v1`: governance services that SPIRE does not have.
        #[allow(clippy::all, clippy::pedantic, clippy::nursery, missing_docs)]
        pub mod v1 {
            include!("gen/lanyard.api.v1.rs");
        }
    }
}

/// Envoy's xDS API (`envoy.*`): the subset the agent's Secret Discovery Service uses, with
/// Envoy's package names, so that method paths and `Any` type URLs are Envoy's.
pub mod envoy {
    /// `envoy.config.*`.
    pub mod config {
        /// `envoy.config.core`.
        pub mod core {
            /// `envoy.config.core.v3`: the node, data sources, typed extensions.
            #[allow(clippy::all, clippy::pedantic, clippy::nursery, missing_docs)]
            pub mod v3 {
                include!("gen/envoy.config.core.v3.rs");
            }
        }
    }

    /// `envoy.type.*`.
    pub mod r#type {
        /// `envoy.type.v3`: the semantic version.
        #[allow(clippy::all, clippy::pedantic, clippy::nursery, missing_docs)]
        pub mod v3 {
            include!("gen/envoy.r#type.v3.rs");
        }
    }

    /// `envoy.service.*`.
    pub mod service {
        /// `envoy.service.discovery`.
        pub mod discovery {
            /// `envoy.service.discovery.v3`: discovery requests and responses.
            #[allow(clippy::all, clippy::pedantic, clippy::nursery, missing_docs)]
            pub mod v3 {
                include!("gen/envoy.service.discovery.v3.rs");
            }
        }

        /// `envoy.service.secret`.
        pub mod secret {
            /// `envoy.service.secret.v3`: the Secret Discovery Service.
            #[allow(clippy::all, clippy::pedantic, clippy::nursery, missing_docs)]
            pub mod v3 {
                include!("gen/envoy.service.secret.v3.rs");
            }
        }
    }

    /// `envoy.extensions.*`.
    pub mod extensions {
        /// `envoy.extensions.transport_sockets`.
        pub mod transport_sockets {
            /// `envoy.extensions.transport_sockets.tls`.
            pub mod tls {
                /// `envoy.extensions.transport_sockets.tls.v3`: secrets, certificates,
                /// validation contexts and the SPIFFE validator's configuration.
                #[allow(clippy::all, clippy::pedantic, clippy::nursery, missing_docs)]
                pub mod v3 {
                    include!("gen/envoy.extensions.transport_sockets.tls.v3.rs");
                }
            }
        }
    }
}

/// Google's RPC types (`google.rpc`).
pub mod google {
    /// `google.rpc`: the status an xDS NACK carries.
    #[allow(clippy::all, clippy::pedantic, clippy::nursery, missing_docs)]
    pub mod rpc {
        include!("gen/google.rpc.rs");
    }
}
