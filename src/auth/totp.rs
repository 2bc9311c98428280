//! The second factor's arithmetic: TOTP codes (RFC 6238 over RFC 4226's HOTP), the
//! sealing of secrets at rest (AES-256-GCM), recovery codes and their hashes, and the
//! enrolment QR code as a PNG. No I/O here: the stores and the service use it.

use data_encoding::{BASE32_NOPAD, BASE64};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hmac;
use sha2::{Digest, Sha256};

use crate::secret::Secret;

/// The bytes of a new TOTP secret: 160 bits, RFC 4226's recommended length.
pub const SECRET_BYTES: usize = 20;
/// How many recovery codes a set has.
pub const RECOVERY_CODES: usize = 10;
/// Characters of a recovery code (base32, 5 bits each: 80 bits), shown in groups of 4.
const RECOVERY_CODE_CHARS: usize = 16;
/// The longest code field accepted, in bytes: a recovery code with separators and
/// spaces fits, anything longer is refused before any work.
pub const MAX_CODE_BYTES: usize = 64;

/// A credential's parameters, stored with it: a later default cannot change how an
/// existing credential's codes are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Digits per code.
    pub digits: u32,
    /// Seconds per step.
    pub period: i64,
    /// Steps of clock skew accepted either side of now.
    pub skew: i64,
}

/// The only HMAC authd issues credentials with (what every authenticator app reads).
pub const ALGORITHM: &str = "SHA1";

impl Params {
    /// RFC 6238's defaults, what every authenticator app supports: 6 digits, 30 s, and
    /// one step of skew either side.
    pub const DEFAULT: Params = Params {
        digits: 6,
        period: 30,
        skew: 1,
    };

    /// The step `unix_seconds` falls in.
    pub fn step(&self, unix_seconds: i64) -> i64 {
        unix_seconds.div_euclid(self.period.max(1))
    }
}

/// A new random secret.
pub fn generate_secret() -> Secret<Vec<u8>> {
    Secret::new(rand::random::<[u8; SECRET_BYTES]>().to_vec())
}

/// A secret as authenticator apps take it: base32 without padding.
pub fn secret_base32(secret: &[u8]) -> String {
    BASE32_NOPAD.encode(secret)
}

/// The `otpauth://` URI of a credential (the Key Uri Format authenticator apps read).
pub fn otpauth_uri(issuer: &str, account: &str, secret: &[u8], params: Params) -> String {
    let issuer = percent_encode(issuer);
    format!(
        "otpauth://totp/{issuer}:{}?secret={}&issuer={issuer}&algorithm={ALGORITHM}&digits={}&period={}",
        percent_encode(account),
        secret_base32(secret),
        params.digits,
        params.period
    )
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// HOTP (RFC 4226) with HMAC-SHA1: the code of counter `step`.
pub fn code_at(secret: &[u8], step: i64, digits: u32) -> u32 {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let counter = u64::try_from(step).unwrap_or(0).to_be_bytes();
    let tag = hmac::sign(&key, &counter);
    let mac = tag.as_ref();
    let offset = usize::from(mac.last().copied().unwrap_or(0) & 0x0f);
    let word = mac
        .get(offset..offset + 4)
        .map_or(0, |w| u32::from_be_bytes([w[0] & 0x7f, w[1], w[2], w[3]]));
    word % 10u32.pow(digits.min(9))
}

/// A code as typed: `digits` ASCII digits, spaces allowed between them. `None` when it
/// cannot be a code at all.
pub fn parse_code(code: &str, digits: u32) -> Option<u32> {
    let digits_only: String = code.chars().filter(|c| !c.is_whitespace()).collect();
    if digits_only.len() != usize::try_from(digits).ok()?
        || !digits_only.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    digits_only.parse().ok()
}

/// The step whose code `code` is, among now's and `params.skew` either side, if it is
/// later than `last_step` (a step already used, or an earlier one, never counts again).
/// Every candidate is computed and compared without an early exit.
pub fn matching_step(
    secret: &[u8],
    code: u32,
    now: i64,
    params: Params,
    last_step: i64,
) -> Option<i64> {
    let current = params.step(now);
    let mut found = None;
    for step in current - params.skew..=current + params.skew {
        let expected = code_at(secret, step, params.digits);
        // Compared as bits, not with an early-exit `==` on strings.
        let same = (expected ^ code) == 0;
        if same && step > last_step && found.is_none() {
            found = Some(step);
        }
    }
    found
}

/// The key that seals TOTP secrets at rest (`TOTP_ENCRYPTION_KEY`).
pub struct SecretBox {
    key: LessSafeKey,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(..)")
    }
}

/// The version tag of sealed secrets: a later key or cipher gets another.
const SEALED_PREFIX: &str = "v1:";

impl SecretBox {
    /// A box for a 32-byte key.
    pub fn new(key: &[u8; 32]) -> anyhow::Result<Self> {
        let key = UnboundKey::new(&AES_256_GCM, key)
            .map_err(|_| anyhow::anyhow!("not an AES-256 key"))?;
        Ok(Self {
            key: LessSafeKey::new(key),
        })
    }

    /// `secret` sealed for `user_id` (the associated data: a sealed secret copied to
    /// another user's row does not open), with a random nonce.
    pub fn seal(&self, user_id: &str, secret: &[u8]) -> anyhow::Result<String> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let mut sealed = secret.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(user_id.as_bytes()),
                &mut sealed,
            )
            .map_err(|_| anyhow::anyhow!("sealing failed"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(format!("{SEALED_PREFIX}{}", BASE64.encode(&out)))
    }

    /// The secret `sealed` holds for `user_id`; an error when it was sealed under
    /// another key, for another user, or altered.
    pub fn open(&self, user_id: &str, sealed: &str) -> anyhow::Result<Secret<Vec<u8>>> {
        let raw = sealed
            .strip_prefix(SEALED_PREFIX)
            .and_then(|b| BASE64.decode(b.as_bytes()).ok())
            .ok_or_else(|| anyhow::anyhow!("a sealed TOTP secret is malformed"))?;
        if raw.len() < NONCE_LEN {
            anyhow::bail!("a sealed TOTP secret is too short");
        }
        let (nonce, body) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| anyhow::anyhow!("a sealed TOTP secret has a bad nonce"))?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(user_id.as_bytes()), &mut body)
            .map_err(|_| {
                anyhow::anyhow!(
                    "a TOTP secret does not open: sealed under another TOTP_ENCRYPTION_KEY, or altered"
                )
            })?;
        Ok(Secret::new(plain.to_vec()))
    }
}

/// A fresh set of recovery codes, as shown to the user (`abcd-efgh-ijkl-mnop`).
pub fn generate_recovery_codes() -> Vec<String> {
    (0..RECOVERY_CODES)
        .map(|_| {
            let raw = BASE32_NOPAD.encode(&rand::random::<[u8; 10]>());
            let lower = raw.to_ascii_lowercase();
            lower
                .as_bytes()
                .chunks(4)
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect::<Vec<_>>()
                .join("-")
        })
        .collect()
}

/// A recovery code as typed, reduced to what counts: separators and spaces dropped,
/// lower case. `None` when it cannot be one.
pub fn normalize_recovery_code(code: &str) -> Option<String> {
    let kept: String = code
        .chars()
        .filter(|c| !matches!(c, '-' | ' ' | '\t'))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    (kept.len() == RECOVERY_CODE_CHARS
        && kept.bytes().all(|b| matches!(b, b'a'..=b'z' | b'2'..=b'7')))
    .then_some(kept)
}

/// What is stored of a recovery code: SHA-256 of the user id and the normalized code.
/// 80 random bits need no slow hash; the user id keeps two users' tables apart.
pub fn recovery_code_hash(user_id: &str, normalized: &str) -> String {
    let mut h = Sha256::new();
    h.update(user_id.as_bytes());
    h.update(b":");
    h.update(normalized.as_bytes());
    h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
}

/// A PNG of a QR code of `text` (error correction M, 4 px per module, the 4-module
/// quiet zone), 8-bit grayscale, zlib stored blocks: no compression library needed,
/// and a few kilobytes for an otpauth URI.
pub fn qr_png(text: &str) -> anyhow::Result<Vec<u8>> {
    use qrcodegen::{QrCode, QrCodeEcc};
    const SCALE: usize = 4;
    const QUIET: usize = 4;
    let qr = QrCode::encode_text(text, QrCodeEcc::Medium)
        .map_err(|e| anyhow::anyhow!("QR code not made: {e:?}"))?;
    let modules = usize::try_from(qr.size()).unwrap_or(0);
    let side = (modules + 2 * QUIET) * SCALE;
    let mut raw = Vec::with_capacity(side * (side + 1));
    for y in 0..side {
        raw.push(0); // filter: none
        let my = (y / SCALE).checked_sub(QUIET);
        for x in 0..side {
            let mx = (x / SCALE).checked_sub(QUIET);
            let dark = match (mx, my) {
                (Some(mx), Some(my)) if mx < modules && my < modules => qr.get_module(
                    i32::try_from(mx).unwrap_or(0),
                    i32::try_from(my).unwrap_or(0),
                ),
                _ => false,
            };
            raw.push(if dark { 0 } else { 255 });
        }
    }
    let side = u32::try_from(side)?;
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&side.to_be_bytes());
    ihdr.extend_from_slice(&side.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit grayscale, no interlace
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &zlib_stored(&raw));
    chunk(&mut png, b"IEND", &[]);
    Ok(png)
}

fn chunk(png: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    png.extend_from_slice(&u32::try_from(data.len()).unwrap_or(0).to_be_bytes());
    let start = png.len();
    png.extend_from_slice(kind);
    png.extend_from_slice(data);
    let crc = crc32(&png[start..]);
    png.extend_from_slice(&crc.to_be_bytes());
}

/// A zlib stream of stored (uncompressed) deflate blocks.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = data.chunks(65_535).collect();
    let last_index = blocks.len().saturating_sub(1);
    for (i, block) in blocks.iter().enumerate() {
        out.push(u8::from(i == last_index));
        let len = u16::try_from(block.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    if blocks.is_empty() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in data {
        a = (a + u32::from(byte)) % 65_521;
        b = (b + a) % 65_521;
    }
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xedb8_8320 & mask);
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B, SHA-1, 8 digits (the same HOTP truncation as 6 digits).
    #[test]
    fn rfc6238_sha1_vectors() {
        let secret = b"12345678901234567890";
        for (time, code) in [
            (59, 94_287_082),
            (1_111_111_109, 7_081_804),
            (1_111_111_111, 14_050_471),
            (1_234_567_890, 89_005_924),
            (2_000_000_000, 69_279_037),
            (20_000_000_000, 65_353_130),
        ] {
            assert_eq!(code_at(secret, time / 30, 8), code, "t={time}");
        }
    }

    #[test]
    fn skew_and_last_step() {
        let secret = b"12345678901234567890";
        let p = Params::DEFAULT;
        let now = 1_111_111_111;
        let step = p.step(now);
        for (offset, accepted) in [(-2, false), (-1, true), (0, true), (1, true), (2, false)] {
            let code = code_at(secret, step + offset, 6);
            assert_eq!(
                matching_step(secret, code, now, p, 0) == Some(step + offset),
                accepted,
                "offset {offset}"
            );
        }
        let code = code_at(secret, step, 6);
        assert_eq!(matching_step(secret, code, now, p, step), None);
        assert_eq!(matching_step(secret, code, now, p, step - 1), Some(step));
    }

    #[test]
    fn codes_parse_strictly() {
        assert_eq!(parse_code("012345", 6), Some(12_345));
        assert_eq!(parse_code("012 345", 6), Some(12_345));
        assert_eq!(parse_code("12345", 6), None);
        assert_eq!(parse_code("1234567", 6), None);
        assert_eq!(parse_code("12345a", 6), None);
        assert_eq!(parse_code("１２３４５６", 6), None);
    }

    #[test]
    fn sealed_secrets_open_only_for_their_user_and_key() {
        let b = SecretBox::new(&[7; 32]).unwrap();
        let sealed = b.seal("u1", b"secret-bytes").unwrap();
        assert_eq!(b.open("u1", &sealed).unwrap().expose(), b"secret-bytes");
        assert!(b.open("u2", &sealed).is_err());
        assert!(
            SecretBox::new(&[8; 32])
                .unwrap()
                .open("u1", &sealed)
                .is_err()
        );
        assert_ne!(
            sealed,
            b.seal("u1", b"secret-bytes").unwrap(),
            "random nonce"
        );
        assert!(!sealed.contains("secret"));
    }

    #[test]
    fn recovery_codes_are_distinct_and_normalize() {
        let codes = generate_recovery_codes();
        assert_eq!(codes.len(), RECOVERY_CODES);
        let set: std::collections::HashSet<_> = codes.iter().collect();
        assert_eq!(set.len(), RECOVERY_CODES);
        for code in &codes {
            assert_eq!(code.len(), 19);
            let n = normalize_recovery_code(code).unwrap();
            assert_eq!(
                normalize_recovery_code(&code.to_uppercase()),
                Some(n.clone())
            );
            assert_eq!(recovery_code_hash("u", &n).len(), 64);
            assert_ne!(recovery_code_hash("u", &n), recovery_code_hash("v", &n));
        }
        assert_eq!(normalize_recovery_code("short"), None);
    }

    #[test]
    fn png_is_well_formed() {
        let png = qr_png("otpauth://totp/authd:ann?secret=ABC").unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert_eq!(&png[12..16], b"IHDR");
        assert!(png.ends_with(&crc32(b"IEND").to_be_bytes()));
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn uri_names_the_parameters() {
        let uri = otpauth_uri("authd", "ann lee", b"12345678901234567890", Params::DEFAULT);
        assert_eq!(
            uri,
            "otpauth://totp/authd:ann%20lee?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=authd&algorithm=SHA1&digits=6&period=30"
        );
    }
}
