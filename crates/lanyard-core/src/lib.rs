//! The sans-IO vocabulary of Lanyard: SPIFFE IDs, selectors, registration entries, X.509 and
//! JWT SVIDs, trust bundles, federation relationships, rotation math, policy evaluation (Rego)
//! and the audit chain format.
//!
//! Nothing in this crate performs I/O or reads a clock. Functions that depend on the current
//! time take `now: SystemTime`; functions that need randomness use `ring`'s system RNG or take
//! the random input as a parameter (rotation jitter). Every other Lanyard crate speaks these
//! types, and protobuf or SQL representations convert to and from them at their edges.
#![warn(missing_docs)]

pub mod agent;
pub mod audit;
pub mod bundle;
pub mod bundle_fetch;
pub mod entry;
pub mod federation;
pub mod id;
pub mod jwt;
pub mod k8s_psat;
pub mod keys;
pub mod ledger;
pub mod policy;
pub mod revocation;
pub mod rotation;
pub mod selector;
pub mod tls;
pub mod x509;
pub mod x509pop;

pub use bundle::{JwtAuthority, TrustBundle, X509Authority};
pub use entry::{EntryId, RegistrationEntry};
pub use federation::{BundleEndpointProfile, BundleEndpointUrl, FederationRelationship};
pub use id::{SpiffeId, TrustDomain};
pub use keys::{KeyPair, KeyType};
pub use selector::{Selector, SelectorSet};
