//! CPU time of other processes (the node daemons), read from `/proc` in two ways:
//!
//! - `/proc/<pid>/stat`: user plus system time of the whole process (all its threads, live
//!   and exited), in clock ticks (`USER_HZ`, usually 100 per second), so each reading is
//!   truncated to 10 ms: a transfer that takes a few milliseconds reads as 0 or 1 tick;
//! - `/proc/<pid>/task/<tid>/schedstat`: the first field is the time the thread ran, in
//!   nanoseconds; summed over the process's threads at the moment of reading, so it misses a
//!   thread that exits between two readings (the nodes' threads live as long as the node).
//!
//! A [`Sample`] holds both; the bench reports the nanosecond sum and keeps the ticks as a
//! cross-check.

use std::time::Duration;

use anyhow::{bail, Context, Result};

/// `USER_HZ`: the unit of `utime` and `stime` in `/proc/<pid>/stat`.
pub fn ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second().max(1)
}

/// CPU time of a set of processes at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// utime + stime from `/proc/<pid>/stat`, summed, in ticks.
    pub ticks: u64,
    /// Run time of their threads from `schedstat`, summed, in nanoseconds; `None` when the
    /// kernel has no schedstat (CONFIG_SCHED_INFO off).
    pub run_ns: Option<u64>,
}

impl Sample {
    /// What was spent from `earlier` to `self`.
    #[must_use]
    pub fn since(self, earlier: Sample) -> Sample {
        Sample {
            ticks: self.ticks.saturating_sub(earlier.ticks),
            run_ns: self
                .run_ns
                .zip(earlier.run_ns)
                .map(|(a, b)| a.saturating_sub(b)),
        }
    }

    /// Adds `other` (both spans).
    #[must_use]
    pub fn plus(self, other: Sample) -> Sample {
        Sample {
            ticks: self.ticks.saturating_add(other.ticks),
            run_ns: self
                .run_ns
                .zip(other.run_ns)
                .map(|(a, b)| a.saturating_add(b)),
        }
    }

    /// The span as a duration: the nanosecond sum, or the ticks without schedstat.
    pub fn duration(self) -> Duration {
        match self.run_ns {
            Some(ns) => Duration::from_nanos(ns),
            None => ticks_to_duration(self.ticks),
        }
    }
}

fn ticks_to_duration(ticks: u64) -> Duration {
    let hz = ticks_per_second();
    Duration::from_secs(ticks / hz) + Duration::from_nanos((ticks % hz) * 1_000_000_000 / hz)
}

/// The processes whose CPU time is summed.
#[derive(Clone, Debug)]
pub struct Processes {
    pids: Vec<u32>,
}

impl Processes {
    /// Watches `pids`.
    pub fn new(pids: Vec<u32>) -> Self {
        Self { pids }
    }

    /// Their pids.
    pub fn pids(&self) -> &[u32] {
        &self.pids
    }

    /// Their CPU time so far, summed.
    pub fn sample(&self) -> Result<Sample> {
        let mut sum = Sample {
            ticks: 0,
            run_ns: Some(0),
        };
        for &pid in &self.pids {
            let path = format!("/proc/{pid}/stat");
            let s = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
            let (_, ticks) = parse_stat(&s).with_context(|| format!("parsing {path}"))?;
            sum = sum.plus(Sample {
                ticks,
                run_ns: threads_run_ns(pid)?,
            });
        }
        Ok(sum)
    }

    /// The command name (`comm`) of each watched process.
    pub fn names(&self) -> Result<Vec<String>> {
        self.pids
            .iter()
            .map(|pid| {
                let path = format!("/proc/{pid}/stat");
                let s =
                    std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
                Ok(parse_stat(&s)?.0.to_string())
            })
            .collect()
    }
}

/// The summed run time of the threads of `pid`; `None` without schedstat files. A thread that
/// exits while the directory is read is skipped.
fn threads_run_ns(pid: u32) -> Result<Option<u64>> {
    let dir = format!("/proc/{pid}/task");
    let mut sum = 0u64;
    for e in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let path = e.with_context(|| format!("listing {dir}"))?.path();
        match std::fs::read_to_string(path.join("schedstat")) {
            Ok(s) => {
                let ns = s
                    .split_ascii_whitespace()
                    .next()
                    .and_then(|f| f.parse::<u64>().ok())
                    .with_context(|| format!("{}/schedstat says {s:?}", path.display()))?;
                sum = sum.saturating_add(ns);
            }
            // A thread that exited between the listing and the read (ESRCH, 3), or the kernel
            // has no schedstat (ENOENT): the former's time left with it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(3) => {
                if !std::path::Path::new(&format!("/proc/{pid}/schedstat")).exists() {
                    return Ok(None);
                }
            }
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}/schedstat", path.display()))
            }
        }
    }
    Ok(Some(sum))
}

/// `comm` and utime + stime from the text of `/proc/<pid>/stat`. The command name sits in
/// parentheses and may hold spaces and parentheses itself, so the fields are counted from the
/// last `)`: the state is field 3, utime field 14 and stime field 15.
fn parse_stat(s: &str) -> Result<(&str, u64)> {
    let open = s.find('(').context("no '(' before the command name")?;
    let close = s.rfind(')').context("no ')' after the command name")?;
    if close < open {
        bail!("')' before '('");
    }
    let comm = &s[open + 1..close];
    let fields: Vec<&str> = s[close + 1..].split_ascii_whitespace().collect();
    // fields[0] is field 3 (state).
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .with_context(|| format!("only {} fields after the name", fields.len()))?
            .parse::<u64>()
            .with_context(|| format!("field {n} is not a number"))
    };
    Ok((comm, field(14)?.saturating_add(field(15)?)))
}

/// CPU seconds per GiB (2^30 bytes) moved; `None` when nothing moved.
#[allow(clippy::cast_precision_loss)]
pub fn secs_per_gib(cpu: Duration, bytes: u64) -> Option<f64> {
    (bytes > 0).then(|| cpu.as_secs_f64() / (bytes as f64 / f64::from(1u32 << 30)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_name_with_spaces_and_parentheses() {
        let s = "4242 (a b) (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 17 0 0 20 0 9 0 1 2 3";
        assert_eq!(parse_stat(s).unwrap(), ("a b) (c)", 267));
        assert!(parse_stat("1 (x) S 1 2").is_err());
        assert!(parse_stat("1 x S").is_err());
        let bad = "1 (x) S 1 1 1 0 -1 0 0 0 0 0 nope 3 0";
        assert!(parse_stat(bad).is_err());
    }

    /// Burns CPU on this thread until `done` says so (or fails after 30 s).
    fn burn_until(mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut x = 0u64;
        while !done() {
            for i in 0..100_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            assert!(std::time::Instant::now() < deadline, "no CPU time charged");
        }
        std::hint::black_box(x);
    }

    #[test]
    fn both_sources_count_the_cpu_this_process_burns() {
        let me = Processes::new(vec![std::process::id()]);
        assert_eq!(me.names().unwrap().len(), 1);
        let before = me.sample().unwrap();
        // Two ticks are at least 20 ms at USER_HZ 100.
        burn_until(|| me.sample().unwrap().ticks >= before.ticks + 2);
        let spent = me.sample().unwrap().since(before);
        assert!(spent.ticks >= 2);
        let tick = ticks_to_duration(1);
        assert!(spent.duration() >= tick, "{spent:?}");
        if let Some(ns) = spent.run_ns {
            // The two sources agree to within the tick truncation at both ends.
            let by_ticks = ticks_to_duration(spent.ticks).as_nanos();
            let diff = u128::from(ns).abs_diff(by_ticks);
            assert!(
                diff <= 3 * tick.as_nanos(),
                "{ns} ns vs {by_ticks} ns by ticks"
            );
        }
        assert!(Processes::new(vec![u32::MAX]).sample().is_err());
    }

    #[test]
    fn spans_and_rates() {
        let a = Sample {
            ticks: 5,
            run_ns: Some(100),
        };
        let b = Sample {
            ticks: 9,
            run_ns: Some(350),
        };
        assert_eq!(
            b.since(a),
            Sample {
                ticks: 4,
                run_ns: Some(250)
            }
        );
        assert_eq!(b.since(a).plus(b.since(a)).run_ns, Some(500));
        let no_ns = Sample {
            ticks: ticks_per_second(),
            run_ns: None,
        };
        assert_eq!(no_ns.since(a).run_ns, None);
        assert_eq!(no_ns.duration(), Duration::from_secs(1));
        assert_eq!(
            ticks_to_duration(ticks_per_second() * 3 / 2).as_millis(),
            1500
        );
        assert_eq!(secs_per_gib(Duration::from_secs(1), 1 << 30), Some(1.0));
        assert_eq!(secs_per_gib(Duration::from_secs(1), 1 << 29), Some(2.0));
        assert_eq!(secs_per_gib(Duration::from_secs(1), 0), None);
    }
}
