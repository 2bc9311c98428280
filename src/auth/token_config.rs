//! The settings tokens are signed and verified with. The configuration reads them from
//! the environment (`JWT_*`); [`super::token::TokenKeys`] is built from them.

use std::path::PathBuf;
use std::time::Duration;

use crate::secret::Secret;

/// How tokens are signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigningAlgorithm {
    /// HMAC-SHA256 with `JWT_SECRET` (default): every verifier can also sign.
    Hs256,
    /// Ed25519.
    EdDsa,
    /// ECDSA P-256 with SHA-256.
    Es256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
}

impl SigningAlgorithm {
    /// The jsonwebtoken algorithm.
    pub fn jwt(self) -> jsonwebtoken::Algorithm {
        match self {
            SigningAlgorithm::Hs256 => jsonwebtoken::Algorithm::HS256,
            SigningAlgorithm::EdDsa => jsonwebtoken::Algorithm::EdDSA,
            SigningAlgorithm::Es256 => jsonwebtoken::Algorithm::ES256,
            SigningAlgorithm::Rs256 => jsonwebtoken::Algorithm::RS256,
        }
    }
}

/// A key that no longer signs but still verifies what it signed.
#[derive(Debug, Clone)]
pub struct RetiredKey {
    /// Where it was read from, for messages.
    pub path: PathBuf,
    /// Its PEM (public or private).
    pub pem: Vec<u8>,
    /// When it stopped signing (unix seconds): it verifies until `JWT_TTL + JWT_LEEWAY`
    /// after that.
    pub retired_at: i64,
}

/// Token settings.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// `JWT_ALGORITHM`.
    pub algorithm: SigningAlgorithm,
    /// The signing key for EdDSA/ES256/RS256 (PEM), from `JWT_PRIVATE_KEY_FILE`.
    pub private_key: Option<Secret<Vec<u8>>>,
    /// `JWT_KEY_ID`; by default the key's RFC 7638 thumbprint.
    pub key_id: Option<String>,
    /// `JWT_RETIRED_KEYS`.
    pub retired_keys: Vec<RetiredKey>,
    /// HS256 key (empty with an asymmetric algorithm).
    pub secret: Secret<Vec<u8>>,
    /// `iss` written and required.
    pub issuer: String,
    /// `aud` written and required.
    pub audience: String,
    /// Absolute lifetime of a token.
    pub ttl: Duration,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// True when no `JWT_SECRET` was set and the key was generated for this process
    /// (embedded mode only): tokens will not survive a restart.
    pub generated_secret: bool,
}
