//! Roles: short names an operator gives users (`admin`, `billing:read`), returned with
//! every answer about a token. Stored comma-framed (`,admin,ops,`, empty for none), so
//! one `LIKE '%,name,%'` finds a role's holders on either database.

use super::FieldViolation;

/// The role that may call AdminService.
pub const ADMIN_ROLE: &str = "admin";
/// The most roles one user holds.
pub const MAX_ROLES: usize = 32;
/// The longest role name, in bytes.
pub const MAX_ROLE_BYTES: usize = 30;

/// Whether `name` is a role name: 1–30 of `[a-z0-9_.:-]`, starting with a letter or a
/// digit. Lower-case only, so `Admin` cannot pass for someone else's `admin`.
pub fn valid_role(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_ROLE_BYTES
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.:-".contains(&b))
}

/// The roles of a request, checked, without repeats, sorted; or what is wrong.
pub fn parse_roles(
    field: &'static str,
    roles: &[impl AsRef<str>],
) -> Result<Vec<String>, FieldViolation> {
    if roles.len() > MAX_ROLES {
        return Err(FieldViolation::new(
            field,
            format!("must hold at most {MAX_ROLES} roles"),
        ));
    }
    let mut out = Vec::with_capacity(roles.len());
    for role in roles {
        let role = role.as_ref().trim();
        if !valid_role(role) {
            return Err(FieldViolation::new(
                field,
                format!(
                    "{:?} is not a role name: 1-{MAX_ROLE_BYTES} of a-z 0-9 _ . : - starting with a letter or digit",
                    crate::store::truncate(role, 40)
                ),
            ));
        }
        out.push(role.to_owned());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// `roles` as stored: `,a,b,`, or empty.
pub fn frame(roles: &[String]) -> String {
    if roles.is_empty() {
        String::new()
    } else {
        format!(",{},", roles.join(","))
    }
}

/// Stored roles as a list.
pub fn unframe(stored: &str) -> Vec<String> {
    stored
        .split(',')
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_checked_sorted_and_framed() {
        let roles = parse_roles("roles", &["ops", "admin", "ops"]).unwrap();
        assert_eq!(roles, ["admin", "ops"]);
        assert_eq!(frame(&roles), ",admin,ops,");
        assert_eq!(unframe(",admin,ops,"), roles);
        assert!(unframe("").is_empty());
        assert_eq!(frame(&[]), "");
        for bad in ["", "Admin", "a,b", "-x", "x y", "é", &"a".repeat(31)] {
            assert!(parse_roles("roles", &[bad]).is_err(), "{bad:?}");
        }
        assert!(parse_roles("roles", &["billing:read", "a.b-c_d", "7"]).is_ok());
        let many: Vec<String> = (0..=MAX_ROLES).map(|i| format!("r{i}")).collect();
        assert!(parse_roles("roles", &many).is_err());
    }
}
