#![allow(clippy::cast_possible_truncation)]

use super::*;

fn id(n: u8) -> ObjectId {
    ObjectId::new(NodeId(42), [n; 16])
}

fn all_requests(payload: &[u8]) -> Vec<Request<'_>> {
    vec![
        Request::Create {
            id: id(1),
            data_size: 10,
            meta_size: 3,
            timeout_ms: 5,
        },
        Request::Seal { id: id(2) },
        Request::Abort { id: id(3) },
        Request::Put {
            id: id(4),
            data_len: 2,
            timeout_ms: 0,
            payload,
        },
        Request::Get {
            ids: vec![id(5), id(6)],
            timeout_ms: NO_TIMEOUT,
        },
        Request::Release {
            handles: vec![1, 2, 3],
        },
        Request::Contains { id: id(7) },
        Request::Delete { ids: vec![id(8)] },
        Request::Wait {
            ids: vec![id(9), id(10)],
            num_ready: 1,
            timeout_ms: 100,
        },
        Request::List {
            after: Some(id(11)),
            max: 10,
        },
        Request::List {
            after: None,
            max: 10,
        },
        Request::Stats,
    ]
}

#[test]
fn requests_round_trip() {
    let payload = [1u8, 2, 3, 4];
    for (i, req) in all_requests(&payload).into_iter().enumerate() {
        let mut w = Writer::default();
        req.encode(i as u32, &mut w);
        let (seq, back) = Request::decode(&w.buf).unwrap();
        assert_eq!(seq, i as u32);
        assert_eq!(back, req);
    }
}

#[test]
fn replies_round_trip() {
    let cases: Vec<(Op, Result<Reply, ErrorReply>)> = vec![
        (Op::Create, Ok(Reply::Created { offset: 4096 })),
        (Op::Seal, Ok(Reply::Done)),
        (
            Op::Get,
            Ok(Reply::Objects(vec![ObjectLoc {
                handle: 1,
                offset: 2,
                data_size: 3,
                meta_size: 4,
            }])),
        ),
        (Op::Contains, Ok(Reply::Contains(true))),
        (
            Op::Delete,
            Ok(Reply::Deleted(vec![
                DeleteStatus::Deferred,
                DeleteStatus::NotFound,
            ])),
        ),
        (Op::Wait, Ok(Reply::Ready(vec![true, false]))),
        (
            Op::List,
            Ok(Reply::Listed {
                entries: vec![ListEntry {
                    id: id(1),
                    data_size: 5,
                    meta_size: 0,
                    state: ObjectState::Sealed,
                    pins: 2,
                }],
                more: true,
            }),
        ),
        (
            Op::Stats,
            Ok(Reply::Stats(Stats {
                node_id: NodeId(9),
                arena_bytes: 1 << 30,
                hugepages: true,
                pins: 3,
                spill_engine: SpillEngineInUse::IoUring,
                ..Stats::default()
            })),
        ),
        (
            Op::Stats,
            Ok(Reply::Stats(Stats {
                spill_engine: SpillEngineInUse::Pread,
                ..Stats::default()
            })),
        ),
        (
            Op::Create,
            Err(ErrorReply::StoreFull {
                id: id(1),
                requested: 10,
                free: 5,
                largest_free: 4,
            }),
        ),
        (
            Op::Nodes,
            Ok(Reply::Nodes(ClusterView {
                transport: "rdma".into(),
                epoch: 3,
                members: vec![
                    MemberInfo {
                        node_id: NodeId(1),
                        addr: "10.0.0.1:7420".into(),
                        alive: true,
                        head: true,
                        this: true,
                        transport: String::new(),
                        transport_reason: String::new(),
                    },
                    MemberInfo {
                        node_id: NodeId(2),
                        addr: "10.0.0.2:7420".into(),
                        alive: false,
                        head: false,
                        this: false,
                        transport: "tcp".into(),
                        transport_reason: "the peer offers no RDMA".into(),
                    },
                ],
                status: vec![("rdma_device".into(), "rxe0".into())],
            })),
        ),
        (Op::Get, Err(ErrorReply::Timeout(vec![id(1), id(2)]))),
        (Op::Seal, Err(ErrorReply::Invalid("bad".into()))),
        (
            Op::Get,
            Err(ErrorReply::Corrupted {
                id: id(4),
                detail: "fp-1.spill: payload checksum mismatch".into(),
            }),
        ),
        (
            Op::Get,
            Err(ErrorReply::RestoreFailed {
                id: id(5),
                detail: "EIO".into(),
            }),
        ),
        (
            Op::Create,
            Err(ErrorReply::ForeignOwner {
                id: id(3),
                node: NodeId(1),
            }),
        ),
    ];
    for (op, reply) in cases {
        let mut w = Writer::default();
        encode_reply(op, 77, &reply, &mut w);
        let (op2, seq, back) = decode_reply(&w.buf).unwrap();
        assert_eq!((op2, seq), (op, 77));
        assert_eq!(back, reply);
    }
}

/// The stats reply is 23 u64s; the 22nd names the spill engine (docs/shm-layout.md), and a
/// code this side does not know is rejected rather than shown as something else; the last
/// counts parked gets and waits.
#[test]
fn stats_reply_carries_the_spill_engine() {
    let mut w = Writer::default();
    let s = Stats {
        spill_engine: SpillEngineInUse::Pread,
        gets_waiting: 5,
        ..Stats::default()
    };
    encode_reply(Op::Stats, 1, &Ok(Reply::Stats(s)), &mut w);
    assert_eq!(w.buf.len(), 8 + 23 * 8);
    assert_eq!(&w.buf[8 + 21 * 8..8 + 22 * 8], &2u64.to_le_bytes());
    assert_eq!(&w.buf[8 + 22 * 8..], &5u64.to_le_bytes());
    let last = 8 + 21 * 8;
    w.buf[last..last + 8].copy_from_slice(&7u64.to_le_bytes());
    assert!(matches!(
        decode_reply(&w.buf),
        Err(DecodeError::UnknownCode {
            what: "spill engine",
            ..
        })
    ));
    let names: Vec<&str> = [
        SpillEngineInUse::Off,
        SpillEngineInUse::IoUring,
        SpillEngineInUse::Pread,
    ]
    .iter()
    .map(|e| e.as_str())
    .collect();
    assert_eq!(names, ["off", "io_uring", "pread"]);
}

/// Randomized decoder test (runs on stable in CI; `fuzz/` has the coverage-guided twin):
/// truncations, bit flips and random bytes never panic, and every message that decodes
/// re-encodes to the same bytes.
#[test]
fn decoder_survives_random_and_mutated_input() {
    let mut rng = fastrand::Rng::with_seed(0xfe77);
    let payload = [9u8; 40];
    let mut seeds = Vec::new();
    for (i, req) in all_requests(&payload).into_iter().enumerate() {
        let mut w = Writer::default();
        req.encode(i as u32, &mut w);
        seeds.push(w.buf);
    }
    let mut decoded = 0u32;
    for round in 0..200_000 {
        let mut msg = seeds[round % seeds.len()].clone();
        match rng.u8(0..4) {
            0 => msg.truncate(rng.usize(0..=msg.len())),
            1 => {
                for _ in 0..rng.usize(1..4) {
                    let i = rng.usize(0..msg.len());
                    msg[i] ^= 1 << rng.u8(0..8);
                }
            }
            2 => {
                // Huge counts in every u32-sized window.
                if msg.len() >= 12 {
                    let i = rng.usize(8..msg.len() - 3);
                    msg[i..i + 4].copy_from_slice(&u32::MAX.to_le_bytes());
                }
            }
            _ => {
                msg = (0..rng.usize(0..200)).map(|_| rng.u8(..)).collect();
            }
        }
        if let Ok((seq, req)) = Request::decode(&msg) {
            decoded += 1;
            let mut w = Writer::default();
            req.encode(seq, &mut w);
            // The reserved bytes are ignored on decode and written as zero.
            let mut norm = msg.clone();
            norm[1..4].fill(0);
            if let Request::List { after: None, .. } = req {
                norm[8..9 + ObjectId::LEN].copy_from_slice(&w.buf[8..9 + ObjectId::LEN]);
            }
            assert_eq!(w.buf, norm, "re-encoding differs for {req:?}");
        }
        let _ = decode_reply(&msg);
    }
    assert!(
        decoded > 1000,
        "mutations should still decode sometimes ({decoded})"
    );
}
