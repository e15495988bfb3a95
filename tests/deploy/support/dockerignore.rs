//! .dockerignore matching, by hand: Docker's rules (Go's filepath.Match plus
//! `**`, every pattern anchored at the context root, `!` exceptions) are not
//! gitignore's, so the `ignore`/`globset` crates would answer differently, and
//! no maintained crate implements Docker's. Ours uses only plain paths, an
//! optional trailing slash and `**/` prefixes, which is all this handles.

/// The patterns of the repository's .dockerignore, comments and blank lines dropped.
pub fn patterns() -> Vec<String> {
    super::read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// Whether a .dockerignore pattern (as written in ours: plain paths, optional
/// trailing slash, `**/` prefixes) excludes `path` from the build context.
pub fn docker_ignored(patterns: &[String], path: &str) -> bool {
    patterns.iter().any(|pattern| {
        let pattern = pattern.trim_end_matches('/');
        match pattern.strip_prefix("**/") {
            Some(anywhere) => path.split('/').any(|part| part == anywhere),
            None => path == pattern || path.starts_with(&format!("{pattern}/")),
        }
    })
}
