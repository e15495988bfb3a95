//! Bearer tokens with roles.
//!
//! Each token has a name (for logs; the token itself is never logged) and one
//! or more roles: `infer` (Embed, Predict, the read-only Models calls) and
//! `train` (Trainer, DeleteHead). Health and reflection can stay open for
//! probes and tools. A call without a valid token gets UNAUTHENTICATED; a valid
//! token without the call's role gets PERMISSION_DENIED.
//!
//! Tokens are compared as SHA-256 digests in constant time, against every
//! configured token without stopping at a match, so neither the time nor the
//! order of checks tells an attacker anything about a token.

use std::path::Path;

use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{config::AuthConfig, core::Scope};

/// Environment variable holding tokens, in the tokens-file format (lines or
/// `;`-separated entries); read in addition to `auth.tokens_file`.
pub const TOKENS_ENV: &str = "TLSERVE_AUTH_TOKENS";

/// Shortest accepted token: anything shorter is guessable.
const MIN_TOKEN_CHARS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Infer,
    Train,
}

impl Role {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "infer" => Some(Role::Infer),
            "train" => Some(Role::Train),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Infer => "infer",
            Role::Train => "train",
        }
    }
}

/// What a call path requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    /// Open to anyone (health, reflection when configured so).
    Public,
    Role(Role),
    /// Not one of ours: any valid token (tonic then answers UNIMPLEMENTED).
    AnyToken,
}

struct Token {
    name: String,
    digest: [u8; 32],
    roles: Vec<Role>,
    /// The heads and jobs it may act on.
    scope: Scope,
}

/// The outcome of checking one call.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; the name of the token, if one was needed.
    Allow(Option<String>),
    Unauthenticated(&'static str),
    PermissionDenied(String),
}

impl Decision {
    /// The allowed token's name (None when none was needed), or the error
    /// that refuses the call, whatever transport answers it.
    pub fn into_result(self) -> Result<Option<String>, crate::Error> {
        match self {
            Decision::Allow(token) => Ok(token),
            Decision::Unauthenticated(reason) => {
                Err(crate::Error::Unauthenticated(reason.to_owned()))
            }
            Decision::PermissionDenied(reason) => Err(crate::Error::PermissionDenied(reason)),
        }
    }
}

pub struct Authenticator {
    tokens: Vec<Token>,
    public_health: bool,
    public_reflection: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AuthSetupError(String);

impl Authenticator {
    /// None when authentication is off. Reads `auth.tokens_file` and the
    /// `TLSERVE_AUTH_TOKENS` value given as `env_tokens`.
    pub fn from_config(
        config: &AuthConfig,
        env_tokens: Option<&str>,
    ) -> Result<Option<Self>, AuthSetupError> {
        if !config.enabled {
            return Ok(None);
        }
        let mut tokens = Vec::new();
        if let Some(path) = &config.tokens_file {
            let text = read_tokens_file(path)?;
            tokens.extend(parse_tokens(&text, &path.display().to_string())?);
        }
        if let Some(text) = env_tokens {
            tokens.extend(parse_tokens(&text.replace(';', "\n"), TOKENS_ENV)?);
        }
        if tokens.is_empty() {
            return Err(AuthSetupError(format!(
                "auth.enabled is true but no token is configured (auth.tokens_file or {TOKENS_ENV})"
            )));
        }
        let mut names = std::collections::HashSet::new();
        let mut digests = std::collections::HashSet::new();
        for token in &tokens {
            if !names.insert(token.name.as_str()) {
                return Err(AuthSetupError(format!(
                    "token name `{}` is used twice",
                    token.name
                )));
            }
            if !digests.insert(token.digest) {
                return Err(AuthSetupError(format!(
                    "token `{}` has the same secret as another token",
                    token.name
                )));
            }
        }
        Ok(Some(Self {
            tokens,
            public_health: config.public_health,
            public_reflection: config.public_reflection,
        }))
    }

    pub fn token_names(&self) -> Vec<(&str, Vec<&'static str>)> {
        self.tokens
            .iter()
            .map(|t| {
                (
                    t.name.as_str(),
                    t.roles.iter().map(|r| r.as_str()).collect(),
                )
            })
            .collect()
    }

    /// The heads and jobs the named token may act on.
    pub fn scope(&self, token_name: &str) -> Scope {
        self.tokens
            .iter()
            .find(|t| t.name == token_name)
            .map_or(Scope::All, |t| t.scope.clone())
    }

    pub fn requirement(&self, path: &str) -> Requirement {
        let service = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .map(|(service, _)| service);
        match (service, path) {
            (Some("grpc.health.v1.Health"), _) if self.public_health => Requirement::Public,
            (Some(s), _) if s.starts_with("grpc.reflection.") && self.public_reflection => {
                Requirement::Public
            }
            (_, "/tlserve.v1.Embedder/Embed" | "/tlserve.v1.Predictor/Predict") => {
                Requirement::Role(Role::Infer)
            }
            (
                _,
                "/tlserve.v1.Models/ListBackbones"
                | "/tlserve.v1.Models/ListHeads"
                | "/tlserve.v1.Models/GetHead",
            ) => Requirement::Role(Role::Infer),
            (_, "/tlserve.v1.Models/DeleteHead") => Requirement::Role(Role::Train),
            (Some("tlserve.v1.Trainer"), _) => Requirement::Role(Role::Train),
            _ => Requirement::AnyToken,
        }
    }

    /// Checks the `authorization: Bearer <token>` header of a call to `path`.
    pub fn check(&self, path: &str, headers: &HeaderMap) -> Decision {
        self.check_requirement(self.requirement(path), headers)
    }

    /// Checks the `authorization: Bearer <token>` header against what a call
    /// requires; for transports whose paths are not gRPC methods.
    pub fn check_requirement(&self, requirement: Requirement, headers: &HeaderMap) -> Decision {
        if requirement == Requirement::Public {
            return Decision::Allow(None);
        }
        let Some(presented) = bearer(headers) else {
            return Decision::Unauthenticated(
                "this call needs a token: send `authorization: Bearer <token>`",
            );
        };
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Every token is compared, match or not.
        let mut found: Option<&Token> = None;
        for token in &self.tokens {
            if bool::from(token.digest.ct_eq(&digest)) {
                found = Some(token);
            }
        }
        let Some(token) = found else {
            return Decision::Unauthenticated("the token is not valid");
        };
        match requirement {
            Requirement::Role(role) if !token.roles.contains(&role) => {
                Decision::PermissionDenied(format!(
                    "token `{}` lacks the `{}` role this call needs",
                    token.name,
                    role.as_str()
                ))
            }
            _ => Decision::Allow(Some(token.name.clone())),
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn read_tokens_file(path: &Path) -> Result<String, AuthSetupError> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        AuthSetupError(format!("cannot read tokens file {}: {err}", path.display()))
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o004 != 0 {
                tracing::warn!(file = %path.display(),
                    "the tokens file is readable by every user; restrict it (chmod 600)");
            }
        }
    }
    Ok(text)
}

/// Lines of `NAME ROLES TOKEN [NAMESPACES]`: ROLES is `infer`, `train` or
/// `infer,train`; NAMESPACES, when given, is a comma-separated list of the
/// namespaces whose heads and jobs the token may act on (`*`: all, the
/// default); blank lines and `#` comments are skipped. `origin` names the source in
/// errors, which never quote a token.
fn parse_tokens(text: &str, origin: &str) -> Result<Vec<Token>, AuthSetupError> {
    let mut tokens = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = format!("{origin}, entry {}", number + 1);
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (name, roles, secret, namespaces) = match fields[..] {
            [name, roles, secret] => (name, roles, secret, None),
            [name, roles, secret, namespaces] => (name, roles, secret, Some(namespaces)),
            _ => {
                return Err(AuthSetupError(format!(
                    "{at}: expected `NAME ROLES TOKEN [NAMESPACES]`: three fields, or four with namespaces"
                )))
            }
        };
        if !crate::config::is_valid_name(name) {
            return Err(AuthSetupError(format!(
                "{at}: token name `{name}` must be letters, digits, '-', '_' or '.'"
            )));
        }
        let roles = roles
            .split(',')
            .map(|r| {
                Role::parse(r).ok_or_else(|| {
                    AuthSetupError(format!("{at}: unknown role `{r}` (infer, train)"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if secret.chars().count() < MIN_TOKEN_CHARS {
            return Err(AuthSetupError(format!(
                "{at}: token `{name}` is shorter than {MIN_TOKEN_CHARS} characters"
            )));
        }
        tokens.push(Token {
            name: name.to_owned(),
            digest: Sha256::digest(secret.as_bytes()).into(),
            roles,
            scope: parse_scope(namespaces, &at)?,
        });
    }
    Ok(tokens)
}

fn parse_scope(namespaces: Option<&str>, at: &str) -> Result<Scope, AuthSetupError> {
    let Some(list) = namespaces.filter(|list| *list != "*") else {
        return Ok(Scope::All);
    };
    let namespaces: Vec<String> = list.split(',').map(str::to_owned).collect();
    if let Some(bad) = namespaces
        .iter()
        .find(|n| !crate::config::is_valid_name(n) || n.contains('.'))
    {
        return Err(AuthSetupError(format!(
            "{at}: namespace `{bad}` must be letters, digits, '-' or '_'"
        )));
    }
    Ok(Scope::Namespaces(namespaces.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFER: &str = "infer-token-0123456789";
    const TRAIN: &str = "train-token-0123456789";

    fn auth() -> Authenticator {
        let config = AuthConfig {
            enabled: true,
            tokens_file: None,
            public_health: true,
            public_reflection: false,
        };
        let env = format!("web infer {INFER}; trainer infer,train {TRAIN}");
        Authenticator::from_config(&config, Some(&env))
            .unwrap()
            .unwrap()
    }

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn a_fourth_field_names_the_token_namespaces() {
        let config = AuthConfig {
            enabled: true,
            tokens_file: None,
            public_health: true,
            public_reflection: false,
        };
        let env = format!("a train {TRAIN} team-a,team-b; all infer {INFER} *");
        let auth = Authenticator::from_config(&config, Some(&env))
            .unwrap()
            .unwrap();
        assert_eq!(
            auth.scope("a"),
            Scope::Namespaces(vec!["team-a".to_owned(), "team-b".to_owned()].into())
        );
        assert_eq!(auth.scope("all"), Scope::All);
        for bad in ["x.y", "a/b", ""] {
            let env = format!("a train {TRAIN} {bad},ok");
            assert!(
                Authenticator::from_config(&config, Some(&env)).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn roles_decide_per_method() {
        let auth = auth();
        let embed = "/tlserve.v1.Embedder/Embed";
        let train = "/tlserve.v1.Trainer/TrainHead";
        let delete = "/tlserve.v1.Models/DeleteHead";
        let infer_token = headers(&format!("Bearer {INFER}"));
        let train_token = headers(&format!("bearer {TRAIN}"));
        assert_eq!(
            auth.check(embed, &infer_token),
            Decision::Allow(Some("web".into()))
        );
        assert!(matches!(
            auth.check(train, &infer_token),
            Decision::PermissionDenied(_)
        ));
        assert!(matches!(
            auth.check(delete, &infer_token),
            Decision::PermissionDenied(_)
        ));
        assert_eq!(
            auth.check(delete, &train_token),
            Decision::Allow(Some("trainer".into()))
        );
        for bad in [
            HeaderMap::new(),
            headers("Bearer wrong-token-0123456789"),
            headers(INFER),
            headers("Basic abc"),
            headers("Bearer "),
        ] {
            assert!(matches!(
                auth.check(embed, &bad),
                Decision::Unauthenticated(_)
            ));
        }
        // Health is public here, reflection is not.
        assert_eq!(
            auth.check("/grpc.health.v1.Health/Check", &HeaderMap::new()),
            Decision::Allow(None)
        );
        assert!(matches!(
            auth.check(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                &HeaderMap::new()
            ),
            Decision::Unauthenticated(_)
        ));
    }

    #[test]
    fn bad_token_lists_are_refused_without_quoting_secrets() {
        let config = AuthConfig {
            enabled: true,
            tokens_file: None,
            public_health: true,
            public_reflection: true,
        };
        for (entries, needle) in [
            ("", "no token"),
            ("a infer short", "shorter"),
            ("a admin abcdefghijklmnopqrstuvwxyz", "unknown role"),
            ("a infer", "three fields"),
            ("a/b infer abcdefghijklmnopqrstuvwxyz", "token name"),
            (
                "a infer abcdefghijklmnopqrstuvwxyz;a train zyxwvutsrqponmlkjihgfedcba",
                "twice",
            ),
            (
                "a infer abcdefghijklmnopqrstuvwxyz;b train abcdefghijklmnopqrstuvwxyz",
                "same secret",
            ),
        ] {
            let err = Authenticator::from_config(&config, Some(entries))
                .err()
                .unwrap_or_else(|| panic!("{entries} accepted"))
                .to_string();
            assert!(err.contains(needle), "{entries}: {err}");
            assert!(!err.contains("abcdefghijklmnopqrstuvwxyz"), "{err}");
            assert!(!err.contains("short\n") && !err.ends_with("short"), "{err}");
        }
        let off = AuthConfig {
            enabled: false,
            ..config
        };
        assert!(Authenticator::from_config(&off, None).unwrap().is_none());
    }
}
