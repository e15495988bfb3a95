//! Environment overrides: a `TLSERVE__SECTION__KEY` variable sets the value at
//! that path of the parsed file before it is typed and validated.

use super::ConfigError;

/// Prefix of environment variables that override file settings.
pub const ENV_PREFIX: &str = "TLSERVE__";

/// Sets the value at the path that `var` names, creating tables on the way.
pub(super) fn apply_override(
    root: &mut toml::Value,
    var: &str,
    raw: &str,
) -> Result<(), ConfigError> {
    let env_err = |reason: String| ConfigError::Env {
        var: var.to_owned(),
        reason,
    };
    let path: Vec<String> = var[ENV_PREFIX.len()..]
        .split("__")
        .map(str::to_ascii_lowercase)
        .collect();
    if path.iter().any(String::is_empty) {
        return Err(env_err("empty path segment".into()));
    }
    let value = parse_env_value(raw);
    let mut node = root;
    for (depth, key) in path.iter().enumerate() {
        let last = depth + 1 == path.len();
        node = match node {
            toml::Value::Table(table) => {
                if last {
                    table.insert(key.clone(), value);
                    return Ok(());
                }
                table
                    .entry(key.clone())
                    .or_insert_with(|| toml::Value::Table(Default::default()))
            }
            toml::Value::Array(items) => {
                let index: usize = key
                    .parse()
                    .map_err(|_| env_err(format!("`{key}` is not an array index")))?;
                let len = items.len();
                let slot = items.get_mut(index).ok_or_else(|| {
                    env_err(format!("index {index} is out of range (array has {len})"))
                })?;
                if last {
                    *slot = value;
                    return Ok(());
                }
                slot
            }
            _ => return Err(env_err(format!("`{key}` is below a plain value"))),
        };
    }
    Ok(())
}

fn parse_env_value(raw: &str) -> toml::Value {
    // Parse as the right-hand side of a TOML assignment to reuse TOML's literals.
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut table| table.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{
        tests::{env, MINIMAL},
        Config, ConfigError, LogFormat,
    };

    #[test]
    fn environment_overrides_nested_and_indexed_values() {
        let config = Config::from_toml(
            MINIMAL,
            Path::new("."),
            env(&[
                ("TLSERVE__SERVER__LISTEN", "127.0.0.1:7000"),
                ("TLSERVE__LOGGING__FORMAT", "json"),
                ("TLSERVE__LIMITS__MAX_INPUTS_PER_REQUEST", "8"),
                ("TLSERVE__BACKBONES__0__NORMALIZE", "false"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.server.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(config.logging.format, LogFormat::Json);
        assert_eq!(config.limits.max_inputs_per_request, 8);
        assert!(!config.backbones[0].normalize);
    }

    #[test]
    fn bad_overrides_and_values_are_reported() {
        let err = Config::from_toml(
            MINIMAL,
            Path::new("."),
            env(&[("TLSERVE__BACKBONES__3__DEVICE", "cpu")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");

        let err = Config::from_toml(
            MINIMAL,
            Path::new("."),
            env(&[("TLSERVE__SERVER__LISTEN", "not-an-address")]),
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)), "{err}");
    }
}
