//! Passwords: the policy new passwords must meet, and the size limit every password
//! meets before any work is done.

use std::collections::HashSet;
use std::sync::LazyLock;

use super::FieldViolation;
use crate::config::{PasswordPolicy, PasswordPolicyMode, Secret};

/// bcrypt reads at most 72 bytes; longer passwords are refused, never truncated.
pub const MAX_PASSWORD_BYTES: usize = 72;

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
        return Err(FieldViolation::rule(
            field,
            "PASSWORD_TOO_LONG",
            format!(
                "must be at most {MAX_PASSWORD_BYTES} bytes (bcrypt's limit; a character \
                 outside ASCII takes 2 to 4 bytes), got {}",
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
    /// Checks `raw` against `policy`; `user_inputs` (the username) make a password
    /// that contains them weaker in `nist` mode. Every rule broken is reported, each
    /// as a violation whose `reason` names the rule.
    ///
    /// - both modes: at most 72 bytes; at least `min_length` characters; not a
    ///   common password;
    /// - `classic`: an upper-case letter, a lower-case letter, a digit and a special
    ///   character;
    /// - `nist` (SP 800-63B): no composition rules, spaces and any Unicode allowed, and
    ///   a zxcvbn score of at least `min_strength`.
    pub fn parse(
        field: &'static str,
        raw: &str,
        policy: &PasswordPolicy,
        user_inputs: &[&str],
    ) -> Result<Self, Vec<FieldViolation>> {
        check_size(field, raw).map_err(|v| vec![v])?;
        let mut violations = Vec::new();
        let chars = raw.chars().count();
        if chars < policy.min_length {
            violations.push(FieldViolation::rule(
                field,
                "PASSWORD_TOO_SHORT",
                format!(
                    "must be at least {} characters long, got {chars}",
                    policy.min_length
                ),
            ));
        }
        match policy.mode {
            PasswordPolicyMode::Classic => violations.extend(composition(field, raw)),
            PasswordPolicyMode::Nist => {
                violations.extend(strength(field, raw, policy.min_strength, user_inputs));
            }
        }
        if is_common(raw) {
            violations.push(FieldViolation::rule(
                field,
                "PASSWORD_TOO_COMMON",
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

/// The classic composition rules, one violation per missing class.
fn composition(field: &'static str, raw: &str) -> Vec<FieldViolation> {
    type Rule = (fn(char) -> bool, &'static str, &'static str);
    let rules: [Rule; 4] = [
        (
            char::is_uppercase,
            "PASSWORD_NEEDS_UPPERCASE",
            "must contain an upper-case letter",
        ),
        (
            char::is_lowercase,
            "PASSWORD_NEEDS_LOWERCASE",
            "must contain a lower-case letter",
        ),
        (
            |c| c.is_ascii_digit(),
            "PASSWORD_NEEDS_DIGIT",
            "must contain a digit",
        ),
        (
            |c| !c.is_alphanumeric() && !c.is_whitespace(),
            "PASSWORD_NEEDS_SPECIAL",
            "must contain a special character such as !@#$%",
        ),
    ];
    rules
        .into_iter()
        .filter(|(holds, _, _)| !raw.chars().any(holds))
        .map(|(_, reason, rule)| FieldViolation::rule(field, reason, rule))
        .collect()
}

/// The zxcvbn estimate, refused below `min_strength` with zxcvbn's own advice (which
/// describes the pattern found, never the password).
fn strength(
    field: &'static str,
    raw: &str,
    min_strength: u8,
    user_inputs: &[&str],
) -> Option<FieldViolation> {
    let estimate = zxcvbn::zxcvbn(raw, user_inputs);
    let score = u8::from(estimate.score());
    if score >= min_strength {
        return None;
    }
    let mut description =
        format!("is too easy to guess (strength {score} of 4, at least {min_strength} needed)");
    if let Some(feedback) = estimate.feedback() {
        if let Some(warning) = feedback.warning() {
            description.push_str(&format!(": {warning}"));
        }
        if let Some(suggestion) = feedback.suggestions().first() {
            description.push_str(&format!("; {suggestion}"));
        }
    }
    Some(FieldViolation::rule(
        field,
        "PASSWORD_TOO_WEAK",
        description,
    ))
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
    if candidates
        .iter()
        .any(|s| COMMON_STEMS.contains(s.as_str()) || is_repeat(s))
    {
        return true;
    }
    // A swapped letter at either end of the stem is a symbol or digit itself, so no
    // single trim finds the stem: "jessic@@" is "jessica" + "@", "1@dmin" is "1" +
    // "admin". Try every cut that drops only digits and symbols at the ends.
    let chars: Vec<char> = lower.chars().collect();
    let first = chars
        .iter()
        .position(|c| c.is_alphabetic())
        .unwrap_or(chars.len());
    let last = chars
        .iter()
        .rposition(|c| c.is_alphabetic())
        .map_or(0, |i| i + 1);
    (0..=first).any(|start| {
        (last.max(start)..=chars.len()).any(|end| {
            let cut: String = chars[start..end].iter().collect();
            COMMON_STEMS.contains(undisguise(&cut).as_str())
        })
    })
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

    const CLASSIC: PasswordPolicy = PasswordPolicy {
        mode: PasswordPolicyMode::Classic,
        min_length: 8,
        min_strength: 3,
    };
    const NIST: PasswordPolicy = PasswordPolicy {
        mode: PasswordPolicyMode::Nist,
        min_length: 15,
        min_strength: 3,
    };

    fn classic(raw: &str) -> Result<NewPassword, Vec<FieldViolation>> {
        NewPassword::parse("p", raw, &CLASSIC, &[])
    }

    fn nist(raw: &str) -> Result<NewPassword, Vec<FieldViolation>> {
        NewPassword::parse("p", raw, &NIST, &["alice"])
    }

    fn reasons(v: &[FieldViolation]) -> Vec<&'static str> {
        v.iter().map(|v| v.reason).collect()
    }

    #[test]
    fn a_strong_password_passes() {
        assert!(classic("Correct-Horse-9").is_ok());
    }

    #[test]
    fn each_missing_class_is_named() {
        let v = classic("alllowercase").unwrap_err();
        let text: Vec<_> = v.iter().map(|v| v.description.as_str()).collect();
        assert!(text.iter().any(|t| t.contains("upper-case")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("digit")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("special")), "{text:?}");
        assert!(!text.iter().any(|t| t.contains("lower-case")), "{text:?}");
        assert_eq!(
            reasons(&v),
            [
                "PASSWORD_NEEDS_UPPERCASE",
                "PASSWORD_NEEDS_DIGIT",
                "PASSWORD_NEEDS_SPECIAL"
            ]
        );
    }

    #[test]
    fn seven_characters_is_too_short_and_eight_is_enough() {
        assert_eq!(
            reasons(&classic("Ab1!xyz").unwrap_err()),
            ["PASSWORD_TOO_SHORT"]
        );
        assert!(classic("Ab1!xyzw").is_ok());
    }

    #[test]
    fn over_72_bytes_is_refused_not_truncated() {
        let p = format!("Aa1!{}", "x".repeat(69));
        assert_eq!(p.len(), 73);
        let v = classic(&p).unwrap_err();
        assert!(v[0].description.contains("72 bytes"));
        assert_eq!(reasons(&v), ["PASSWORD_TOO_LONG"]);
        let ok = format!("Aa1!{}", "x".repeat(68));
        assert!(classic(&ok).is_ok());
        // Multi-byte characters count by bytes: 25 × 3 bytes = 75.
        let wide = format!("Aa1!{}", "€".repeat(23));
        assert!(wide.len() > 72);
        assert!(classic(&wide).is_err());
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
            let v = classic(p).unwrap_err();
            assert!(reasons(&v).contains(&"PASSWORD_TOO_COMMON"), "{p}: {v:?}");
        }
    }

    #[test]
    fn nist_has_no_composition_rules_and_allows_spaces_and_unicode() {
        assert!(nist("correct horse battery staple").is_ok());
        assert!(nist("ľadová káva pod jabloňou").is_ok());
        assert!(nist("пароль для входа в систему").is_ok());
    }

    #[test]
    fn nist_length_boundary_counts_characters() {
        // 14 and 15 characters, unguessable enough either way.
        let v = nist("zq8 vlk3 mtr9x").unwrap_err();
        assert_eq!(reasons(&v), ["PASSWORD_TOO_SHORT"]);
        assert!(v[0].description.contains("at least 15 characters"), "{v:?}");
        assert!(nist("zq8 vlk3 mtr9xw").is_ok());
        // 15 characters of 2 bytes each: 30 bytes, long enough.
        assert!(nist("ťžščřďňľáéíóúýä").is_ok());
    }

    #[test]
    fn nist_refuses_over_72_bytes_with_a_clear_message() {
        // 37 two-byte characters: 37 characters, 74 bytes.
        let v = nist(&"ž".repeat(37)).unwrap_err();
        assert_eq!(reasons(&v), ["PASSWORD_TOO_LONG"]);
        assert!(v[0].description.contains("at most 72 bytes"), "{v:?}");
        assert!(v[0].description.contains("got 74"), "{v:?}");
    }

    #[test]
    fn nist_refuses_weak_and_common_passwords() {
        let v = nist("aaaaaaaaaaaaaaaa").unwrap_err();
        assert!(reasons(&v).contains(&"PASSWORD_TOO_COMMON"), "{v:?}");
        let v = nist("passwordpassword").unwrap_err();
        assert!(reasons(&v).contains(&"PASSWORD_TOO_WEAK"), "{v:?}");
        // The username makes a password that is built on it weak.
        let built_on_name = "zorbulaxzorbulax77";
        assert!(NewPassword::parse("p", built_on_name, &NIST, &["someone"]).is_ok());
        let v = NewPassword::parse("p", built_on_name, &NIST, &["Zorbulax"]).unwrap_err();
        assert_eq!(reasons(&v), ["PASSWORD_TOO_WEAK"]);
        assert!(
            !v.iter().any(|v| v.description.contains("zorbulax")),
            "{v:?}"
        );
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    use crate::fuzzing::PASSWORD_RULES as RULES;

    fn policy() -> impl Strategy<Value = PasswordPolicy> {
        (any::<bool>(), 1usize..=20, 0u8..=4).prop_map(|(nist, min_length, min_strength)| {
            PasswordPolicy {
                mode: if nist {
                    PasswordPolicyMode::Nist
                } else {
                    PasswordPolicyMode::Classic
                },
                min_length,
                min_strength,
            }
        })
    }

    /// Printable ASCII, multi-byte text around the 72-byte limit, and anything at all.
    fn password() -> impl Strategy<Value = String> {
        prop_oneof![
            "[ -~]{0,80}",
            "[a-zA-Z0-9!#ßäÄéž€ïΩ😀 ]{0,40}",
            any::<String>(),
            disguised_common(),
        ]
    }

    /// A common password with its usual disguises: case, swaps, digits and symbols around.
    fn disguised_common() -> impl Strategy<Value = String> {
        let stems: Vec<&'static str> = COMMON_STEMS
            .iter()
            .copied()
            .filter(|s| s.chars().all(|c| c.is_ascii_lowercase()))
            .collect();
        (
            proptest::sample::select(stems),
            proptest::collection::vec(0u8..4, 32),
            "[0-9!@#$%^&*.]{0,6}",
            "[0-9!@#$%^&*.]{0,6}",
        )
            .prop_map(|(stem, how, before, after)| {
                let body: String = stem
                    .chars()
                    .zip(how.iter().cycle())
                    .map(|(c, how)| match (how, c) {
                        (1, _) => c.to_ascii_uppercase(),
                        (2, 'a') => '@',
                        (2, 'o') => '0',
                        (2, 'e') => '3',
                        (2, 's') => '$',
                        (3, 'a') => '4',
                        (3, 's') => '5',
                        (3, 't') => '7',
                        (3, 'i') => '1',
                        _ => c,
                    })
                    .collect();
                format!("{before}{body}{after}")
            })
    }

    fn reasons(result: &Result<NewPassword, Vec<FieldViolation>>) -> Vec<&'static str> {
        match result {
            Ok(_) => Vec::new(),
            Err(v) => v.iter().map(|v| v.reason).collect(),
        }
    }

    proptest! {
        #![proptest_config(crate::auth::proptest_config(256))]

        #[test]
        fn the_size_limit_is_72_bytes_exactly(raw in password()) {
            match check_size("current_password", &raw) {
                Ok(()) => prop_assert!(raw.len() <= MAX_PASSWORD_BYTES),
                Err(v) => {
                    prop_assert!(raw.len() > MAX_PASSWORD_BYTES);
                    prop_assert_eq!(v.field, "current_password");
                    prop_assert_eq!(v.reason, "PASSWORD_TOO_LONG");
                    let got = format!("got {}", raw.len());
                    prop_assert!(v.description.contains(&got), "{:?}", v);
                }
            }
        }

        #[test]
        fn over_72_bytes_is_refused_whatever_the_first_72_are(
            policy in policy(),
            extra in "[a-zA-Zé€😀]{1,30}",
        ) {
            // bcrypt would accept the first 72 bytes and silently ignore the rest, so
            // the whole must be refused.
            let mut raw = GOOD_72.to_owned();
            raw.push_str(&extra);
            let result = NewPassword::parse("p", &raw, &policy, &[]);
            prop_assert_eq!(reasons(&result), ["PASSWORD_TOO_LONG"]);
        }

        #[test]
        fn every_rejection_names_a_documented_rule_once(
            policy in policy(),
            raw in password(),
        ) {
            let result = NewPassword::parse("p", &raw, &policy, &["alice"]);
            match &result {
                Ok(p) => prop_assert_eq!(p.expose(), raw.as_str()),
                Err(violations) => {
                    prop_assert!(!violations.is_empty());
                    for v in violations {
                        prop_assert_eq!(v.field, "p");
                        prop_assert!(RULES.contains(&v.reason), "{:?}", v);
                        prop_assert!(!v.description.is_empty());
                    }
                }
            }
            let mut named = reasons(&result);
            let all = named.len();
            named.sort_unstable();
            named.dedup();
            prop_assert_eq!(named.len(), all, "a rule named twice: {:?}", result.err());
        }

        #[test]
        fn length_and_commonness_are_judged_alike_in_both_modes(
            policy in policy(),
            raw in password(),
        ) {
            let found = reasons(&NewPassword::parse("p", &raw, &policy, &[]));
            if raw.len() > MAX_PASSWORD_BYTES {
                prop_assert_eq!(found, ["PASSWORD_TOO_LONG"]);
            } else {
                // Characters, not bytes.
                prop_assert_eq!(
                    found.contains(&"PASSWORD_TOO_SHORT"),
                    raw.chars().count() < policy.min_length
                );
                prop_assert_eq!(found.contains(&"PASSWORD_TOO_COMMON"), is_common(&raw));
                prop_assert!(!found.contains(&"PASSWORD_TOO_LONG"));
            }
        }

        #[test]
        fn classic_demands_each_class_and_nothing_else(
            min_length in 1usize..=20,
            raw in "[ -~]{0,72}",
        ) {
            let policy = PasswordPolicy {
                mode: PasswordPolicyMode::Classic,
                min_length,
                min_strength: 4,
            };
            let found = reasons(&NewPassword::parse("p", &raw, &policy, &[]));
            // The classes, for printable ASCII, by a model of their own.
            let has = |f: fn(&u8) -> bool| raw.as_bytes().iter().any(f);
            let mut expected = Vec::new();
            if raw.len() < min_length {
                expected.push("PASSWORD_TOO_SHORT");
            }
            for (present, rule) in [
                (has(u8::is_ascii_uppercase), "PASSWORD_NEEDS_UPPERCASE"),
                (has(u8::is_ascii_lowercase), "PASSWORD_NEEDS_LOWERCASE"),
                (has(u8::is_ascii_digit), "PASSWORD_NEEDS_DIGIT"),
                (has(u8::is_ascii_punctuation), "PASSWORD_NEEDS_SPECIAL"),
            ] {
                if !present {
                    expected.push(rule);
                }
            }
            if is_common(&raw) {
                expected.push("PASSWORD_TOO_COMMON");
            }
            // Classic mode never asks zxcvbn.
            prop_assert_eq!(found, expected);
        }

        #[test]
        fn nist_has_no_composition_rules_and_asks_zxcvbn(
            min_strength in 0u8..=4,
            raw in prop_oneof!["[ -~]{0,72}", "[a-zа-яž€😀 ]{0,30}", any::<String>()],
        ) {
            let policy = PasswordPolicy {
                mode: PasswordPolicyMode::Nist,
                min_length: 1,
                min_strength,
            };
            let found = reasons(&NewPassword::parse("p", &raw, &policy, &["alice"]));
            if raw.len() <= MAX_PASSWORD_BYTES {
                prop_assert!(found.iter().all(|r| !r.starts_with("PASSWORD_NEEDS_")), "{:?}", found);
                let score = u8::from(zxcvbn::zxcvbn(&raw, &["alice"]).score());
                prop_assert_eq!(found.contains(&"PASSWORD_TOO_WEAK"), score < min_strength);
            }
        }

        #[test]
        fn nist_counts_unicode_characters_up_to_72_bytes(
            wide in proptest::sample::select(vec!['ž', 'я', 'Ω', '€', '字', '😀']),
            count in 1usize..=40,
        ) {
            let raw: String = std::iter::repeat_n(wide, count).collect();
            let found = reasons(&NewPassword::parse("p", &raw, &NIST, &[]));
            if raw.len() > MAX_PASSWORD_BYTES {
                prop_assert_eq!(found, ["PASSWORD_TOO_LONG"]);
            } else {
                prop_assert_eq!(found.contains(&"PASSWORD_TOO_SHORT"), count < NIST.min_length);
            }
        }

        #[test]
        fn disguised_common_passwords_are_common(raw in disguised_common()) {
            prop_assert!(is_common(&raw), "{:?}", raw);
            prop_assert!(reasons(&classic(&raw)).contains(&"PASSWORD_TOO_COMMON"));
        }

        #[test]
        fn advice_never_repeats_the_password(raw in "[a-z]{8,20}") {
            for v in NewPassword::parse("p", &raw, &NIST, &[]).err().unwrap_or_default() {
                prop_assert!(!v.description.contains(&raw), "{:?}", v);
            }
        }
    }

    /// 72 bytes that pass every policy `policy()` makes.
    const GOOD_72: &str =
        "Vq8#kZ2!mW4$tR7&xL1@yN5*pD3Gh6%Bc9^Jf0(Se4)Ua7-Ix2+Oe5=Ky8?Lz1;Qw6:Rv3<T";

    #[test]
    fn the_good_72_bytes_pass_the_strictest_policies() {
        assert_eq!(GOOD_72.len(), MAX_PASSWORD_BYTES);
        for mode in [PasswordPolicyMode::Classic, PasswordPolicyMode::Nist] {
            let strictest = PasswordPolicy {
                mode,
                min_length: 20,
                min_strength: 4,
            };
            assert!(NewPassword::parse("p", GOOD_72, &strictest, &[]).is_ok());
        }
    }

    /// Found by `disguised_common_passwords_are_common`.
    #[test]
    fn a_swapped_letter_next_to_the_trimmed_symbols_is_still_found() {
        for p in [
            "jessic@@",
            "Jessic@1!",
            "1@dmin",
            "$@dmin",
            "5ecret!",
            "!!p@ssw0rd$$",
        ] {
            assert!(is_common(p), "{p}");
        }
        for p in ["jessicat", "1@dmiral", "Vq8#kZ2!mW4$"] {
            assert!(!is_common(p), "{p}");
        }
    }

    const NIST: PasswordPolicy = PasswordPolicy {
        mode: PasswordPolicyMode::Nist,
        min_length: 15,
        min_strength: 3,
    };

    fn classic(raw: &str) -> Result<NewPassword, Vec<FieldViolation>> {
        let policy = PasswordPolicy {
            mode: PasswordPolicyMode::Classic,
            min_length: 8,
            min_strength: 3,
        };
        NewPassword::parse("p", raw, &policy, &[])
    }
}
