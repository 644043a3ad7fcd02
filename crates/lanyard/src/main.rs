//! The `lanyard` command; everything but the entry point is in the library (`src/lib.rs`).

use std::process::ExitCode;

fn main() -> ExitCode {
    lanyard_cli::main()
}
