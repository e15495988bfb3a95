//! Which heads (and the jobs that train them) a caller may see and change.
//!
//! A namespace `team-a` covers the heads named `team-a.<anything>`. A caller
//! whose token names namespaces acts only inside them; without
//! authentication, or with a token that names none, everything is in scope.
//! Built-in heads (`<backbone>/<classifier>`) belong to no namespace and are
//! readable by every caller.

use std::sync::Arc;

use crate::{head::namespace::namespace_of, Error, Result};

/// The heads a caller may act on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Scope {
    /// Every head.
    #[default]
    All,
    /// The heads of these namespaces (`<namespace>.<name>`).
    Namespaces(Arc<[String]>),
}

impl Scope {
    /// Whether the head (or job for it) named `head_name` is in scope.
    pub fn allows(&self, head_name: &str) -> bool {
        match self {
            Scope::All => true,
            // Token namespaces are non-empty and hold no '.' (auth checks them
            // at start-up), so this is the namespace the quotas count in too.
            Scope::Namespaces(namespaces) => {
                let namespace = namespace_of(head_name);
                !namespace.is_empty() && namespaces.iter().any(|n| n == namespace)
            }
        }
    }

    /// The namespace whose shares of the store's bounds this caller's
    /// uploads count against: its token's first namespace, or "" (one
    /// namespace of their own) for callers whose token names none.
    pub fn quota_namespace(&self) -> &str {
        match self {
            Scope::All => "",
            Scope::Namespaces(namespaces) => namespaces.first().map_or("", String::as_str),
        }
    }

    /// PERMISSION_DENIED unless `head_name` is in scope.
    pub fn check(&self, head_name: &str) -> Result<()> {
        if self.allows(head_name) {
            return Ok(());
        }
        let Scope::Namespaces(namespaces) = self else {
            return Ok(());
        };
        Err(Error::PermissionDenied(format!(
            "head `{head_name}` is outside this token's namespaces ({}); \
             name heads `<namespace>.<name>`",
            namespaces.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_covers_its_dotted_names_only() {
        let scope = Scope::Namespaces(Arc::from(vec!["team-a".to_owned(), "x".to_owned()]));
        assert!(scope.allows("team-a.sentiment"));
        assert!(scope.allows("x.y.z"));
        for outside in [
            "team-a",
            "team-a.",
            "team-ab.s",
            "team-b.s",
            "sentiment",
            "xy.z",
        ] {
            assert!(!scope.allows(outside), "{outside}");
        }
        assert!(matches!(
            scope.check("team-b.s"),
            Err(Error::PermissionDenied(m)) if m.contains("team-a")
        ));
        assert!(Scope::All.allows("anything"));
        assert_eq!(scope.quota_namespace(), "team-a");
        assert_eq!(Scope::All.quota_namespace(), "");
    }
}
