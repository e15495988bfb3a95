//! Structured logging with `tracing`: human-readable or JSON lines on stderr.

use tracing_subscriber::{fmt, EnvFilter};

use crate::config::LogFormat;

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `level`.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, never into files or collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    // try_init: a second call (tests, embedding) keeps the first subscriber.
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Most characters of a client-supplied string that reach a log line.
pub const MAX_LOGGED_CHARS: usize = 200;

/// A client-supplied string made safe for a log line in any format: control
/// characters (newlines, ANSI escapes, NUL) escaped so a string cannot forge
/// or colour a line, and cut to [`MAX_LOGGED_CHARS`] characters with a count
/// of what was left out.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_LOGGED_CHARS + 16));
    let mut chars = text.chars();
    for c in chars.by_ref().take(MAX_LOGGED_CHARS) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    let rest = chars.count();
    if rest > 0 {
        out.push_str(&format!("... ({rest} more characters)"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_strings_cannot_forge_colour_or_flood_a_line() {
        assert_eq!(
            printable("a\nINFO forged\u{1b}[31m\0"),
            "a\\nINFO forged\\u{1b}[31m\\u{0}"
        );
        let long = printable(&"x".repeat(5000));
        assert!(long.starts_with(&"x".repeat(MAX_LOGGED_CHARS)));
        assert!(long.ends_with("(4800 more characters)"), "{long}");
        assert_eq!(printable("é ok"), "é ok");
    }
}
