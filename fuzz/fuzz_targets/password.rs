//! The password policy, both modes, on any string: the first two bytes choose the
//! policy, the rest is the password.
#![no_main]

use authd::auth::password::{MAX_PASSWORD_BYTES, NewPassword, check_size, is_common};
use authd::config::{PasswordPolicy, PasswordPolicyMode};
use authd::fuzzing::PASSWORD_RULES as RULES;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [a, b, rest @ ..] = data else { return };
    let Ok(raw) = std::str::from_utf8(rest) else {
        return;
    };
    let policy = PasswordPolicy {
        mode: if a & 1 == 0 {
            PasswordPolicyMode::Classic
        } else {
            PasswordPolicyMode::Nist
        },
        min_length: usize::from(a >> 1) % 24,
        min_strength: b % 5,
    };
    let over = raw.len() > MAX_PASSWORD_BYTES;
    assert_eq!(check_size("p", raw).is_err(), over);
    let result = NewPassword::parse("p", raw, &policy, &["alice"]);
    let reasons: Vec<&str> = match &result {
        Ok(p) => {
            assert_eq!(p.expose(), raw, "accepted, but not as given");
            Vec::new()
        }
        Err(v) => {
            assert!(!v.is_empty());
            for v in v {
                assert_eq!(v.field, "p");
                assert!(RULES.contains(&v.reason), "{v:?}");
                assert!(!v.description.is_empty());
            }
            v.iter().map(|v| v.reason).collect()
        }
    };
    let mut unique = reasons.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(
        unique.len(),
        reasons.len(),
        "a rule named twice: {reasons:?}"
    );
    if over {
        // Refused whole, never truncated to what bcrypt would read.
        assert_eq!(reasons, ["PASSWORD_TOO_LONG"]);
        return;
    }
    let has = |r| reasons.contains(&r);
    assert_eq!(
        has("PASSWORD_TOO_SHORT"),
        raw.chars().count() < policy.min_length
    );
    assert_eq!(has("PASSWORD_TOO_COMMON"), is_common(raw));
    assert!(!has("PASSWORD_TOO_LONG"));
    match policy.mode {
        PasswordPolicyMode::Classic => {
            assert!(!has("PASSWORD_TOO_WEAK"));
            // The classes, where they are plain ASCII.
            let any = |f: fn(&u8) -> bool| raw.as_bytes().iter().any(f);
            if any(u8::is_ascii_uppercase) {
                assert!(!has("PASSWORD_NEEDS_UPPERCASE"));
            }
            if any(u8::is_ascii_lowercase) {
                assert!(!has("PASSWORD_NEEDS_LOWERCASE"));
            }
            assert_eq!(has("PASSWORD_NEEDS_DIGIT"), !any(u8::is_ascii_digit));
            if any(u8::is_ascii_punctuation) {
                assert!(!has("PASSWORD_NEEDS_SPECIAL"));
            }
        }
        PasswordPolicyMode::Nist => {
            assert!(reasons.iter().all(|r| !r.starts_with("PASSWORD_NEEDS_")));
            let score = u8::from(zxcvbn::zxcvbn(raw, &["alice"]).score());
            assert_eq!(has("PASSWORD_TOO_WEAK"), score < policy.min_strength);
        }
    }
});
