//! Tests against a node daemon running as its own process, with clients in other processes:
//! many concurrent clients with every byte checked, clients killed with SIGKILL mid-work, and
//! a daemon killed under its clients.
//!
//! Client processes are this test binary run again with `FP_CHILD` set: see `child_entry`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{eventually, opts, pattern, Daemon};
use ferroplasma::client::{Client, GetError, RequestError};
use ferroplasma::protocol::{DeleteStatus, ObjectState};
use ferroplasma::ObjectId;

fn spawn_child(mode: &str, socket: &Path, args: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "child_entry",
        "--exact",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env("FP_CHILD", mode)
    .env("FP_SOCKET", socket)
    .stdout(Stdio::piped());
    for (k, v) in args {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn wait_line(child: &mut Child, want: &str) {
    let out = child.stdout.as_mut().unwrap();
    let mut r = BufReader::new(out);
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            r.read_line(&mut line).unwrap() > 0,
            "child exited before printing {want:?}"
        );
        if line.trim().ends_with(want) {
            return;
        }
    }
}

fn sigkill(child: &mut Child) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
    let _ = child.wait();
}

const WORKERS: u8 = 8;
const PER_WORKER: u8 = 40;

fn object_id(c: &Client, worker: u8, i: u8) -> ObjectId {
    let mut u = [0u8; 16];
    u[0] = worker;
    u[1] = i;
    c.id_with(u)
}

fn marker_id(c: &Client, worker: u8) -> ObjectId {
    let mut u = [0xffu8; 16];
    u[0] = worker;
    c.id_with(u)
}

fn object_size(worker: u8, i: u8) -> usize {
    [100, 10_000, 300_000, 2_000_000][usize::from(worker + i) % 4]
}

fn seed(worker: u8, i: u8) -> u64 {
    u64::from(worker) << 8 | u64::from(i)
}

/// Child process bodies. Without `FP_CHILD` this returns at once: it is an entry point for
/// the tests below, not a test of its own.
#[test]
fn child_entry() {
    let Ok(mode) = std::env::var("FP_CHILD") else {
        return;
    };
    let socket = std::env::var("FP_SOCKET").unwrap();
    let mut o = opts();
    if let Ok(ms) = std::env::var("FP_CREATE_TIMEOUT_MS") {
        o.create_timeout = Duration::from_millis(ms.parse().unwrap());
    }
    let c = Client::connect_with(&socket, o).unwrap();
    match mode.as_str() {
        "worker" => {
            let me: u8 = std::env::var("FP_WORKER").unwrap().parse().unwrap();
            let next = (me + 1) % WORKERS;
            let prev = (me + WORKERS - 1) % WORKERS;
            // 1. Write my objects, half of them through create + in-place write + seal.
            for i in 0..PER_WORKER {
                let id = object_id(&c, me, i);
                let data = pattern(seed(me, i), object_size(me, i));
                if i % 2 == 0 {
                    c.put_with(id, &data, &[me, i]).unwrap();
                } else {
                    let mut b = c.create_with(id, data.len() as u64, 2).unwrap();
                    b.data_mut().copy_from_slice(&data);
                    b.metadata_mut().copy_from_slice(&[me, i]);
                    b.seal().unwrap();
                }
                let v = c.get(&[id], Duration::ZERO).unwrap();
                assert_eq!(&*v[0], &data[..], "worker {me} own object {i}");
            }
            // 2. Read every object of the next worker, waiting for those not yet sealed.
            for i in 0..PER_WORKER {
                let id = object_id(&c, next, i);
                let v = c.get(&[id], Duration::from_secs(60)).unwrap();
                assert_eq!(&*v[0], &pattern(seed(next, i), object_size(next, i))[..]);
                assert_eq!(v[0].metadata(), &[next, i]);
            }
            c.put_with(marker_id(&c, me), b"done", &[]).unwrap();
            // 3. Once the previous worker has read mine, delete the even ones.
            c.get(&[marker_id(&c, prev)], Duration::from_secs(60))
                .unwrap();
            let evens: Vec<ObjectId> = (0..PER_WORKER)
                .step_by(2)
                .map(|i| object_id(&c, me, i))
                .collect();
            let st = c.delete(&evens).unwrap();
            // The previous worker's releases of its views travel behind its marker, so a delete
            // may find an object still pinned and be deferred until the pin goes.
            assert!(
                st.iter()
                    .all(|s| matches!(s, DeleteStatus::Deleted | DeleteStatus::Deferred)),
                "{st:?}"
            );
            println!("worker-ok");
        }
        "hold" => {
            // Pin an object, leave another half-written, then wait to be killed.
            let target: ObjectId = std::env::var("FP_TARGET").unwrap().parse().unwrap();
            let views = c.get(&[target], Duration::from_secs(10)).unwrap();
            let mut b = c.create(5 << 20).unwrap();
            b.data_mut()[..1 << 20].fill(7);
            println!("ready");
            std::thread::sleep(Duration::from_secs(120));
            drop((views, b));
        }
        "churn" => {
            // Create, write and seal as fast as possible (keeping every fourth object, pins
            // on the target coming and going), then create once more and stop there, the
            // object unsealed, until killed.
            let target: ObjectId = std::env::var("FP_TARGET").unwrap().parse().unwrap();
            let rounds: u64 = std::env::var("FP_ROUNDS").unwrap().parse().unwrap();
            let size = |i: u64| [10u64, 100_000, 1 << 20][(i % 3) as usize];
            for i in 0..rounds {
                let _v = c.get(&[target], Duration::ZERO).unwrap();
                let mut b = c.create(size(i)).unwrap();
                b.data_mut().fill(1);
                let id = b.seal().unwrap();
                if i % 4 != 0 {
                    c.delete(&[id]).unwrap();
                }
            }
            let _v = c.get(&[target], Duration::ZERO).unwrap();
            let mut b = c.create(size(rounds)).unwrap();
            b.data_mut().fill(1);
            println!("holding");
            std::thread::sleep(Duration::from_secs(120));
            drop(b);
        }
        other => panic!("unknown child mode {other}"),
    }
}

#[test]
fn eight_client_processes_put_get_delete_with_every_byte_checked() {
    let d = Daemon::start("eight", "512MiB");
    eight_workers(&d, &ObjectState::Sealed);
}

/// The same eight processes through a 64 MiB arena, three times smaller than what they
/// write: objects are spilled and restored while others read and delete them.
#[test]
fn eight_client_processes_through_a_spilling_node() {
    let dir = std::env::temp_dir().join(format!("fp-proc-spill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = Daemon::start_with(
        "eightspill",
        "64MiB",
        &["--spill-dir", dir.to_str().unwrap()],
    );
    eight_workers(&d, &ObjectState::Spilled);
    let s = d.client().stats().unwrap();
    assert!(s.spills > 0 && s.restores > 0, "{s:?}");
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A spilling daemon SIGKILLed leaves its lock file, its spill files and its socket behind;
/// a node started again on that socket and spill directory takes the socket over, takes the
/// lock (now naming it) and removes the stale spill files.
#[test]
fn a_node_restarts_on_the_spill_directory_of_a_killed_one() {
    let dir = std::env::temp_dir().join(format!("fp-proc-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let args = ["--spill-dir", dir.to_str().unwrap()];
    let mut d = Daemon::start_with("restart", "32MiB", &args);
    let c = Client::connect_with(
        &d.socket,
        ferroplasma::client::ClientOptions {
            create_timeout: Duration::from_secs(30),
            ..opts()
        },
    )
    .unwrap();
    for i in 0..40 {
        c.put(&pattern(i, 2 << 20)).unwrap();
    }
    assert!(c.stats().unwrap().spilled_objects > 0);
    // Sorted: `read_dir` order is not guaranteed between two listings.
    let spill_files = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".spill"))
            .collect();
        v.sort();
        v
    };
    let stale = spill_files();
    assert!(!stale.is_empty());
    sigkill(&mut d.child);
    drop(c);
    let lock = dir.join("ferroplasma.lock");
    let old_pid = d.child.id();
    assert!(std::fs::read_to_string(&lock)
        .unwrap()
        .contains(&format!("pid {old_pid}\n")));
    assert_eq!(spill_files(), stale, "a killed node leaves its files");

    let socket = d.socket.clone();
    // Not dropped: its `Drop` removes the socket file, which a killed node leaves behind.
    std::mem::forget(d);
    let d = Daemon::start_at(socket, "32MiB", &args);
    let text = std::fs::read_to_string(&lock).unwrap();
    assert!(
        text.contains(&format!("pid {}\n", d.child.id())),
        "the new node holds the lock: {text}"
    );
    assert_eq!(
        spill_files(),
        Vec::<String>::new(),
        "stale spill files removed"
    );
    let c = d.client();
    let id = c.put(b"after the restart").unwrap();
    assert_eq!(
        &*c.get(&[id], Duration::ZERO).unwrap()[0],
        b"after the restart"
    );
    drop((c, d));
    let _ = std::fs::remove_dir_all(&dir);
}

fn eight_workers(d: &Daemon, also_ok: &ObjectState) {
    let mut kids: Vec<Child> = (0..WORKERS)
        .map(|w| {
            spawn_child(
                "worker",
                &d.socket,
                &[
                    ("FP_WORKER", w.to_string()),
                    ("FP_CREATE_TIMEOUT_MS", "60000".into()),
                ],
            )
        })
        .collect();
    for (w, k) in kids.iter_mut().enumerate() {
        wait_line(k, "worker-ok");
        assert!(k.wait().unwrap().success(), "worker {w} failed");
    }
    // What is left: the odd objects and the markers, all sealed, nothing pinned, and every
    // byte still right.
    let c = d.client();
    let expected = usize::from(WORKERS) * (usize::from(PER_WORKER) / 2 + 1);
    // Deferred deletes complete once the exited workers' pins are released.
    common::eventually("the deferred deletes to complete", || {
        c.list().unwrap().len() == expected
    });
    let list = c.list().unwrap();
    assert_eq!(list.len(), expected);
    assert!(list
        .iter()
        .all(|e| (e.state == ObjectState::Sealed || e.state == *also_ok) && e.pins == 0));
    for w in 0..WORKERS {
        for i in (1..PER_WORKER).step_by(2) {
            let v = c.get(&[object_id(&c, w, i)], Duration::ZERO).unwrap();
            assert_eq!(&*v[0], &pattern(seed(w, i), object_size(w, i))[..]);
        }
    }
    assert_eq!(c.stats().unwrap().clients, 1);
}

#[test]
fn sigkill_of_a_client_releases_its_pins_and_aborts_its_unsealed_objects() {
    let d = Daemon::start("sigkill", "64MiB");
    let c = d.client();
    let target = c.put(&pattern(1, 300_000)).unwrap();
    let before = c.stats().unwrap();
    let mut kid = spawn_child("hold", &d.socket, &[("FP_TARGET", target.to_hex())]);
    wait_line(&mut kid, "ready");
    let s = c.stats().unwrap();
    assert_eq!((s.pins, s.objects, s.clients), (1, 2, 2), "{s:?}");
    sigkill(&mut kid);
    eventually("the killed client's state to be released", || {
        let s = c.stats().unwrap();
        s.pins == 0 && s.objects == 1 && s.clients == 1 && s.used_bytes == before.used_bytes
    });
    // The pinned object is intact and deletable at once.
    assert_eq!(
        &*c.get(&[target], Duration::ZERO).unwrap()[0],
        &pattern(1, 300_000)[..]
    );
    assert_eq!(c.delete(&[target]).unwrap(), vec![DeleteStatus::Deleted]);
}

#[test]
fn sigkill_in_the_middle_of_create_leaves_no_unsealed_objects() {
    let d = Daemon::start("churn", "64MiB");
    let c = d.client();
    let target = c.put(b"pinned over and over").unwrap();
    let base = c.stats().unwrap();
    assert_eq!((base.objects, base.pins), (1, 0), "{base:?}");
    let mut rng = fastrand::Rng::with_seed(11);
    for _ in 0..5 {
        // Kill it after 4 to 40 rounds of its create/seal/delete loop, while it holds a pin
        // on the target and an unsealed object of its own (seen in stats and list).
        let rounds = rng.u64(4..41);
        let mut kid = spawn_child(
            "churn",
            &d.socket,
            &[
                ("FP_TARGET", target.to_hex()),
                ("FP_ROUNDS", rounds.to_string()),
            ],
        );
        wait_line(&mut kid, "holding");
        let s = c.stats().unwrap();
        assert_eq!(
            (s.objects - s.sealed, s.pins, s.sealed),
            (1, 1, 1 + rounds.div_ceil(4)),
            "{s:?}"
        );
        assert_eq!(
            c.list()
                .unwrap()
                .iter()
                .filter(|e| e.state == ObjectState::Created)
                .count(),
            1
        );
        sigkill(&mut kid);
        eventually("the killed client to be gone", || {
            c.stats().unwrap().clients == 1
        });
        let list = c.list().unwrap();
        assert!(
            list.iter().all(|e| e.state == ObjectState::Sealed),
            "unsealed leftovers"
        );
        // Its pins went with it; once the objects it kept are deleted, every byte it
        // reserved, sealed or not, is free again.
        let kept: Vec<ObjectId> = list
            .iter()
            .map(|e| e.id)
            .filter(|id| *id != target)
            .collect();
        let st = c.delete(&kept).unwrap();
        assert!(st.iter().all(|s| *s == DeleteStatus::Deleted), "{st:?}");
        common::eventually_stats(&c, "pins and memory to return to the target's", |s| {
            (
                s.pins,
                s.pinned_objects,
                s.objects,
                s.used_bytes,
                s.deferred_frees,
            ) == (0, 0, 1, base.used_bytes, 0)
        });
    }
    assert!(c.contains(&target).unwrap());
}

#[test]
fn a_killed_daemon_is_an_error_for_its_clients_not_a_hang() {
    let mut d = Daemon::start("daemonkill", "32MiB");
    let c = d.client();
    let id = c.put(&pattern(2, 100_000)).unwrap();
    let view = c.get(&[id], Duration::ZERO).unwrap();
    let waiter = c.clone();
    let missing = c.id_with([9; 16]);
    let t = std::thread::spawn(move || waiter.get(&[missing], Duration::from_secs(60)));
    // Kill the daemon while the get is parked there, not before it arrived.
    common::wait_for_parked_gets(&d.client(), 1, "the get of a missing object");
    sigkill(&mut d.child);
    let started = Instant::now();
    let r = t.join().unwrap();
    assert!(
        matches!(r, Err(GetError::Request(RequestError::Disconnected))),
        "{r:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // The view stays readable: the mapping outlives the daemon.
    assert_eq!(&*view[0], &pattern(2, 100_000)[..]);
    assert!(matches!(c.stats(), Err(RequestError::Disconnected)));
}

#[test]
fn cli_put_get_ls_stat_delete() {
    let d = Daemon::start("cli", "64MiB");
    let bin = env!("CARGO_BIN_EXE_ferroplasma");
    let dir = std::env::temp_dir().join(format!("fp-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in.bin");
    std::fs::write(&input, pattern(4, 3_000_000)).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(bin)
            .args(args)
            .env("FERROPLASMA_SOCKET", &d.socket)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, id, err) = run(&["put", input.to_str().unwrap()]);
    assert!(ok, "{err}");
    let id = id.trim().to_string();
    assert_eq!(id.len(), 48);
    let output = dir.join("out.bin");
    let (ok, _, err) = run(&["get", &id, "-o", output.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(&output).unwrap(), pattern(4, 3_000_000));
    let (ok, ls, _) = run(&["ls"]);
    assert!(
        ok && ls.contains(&id) && ls.contains("sealed") && ls.contains("3000000"),
        "{ls}"
    );
    let (ok, stat, _) = run(&["stat"]);
    assert!(
        ok && stat.contains("hugepages:       no") && stat.contains("objects:         1"),
        "{stat}"
    );
    let (ok, json, _) = run(&["stat", "--json"]);
    assert!(
        ok && json.contains("\"objects\":1") && json.contains("\"hugepages\":false"),
        "{json}"
    );
    let (ok, _, _) = run(&["delete", &id]);
    assert!(ok);
    let (ok, _, err) = run(&["get", &id]);
    assert!(!ok && err.contains("timed out"), "{err}");
    let (ok, _, err) = run(&["--socket", "/nonexistent/fp.sock", "stat"]);
    assert!(
        !ok && err.contains("is `ferroplasma node` running?"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
