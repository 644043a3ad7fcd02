//! The Lanyard server: the trust domain's CA, the registration datastore, node attestation,
//! and the SPIRE-compatible server API served over TLS and an owner-only Unix socket.
#![warn(missing_docs)]

pub mod admin_socket;
pub mod api;
pub mod audit;
pub mod authz;
pub mod bundle_client;
pub mod ca;
pub mod caller;
pub mod config;
pub mod datastore;
pub mod endpoints;
pub mod judge;
pub mod k8s_psat;
pub mod keymanager;
pub mod ledger;
pub mod listener;
pub mod metrics;
pub mod policy;
pub mod proxy_protocol;
pub mod ratelimit;
pub mod relationships;
pub mod revocations;
pub mod server;
pub mod state;
pub mod tls;
pub mod writes;

pub use config::ServerConfig;
pub use server::{Server, ServerError, run};
