//! Spilling to disk and restoring on demand, end to end through real clients: more data than
//! the arena holds, disk space coming back on delete, corrupt records, a full disk, pinned
//! objects. Spill directories live under the system temp directory (a real file system here,
//! so O_DIRECT is exercised); the full-disk test mounts a small tmpfs and needs root.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::pattern;
use ferroplasma::client::{Client, ClientOptions, GetError};
use ferroplasma::protocol::{ObjectState, SpillEngineInUse, Stats};
use ferroplasma::server::{Node, SpillConfig, SpillEngine, StartError};
use ferroplasma::ObjectId;

/// CI sets this to `io_uring` so that a node silently falling back to pread (io_uring
/// forbidden by the kernel or a sandbox) fails the tests instead of passing them on the
/// reference engine.
const EXPECT_ENGINE: &str = "FERROPLASMA_EXPECT_SPILL_ENGINE";

const MIB: u64 = 1 << 20;

struct Fixture {
    node: Option<Node>,
    dir: PathBuf,
    mounted: bool,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        drop(self.node.take());
        if self.mounted {
            // The kernel lets go of files an io_uring had registered a moment after the ring
            // is closed: retry while the mount is busy.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !std::process::Command::new("umount")
                .arg(&self.dir)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spill_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fp-spill-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn start(tag: &str, memory: u64, engine: SpillEngine, dir: PathBuf, mounted: bool) -> Fixture {
    let mut cfg = common::config(tag, memory);
    let mut sc = SpillConfig::new(vec![dir.clone()]);
    sc.engine = engine;
    sc.file_size = 8 * MIB;
    cfg.spill = Some(sc);
    let f = Fixture {
        node: Some(Node::start(cfg).expect("node with spilling starts")),
        dir,
        mounted,
    };
    check_engine(&client(&f).stats().unwrap(), engine);
    f
}

/// Says which engine spills, and asserts it: pread when asked for, and whatever
/// `FERROPLASMA_EXPECT_SPILL_ENGINE` names when it is set.
fn check_engine(s: &Stats, asked: SpillEngine) {
    eprintln!("spill engine in use: {}", s.spill_engine);
    match asked {
        SpillEngine::Plain => assert_eq!(s.spill_engine, SpillEngineInUse::Pread),
        SpillEngine::Uring => {
            assert_ne!(s.spill_engine, SpillEngineInUse::Off);
            if s.spill_engine != SpillEngineInUse::IoUring {
                eprintln!("NOTE: io_uring is not available here; the node spills with pread");
            }
        }
    }
    if let Ok(want) = std::env::var(EXPECT_ENGINE) {
        if asked == SpillEngine::Uring {
            assert_eq!(
                s.spill_engine.as_str(),
                want,
                "{EXPECT_ENGINE}={want} but the node spills with {}",
                s.spill_engine
            );
        }
    }
}

/// Names of the spill files in `dir`, with their sizes.
fn spill_files(dir: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e))
        .filter(|(n, _)| n.starts_with("fp-") && n.ends_with(".spill"))
        .map(|(n, e)| (n, e.metadata().unwrap().len()))
        .collect();
    v.sort();
    v
}

/// A node with a 64 MiB arena spilling with io_uring into a fresh directory named `tag`.
fn start_default(tag: &str) -> Fixture {
    start(tag, 64 * MIB, SpillEngine::Uring, spill_dir(tag), false)
}

fn client(f: &Fixture) -> Client {
    let opts = ClientOptions {
        create_timeout: Duration::from_secs(30),
        ..common::opts()
    };
    Client::connect_with(&f.node.as_ref().unwrap().info().socket, opts).unwrap()
}

fn size_of(i: u64) -> usize {
    [100, 5000, 300_000, 1_500_000, 3_000_000][(i % 5) as usize]
}

/// Bytes the files in `dir` take on disk.
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

fn put_many(c: &Client, n: u64) -> Vec<ObjectId> {
    (0..n)
        .map(|i| {
            let id = c.id_with(u128::from(i + 1).to_be_bytes());
            c.put_with(id, &pattern(i, size_of(i)), &i.to_le_bytes())
                .unwrap();
            id
        })
        .collect()
}

fn check_all(c: &Client, ids: &[ObjectId]) {
    for (i, id) in ids.iter().enumerate() {
        let v = c.get(&[*id], Duration::from_secs(30)).unwrap();
        assert_eq!(
            &*v[0],
            &pattern(i as u64, size_of(i as u64))[..],
            "object {i}"
        );
        assert_eq!(v[0].metadata(), &(i as u64).to_le_bytes());
    }
}

fn three_times_the_arena(engine: SpillEngine, tag: &str) {
    let f = start(tag, 64 * MIB, engine, spill_dir(tag), false);
    let c = client(&f);
    // 200 objects averaging ~0.96 MB: about 3x the 64 MiB arena.
    let ids = put_many(&c, 200);
    let s = c.stats().unwrap();
    assert!(s.spills > 0 && s.spilled_objects > 0, "{s:?}");
    assert!(s.spilled_bytes > 100 * MIB, "{s:?}");
    assert!(c
        .list()
        .unwrap()
        .iter()
        .any(|e| e.state == ObjectState::Spilled));
    // Every byte back, twice (the second pass restores what the first pass spilled again).
    check_all(&c, &ids);
    check_all(&c, &ids);
    let s = c.stats().unwrap();
    assert!(s.restores > 0, "{s:?}");
    assert_eq!((s.corrupted, s.spill_disk_full), (0, 0));
}

#[test]
fn three_times_the_arena_round_trips_with_io_uring() {
    three_times_the_arena(SpillEngine::Uring, "uring");
}

/// The same workload through the reference pread/pwrite engine: the same bytes come back.
#[test]
fn three_times_the_arena_round_trips_with_pread_pwrite() {
    three_times_the_arena(SpillEngine::Plain, "plain");
}

/// Deleted records give their blocks back: once spills in flight have landed, the disk holds
/// no more than the live records (plus file headers, the lock file and file-system
/// bookkeeping). Judged against the node's own count of live record bytes, so spills still
/// landing while we look cannot make the test pass or fail.
#[test]
fn deleting_spilled_objects_gives_disk_space_back() {
    let f = start_default("reclaim");
    let c = client(&f);
    let ids = put_many(&c, 200);
    let spilled: Vec<_> = c
        .list()
        .unwrap()
        .into_iter()
        .filter(|e| e.state == ObjectState::Spilled)
        .collect();
    assert!(spilled.len() > 50);
    let half: Vec<ObjectId> = spilled.iter().step_by(2).map(|e| e.id).collect();
    let before = c.stats().unwrap().spilled_bytes;
    c.delete(&half).unwrap();
    let after = c.stats().unwrap().spilled_bytes;
    assert!(after < before, "{before} -> {after}");
    // Headers (one block per file), the lock file, and ext4's extent blocks for the holes.
    let overhead = |dir: &Path| (std::fs::read_dir(dir).unwrap().count() as u64 + 1) * 64 * 1024;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let live = c.stats().unwrap().spilled_bytes;
        let used = disk_usage(&f.dir);
        if used <= live + overhead(&f.dir) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{used} bytes on disk for {live} bytes of live records after deleting half the \
             spilled objects ({} bytes of records)",
            before - after
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Deleting everything removes the files.
    let rest: Vec<ObjectId> = ids
        .iter()
        .filter(|id| !half.contains(id))
        .copied()
        .collect();
    c.delete(&rest).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while disk_usage(&f.dir) > 2 * 8 * MIB {
        assert!(
            Instant::now() < deadline,
            "files of dead records stay: {}",
            disk_usage(&f.dir)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(c.stats().unwrap().spilled_bytes, 0);
}

#[test]
fn a_corrupt_record_is_reported_and_the_node_keeps_serving() {
    let f = start_default("corrupt");
    let c = client(&f);
    let ids = put_many(&c, 120);
    // A spilled object of at least 300 KB, and the file and place of its record.
    let victim = c
        .list()
        .unwrap()
        .into_iter()
        .find(|e| e.state == ObjectState::Spilled && e.data_size >= 300_000)
        .expect("a large spilled object")
        .id;
    let mut hit = None;
    for e in std::fs::read_dir(&f.dir).unwrap() {
        let path = e.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        if let Some(at) = bytes
            .windows(ObjectId::LEN)
            .position(|w| w == victim.as_bytes())
        {
            hit = Some((path, at));
            break;
        }
    }
    let (path, at) = hit.expect("the victim's record is in a spill file");
    // Flip a byte in the payload (the record header's block is 4096 bytes).
    let record = at - 16;
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[record + 4096 + 1234] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    match c.get(&[victim], Duration::from_secs(30)) {
        Err(GetError::ObjectCorrupted { id, detail }) => {
            assert_eq!(id, victim);
            assert!(
                detail.contains(&path.file_name().unwrap().to_string_lossy().to_string()),
                "{detail}"
            );
        }
        other => panic!("expected ObjectCorrupted, got {other:?}"),
    }
    assert_eq!(c.stats().unwrap().corrupted, 1);
    // Everything else is intact.
    for (i, id) in ids.iter().enumerate() {
        if *id != victim {
            let v = c.get(&[*id], Duration::from_secs(30)).unwrap();
            assert_eq!(&*v[0], &pattern(i as u64, size_of(i as u64))[..]);
        }
    }
}

#[test]
fn pinned_objects_are_never_spilled() {
    let f = start_default("pinned");
    let c = client(&f);
    let pinned_ids: Vec<ObjectId> = (0..8)
        .map(|i| c.put(&pattern(1000 + i, 4 << 20)).unwrap())
        .collect();
    let views = c.get(&pinned_ids, Duration::ZERO).unwrap();
    for i in 0..150u64 {
        c.put(&pattern(i, 1 << 20)).unwrap();
        if i % 10 == 0 {
            for e in c.list().unwrap() {
                assert!(
                    !(pinned_ids.contains(&e.id) && e.state == ObjectState::Spilled),
                    "pinned object {} was spilled",
                    e.id
                );
            }
        }
    }
    assert!(c.stats().unwrap().spills > 50);
    for (i, v) in views.iter().enumerate() {
        assert_eq!(&**v, &pattern(1000 + i as u64, 4 << 20)[..]);
    }
}

#[test]
fn a_full_disk_pauses_spilling_and_loses_nothing() {
    let dir = spill_dir("diskfull");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m,mode=0700", "fp-spill-test"])
        .arg(&dir)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED: cannot mount a small tmpfs here (needs root)");
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let f = start("diskfull", 32 * MIB, SpillEngine::Uring, dir, true);
    let opts = ClientOptions {
        create_timeout: Duration::from_millis(1500),
        ..common::opts()
    };
    let c = Client::connect_with(&f.node.as_ref().unwrap().info().socket, opts).unwrap();
    // 1 MiB objects until the store says it is full: 32 MiB of memory + 24 MiB of disk.
    let mut ids = Vec::new();
    let err = loop {
        let i = ids.len() as u64;
        let id = c.id_with(u128::from(i + 1).to_be_bytes());
        match c.put_with(id, &pattern(i, 1 << 20), &[]) {
            Ok(()) => ids.push(id),
            Err(e) => break e,
        }
        assert!(ids.len() < 200, "the store never filled up");
    };
    assert!(
        matches!(
            err,
            ferroplasma::client::CreateError::ObjectStoreFull { .. }
        ),
        "{err:?}"
    );
    let s = c.stats().unwrap();
    assert!(s.spill_disk_full > 0 && s.spilled_objects > 0, "{s:?}");
    // Nothing is lost: every object put is listed, in memory or on disk.
    let listed: Vec<ObjectId> = c.list().unwrap().into_iter().map(|e| e.id).collect();
    for id in &ids {
        assert!(listed.contains(id), "object {id} was lost");
    }
    // Make room by deleting what is in memory, then read back everything that was spilled.
    let in_memory: Vec<ObjectId> = c
        .list()
        .unwrap()
        .into_iter()
        .filter(|e| e.state == ObjectState::Sealed)
        .map(|e| e.id)
        .collect();
    c.delete(&in_memory).unwrap();
    for (i, id) in ids.iter().enumerate() {
        if in_memory.contains(id) {
            continue;
        }
        let v = c.get(&[*id], Duration::from_secs(30)).unwrap();
        assert_eq!(&*v[0], &pattern(i as u64, 1 << 20)[..], "object {i}");
    }
}

#[test]
fn spill_files_of_an_earlier_run_are_removed_at_start() {
    let dir = spill_dir("leftover");
    std::fs::write(dir.join("fp-0123456789abcdef-7.spill"), b"old").unwrap();
    std::fs::write(dir.join("notes.txt"), b"not ours").unwrap();
    let f = start("leftover", 16 * MIB, SpillEngine::Uring, dir, false);
    assert!(!f.dir.join("fp-0123456789abcdef-7.spill").exists());
    assert!(
        f.dir.join("notes.txt").exists(),
        "only spill files are removed"
    );
}

/// One get of spilled objects that together pass the high watermark (but fit the arena):
/// objects restored for a waiting get are not spilled again before it completes.
#[test]
fn a_large_get_of_spilled_objects_completes() {
    let f = start_default("bigget");
    let c = client(&f);
    let wanted: Vec<ObjectId> = (0..14)
        .map(|i| c.put(&pattern(500 + i, 4 << 20)).unwrap())
        .collect();
    // Push them all out with newer objects.
    for i in 0..40 {
        c.put(&pattern(i, 2 << 20)).unwrap();
    }
    let views = c.get(&wanted, Duration::from_secs(60)).unwrap();
    for (i, v) in views.iter().enumerate() {
        assert_eq!(&**v, &pattern(500 + i as u64, 4 << 20)[..]);
    }
    assert!(c.stats().unwrap().restores >= 10);
}

/// Two spill directories (two drives) are filled side by side.
#[test]
fn several_spill_directories_are_all_used() {
    let a = spill_dir("twodirs-a");
    let b = spill_dir("twodirs-b");
    let mut cfg = common::config("twodirs", 32 * MIB);
    cfg.spill = Some(SpillConfig::new(vec![a.clone(), b.clone()]));
    let node = Node::start(cfg).unwrap();
    let opts = ClientOptions {
        create_timeout: Duration::from_secs(30),
        ..common::opts()
    };
    let c = Client::connect_with(&node.info().socket, opts).unwrap();
    let ids: Vec<ObjectId> = (0..60)
        .map(|i| c.put(&pattern(i, 1 << 20)).unwrap())
        .collect();
    assert!(
        disk_usage(&a) > 4 * MIB && disk_usage(&b) > 4 * MIB,
        "{} {}",
        disk_usage(&a),
        disk_usage(&b)
    );
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            &*c.get(&[*id], Duration::from_secs(30)).unwrap()[0],
            &pattern(i as u64, 1 << 20)[..]
        );
    }
    drop(c);
    node.shutdown();
    for d in [a, b] {
        assert_eq!(spill_files(&d), [], "a stopped node leaves no spill files");
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// A node spilling into a directory owns it: a second node, on another socket or on the
/// same one, refuses to start (naming the first one) and leaves its spill files alone, so
/// the first node still restores everything.
#[test]
fn a_second_node_never_touches_a_live_nodes_spill_directory() {
    let f = start(
        "lock-a",
        16 * MIB,
        SpillEngine::Uring,
        spill_dir("lock"),
        false,
    );
    let c = client(&f);
    let ids = put_many(&c, 60);
    assert!(c.stats().unwrap().spilled_objects > 0);
    let a_socket = f.node.as_ref().unwrap().info().socket.clone();
    let files = spill_files(&f.dir);
    assert!(!files.is_empty(), "node A has spill files");

    // Another socket, the same spill directory.
    let mut cfg = common::config("lock-b", 16 * MIB);
    cfg.spill = Some(SpillConfig::new(vec![f.dir.clone()]));
    let b_socket = cfg.socket.clone();
    let e = Node::start(cfg).expect_err("a second node on a locked spill directory");
    let msg = e.to_string();
    eprintln!("second node: {msg}");
    assert!(matches!(e, StartError::SpillDirLocked { .. }), "{msg}");
    assert!(
        msg.contains(&format!("pid {}", std::process::id())),
        "names the holder's pid: {msg}"
    );
    assert!(
        msg.contains(&format!("socket {}", a_socket.display())),
        "names the holder's socket: {msg}"
    );
    assert!(msg.contains(&f.dir.display().to_string()), "{msg}");
    assert!(!b_socket.exists(), "the refused node left a socket behind");

    // The same socket (and so the same default spill directory).
    let mut cfg = common::config("lock-c", 16 * MIB);
    cfg.socket = a_socket.clone();
    cfg.spill = Some(SpillConfig::new(vec![f.dir.clone()]));
    let e = Node::start(cfg).expect_err("a second node on a live socket");
    assert!(matches!(e, StartError::AlreadyRunning(_)), "{e}");

    // Every file of A is still there, no shorter; A still serves every object.
    let now = spill_files(&f.dir);
    for (name, len) in &files {
        let kept = now.iter().find(|(n, _)| n == name);
        assert!(
            kept.is_some_and(|(_, l)| l >= len),
            "spill file {name} of the live node was removed or cut: {now:?}"
        );
    }
    check_all(&c, &ids);
    assert_eq!(c.stats().unwrap().corrupted, 0);
}

/// `ferroplasma stat` prints the engine that spills (text and `--json`), `off` without
/// spilling.
#[test]
fn stat_names_the_spill_engine() {
    let stat = |socket: &Path, json: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ferroplasma"));
        cmd.arg("--socket").arg(socket).arg("stat");
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let f = start(
        "stat-plain",
        16 * MIB,
        SpillEngine::Plain,
        spill_dir("stat"),
        false,
    );
    let socket = f.node.as_ref().unwrap().info().socket.clone();
    let json = stat(&socket, true);
    assert!(json.contains(r#""spill_engine":"pread""#), "{json}");
    assert!(json.contains(r#""gets_waiting":0,"#), "{json}");
    let text = stat(&socket, false);
    assert!(text.contains("spill engine:    pread"), "{text}");
    assert!(text.contains("gets waiting:    0\n"), "{text}");

    let plain = common::start("stat-off", 16 * MIB);
    let json = stat(&plain.info().socket, true);
    assert!(json.contains(r#""spill_engine":"off""#), "{json}");
    assert_eq!(
        common::connect(&plain).stats().unwrap().spill_engine,
        SpillEngineInUse::Off
    );
}

/// A symlink planted at the name of the node's next spill file (names are predictable) is
/// not followed: its target is left alone, the node skips that name and spills and
/// restores as usual.
#[test]
fn a_planted_symlink_at_a_spill_files_name_is_not_followed() {
    let f = start_default("planted");
    let c = client(&f);
    let node = c.stats().unwrap().node_id;
    let victim = std::env::temp_dir().join(format!("fp-spill-victim-{}", std::process::id()));
    std::fs::write(&victim, b"precious").unwrap();
    let planted = f.dir.join(format!("fp-{node}-0.spill"));
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    let ids = put_many(&c, 100);
    assert!(c.stats().unwrap().spilled_objects > 0);
    check_all(&c, &ids);
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(std::fs::symlink_metadata(&planted)
        .unwrap()
        .file_type()
        .is_symlink());
    std::fs::remove_file(&victim).unwrap();
}

/// A node whose spill directory holds a symlink at the lock file's name (the default spill
/// directory is in world-writable /var/tmp) refuses to start, says why, and writes nothing
/// through the link.
#[test]
fn a_node_refuses_a_symlinked_lock_file() {
    let dir = spill_dir("locklink");
    let victim = std::env::temp_dir().join(format!("fp-lock-victim-{}", std::process::id()));
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("ferroplasma.lock")).unwrap();
    let mut cfg = common::config("locklink", 16 * MIB);
    cfg.spill = Some(SpillConfig::new(vec![dir.clone()]));
    let e = Node::start(cfg).expect_err("a symlinked lock file");
    let msg = e.to_string();
    assert!(matches!(e, StartError::Spill { .. }), "{msg}");
    assert!(msg.contains("is a symlink"), "{msg}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    std::fs::remove_file(&victim).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
