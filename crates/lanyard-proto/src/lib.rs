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
