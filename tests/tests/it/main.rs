//! End-to-end tests: the real `lanyard` binary as server, agent, admin CLI and workload,
//! with the published `spiffe` crate and raw gRPC as independent clients. The harness is the
//! `lanyard_e2e` library (`tests/src/lib.rs`).

// Helpers outside `#[test]` functions panic on purpose: a failed expectation is the test failing.
#![allow(clippy::unwrap_used)]

mod federation;
mod go_spiffe;
mod grants;
mod ha;
mod ha_dns;
mod health;
mod helper;
mod identities;
mod java_spiffe;
mod k8s_controller;
mod k8s_psat;
mod kube;
mod kube_manifests;
mod metrics;
mod mtls;
mod oidc;
#[path = "../../../crates/lanyard-server/tests/it/pg.rs"]
mod pg;
mod py_spiffe;
mod resilience;
mod revocation;
mod rotation;
mod sds;
mod spiffe_client;
mod spire_agent;
mod spire_cli;
mod spire_server;
mod systemd;
