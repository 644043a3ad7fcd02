//! Integration tests for `lanyard-proto`: the committed generated code is up
//! to date, and the wire names and field numbers match SPIRE and SPIFFE.

#![allow(clippy::unwrap_used)]

mod convert;
mod method_paths;
mod regenerate;
mod wire;
