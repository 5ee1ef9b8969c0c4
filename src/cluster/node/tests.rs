//! Unit tests of the runner: Busy backoff of pulls and probes, and inline_fit.

use ferroplasma_transport::msg::{Envelope, Status};

use super::pull::{BUSY_BACKOFF, BUSY_BACKOFF_MAX};
use super::*;

/// A head node's runner over the in-process transport that knows node 7 as a live member
/// (reached through an address nobody listens on: nothing is answered unless a test
/// feeds the answers in).
fn runner() -> Runner {
    use super::super::{ClusterConfig, CustomTransport, TransportChoice};
    use crate::shm::arena::{Arena, HugepageMode};
    let arena = Arena::create(2 << 20, HugepageMode::Off).expect("arena");
    let arena = Arc::new(arena.into_mapping());
    let mut cfg = ClusterConfig::new("mem:runner-test");
    let net = ferroplasma_transport_mem::MemNetwork::new();
    cfg.transport = TransportChoice::Custom(CustomTransport::new(move |t, listen, r| {
        Ok(Box::new(ferroplasma_transport_mem::MemTransport::new(
            &net,
            Some(listen),
            t,
            r,
        )))
    }));
    let mut r = super::super::start(&cfg, NodeId(1), arena, false, 0)
        .expect("cluster side")
        .runner;
    r.members.join(OWNER, "mem:nobody-listens", Instant::now());
    // No heartbeat in these tests: `next_beat` shows only the backoff.
    r.next_beat = Instant::now() + Duration::from_secs(3600);
    r
}

const OWNER: u64 = 7;

fn id_of(n: u32) -> ObjectId {
    let mut u = [0u8; 16];
    u[..4].copy_from_slice(&n.to_le_bytes());
    ObjectId::new(NodeId(OWNER), u)
}

/// The requests the runner has out for `id`'s pull or probe.
fn asked_for(r: &Runner, id: ObjectId) -> Vec<u64> {
    let mut v: Vec<u64> = r
        .asked
        .iter()
        .filter(
            |(_, a)| matches!(a, Asked::Lookup(x) | Asked::Probe(x, _) | Asked::Pin(x) if *x == id),
        )
        .map(|(&req, _)| req)
        .collect();
    v.sort_unstable();
    v
}

fn answer(r: &mut Runner, req: u64, status: Status, now: Instant) {
    let reply = msg::LookupReply {
        req,
        status: status as i32,
        data_size: 0,
        meta_size: 0,
        inlined: false,
        inline: Vec::new(),
        holders: Vec::new(),
        detail: String::new(),
        generation: 0,
    };
    r.lookup_reply(OWNER, reply, now);
}

/// Starts a pull of `id` and answers its lookup `Busy`.
fn pull_refused_busy(r: &mut Runner, id: ObjectId, now: Instant) {
    r.core_message(ToCluster::Pull {
        id,
        timeout_ms: 60_000,
    });
    let req = *asked_for(r, id).last().expect("a lookup sent");
    answer(r, req, Status::Busy, now);
    assert!(
        asked_for(r, id).is_empty(),
        "the refused lookup is forgotten"
    );
}

fn drain(q: &SegQueue<ToCore>) -> Vec<ToCore> {
    std::iter::from_fn(|| q.pop()).collect()
}

/// Asking again after `Busy` costs `O(due + log n)`: with many pulls backing off, a step
/// where none is due looks at one entry, and so does `next_beat`; the pulls refused
/// together ask again at different times (jitter).
#[test]
fn backoff_work_does_not_grow_with_the_pulls_backing_off() {
    let mut r = runner();
    let now = Instant::now();
    const N: u32 = 2000;
    for n in 0..N {
        pull_refused_busy(&mut r, id_of(n), now);
    }
    r.backoff_visits.set(0);
    r.ask_again(now);
    let beat = r.next_beat();
    assert!(beat > now, "nothing is due yet");
    assert!(
        r.backoff_visits.get() <= 2,
        "a step with nothing due looked at {} backoff entries",
        r.backoff_visits.get()
    );
    // Half the first backoff at most is jitter: some pulls are due before the full 10 ms.
    let later = now + BUSY_BACKOFF * 3 / 4;
    r.backoff_visits.set(0);
    let before = r.asked.len();
    r.ask_again(later);
    let due = (r.asked.len() - before) as u64;
    assert!(
        due > 0 && due < u64::from(N),
        "jitter spreads the re-asks: {due} due"
    );
    assert!(
        r.backoff_visits.get() <= due + 1,
        "{} entries looked at for {due} due",
        r.backoff_visits.get()
    );
}

/// A pull whose owner connection fails during its backoff asks again at once, and not a
/// second time when the backoff ends; a finished or cancelled pull leaves no wake-up.
#[test]
fn a_pull_leaves_its_backoff_when_it_asks_again_or_ends() {
    let mut r = runner();
    let now = Instant::now();
    let id = id_of(1);
    pull_refused_busy(&mut r, id, now);
    assert!(
        r.next_beat() < now + BUSY_BACKOFF_MAX,
        "the backoff wakes the loop"
    );
    r.source_failed(id, OWNER, "the connection dropped");
    assert_eq!(asked_for(&r, id).len(), 1, "asked again at once");
    r.ask_again(now + Duration::from_secs(5));
    assert_eq!(
        asked_for(&r, id).len(),
        1,
        "and not again when the backoff ends"
    );
    assert_eq!(r.pulls[&id].lookups, 2, "the Busy answer spent no lookup");

    let other = id_of(2);
    pull_refused_busy(&mut r, other, now);
    r.core_message(ToCluster::Cancel { id: other });
    assert!(r.backoff.is_empty(), "a cancelled pull leaves its backoff");
    assert!(
        drain(&r.to_core)
            .iter()
            .any(|m| matches!(m, ToCore::Cancelled { id: x } if *x == other)),
        "the core hears the cancel was taken"
    );
    assert_eq!(r.next_beat(), r.next_beat, "no wake-up for it");
}

/// A probe (a wait) answered `Busy` asks again after a backoff instead of reporting
/// "not sealed" at once, and reports it only once its wait is over.
#[test]
fn a_probe_refused_busy_asks_again() {
    let mut r = runner();
    let now = Instant::now();
    let id = id_of(3);
    r.core_message(ToCluster::Probe {
        id,
        timeout_ms: 10_000,
    });
    let req = *asked_for(&r, id).last().expect("a probe sent");
    answer(&mut r, req, Status::Busy, now);
    let told = drain(&r.to_core);
    assert!(
        !told.iter().any(|m| matches!(m, ToCore::Probed { .. })),
        "a Busy probe is not an answer: {told:?}"
    );
    r.ask_again(now + BUSY_BACKOFF);
    let again = asked_for(&r, id);
    assert_eq!(again.len(), 1, "probed again");
    answer(&mut r, again[0], Status::Found, now + BUSY_BACKOFF);
    let told = drain(&r.to_core);
    assert!(
        told.iter()
            .any(|m| matches!(m, ToCore::Probed { id: x, sealed: true } if *x == id)),
        "{told:?}"
    );
    // Refused until its wait is over: then "not sealed".
    r.core_message(ToCluster::Probe { id, timeout_ms: 50 });
    let mut t = now;
    for _ in 0..10 {
        if let Some(&req) = asked_for(&r, id).last() {
            answer(&mut r, req, Status::Busy, t);
        }
        t += BUSY_BACKOFF_MAX;
        r.ask_again(t);
    }
    let told = drain(&r.to_core);
    assert!(
        told.iter()
            .any(|m| matches!(m, ToCore::Probed { id: x, sealed: false } if *x == id)),
        "{told:?}"
    );
    assert!(r.probes.is_empty() && r.backoff.is_empty());
}

/// The largest reply a node sends, with an object of [`inline_fit`] bytes inline, fits the
/// cap it was computed for; tcp's cap fits a 64 KiB object, the smallest cap does not.
#[test]
fn inline_fit_leaves_room_for_the_largest_reply() {
    for cap in [
        ferroplasma_transport::MIN_CONTROL_MSG,
        ferroplasma_transport_tcp::MAX_CONTROL_MSG,
    ] {
        let fit = usize::try_from(inline_fit(cap)).expect("small");
        let r = msg::LookupReply {
            req: u64::MAX,
            status: Status::Found as i32,
            data_size: u64::MAX,
            meta_size: u64::MAX,
            inlined: true,
            inline: vec![0xa5; fit],
            holders: vec![u64::MAX; super::super::directory::MAX_HOLDERS + 1],
            detail: String::new(),
            generation: u64::MAX,
        };
        let len = Envelope::of(Body::LookupReply(r)).to_bytes().len();
        assert!(
            len <= cap,
            "cap {cap}: a reply inlining {fit} bytes is {len}"
        );
        assert!(
            len + 64 > cap,
            "cap {cap}: {fit} bytes wastes {}",
            cap - len
        );
    }
    assert!(inline_fit(ferroplasma_transport_tcp::MAX_CONTROL_MSG) >= 64 << 10);
    assert!(inline_fit(ferroplasma_transport::MIN_CONTROL_MSG) < 4 << 10);
}
