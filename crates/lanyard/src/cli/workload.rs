//! Workload commands: `fetch x509|jwt|bundle`, `validate jwt` and `watch`, spoken to the
//! agent's SPIFFE Workload API like any workload would (plaintext gRPC over the Unix socket,
//! with the `workload.spiffe.io: true` header).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, Subcommand};
use lanyard_core::keys::pem_encode;
use lanyard_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use lanyard_proto::workload::{
    JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest, X509svidRequest, X509svidResponse,
};
use serde_json::{Map, Value, json};
use tonic::Request;
use tonic::transport::{Channel, Endpoint};

use crate::cli::files::{PUBLIC_FILE_MODE, SECRET_FILE_MODE, replace_file};
use crate::cli::output::{OutputArgs, OutputFormat, write_json};
use crate::cli::parse;

/// The agent's Workload API socket unless `--socket` or `SPIFFE_ENDPOINT_SOCKET` says otherwise.
pub(crate) const DEFAULT_AGENT_SOCKET: &str = "/tmp/lanyard/agent/public/api.sock";

/// Where the Workload API is.
#[derive(Debug, Clone, Args)]
pub(crate) struct WorkloadSocketArgs {
    /// Path of the agent's Workload API socket (or a `unix://` URI). Defaults to
    /// `SPIFFE_ENDPOINT_SOCKET`, then to /tmp/lanyard/agent/public/api.sock.
    #[arg(long = "socket", value_name = "PATH")]
    pub(crate) socket: Option<String>,
}

impl WorkloadSocketArgs {
    fn path(&self) -> anyhow::Result<PathBuf> {
        let raw = match &self.socket {
            Some(socket) => socket.clone(),
            None => std::env::var("SPIFFE_ENDPOINT_SOCKET")
                .unwrap_or_else(|_| DEFAULT_AGENT_SOCKET.to_owned()),
        };
        socket_path(&raw)
    }

    pub(crate) async fn connect(&self) -> anyhow::Result<SpiffeWorkloadApiClient<Channel>> {
        let path = self.path()?;
        let channel = Endpoint::from_shared(format!("unix:{}", path.display()))
            .context("invalid socket path")?
            .connect()
            .await
            .with_context(|| format!("cannot connect to the agent at {}", path.display()))?;
        Ok(SpiffeWorkloadApiClient::new(channel))
    }
}

/// Accepts `/path`, `unix:/path` and `unix:///path`, as SPIFFE clients do.
fn socket_path(raw: &str) -> anyhow::Result<PathBuf> {
    let path = if let Some(rest) = raw.strip_prefix("unix://") {
        rest
    } else if let Some(rest) = raw.strip_prefix("unix:") {
        rest
    } else if raw.starts_with("tcp:") {
        bail!("only unix sockets are supported: {raw:?}");
    } else {
        raw
    };
    if !path.starts_with('/') {
        bail!("socket {raw:?} must be an absolute path");
    }
    Ok(PathBuf::from(path))
}

pub(crate) fn with_header<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    request
}

pub(crate) fn describe(status: &tonic::Status) -> anyhow::Error {
    anyhow!("{:?}: {}", status.code(), status.message())
}

/// `lanyard fetch …`
#[derive(Debug, Subcommand)]
pub(crate) enum FetchCommand {
    /// Fetch this process's X.509-SVIDs and bundles.
    X509 {
        #[command(flatten)]
        socket: WorkloadSocketArgs,
        /// Write svid.N.pem, svid.N.key and bundle.N.pem into this directory.
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Fetch JWT-SVIDs for an audience.
    Jwt {
        #[command(flatten)]
        socket: WorkloadSocketArgs,
        /// The audience (repeatable).
        #[arg(long, required = true)]
        audience: Vec<String>,
        /// Only this identity.
        #[arg(long)]
        spiffe_id: Option<String>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Fetch the X.509 trust bundles.
    Bundle {
        #[command(flatten)]
        socket: WorkloadSocketArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
}

/// `lanyard validate …`
#[derive(Debug, Subcommand)]
pub(crate) enum ValidateCommand {
    /// Validate a JWT-SVID through the agent.
    Jwt {
        #[command(flatten)]
        socket: WorkloadSocketArgs,
        /// The audience the token must carry.
        #[arg(long)]
        audience: String,
        /// The token.
        #[arg(long)]
        svid: String,
        #[command(flatten)]
        output: OutputArgs,
    },
}

/// `lanyard watch`: print every X.509-SVID update until interrupted.
#[derive(Debug, Args)]
pub(crate) struct WatchArgs {
    #[command(flatten)]
    socket: WorkloadSocketArgs,
}

impl FetchCommand {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::X509 { .. } => "x509",
            Self::Jwt { .. } => "jwt",
            Self::Bundle { .. } => "bundle",
        }
    }

    pub(crate) async fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        match self {
            Self::X509 {
                socket,
                write,
                output,
            } => {
                let response = first_x509(&socket).await?;
                if let Some(dir) = write {
                    let written = write_x509(&dir, &response)?;
                    if output.is_json() {
                        return write_json(out, &json!({ "svids": written }));
                    }
                    writeln!(
                        out,
                        "Wrote {} SVID(s) to {}",
                        response.svids.len(),
                        dir.display()
                    )?;
                    return Ok(());
                }
                print_x509(out, &response, output)
            }
            Self::Jwt {
                socket,
                audience,
                spiffe_id,
                output,
            } => {
                let mut client = socket.connect().await?;
                let response = client
                    .fetch_jwtsvid(with_header(JwtsvidRequest {
                        audience,
                        spiffe_id: spiffe_id.unwrap_or_default(),
                    }))
                    .await
                    .map_err(|s| describe(&s))?
                    .into_inner();
                if output.is_json() {
                    let svids: Vec<Value> = response
                        .svids
                        .iter()
                        .map(|s| json!({"spiffe_id": s.spiffe_id, "svid": s.svid, "hint": s.hint}))
                        .collect();
                    return write_json(out, &json!({ "svids": svids }));
                }
                for svid in &response.svids {
                    writeln!(out, "token({}):\n{}", svid.spiffe_id, svid.svid)?;
                }
                Ok(())
            }
            Self::Bundle { socket, output } => {
                let mut client = socket.connect().await?;
                let mut stream = client
                    .fetch_x509_bundles(with_header(X509BundlesRequest {}))
                    .await
                    .map_err(|s| describe(&s))?
                    .into_inner();
                let response = stream
                    .message()
                    .await
                    .map_err(|s| describe(&s))?
                    .ok_or_else(|| anyhow!("the agent closed the stream without a bundle"))?;
                // The agent's map has no order; print the trust domains sorted.
                let bundles: BTreeMap<&String, &Vec<u8>> = response.bundles.iter().collect();
                if output.is_json() {
                    let bundles = bundles
                        .into_iter()
                        .map(|(trust_domain, der)| {
                            Ok(json!({
                                "trust_domain": trust_domain,
                                "bundle_pem": pem_certificates(der)?,
                            }))
                        })
                        .collect::<anyhow::Result<Vec<Value>>>()?;
                    return write_json(out, &json!({ "bundles": bundles }));
                }
                for (trust_domain, der) in bundles {
                    writeln!(out, "bundle({trust_domain}):")?;
                    write!(out, "{}", pem_certificates(der)?)?;
                }
                Ok(())
            }
        }
    }
}

impl ValidateCommand {
    pub(crate) fn name(&self) -> &'static str {
        "jwt"
    }

    pub(crate) async fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        let Self::Jwt {
            socket,
            audience,
            svid,
            output,
        } = self;
        let mut client = socket.connect().await?;
        let response = client
            .validate_jwtsvid(with_header(ValidateJwtsvidRequest { audience, svid }))
            .await
            .map_err(|s| describe(&s))?
            .into_inner();
        if output.is_json() {
            let claims = response
                .claims
                .map(struct_json)
                .unwrap_or_else(|| Value::Object(Map::new()));
            return write_json(
                out,
                &json!({ "spiffe_id": response.spiffe_id, "claims": claims }),
            );
        }
        writeln!(out, "SVID is valid.")?;
        writeln!(out, "SPIFFE ID : {}", response.spiffe_id)?;
        if let Some(claims) = response.claims {
            let mut keys: Vec<&String> = claims.fields.keys().collect();
            keys.sort();
            let keys: Vec<&str> = keys.into_iter().map(String::as_str).collect();
            writeln!(out, "Claims    : {}", keys.join(", "))?;
        }
        Ok(())
    }
}

impl WatchArgs {
    pub(crate) async fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        let mut client = self.socket.connect().await?;
        let mut stream = client
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await
            .map_err(|s| describe(&s))?
            .into_inner();
        loop {
            let message = tokio::select! {
                message = stream.message() => message.map_err(|s| describe(&s))?,
                _ = tokio::signal::ctrl_c() => return Ok(()),
            };
            let Some(response) = message else {
                bail!("the agent closed the stream");
            };
            for svid in &response.svids {
                let expires = first_certificate(&svid.x509_svid)
                    .and_then(|der| lanyard_core::x509::validity_of(&der).ok())
                    .map(|(_, not_after)| parse::format_system_time(not_after))
                    .unwrap_or_else(|| "?".to_owned());
                writeln!(out, "received {} expires {}", svid.spiffe_id, expires)?;
            }
            out.flush()?;
        }
    }
}

/// `lanyard agent healthcheck`: `grpc.health.v1.Health/Check` on the Workload API socket.
pub(crate) async fn agent_healthcheck(
    socket: &WorkloadSocketArgs,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let path = socket.path()?;
    let channel = Endpoint::from_shared(format!("unix:{}", path.display()))
        .context("invalid socket path")?
        .connect()
        .await
        .with_context(|| format!("Agent is unhealthy: cannot connect to {}", path.display()))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|s| anyhow!("Agent is unhealthy: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    if response.status == ServingStatus::Serving as i32 {
        writeln!(out, "Agent is healthy.")?;
        Ok(())
    } else {
        bail!("Agent is unhealthy: status {}", response.status)
    }
}

pub(crate) async fn first_x509(socket: &WorkloadSocketArgs) -> anyhow::Result<X509svidResponse> {
    let mut client = socket.connect().await?;
    let mut stream = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .map_err(|s| describe(&s))?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .map_err(|_| anyhow!("timed out waiting for an SVID"))?
        .map_err(|s| describe(&s))?;
    first.ok_or_else(|| anyhow!("the agent closed the stream without an SVID"))
}

/// Splits concatenated DER certificates.
pub(crate) fn split_certificates(mut der: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let len = der_len(der).ok_or_else(|| anyhow!("malformed certificate DER"))?;
        let (cert, rest) = der.split_at(len);
        out.push(cert.to_vec());
        der = rest;
    }
    Ok(out)
}

/// The length of the first DER TLV in `der`.
fn der_len(der: &[u8]) -> Option<usize> {
    let first = *der.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | usize::from(*der.get(2 + i)?);
        }
        (len, 2 + n)
    };
    let total = header.checked_add(len)?;
    (total <= der.len()).then_some(total)
}

fn first_certificate(der: &[u8]) -> Option<Vec<u8>> {
    split_certificates(der).ok()?.into_iter().next()
}

pub(crate) fn pem_certificates(der: &[u8]) -> anyhow::Result<String> {
    Ok(split_certificates(der)?
        .iter()
        .map(|c| pem_encode("CERTIFICATE", c))
        .collect())
}

/// A `google.protobuf.Struct` (the claims of a validated JWT-SVID) as the JSON it was made of.
fn struct_json(claims: prost_types::Struct) -> Value {
    Value::Object(
        claims
            .fields
            .into_iter()
            .map(|(name, value)| (name, value_json(value)))
            .collect(),
    )
}

fn value_json(value: prost_types::Value) -> Value {
    use prost_types::value::Kind;
    match value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        // Whole numbers (`exp`, `iat`) print without a fraction, as in the token.
        #[allow(clippy::cast_possible_truncation)] // Whole, and within 2^53.
        Some(Kind::NumberValue(number)) if number.fract() == 0.0 && number.abs() < 9.0e15 => {
            Value::from(number as i64)
        }
        Some(Kind::NumberValue(number)) => Value::from(number),
        Some(Kind::StringValue(text)) => Value::String(text),
        Some(Kind::BoolValue(flag)) => Value::Bool(flag),
        Some(Kind::StructValue(object)) => struct_json(object),
        Some(Kind::ListValue(list)) => list.values.into_iter().map(value_json).collect(),
    }
}

fn print_x509(
    out: &mut dyn Write,
    response: &X509svidResponse,
    output: OutputArgs,
) -> anyhow::Result<()> {
    match output.output {
        OutputFormat::Pretty => {
            writeln!(out, "Received {} svid(s)", response.svids.len())?;
            for svid in &response.svids {
                let leaf = first_certificate(&svid.x509_svid)
                    .ok_or_else(|| anyhow!("the agent sent an empty certificate chain"))?;
                let (_, not_after) = lanyard_core::x509::validity_of(&leaf)?;
                writeln!(out)?;
                writeln!(out, "SPIFFE ID:\t{}", svid.spiffe_id)?;
                if !svid.hint.is_empty() {
                    writeln!(out, "Hint:\t\t{}", svid.hint)?;
                }
                writeln!(out, "Expires at:\t{}", parse::format_system_time(not_after))?;
                writeln!(
                    out,
                    "Chain length:\t{}",
                    split_certificates(&svid.x509_svid)?.len()
                )?;
                writeln!(
                    out,
                    "Federated bundles:\t{}",
                    response
                        .federated_bundles
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )?;
            }
        }
        OutputFormat::Json => {
            let svids: Vec<_> = response
                .svids
                .iter()
                .map(|s| {
                    json!({
                        "spiffe_id": s.spiffe_id,
                        "hint": s.hint,
                        "x509_svid_pem": pem_certificates(&s.x509_svid).unwrap_or_default(),
                        "bundle_pem": pem_certificates(&s.bundle).unwrap_or_default(),
                    })
                })
                .collect();
            write_json(out, &json!({ "svids": svids }))?;
        }
    }
    Ok(())
}

/// Writes `svid.N.pem` (chain), `svid.N.key` (PKCS#8, mode 0600) and `bundle.N.pem`, like
/// SPIRE's `api fetch x509 -write`, each replacing whatever was at its name (see
/// [`replace_file`]). Returns, per SVID, its SPIFFE ID and the paths written, as JSON.
fn write_x509(dir: &Path, response: &X509svidResponse) -> anyhow::Result<Vec<Value>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    for (i, svid) in response.svids.iter().enumerate() {
        let svid_path = dir.join(format!("svid.{i}.pem"));
        let key_path = dir.join(format!("svid.{i}.key"));
        let bundle_path = dir.join(format!("bundle.{i}.pem"));
        replace_file(
            &svid_path,
            pem_certificates(&svid.x509_svid)?.as_bytes(),
            PUBLIC_FILE_MODE,
        )?;
        replace_file(
            &key_path,
            pem_encode("PRIVATE KEY", &svid.x509_svid_key).as_bytes(),
            SECRET_FILE_MODE,
        )?;
        replace_file(
            &bundle_path,
            pem_certificates(&svid.bundle)?.as_bytes(),
            PUBLIC_FILE_MODE,
        )?;
        written.push(json!({
            "spiffe_id": svid.spiffe_id,
            "hint": svid.hint,
            "x509_svid_path": svid_path.display().to_string(),
            "private_key_path": key_path.display().to_string(),
            "bundle_path": bundle_path.display().to_string(),
        }));
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_forms() {
        assert_eq!(socket_path("/a/b.sock").unwrap(), Path::new("/a/b.sock"));
        assert_eq!(
            socket_path("unix:/a/b.sock").unwrap(),
            Path::new("/a/b.sock")
        );
        assert_eq!(
            socket_path("unix:///a/b.sock").unwrap(),
            Path::new("/a/b.sock")
        );
        assert!(socket_path("tcp://127.0.0.1:1").is_err());
        assert!(socket_path("relative.sock").is_err());
    }

    #[test]
    fn concatenated_der_splits() {
        let short = [0x30, 0x03, 1, 2, 3];
        let mut long = vec![0x30, 0x81, 0x80];
        long.extend(std::iter::repeat_n(7u8, 0x80));
        let mut both = short.to_vec();
        both.extend_from_slice(&long);
        let parts = split_certificates(&both).unwrap();
        assert_eq!(parts, vec![short.to_vec(), long]);
        assert!(split_certificates(&[0x30, 0x05, 1]).is_err());
    }
}
