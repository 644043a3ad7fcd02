//! Integration tests for lanyard-agent.
#![allow(clippy::unwrap_used)]
// Test modules are private; `pub` in them means "shared with the other test modules".
#![allow(unreachable_pub)]

mod k8s_attestor;
mod manager;
#[path = "../../../lanyard-server/tests/it/pg.rs"]
mod pg;
mod usage;
mod vendored_h2;
mod workload_api;
mod workload_limits;
