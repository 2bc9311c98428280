//! Usernames: 3–32 of `[A-Za-z0-9_]`, compared and stored lower-case.

use super::FieldViolation;

/// The longest username accepted, in characters.
pub const MAX_USERNAME_CHARS: usize = 32;
/// The shortest username accepted, in characters.
pub const MIN_USERNAME_CHARS: usize = 3;

/// A valid, canonical (lower-case) username. `parse` is the only way to make one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Username(String);

impl Username {
    /// Checks `raw` against the rules and lower-cases it.
    pub fn parse(raw: &str) -> Result<Self, FieldViolation> {
        let len = raw.chars().count();
        if !(MIN_USERNAME_CHARS..=MAX_USERNAME_CHARS).contains(&len) {
            return Err(FieldViolation::rule(
                "username",
                if len < MIN_USERNAME_CHARS {
                    "USERNAME_TOO_SHORT"
                } else {
                    "USERNAME_TOO_LONG"
                },
                format!(
                    "must be {MIN_USERNAME_CHARS} to {MAX_USERNAME_CHARS} characters long, got {len}"
                ),
            ));
        }
        if let Some(bad) = raw
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
        {
            return Err(FieldViolation::rule(
                "username",
                "USERNAME_INVALID_CHARACTER",
                format!("may contain only letters A-Z, digits and '_', found {bad:?}"),
            ));
        }
        Ok(Self(raw.to_ascii_lowercase()))
    }

    /// The form Login looks a name up by: surrounding whitespace removed and ASCII
    /// lower-cased, so case and padding variants of a name are one account. Not
    /// necessarily valid: `parse` judges that.
    pub fn canonical(raw: &str) -> String {
        raw.trim().to_ascii_lowercase()
    }

    /// The canonical form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Username {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_lower_cased() {
        assert_eq!(Username::parse("Alice_01").unwrap().as_str(), "alice_01");
    }

    #[test]
    fn length_bounds_are_inclusive() {
        assert!(Username::parse("abc").is_ok());
        assert!(Username::parse(&"a".repeat(32)).is_ok());
        assert!(Username::parse("ab").is_err());
        assert!(Username::parse(&"a".repeat(33)).is_err());
        assert!(Username::parse("").is_err());
    }

    #[test]
    fn only_ascii_letters_digits_and_underscore() {
        for bad in ["al ice", "alice!", "ålice", "alice-x", "alice\0", " alice"] {
            let e = Username::parse(bad).unwrap_err();
            assert_eq!(e.field, "username", "{bad:?}");
        }
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    /// The rule, written out independently of `parse`.
    fn meets_the_rules(raw: &str) -> bool {
        (MIN_USERNAME_CHARS..=MAX_USERNAME_CHARS).contains(&raw.chars().count())
            && raw.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    }

    /// Strings near the rules: mostly name characters, some neighbours of them.
    fn nearly_a_name() -> impl Strategy<Value = String> {
        prop_oneof![
            "[A-Za-z0-9_]{0,40}",
            "[A-Za-z0-9_ \\-.!@åÅßİı\u{212a}\u{0}\t]{0,40}",
            any::<String>(),
        ]
    }

    /// Whitespace `str::trim` removes, ASCII and not.
    fn padding() -> impl Strategy<Value = String> {
        "[ \t\n\r\u{a0}\u{2003}\u{3000}]{0,4}"
    }

    proptest! {
        #![proptest_config(crate::auth::proptest_config(512))]

        #[test]
        fn accepted_exactly_when_the_rules_hold(raw in nearly_a_name()) {
            match Username::parse(&raw) {
                Ok(name) => {
                    prop_assert!(meets_the_rules(&raw));
                    prop_assert_eq!(name.as_str(), raw.to_ascii_lowercase());
                }
                Err(v) => {
                    prop_assert!(!meets_the_rules(&raw));
                    prop_assert_eq!(v.field, "username");
                    prop_assert!(v.reason.starts_with("USERNAME_"), "{:?}", v);
                    prop_assert!(!v.description.is_empty());
                }
            }
        }

        #[test]
        fn each_rejection_names_the_rule_it_breaks(raw in nearly_a_name()) {
            if let Err(v) = Username::parse(&raw) {
                let len = raw.chars().count();
                let expected = if len < MIN_USERNAME_CHARS {
                    "USERNAME_TOO_SHORT"
                } else if len > MAX_USERNAME_CHARS {
                    "USERNAME_TOO_LONG"
                } else {
                    "USERNAME_INVALID_CHARACTER"
                };
                prop_assert_eq!(v.reason, expected, "{:?}", raw);
            }
        }

        #[test]
        fn a_valid_name_round_trips_and_parsing_is_idempotent(raw in "[A-Za-z0-9_]{3,32}") {
            let name = Username::parse(&raw).unwrap();
            prop_assert!(name.as_str().eq_ignore_ascii_case(&raw));
            prop_assert_eq!(Username::parse(name.as_str()).unwrap(), name.clone());
            prop_assert_eq!(Username::canonical(name.as_str()), name.as_str());
            prop_assert_eq!(name.as_ref(), name.as_str());
        }

        #[test]
        fn canonicalisation_is_idempotent(raw in any::<String>()) {
            let once = Username::canonical(&raw);
            prop_assert_eq!(Username::canonical(&once), once.clone());
            prop_assert_eq!(once.trim(), once.as_str());
        }

        #[test]
        fn case_and_padding_variants_are_one_account(
            raw in "[A-Za-z0-9_]{3,32}",
            upper in proptest::collection::vec(any::<bool>(), 32),
            before in padding(),
            after in padding(),
        ) {
            let cased: String = raw
                .chars()
                .zip(&upper)
                .map(|(c, &up)| if up { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() })
                .collect();
            let variant = format!("{before}{cased}{after}");
            let canonical = Username::canonical(&variant);
            // Login's size limit counts the name, not its padding.
            prop_assert_eq!(canonical.chars().count(), raw.len());
            prop_assert!(variant.trim().chars().count() <= MAX_USERNAME_CHARS);
            prop_assert_eq!(
                Username::parse(&canonical).unwrap(),
                Username::parse(&raw).unwrap()
            );
        }

        #[test]
        fn distinct_names_stay_distinct(a in "[a-z0-9_]{3,32}", b in "[a-z0-9_]{3,32}") {
            // Lower-casing never merges two different canonical names.
            prop_assert_eq!(
                Username::parse(&a).unwrap() == Username::parse(&b).unwrap(),
                a == b
            );
        }
    }
}
