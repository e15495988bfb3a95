//! Namespaces of head names, for the per-namespace shares of the store's
//! bounds (`heads.max_*_per_namespace`): the namespace `team-a` holds the
//! heads named `team-a.<name>` and the jobs that train them. Names without a
//! namespace (single-tenant use, tokens that reach every namespace) are held
//! to the store-wide bounds only: halving them for a server with one tenant
//! would cost it half its room and protect nobody.

/// The namespace of `head_name`: the part before its first `.` when both it
/// and what follows are non-empty (as token scopes read names), else "".
pub fn namespace_of(head_name: &str) -> &str {
    match head_name.split_once('.') {
        Some((namespace, rest)) if !namespace.is_empty() && !rest.is_empty() => namespace,
        _ => "",
    }
}

/// Whether `namespace`, already holding `held`, is at its share: never for
/// the names outside any namespace, which only the store-wide bound limits.
pub fn at_share(namespace: &str, held: usize, share: usize) -> bool {
    !namespace.is_empty() && held >= share
}

/// How a message names the quota of `namespace` ("" for the names outside
/// any namespace).
pub fn describe(namespace: &str) -> String {
    if namespace.is_empty() {
        "the names outside any namespace".to_owned()
    } else {
        format!("namespace `{namespace}`")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_names_namespace_is_what_precedes_its_first_dot() {
        assert_eq!(namespace_of("team-a.sentiment"), "team-a");
        assert_eq!(namespace_of("x.y.z"), "x");
        for outside in ["sentiment", "team-a.", ".x", ""] {
            assert_eq!(namespace_of(outside), "", "{outside}");
        }
        assert!(describe("").contains("outside"));
        assert!(describe("team-a").contains("`team-a`"));
        assert!(at_share("team-a", 4, 4));
        assert!(!at_share("team-a", 3, 4));
        assert!(
            !at_share("", 1000, 4),
            "unnamespaced names: store-wide bound only"
        );
    }
}
