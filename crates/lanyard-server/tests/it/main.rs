//! Integration tests for lanyard-server.
#![allow(clippy::unwrap_used)]
// Test modules are private; `pub` in them means "shared with the other test modules".
#![allow(unreachable_pub)]

mod agent_api;
mod audit_log;
mod bundle_client;
mod bundle_endpoint;
mod change_feed;
mod changes;
mod datastore;
mod entry_api;
mod governance;
mod http;
mod integrity;
mod issuance;
mod limits;
mod local_authority;
mod metrics;
mod oidc_discovery;
mod pg;
mod postgres;
mod rate_limits;
mod revocation;
mod support;
mod svid_bundle_api;
mod trust_domain_api;
mod write_path;
