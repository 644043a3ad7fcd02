//! `lanyard federation create|list|show|update|delete|refresh`: federation relationships with
//! foreign trust domains, through SPIRE's TrustDomain API, with the flags and `--data` file of
//! `spire-server federation`. Relationships are built and checked as core types before they
//! are sent; the pretty output is SPIRE's layout, the JSON the protobuf messages with their
//! proto field names.

pub(crate) mod data;

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use lanyard_core::federation::{BundleEndpointProfile, HTTPS_SPIFFE, HTTPS_WEB};
use lanyard_core::{FederationRelationship, TrustDomain};
use lanyard_proto::spire::api::types;
use serde_json::{Value, json};

use self::data::{BundleSource, RelationshipConfig};
use crate::admin::{describe_status, item_code};
use crate::cli::bundle::BundleFormat;
use crate::cli::client::SocketArgs;
use crate::cli::entry::read_input;
use crate::cli::output::{
    OutputArgs, bundle_json, count_noun, status_json, status_text, write_json,
};

/// The flags that `--data` replaces.
const RELATIONSHIP_FIELD_ARGS: [&str; 6] = [
    "trust_domain",
    "bundle_endpoint_url",
    "bundle_endpoint_profile",
    "endpoint_spiffe_id",
    "trust_domain_bundle_path",
    "trust_domain_bundle_format",
];

#[derive(Debug, Subcommand)]
pub(crate) enum FederationCommand {
    /// Create federation relationships.
    Create(WriteArgs),
    /// List every federation relationship.
    List(ListArgs),
    /// Show the federation relationship with a trust domain.
    Show(TrustDomainArgs),
    /// Update federation relationships (every field is replaced).
    Update(WriteArgs),
    /// Delete the federation relationship with a trust domain; its bundle stays.
    Delete(TrustDomainArgs),
    /// Ask the server to fetch a federated trust domain's bundle now.
    Refresh(TrustDomainArgs),
}

impl FederationCommand {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Create(_) => "create",
            Self::List(_) => "list",
            Self::Show(_) => "show",
            Self::Update(_) => "update",
            Self::Delete(_) => "delete",
            Self::Refresh(_) => "refresh",
        }
    }

    pub(crate) async fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        match self {
            Self::Create(args) => write(&args, Verb::Create, out).await,
            Self::List(args) => list(&args, out).await,
            Self::Show(args) => show(&args, out).await,
            Self::Update(args) => write(&args, Verb::Update, out).await,
            Self::Delete(args) => delete(&args, out).await,
            Self::Refresh(args) => refresh(&args, out).await,
        }
    }
}

/// How a bundle endpoint authenticates itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ProfileArg {
    /// A certificate from the Web PKI.
    #[value(name = "https_web")]
    HttpsWeb,
    /// An X509-SVID with --endpoint-spiffe-id.
    #[value(name = "https_spiffe")]
    HttpsSpiffe,
}

#[derive(Debug, Args)]
pub(crate) struct WriteArgs {
    /// Trust domain to federate with (e.g. partner.example).
    #[arg(long, value_name = "TRUST_DOMAIN", required_unless_present = "data")]
    trust_domain: Option<String>,
    /// URL of the trust domain's SPIFFE bundle endpoint (https).
    #[arg(long, value_name = "URL", required_unless_present = "data")]
    bundle_endpoint_url: Option<String>,
    /// How the bundle endpoint authenticates itself.
    #[arg(
        long,
        value_name = "PROFILE",
        value_enum,
        required_unless_present = "data"
    )]
    bundle_endpoint_profile: Option<ProfileArg>,
    /// SPIFFE ID of the bundle endpoint (https_spiffe only).
    #[arg(long, value_name = "SPIFFE_ID")]
    endpoint_spiffe_id: Option<String>,
    /// File holding the trust domain's bundle, to start from (optional).
    #[arg(long, value_name = "FILE")]
    trust_domain_bundle_path: Option<PathBuf>,
    /// Format of --trust-domain-bundle-path.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t)]
    trust_domain_bundle_format: BundleFormat,
    /// The relationships of a JSON file in the format of `spire-server federation create
    /// -data` ({"federationRelationships": [...]}); - reads standard input.
    #[arg(long, value_name = "FILE", conflicts_with_all = RELATIONSHIP_FIELD_ARGS)]
    data: Option<PathBuf>,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

impl WriteArgs {
    fn relationships(&self) -> anyhow::Result<Vec<FederationRelationship>> {
        let configs = match &self.data {
            Some(path) => {
                let bytes = read_input(path)?;
                data::parse_relationships(&bytes).with_context(|| format!("{}", path.display()))?
            }
            None => vec![RelationshipConfig {
                trust_domain: self.trust_domain.clone().unwrap_or_default(),
                bundle_endpoint_url: self.bundle_endpoint_url.clone().unwrap_or_default(),
                bundle_endpoint_profile: match self.bundle_endpoint_profile {
                    Some(ProfileArg::HttpsWeb) => HTTPS_WEB.to_owned(),
                    Some(ProfileArg::HttpsSpiffe) => HTTPS_SPIFFE.to_owned(),
                    None => String::new(),
                },
                endpoint_spiffe_id: self.endpoint_spiffe_id.clone(),
                bundle: self
                    .trust_domain_bundle_path
                    .as_ref()
                    .map(|path| BundleSource::File(path.clone(), self.trust_domain_bundle_format)),
            }],
        };
        configs
            .iter()
            .enumerate()
            .map(|(index, config)| {
                config.relationship().with_context(|| {
                    if configs.len() == 1 {
                        "invalid federation relationship".to_owned()
                    } else {
                        format!("invalid federation relationship {index}")
                    }
                })
            })
            .collect()
    }
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub(crate) struct TrustDomainArgs {
    /// Trust domain of the relationship (bare or spiffe://).
    #[arg(long, visible_alias = "id", value_name = "TRUST_DOMAIN")]
    trust_domain: String,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

impl TrustDomainArgs {
    /// The trust domain, checked, as the bare name.
    fn trust_domain(&self) -> anyhow::Result<TrustDomain> {
        self.trust_domain
            .parse()
            .map_err(lanyard_core::federation::FederationError::TrustDomain)
            .context("--trust-domain is invalid")
    }
}

#[derive(Debug, Clone, Copy)]
enum Verb {
    Create,
    Update,
}

impl Verb {
    fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Update => "update",
        }
    }
}

/// Creates or updates the relationships and reports each result; fails if one failed.
async fn write(args: &WriteArgs, verb: Verb, out: &mut dyn Write) -> anyhow::Result<()> {
    let requested = args.relationships()?;
    let client = args.socket.connect().await?;
    let results = match verb {
        Verb::Create => client.create_federation_relationships(&requested).await?,
        Verb::Update => client.update_federation_relationships(&requested).await?,
    };
    let ok = |status: &types::Status| item_code(Some(status)) == tonic::Code::Ok;
    let failed: Vec<&types::Status> = results
        .iter()
        .map(|(status, _)| status)
        .filter(|status| !ok(status))
        .collect();
    if args.output.is_json() {
        let items: Vec<Value> = results
            .iter()
            .zip(&requested)
            .map(|((status, stored), requested)| {
                json!({
                    "status": status_json(Some(status)),
                    "federation_relationship": relationship_json(stored.as_ref().unwrap_or(requested)),
                })
            })
            .collect();
        write_json(out, &json!({ "results": items }))?;
    } else {
        for ((status, stored), requested) in results.iter().zip(&requested) {
            match stored {
                Some(stored) => write_relationship_pretty(out, stored)?,
                None => {
                    writeln!(
                        out,
                        "Failed to {} the following federation relationship {}:",
                        verb.as_str(),
                        status_text(Some(status))
                    )?;
                    write_relationship_pretty(out, requested)?;
                }
            }
            writeln!(out)?;
        }
    }
    if !failed.is_empty() {
        let counted = format!(
            "{} of {} failed",
            failed.len(),
            count_noun(
                results.len(),
                "federation relationship",
                "federation relationships"
            )
        );
        match failed.as_slice() {
            [single] if results.len() == 1 => bail!(
                "{counted}: {}",
                describe_status(tonic::Code::from_i32(single.code), &single.message)
            ),
            _ => bail!("{counted}"),
        }
    }
    Ok(())
}

async fn list(args: &ListArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let client = args.socket.connect().await?;
    let relationships = client.federation_relationships().await?;
    if args.output.is_json() {
        let items: Vec<Value> = relationships.iter().map(relationship_json).collect();
        return write_json(out, &json!({ "federation_relationships": items }));
    }
    writeln!(
        out,
        "Found {}",
        count_noun(
            relationships.len(),
            "federation relationship",
            "federation relationships"
        )
    )?;
    for relationship in &relationships {
        writeln!(out)?;
        write_relationship_pretty(out, relationship)?;
    }
    Ok(())
}

async fn show(args: &TrustDomainArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let trust_domain = args.trust_domain()?;
    let client = args.socket.connect().await?;
    let relationship = client.federation_relationship(&trust_domain).await?;
    if args.output.is_json() {
        return write_json(out, &relationship_json(&relationship));
    }
    writeln!(
        out,
        "Found a federation relationship with trust domain {trust_domain}:"
    )?;
    writeln!(out)?;
    write_relationship_pretty(out, &relationship)
}

async fn delete(args: &TrustDomainArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let trust_domain = args.trust_domain()?;
    let client = args.socket.connect().await?;
    let status = client.delete_federation_relationship(&trust_domain).await?;
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
            "cannot delete the federation relationship with {trust_domain} {}",
            status_text(Some(&status))
        );
    }
    if !args.output.is_json() {
        writeln!(out, "federation relationship deleted.")?;
    }
    Ok(())
}

async fn refresh(args: &TrustDomainArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let trust_domain = args.trust_domain()?;
    let client = args.socket.connect().await?;
    client.refresh_bundle(&trust_domain).await?;
    if args.output.is_json() {
        write_json(out, &status_json(None))
    } else {
        writeln!(out, "Bundle refreshed")?;
        Ok(())
    }
}

/// A relationship as JSON: the protobuf message with proto field names, as SPIRE's
/// `-output json` prints it (the profile is the `https_web` or `https_spiffe` member).
fn relationship_json(relationship: &FederationRelationship) -> Value {
    let mut object = serde_json::Map::new();
    object.insert(
        "trust_domain".into(),
        json!(relationship.trust_domain().name()),
    );
    object.insert(
        "bundle_endpoint_url".into(),
        json!(relationship.bundle_endpoint_url().as_str()),
    );
    match relationship.profile() {
        BundleEndpointProfile::HttpsWeb => {
            object.insert("https_web".into(), json!({}));
        }
        BundleEndpointProfile::HttpsSpiffe { endpoint_spiffe_id } => {
            object.insert(
                "https_spiffe".into(),
                json!({ "endpoint_spiffe_id": endpoint_spiffe_id.to_string() }),
            );
        }
    }
    if let Some(bundle) = relationship.trust_domain_bundle() {
        object.insert("trust_domain_bundle".into(), bundle_json(bundle));
    }
    Value::Object(object)
}

/// One `Label : value` line in SPIRE's federation layout.
fn write_line(out: &mut dyn Write, label: &str, value: &str) -> anyhow::Result<()> {
    writeln!(out, "{label:<26}: {value}")?;
    Ok(())
}

/// A relationship in SPIRE's layout, plus a line about its bundle when it has one. A
/// relationship the server sent that does not parse is shown as it came.
fn write_relationship_pretty(
    out: &mut dyn Write,
    relationship: &FederationRelationship,
) -> anyhow::Result<()> {
    write_line(out, "Trust domain", relationship.trust_domain().name())?;
    write_line(
        out,
        "Bundle endpoint URL",
        relationship.bundle_endpoint_url().as_str(),
    )?;
    write_line(
        out,
        "Bundle endpoint profile",
        relationship.profile().name(),
    )?;
    if let Some(endpoint_spiffe_id) = relationship.profile().endpoint_spiffe_id() {
        write_line(out, "Endpoint SPIFFE ID", endpoint_spiffe_id.as_ref())?;
    }
    if let Some(bundle) = relationship.trust_domain_bundle() {
        write_line(
            out,
            "Trust domain bundle",
            &format!(
                "{}, {}, sequence number {}",
                count_noun(
                    bundle.x509_authorities().len(),
                    "X.509 authority",
                    "X.509 authorities"
                ),
                count_noun(
                    bundle.jwt_authorities().len(),
                    "JWT authority",
                    "JWT authorities"
                ),
                bundle.sequence_number()
            ),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relationships_print_in_spires_layout_and_as_proto_json() {
        let partner = TrustDomain::new("partner.example").unwrap();
        let mut bundle = lanyard_core::TrustBundle::new(partner.clone());
        bundle.set_sequence_number(3);
        let relationship = FederationRelationship::new(
            partner,
            "https://partner.example:8443".parse().unwrap(),
            BundleEndpointProfile::HttpsSpiffe {
                endpoint_spiffe_id: "spiffe://partner.example/spire/server".parse().unwrap(),
            },
        )
        .with_trust_domain_bundle(bundle)
        .unwrap();
        let mut out = Vec::new();
        write_relationship_pretty(&mut out, &relationship).expect("written");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "Trust domain              : partner.example\n\
             Bundle endpoint URL       : https://partner.example:8443\n\
             Bundle endpoint profile   : https_spiffe\n\
             Endpoint SPIFFE ID        : spiffe://partner.example/spire/server\n\
             Trust domain bundle       : 0 X.509 authorities, 0 JWT authorities, sequence number 3\n"
        );
        let json = relationship_json(&relationship);
        assert_eq!(
            json["https_spiffe"]["endpoint_spiffe_id"],
            "spiffe://partner.example/spire/server"
        );
        assert_eq!(json["trust_domain_bundle"]["sequence_number"], 3);
        assert!(json.get("https_web").is_none());
    }

    #[test]
    fn flags_build_one_relationship() {
        use clap::Parser as _;
        let cli = crate::cli::Cli::try_parse_from([
            "lanyard",
            "federation",
            "create",
            "--trust-domain",
            "partner.example",
            "--bundle-endpoint-url",
            "https://partner.example",
            "--bundle-endpoint-profile",
            "https_spiffe",
            "--endpoint-spiffe-id",
            "spiffe://partner.example/spire/server",
        ])
        .expect("parses");
        let crate::cli::Command::Federation(FederationCommand::Create(args)) = cli.command else {
            panic!("federation create");
        };
        let relationships = args.relationships().expect("valid");
        assert_eq!(relationships.len(), 1);
        assert_eq!(
            relationships[0]
                .profile()
                .endpoint_spiffe_id()
                .map(lanyard_core::SpiffeId::as_str),
            Some("spiffe://partner.example/spire/server")
        );
        // --data replaces the field flags; without it the three are required.
        assert!(
            crate::cli::Cli::try_parse_from([
                "lanyard",
                "federation",
                "create",
                "--data",
                "f.json",
                "--trust-domain",
                "x"
            ])
            .is_err()
        );
        assert!(
            crate::cli::Cli::try_parse_from([
                "lanyard",
                "federation",
                "update",
                "--trust-domain",
                "x"
            ])
            .is_err()
        );
        assert!(
            crate::cli::Cli::try_parse_from(["lanyard", "federation", "delete", "--id", "x.org"])
                .is_ok()
        );
    }
}
