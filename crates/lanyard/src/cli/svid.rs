//! `lanyard x509 mint` and `lanyard jwt mint`: one-off SVIDs from the server's SVID API,
//! for testing and for software outside the Workload API. The X.509 key is generated here and
//! never leaves this process except into the printed or written output.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use lanyard_core::keys::pem_encode;
use lanyard_core::{KeyPair, KeyType, SpiffeId};
use lanyard_proto::convert::spiffe_id_to_proto;
use lanyard_proto::spire::api::server::svid::v1::{MintJwtsvidRequest, MintX509svidRequest};
use serde_json::json;

use crate::admin::rpc_error;
use crate::cli::client::SocketArgs;
use crate::cli::files::{PUBLIC_FILE_MODE, SECRET_FILE_MODE, replace_file};
use crate::cli::output::{OutputArgs, spiffe_id_json, write_json};
use crate::cli::parse;

#[derive(Debug, Subcommand)]
pub(crate) enum X509Command {
    /// Mint an X.509-SVID for any SPIFFE ID of the trust domain, with a fresh key.
    Mint(X509MintArgs),
}

impl X509Command {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Mint(_) => "mint",
        }
    }

    pub(crate) async fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        match self {
            Self::Mint(args) => mint_x509(&args, out).await,
        }
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum JwtCommand {
    /// Mint a JWT-SVID for any SPIFFE ID of the trust domain.
    Mint(JwtMintArgs),
}

impl JwtCommand {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Mint(_) => "mint",
        }
    }

    pub(crate) async fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        match self {
            Self::Mint(args) => mint_jwt(&args, out).await,
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct X509MintArgs {
    /// SPIFFE ID of the SVID.
    #[arg(long, value_name = "ID")]
    spiffe_id: String,
    /// DNS name for the SVID; the first is also the subject common name (repeatable).
    #[arg(long = "dns", value_name = "NAME")]
    dns_names: Vec<String>,
    /// Lifetime: seconds or a duration such as 1h (default: the server's X.509-SVID TTL).
    #[arg(long, value_name = "DURATION")]
    ttl: Option<String>,
    /// Type of the generated key.
    #[arg(long, value_name = "TYPE", value_enum, default_value_t)]
    key_type: MintKeyType,
    /// Write svid.pem, key.pem (mode 0600) and bundle.pem into this directory instead of
    /// printing them.
    #[arg(long, value_name = "DIR")]
    write: Option<PathBuf>,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// The key types `x509 mint` can generate (ring generates EC keys only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub(crate) enum MintKeyType {
    /// ECDSA on NIST P-256.
    #[default]
    #[value(name = "ec-p256")]
    EcP256,
    /// ECDSA on NIST P-384.
    #[value(name = "ec-p384")]
    EcP384,
}

/// The parsed `x509 mint` flags.
#[derive(Debug)]
struct X509MintPlan {
    spiffe_id: SpiffeId,
    key_type: KeyType,
    ttl: i32,
}

impl X509MintArgs {
    fn plan(&self) -> anyhow::Result<X509MintPlan> {
        let spiffe_id: SpiffeId = self
            .spiffe_id
            .parse()
            .with_context(|| format!("--spiffe-id {:?} is invalid", self.spiffe_id))?;
        let key_type = match self.key_type {
            MintKeyType::EcP256 => KeyType::EcP256,
            MintKeyType::EcP384 => KeyType::EcP384,
        };
        let ttl = match &self.ttl {
            Some(ttl) => parse::ttl_seconds(ttl).context("--ttl is invalid")?,
            None => 0,
        };
        for name in &self.dns_names {
            lanyard_core::entry::validate_dns_name(name)
                .with_context(|| format!("--dns {name:?} is invalid"))?;
        }
        Ok(X509MintPlan {
            spiffe_id,
            key_type,
            ttl,
        })
    }
}

/// A DER CSR for `spiffe_id` and `dns_names`, signed by `key`.
///
/// `lanyard_core::x509::build_csr` writes the subject and URI SAN that SPIRE's agents send;
/// `x509 mint` also needs DNS SANs, which only the CSR can carry to MintX509SVID, so with DNS
/// names the request is built here with the same subject.
fn build_csr(key: &KeyPair, spiffe_id: &SpiffeId, dns_names: &[String]) -> anyhow::Result<Vec<u8>> {
    if dns_names.is_empty() {
        return Ok(lanyard_core::x509::build_csr(key, Some(spiffe_id))?);
    }
    let signer = rcgen::KeyPair::try_from(key.secret_pkcs8_der())
        .context("cannot load the generated key")?;
    let mut params = rcgen::CertificateParams::default();
    let mut subject = rcgen::DistinguishedName::new();
    subject.push(
        rcgen::DnType::CountryName,
        rcgen::DnValue::PrintableString(rcgen::string::PrintableString::try_from("US")?),
    );
    subject.push(rcgen::DnType::OrganizationName, "SPIRE");
    params.distinguished_name = subject;
    params
        .subject_alt_names
        .push(rcgen::SanType::URI(rcgen::string::Ia5String::try_from(
            spiffe_id.as_str(),
        )?));
    for name in dns_names {
        params.subject_alt_names.push(rcgen::SanType::DnsName(
            rcgen::string::Ia5String::try_from(name.as_str())
                .with_context(|| format!("DNS name {name:?} is not ASCII"))?,
        ));
    }
    let csr = params
        .serialize_request(&signer)
        .context("cannot build the CSR")?;
    Ok(csr.der().to_vec())
}

async fn mint_x509(args: &X509MintArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let plan = args.plan()?;
    let client = args.socket.connect().await?;
    let key = KeyPair::generate(plan.key_type)?;
    let csr = build_csr(&key, &plan.spiffe_id, &args.dns_names)?;
    let svid = client
        .svid()
        .mint_x509svid(MintX509svidRequest { csr, ttl: plan.ttl })
        .await
        .map_err(|status| rpc_error("MintX509SVID failed", &status))?
        .into_inner()
        .svid
        .context("the server answered without an SVID")?;
    if svid.cert_chain.is_empty() {
        bail!("the server answered an empty certificate chain");
    }
    let bundle = client.bundle().await?;

    let svid_pem: String = svid
        .cert_chain
        .iter()
        .map(|der| pem_encode("CERTIFICATE", der))
        .collect();
    let key_pem = key.secret_pkcs8_pem();
    let bundle_pem = bundle.x509_authorities_pem();

    // The JSON names the SVID as the server's X509SVID message does, and holds the PEM texts
    // (or, with --write, the files' paths) as `fetch x509 --output json` does.
    let mut json = json!({
        "id": spiffe_id_json(svid.id.as_ref()),
        "expires_at": svid.expires_at,
    });
    match &args.write {
        Some(dir) => {
            let svid_path = dir.join("svid.pem");
            let key_path = dir.join("key.pem");
            let bundle_path = dir.join("bundle.pem");
            replace_file(&svid_path, svid_pem.as_bytes(), PUBLIC_FILE_MODE)?;
            replace_file(&key_path, key_pem.as_bytes(), SECRET_FILE_MODE)?;
            replace_file(&bundle_path, bundle_pem.as_bytes(), PUBLIC_FILE_MODE)?;
            if args.output.is_json() {
                json["x509_svid_path"] = json!(svid_path.display().to_string());
                json["private_key_path"] = json!(key_path.display().to_string());
                json["bundle_path"] = json!(bundle_path.display().to_string());
                return write_json(out, &json);
            }
            writeln!(out, "X509-SVID written to {}", svid_path.display())?;
            writeln!(out, "Private key written to {}", key_path.display())?;
            writeln!(out, "Root CAs written to {}", bundle_path.display())?;
        }
        None if args.output.is_json() => {
            json["x509_svid_pem"] = json!(svid_pem);
            json["private_key_pem"] = json!(key_pem.as_str());
            json["bundle_pem"] = json!(bundle_pem);
            write_json(out, &json)?;
        }
        None => {
            writeln!(out, "X509-SVID:")?;
            write!(out, "{svid_pem}")?;
            writeln!(out)?;
            writeln!(out, "Private key:")?;
            write!(out, "{key_pem}")?;
            writeln!(out)?;
            writeln!(out, "Root CAs:")?;
            write!(out, "{bundle_pem}")?;
        }
    }
    Ok(())
}

#[derive(Debug, Args)]
pub(crate) struct JwtMintArgs {
    /// SPIFFE ID of the SVID (its `sub` claim).
    #[arg(long, value_name = "ID")]
    spiffe_id: String,
    /// Audience of the token (repeatable; at least one).
    #[arg(long = "audience", value_name = "AUDIENCE", required = true)]
    audiences: Vec<String>,
    /// Lifetime: seconds or a duration such as 5m (default: the server's JWT-SVID TTL).
    #[arg(long, value_name = "DURATION")]
    ttl: Option<String>,
    /// Write the token to this file (mode 0600) instead of printing it.
    #[arg(long, value_name = "FILE")]
    write: Option<PathBuf>,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

impl JwtMintArgs {
    fn request(&self) -> anyhow::Result<MintJwtsvidRequest> {
        let spiffe_id: SpiffeId = self
            .spiffe_id
            .parse()
            .with_context(|| format!("--spiffe-id {:?} is invalid", self.spiffe_id))?;
        if self.audiences.iter().any(String::is_empty) {
            bail!("--audience cannot be empty");
        }
        let ttl = match &self.ttl {
            Some(ttl) => parse::ttl_seconds(ttl).context("--ttl is invalid")?,
            None => 0,
        };
        Ok(MintJwtsvidRequest {
            id: Some(spiffe_id_to_proto(&spiffe_id)),
            audience: self.audiences.clone(),
            ttl,
        })
    }
}

async fn mint_jwt(args: &JwtMintArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let request = args.request()?;
    let client = args.socket.connect().await?;
    let svid = client
        .svid()
        .mint_jwtsvid(request)
        .await
        .map_err(|status| rpc_error("MintJWTSVID failed", &status))?
        .into_inner()
        .svid
        .context("the server answered without an SVID")?;
    if svid.token.is_empty() {
        bail!("the server answered an empty token");
    }
    // The JSON is the server's JWTSVID message, the token left out with --write.
    let mut json = json!({
        "id": spiffe_id_json(svid.id.as_ref()),
        "expires_at": svid.expires_at,
        "issued_at": svid.issued_at,
    });
    match &args.write {
        Some(path) => {
            replace_file(
                path,
                format!("{}\n", svid.token).as_bytes(),
                SECRET_FILE_MODE,
            )?;
            if args.output.is_json() {
                json["path"] = json!(path.display().to_string());
                return write_json(out, &json);
            }
            writeln!(out, "JWT-SVID written to {}", path.display())?;
        }
        None if args.output.is_json() => {
            json["token"] = json!(svid.token);
            write_json(out, &json)?;
        }
        None => writeln!(out, "{}", svid.token)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    use crate::cli::{Cli, Command};

    fn x509_args(args: &[&str]) -> X509MintArgs {
        let cli =
            Cli::try_parse_from(["lanyard", "x509", "mint"].iter().chain(args)).expect("parses");
        match cli.command {
            Command::X509(X509Command::Mint(args)) => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    fn jwt_args(args: &[&str]) -> JwtMintArgs {
        let cli =
            Cli::try_parse_from(["lanyard", "jwt", "mint"].iter().chain(args)).expect("parses");
        match cli.command {
            Command::Jwt(JwtCommand::Mint(args)) => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn csrs_carry_the_id_and_dns_names() {
        for key_type in [KeyType::EcP256, KeyType::EcP384] {
            let key = KeyPair::generate(key_type).expect("key");
            let id: SpiffeId = "spiffe://example.org/web".parse().expect("id");

            let plain = build_csr(&key, &id, &[]).expect("csr");
            let parsed = lanyard_core::x509::parse_csr(&plain).expect("valid csr");
            assert_eq!(parsed.uri_sans(), ["spiffe://example.org/web"]);
            assert!(parsed.dns_names().is_empty());

            let dns = vec!["web.example.org".to_owned(), "web".to_owned()];
            let with_dns = build_csr(&key, &id, &dns).expect("csr");
            let parsed = lanyard_core::x509::parse_csr(&with_dns).expect("valid csr");
            assert_eq!(parsed.uri_sans(), ["spiffe://example.org/web"]);
            assert_eq!(parsed.dns_names(), dns.as_slice());
            assert_eq!(parsed.public_key_der(), key.public_key_der().as_slice());
        }
    }

    #[test]
    fn x509_flags_are_checked_before_connecting() {
        let plan = x509_args(&["--spiffe-id", "spiffe://example.org/web", "--ttl", "1h"])
            .plan()
            .expect("valid");
        assert_eq!(plan.ttl, 3600);
        assert_eq!(plan.key_type, KeyType::EcP256);
        let plan = x509_args(&[
            "--spiffe-id",
            "spiffe://example.org/web",
            "--key-type",
            "ec-p384",
        ])
        .plan()
        .expect("valid");
        assert_eq!(plan.key_type, KeyType::EcP384);
        assert!(
            Cli::try_parse_from([
                "lanyard",
                "x509",
                "mint",
                "--spiffe-id",
                "spiffe://example.org/web",
                "--key-type",
                "rsa-2048",
            ])
            .is_err(),
            "RSA keys cannot be generated"
        );
        assert!(
            x509_args(&[
                "--spiffe-id",
                "spiffe://example.org/web",
                "--dns",
                "bad name"
            ])
            .plan()
            .is_err()
        );
        assert!(x509_args(&["--spiffe-id", "web"]).plan().is_err());
    }

    #[test]
    fn jwt_flags_become_the_request() {
        let request = jwt_args(&[
            "--spiffe-id",
            "spiffe://example.org/web",
            "--audience",
            "api",
            "--audience",
            "billing",
            "--ttl",
            "5m",
        ])
        .request()
        .expect("valid");
        assert_eq!(request.audience, ["api", "billing"]);
        assert_eq!(request.ttl, 300);
        let id = request.id.expect("id");
        assert_eq!(
            (id.trust_domain.as_str(), id.path.as_str()),
            ("example.org", "/web")
        );
        assert!(
            Cli::try_parse_from(["lanyard", "jwt", "mint", "--spiffe-id", "spiffe://a/b"]).is_err(),
            "--audience is required"
        );
    }
}
