//! `lanyard token generate`: one-time join tokens for node attestation.

use std::io::Write;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use lanyard_proto::spire::api::server::agent::v1::CreateJoinTokenRequest;
use serde_json::json;

use crate::admin::rpc_error;
use crate::cli::client::SocketArgs;
use crate::cli::output::{OutputArgs, write_json};
use crate::cli::parse;

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Generate a join token that one agent can use once to attest.
    Generate(GenerateArgs),
}

impl TokenCommand {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Generate(_) => "generate",
        }
    }

    pub(crate) async fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        match self {
            Self::Generate(args) => generate(&args, out).await,
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct GenerateArgs {
    /// Also register this SPIFFE ID for the agent that uses the token (a node entry whose
    /// parent is the token's agent ID).
    #[arg(long, value_name = "ID")]
    spiffe_id: Option<String>,
    /// How long the token stays usable: seconds or a duration such as 10m.
    #[arg(long, value_name = "DURATION", default_value = "600")]
    ttl: String,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

impl GenerateArgs {
    /// The request for these flags.
    pub(crate) fn request(&self) -> anyhow::Result<CreateJoinTokenRequest> {
        let ttl = parse::ttl_seconds(&self.ttl).context("--ttl is invalid")?;
        if ttl == 0 {
            anyhow::bail!("--ttl must be longer than zero");
        }
        let agent_id = self
            .spiffe_id
            .as_deref()
            .map(parse::spiffe_id)
            .transpose()
            .context("--spiffe-id is invalid")?;
        Ok(CreateJoinTokenRequest {
            ttl,
            token: String::new(),
            agent_id,
        })
    }
}

async fn generate(args: &GenerateArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let request = args.request()?;
    let client = args.socket.connect().await?;
    let token = client
        .agent()
        .create_join_token(request)
        .await
        .map_err(|status| rpc_error("CreateJoinToken failed", &status))?
        .into_inner();
    if args.output.is_json() {
        write_json(
            out,
            &json!({ "value": token.value, "expires_at": token.expires_at }),
        )
    } else {
        writeln!(out, "Token: {}", token.value)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use lanyard_proto::spire::api::types;

    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> super::GenerateArgs {
        let cli = Cli::try_parse_from(["lanyard", "token", "generate"].iter().chain(args))
            .expect("parses");
        match cli.command {
            Command::Token(super::TokenCommand::Generate(args)) => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn defaults_to_ten_minutes_without_an_id() {
        let request = parse(&[]).request().expect("valid");
        assert_eq!(request.ttl, 600);
        assert_eq!(request.agent_id, None);
        assert!(request.token.is_empty());
    }

    #[test]
    fn takes_a_duration_and_an_id() {
        let request = parse(&["--ttl", "1h", "--spiffe-id", "spiffe://example.org/node/a"])
            .request()
            .expect("valid");
        assert_eq!(request.ttl, 3600);
        assert_eq!(
            request.agent_id,
            Some(types::Spiffeid {
                trust_domain: "example.org".into(),
                path: "/node/a".into(),
            })
        );
    }

    #[test]
    fn rejects_bad_values() {
        let err = parse(&["--ttl", "0"]).request().expect_err("zero");
        assert_eq!(format!("{err:#}"), "--ttl must be longer than zero");
        let err = parse(&["--spiffe-id", "example.org/a"])
            .request()
            .expect_err("no scheme");
        assert!(format!("{err:#}").starts_with("--spiffe-id is invalid: "));
    }
}
