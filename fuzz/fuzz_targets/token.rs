//! Token validation on any string, with HS256 and EdDSA keys: refused with a reason,
//! or accepted only when it is rightly one of ours.
#![no_main]

use std::sync::LazyLock;

use authd::auth::token::TokenKeys;
use authd_fuzz::{NOW, assert_rightly_accepted, ed25519_keys, hs256_keys};
use libfuzzer_sys::fuzz_target;

static KEYS: LazyLock<[TokenKeys; 2]> = LazyLock::new(|| [hs256_keys(), ed25519_keys()]);

fuzz_target!(|token: &str| {
    for keys in KEYS.iter() {
        if let Ok(claims) = keys.verify(token, NOW) {
            assert_rightly_accepted(keys, token, &claims);
        }
    }
});
