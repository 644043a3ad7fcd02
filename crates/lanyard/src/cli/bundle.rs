//! `lanyard bundle show|list|set|delete`: the server's own trust bundle and the federated
//! bundles of other trust domains, through SPIRE's Bundle API.

use std::io::{Read as _, Write};
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use lanyard_core::{TrustBundle, TrustDomain};
use lanyard_proto::spire::api::server::bundle::v1::batch_delete_federated_bundle_request;
use serde_json::{Value, json};

use crate::admin::item_code;
use crate::cli::client::SocketArgs;
use crate::cli::output::{OutputArgs, bundle_json, status_json, status_text, write_json};
use crate::cli::parse;

#[derive(Debug, Subcommand)]
pub(crate) enum BundleCommand {
    /// Show the server's own trust bundle.
    Show(ShowArgs),
    /// Show federated bundles: every one, or the one of --id.
    List(ListArgs),
    /// Create or replace the federated bundle of a trust domain.
    Set(SetArgs),
    /// Delete the federated bundle of a trust domain.
    Delete(DeleteArgs),
}

impl BundleCommand {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Show(_) => "show",
            Self::List(_) => "list",
            Self::Set(_) => "set",
            Self::Delete(_) => "delete",
        }
    }

    pub(crate) async fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        match self {
            Self::Show(args) => show(&args, out).await,
            Self::List(args) => list(&args, out).await,
            Self::Set(args) => set(&args, out).await,
            Self::Delete(args) => delete(&args, out).await,
        }
    }
}

/// How a bundle is written as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub(crate) enum BundleFormat {
    /// The X.509 authorities as PEM certificates.
    #[default]
    Pem,
    /// A SPIFFE bundle: a JWK Set of the X.509 and JWT authorities.
    Spiffe,
}

#[derive(Debug, Args)]
pub(crate) struct ShowArgs {
    /// Text format of the bundle (with --output pretty).
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t)]
    format: BundleFormat,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Show only the bundle of this trust domain.
    #[arg(long, value_name = "TRUST_DOMAIN")]
    id: Option<String>,
    /// Text format of the bundles (with --output pretty).
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t)]
    format: BundleFormat,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub(crate) struct SetArgs {
    /// Trust domain whose bundle this is.
    #[arg(long, value_name = "TRUST_DOMAIN")]
    id: String,
    /// File holding the bundle (default: standard input).
    #[arg(long, value_name = "FILE")]
    path: Option<PathBuf>,
    /// Format of the file.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t)]
    format: BundleFormat,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// What happens to entries that federate with a deleted bundle's trust domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub(crate) enum DeleteMode {
    /// Refuse to delete a bundle that entries federate with.
    #[default]
    Restrict,
    /// Delete those entries too.
    Delete,
    /// Remove the trust domain from those entries.
    Dissociate,
}

#[derive(Debug, Args)]
pub(crate) struct DeleteArgs {
    /// Trust domain whose bundle to delete.
    #[arg(long, value_name = "TRUST_DOMAIN")]
    id: String,
    /// What to do with entries that federate with the trust domain.
    #[arg(long, value_name = "MODE", value_enum, default_value_t)]
    mode: DeleteMode,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

impl BundleFormat {
    fn label(self) -> &'static str {
        match self {
            Self::Pem => "PEM",
            Self::Spiffe => "SPIFFE",
        }
    }
}

/// The text of a bundle in `format`: PEM certificates, or an indented SPIFFE bundle.
fn bundle_text(bundle: &TrustBundle, format: BundleFormat) -> anyhow::Result<String> {
    match format {
        BundleFormat::Pem => Ok(bundle.x509_authorities_pem()),
        BundleFormat::Spiffe => {
            let document: Value = serde_json::from_str(&bundle.to_jwks_json())?;
            Ok(format!("{}\n", serde_json::to_string_pretty(&document)?))
        }
    }
}

/// Parses a bundle file in `format` for `trust_domain`.
pub(crate) fn parse_bundle(
    trust_domain: &TrustDomain,
    bytes: &[u8],
    format: BundleFormat,
) -> anyhow::Result<TrustBundle> {
    let trust_domain = trust_domain.clone();
    Ok(match format {
        BundleFormat::Pem => {
            let text = std::str::from_utf8(bytes).context("PEM input is not UTF-8 text")?;
            TrustBundle::from_pem_certificates(trust_domain, text)?
        }
        BundleFormat::Spiffe => TrustBundle::from_jwks_json(trust_domain, bytes)?,
    })
}

/// The trust domain of `--id`: a bare name or `spiffe://name`.
fn trust_domain_arg(id: &str) -> anyhow::Result<TrustDomain> {
    let name = parse::trust_domain(id).context("--id is invalid")?;
    Ok(TrustDomain::new(&name)?)
}

async fn show(args: &ShowArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let client = args.socket.connect().await?;
    let bundle = client.bundle().await?;
    if args.output.is_json() {
        write_json(out, &bundle_json(&bundle))
    } else {
        out.write_all(bundle_text(&bundle, args.format)?.as_bytes())?;
        Ok(())
    }
}

async fn list(args: &ListArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let id = args.id.as_deref().map(trust_domain_arg).transpose()?;
    let client = args.socket.connect().await?;
    let bundles = match &id {
        Some(trust_domain) => vec![client.federated_bundle(trust_domain).await?],
        None => client.federated_bundles().await?,
    };
    if args.output.is_json() {
        let bundles: Vec<Value> = bundles.iter().map(bundle_json).collect();
        return write_json(out, &json!({ "bundles": bundles }));
    }
    if id.is_some() {
        for bundle in &bundles {
            out.write_all(bundle_text(bundle, args.format)?.as_bytes())?;
        }
        return Ok(());
    }
    for (index, bundle) in bundles.iter().enumerate() {
        if index > 0 {
            writeln!(out)?;
        }
        writeln!(out, "****************************************")?;
        writeln!(out, "* {}", bundle.trust_domain())?;
        writeln!(out, "****************************************")?;
        out.write_all(bundle_text(bundle, args.format)?.as_bytes())?;
    }
    Ok(())
}

async fn set(args: &SetArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let trust_domain = trust_domain_arg(&args.id)?;
    let bytes = match &args.path {
        Some(path) => {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
        }
        None => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .read_to_end(&mut bytes)
                .context("cannot read the bundle from standard input")?;
            bytes
        }
    };
    let source = args
        .path
        .as_ref()
        .map_or_else(|| "standard input".to_owned(), |p| p.display().to_string());
    let bundle = parse_bundle(&trust_domain, &bytes, args.format)
        .with_context(|| format!("{source} is not a valid {} bundle", args.format.label()))?;
    let client = args.socket.connect().await?;
    let (status, stored) = client.set_federated_bundle(&bundle).await?;
    if args.output.is_json() {
        let mut item = json!({ "status": status_json(Some(&status)) });
        if let Some(bundle) = &stored {
            item["bundle"] = bundle_json(bundle);
        }
        write_json(out, &json!({ "results": [item] }))?;
    }
    if item_code(Some(&status)) != tonic::Code::Ok {
        bail!(
            "cannot set the bundle of {trust_domain} {}",
            status_text(Some(&status))
        );
    }
    if !args.output.is_json() {
        writeln!(out, "bundle set.")?;
    }
    Ok(())
}

async fn delete(args: &DeleteArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    use batch_delete_federated_bundle_request::Mode;
    let trust_domain = trust_domain_arg(&args.id)?;
    let mode = match args.mode {
        DeleteMode::Restrict => Mode::Restrict,
        DeleteMode::Delete => Mode::Delete,
        DeleteMode::Dissociate => Mode::Dissociate,
    };
    let client = args.socket.connect().await?;
    let status = client.delete_federated_bundle(&trust_domain, mode).await?;
    if args.output.is_json() {
        write_json(
            out,
            &json!({ "results": [{
                "status": status_json(Some(&status)),
                "trust_domain": trust_domain.name(),
            }] }),
        )?;
    }
    if item_code(Some(&status)) != tonic::Code::Ok {
        bail!(
            "cannot delete the bundle of {trust_domain} {}",
            status_text(Some(&status))
        );
    }
    if !args.output.is_json() {
        writeln!(out, "bundle deleted.")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_ca_der() -> Vec<u8> {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .self_signed(&key)
            .expect("self-signed")
            .der()
            .to_vec()
    }

    #[test]
    fn pem_files_become_x509_authorities_and_print_back() {
        let der = test_ca_der();
        let pem = lanyard_core::keys::pem_encode("CERTIFICATE", &der);
        let partner = TrustDomain::new("partner.org").unwrap();
        let bundle =
            parse_bundle(&partner, pem.as_bytes(), BundleFormat::Pem).expect("valid PEM bundle");
        assert_eq!(bundle.trust_domain().name(), "partner.org");
        assert_eq!(bundle.x509_authorities().len(), 1);
        assert_eq!(bundle.x509_authorities()[0].der(), der);
        assert_eq!(bundle_text(&bundle, BundleFormat::Pem).expect("pem"), pem);

        let spiffe = bundle_text(&bundle, BundleFormat::Spiffe).expect("jwks");
        let document: Value = serde_json::from_str(&spiffe).expect("json");
        assert_eq!(document["keys"][0]["use"], "x509-svid");
        let again = parse_bundle(&partner, spiffe.as_bytes(), BundleFormat::Spiffe)
            .expect("valid SPIFFE bundle");
        assert_eq!(again.x509_authorities()[0].der(), der);
    }

    #[test]
    fn bad_bundle_files_are_rejected() {
        let partner = TrustDomain::new("partner.org").unwrap();
        assert!(parse_bundle(&partner, b"not pem", BundleFormat::Pem).is_err());
        assert!(parse_bundle(&partner, b"{}", BundleFormat::Spiffe).is_err());
        assert!(trust_domain_arg("Partner.org").is_err());
    }
}
