//! Conformance tests for lanyard-core: SPIFFE ID vectors, X.509-SVID and JWT-SVID rules,
//! bundle encoding, and the crate's dependency boundary.

// Test helpers outside #[test] functions unwrap freely: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

mod audit;
mod bundle;
mod deps;
mod id_vectors;
mod jwt;
mod policy;
mod x509;
mod x509pop;
