//! The Lanyard node agent: attests its node to the server, syncs the entries it is
//! authorized for, mints and rotates their SVIDs, and serves them over the SPIFFE Workload
//! API on a Unix socket to callers identified by the kernel.
#![warn(missing_docs)]

pub mod agent;
pub mod attestor;
pub mod cache;
pub mod config;
pub mod health;
pub mod heap;
pub mod http;
pub mod limits;
pub mod manager;
pub mod metrics;
pub mod usage;
pub mod workload;

pub use agent::{Agent, AgentError, run};
pub use config::AgentConfig;
