//! The progress line of long commands (`data synth`, `eval`, `train`): rewritten in place on a
//! terminal; in a log, one line per tenth of the work, at the end, and where the caller asks.

use std::io::{IsTerminal, Write};

pub struct ProgressLine {
    tty: bool,
    total: u64,
    shown: bool,
}

impl ProgressLine {
    /// A line for `total` units of work.
    pub fn new(total: u64) -> Self {
        Self { tty: std::io::stderr().is_terminal(), total, shown: false }
    }

    /// `done` units are done; `keep` asks for the line in a log too (a validation step, say).
    /// `line` is only formatted when it is shown.
    pub fn update(&mut self, done: u64, keep: bool, line: impl FnOnce() -> String) {
        if self.tty {
            eprint!("\r{}   ", line());
            let _ = std::io::stderr().flush();
            self.shown = true;
        } else if keep || done == self.total || done % self.total.div_ceil(10).max(1) == 0 {
            eprintln!("{}", line());
        }
    }

    /// Ends the live line on a terminal, so what follows starts on a line of its own.
    pub fn finish(&mut self) {
        if std::mem::take(&mut self.shown) {
            eprintln!();
        }
    }
}
