//! Envoy's Secret Discovery Service (SDS v3) as Envoy calls it, through the client program in
//! `tests/interop/sds` (go-control-plane's `SecretDiscoveryService` client, built by
//! [`crate::toolchain::sds_client`]): plaintext gRPC on an agent's Workload API socket, with
//! no `workload.spiffe.io` header, the node (id, cluster, `user_agent_name` "envoy",
//! `user_agent_build_version`, metadata) on the first request only.
//!
//! - [`SdsStream`] runs `sds stream`: a test sends it request lines ([`SdsStream::send`]) and
//!   reads what it printed for each response, as it arrived ([`SdsStream::next_response`]).
//! - [`sds_fetch`] runs one `FetchSecrets` call; [`sds_delta`] one `DeltaSecrets` request.
//!
//! What a test reads is the client's JSON, documented in its `main.go`: a response is
//! `{"version_info", "nonce", "type_url", "valid", "validation_error", "secrets": [{"name",
//! "kind", "certificate_chain", "private_key_bytes", "trusted_ca", "validator",
//! "spiffe_trust_domains"}]}`, where `valid` is go-control-plane's generated `ValidateAll()`
//! of the response, of each `Secret` and of each `SPIFFECertValidatorConfig`; the end of a
//! stream or a failed call is `{"end": true, "code": "<gRPC code name>", "message"}`.
//!
//! Without Go the client cannot be built and the tests fail saying how to install it; a test
//! skips itself when [`crate::toolchain::SKIP_GO_VAR`] is `1`.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{Value, json};

use crate::CliOutput;
use crate::toolchain::sds_client;

/// A running `sds stream -socket <socket>`: one `StreamSecrets` stream, killed on drop.
#[derive(Debug)]
pub struct SdsStream {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<Result<Value, String>>,
    stderr: Option<JoinHandle<String>>,
}

impl SdsStream {
    /// Opens a stream to the SDS server on `socket`; `args` are more of the client's flags
    /// (`-envoy-version 1.17.0`, `-no-build-version`, `-metadata key=value`, `-node-id ID`).
    /// Nothing is requested until [`SdsStream::send`].
    pub fn start(socket: &Path, args: &[&str]) -> Self {
        let mut command = Command::new(sds_client());
        command
            .arg("stream")
            .arg("-socket")
            .arg(socket)
            .args(args)
            .env_remove("GODEBUG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr_pipe = child.stderr.take().expect("stderr is piped");
        let (sender, lines) = channel();
        // Each line as the client printed it; the channel closes when the client exits.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let parsed = serde_json::from_str(&line).map_err(|e| format!("{e}: {line}"));
                if sender.send(parsed).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr_pipe.read_to_string(&mut text);
            text
        });
        Self {
            stdin: child.stdin.take(),
            child,
            lines,
            stderr: Some(stderr),
        }
    }

    /// Writes one request line: `{"names": [...]}` sends those resource names with the
    /// version and nonce of the last response (an ACK; `"names"` left out repeats the last
    /// ones), `{"ack": false, "error": "why"}` NACKs the last response as Envoy does, and
    /// `{"wait": "5s"}` has the client itself wait (see the client's `main.go`).
    pub fn send(&mut self, request: &Value) {
        let stdin = self.stdin.as_mut().expect("the stream's input is open");
        if let Err(e) = writeln!(stdin, "{request}").and_then(|()| stdin.flush()) {
            panic!("sending {request} to the SDS client: {e}{}", self.stop());
        }
    }

    /// The next line the client printed, waiting up to `timeout`: a response, or the end line
    /// (`"end": true`), after which there is nothing more; `{"timeout": true}` when none came.
    /// Panics, with what the client said on stderr, if it exited without another line.
    pub fn next_response(&mut self, timeout: Duration) -> Value {
        match self.lines.recv_timeout(timeout) {
            Ok(Ok(line)) => line,
            Ok(Err(not_json)) => panic!("the SDS client printed {not_json}{}", self.stop()),
            Err(RecvTimeoutError::Timeout) => json!({"timeout": true}),
            Err(RecvTimeoutError::Disconnected) => {
                panic!("the SDS client exited without another line{}", self.stop())
            }
        }
    }

    /// Closes the client's input, which closes its side of the stream, and returns the next
    /// line (the end line once the server has ended the stream), waiting up to `timeout`.
    pub fn close(&mut self, timeout: Duration) -> Value {
        drop(self.stdin.take());
        self.next_response(timeout)
    }

    /// Stops the client (if it is still running) and returns how it exited and what it
    /// printed on stderr, for a failure message.
    fn stop(&mut self) -> String {
        let _ = self.child.kill();
        let status = self.child.wait();
        let stderr = self
            .stderr
            .take()
            .and_then(|thread| thread.join().ok())
            .unwrap_or_default();
        format!(
            "\n--- sds stream ({status:?}), stderr ---\n{}",
            stderr.trim_end()
        )
    }
}

impl Drop for SdsStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sds fetch -socket <socket> -names <names>`: one `FetchSecrets` call, as a node with
/// Envoy 1.30's build version. Returns the response line, or the end line with the call's
/// gRPC code; panics with the client's output if it failed.
pub fn sds_fetch(socket: &Path, names: &[&str]) -> Value {
    run_once(
        Command::new(sds_client())
            .arg("fetch")
            .arg("-socket")
            .arg(socket)
            .arg("-names")
            .arg(names.join(",")),
    )
}

/// `sds delta -socket <socket>`: opens `DeltaSecrets` and sends one request. Returns the end
/// line (an SDS server without delta xDS answers `Unimplemented`).
pub fn sds_delta(socket: &Path) -> Value {
    run_once(
        Command::new(sds_client())
            .arg("delta")
            .arg("-socket")
            .arg(socket),
    )
}

/// Runs a one-shot client command (bounded by the client itself) and parses its last line.
fn run_once(command: &mut Command) -> Value {
    let output = CliOutput::run(command.env_remove("GODEBUG"));
    let last = output.expect_success().lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {output}"))
}
