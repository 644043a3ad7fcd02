//! `lanyard helper`: a workload's SVIDs as files, for software that speaks no SPIFFE (nginx,
//! PostgreSQL, legacy daemons), doing what spiffe-helper does and with its configuration keys.
//! It holds the Workload API's X.509 stream open and, on start and on every rotation, writes
//! the certificate chain, the private key (0600) and the trust bundle (federated bundles too if
//! asked) into `cert_dir`, each file atomically (a temporary name, fsync, rename: a reader sees
//! the old file or the new one, never half of one), the key before the certificate; then it
//! tells the consumer: the first time it starts `cmd`, later it sends `renew_signal` to that
//! process or to the one in `pid_file_name`. JWT-SVIDs for configured audiences are written too
//! and fetched again at half their life, and the JWT bundle (JWKS) on every change. With
//! `--once` (or `daemon_mode = false`) it writes everything once and exits: 0 when every file
//! was written, 1 otherwise — for init containers and cron.
//!
//! For Java and other keystore readers it can also write, in the same update, a PKCS#12
//! keystore (the key with its chain under one alias) and a PKCS#12 truststore (the bundle's
//! authorities as trusted certificates), encrypted with PBES2/AES-256 and an HMAC-SHA256 MAC
//! under the password in `pkcs12_password_file`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as ProcessCommand};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, anyhow, bail};
use clap::Args;
use lanyard_proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, X509svid, X509svidRequest, X509svidResponse,
};
use serde::Deserialize;

use crate::cli::files::replace_file;
use crate::cli::logging;
use lanyard_core::keys::pem_encode;

use crate::cli::workload::{WorkloadSocketArgs, describe, pem_certificates, with_header};

/// The longest the helper waits between two attempts to reach the agent.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// `lanyard helper`
#[derive(Debug, Args)]
pub(crate) struct HelperArgs {
    /// The helper's configuration (TOML, spiffe-helper's keys).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Write the files once and exit (exit status 0 only if every file was written).
    #[arg(long)]
    once: bool,
}

/// The helper's configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HelperConfig {
    /// The agent's Workload API socket (path or `unix://` URI); defaults to
    /// `SPIFFE_ENDPOINT_SOCKET`.
    #[serde(default)]
    pub(crate) agent_address: Option<String>,
    /// The directory the files go into (created if missing).
    pub(crate) cert_dir: PathBuf,
    /// The certificate chain, leaf first (PEM).
    #[serde(default = "default_svid_file_name")]
    pub(crate) svid_file_name: String,
    /// The private key (PKCS#8 PEM).
    #[serde(default = "default_svid_key_file_name")]
    pub(crate) svid_key_file_name: String,
    /// The trust bundle (PEM).
    #[serde(default = "default_svid_bundle_file_name")]
    pub(crate) svid_bundle_file_name: String,
    /// The certificate revocation lists of the trust domain's authorities (PEM `X509 CRL`
    /// blocks, as the agent gives them), for a verifier that reads a CRL file (nginx's
    /// `ssl_crl`); written beside the bundle, with its mode.
    #[serde(default)]
    pub(crate) crl_file_name: Option<String>,
    /// Put federated trust domains' authorities in the bundle file too.
    #[serde(default)]
    pub(crate) include_federated_domains: bool,
    /// Put the intermediates in the bundle file instead of after the leaf.
    #[serde(default)]
    pub(crate) add_intermediates_to_bundle: bool,
    /// Deliver the SVID with this hint; the first one otherwise.
    #[serde(default)]
    pub(crate) hint: Option<String>,
    /// A program to start once the first files are written, and to signal on renewals.
    #[serde(default)]
    pub(crate) cmd: Option<String>,
    /// Its arguments, split like a shell's words (quotes group).
    #[serde(default)]
    pub(crate) cmd_args: Option<String>,
    /// A file holding the PID of a process to signal on renewals.
    #[serde(default)]
    pub(crate) pid_file_name: Option<PathBuf>,
    /// The signal sent on renewals (SIGHUP, SIGUSR1, SIGUSR2, SIGINT, SIGTERM, SIGQUIT).
    #[serde(default)]
    pub(crate) renew_signal: Option<String>,
    /// Keep running and follow rotations (the default); `false` is `--once`.
    #[serde(default = "default_true")]
    pub(crate) daemon_mode: bool,
    /// Mode of the certificate and bundle files.
    #[serde(default = "default_public_mode")]
    pub(crate) cert_file_mode: u32,
    /// Mode of the key file.
    #[serde(default = "default_secret_mode")]
    pub(crate) key_file_mode: u32,
    /// JWT-SVIDs to write, one file each.
    #[serde(default)]
    pub(crate) jwt_svids: Vec<JwtSvidConfig>,
    /// Mode of the JWT-SVID files.
    #[serde(default = "default_secret_mode")]
    pub(crate) jwt_svid_file_mode: u32,
    /// The JWT bundle (JWKS per trust domain, as the Workload API gives it), if wanted.
    #[serde(default)]
    pub(crate) jwt_bundle_file_name: Option<String>,
    /// Mode of the JWT bundle file.
    #[serde(default = "default_public_mode")]
    pub(crate) jwt_bundle_file_mode: u32,
    /// How long `--once` waits for the agent to issue everything (default 60 s).
    #[serde(default = "default_once_timeout", with = "humantime_serde_compat")]
    pub(crate) once_timeout: Duration,
    /// A PKCS#12 keystore with the private key and its chain (mode `key_file_mode`), if wanted.
    #[serde(default)]
    pub(crate) pkcs12_file_name: Option<String>,
    /// A PKCS#12 truststore with the bundle's authorities (mode `key_file_mode`), if wanted.
    #[serde(default)]
    pub(crate) pkcs12_truststore_file_name: Option<String>,
    /// The file whose first line is the password of both PKCS#12 files (not readable by every
    /// user); required with either of them.
    #[serde(default)]
    pub(crate) pkcs12_password_file: Option<PathBuf>,
    /// The alias of the key entry in the keystore.
    #[serde(default = "default_pkcs12_alias")]
    pub(crate) pkcs12_alias: String,
    /// The password read from `pkcs12_password_file` when the configuration was loaded.
    #[serde(skip)]
    pkcs12_password: Option<Pkcs12Password>,
}

/// The PKCS#12 password, kept out of `Debug` output.
#[derive(Clone)]
struct Pkcs12Password(String);

impl std::fmt::Debug for Pkcs12Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pkcs12Password(<redacted>)")
    }
}

/// One JWT-SVID to keep written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JwtSvidConfig {
    /// The audience.
    pub(crate) jwt_audience: String,
    /// More audiences.
    #[serde(default)]
    pub(crate) jwt_extra_audiences: Vec<String>,
    /// The file (the token alone).
    pub(crate) jwt_svid_file_name: String,
}

fn default_svid_file_name() -> String {
    "svid.pem".to_owned()
}
fn default_svid_key_file_name() -> String {
    "svid_key.pem".to_owned()
}
fn default_svid_bundle_file_name() -> String {
    "svid_bundle.pem".to_owned()
}
fn default_true() -> bool {
    true
}
fn default_public_mode() -> u32 {
    0o644
}
fn default_secret_mode() -> u32 {
    0o600
}
fn default_once_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_pkcs12_alias() -> String {
    "spiffe".to_owned()
}

/// Durations as humantime text (`"60s"`, `"2m"`).
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize as _, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

impl HelperConfig {
    /// Parses and checks a configuration, and reads the PKCS#12 password if one is needed.
    pub(crate) fn parse(text: &str) -> anyhow::Result<Self> {
        let mut config: Self = toml::from_str(text)?;
        config.check()?;
        if let Some(path) = &config.pkcs12_password_file {
            config.pkcs12_password = Some(read_password_file(path)?);
        }
        Ok(config)
    }

    fn check(&self) -> anyhow::Result<()> {
        let mut names = vec![
            ("svid_file_name", self.svid_file_name.as_str()),
            ("svid_key_file_name", self.svid_key_file_name.as_str()),
            ("svid_bundle_file_name", self.svid_bundle_file_name.as_str()),
        ];
        if let Some(name) = &self.jwt_bundle_file_name {
            names.push(("jwt_bundle_file_name", name));
        }
        if let Some(name) = &self.crl_file_name {
            names.push(("crl_file_name", name));
        }
        if let Some(name) = &self.pkcs12_file_name {
            names.push(("pkcs12_file_name", name));
        }
        if let Some(name) = &self.pkcs12_truststore_file_name {
            names.push(("pkcs12_truststore_file_name", name));
        }
        let wants_pkcs12 =
            self.pkcs12_file_name.is_some() || self.pkcs12_truststore_file_name.is_some();
        if wants_pkcs12 && self.pkcs12_password_file.is_none() {
            bail!(
                "pkcs12_file_name and pkcs12_truststore_file_name need pkcs12_password_file \
                 (a file whose first line is the password)"
            );
        }
        if !wants_pkcs12 && self.pkcs12_password_file.is_some() {
            bail!("pkcs12_password_file without pkcs12_file_name or pkcs12_truststore_file_name");
        }
        if self.pkcs12_alias.is_empty() {
            bail!("pkcs12_alias is empty");
        }
        for jwt in &self.jwt_svids {
            names.push(("jwt_svids.jwt_svid_file_name", &jwt.jwt_svid_file_name));
            if jwt.jwt_audience.is_empty() {
                bail!("jwt_svids.jwt_audience is empty");
            }
        }
        let mut seen = Vec::new();
        for (key, name) in names {
            if name.is_empty() || name == "." || name == ".." || name.contains('/') {
                bail!("{key} {name:?} must be a plain file name in cert_dir");
            }
            if seen.contains(&name) {
                bail!("{key}: {name:?} is already the name of another file");
            }
            seen.push(name);
        }
        for (key, mode) in [
            ("cert_file_mode", self.cert_file_mode),
            ("key_file_mode", self.key_file_mode),
            ("jwt_svid_file_mode", self.jwt_svid_file_mode),
            ("jwt_bundle_file_mode", self.jwt_bundle_file_mode),
        ] {
            if mode > 0o777 {
                bail!("{key} {mode:#o} is not a file mode (write it as 0o644)");
            }
        }
        for (key, mode) in [
            ("key_file_mode", self.key_file_mode),
            ("jwt_svid_file_mode", self.jwt_svid_file_mode),
        ] {
            if mode & 0o007 != 0 {
                bail!("{key} {mode:#o} lets every user read a secret; use 0o600 or 0o640");
            }
        }
        if let Some(signal) = &self.renew_signal {
            signal_named(signal)?;
        }
        if self.cmd_args.is_some() && self.cmd.is_none() {
            bail!("cmd_args without cmd");
        }
        if let Some(args) = &self.cmd_args {
            split_words(args).context("cmd_args")?;
        }
        Ok(())
    }

    fn socket(&self) -> WorkloadSocketArgs {
        WorkloadSocketArgs {
            socket: self.agent_address.clone(),
        }
    }

    fn renew_signal(&self) -> anyhow::Result<rustix::process::Signal> {
        signal_named(self.renew_signal.as_deref().unwrap_or("SIGHUP"))
    }
}

/// The first line of a PKCS#12 password file, refused when every user may read the file (like
/// a `key_file_mode` that does) or when the line is empty.
fn read_password_file(path: &Path) -> anyhow::Result<Pkcs12Password> {
    use std::os::unix::fs::PermissionsExt as _;
    let shown = path.display();
    let metadata = std::fs::metadata(path)
        .with_context(|| format!("pkcs12_password_file {shown} cannot be read"))?;
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o007 != 0 {
        bail!(
            "pkcs12_password_file {shown} has mode {mode:#o}, which lets every user read a \
             secret; chmod it to 0600 or 0640"
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("pkcs12_password_file {shown} cannot be read"))?;
    let password = text.lines().next().unwrap_or_default();
    if password.is_empty() {
        bail!("pkcs12_password_file {shown}: the first line (the password) is empty");
    }
    Ok(Pkcs12Password(password.to_owned()))
}

fn signal_named(name: &str) -> anyhow::Result<rustix::process::Signal> {
    use rustix::process::Signal;
    let upper = name.to_ascii_uppercase();
    Ok(match upper.strip_prefix("SIG").unwrap_or(&upper) {
        "HUP" => Signal::HUP,
        "USR1" => Signal::USR1,
        "USR2" => Signal::USR2,
        "INT" => Signal::INT,
        "TERM" => Signal::TERM,
        "QUIT" => Signal::QUIT,
        _ => bail!(
            "renew_signal {name:?} is not one of SIGHUP, SIGUSR1, SIGUSR2, SIGINT, SIGTERM, SIGQUIT"
        ),
    })
}

/// Splits `text` into words as a shell would without expanding anything: whitespace
/// separates, single and double quotes group, a backslash escapes the next character outside
/// single quotes.
pub(crate) fn split_words(text: &str) -> anyhow::Result<Vec<String>> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => bail!("unclosed ' in {text:?}"),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c) => word.push(c),
                            None => bail!("a lone \\ at the end of {text:?}"),
                        },
                        Some(c) => word.push(c),
                        None => bail!("unclosed \" in {text:?}"),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => word.push(c),
                    None => bail!("a lone \\ at the end of {text:?}"),
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// One file to write: its name in `cert_dir`, contents and mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileToWrite {
    pub(crate) name: String,
    pub(crate) contents: Vec<u8>,
    pub(crate) mode: u32,
}

/// The X.509 files for `response`, key first (a consumer that reloads between two renames
/// then finds a new key with the old certificate at worst, which it refuses and keeps its old
/// pair, rather than an old key with a new certificate).
pub(crate) fn x509_files(
    config: &HelperConfig,
    response: &X509svidResponse,
) -> anyhow::Result<Vec<FileToWrite>> {
    let svid = choose_svid(config, &response.svids)?;
    let chain = crate::cli::workload::split_certificates(&svid.x509_svid)?;
    let Some((leaf, intermediates)) = chain.split_first() else {
        bail!(
            "the agent sent an empty certificate chain for {}",
            svid.spiffe_id
        );
    };
    let mut certificates = pem_encode("CERTIFICATE", leaf);
    let mut bundle = String::new();
    for intermediate in intermediates {
        let pem = pem_encode("CERTIFICATE", intermediate);
        if config.add_intermediates_to_bundle {
            bundle.push_str(&pem);
        } else {
            certificates.push_str(&pem);
        }
    }
    bundle.push_str(&pem_certificates(&svid.bundle)?);
    // The authorities by trust domain, the SVID's own first, then federated ones in trust
    // domain order, so that an unchanged set writes the same files.
    let mut authorities = vec![(trust_domain_of(&svid.spiffe_id), svid.bundle.as_slice())];
    if config.include_federated_domains {
        let federated: BTreeMap<&String, &Vec<u8>> = response.federated_bundles.iter().collect();
        for (trust_domain, der) in federated {
            bundle.push_str(&pem_certificates(der)?);
            authorities.push((trust_domain_of(trust_domain), der.as_slice()));
        }
    }
    let mut files = vec![FileToWrite {
        name: config.svid_key_file_name.clone(),
        contents: pem_encode("PRIVATE KEY", &svid.x509_svid_key).into_bytes(),
        mode: config.key_file_mode,
    }];
    if let Some(name) = &config.pkcs12_file_name {
        files.push(FileToWrite {
            name: name.clone(),
            contents: pkcs12_keystore(config, &svid.x509_svid_key, &chain)
                .with_context(|| format!("the PKCS#12 keystore {name}"))?,
            mode: config.key_file_mode,
        });
    }
    files.push(FileToWrite {
        name: config.svid_file_name.clone(),
        contents: certificates.into_bytes(),
        mode: config.cert_file_mode,
    });
    files.push(FileToWrite {
        name: config.svid_bundle_file_name.clone(),
        contents: bundle.into_bytes(),
        mode: config.cert_file_mode,
    });
    if let Some(name) = &config.crl_file_name {
        let crls: String = response
            .crl
            .iter()
            .map(|der| pem_encode("X509 CRL", der))
            .collect();
        files.push(FileToWrite {
            name: name.clone(),
            contents: crls.into_bytes(),
            mode: config.cert_file_mode,
        });
    }
    if let Some(name) = &config.pkcs12_truststore_file_name {
        files.push(FileToWrite {
            name: name.clone(),
            contents: pkcs12_truststore(config, &authorities)
                .with_context(|| format!("the PKCS#12 truststore {name}"))?,
            mode: config.key_file_mode,
        });
    }
    Ok(files)
}

/// `example.org` of `spiffe://example.org/...` (and of a bare trust domain name).
fn trust_domain_of(id: &str) -> &str {
    let rest = id.strip_prefix("spiffe://").unwrap_or(id);
    rest.split('/').next().unwrap_or(rest)
}

fn pkcs12_password(config: &HelperConfig) -> anyhow::Result<&str> {
    config
        .pkcs12_password
        .as_ref()
        .map(|password| password.0.as_str())
        .ok_or_else(|| anyhow!("no pkcs12_password_file was read"))
}

/// A PKCS#12 keystore holding the PKCS#8 `key` and its `chain` (leaf first) under
/// `pkcs12_alias`: PBES2 with AES-256-CBC and PBKDF2-HMAC-SHA256, HMAC-SHA256 MAC, as Java's
/// own defaults. The salts are random, so the bytes differ for the same SVID.
fn pkcs12_keystore(
    config: &HelperConfig,
    key: &[u8],
    chain: &[Vec<u8>],
) -> anyhow::Result<Vec<u8>> {
    use p12_keystore::{Certificate, KeyStore, KeyStoreEntry, PrivateKey, PrivateKeyChain};
    let key = PrivateKey::from_der(key).context("the SVID's private key")?;
    let certificates = chain
        .iter()
        .map(|der| Certificate::from_der(der))
        .collect::<Result<Vec<_>, _>>()
        .context("the SVID's certificate chain")?;
    let mut store = KeyStore::new();
    store.add_entry(
        &config.pkcs12_alias,
        KeyStoreEntry::PrivateKeyChain(PrivateKeyChain::new(
            config.pkcs12_alias.as_str(),
            key,
            certificates,
        )),
    );
    write_pkcs12(config, &store)
}

/// A PKCS#12 truststore with every authority as a trusted certificate entry, aliased
/// `<trust domain>-<n>` (from 1).
fn pkcs12_truststore(
    config: &HelperConfig,
    authorities: &[(&str, &[u8])],
) -> anyhow::Result<Vec<u8>> {
    use p12_keystore::{Certificate, KeyStore, KeyStoreEntry};
    let mut store = KeyStore::new();
    for (trust_domain, bundle) in authorities {
        let certificates = crate::cli::workload::split_certificates(bundle)?;
        for (n, der) in certificates.iter().enumerate() {
            let certificate = Certificate::from_der(der)
                .with_context(|| format!("an authority of {trust_domain}"))?;
            store.add_entry(
                &format!("{trust_domain}-{}", n + 1),
                KeyStoreEntry::Certificate(certificate),
            );
        }
    }
    write_pkcs12(config, &store)
}

fn write_pkcs12(config: &HelperConfig, store: &p12_keystore::KeyStore) -> anyhow::Result<Vec<u8>> {
    use p12_keystore::{EncryptionAlgorithm, MacAlgorithm};
    Ok(store
        .writer(pkcs12_password(config)?)
        .encryption_algorithm(EncryptionAlgorithm::PbeWithHmacSha256AndAes256)
        .mac_algorithm(MacAlgorithm::HmacSha256)
        .write()?)
}

/// Whether `new` holds the same files as `old`, the PKCS#12 files aside: their random salts
/// make every encoding differ, and their contents follow from the PEM files'.
fn same_files(config: &HelperConfig, old: &[FileToWrite], new: &[FileToWrite]) -> bool {
    let is_pkcs12 = |file: &FileToWrite| {
        Some(file.name.as_str()) == config.pkcs12_file_name.as_deref()
            || Some(file.name.as_str()) == config.pkcs12_truststore_file_name.as_deref()
    };
    old.len() == new.len()
        && old
            .iter()
            .zip(new)
            .all(|(old, new)| old == new || (old.name == new.name && is_pkcs12(old)))
}

/// The SVID with the configured hint, else the first (the Workload API's default identity).
fn choose_svid<'a>(config: &HelperConfig, svids: &'a [X509svid]) -> anyhow::Result<&'a X509svid> {
    match &config.hint {
        Some(hint) => svids
            .iter()
            .find(|svid| &svid.hint == hint)
            .ok_or_else(|| anyhow!("no SVID has the hint {hint:?}")),
        None => svids
            .first()
            .ok_or_else(|| anyhow!("the agent sent no SVID")),
    }
}

/// Writes `files` into `dir`, each atomically.
fn write_files(dir: &Path, files: &[FileToWrite]) -> anyhow::Result<()> {
    for file in files {
        replace_file(&dir.join(&file.name), &file.contents, file.mode)?;
    }
    Ok(())
}

/// The process the helper tells about renewals: the one it started, or the one in the PID
/// file.
#[derive(Debug, Default)]
struct Consumer {
    child: Option<Child>,
}

impl Consumer {
    /// After files were written: the first time starts `cmd`; then signals it, or the process
    /// in `pid_file_name`.
    fn notify(&mut self, config: &HelperConfig) -> anyhow::Result<()> {
        if let Some(cmd) = &config.cmd {
            match &mut self.child {
                None => {
                    let args = config
                        .cmd_args
                        .as_deref()
                        .map(split_words)
                        .transpose()?
                        .unwrap_or_default();
                    let child = ProcessCommand::new(cmd)
                        .args(&args)
                        .spawn()
                        .with_context(|| format!("starting {cmd}"))?;
                    tracing::info!(cmd, pid = child.id(), "started the consumer");
                    self.child = Some(child);
                    return Ok(());
                }
                Some(child) => {
                    if let Some(status) = child.try_wait().context("checking the consumer")? {
                        bail!("{cmd} exited ({status}); nothing to tell about the renewal");
                    }
                    let pid = i32::try_from(child.id()).context("the consumer's PID")?;
                    send_signal(pid, config)?;
                }
            }
        }
        if let Some(pid_file) = &config.pid_file_name {
            let text = std::fs::read_to_string(pid_file)
                .with_context(|| format!("reading {}", pid_file.display()))?;
            let pid: i32 = text
                .trim()
                .parse()
                .ok()
                .filter(|pid| *pid > 0)
                .ok_or_else(|| anyhow!("{} does not hold a PID: {text:?}", pid_file.display()))?;
            send_signal(pid, config)?;
        }
        Ok(())
    }

    /// Ends the process the helper started, if it runs.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id())
                && let Some(pid) = rustix::process::Pid::from_raw(pid)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let _ = child.wait();
        }
    }
}

fn send_signal(pid: i32, config: &HelperConfig) -> anyhow::Result<()> {
    let signal = config.renew_signal()?;
    let target = rustix::process::Pid::from_raw(pid).ok_or_else(|| anyhow!("PID {pid}"))?;
    rustix::process::kill_process(target, signal)
        .with_context(|| format!("signalling process {pid}"))?;
    tracing::info!(pid, ?signal, "signalled the consumer");
    Ok(())
}

/// The JWT-SVID files and when the first of them reaches half its life.
async fn jwt_files(
    config: &HelperConfig,
    socket: &WorkloadSocketArgs,
) -> anyhow::Result<(Vec<FileToWrite>, SystemTime)> {
    let mut files = Vec::new();
    let mut refresh_at = SystemTime::now() + Duration::from_secs(3600);
    if config.jwt_svids.is_empty() {
        return Ok((files, refresh_at));
    }
    let mut client = socket.connect().await?;
    for jwt in &config.jwt_svids {
        let mut audience = vec![jwt.jwt_audience.clone()];
        audience.extend(jwt.jwt_extra_audiences.iter().cloned());
        let response = client
            .fetch_jwtsvid(with_header(JwtsvidRequest {
                audience,
                spiffe_id: String::new(),
            }))
            .await
            .map_err(|s| describe(&s))?
            .into_inner();
        let svids = response.svids;
        let chosen = match &config.hint {
            Some(hint) => svids.iter().find(|s| &s.hint == hint),
            None => svids.first(),
        }
        .ok_or_else(|| anyhow!("no JWT-SVID for audience {}", jwt.jwt_audience))?;
        let now = SystemTime::now();
        let half_life = jwt_half_life(&chosen.svid, now)?;
        refresh_at = refresh_at.min(half_life);
        files.push(FileToWrite {
            name: jwt.jwt_svid_file_name.clone(),
            contents: chosen.svid.clone().into_bytes(),
            mode: config.jwt_svid_file_mode,
        });
    }
    Ok((files, refresh_at))
}

/// When a JWT-SVID reaches half of what is left of its life at `now`, from its `exp` claim.
fn jwt_half_life(token: &str, now: SystemTime) -> anyhow::Result<SystemTime> {
    use base64::Engine as _;
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| anyhow!("the agent sent a malformed JWT-SVID"))?;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .context("the JWT-SVID's payload")?,
    )
    .context("the JWT-SVID's claims")?;
    let exp = claims["exp"]
        .as_u64()
        .ok_or_else(|| anyhow!("the JWT-SVID has no exp"))?;
    let expires = SystemTime::UNIX_EPOCH + Duration::from_secs(exp);
    let left = expires.duration_since(now).unwrap_or_default();
    Ok(now + left / 2)
}

/// The JWT bundle file: `{"<trust domain>": <JWKS>, …}` as the Workload API gives it.
async fn jwt_bundle_file(
    config: &HelperConfig,
    socket: &WorkloadSocketArgs,
) -> anyhow::Result<Option<FileToWrite>> {
    let Some(name) = &config.jwt_bundle_file_name else {
        return Ok(None);
    };
    let mut client = socket.connect().await?;
    let mut stream = client
        .fetch_jwt_bundles(with_header(JwtBundlesRequest {}))
        .await
        .map_err(|s| describe(&s))?
        .into_inner();
    let response = stream
        .message()
        .await
        .map_err(|s| describe(&s))?
        .ok_or_else(|| anyhow!("the agent closed the JWT bundle stream"))?;
    let mut bundles = serde_json::Map::new();
    for (trust_domain, jwks) in &response.bundles {
        let jwks: serde_json::Value =
            serde_json::from_slice(jwks).context("the agent's JWT bundle")?;
        bundles.insert(trust_domain.clone(), jwks);
    }
    Ok(Some(FileToWrite {
        name: name.clone(),
        contents: serde_json::Value::Object(bundles).to_string().into_bytes(),
        mode: config.jwt_bundle_file_mode,
    }))
}

/// Runs the helper.
pub(crate) async fn run(args: HelperArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let config = HelperConfig::parse(&text).with_context(|| args.config.display().to_string())?;
    std::fs::create_dir_all(&config.cert_dir)
        .with_context(|| format!("creating {}", config.cert_dir.display()))?;
    if args.once || !config.daemon_mode {
        tokio::time::timeout(config.once_timeout, write_once(&config))
            .await
            .map_err(|_| {
                anyhow!(
                    "the agent issued nothing within {:?} (once_timeout)",
                    config.once_timeout
                )
            })??;
        writeln!(out, "wrote the SVID files to {}", config.cert_dir.display())?;
        return Ok(());
    }
    let signals = logging::Signals::register()?;
    let _ = logging::init("info", "text");
    let shutdown = signals.handle(|| tracing::info!("SIGHUP: nothing to reload"));
    let mut consumer = Consumer::default();
    let result = tokio::select! {
        result = follow(&config, &mut consumer) => result,
        () = shutdown => Ok(()),
    };
    consumer.stop();
    result
}

/// `--once`: the X.509 files, the JWT-SVIDs and the JWT bundle, retrying while the agent has
/// nothing for this process yet (an init container may start before its entry reaches the
/// agent).
async fn write_once(config: &HelperConfig) -> anyhow::Result<()> {
    let socket = config.socket();
    let mut delay = Duration::from_millis(250);
    loop {
        match once_attempt(config, &socket).await {
            Ok(()) => return Ok(()),
            Err(error) => {
                tracing::debug!(%error, "not yet");
                eprintln_once(&error);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn once_attempt(config: &HelperConfig, socket: &WorkloadSocketArgs) -> anyhow::Result<()> {
    let response = crate::cli::workload::first_x509(socket).await?;
    let mut files = x509_files(config, &response)?;
    files.extend(jwt_files(config, socket).await?.0);
    files.extend(jwt_bundle_file(config, socket).await?);
    write_files(&config.cert_dir, &files)
}

/// The first failure of `--once` on stderr (later ones repeat it).
#[allow(clippy::print_stderr)]
fn eprintln_once(error: &anyhow::Error) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        eprintln!("waiting for the agent: {error:#}");
    }
}

/// Daemon mode: follows the X.509 stream and the JWT refresh times until stopped, reconnecting
/// with back-off when the agent goes away.
async fn follow(config: &HelperConfig, consumer: &mut Consumer) -> anyhow::Result<()> {
    let socket = config.socket();
    let mut delay = Duration::from_millis(500);
    loop {
        match follow_stream(config, &socket, consumer).await {
            Ok(()) => tracing::warn!("the agent closed the stream; reconnecting"),
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), retry_in = ?delay, "the Workload API failed")
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RETRY);
    }
}

async fn follow_stream(
    config: &HelperConfig,
    socket: &WorkloadSocketArgs,
    consumer: &mut Consumer,
) -> anyhow::Result<()> {
    let mut client = socket.connect().await?;
    let mut stream = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .map_err(|s| describe(&s))?
        .into_inner();
    let mut last_written: Option<Vec<FileToWrite>> = None;
    let mut jwt_refresh = tokio::time::Instant::now();
    loop {
        tokio::select! {
            message = stream.message() => {
                let Some(response) = message.map_err(|s| describe(&s))? else {
                    return Ok(());
                };
                let mut files = x509_files(config, &response)?;
                files.extend(jwt_bundle_file(config, socket).await?);
                if last_written.as_ref().is_some_and(|old| same_files(config, old, &files)) {
                    continue;
                }
                write_files(&config.cert_dir, &files)?;
                let serial = response.svids.first().map(|s| s.spiffe_id.as_str()).unwrap_or_default();
                tracing::info!(spiffe_id = serial, dir = %config.cert_dir.display(), "wrote the X.509-SVID files");
                last_written = Some(files);
                if let Err(error) = consumer.notify(config) {
                    tracing::error!(error = %format!("{error:#}"), "telling the consumer about the renewal failed");
                }
            }
            () = tokio::time::sleep_until(jwt_refresh), if !config.jwt_svids.is_empty() => {
                let (files, refresh_at) = jwt_files(config, socket).await?;
                write_files(&config.cert_dir, &files)?;
                tracing::info!(count = files.len(), "wrote the JWT-SVID files");
                let wait = refresh_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .max(Duration::from_secs(1));
                jwt_refresh = tokio::time::Instant::now() + wait;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use lanyard_proto::workload::X509svid;

    use super::*;

    fn config(extra: &str) -> HelperConfig {
        HelperConfig::parse(&format!("cert_dir = \"/certs\"\n{extra}")).unwrap()
    }

    #[test]
    fn spiffe_helper_keys_with_their_defaults() {
        let c = config("");
        assert_eq!(c.svid_file_name, "svid.pem");
        assert_eq!(c.svid_key_file_name, "svid_key.pem");
        assert_eq!(c.svid_bundle_file_name, "svid_bundle.pem");
        assert_eq!((c.cert_file_mode, c.key_file_mode), (0o644, 0o600));
        assert!(c.daemon_mode);
        assert_eq!(c.once_timeout, Duration::from_secs(60));
        let c = config(
            "cmd = \"nginx\"\ncmd_args = \"-g 'daemon off;' -c /etc/nginx/nginx.conf\"\n\
             renew_signal = \"SIGUSR1\"\n\
             [[jwt_svids]]\njwt_audience = \"vault\"\njwt_svid_file_name = \"vault.jwt\"\n",
        );
        assert_eq!(c.jwt_svids[0].jwt_audience, "vault");
        assert_eq!(c.renew_signal().unwrap(), rustix::process::Signal::USR1);
    }

    #[test]
    fn the_shipped_example_parses() {
        let c = HelperConfig::parse(include_str!("../../../../deploy/helper.toml")).unwrap();
        assert_eq!(c.cmd.as_deref(), Some("/usr/sbin/nginx"));
        assert_eq!(
            split_words(c.cmd_args.as_deref().unwrap()).unwrap(),
            ["-g", "daemon off;"]
        );
        assert_eq!(c.renew_signal().unwrap(), rustix::process::Signal::HUP);
    }

    #[test]
    fn bad_configurations_are_refused_by_name() {
        for (bad, expected) in [
            ("svid_file_name = \"../etc/passwd\"\n", "plain file name"),
            ("svid_file_name = \"svid_key.pem\"\n", "already the name"),
            ("key_file_mode = 0o644\n", "lets every user read a secret"),
            ("cert_file_mode = 0o1777\n", "not a file mode"),
            ("renew_signal = \"SIGKILL\"\n", "is not one of"),
            ("cmd_args = \"-x\"\n", "cmd_args without cmd"),
            ("cmd = \"x\"\ncmd_args = \"'open\"\n", "unclosed"),
            ("svid_path = \"x\"\n", "unknown field"),
        ] {
            let error = HelperConfig::parse(&format!("cert_dir = \"/c\"\n{bad}"))
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default();
            assert!(error.contains(expected), "{bad}: {error}");
        }
    }

    #[test]
    fn words_split_like_a_shell_without_expansion() {
        assert_eq!(
            split_words(r#"-g 'daemon off;' -c "/a b/c" x\ y $HOME"#).unwrap(),
            ["-g", "daemon off;", "-c", "/a b/c", "x y", "$HOME"]
        );
        assert_eq!(split_words("  ").unwrap(), Vec::<String>::new());
        assert_eq!(split_words("''").unwrap(), [""]);
    }

    fn der(tag: u8) -> Vec<u8> {
        // A DER SEQUENCE with one byte of content: enough for the splitter.
        vec![0x30, 0x01, tag]
    }

    fn response() -> X509svidResponse {
        X509svidResponse {
            svids: vec![
                X509svid {
                    spiffe_id: "spiffe://example.org/a".into(),
                    x509_svid: [der(1), der(2)].concat(),
                    x509_svid_key: vec![9, 9],
                    bundle: der(3),
                    hint: String::new(),
                },
                X509svid {
                    spiffe_id: "spiffe://example.org/b".into(),
                    x509_svid: der(4),
                    x509_svid_key: vec![8],
                    bundle: der(3),
                    hint: "internal".into(),
                },
            ],
            federated_bundles: [("spiffe://b.org".to_owned(), der(5))].into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_crls_are_written_beside_the_bundle_when_asked_for() {
        let mut with_crls = response();
        with_crls.crl = vec![vec![0x30, 1, 2], vec![0x30, 3, 4]];
        let files = x509_files(&config("crl_file_name = \"crl.pem\"\n"), &with_crls).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            ["svid_key.pem", "svid.pem", "svid_bundle.pem", "crl.pem"]
        );
        assert_eq!(files[3].mode, 0o644);
        let expected = format!(
            "{}{}",
            pem_encode("X509 CRL", &[0x30, 1, 2]),
            pem_encode("X509 CRL", &[0x30, 3, 4])
        );
        assert_eq!(files[3].contents, expected.into_bytes());
        // Without the key, no CRL file.
        let files = x509_files(&config(""), &with_crls).unwrap();
        assert!(files.iter().all(|f| f.name != "crl.pem"));
    }

    #[test]
    fn the_files_are_the_key_first_then_the_chain_then_the_bundle() {
        let files = x509_files(&config(""), &response()).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["svid_key.pem", "svid.pem", "svid_bundle.pem"]);
        assert_eq!(files[0].mode, 0o600);
        assert_eq!(
            files[0].contents,
            pem_encode("PRIVATE KEY", &[9, 9]).into_bytes()
        );
        let chain = String::from_utf8(files[1].contents.clone()).unwrap();
        assert_eq!(
            chain.matches("BEGIN CERTIFICATE").count(),
            2,
            "leaf and intermediate"
        );
        let bundle = String::from_utf8(files[2].contents.clone()).unwrap();
        assert_eq!(
            bundle.matches("BEGIN CERTIFICATE").count(),
            1,
            "no federated bundle"
        );

        let moved = x509_files(
            &config("add_intermediates_to_bundle = true\ninclude_federated_domains = true\n"),
            &response(),
        )
        .unwrap();
        let chain = String::from_utf8(moved[1].contents.clone()).unwrap();
        let bundle = String::from_utf8(moved[2].contents.clone()).unwrap();
        assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 1);
        assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 3);

        let hinted = x509_files(&config("hint = \"internal\"\n"), &response()).unwrap();
        assert_eq!(
            hinted[0].contents,
            pem_encode("PRIVATE KEY", &[8]).into_bytes()
        );
        let missing = x509_files(&config("hint = \"nope\"\n"), &response()).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
    }

    /// A real chain: a root, an intermediate and a leaf with its PKCS#8 key, as the agent
    /// sends them (the chain and the bundle as concatenated DER).
    struct RealSvid {
        leaf: Vec<u8>,
        intermediate: Vec<u8>,
        root: Vec<u8>,
        key: Vec<u8>,
    }

    fn real_svid() -> RealSvid {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_params = |name: &str| {
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
        };
        let root_key = KeyPair::generate().unwrap();
        let root = ca_params("root").self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(ca_params("root"), root_key);
        let intermediate_key = KeyPair::generate().unwrap();
        let intermediate = ca_params("intermediate")
            .signed_by(&intermediate_key, &root_issuer)
            .unwrap();
        let intermediate_issuer = Issuer::new(ca_params("intermediate"), intermediate_key);
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf_params = CertificateParams::default();
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "leaf");
        let leaf = leaf_params
            .signed_by(&leaf_key, &intermediate_issuer)
            .unwrap();
        RealSvid {
            leaf: leaf.der().to_vec(),
            intermediate: intermediate.der().to_vec(),
            root: root.der().to_vec(),
            key: leaf_key.serialize_der(),
        }
    }

    fn real_response(svid: &RealSvid, federated: &[u8]) -> X509svidResponse {
        X509svidResponse {
            svids: vec![X509svid {
                spiffe_id: "spiffe://example.org/app".into(),
                x509_svid: [svid.leaf.clone(), svid.intermediate.clone()].concat(),
                x509_svid_key: svid.key.clone(),
                bundle: svid.root.clone(),
                hint: String::new(),
            }],
            federated_bundles: [("spiffe://partner.org".to_owned(), federated.to_vec())].into(),
            ..Default::default()
        }
    }

    /// A password file with `mode` in `dir`.
    fn password_file(dir: &Path, text: &str, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let path = dir.join("p12.pass");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn pkcs12_config(dir: &Path, extra: &str) -> HelperConfig {
        let password = password_file(dir, "s3cret pass\nignored\n", 0o600);
        config(&format!(
            "pkcs12_file_name = \"svid.p12\"\npkcs12_truststore_file_name = \"truststore.p12\"\n\
             pkcs12_password_file = {}\n{extra}",
            toml::Value::String(password.display().to_string())
        ))
    }

    fn certificate_ders(certificates: &[p12_keystore::Certificate]) -> Vec<Vec<u8>> {
        certificates.iter().map(|c| c.as_der().to_vec()).collect()
    }

    #[test]
    fn the_keystore_holds_the_key_and_chain_and_the_truststore_the_authorities() {
        use p12_keystore::{KeyStore, KeyStoreEntry, Pkcs12ImportPolicy};
        let dir = tempfile::tempdir().unwrap();
        let svid = real_svid();
        let partner = real_svid();
        let response = real_response(&svid, &partner.root);

        let files = x509_files(&pkcs12_config(dir.path(), ""), &response).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "svid_key.pem",
                "svid.p12",
                "svid.pem",
                "svid_bundle.pem",
                "truststore.p12"
            ]
        );
        assert_eq!(files[1].mode, 0o600);
        assert_eq!(files[4].mode, 0o600);

        let keystore = KeyStore::from_pkcs12(
            &files[1].contents,
            "s3cret pass",
            Pkcs12ImportPolicy::Strict,
        )
        .unwrap();
        assert_eq!(keystore.entries_len(), 1);
        let Some(KeyStoreEntry::PrivateKeyChain(chain)) = keystore.entry("spiffe") else {
            panic!("no key entry under the alias: {keystore:?}");
        };
        assert_eq!(chain.key().as_der(), svid.key);
        assert_eq!(
            certificate_ders(chain.certs()),
            [svid.leaf.clone(), svid.intermediate.clone()],
            "leaf, then intermediate"
        );
        assert!(
            KeyStore::from_pkcs12(&files[1].contents, "wrong", Pkcs12ImportPolicy::Strict).is_err()
        );

        let truststore = KeyStore::from_pkcs12(
            &files[4].contents,
            "s3cret pass",
            Pkcs12ImportPolicy::Strict,
        )
        .unwrap();
        let trusted: Vec<(&str, Vec<u8>)> = truststore
            .entries()
            .map(|(alias, entry)| match entry {
                KeyStoreEntry::Certificate(c) => (alias.as_str(), c.as_der().to_vec()),
                other => panic!("{alias} is not a trusted certificate: {other:?}"),
            })
            .collect();
        assert_eq!(trusted, [("example.org-1", svid.root.clone())]);

        // Federated authorities join the truststore as they join the PEM bundle.
        let files = x509_files(
            &pkcs12_config(
                dir.path(),
                "include_federated_domains = true\npkcs12_alias = \"app\"\n",
            ),
            &response,
        )
        .unwrap();
        let keystore = KeyStore::from_pkcs12(
            &files[1].contents,
            "s3cret pass",
            Pkcs12ImportPolicy::Strict,
        )
        .unwrap();
        assert!(matches!(
            keystore.entry("app"),
            Some(KeyStoreEntry::PrivateKeyChain(_))
        ));
        let truststore = KeyStore::from_pkcs12(
            &files[4].contents,
            "s3cret pass",
            Pkcs12ImportPolicy::Strict,
        )
        .unwrap();
        let trusted: Vec<(&str, Vec<u8>)> = truststore
            .entries()
            .filter_map(|(alias, entry)| match entry {
                KeyStoreEntry::Certificate(c) => Some((alias.as_str(), c.as_der().to_vec())),
                _ => None,
            })
            .collect();
        assert_eq!(
            trusted,
            [
                ("example.org-1", svid.root.clone()),
                ("partner.org-1", partner.root.clone())
            ]
        );

        // Without the PKCS#12 keys, the files are the PEM files alone.
        let plain = x509_files(&config(""), &response).unwrap();
        assert_eq!(plain.len(), 3);
    }

    #[test]
    fn an_unchanged_svid_is_not_written_again_despite_new_pkcs12_salts() {
        let dir = tempfile::tempdir().unwrap();
        let config = pkcs12_config(dir.path(), "");
        let svid = real_svid();
        let first = x509_files(&config, &real_response(&svid, &svid.root)).unwrap();
        let again = x509_files(&config, &real_response(&svid, &svid.root)).unwrap();
        assert_ne!(first[1].contents, again[1].contents, "fresh salts");
        assert!(same_files(&config, &first, &again));
        let rotated = x509_files(&config, &real_response(&real_svid(), &svid.root)).unwrap();
        assert!(!same_files(&config, &first, &rotated));
    }

    #[test]
    fn pkcs12_password_files_are_checked_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let parse = |extra: &str| {
            HelperConfig::parse(&format!(
                "cert_dir = \"/c\"\npkcs12_file_name = \"svid.p12\"\n{extra}"
            ))
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default()
        };
        let quoted = |path: &Path| toml::Value::String(path.display().to_string()).to_string();

        assert!(parse("").contains("need pkcs12_password_file"));
        let missing = dir.path().join("absent.pass");
        let error = parse(&format!("pkcs12_password_file = {}", quoted(&missing)));
        assert!(
            error.contains(&missing.display().to_string()) && error.contains("cannot be read"),
            "{error}"
        );
        let open = password_file(dir.path(), "pw\n", 0o644);
        let error = parse(&format!("pkcs12_password_file = {}", quoted(&open)));
        assert!(
            error.contains(&open.display().to_string())
                && error.contains("lets every user read a secret"),
            "{error}"
        );
        let empty = password_file(dir.path(), "\nsecond\n", 0o600);
        let error = parse(&format!("pkcs12_password_file = {}", quoted(&empty)));
        assert!(error.contains("is empty"), "{error}");
        let good = password_file(dir.path(), "pw\n", 0o640);
        assert_eq!(
            parse(&format!("pkcs12_password_file = {}", quoted(&good))),
            ""
        );
        let error = parse(&format!(
            "pkcs12_password_file = {}\npkcs12_alias = \"\"",
            quoted(&good)
        ));
        assert!(error.contains("pkcs12_alias is empty"), "{error}");
        let error = HelperConfig::parse(&format!(
            "cert_dir = \"/c\"\npkcs12_password_file = {}",
            quoted(&good)
        ))
        .unwrap_err();
        assert!(
            error.to_string().contains("without pkcs12_file_name"),
            "{error}"
        );
        let error = parse(&format!(
            "pkcs12_password_file = {}\npkcs12_truststore_file_name = \"svid.p12\"",
            quoted(&good)
        ));
        assert!(error.contains("already the name"), "{error}");
        assert!(!format!("{:?}", pkcs12_config(dir.path(), "")).contains("s3cret"));
    }

    /// Set to `1` to let the keytool test pass on a machine without a JDK.
    const SKIP_JAVA_VAR: &str = "LANYARD_SKIP_JAVA";

    /// `keytool`'s output for `args`, or `None` (with the reason on stderr) when there is no
    /// keytool and `LANYARD_SKIP_JAVA=1`.
    #[allow(clippy::print_stderr)]
    fn keytool(args: &[&str]) -> Option<String> {
        let hint = format!(
            "the PKCS#12 test needs a JDK's keytool on PATH (Debian/Ubuntu: `apt-get install \
             openjdk-17-jdk-headless`); set {SKIP_JAVA_VAR}=1 to skip it"
        );
        let output = match ProcessCommand::new("keytool")
            .args(args)
            .env_remove("JAVA_TOOL_OPTIONS")
            .stdin(std::process::Stdio::null())
            .output()
        {
            Ok(output) => output,
            Err(e) if std::env::var(SKIP_JAVA_VAR).as_deref() == Ok("1") => {
                eprintln!("skipped: cannot run `keytool` ({e}) and {SKIP_JAVA_VAR}=1");
                return None;
            }
            Err(e) => panic!("cannot run `keytool` ({e}): {hint}"),
        };
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "keytool {}: {}\n{stdout}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        Some(stdout)
    }

    #[test]
    fn java_keytool_reads_the_keystore_and_the_truststore() {
        let dir = tempfile::tempdir().unwrap();
        let config = pkcs12_config(dir.path(), "pkcs12_alias = \"workload\"\n");
        let svid = real_svid();
        let files = x509_files(&config, &real_response(&svid, &svid.root)).unwrap();
        write_files(dir.path(), &files).unwrap();
        let path = |name: &str| dir.path().join(name).display().to_string();
        let list = |file: &str, verbose: bool| {
            let store = path(file);
            let mut args = vec!["-list"];
            if verbose {
                args.push("-v");
            }
            args.extend([
                "-keystore",
                &store,
                "-storetype",
                "PKCS12",
                "-storepass",
                "s3cret pass",
            ]);
            keytool(&args)
        };
        let Some(keystore) = list("svid.p12", true) else {
            return;
        };
        assert!(
            keystore.contains("Your keystore contains 1 entry"),
            "{keystore}"
        );
        assert!(keystore.contains("Alias name: workload"), "{keystore}");
        assert!(
            keystore.contains("Entry type: PrivateKeyEntry"),
            "{keystore}"
        );
        assert!(
            keystore.contains("Certificate chain length: 2"),
            "{keystore}"
        );
        let owners: Vec<&str> = keystore
            .lines()
            .filter_map(|line| line.strip_prefix("Owner: "))
            .collect();
        assert_eq!(owners, ["CN=leaf", "CN=intermediate"], "{keystore}");

        let Some(truststore) = list("truststore.p12", false) else {
            return;
        };
        assert!(
            truststore.contains("Your keystore contains 1 entry"),
            "{truststore}"
        );
        assert!(
            truststore.contains("example.org-1,") && truststore.contains("trustedCertEntry"),
            "{truststore}"
        );
    }

    #[test]
    fn a_jwt_is_refreshed_at_half_of_what_is_left() {
        use base64::Engine as _;
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"exp":1600}"#);
        let token = format!("e30.{claims}.sig");
        assert_eq!(
            jwt_half_life(&token, now).unwrap(),
            now + Duration::from_secs(300)
        );
        assert!(jwt_half_life("garbage", now).is_err());
    }
}
