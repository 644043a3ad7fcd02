//! Signing keys: EC P-256 (the default) and P-384 generated with ring, and RSA keys imported
//! from PKCS#8 (ring cannot generate RSA keys).
//!
//! A [`KeyPair`] never shows its private half in `Debug` output or error messages. The PKCS#8
//! bytes are reachable only through [`KeyPair::secret_pkcs8_der`], whose name says what it is.

use std::fmt;
use std::str::FromStr;

use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;

/// Errors from generating, importing or using a key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key type cannot be generated here (ring has no RSA key generation).
    #[error("{0} keys cannot be generated; import an existing PKCS#8 key instead")]
    CannotGenerate(KeyType),
    /// Key generation failed in the crypto library.
    #[error("key generation failed")]
    Generation,
    /// The bytes are not a PKCS#8 private key of a supported type.
    #[error("not a PKCS#8 EC P-256, EC P-384 or RSA private key")]
    UnsupportedKey,
    /// The PEM text holds no PKCS#8 private key.
    #[error("no PKCS#8 private key found in PEM input")]
    Pem,
    /// Signing failed in the crypto library.
    #[error("signing failed")]
    Signing,
    /// A key type name is not one of the supported names.
    #[error("unknown key type {0:?}; expected one of ec-p256, ec-p384, rsa-2048, rsa-4096")]
    UnknownKeyType(String),
}

/// Supported key types, named as SPIRE names them in configuration (`ec-p256`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum KeyType {
    /// ECDSA on NIST P-256 with SHA-256 (JWS `ES256`). The default everywhere.
    #[default]
    EcP256,
    /// ECDSA on NIST P-384 with SHA-384 (JWS `ES384`).
    EcP384,
    /// RSA 2048 with PKCS#1 v1.5 SHA-256 (JWS `RS256`); import only.
    Rsa2048,
    /// RSA 4096 with PKCS#1 v1.5 SHA-256 (JWS `RS256`); import only.
    Rsa4096,
}

impl KeyType {
    /// The configuration name, e.g. `ec-p256`.
    pub fn name(self) -> &'static str {
        match self {
            Self::EcP256 => "ec-p256",
            Self::EcP384 => "ec-p384",
            Self::Rsa2048 => "rsa-2048",
            Self::Rsa4096 => "rsa-4096",
        }
    }

    /// The JWS `alg` this key signs with.
    pub fn jws_alg(self) -> &'static str {
        match self {
            Self::EcP256 => "ES256",
            Self::EcP384 => "ES384",
            Self::Rsa2048 | Self::Rsa4096 => "RS256",
        }
    }

    fn rcgen_alg(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            Self::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            Self::Rsa2048 | Self::Rsa4096 => &rcgen::PKCS_RSA_SHA256,
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KeyType {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        match s {
            "ec-p256" => Ok(Self::EcP256),
            "ec-p384" => Ok(Self::EcP384),
            "rsa-2048" => Ok(Self::Rsa2048),
            "rsa-4096" => Ok(Self::Rsa4096),
            other => Err(KeyError::UnknownKeyType(other.to_owned())),
        }
    }
}

/// The ring handle used for JWS signatures, which need the fixed-width `r‖s` ECDSA encoding
/// rather than the ASN.1 form that X.509 uses.
enum JwsSigner {
    Ecdsa(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

/// A private key with its public half, usable to sign certificates, CSRs and JWTs.
pub struct KeyPair {
    key_type: KeyType,
    pkcs8: Vec<u8>,
    rcgen: rcgen::KeyPair,
    jws: JwsSigner,
}

impl KeyPair {
    /// Generates a fresh key. Only EC types can be generated.
    pub fn generate(key_type: KeyType) -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        let alg = match key_type {
            KeyType::EcP256 => &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            KeyType::EcP384 => &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
            KeyType::Rsa2048 | KeyType::Rsa4096 => return Err(KeyError::CannotGenerate(key_type)),
        };
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(|_| KeyError::Generation)?;
        Self::from_pkcs8_der(pkcs8.as_ref())
    }

    /// Imports an unencrypted PKCS#8 DER private key, detecting its type.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        let (key_type, jws) = if let Ok(k) =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
        {
            (KeyType::EcP256, JwsSigner::Ecdsa(k))
        } else if let Ok(k) =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P384_SHA384_FIXED_SIGNING, der, &rng)
        {
            (KeyType::EcP384, JwsSigner::Ecdsa(k))
        } else if let Ok(k) = RsaKeyPair::from_pkcs8(der) {
            let key_type = if k.public().modulus_len() > 256 {
                KeyType::Rsa4096
            } else {
                KeyType::Rsa2048
            };
            (key_type, JwsSigner::Rsa(k))
        } else {
            return Err(KeyError::UnsupportedKey);
        };
        let rcgen = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(der),
            key_type.rcgen_alg(),
        )
        .map_err(|_| KeyError::UnsupportedKey)?;
        Ok(Self {
            key_type,
            pkcs8: der.to_vec(),
            rcgen,
            jws,
        })
    }

    /// Imports a PEM `PRIVATE KEY` (PKCS#8) block.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| KeyError::Pem)?;
        Self::from_pkcs8_der(der.secret_pkcs8_der())
    }

    /// The key's type.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// The private key as PKCS#8 DER. Handle with care: this is the secret.
    pub fn secret_pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The private key as a PEM `PRIVATE KEY` block. Handle with care: this is the secret.
    pub fn secret_pkcs8_pem(&self) -> String {
        pem_encode("PRIVATE KEY", &self.pkcs8)
    }

    /// The public key as DER SubjectPublicKeyInfo.
    pub fn public_key_der(&self) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(&self.rcgen)
    }

    /// The raw public key: `0x04‖X‖Y` for EC keys, the PKCS#1 `RSAPublicKey` for RSA.
    pub fn public_key_raw(&self) -> &[u8] {
        match &self.jws {
            JwsSigner::Ecdsa(k) => k.public_key().as_ref(),
            JwsSigner::Rsa(k) => k.public_key().as_ref(),
        }
    }

    /// Signs `message` for a JWS: fixed-width `r‖s` for ECDSA, PKCS#1 v1.5 SHA-256 for RSA.
    pub fn sign_jws(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let rng = SystemRandom::new();
        match &self.jws {
            JwsSigner::Ecdsa(k) => k
                .sign(&rng, message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| KeyError::Signing),
            JwsSigner::Rsa(k) => {
                let mut out = vec![0; k.public().modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &rng, message, &mut out)
                    .map_err(|_| KeyError::Signing)?;
                Ok(out)
            }
        }
    }

    /// The rcgen view of this key, for building certificates and CSRs.
    pub(crate) fn rcgen(&self) -> &rcgen::KeyPair {
        &self.rcgen
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("key_type", &self.key_type)
            .field("private_key", &"<redacted>")
            .finish()
    }
}

/// Encodes DER bytes as one PEM block with the given label.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // Base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_round_trip_through_pkcs8() {
        for key_type in [KeyType::EcP256, KeyType::EcP384] {
            let key = KeyPair::generate(key_type).unwrap();
            assert_eq!(key.key_type(), key_type);
            let again = KeyPair::from_pkcs8_der(key.secret_pkcs8_der()).unwrap();
            assert_eq!(again.key_type(), key_type);
            assert_eq!(again.public_key_der(), key.public_key_der());
            let from_pem = KeyPair::from_pkcs8_pem(&key.secret_pkcs8_pem()).unwrap();
            assert_eq!(from_pem.public_key_raw(), key.public_key_raw());
        }
    }

    #[test]
    fn rsa_cannot_be_generated_but_names_parse() {
        assert!(matches!(
            KeyPair::generate(KeyType::Rsa2048),
            Err(KeyError::CannotGenerate(KeyType::Rsa2048))
        ));
        for name in ["ec-p256", "ec-p384", "rsa-2048", "rsa-4096"] {
            assert_eq!(name.parse::<KeyType>().unwrap().name(), name);
        }
        assert!("ed25519".parse::<KeyType>().is_err());
    }

    #[test]
    fn debug_output_hides_the_private_key() {
        let key = KeyPair::generate(KeyType::EcP256).unwrap();
        let debug = format!("{key:?}");
        assert!(debug.contains("redacted"));
        let secret_b64 = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(key.secret_pkcs8_der())
        };
        assert!(!debug.contains(&secret_b64[..16]));
    }

    #[test]
    fn garbage_is_not_a_key() {
        assert!(matches!(
            KeyPair::from_pkcs8_der(b"not a key"),
            Err(KeyError::UnsupportedKey)
        ));
        assert!(matches!(
            KeyPair::from_pkcs8_pem("nothing here"),
            Err(KeyError::Pem)
        ));
    }

    #[test]
    fn es256_signatures_are_fixed_width_and_verify() {
        let key = KeyPair::generate(KeyType::EcP256).unwrap();
        let sig = key.sign_jws(b"hello").unwrap();
        assert_eq!(sig.len(), 64);
        signature::UnparsedPublicKey::new(
            &signature::ECDSA_P256_SHA256_FIXED,
            key.public_key_raw(),
        )
        .verify(b"hello", &sig)
        .unwrap();
    }
}
