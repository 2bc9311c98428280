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
            return Err(FieldViolation::new(
                "username",
                format!(
                    "must be {MIN_USERNAME_CHARS} to {MAX_USERNAME_CHARS} characters long, got {len}"
                ),
            ));
        }
        if let Some(bad) = raw
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
        {
            return Err(FieldViolation::new(
                "username",
                format!("may contain only letters A-Z, digits and '_', found {bad:?}"),
            ));
        }
        Ok(Self(raw.to_ascii_lowercase()))
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
