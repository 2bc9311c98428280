//! Username parsing and Login's canonical form, on any string.
#![no_main]

use authd::auth::username::{MAX_USERNAME_CHARS, MIN_USERNAME_CHARS, Username};
use libfuzzer_sys::fuzz_target;

fn meets_the_rules(raw: &str) -> bool {
    (MIN_USERNAME_CHARS..=MAX_USERNAME_CHARS).contains(&raw.chars().count())
        && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fuzz_target!(|raw: &str| {
    match Username::parse(raw) {
        Ok(name) => {
            assert!(meets_the_rules(raw), "accepted {raw:?}");
            assert_eq!(name.as_str(), raw.to_ascii_lowercase());
            // Parsing the canonical form gives it back.
            assert_eq!(Username::parse(name.as_str()).as_ref(), Ok(&name));
        }
        Err(v) => {
            assert!(!meets_the_rules(raw), "refused {raw:?}: {v:?}");
            assert_eq!(v.field, "username");
            assert!(v.reason.starts_with("USERNAME_"), "{v:?}");
        }
    }
    let canonical = Username::canonical(raw);
    assert_eq!(Username::canonical(&canonical), canonical, "not idempotent");
    // Login's lookup: a padded, differently cased name is the same account.
    if let Ok(name) = Username::parse(raw.trim()) {
        assert_eq!(Username::parse(&canonical), Ok(name));
    }
});
