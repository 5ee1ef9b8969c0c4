//! Spilling to disk and restoring on demand, end to end through real clients: more data than
//! the arena holds, disk space coming back on delete, corrupt records, a full disk, pinned
//! objects. Spill directories live under the system temp directory (a real file system here,
//! so O_DIRECT is exercised); the full-disk test mounts a small tmpfs and needs root.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::pattern;
use ferroplasma::client::{Client, ClientOptions, GetError};
use ferroplasma::protocol::ObjectState;
use ferroplasma::server::{Node, SpillConfig, SpillEngine};
use ferroplasma::ObjectId;

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
            let _ = std::process::Command::new("umount").arg(&self.dir).status();
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
    Fixture {
        node: Some(Node::start(cfg).expect("node with spilling starts")),
        dir,
        mounted,
    }
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

#[test]
fn deleting_spilled_objects_gives_disk_space_back() {
    let f = start_default("reclaim");
    let c = client(&f);
    let ids = put_many(&c, 200);
    // Let spills still in flight land before measuring.
    let mut last = (u64::MAX, 0);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = (c.stats().unwrap().spilled_bytes, disk_usage(&f.dir));
        if now == last {
            break;
        }
        last = now;
    }
    let spilled: Vec<_> = c
        .list()
        .unwrap()
        .into_iter()
        .filter(|e| e.state == ObjectState::Spilled)
        .collect();
    assert!(spilled.len() > 50);
    let before = disk_usage(&f.dir);
    let half: Vec<ObjectId> = spilled.iter().step_by(2).map(|e| e.id).collect();
    let half_bytes: u64 = spilled
        .iter()
        .step_by(2)
        .map(|e| e.data_size + e.meta_size)
        .sum();
    c.delete(&half).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = disk_usage(&f.dir);
        if before.saturating_sub(now) >= half_bytes {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "disk usage {before} -> {now} after deleting {half_bytes} bytes of spilled objects"
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
        .args(["-t", "tmpfs", "-o", "size=24m", "fp-spill-test"])
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
        assert_eq!(disk_usage(&d), 0, "a stopped node leaves no spill files");
        std::fs::remove_dir_all(d).unwrap();
    }
}
