//! A status line on standard error: redrawn in place on a terminal, where a
//! person watches it; written as ordinary lines (or not at all) elsewhere,
//! where logs keep it.

use std::io::{IsTerminal, Write};

pub struct StatusLine {
    terminal: bool,
    /// Whether a line is drawn and not yet ended.
    open: bool,
}

impl StatusLine {
    pub fn stderr() -> Self {
        Self {
            terminal: std::io::stderr().is_terminal(),
            open: false,
        }
    }

    pub fn is_terminal(&self) -> bool {
        self.terminal
    }

    /// Redraws the line on a terminal; does nothing elsewhere.
    pub fn update(&mut self, line: &str) {
        if self.terminal {
            let mut stderr = std::io::stderr().lock();
            // \x1b[K clears what a longer previous line left behind.
            let _ = write!(stderr, "\r{line}\x1b[K");
            let _ = stderr.flush();
            self.open = true;
        }
    }

    /// Ends any drawn line and writes `line` as a line of its own.
    pub fn println(&mut self, line: &str) {
        self.end();
        eprintln!("{line}");
    }

    /// Ends a drawn line, so that what follows starts on a line of its own.
    pub fn end(&mut self) {
        if self.open {
            eprintln!();
            self.open = false;
        }
    }
}

impl Drop for StatusLine {
    fn drop(&mut self) {
        self.end();
    }
}
