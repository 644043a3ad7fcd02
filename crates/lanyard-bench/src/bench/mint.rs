//! `mint`: X.509-SVID minting from a CSR (CSR signature check plus certificate signature)
//! per core, against the raw ring P-256 sign+verify that is its cryptographic floor.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use lanyard_core::keys::{KeyPair, KeyType};
use lanyard_core::x509::{CaSubject, SvidParams, X509Ca};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _};

use crate::harness::trust_domain;
use crate::report::{Chart, ChartKind, Report, Series};
use crate::stats::per_second;

/// What later benchmarks compare with: single-thread rates measured here.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ceiling {
    /// X.509-SVIDs minted from CSRs per second on one thread.
    pub(crate) mint_per_core: f64,
}

/// Runs `op` on `threads` threads for `duration`; returns operations per second.
pub(crate) fn run_threads<S, F>(threads: usize, duration: Duration, setup: S) -> anyhow::Result<f64>
where
    S: Fn() -> anyhow::Result<F> + Sync,
    F: FnMut() -> anyhow::Result<()>,
{
    let count = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let mut handles = Vec::new();
        for _ in 0..threads {
            let count = &count;
            let setup = &setup;
            handles.push(scope.spawn(move || -> anyhow::Result<()> {
                let mut op = setup()?;
                let deadline = Instant::now() + duration;
                let mut n = 0u64;
                while Instant::now() < deadline {
                    op()?;
                    n += 1;
                }
                count.fetch_add(n, Ordering::Relaxed);
                Ok(())
            }));
        }
        for handle in handles {
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("a benchmark thread panicked"))??;
        }
        Ok(())
    })?;
    Ok(per_second(count.load(Ordering::Relaxed), started.elapsed()))
}

/// One raw P-256 ECDSA signature and one verification, as a certificate mint from a CSR
/// needs (verify the CSR, sign the certificate).
fn raw_sign_verify() -> anyhow::Result<impl FnMut() -> anyhow::Result<()>> {
    let rng = SystemRandom::new();
    let alg = &signature::ECDSA_P256_SHA256_ASN1_SIGNING;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(|e| anyhow::anyhow!("{e}"))?;
    let key =
        EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).map_err(|e| anyhow::anyhow!("{e}"))?;
    let public = key.public_key().as_ref().to_vec();
    // About the size of an SVID's to-be-signed certificate.
    let message = [0x5au8; 400];
    Ok(move || {
        let sig = key
            .sign(&rng, &message)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, &public)
            .verify(&message, sig.as_ref())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    })
}

/// One raw ES256 signature (fixed-size r‖s, as JWS uses).
pub(crate) fn raw_es256_sign() -> anyhow::Result<impl FnMut() -> anyhow::Result<()>> {
    let rng = SystemRandom::new();
    let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(|e| anyhow::anyhow!("{e}"))?;
    let key =
        EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).map_err(|e| anyhow::anyhow!("{e}"))?;
    // About the size of a JWT-SVID's signing input.
    let message = [0x5au8; 300];
    Ok(move || {
        key.sign(&rng, &message)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    })
}

/// A CA and a CSR, then per call: verify the CSR and mint an SVID for its key.
fn mint_from_csr(ca: Arc<X509Ca>) -> anyhow::Result<impl FnMut() -> anyhow::Result<()>> {
    let key = KeyPair::generate(KeyType::EcP256)?;
    let csr = lanyard_core::x509::build_csr(&key, None)?;
    let id = lanyard_core::SpiffeId::from_path(&trust_domain(), "/bench/workload")?;
    Ok(move || {
        let verified = lanyard_core::x509::parse_csr(&csr)?;
        let params = SvidParams::new(
            id.clone(),
            verified.public_key_der().to_vec(),
            Duration::from_secs(3600),
        );
        ca.mint_svid(&params, SystemTime::now())?;
        Ok(())
    })
}

/// Runs the benchmark and returns the ceiling the others compare with.
pub(crate) fn run(report: &mut Report, duration: Duration) -> anyhow::Result<Ceiling> {
    let ca = Arc::new(X509Ca::self_signed(
        &trust_domain(),
        KeyPair::generate(KeyType::EcP256)?,
        &CaSubject::default(),
        SystemTime::now() - Duration::from_secs(60),
        Duration::from_secs(24 * 3600),
    )?);
    let mut bench = report.bench("mint");
    let mut mint_rates = Vec::new();
    let mut raw_rates = Vec::new();
    for threads in [1usize, 2] {
        let raw = run_threads(threads, duration, raw_sign_verify)?;
        let mint = run_threads(threads, duration, || mint_from_csr(Arc::clone(&ca)))?;
        bench.versus(
            &format!("threads_{threads}.svids_per_sec"),
            &format!("X.509-SVIDs minted from CSRs per second, {threads} thread(s)"),
            mint,
            "/s",
            ("raw ring P-256 sign+verify", raw, "/s"),
        );
        bench.figure(
            &format!("threads_{threads}.us_per_svid"),
            &format!("CPU µs per SVID, {threads} thread(s)"),
            1e6 * threads as f64 / mint.max(f64::MIN_POSITIVE),
            "µs",
        );
        mint_rates.push(mint);
        raw_rates.push(raw);
    }
    bench.chart(Chart {
        name: "mint".into(),
        title: "X.509-SVID mint vs raw P-256 sign+verify".into(),
        x_label: "threads".into(),
        y_label: "operations per second".into(),
        kind: ChartKind::Bar,
        categories: vec!["1".into(), "2".into()],
        series: vec![
            Series {
                name: "mint from CSR".into(),
                values: mint_rates.clone(),
            },
            Series {
                name: "raw sign+verify".into(),
                values: raw_rates,
            },
        ],
    });
    Ok(Ceiling {
        mint_per_core: mint_rates.first().copied().unwrap_or(0.0),
    })
}
