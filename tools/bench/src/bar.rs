//! A progress bar on stderr (never stdout): one redrawn line on a terminal, one line per step
//! otherwise, so logs stay readable.

use std::io::{IsTerminal, Write};
use std::time::Instant;

/// Progress over a known number of steps.
#[derive(Debug)]
pub struct Bar {
    total: usize,
    done: usize,
    tty: bool,
    started: Instant,
    drawn: bool,
}

const WIDTH: usize = 30;

impl Bar {
    /// A bar of `total` steps.
    pub fn new(total: usize) -> Self {
        Self {
            total: total.max(1),
            done: 0,
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
            drawn: false,
        }
    }

    /// Shows `what` as the step under way.
    pub fn show(&mut self, what: &str) {
        if self.tty {
            let line = self.line(what);
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r\x1b[2K{line}");
            let _ = e.flush();
            self.drawn = true;
        }
    }

    /// Marks one step done, with its result.
    pub fn step(&mut self, result: &str) {
        self.done = (self.done + 1).min(self.total);
        if self.tty {
            self.show(result);
        } else {
            eprintln!("{}", self.line(result));
        }
    }

    /// Marks `n` steps done without a result (skipped after a failure).
    pub fn skip(&mut self, n: usize) {
        self.done = (self.done + n).min(self.total);
    }

    /// Prints a message on its own line without breaking the bar.
    pub fn note(&mut self, msg: &str) {
        let mut e = std::io::stderr().lock();
        if self.tty && self.drawn {
            let _ = write!(e, "\r\x1b[2K");
        }
        let _ = writeln!(e, "{msg}");
        self.drawn = false;
    }

    /// Ends the bar's line.
    pub fn finish(&mut self) {
        if self.tty && self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }

    fn line(&self, what: &str) -> String {
        let filled = self.done * WIDTH / self.total;
        format!(
            "[{}{}] {:>3}/{} {:>5.0}s  {what}",
            "#".repeat(filled),
            ".".repeat(WIDTH - filled),
            self.done,
            self.total,
            self.started.elapsed().as_secs_f64()
        )
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.finish();
    }
}
