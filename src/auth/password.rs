//! Passwords: the policy new passwords must meet, and the size limit every password
//! meets before any work is done.

use std::collections::HashSet;
use std::sync::LazyLock;

use super::FieldViolation;
use crate::config::Secret;

/// bcrypt reads at most 72 bytes; longer passwords are refused, never truncated.
pub const MAX_PASSWORD_BYTES: usize = 72;
/// The shortest password the policy accepts, in characters.
pub const MIN_PASSWORD_CHARS: usize = 8;

static COMMON_STEMS: LazyLock<HashSet<&'static str>> = LazyLock::new(|| {
    include_str!("common_passwords.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
});

/// Checks only the size limit (Login, current passwords): a password over 72 bytes
/// could never have been stored, and would be silently truncated by bcrypt.
pub fn check_size(field: &'static str, password: &str) -> Result<(), FieldViolation> {
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(FieldViolation::new(
            field,
            format!(
                "must be at most {MAX_PASSWORD_BYTES} bytes (bcrypt's limit), got {}",
                password.len()
            ),
        ));
    }
    Ok(())
}

/// A password that meets the policy. `parse` is the only way to make one.
#[derive(Debug)]
pub struct NewPassword(Secret<String>);

impl NewPassword {
    /// Checks `raw` against the policy: at least 8 characters with an upper-case letter,
    /// a lower-case letter, a digit and a special character; at most 72 bytes; not a
    /// common password. Every rule broken is reported.
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, Vec<FieldViolation>> {
        check_size(field, raw).map_err(|v| vec![v])?;
        let mut violations = Vec::new();
        let chars = raw.chars().count();
        if chars < MIN_PASSWORD_CHARS {
            violations.push(FieldViolation::new(
                field,
                format!("must be at least {MIN_PASSWORD_CHARS} characters long, got {chars}"),
            ));
        }
        type Rule = (fn(char) -> bool, &'static str);
        let rules: [Rule; 4] = [
            (char::is_uppercase, "must contain an upper-case letter"),
            (char::is_lowercase, "must contain a lower-case letter"),
            (|c| c.is_ascii_digit(), "must contain a digit"),
            (
                |c| !c.is_alphanumeric() && !c.is_whitespace(),
                "must contain a special character such as !@#$%",
            ),
        ];
        for (holds, rule) in rules {
            if !raw.chars().any(holds) {
                violations.push(FieldViolation::new(field, rule));
            }
        }
        if is_common(raw) {
            violations.push(FieldViolation::new(
                field,
                "is too common; choose a password that is not a well-known one",
            ));
        }
        if violations.is_empty() {
            Ok(Self(Secret::new(raw.to_owned())))
        } else {
            Err(violations)
        }
    }

    /// The password, for hashing.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }
}

/// Whether `password` is a well-known one once its usual disguises are removed:
/// case, leading and trailing digits and symbols, and letter-for-symbol swaps.
pub fn is_common(password: &str) -> bool {
    let lower = password.to_lowercase();
    let stem = lower.trim_matches(|c: char| !c.is_alphabetic());
    let candidates = [
        stem.to_owned(),
        undisguise(stem),
        undisguise(&lower)
            .trim_matches(|c: char| !c.is_alphabetic())
            .to_owned(),
    ];
    candidates
        .iter()
        .any(|s| COMMON_STEMS.contains(s.as_str()) || is_repeat(s))
}

fn undisguise(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '@' | '4' => 'a',
            '0' => 'o',
            '1' => 'i',
            '3' => 'e',
            '$' | '5' => 's',
            '7' => 't',
            other => other,
        })
        .collect()
}

/// One character repeated ("aaaaaaaa"), or nothing left at all ("12345678!").
fn is_repeat(s: &str) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => chars.all(|c| c == first),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_strong_password_passes() {
        assert!(NewPassword::parse("password", "Correct-Horse-9").is_ok());
    }

    #[test]
    fn each_missing_class_is_named() {
        let v = NewPassword::parse("password", "alllowercase").unwrap_err();
        let text: Vec<_> = v.iter().map(|v| v.description.as_str()).collect();
        assert!(text.iter().any(|t| t.contains("upper-case")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("digit")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("special")), "{text:?}");
        assert!(!text.iter().any(|t| t.contains("lower-case")), "{text:?}");
    }

    #[test]
    fn seven_characters_is_too_short_and_eight_is_enough() {
        assert!(NewPassword::parse("p", "Ab1!xyz").is_err());
        assert!(NewPassword::parse("p", "Ab1!xyzw").is_ok());
    }

    #[test]
    fn over_72_bytes_is_refused_not_truncated() {
        let p = format!("Aa1!{}", "x".repeat(69));
        assert_eq!(p.len(), 73);
        let v = NewPassword::parse("p", &p).unwrap_err();
        assert!(v[0].description.contains("72 bytes"));
        let ok = format!("Aa1!{}", "x".repeat(68));
        assert!(NewPassword::parse("p", &ok).is_ok());
        // Multi-byte characters count by bytes: 25 × 3 bytes = 75.
        let wide = format!("Aa1!{}", "€".repeat(23));
        assert!(wide.len() > 72);
        assert!(NewPassword::parse("p", &wide).is_err());
    }

    #[test]
    fn common_passwords_in_disguise_are_refused() {
        for p in [
            "P@ssw0rd1!",
            "Password123!",
            "Qwerty123!",
            "Welcome1!",
            "L3tme1n!!",
        ] {
            let v = NewPassword::parse("p", p).unwrap_err();
            assert!(
                v.iter().any(|v| v.description.contains("too common")),
                "{p}: {v:?}"
            );
        }
    }
}
