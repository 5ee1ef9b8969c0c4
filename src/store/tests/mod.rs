#![allow(clippy::cast_possible_truncation)]

use std::cell::RefCell;
use std::time::{Duration, Instant};

use super::*;
use crate::id::{NodeId, ObjectId};
use crate::protocol::{DeleteStatus, ErrorReply, Reply, Request, NO_TIMEOUT};

struct Mem(RefCell<Vec<u8>>);

impl ArenaWrite for Mem {
    fn write(&self, offset: u64, bytes: &[u8]) -> bool {
        let mut m = self.0.borrow_mut();
        let o = offset as usize;
        if o + bytes.len() > m.len() {
            return false;
        }
        m[o..o + bytes.len()].copy_from_slice(bytes);
        true
    }
}

const NODE: NodeId = NodeId(5);

fn id(n: u8) -> ObjectId {
    ObjectId::new(NODE, [n; 16])
}

/// Another node of the cluster, owner of the [`remote`] ids.
const OTHER: NodeId = NodeId(9);

fn remote(n: u8) -> ObjectId {
    ObjectId::new(OTHER, [n; 16])
}

fn core(cap: u64) -> Core<Mem> {
    core_with(cap, 4, false)
}

/// A core over a `cap`-byte buffer with clients 1 and 2 connected.
fn core_with(cap: u64, max_pending_per_client: usize, cluster: bool) -> Core<Mem> {
    let mut c = Core::new(
        Table::new(NODE, cap),
        Mem(RefCell::new(vec![0; cap as usize])),
        CoreConfig {
            inline_threshold: 64 << 10,
            hugepages: false,
            max_pending_per_client,
            spill: None,
            cluster,
        },
    );
    c.connect(1);
    c.connect(2);
    c
}

fn one(
    core: &mut Core<Mem>,
    client: u64,
    req: Request<'_>,
    now: Instant,
) -> Result<Reply, ErrorReply> {
    let mut out = Vec::new();
    core.handle(client, 9, req, now, &mut out);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].client, client);
    out.pop().unwrap().reply
}

fn create(
    core: &mut Core<Mem>,
    client: u64,
    n: u8,
    size: u64,
    now: Instant,
) -> Result<Reply, ErrorReply> {
    one(
        core,
        client,
        Request::Create {
            id: id(n),
            data_size: size,
            meta_size: 0,
            timeout_ms: 0,
        },
        now,
    )
}

/// Creates and seals object `n` of `size` bytes for client 1.
fn sealed(core: &mut Core<Mem>, n: u8, size: u64, t: Instant) {
    create(core, 1, n, size, t).unwrap();
    one(core, 1, Request::Seal { id: id(n) }, t).unwrap();
}

#[test]
fn lifecycle_and_errors() {
    let t = Instant::now();
    let mut c = core(1 << 20);
    assert!(matches!(
        create(&mut c, 1, 1, 100, t),
        Ok(Reply::Created { .. })
    ));
    assert_eq!(
        create(&mut c, 2, 1, 100, t),
        Err(ErrorReply::AlreadyExists(id(1)))
    );
    assert_eq!(
        one(&mut c, 2, Request::Seal { id: id(1) }, t),
        Err(ErrorReply::NotCreator(id(1)))
    );
    assert_eq!(
        one(&mut c, 1, Request::Contains { id: id(1) }, t),
        Ok(Reply::Contains(false))
    );
    assert_eq!(
        one(&mut c, 1, Request::Seal { id: id(1) }, t),
        Ok(Reply::Done)
    );
    assert_eq!(
        one(&mut c, 1, Request::Seal { id: id(1) }, t),
        Err(ErrorReply::AlreadySealed(id(1)))
    );
    assert_eq!(
        one(&mut c, 1, Request::Contains { id: id(1) }, t),
        Ok(Reply::Contains(true))
    );
    let foreign = ObjectId::new(NodeId(6), [0; 16]);
    assert!(matches!(
        one(
            &mut c,
            1,
            Request::Create {
                id: foreign,
                data_size: 1,
                meta_size: 0,
                timeout_ms: 0
            },
            t
        ),
        Err(ErrorReply::ForeignOwner { node: NODE, .. })
    ));
    assert!(matches!(
        create(&mut c, 1, 2, 2 << 20, t),
        Err(ErrorReply::TooLarge { .. })
    ));
    assert_eq!(
        one(&mut c, 1, Request::Abort { id: id(9) }, t),
        Err(ErrorReply::NotFound(id(9)))
    );
}

#[test]
fn get_waits_for_seal_and_times_out_naming_ids() {
    let t = Instant::now();
    let mut c = core(1 << 20);
    let mut out = Vec::new();
    c.handle(
        2,
        7,
        Request::Get {
            ids: vec![id(1), id(2)],
            timeout_ms: 1000,
        },
        t,
        &mut out,
    );
    assert!(out.is_empty());
    assert_eq!(c.stats().gets_waiting, 1);
    assert_eq!(c.next_deadline(), Some(t + Duration::from_millis(1000)));
    create(&mut c, 1, 1, 10, t).unwrap();
    c.handle(1, 8, Request::Seal { id: id(1) }, t, &mut out);
    assert_eq!(
        out.len(),
        1,
        "only the seal reply; the get still waits for id 2"
    );
    assert_eq!(c.stats().gets_waiting, 1);
    out.clear();
    c.tick(t + Duration::from_millis(999), &mut out);
    assert!(out.is_empty());
    c.tick(t + Duration::from_millis(1000), &mut out);
    assert_eq!(out[0].seq, 7);
    assert_eq!(out[0].reply, Err(ErrorReply::Timeout(vec![id(2)])));
    assert_eq!(
        c.stats().gets_waiting,
        0,
        "a get that timed out waits no more"
    );

    // A parked get completes when its last id is sealed, and pins.
    out.clear();
    c.handle(
        2,
        10,
        Request::Get {
            ids: vec![id(1), id(2)],
            timeout_ms: NO_TIMEOUT,
        },
        t,
        &mut out,
    );
    let payload = [1u8, 2, 3];
    c.handle(
        1,
        11,
        Request::Put {
            id: id(2),
            data_len: 3,
            timeout_ms: 0,
            payload: &payload,
        },
        t,
        &mut out,
    );
    assert_eq!(out.len(), 2);
    let get = out.iter().find(|o| o.seq == 10).unwrap();
    let Ok(Reply::Objects(locs)) = &get.reply else {
        panic!("{get:?}")
    };
    assert_eq!(locs.len(), 2);
    let m = c.mem().0.borrow();
    let o = locs[1].offset as usize;
    assert_eq!(&m[o..o + 3], &payload);
    drop(m);
    assert_eq!(c.stats().pins, 2);
}

#[test]
fn delete_of_pinned_is_deferred_until_release() {
    let t = Instant::now();
    let mut c = core(1 << 20);
    create(&mut c, 1, 1, 8192, t).unwrap();
    one(&mut c, 1, Request::Seal { id: id(1) }, t).unwrap();
    let Ok(Reply::Objects(locs)) = one(
        &mut c,
        2,
        Request::Get {
            ids: vec![id(1)],
            timeout_ms: 0,
        },
        t,
    ) else {
        panic!()
    };
    let used = c.stats().used_bytes;
    assert_eq!(
        one(
            &mut c,
            1,
            Request::Delete {
                ids: vec![id(1), id(3)]
            },
            t
        ),
        Ok(Reply::Deleted(vec![
            DeleteStatus::Deferred,
            DeleteStatus::NotFound
        ]))
    );
    assert_eq!(c.stats().used_bytes, used, "memory stays while pinned");
    assert_eq!(c.stats().deferred_frees, 1);
    // The id is free for reuse at once; the old handle still refers to the old object.
    create(&mut c, 1, 1, 100, t).unwrap();
    let mut out = Vec::new();
    c.handle(
        2,
        1,
        Request::Release {
            handles: vec![locs[0].handle],
        },
        t,
        &mut out,
    );
    assert!(out.is_empty(), "release has no reply");
    assert_eq!(c.stats().deferred_frees, 0);
    assert_eq!(c.stats().used_bytes, 128);
}

#[test]
fn full_store_evicts_lru_then_waits_then_fails_with_figures() {
    let t = Instant::now();
    let mut c = core(1 << 20);
    // Four sealed 256 KiB objects fill the arena.
    for n in 0..4 {
        sealed(&mut c, n, 256 << 10, t);
    }
    // Pin object 3; touch order is 0,1,2,3 so 0 is the least recently used unpinned one.
    let Ok(Reply::Objects(pinned)) = one(
        &mut c,
        2,
        Request::Get {
            ids: vec![id(3)],
            timeout_ms: 0,
        },
        t,
    ) else {
        panic!()
    };
    create(&mut c, 1, 10, 256 << 10, t).unwrap();
    assert_eq!(
        one(&mut c, 1, Request::Contains { id: id(0) }, t),
        Ok(Reply::Contains(false))
    );
    assert_eq!(
        one(&mut c, 1, Request::Contains { id: id(3) }, t),
        Ok(Reply::Contains(true))
    );
    assert_eq!(c.stats().evictions, 1);
    // Everything left is pinned or unsealed except 1 and 2; a 768 KiB create evicts both,
    // then still lacks room (3 is pinned right after them) and waits.
    let mut out = Vec::new();
    c.handle(
        1,
        50,
        Request::Create {
            id: id(11),
            data_size: 768 << 10,
            meta_size: 0,
            timeout_ms: 100,
        },
        t,
        &mut out,
    );
    assert!(out.is_empty());
    assert_eq!(c.stats().creates_waiting, 1);
    // Releasing the pin on 3 makes it evictable: the parked create completes.
    c.handle(
        2,
        51,
        Request::Release {
            handles: vec![pinned[0].handle],
        },
        t,
        &mut out,
    );
    assert_eq!(out.len(), 1);
    assert!(matches!(out[0].reply, Ok(Reply::Created { .. })), "{out:?}");
    // Now the arena holds two unsealed objects; a further create waits and then fails.
    out.clear();
    c.handle(
        1,
        52,
        Request::Create {
            id: id(12),
            data_size: 4096,
            meta_size: 0,
            timeout_ms: 100,
        },
        t,
        &mut out,
    );
    c.tick(t + Duration::from_millis(100), &mut out);
    assert_eq!(
        out[0].reply,
        Err(ErrorReply::StoreFull {
            id: id(12),
            requested: 4096,
            free: 0,
            largest_free: 0
        })
    );
}

#[test]
fn disconnect_releases_pins_and_aborts_unsealed() {
    let t = Instant::now();
    let mut c = core(1 << 20);
    create(&mut c, 1, 1, 100, t).unwrap();
    create(&mut c, 2, 2, 100, t).unwrap();
    one(&mut c, 2, Request::Seal { id: id(2) }, t).unwrap();
    one(
        &mut c,
        1,
        Request::Get {
            ids: vec![id(2), id(2)],
            timeout_ms: 0,
        },
        t,
    )
    .unwrap();
    assert_eq!(c.stats().pins, 2);
    let mut out = Vec::new();
    c.disconnect(1, t, &mut out);
    let s = c.stats();
    assert_eq!((s.pins, s.objects, s.clients), (0, 1, 1));
    assert_eq!(
        one(&mut c, 2, Request::Contains { id: id(1) }, t),
        Ok(Reply::Contains(false))
    );
}

#[test]
fn wait_returns_when_enough_are_ready() {
    let t = Instant::now();
    let mut c = core(1 << 20);
    let mut out = Vec::new();
    c.handle(
        2,
        1,
        Request::Wait {
            ids: vec![id(1), id(2), id(3)],
            num_ready: 2,
            timeout_ms: 500,
        },
        t,
        &mut out,
    );
    assert_eq!(c.stats().gets_waiting, 1, "a parked wait counts");
    for n in [1, 3] {
        let p = [n];
        c.handle(
            1,
            2,
            Request::Put {
                id: id(n),
                data_len: 1,
                timeout_ms: 0,
                payload: &p,
            },
            t,
            &mut out,
        );
    }
    let w = out.iter().find(|o| o.client == 2).unwrap();
    assert_eq!(w.reply, Ok(Reply::Ready(vec![true, false, true])));
    assert_eq!(c.stats().gets_waiting, 0);
}

#[test]
fn too_many_parked_requests_are_refused() {
    let t = Instant::now();
    let mut c = core(1 << 20);
    let mut out = Vec::new();
    for s in 0..5 {
        c.handle(
            2,
            s,
            Request::Get {
                ids: vec![id(1)],
                timeout_ms: NO_TIMEOUT,
            },
            t,
            &mut out,
        );
    }
    assert_eq!(c.parked(), 4);
    assert!(matches!(out[0].reply, Err(ErrorReply::Invalid(_))));
}

/// Random requests from several clients, including disconnects and deadlines: the table's
/// invariants hold after every step, and once everybody is gone and everything deleted, all
/// memory is back.
#[test]
fn random_requests_keep_the_table_consistent() {
    let mut rng = fastrand::Rng::with_seed(42);
    let start = Instant::now();
    let mut c = core(4 << 20);
    let mut handles: Vec<(u64, u64)> = Vec::new();
    let mut out = Vec::new();
    for step in 0..20_000u32 {
        let now = start + Duration::from_millis(u64::from(step));
        let client = rng.u64(1..=4);
        let n = rng.u8(0..40);
        let req = match rng.u8(0..100) {
            0..=19 => Request::Create {
                id: id(n),
                data_size: [10, 3000, 100_000, 900_000][rng.usize(0..4)],
                meta_size: rng.u64(0..100),
                timeout_ms: [0, 5, 50][rng.usize(0..3)],
            },
            20..=34 => Request::Seal { id: id(n) },
            35..=39 => Request::Abort { id: id(n) },
            40..=59 => Request::Get {
                ids: (0..rng.usize(1..4)).map(|_| id(rng.u8(0..40))).collect(),
                timeout_ms: [0, 0, 10, NO_TIMEOUT][rng.usize(0..4)],
            },
            60..=74 if !handles.is_empty() => {
                let (cl, h) = handles.swap_remove(rng.usize(0..handles.len()));
                c.handle(cl, 0, Request::Release { handles: vec![h] }, now, &mut out);
                continue;
            }
            75..=84 => Request::Delete {
                ids: vec![id(n), id(rng.u8(0..40))],
            },
            85..=89 => Request::Wait {
                ids: vec![id(n), id(rng.u8(0..40))],
                num_ready: 1,
                timeout_ms: 20,
            },
            90..=92 => {
                c.disconnect(client, now, &mut out);
                handles.retain(|(cl, _)| *cl != client);
                c.connect(client);
                continue;
            }
            _ => Request::Stats,
        };
        c.handle(client, step, req, now, &mut out);
        c.tick(now, &mut out);
        for o in out.drain(..) {
            if let Ok(Reply::Objects(locs)) = &o.reply {
                handles.extend(locs.iter().map(|l| (o.client, l.handle)));
            }
        }
        c.table().check_invariants();
    }
    let end = start + Duration::from_secs(3600);
    for client in 1..=4 {
        c.disconnect(client, end, &mut out);
    }
    c.tick(end, &mut out);
    let all: Vec<ObjectId> = (0..40).map(id).collect();
    c.connect(9);
    one(&mut c, 9, Request::Delete { ids: all }, end).unwrap();
    c.table().check_invariants();
    let s = c.stats();
    assert_eq!(
        (s.objects, s.pins, s.used_bytes, s.deferred_frees),
        (0, 0, 0, 0),
        "{s:?}"
    );
    assert_eq!(c.parked(), 0);
}

#[test]
fn a_create_that_cannot_fit_evicts_nothing() {
    let t = Instant::now();
    let mut c = core(1 << 20);
    for n in 0..4 {
        sealed(&mut c, n, 256 << 10, t);
    }
    // Pin one: 768 KiB are evictable, so a 1 MiB create can never fit.
    one(
        &mut c,
        2,
        Request::Get {
            ids: vec![id(0)],
            timeout_ms: 0,
        },
        t,
    )
    .unwrap();
    assert!(matches!(
        create(&mut c, 1, 9, 1 << 20, t),
        Err(ErrorReply::StoreFull { .. })
    ));
    assert_eq!(c.stats().evictions, 0);
    assert_eq!(c.stats().sealed, 4);
}

#[test]
fn a_parked_create_completes_when_a_seal_makes_room_evictable() {
    let t = Instant::now();
    let mut c = core(1 << 20);
    create(&mut c, 1, 1, 1 << 20, t).unwrap();
    let mut out = Vec::new();
    c.handle(
        2,
        5,
        Request::Create {
            id: id(2),
            data_size: 4096,
            meta_size: 0,
            timeout_ms: 1000,
        },
        t,
        &mut out,
    );
    assert!(out.is_empty(), "the arena is full of an unsealed object");
    c.handle(1, 6, Request::Seal { id: id(1) }, t, &mut out);
    let created = out
        .iter()
        .find(|o| o.seq == 5)
        .expect("parked create answered");
    assert!(
        matches!(created.reply, Ok(Reply::Created { .. })),
        "{created:?}"
    );
    assert_eq!(c.stats().evictions, 1);
}

/// The spilling state machine against a simulated disk that answers in random order, fills up
/// now and then and corrupts a few records: table invariants hold after every step, every
/// get that succeeds sees the bytes that were put, and objects disappear only by delete or
/// corruption.
#[test]
fn random_spill_and_restore_keep_objects_intact() {
    use crate::spill::job::{Job, RestoreFail, SpillFail, SpillLoc};
    use std::collections::HashMap;

    fn bytes_of(n: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| n.wrapping_mul(31).wrapping_add(i as u8))
            .collect()
    }

    let mut rng = fastrand::Rng::with_seed(99);
    let start = Instant::now();
    let cap = 1u64 << 20;
    let mut c = Core::new(
        Table::new(NODE, cap),
        Mem(RefCell::new(vec![0; cap as usize])),
        CoreConfig {
            inline_threshold: 64 << 10,
            hugepages: false,
            max_pending_per_client: 64,
            spill: Some(SpillPolicy::default()),
            cluster: false,
        },
    );
    c.connect(1);
    let mut disk: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut next_loc = 0u64;
    let mut inflight: Vec<Job> = Vec::new();
    let mut sizes: HashMap<ObjectId, usize> = HashMap::new();
    let mut lost: Vec<ObjectId> = Vec::new();
    let mut asked: HashMap<u32, u8> = HashMap::new();
    let mut out = Vec::new();
    for step in 0..6000u32 {
        let now = start + Duration::from_millis(u64::from(step));
        let n = rng.u8(0..60);
        match rng.u8(0..10) {
            0..=3 if !sizes.contains_key(&id(n)) && !lost.contains(&id(n)) => {
                let len = [100, 3000, 60_000][rng.usize(0..3)];
                let payload = bytes_of(n, len);
                c.handle(
                    1,
                    step,
                    Request::Put {
                        id: id(n),
                        data_len: len as u64,
                        timeout_ms: 1000,
                        payload: &payload,
                    },
                    now,
                    &mut out,
                );
                sizes.insert(id(n), len);
            }
            4..=6 => {
                asked.insert(step, n);
                c.handle(
                    1,
                    step,
                    Request::Get {
                        ids: vec![id(n)],
                        timeout_ms: 0,
                    },
                    now,
                    &mut out,
                );
            }
            7 if sizes.contains_key(&id(n)) => {
                c.handle(1, step, Request::Delete { ids: vec![id(n)] }, now, &mut out);
                sizes.remove(&id(n));
            }
            _ => {}
        }
        inflight.extend(c.take_jobs());
        // The "disk" answers one random job per step (sometimes two).
        for _ in 0..rng.usize(0..3) {
            if inflight.is_empty() {
                break;
            }
            let job = inflight.swap_remove(rng.usize(0..inflight.len()));
            match job {
                Job::Spill(items) => {
                    for it in items {
                        let result = if rng.u8(0..10) == 0 {
                            Err(SpillFail::DiskFull)
                        } else {
                            let len = (it.data_size + it.meta_size) as usize;
                            let mem = c.mem().0.borrow();
                            let o = it.offset as usize;
                            next_loc += 1;
                            disk.insert(next_loc, mem[o..o + len].to_vec());
                            Ok(SpillLoc {
                                file: 0,
                                offset: next_loc,
                                disk_len: 4096,
                            })
                        };
                        c.spill_done(it.handle, result, now, &mut out);
                    }
                }
                Job::Restore(r) => {
                    let (handle, rid, loc, dest) = (r.handle, r.id, r.loc, r.dest);
                    let result = match rng.u8(0..40) {
                        0 => {
                            lost.push(rid);
                            sizes.remove(&rid);
                            Err(RestoreFail::Corrupted {
                                file: "sim".into(),
                                reason: "simulated".into(),
                            })
                        }
                        // A transient read error: the object stays on disk.
                        1 => Err(RestoreFail::Io("simulated EIO".into())),
                        _ => {
                            let bytes = disk
                                .get(&loc.offset)
                                .expect("restored record exists")
                                .clone();
                            assert!(c.mem().write(dest, &bytes));
                            Ok(())
                        }
                    };
                    c.restore_done(handle, result, now, &mut out);
                }
                Job::Free(loc) => {
                    assert!(disk.remove(&loc.offset).is_some(), "freed a record twice");
                }
            }
        }
        c.tick(now, &mut out);
        inflight.extend(c.take_jobs());
        for o in out.drain(..) {
            if let Ok(Reply::Objects(locs)) = &o.reply {
                // Check the bytes, then release the pins.
                let n = asked[&o.seq];
                let mem = c.mem().0.borrow();
                for l in locs {
                    let m = &mem[l.offset as usize..(l.offset + l.data_size) as usize];
                    assert!(m == bytes_of(n, m.len()), "get of {n} saw other bytes");
                }
                drop(mem);
                let handles = locs.iter().map(|l| l.handle).collect();
                c.handle(1, 0, Request::Release { handles }, now, &mut Vec::new());
            }
        }
        c.table().check_invariants();
    }
    // Every object that was put and neither deleted nor lost to corruption is still there.
    for oid in sizes.keys() {
        assert!(c.table().is_sealed(oid), "object {oid} vanished");
    }
    assert!(
        c.stats().spills > 50 && c.stats().restores > 10,
        "{:?}",
        c.stats()
    );
}

mod cluster;
mod layering;
mod liveness;
mod parking;
