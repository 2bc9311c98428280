//! `authorization: Bearer <token>`, read the same way by every part of authd that takes
//! one: the gRPC service, Envoy's Check, and the client layer and interceptor.

/// The token of an `authorization` value: the scheme `Bearer` in any case, a space,
/// then the token, with surrounding white space ignored. `None` for another scheme, or
/// for the scheme alone (`Bearer` followed by nothing but spaces).
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_is_case_insensitive_and_required() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("  bearer   abc  "), Some("abc"));
        assert_eq!(bearer_token("BEARER abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Bearer   "), None);
        assert_eq!(bearer_token("abc"), None);
    }
}
