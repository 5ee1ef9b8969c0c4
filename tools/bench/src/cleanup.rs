//! Owners of what the transfer benchmark creates outside its own process: child processes,
//! network namespaces and temporary directories. Each is released by its guard's `Drop`, and,
//! when the benchmark is interrupted (SIGINT, SIGTERM, SIGHUP), by [`on_signal_clean_up`],
//! which tears down everything still registered and exits.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rustix::process::{kill_process, Pid, Signal};

/// What is still to be torn down, for the signal path.
struct Registry {
    pids: Vec<i32>,
    netns: Vec<String>,
    dirs: Vec<PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    pids: Vec::new(),
    netns: Vec::new(),
    dirs: Vec::new(),
});

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Starts a thread that, on SIGINT, SIGTERM or SIGHUP, stops every registered child, deletes
/// every registered namespace and directory, and exits with status 130.
pub fn on_signal_clean_up() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("fp-bench-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                eprintln!("\nsignal {sig}: cleaning up");
                // Held until exit: guards dropped meanwhile by the main thread wait here
                // instead of racing this teardown or ending the process before it is done.
                let r = registry();
                let pids: Vec<Pid> = r.pids.iter().filter_map(|&p| Pid::from_raw(p)).collect();
                for &p in &pids {
                    let _ = kill_process(p, Signal::TERM);
                }
                std::thread::sleep(Duration::from_millis(500));
                for &p in &pids {
                    let _ = kill_process(p, Signal::KILL);
                }
                for ns in &r.netns {
                    ip_netns_del(ns);
                }
                for d in &r.dirs {
                    let _ = std::fs::remove_dir_all(d);
                }
                std::process::exit(130);
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// A child process stopped on drop: SIGTERM, then SIGKILL after a grace period.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    name: String,
    grace: Duration,
}

impl ChildGuard {
    /// Spawns `cmd`; `name` appears in messages.
    pub fn spawn(mut cmd: Command, name: &str) -> Result<Self> {
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        registry()
            .pids
            .push(i32::try_from(child.id()).unwrap_or(i32::MAX));
        Ok(Self {
            child,
            name: name.to_string(),
            grace: Duration::from_secs(5),
        })
    }

    /// The child, e.g. to read its pipes or poll it.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits for the child to exit on its own, up to `timeout`; kills it after that.
    pub fn wait_for_exit(mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                anyhow::bail!("{} did not finish within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = Pid::from_child(&self.child);
        let _ = kill_process(pid, Signal::TERM);
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "{} ignored SIGTERM for {:?}: killing it",
            self.name, self.grace
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
        let id = i32::try_from(self.child.id()).unwrap_or(i32::MAX);
        registry().pids.retain(|&p| p != id);
    }
}

/// A directory removed (with its contents) on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `path` with mode 0700; it must not exist yet.
    pub fn create(path: PathBuf) -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        registry().dirs.push(path.clone());
        Ok(Self(path))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let mut r = registry();
        if let Some(i) = r.dirs.iter().position(|d| d == &self.0) {
            r.dirs.swap_remove(i);
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Registers a namespace for deletion on a signal (the owner deletes it otherwise).
pub fn register_netns(name: &str) {
    registry().netns.push(name.to_string());
}

/// Forgets a namespace that was registered but never created.
pub fn forget_netns(name: &str) {
    registry().netns.retain(|n| n != name);
}

/// Deletes a registered namespace now (unless the signal path already did).
pub fn delete_netns(name: &str) {
    let mut r = registry();
    if let Some(i) = r.netns.iter().position(|n| n == name) {
        r.netns.swap_remove(i);
        ip_netns_del(name);
    }
}

/// `ip netns del NAME`; errors are reported, not returned.
fn ip_netns_del(name: &str) {
    match Command::new("ip").args(["netns", "del", name]).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => eprintln!(
            "ip netns del {name}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => eprintln!("ip netns del {name}: {e}"),
    }
}
