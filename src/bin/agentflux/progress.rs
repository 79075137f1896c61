//! The progress line of long commands (`data synth`, `eval`, `train`): a bar, the rate and the
//! time left, then the command's own words; rewritten in place on a terminal; in a log, one line
//! per tenth of the work, at the end, and where the caller asks.

use std::io::{IsTerminal, Write};
use std::time::Instant;

pub struct ProgressLine {
    tty: bool,
    total: u64,
    shown: bool,
    started: Instant,
}

impl ProgressLine {
    /// A line for `total` units of work.
    pub fn new(total: u64) -> Self {
        Self { tty: std::io::stderr().is_terminal(), total, shown: false, started: Instant::now() }
    }

    /// `done` units are done; `keep` asks for the line in a log too (a validation step, say).
    /// `line` is only formatted when it is shown.
    pub fn update(&mut self, done: u64, keep: bool, line: impl FnOnce() -> String) {
        if self.tty {
            eprint!("\r{} {}   ", gauge(done, self.total, self.started.elapsed().as_secs_f64()), line());
            let _ = std::io::stderr().flush();
            self.shown = true;
        } else if keep || done == self.total || done % self.total.div_ceil(10).max(1) == 0 {
            eprintln!("{} {}", gauge(done, self.total, self.started.elapsed().as_secs_f64()), line());
        }
    }

    /// Ends the live line on a terminal, so what follows starts on a line of its own.
    pub fn finish(&mut self) {
        if std::mem::take(&mut self.shown) {
            eprintln!();
        }
    }
}

/// `[#####-----] 50% · 2.0/s · 1:05 left` for `done` of `total` after `secs`.
fn gauge(done: u64, total: u64, secs: f64) -> String {
    const WIDTH: u64 = 20;
    let total = total.max(1);
    let filled = (done.min(total) * WIDTH / total) as usize;
    let bar = format!("[{}{}]", "#".repeat(filled), "-".repeat(WIDTH as usize - filled));
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    let left = if rate > 0.0 && done < total {
        let s = ((total - done) as f64 / rate).round() as u64;
        format!(" · {}:{:02} left", s / 60, s % 60)
    } else {
        String::new()
    };
    let rate = if rate >= 1.0 { format!("{rate:.1}/s") } else { format!("{:.1} s each", if rate > 0.0 { 1.0 / rate } else { 0.0 }) };
    format!("{bar} {:>3}% · {rate}{left}", done.min(total) * 100 / total)
}

#[cfg(test)]
mod tests {
    use super::gauge;

    #[test]
    fn the_gauge_shows_share_rate_and_time_left() {
        assert_eq!(gauge(5, 10, 2.5), "[##########----------]  50% · 2.0/s · 0:03 left");
        assert_eq!(gauge(1, 40, 30.0), "[--------------------]   2% · 30.0 s each · 19:30 left");
        assert_eq!(gauge(10, 10, 4.0), "[####################] 100% · 2.5/s");
        assert_eq!(gauge(0, 0, 0.0), "[--------------------]   0% · 0.0 s each");
    }
}
