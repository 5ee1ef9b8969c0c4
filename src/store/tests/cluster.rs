//! The core's side of pulls: one pull per object however many gets wait, admission in
//! arrival order without overcommit, failures reaching exactly the waiting gets.

use super::*;
use crate::store::link::{ToCluster, ToCore, CLUSTER_CLIENT};

fn core(cap: u64) -> Core<Mem> {
    core_with(cap, 16, true)
}

fn get(c: &mut Core<Mem>, client: u64, ids: Vec<ObjectId>, ms: u64, t: Instant) -> Vec<Outgoing> {
    let mut out = Vec::new();
    c.handle(
        client,
        1,
        Request::Get {
            ids,
            timeout_ms: ms,
        },
        t,
        &mut out,
    );
    out
}

fn ev(c: &mut Core<Mem>, e: ToCore, t: Instant) -> Vec<Outgoing> {
    let mut out = Vec::new();
    c.cluster_event(e, t, &mut out);
    out
}

fn pulls(jobs: &[ToCluster]) -> Vec<ObjectId> {
    jobs.iter()
        .filter_map(|j| match j {
            ToCluster::Pull { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

fn allocated(jobs: &[ToCluster]) -> Vec<(ObjectId, u64)> {
    jobs.iter()
        .filter_map(|j| match j {
            ToCluster::Allocated { id, offset } => Some((*id, *offset)),
            _ => None,
        })
        .collect()
}

#[test]
fn concurrent_gets_share_one_pull_and_wake_together() {
    let t = Instant::now();
    let mut c = core(1 << 20);
    assert!(
        get(&mut c, 1, vec![remote(1)], 1000, t).is_empty(),
        "the get waits"
    );
    assert!(get(&mut c, 2, vec![remote(1), remote(2)], 1000, t).is_empty());
    let jobs = c.take_cluster_jobs();
    assert_eq!(
        pulls(&jobs),
        vec![remote(1), remote(2)],
        "one pull per object"
    );
    // The owner says sizes; the core reserves room and says where.
    assert!(ev(
        &mut c,
        ToCore::PullSized {
            id: remote(1),
            data_size: 5000,
            meta_size: 3
        },
        t
    )
    .is_empty());
    let jobs = c.take_cluster_jobs();
    let a = allocated(&jobs);
    assert_eq!(a.len(), 1);
    // Not visible before it is complete.
    assert!(!c.table().is_sealed(&remote(1)));
    assert!(c.table().contains(&remote(1)));
    let out = ev(&mut c, ToCore::PullDone { id: remote(1) }, t);
    assert_eq!(
        out.len(),
        1,
        "client 1 wakes; client 2 still waits for the second object"
    );
    assert_eq!(out[0].client, 1);
    assert!(
        matches!(&out[0].reply, Ok(Reply::Objects(l)) if l[0].offset == a[0].1 && l[0].data_size == 5000)
    );
    assert!(c
        .take_cluster_jobs()
        .iter()
        .any(|j| matches!(j, ToCluster::CopyAdded(id) if *id == remote(1))));
    // The second comes inline.
    let out = ev(
        &mut c,
        ToCore::PullInline {
            id: remote(2),
            data_size: 2,
            bytes: b"hi!".to_vec(),
        },
        t,
    );
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].client, 2);
    let Ok(Reply::Objects(l)) = &out[0].reply else {
        panic!("{out:?}")
    };
    assert_eq!((l[1].data_size, l[1].meta_size), (2, 1));
    let off = l[1].offset as usize;
    assert_eq!(&c.mem().0.borrow()[off..off + 3], b"hi!");
    c.table().check_invariants();
}

#[test]
fn admission_in_order_without_overcommit() {
    let t = Instant::now();
    let mut c = core(1 << 20);
    // A local object holds most of the arena, pinned.
    sealed(&mut c, 1, 600 << 10, t);
    let Ok(Reply::Objects(local)) = one(
        &mut c,
        1,
        Request::Get {
            ids: vec![id(1)],
            timeout_ms: 0,
        },
        t,
    ) else {
        panic!("local get")
    };
    for n in 1..=3 {
        assert!(get(&mut c, 2, vec![remote(n)], NO_TIMEOUT, t).is_empty());
    }
    c.take_cluster_jobs();
    ev(
        &mut c,
        ToCore::PullSized {
            id: remote(1),
            data_size: 300 << 10,
            meta_size: 0,
        },
        t,
    );
    ev(
        &mut c,
        ToCore::PullSized {
            id: remote(2),
            data_size: 300 << 10,
            meta_size: 0,
        },
        t,
    );
    ev(
        &mut c,
        ToCore::PullSized {
            id: remote(3),
            data_size: 10,
            meta_size: 0,
        },
        t,
    );
    let a = allocated(&c.take_cluster_jobs());
    assert_eq!(
        a.iter().map(|x| x.0).collect::<Vec<_>>(),
        vec![remote(1)],
        "the second does not fit; the third, small, waits behind it (no overtaking)"
    );
    // The first completes; nothing frees yet (it is pinned by the get it satisfied).
    let out = ev(&mut c, ToCore::PullDone { id: remote(1) }, t);
    assert_eq!(out.len(), 1);
    // The local object is released: room for the second, then the third.
    let mut out = Vec::new();
    c.handle(
        1,
        2,
        Request::Release {
            handles: vec![local[0].handle],
        },
        t,
        &mut out,
    );
    c.handle(1, 3, Request::Delete { ids: vec![id(1)] }, t, &mut out);
    let a = allocated(&c.take_cluster_jobs());
    assert_eq!(
        a.iter().map(|x| x.0).collect::<Vec<_>>(),
        vec![remote(2), remote(3)]
    );
    c.table().check_invariants();
}

#[test]
fn failures_reach_the_waiting_gets_and_free_the_room() {
    let t = Instant::now();
    let mut c = core(1 << 20);
    get(&mut c, 1, vec![remote(1)], 5000, t);
    get(&mut c, 2, vec![remote(1)], 5000, t);
    c.take_cluster_jobs();
    ev(
        &mut c,
        ToCore::PullSized {
            id: remote(1),
            data_size: 4096,
            meta_size: 0,
        },
        t,
    );
    c.take_cluster_jobs();
    let used = c.stats().used_bytes;
    assert!(used > 0);
    let err = ErrorReply::ObjectLost {
        id: remote(1),
        detail: "x".into(),
    };
    let out = ev(
        &mut c,
        ToCore::PullFailed {
            id: remote(1),
            error: err.clone(),
        },
        t,
    );
    assert_eq!(out.len(), 2);
    assert!(out.iter().all(|o| o.reply == Err(err.clone())));
    assert_eq!(c.stats().used_bytes, 0, "the reserved room returned");
    assert!(
        !c.table().contains(&remote(1)),
        "a partial object is never visible"
    );
    // A timeout at the owner: a get that asked for longer pulls again.
    get(&mut c, 1, vec![remote(2)], 0, t);
    get(&mut c, 2, vec![remote(2)], 60_000, t);
    assert_eq!(pulls(&c.take_cluster_jobs()), vec![remote(2)]);
    let out = ev(
        &mut c,
        ToCore::PullFailed {
            id: remote(2),
            error: ErrorReply::Timeout(vec![remote(2)]),
        },
        t,
    );
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].client, 1);
    assert!(matches!(&out[0].reply, Err(ErrorReply::Timeout(ids)) if ids == &vec![remote(2)]));
    assert_eq!(
        pulls(&c.take_cluster_jobs()),
        vec![remote(2)],
        "the patient get pulls again"
    );
    c.table().check_invariants();
}

#[test]
fn copies_are_evicted_not_primaries_and_owners_are_told() {
    let t = Instant::now();
    let mut c = core(1 << 20);
    get(&mut c, 1, vec![remote(1)], 5000, t);
    c.take_cluster_jobs();
    ev(
        &mut c,
        ToCore::PullSized {
            id: remote(1),
            data_size: 400 << 10,
            meta_size: 0,
        },
        t,
    );
    c.take_cluster_jobs();
    let out = ev(&mut c, ToCore::PullDone { id: remote(1) }, t);
    let Ok(Reply::Objects(l)) = &out[0].reply else {
        panic!()
    };
    let mut out = Vec::new();
    c.handle(
        1,
        2,
        Request::Release {
            handles: vec![l[0].handle],
        },
        t,
        &mut out,
    );
    c.take_cluster_jobs();
    sealed(&mut c, 1, 400 << 10, t);
    // No room for another primary unless the copy goes.
    create(&mut c, 2, 2, 400 << 10, t).unwrap();
    assert!(!c.table().contains(&remote(1)), "the copy was evicted");
    let jobs = c.take_cluster_jobs();
    assert!(jobs
        .iter()
        .any(|j| matches!(j, ToCluster::CopiesLost(ids) if ids == &vec![remote(1)])));
    one(&mut c, 2, Request::Seal { id: id(2) }, t).unwrap();
    // Primaries stay: a third does not fit and nothing is evicted.
    assert!(matches!(
        create(&mut c, 2, 3, 400 << 10, t),
        Err(ErrorReply::StoreFull { .. })
    ));
    assert!(c.table().is_sealed(&id(1)) && c.table().is_sealed(&id(2)));
    // The cluster client's own gets never pull.
    let mut out = Vec::new();
    c.handle(
        CLUSTER_CLIENT,
        5,
        Request::Get {
            ids: vec![remote(7)],
            timeout_ms: 0,
        },
        t,
        &mut out,
    );
    assert!(pulls(&c.take_cluster_jobs()).is_empty());
    c.table().check_invariants();
}

#[test]
fn expired_gets_unblock_the_pull_queue_and_waits_probe_again() {
    let t = Instant::now();
    let mut c = core(1 << 20);
    // A big pull that cannot fit (the arena is held by a pinned local object) heads the
    // queue; a small one waits behind it.
    sealed(&mut c, 1, 900 << 10, t);
    one(
        &mut c,
        1,
        Request::Get {
            ids: vec![id(1)],
            timeout_ms: 0,
        },
        t,
    )
    .unwrap();
    get(&mut c, 2, vec![remote(1)], 100, t);
    get(&mut c, 2, vec![remote(2)], 10_000, t);
    c.take_cluster_jobs();
    ev(
        &mut c,
        ToCore::PullSized {
            id: remote(1),
            data_size: 500 << 10,
            meta_size: 0,
        },
        t,
    );
    ev(
        &mut c,
        ToCore::PullSized {
            id: remote(2),
            data_size: 10,
            meta_size: 0,
        },
        t,
    );
    assert!(allocated(&c.take_cluster_jobs()).is_empty());
    // The big one's get expires: the small one is admitted without any other event.
    let mut out = Vec::new();
    c.tick(t + Duration::from_millis(200), &mut out);
    assert_eq!(out.len(), 1, "the big get timed out");
    let jobs = c.take_cluster_jobs();
    assert_eq!(
        allocated(&jobs).iter().map(|x| x.0).collect::<Vec<_>>(),
        vec![remote(2)]
    );
    assert!(jobs
        .iter()
        .any(|j| matches!(j, ToCluster::Cancel { id } if *id == remote(1))));
    // A wait whose probe came back "not sealed" after the owner waited asks again; one
    // that failed at once does not (it would spin).
    let mut out = Vec::new();
    c.handle(
        1,
        7,
        Request::Wait {
            ids: vec![remote(3)],
            num_ready: 1,
            timeout_ms: 60_000,
        },
        t,
        &mut out,
    );
    assert!(out.is_empty());
    let probes = |jobs: &[ToCluster]| {
        jobs.iter()
            .filter(|j| matches!(j, ToCluster::Probe { .. }))
            .count()
    };
    assert_eq!(probes(&c.take_cluster_jobs()), 1);
    ev(
        &mut c,
        ToCore::Probed {
            id: remote(3),
            sealed: false,
        },
        t + Duration::from_millis(1),
    );
    assert_eq!(
        probes(&c.take_cluster_jobs()),
        0,
        "a quick failure is not retried at once"
    );
    c.handle(
        1,
        8,
        Request::Wait {
            ids: vec![remote(3)],
            num_ready: 1,
            timeout_ms: 60_000,
        },
        t,
        &mut out,
    );
    assert_eq!(probes(&c.take_cluster_jobs()), 1);
    ev(
        &mut c,
        ToCore::Probed {
            id: remote(3),
            sealed: false,
        },
        t + Duration::from_secs(30),
    );
    assert_eq!(
        probes(&c.take_cluster_jobs()),
        1,
        "after the owner's wait, ask again"
    );
    let out = ev(
        &mut c,
        ToCore::Probed {
            id: remote(3),
            sealed: true,
        },
        t + Duration::from_secs(31),
    );
    assert_eq!(out.len(), 2, "both waits answer");
    assert!(out.iter().all(|o| o.reply == Ok(Reply::Ready(vec![true]))));
    c.table().check_invariants();
}

fn cancels(jobs: &[ToCluster]) -> Vec<ObjectId> {
    jobs.iter()
        .filter_map(|j| match j {
            ToCluster::Cancel { id } => Some(*id),
            _ => None,
        })
        .collect()
}

/// When the last get waiting for a pull leaves (its deadline, its client's disconnect, its
/// peer's departure), the core cancels the pull, whatever its phase: the cluster side stops
/// asking (a pull refused `Busy` would ask again forever) and `awaiting_cluster` turns false.
/// A pull some get still waits for goes on; a pull whose room is reserved finishes.
#[test]
fn a_pull_nobody_waits_for_is_cancelled() {
    let t = Instant::now();
    let mut c = core(1 << 20);
    // Expiry, in the lookup phase.
    get(&mut c, 1, vec![remote(1)], 100, t);
    get(&mut c, 2, vec![remote(1)], 200, t);
    assert_eq!(pulls(&c.take_cluster_jobs()), vec![remote(1)]);
    let mut out = Vec::new();
    c.tick(t + Duration::from_millis(150), &mut out);
    assert_eq!(out.len(), 1, "the first get expired");
    assert!(
        cancels(&c.take_cluster_jobs()).is_empty(),
        "another get waits"
    );
    c.tick(t + Duration::from_millis(250), &mut out);
    assert_eq!(cancels(&c.take_cluster_jobs()), vec![remote(1)]);
    assert!(!c.awaiting_cluster());
    // Sized and queued for room (admission): cancelled too, and out of the queue.
    get(&mut c, 1, vec![remote(2)], 100, t);
    c.take_cluster_jobs();
    ev(
        &mut c,
        ToCore::PullSized {
            id: remote(2),
            data_size: 10,
            meta_size: 0,
        },
        t,
    );
    let jobs = c.take_cluster_jobs();
    assert_eq!(allocated(&jobs).len(), 1, "room reserved: {jobs:?}");
    c.tick(t + Duration::from_millis(150), &mut out);
    assert!(
        cancels(&c.take_cluster_jobs()).is_empty(),
        "a pull with reserved room finishes (its read writes there)"
    );
    ev(&mut c, ToCore::PullDone { id: remote(2) }, t);
    // A disconnect.
    get(&mut c, 3, vec![remote(3)], 60_000, t);
    c.take_cluster_jobs();
    c.disconnect(3, t, &mut out);
    assert_eq!(cancels(&c.take_cluster_jobs()), vec![remote(3)]);
    assert!(!c.awaiting_cluster());
    // A get again pulls again.
    get(&mut c, 4, vec![remote(3)], 60_000, t);
    assert_eq!(pulls(&c.take_cluster_jobs()), vec![remote(3)]);
}

/// What the cluster side said of a cancelled pull before it took the cancel is stale: a new
/// pull of the same id is not admitted on the old pull's size.
#[test]
fn messages_of_a_cancelled_pull_are_not_taken_for_a_new_one() {
    let t = Instant::now();
    let mut c = core(1 << 20);
    get(&mut c, 1, vec![remote(1)], 100, t);
    c.take_cluster_jobs();
    let mut out = Vec::new();
    c.tick(t + Duration::from_millis(150), &mut out);
    assert_eq!(cancels(&c.take_cluster_jobs()), vec![remote(1)]);
    get(&mut c, 2, vec![remote(1)], 60_000, t);
    assert_eq!(pulls(&c.take_cluster_jobs()), vec![remote(1)]);
    // The old pull's size, sent before the cluster side took the cancel.
    let sized = |c: &mut Core<Mem>| {
        ev(
            c,
            ToCore::PullSized {
                id: remote(1),
                data_size: 10,
                meta_size: 0,
            },
            t,
        );
        allocated(&c.take_cluster_jobs())
    };
    assert!(sized(&mut c).is_empty(), "a stale size reserves nothing");
    ev(&mut c, ToCore::Cancelled { id: remote(1) }, t);
    assert_eq!(sized(&mut c).len(), 1, "the new pull's size does");
}
