//! The fuzz targets under `cargo test`: the seed corpus is present and well-formed (and is
//! regenerated here on request), the libFuzzer harness has a binary per target, and every
//! target survives its corpus, its regressions and a short seeded mutation run.

mod corpus;
mod harness;
mod smoke;
