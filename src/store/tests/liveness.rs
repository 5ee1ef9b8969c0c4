//! A randomized invariant check of the core's parking: a core is driven by random creates,
//! seals, puts, deletes, gets, waits, releases and disconnects, with simulated disk answers
//! (spills and restores, some failing), a simulated cluster side (pull and probe answers,
//! stale answers to cancelled pulls, peers' calls, a peer going away, `Forget`), and after
//! every step no parked get or wait may be complete already: such a request would hang until
//! its deadline although its answer is ready. The table's invariants are checked too.
//!
//! Seeds are fixed, so a failure is reproduced by its seed; the message names the seed and
//! the step and shows the last operations.

use super::*;
use crate::spill::job::{Job, RestoreFail, SpillFail, SpillLoc};
use crate::store::link::{CoreCall, ToCluster, ToCore, CLUSTER_CLIENT};

const PEER: NodeId = NodeId(7);

/// Which parts of the core are in play.
#[derive(Clone, Copy, Debug)]
struct Setup {
    cluster: bool,
    spill: bool,
}

/// The four configurations: local only, with spilling, in a cluster, both.
const SETUPS: [Setup; 4] = [
    Setup {
        cluster: false,
        spill: false,
    },
    Setup {
        cluster: false,
        spill: true,
    },
    Setup {
        cluster: true,
        spill: false,
    },
    Setup {
        cluster: true,
        spill: true,
    },
];

/// The simulated cluster side: what the core asked of it and has not been answered yet.
#[derive(Default)]
struct ClusterSim {
    jobs: Vec<ToCluster>,
}

impl ClusterSim {
    /// Takes the core's new messages in order. A cancel drops what was pending for its pull,
    /// sometimes after a stale answer sent before the cluster side took the cancel, and is
    /// acknowledged with `Cancelled`.
    fn take(
        &mut self,
        c: &mut Core<Mem>,
        rng: &mut fastrand::Rng,
        now: Instant,
        out: &mut Vec<Outgoing>,
        log: &mut Vec<String>,
    ) {
        for j in c.take_cluster_jobs() {
            match j {
                ToCluster::Pull { .. } | ToCluster::Probe { .. } | ToCluster::Allocated { .. } => {
                    self.jobs.push(j);
                }
                ToCluster::Cancel { id } => {
                    let pending = self
                        .jobs
                        .iter()
                        .any(|j| matches!(j, ToCluster::Pull { id: x, .. } if *x == id));
                    if pending && rng.u8(0..3) == 0 {
                        let ev = ToCore::PullSized {
                            id,
                            data_size: 1000,
                            meta_size: 0,
                        };
                        log.push(format!("  cluster (stale) {ev:?}"));
                        c.cluster_event(ev, now, out);
                    }
                    self.jobs.retain(|j| {
                        !matches!(j, ToCluster::Pull { id: x, .. } | ToCluster::Allocated { id: x, .. } if *x == id)
                    });
                    log.push(format!("  cluster Cancelled {id:?}"));
                    c.cluster_event(ToCore::Cancelled { id }, now, out);
                }
                _ => {}
            }
        }
    }

    /// Answers up to two pending requests, in random order.
    fn answer(
        &mut self,
        c: &mut Core<Mem>,
        rng: &mut fastrand::Rng,
        now: Instant,
        out: &mut Vec<Outgoing>,
        log: &mut Vec<String>,
    ) {
        for _ in 0..rng.usize(0..3) {
            if self.jobs.is_empty() {
                break;
            }
            let j = self.jobs.swap_remove(rng.usize(0..self.jobs.len()));
            let ev = match j {
                ToCluster::Pull { id, .. } => {
                    let n = id.as_bytes()[8];
                    match rng.u8(0..10) {
                        0 => ToCore::PullFailed {
                            id,
                            error: ErrorReply::Timeout(vec![id]),
                        },
                        1 => ToCore::PullFailed {
                            id,
                            error: ErrorReply::ObjectLost {
                                id,
                                detail: "sim".into(),
                            },
                        },
                        2..=5 => ToCore::PullInline {
                            id,
                            data_size: 10,
                            bytes: vec![n; 10],
                        },
                        _ => ToCore::PullSized {
                            id,
                            data_size: [1000u64, 200_000][rng.usize(0..2)],
                            meta_size: 0,
                        },
                    }
                }
                ToCluster::Allocated { id, .. } => {
                    if rng.u8(0..8) == 0 {
                        ToCore::PullFailed {
                            id,
                            error: ErrorReply::ObjectLost {
                                id,
                                detail: "sim".into(),
                            },
                        }
                    } else {
                        ToCore::PullDone { id }
                    }
                }
                ToCluster::Probe { id, .. } => ToCore::Probed {
                    id,
                    sealed: rng.bool(),
                },
                _ => continue,
            };
            log.push(format!("  cluster {ev:?}"));
            c.cluster_event(ev, now, out);
        }
    }
}

/// The simulated disk: spills and restores in flight, answered in random order.
#[derive(Default)]
struct DiskSim {
    jobs: Vec<Job>,
    next_loc: u64,
}

impl DiskSim {
    fn answer(
        &mut self,
        c: &mut Core<Mem>,
        rng: &mut fastrand::Rng,
        now: Instant,
        out: &mut Vec<Outgoing>,
        log: &mut Vec<String>,
    ) {
        self.jobs.extend(c.take_jobs());
        for _ in 0..rng.usize(0..3) {
            if self.jobs.is_empty() {
                break;
            }
            match self.jobs.swap_remove(rng.usize(0..self.jobs.len())) {
                Job::Spill(items) => {
                    for it in items {
                        let result = if rng.u8(0..10) == 0 {
                            Err(SpillFail::DiskFull)
                        } else {
                            self.next_loc += 1;
                            Ok(SpillLoc {
                                file: 0,
                                offset: self.next_loc,
                                disk_len: 4096,
                            })
                        };
                        log.push(format!(
                            "  spill_done {} {:?} ok={}",
                            it.handle,
                            it.id,
                            result.is_ok()
                        ));
                        c.spill_done(it.handle, result, now, out);
                    }
                }
                Job::Restore(r) => {
                    let result = if rng.u8(0..30) == 0 {
                        Err(RestoreFail::Io("sim".into()))
                    } else {
                        Ok(())
                    };
                    log.push(format!(
                        "  restore_done {} {:?} ok={}",
                        r.handle,
                        r.id,
                        result.is_ok()
                    ));
                    c.restore_done(r.handle, result, now, out);
                }
                Job::Free(_) => {}
            }
        }
    }
}

/// Runs `steps` random steps from `seed`; panics with the seed, the step and the last
/// operations when a parked get or wait is complete.
#[allow(clippy::too_many_lines)]
fn run(seed: u64, setup: Setup, steps: u32) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let start = Instant::now();
    let cap = 1u64 << 20;
    let mut c = Core::new(
        Table::new(NODE, cap),
        Mem(RefCell::new(vec![0; cap as usize])),
        CoreConfig {
            inline_threshold: 64 << 10,
            hugepages: false,
            max_pending_per_client: 64,
            spill: setup.spill.then(SpillPolicy::default),
            cluster: setup.cluster,
        },
    );
    for client in 1..=3 {
        c.connect(client);
    }
    let mut handles: Vec<(u64, u64)> = Vec::new();
    let mut disk = DiskSim::default();
    let mut sim = ClusterSim::default();
    let mut out: Vec<Outgoing> = Vec::new();
    let mut log: Vec<String> = Vec::new();
    let pick = |rng: &mut fastrand::Rng| {
        if setup.cluster && rng.u8(0..3) == 0 {
            remote(rng.u8(0..5))
        } else {
            id(rng.u8(0..10))
        }
    };
    // One to four ids, sometimes with a repeat.
    let some_ids = |rng: &mut fastrand::Rng| {
        let k = rng.usize(1..5);
        let mut v: Vec<ObjectId> = (0..k).map(|_| pick(rng)).collect();
        if rng.bool() {
            let d = v[rng.usize(0..v.len())];
            v.push(d);
            let j = rng.usize(0..v.len());
            v.swap(0, j);
        }
        v
    };
    for step in 0..steps {
        let now = start + Duration::from_millis(u64::from(step));
        let client = rng.u64(1..=3);
        let desc = match rng.u8(0..100) {
            0..=11 => {
                let n = rng.u8(0..10);
                let size = [100u64, 3000, 60_000, 300_000][rng.usize(0..4)];
                let timeout_ms = [0u64, 50][rng.usize(0..2)];
                let req = Request::Create {
                    id: id(n),
                    data_size: size,
                    meta_size: 0,
                    timeout_ms,
                };
                c.handle(client, step, req, now, &mut out);
                format!("create c{client} {n} {size} to {timeout_ms}")
            }
            12..=27 => {
                let n = rng.u8(0..10);
                c.handle(client, step, Request::Seal { id: id(n) }, now, &mut out);
                format!("seal c{client} {n}")
            }
            28..=35 => {
                let n = rng.u8(0..10);
                let len = [100usize, 3000, 60_000][rng.usize(0..3)];
                let payload = vec![n; len];
                let timeout_ms = [0u64, 100][rng.usize(0..2)];
                let req = Request::Put {
                    id: id(n),
                    data_len: len as u64,
                    timeout_ms,
                    payload: &payload,
                };
                c.handle(client, step, req, now, &mut out);
                format!("put c{client} {n} {len} to {timeout_ms}")
            }
            36..=41 => {
                let ids = vec![id(rng.u8(0..10))];
                let d = format!("delete c{client} {ids:?}");
                c.handle(client, step, Request::Delete { ids }, now, &mut out);
                d
            }
            42..=57 => {
                let ids = some_ids(&mut rng);
                let timeout_ms = [0u64, 30, 3000, NO_TIMEOUT][rng.usize(0..4)];
                let d = format!("get c{client} {ids:?} to {timeout_ms}");
                c.handle(
                    client,
                    step,
                    Request::Get { ids, timeout_ms },
                    now,
                    &mut out,
                );
                d
            }
            58..=65 => {
                let ids = some_ids(&mut rng);
                let num_ready = rng.u32(1..=ids.len() as u32 + 1);
                let timeout_ms = [0u64, 30, 3000][rng.usize(0..3)];
                let d = format!("wait c{client} {ids:?} {num_ready} to {timeout_ms}");
                let req = Request::Wait {
                    ids,
                    num_ready,
                    timeout_ms,
                };
                c.handle(client, step, req, now, &mut out);
                d
            }
            66..=73 if !handles.is_empty() => {
                let (cl, h) = handles.swap_remove(rng.usize(0..handles.len()));
                if cl == CLUSTER_CLIENT {
                    let call = CoreCall::Release { handles: vec![h] };
                    let ev = ToCore::Call {
                        seq: 0,
                        peer: None,
                        call,
                    };
                    c.cluster_event(ev, now, &mut out);
                } else {
                    c.handle(cl, 0, Request::Release { handles: vec![h] }, now, &mut out);
                }
                format!("release c{cl} {h}")
            }
            74..=75 => {
                c.disconnect(client, now, &mut out);
                handles.retain(|(cl, _)| *cl != client);
                c.connect(client);
                format!("disconnect c{client}")
            }
            76..=79 if setup.cluster => {
                let ids = vec![id(rng.u8(0..10))];
                let timeout_ms = [0u64, 30, 3000][rng.usize(0..3)];
                let call = if rng.bool() {
                    CoreCall::Get { ids, timeout_ms }
                } else {
                    CoreCall::Wait { ids, timeout_ms }
                };
                let d = format!("peer call {call:?}");
                let ev = ToCore::Call {
                    seq: step,
                    peer: Some(PEER),
                    call,
                };
                c.cluster_event(ev, now, &mut out);
                d
            }
            80 if setup.cluster => {
                c.cluster_event(ToCore::PeerGone(PEER), now, &mut out);
                "peer gone".into()
            }
            81 if setup.cluster => {
                let ids = vec![remote(rng.u8(0..5))];
                let d = format!("forget {ids:?}");
                let ev = ToCore::Call {
                    seq: step,
                    peer: Some(OTHER),
                    call: CoreCall::Forget { ids },
                };
                c.cluster_event(ev, now, &mut out);
                d
            }
            _ => "nothing".into(),
        };
        log.push(format!("{step}: {desc}"));
        disk.answer(&mut c, &mut rng, now, &mut out, &mut log);
        if setup.cluster {
            sim.take(&mut c, &mut rng, now, &mut out, &mut log);
            sim.answer(&mut c, &mut rng, now, &mut out, &mut log);
        }
        c.tick(now, &mut out);
        for o in out.drain(..) {
            if let Ok(Reply::Objects(locs)) = &o.reply {
                handles.extend(locs.iter().map(|l| (o.client, l.handle)));
            }
        }
        c.table().check_invariants();
        let bad = c.complete_but_parked();
        if !bad.is_empty() {
            let from = log.len().saturating_sub(60);
            panic!(
                "seed {seed} ({setup:?}) step {step}: complete but parked: {bad:#?}\n\
                 last operations:\n{}",
                log[from..].join("\n")
            );
        }
    }
}

/// Every configuration over `seeds` fixed seeds of `steps` steps.
fn each_setup(seeds: u64, steps: u32) {
    for setup in SETUPS {
        for k in 0..seeds {
            run(1000 + 7 * k, setup, steps);
        }
    }
}

#[test]
fn no_parked_request_is_left_complete() {
    each_setup(12, 1500);
}

/// The long version: `cargo test -p ferroplasma --lib liveness -- --ignored`.
#[test]
#[ignore = "long: a few minutes in debug"]
fn no_parked_request_is_left_complete_long() {
    each_setup(300, 6000);
}
