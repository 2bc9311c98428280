//! Any header and payload, signed with our HS256 key: the signature holds, so only
//! the header and the claims stand between the bytes and an accepted token. The first
//! byte says how many of the rest are the header.
#![no_main]

use std::sync::LazyLock;

use authd::auth::token::TokenKeys;
use authd_fuzz::{NOW, SECRET, assert_rightly_accepted, hs256_keys};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;

static KEYS: LazyLock<TokenKeys> = LazyLock::new(hs256_keys);
static SIGNING: LazyLock<EncodingKey> = LazyLock::new(|| EncodingKey::from_secret(SECRET));

fuzz_target!(|data: &[u8]| {
    let [split, rest @ ..] = data else { return };
    let (header, payload) = rest.split_at(usize::from(*split).min(rest.len()));
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let Ok(signature) = jsonwebtoken::crypto::sign(message.as_bytes(), &SIGNING, Algorithm::HS256)
    else {
        return;
    };
    let token = format!("{message}.{signature}");
    if let Ok(claims) = KEYS.verify(&token, NOW) {
        assert_rightly_accepted(&KEYS, &token, &claims);
    }
});
