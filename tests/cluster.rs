//! Several nodes in one process, over the in-process (`mem`) and the TCP transport on
//! 127.0.0.x addresses: remote gets, inline lookups, waits across nodes, copies, deletes,
//! eviction of copies, dead nodes, tokens.

mod common;

use std::time::{Duration, Instant};

use ferroplasma::client::GetError;
use ferroplasma::cluster::{ClusterConfig, CustomTransport, TransportChoice};
use ferroplasma::server::{Node, NodeConfig, StartError};
use ferroplasma::ObjectId;
use ferroplasma_transport_mem::{MemNetwork, MemTransport};

use common::{connect, eventually, pattern, wait_alive};

#[derive(Clone)]
enum Net {
    Mem(MemNetwork),
    Tcp,
}

fn net_of(kind: &str) -> Net {
    match kind {
        "mem" => Net::Mem(MemNetwork::new()),
        _ => Net::Tcp,
    }
}

/// Cluster settings for node number `i` (0 is the head).
/// The cluster token of these tests (nodes require at least 16 bytes).
const TOKEN: &[u8] = b"cluster tests token, 0123456789abcdef";

fn cluster_cfg(net: &Net, i: u8, head: Option<&str>, token: &[u8]) -> ClusterConfig {
    let mut cc = match net {
        Net::Mem(n) => {
            let mut cc = ClusterConfig::new(format!("mem:{}:{i}", std::process::id()));
            let n = n.clone();
            cc.transport = TransportChoice::Custom(CustomTransport::new(move |t, listen, r| {
                Ok(Box::new(MemTransport::new(&n, Some(listen), t, r)))
            }));
            cc
        }
        // Every node on its own loopback address.
        Net::Tcp => ClusterConfig::new(format!("127.0.0.{}:0", i + 1)),
    };
    cc.join = head.map(str::to_string);
    cc.token = token.to_vec();
    cc.heartbeat = Duration::from_millis(50);
    cc.dead_after = Duration::from_millis(600);
    cc.chunk = 256 << 10;
    cc
}

fn node_cfg(tag: &str, memory: u64, cc: ClusterConfig) -> NodeConfig {
    let mut cfg = common::config(tag, memory);
    cfg.cluster = Some(cc);
    cfg
}

/// Starts `n` nodes, the first one the head, and waits until every node sees all of them.
fn cluster(net: &Net, n: u8, memory: u64) -> Vec<Node> {
    let head = Node::start(node_cfg("head", memory, cluster_cfg(net, 0, None, TOKEN)))
        .expect("head starts");
    let addr = head.info().peer_addr.clone().expect("head listens");
    let mut nodes = vec![head];
    for i in 1..n {
        let cc = cluster_cfg(net, i, Some(&addr), TOKEN);
        nodes.push(Node::start(node_cfg("member", memory, cc)).expect("member starts"));
    }
    for node in &nodes {
        wait_alive(&connect(node), usize::from(n));
    }
    nodes
}

const T: Duration = Duration::from_secs(20);

/// Runs a scenario as two tests, over the in-process and the TCP transport.
macro_rules! over_both_transports {
    ($name:ident) => {
        mod $name {
            #[test]
            fn mem() {
                super::$name("mem");
            }

            #[test]
            fn tcp() {
                super::$name("tcp");
            }
        }
    };
}

fn remote_get_every_size(kind: &str) {
    let net = net_of(kind);
    let nodes = cluster(&net, 2, 64 << 20);
    let (a, b) = (connect(&nodes[0]), connect(&nodes[1]));
    let inline = a.inline_threshold();
    let cases: Vec<(usize, usize)> = vec![
        (0, 0),
        (1, 0),
        (100, 7),
        (usize::try_from(inline).unwrap_or(0) - 10, 10),
        (usize::try_from(inline).unwrap_or(0), 1),
        (256 << 10, 0),
        ((1 << 20) + 3, 100),
        (9 << 20, 4096),
    ];
    let mut ids = Vec::new();
    for (i, &(d, m)) in cases.iter().enumerate() {
        let id = a.new_id();
        let seed = i as u64 + 1;
        a.put_with(id, &pattern(seed, d), &pattern(seed + 100, m))
            .expect("put on the head");
        ids.push((id, seed, d, m));
    }
    for &(id, seed, d, m) in &ids {
        let v = b.get(&[id], T).expect("remote get");
        assert!(
            v[0].data() == pattern(seed, d).as_slice(),
            "data of a {d}-byte object"
        );
        assert!(
            v[0].metadata() == pattern(seed + 100, m).as_slice(),
            "metadata of a {d}-byte object"
        );
        // Now a local copy: a second get needs no network and sees the same bytes.
        drop(v);
        let v = b.get(&[id], Duration::ZERO).expect("local get of the copy");
        assert_eq!(v[0].data().len(), d);
    }
    // All at once in one get, from a third client on the other node.
    let all: Vec<ObjectId> = ids.iter().map(|x| x.0).collect();
    let c = connect(&nodes[1]);
    assert_eq!(c.get(&all, T).expect("multi get").len(), all.len());
    // The copies are listed as sealed objects on b, owned by a.
    let listed = b.list().expect("list");
    assert_eq!(listed.len(), ids.len());
    assert!(listed.iter().all(|e| e.id.owner() == a.node_id()));
}

over_both_transports!(remote_get_every_size);

fn concurrent_gets_and_waits(kind: &str) {
    let net = net_of(kind);
    let nodes = cluster(&net, 3, 64 << 20);
    let a = connect(&nodes[0]);
    let id = a.new_id();
    let data = pattern(42, 3 << 20);
    // Gets and waits on two other nodes, before the object exists.
    std::thread::scope(|s| {
        let mut hs = Vec::new();
        for k in 0..6 {
            let node = &nodes[1 + k % 2];
            let data = &data;
            hs.push(s.spawn(move || {
                let c = connect(node);
                if k % 3 == 0 {
                    let r = c.wait(&[id], 1, T).expect("wait across nodes");
                    assert_eq!(r, (vec![id], vec![]));
                } else {
                    let v = c.get(&[id], T).expect("get before the put");
                    assert!(v[0].data() == data.as_slice());
                }
            }));
        }
        // Every get and wait is parked at its node (three on each): only now the put.
        for node in &nodes[1..] {
            common::wait_for_parked_gets(&connect(node), 3, "the gets and waits before the put");
        }
        a.put_with(id, &data, b"").expect("put");
        for h in hs {
            h.join().expect("getter");
        }
    });
    // A remote object that never comes: the get times out, naming it.
    let missing = a.new_id();
    let b = connect(&nodes[1]);
    match b.get(&[missing], Duration::from_millis(300)) {
        Err(GetError::Timeout { not_ready }) => assert_eq!(not_ready, vec![missing]),
        other => panic!("expected a timeout, got {other:?}"),
    }
    let r = b
        .wait(&[missing], 1, Duration::from_millis(200))
        .expect("wait");
    assert_eq!(r, (vec![], vec![missing]));
}

over_both_transports!(concurrent_gets_and_waits);

fn copies_are_served_and_deleted(kind: &str) {
    let net = net_of(kind);
    let nodes = cluster(&net, 3, 64 << 20);
    let (a, b, c) = (connect(&nodes[0]), connect(&nodes[1]), connect(&nodes[2]));
    let id = a.new_id();
    let data = pattern(7, 2 << 20);
    a.put_with(id, &data, b"m").expect("put");
    drop(b.get(&[id], T).expect("b pulls"));
    // b told the owner; c may pull from b's copy now (or the owner): the bytes match.
    let v = c.get(&[id], T).expect("c pulls");
    assert!(v[0].data() == data.as_slice());
    drop(v);
    // Deleting at the owner drops the copies everywhere.
    a.delete(&[id]).expect("delete");
    eventually("copies to be forgotten", || {
        !b.contains(&id).expect("contains") && !c.contains(&id).expect("contains")
    });
}

over_both_transports!(copies_are_served_and_deleted);

#[test]
fn copies_are_evicted_primaries_are_not() {
    let net = net_of("tcp");
    // b is small: its copies must make room for each other.
    let head =
        Node::start(node_cfg("head", 64 << 20, cluster_cfg(&net, 0, None, b""))).expect("head");
    let addr = head.info().peer_addr.clone().expect("addr");
    let small = Node::start(node_cfg(
        "small",
        8 << 20,
        cluster_cfg(&net, 1, Some(&addr), b""),
    ))
    .expect("small");
    let (a, b) = (connect(&head), connect(&small));
    wait_alive(&b, 2);
    let ids: Vec<ObjectId> = (0..6u64)
        .map(|i| {
            let id = a.new_id();
            a.put_with(id, &pattern(i, 3 << 20), b"").expect("put");
            id
        })
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let v = b.get(&[*id], T).expect("pull into a small node");
        assert!(v[0].data() == pattern(i as u64, 3 << 20).as_slice());
    }
    let st = b.stats().expect("stats");
    assert!(
        st.evictions >= 3,
        "copies were evicted to make room: {st:?}"
    );
    // An evicted copy comes back on demand.
    let v = b.get(&ids[..1], T).expect("pull again");
    assert!(v[0].data() == pattern(0, 3 << 20).as_slice());
    drop(v);
    // The small node's own objects are never evicted in a cluster: a full store says so.
    let own: Vec<_> = (0..2).map(|i| b.put(&pattern(100 + i, 3 << 20))).collect();
    assert!(
        own.iter().all(Result::is_ok),
        "copies make way for own objects"
    );
    let full = b.put(&pattern(200, 3 << 20));
    assert!(full.is_err(), "own objects are not evicted for another");
    for id in own.into_iter().flatten() {
        assert!(
            b.contains(&id).expect("contains"),
            "own object {id} was evicted"
        );
    }
}

#[test]
fn dead_owner_and_dead_members() {
    let net = net_of("tcp");
    let nodes = cluster(&net, 3, 32 << 20);
    let mut nodes = nodes.into_iter();
    let head = nodes.next().expect("head");
    let b = nodes.next().expect("b");
    let c = nodes.next().expect("c");
    let (cb, cc) = (connect(&b), connect(&c));
    // An object owned by c, and c dies before anyone pulled it.
    let id = cc.new_id();
    cc.put_with(id, &pattern(1, 1 << 20), b"").expect("put");
    let c_id = cc.node_id();
    drop(cc);
    drop(c);
    // The head declares c dead and everyone learns it.
    eventually("c declared dead", || {
        cb.nodes()
            .expect("nodes")
            .members
            .iter()
            .any(|m| m.node_id == c_id && !m.alive)
    });
    match cb.get(&[id], T) {
        Err(GetError::OwnerDied { id: got, node }) => {
            assert_eq!((got, node), (id, c_id));
        }
        other => panic!("expected OwnerDied, got {other:?}"),
    }
    // The survivors still work together.
    let ch = connect(&head);
    let id2 = ch.new_id();
    ch.put_with(id2, b"still here", b"").expect("put");
    assert_eq!(cb.get(&[id2], T).expect("get")[0].data(), b"still here");
}

#[test]
fn wrong_token_cannot_join_or_read() {
    let net = net_of("tcp");
    let head = Node::start(node_cfg(
        "head",
        16 << 20,
        cluster_cfg(&net, 0, None, b"the right token, 32 bytes long!!"),
    ))
    .expect("head");
    let addr = head.info().peer_addr.clone().expect("addr");
    let intruder = Node::start(node_cfg(
        "intruder",
        16 << 20,
        cluster_cfg(&net, 1, Some(&addr), b"the wrong token, 32 bytes long!!"),
    ))
    .expect("intruder starts");
    let a = connect(&head);
    let id = a.new_id();
    a.put_with(id, b"secret", b"").expect("put");
    // The intruder dials the head again and again; wait until two of its connections have
    // been closed (refused), as the kernel's socket table shows, rather than for a while.
    let head_addr: std::net::SocketAddr = addr.parse().expect("head address");
    let seen_before = closed_connections(head_addr);
    eventually("two refused join attempts", || {
        closed_connections(head_addr)
            .difference(&seen_before)
            .count()
            >= 2
    });
    let v = a.nodes().expect("nodes");
    assert_eq!(v.members.len(), 1, "the head let an intruder in: {v:?}");
    let x = connect(&intruder);
    assert_eq!(x.nodes().expect("nodes").members.len(), 1);
    assert!(
        x.get(&[id], Duration::from_millis(500)).is_err(),
        "intruder read an object"
    );
}

/// The far ends of the closed or closing TCP connections (FIN_WAIT1 through CLOSING,
/// TIME_WAIT included) with the listener at `to`, from `/proc/net/tcp`.
fn closed_connections(to: std::net::SocketAddr) -> std::collections::HashSet<(u32, u16)> {
    let endpoint = |a: &str| -> Option<(u32, u16)> {
        let (ip, port) = a.split_once(':')?;
        // The address is the kernel's 32-bit word as is: compare it in the same form.
        Some((
            u32::from_str_radix(ip, 16).ok()?,
            u16::from_str_radix(port, 16).ok()?,
        ))
    };
    let std::net::SocketAddr::V4(to) = to else {
        return Default::default();
    };
    let to = (u32::from_ne_bytes(to.ip().octets()), to.port());
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, remote) = (endpoint(f.get(1)?)?, endpoint(f.get(2)?)?);
            // 04 FIN_WAIT1, 05 FIN_WAIT2, 06 TIME_WAIT, 07 CLOSE, 08 CLOSE_WAIT, 09 LAST_ACK,
            // 0B CLOSING.
            let closing = matches!(*f.get(3)?, "04" | "05" | "06" | "07" | "08" | "09" | "0B");
            let far = if local == to {
                remote
            } else if remote == to {
                local
            } else {
                return None;
            };
            closing.then_some(far)
        })
        .collect()
}

#[test]
fn refuses_open_listen_without_token() {
    let mut cc = ClusterConfig::new("0.0.0.0:0");
    cc.heartbeat = Duration::from_millis(50);
    match Node::start(node_cfg("open", 8 << 20, cc.clone())) {
        Err(StartError::Insecure { addr }) => assert_eq!(addr, "0.0.0.0:0"),
        other => panic!(
            "expected a refusal, got {:?}",
            other.map(|n| n.info().clone())
        ),
    }
    cc.insecure = true;
    cc.listen = "127.0.0.1:0".into();
    Node::start(node_cfg("lo", 8 << 20, cc)).expect("loopback without a token is fine");
}

#[test]
fn refuses_short_tokens_and_keyed_checksums_without_a_token() {
    let mut cc = ClusterConfig::new("127.0.0.1:0");
    cc.token = b"tok".to_vec();
    match Node::start(node_cfg("short", 8 << 20, cc.clone())) {
        Err(e @ StartError::ClusterConfig(_)) => {
            let msg = e.to_string();
            assert!(msg.contains("at least 16"), "{msg}");
            assert!(msg.contains("head -c 32 /dev/urandom | base64"), "{msg}");
        }
        other => panic!(
            "a 3-byte token was accepted: {:?}",
            other.map(|n| n.info().clone())
        ),
    }
    cc.token.clear();
    cc.checksums = ferroplasma::cluster::ChecksumMode::Keyed;
    match Node::start(node_cfg("keyed", 8 << 20, cc.clone())) {
        Err(StartError::ClusterConfig(ferroplasma::cluster::ConfigError::KeyedWithoutToken)) => {}
        other => panic!(
            "keyed checksums without a token were accepted: {:?}",
            other.map(|n| n.info().clone())
        ),
    }
    cc.token = TOKEN.to_vec();
    Node::start(node_cfg("ok", 8 << 20, cc)).expect("a long token is fine");
}

/// Through the command line: `ferroplasma node` with a 1-byte token file exits at once with
/// an error that says how to make a good token.
#[test]
fn cli_refuses_a_short_token() {
    let dir = std::env::temp_dir().join(format!("fp-short-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let token = dir.join("token");
    std::fs::write(&token, "x\n").expect("token");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ferroplasma"))
        .args([
            "node",
            "--memory",
            "8MiB",
            "--hugepages",
            "off",
            "--spill",
            "off",
        ])
        .args(["--listen", "127.0.0.1:0", "--token-file"])
        .arg(&token)
        .arg("--socket")
        .arg(dir.join("node.sock"))
        .env("FERROPLASMA_TOKEN", "")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run ferroplasma node");
    let until = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break Some(st);
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        status.is_some_and(|st| !st.success()),
        "started with a 1-byte token: {err}"
    );
    assert!(err.contains("at least 16"), "{err}");
    assert!(err.contains("head -c 32 /dev/urandom | base64"), "{err}");
}

/// Speaks the hand-shake as node `node_id` with `token` over a raw socket; returns the
/// socket and the sealer that tags the frames sent on it.
fn raw_peer(
    addr: &str,
    token: &[u8],
    node_id: u64,
) -> (std::net::TcpStream, ferroplasma_transport::session::Sealer) {
    use ferroplasma_transport::hello::{Handshake, Role, FINISHED_LEN, IDENT_FIXED, PROOF_LEN};
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut hs = Handshake::new(Role::Initiator, token, [7; 32], node_id, "127.0.0.9:1");
    s.write_all(&hs.hello()).expect("hello");
    let mut theirs = [0u8; 48];
    s.read_exact(&mut theirs).expect("their hello");
    hs.their_hello(&theirs).expect("hello ok");
    s.write_all(&hs.proof()).expect("proof");
    let mut p = [0u8; PROOF_LEN];
    s.read_exact(&mut p).expect("their proof");
    hs.their_proof(&p).expect("proof ok");
    s.write_all(&hs.ident()).expect("ident");
    let mut f = [0u8; IDENT_FIXED];
    s.read_exact(&mut f).expect("their ident");
    let (_, n) = ferroplasma_transport::hello::decode_ident_fixed(&f).expect("ident ok");
    let mut a = vec![0u8; n];
    s.read_exact(&mut a).expect("their addr");
    let mut session = hs.session(&[f.as_slice(), &a].concat()).expect("keys");
    s.write_all(&session.sealer.finished()).expect("finished");
    let mut fin = [0u8; FINISHED_LEN];
    s.read_exact(&mut fin).expect("their finished");
    session.opener.finished(&fin).expect("finished ok");
    (s, session.sealer)
}

fn dropped(s: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    let mut b = [0u8; 4096];
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn lying_peers_are_dropped_and_the_node_keeps_serving() {
    use ferroplasma_transport::frame::Header;
    use ferroplasma_transport::msg::{Body, Envelope, Lookup, LookupReply, Pin};
    use std::io::Write;
    let net = net_of("tcp");
    let nodes = cluster(&net, 2, 32 << 20);
    let addr = nodes[0].info().peer_addr.clone().expect("addr");
    let (a, b) = (connect(&nodes[0]), connect(&nodes[1]));
    let id = a.new_id();
    a.put_with(id, &pattern(5, 1 << 20), b"").expect("put");
    // Garbage in a well-framed message.
    let (mut s, mut k) = raw_peer(&addr, TOKEN, 77);
    let junk = [0xffu8; 64];
    let f = sealed_msg(&mut k, &junk);
    s.write_all(&f).expect("send");
    assert!(dropped(&mut s), "a peer sending garbage was not dropped");
    // A frame header that lies about its length.
    let (mut s, mut k) = raw_peer(&addr, TOKEN, 78);
    let mut h = Header::msg(1).encode();
    h[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    k.seal(&mut h).expect("seal");
    s.write_all(&h).expect("send");
    assert!(
        dropped(&mut s),
        "a peer lying about a frame length was not dropped"
    );
    // A peer that pins objects and answers lookups it never asked for is harmless; when it
    // goes away its pins go with it.
    let (mut s, mut k) = raw_peer(&addr, TOKEN, 79);
    let mut send = |s: &mut std::net::TcpStream, body: Body| {
        let bytes = Envelope::of(body).to_bytes();
        let f = sealed_msg(&mut k, &bytes);
        s.write_all(&f).expect("send");
    };
    // Learn the object's generation as a node would.
    send(
        &mut s,
        Body::Lookup(Lookup {
            req: 5,
            id: id.as_bytes().to_vec(),
            timeout_ms: 1000,
            probe: false,
            inline_max: 0,
        }),
    );
    let generation = loop {
        let body = read_frame_body(&mut s).expect("a frame");
        if let Ok(Envelope {
            body: Some(Body::LookupReply(r)),
        }) = Envelope::from_bytes(&body)
        {
            break r.generation;
        }
    };
    for body in [
        Body::Pin(Pin {
            req: 1,
            id: id.as_bytes().to_vec(),
            generation,
        }),
        Body::Pin(Pin {
            req: 2,
            id: vec![1, 2, 3],
            generation: 0,
        }),
        // Another incarnation of the id: refused.
        Body::Pin(Pin {
            req: 3,
            id: id.as_bytes().to_vec(),
            generation: generation + 1,
        }),
        Body::LookupReply(LookupReply {
            req: 999,
            data_size: u64::MAX,
            ..Default::default()
        }),
    ] {
        send(&mut s, body);
    }
    // Every pin gets an answer; once all three answers are here the pins are
    // taken or refused, and a lookup sent after the stray reply is answered too (the stray
    // reply did not cost the connection).
    send(
        &mut s,
        Body::Lookup(Lookup {
            req: 6,
            id: id.as_bytes().to_vec(),
            timeout_ms: 1000,
            probe: false,
            inline_max: 0,
        }),
    );
    let mut pins = std::collections::BTreeMap::new();
    let mut looked_up = false;
    while pins.len() < 3 || !looked_up {
        let body = read_frame_body(&mut s).expect("a frame");
        match Envelope::from_bytes(&body) {
            Ok(Envelope {
                body: Some(Body::PinReply(r)),
            }) => {
                pins.insert(r.req, r.status);
            }
            Ok(Envelope {
                body: Some(Body::LookupReply(r)),
            }) if r.req == 6 => looked_up = true,
            _ => {}
        }
    }
    let found = ferroplasma_transport::msg::Status::Found as i32;
    assert_eq!(
        pins[&1], found,
        "the pin of the right generation is granted"
    );
    assert!(
        pins[&2] != found && pins[&3] != found,
        "a malformed id or another generation is refused: {pins:?}"
    );
    // The lookups' own short pins are released through the node's queue: wait for them.
    eventually("only the granted pin to remain", || {
        a.stats().expect("stats").pins == 1
    });
    drop(s);
    eventually("the dropped peer's pins to go", || {
        a.stats().expect("stats").pins == 0
    });
    // Everyone else is still served.
    let v = b.get(&[id], T).expect("get after the bad peers");
    assert!(v[0].data() == pattern(5, 1 << 20).as_slice());
}

#[test]
fn a_re_created_id_is_never_served_from_an_old_copy() {
    let net = net_of("mem");
    let nodes = cluster(&net, 3, 64 << 20);
    let (a, b, c) = (connect(&nodes[0]), connect(&nodes[1]), connect(&nodes[2]));
    let id = a.new_id();
    a.put_with(id, &pattern(1, 1 << 20), b"").expect("put v1");
    drop(b.get(&[id], T).expect("b copies v1"));
    a.delete(&[id]).expect("delete");
    eventually("b's copy to be forgotten", || {
        !b.contains(&id).expect("contains")
    });
    // Same id, same size, other bytes.
    a.put_with(id, &pattern(2, 1 << 20), b"").expect("put v2");
    for client in [&c, &b] {
        let v = client.get(&[id], T).expect("get v2");
        assert!(
            v[0].data() == pattern(2, 1 << 20).as_slice(),
            "an old copy was served"
        );
    }
}

/// Reads one control message from a raw peer connection (`None` when nothing came in time).
fn read_msg(s: &mut std::net::TcpStream) -> Option<ferroplasma_transport::msg::Body> {
    use ferroplasma_transport::msg::Envelope;
    Envelope::from_bytes(&read_frame_body(s)?).ok()?.body
}

/// Reads the next frame from a raw peer connection and returns its body (without the body
/// tag, which the test does not check); `None` when nothing came in time.
fn read_frame_body(s: &mut std::net::TcpStream) -> Option<Vec<u8>> {
    use ferroplasma_transport::frame::{Header, BODY_TAG_LEN, HEADER_LEN};
    use std::io::Read;
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).ok()?;
    let hdr = Header::decode(&h).expect("valid header");
    let tag = if hdr.has_body_tag() { BODY_TAG_LEN } else { 0 };
    let mut body = vec![0u8; hdr.len as usize + tag];
    s.read_exact(&mut body).expect("frame body");
    body.truncate(hdr.len as usize);
    Some(body)
}

/// A correctly tagged control message frame from a raw peer.
fn sealed_msg(k: &mut ferroplasma_transport::session::Sealer, body: &[u8]) -> Vec<u8> {
    use ferroplasma_transport::frame::{unsealed, Header};
    let len = u32::try_from(body.len()).expect("len");
    let mut f = unsealed(&Header::msg(len), body);
    k.seal(&mut f).expect("seal");
    f
}

#[test]
fn a_peer_flooding_lookups_is_refused_and_others_are_served() {
    use ferroplasma::store::MAX_PARKED_PER_PEER;
    use ferroplasma_transport::msg::{Body, Envelope, Lookup, Status};
    use std::io::Write;
    let net = net_of("tcp");
    let nodes = cluster(&net, 2, 32 << 20);
    let addr = nodes[0].info().peer_addr.clone().expect("addr");
    let (a, b) = (connect(&nodes[0]), connect(&nodes[1]));
    // Not sealed yet: every lookup of it parks at its owner, node 0.
    let id = a.new_id();
    let excess = 10;
    let total = MAX_PARKED_PER_PEER + excess;
    let (mut s, mut k) = raw_peer(&addr, TOKEN, 81);
    let mut frames = Vec::new();
    for req in 0..total as u64 {
        let bytes = Envelope::of(Body::Lookup(Lookup {
            req,
            id: id.as_bytes().to_vec(),
            timeout_ms: 20_000,
            probe: false,
            inline_max: 0,
        }))
        .to_bytes();
        let f = sealed_msg(&mut k, &bytes);
        frames.extend_from_slice(&f);
    }
    s.write_all(&frames).expect("send the flood");
    // The excess is refused at once, with a reason.
    let mut refused = 0;
    while refused < excess {
        match read_msg(&mut s) {
            Some(Body::LookupReply(r)) => {
                assert_eq!(r.status, Status::Busy as i32, "{r:?}");
                assert!(r.detail.contains("waiting requests"), "{}", r.detail);
                assert!(r.req >= MAX_PARKED_PER_PEER as u64, "{r:?}");
                refused += 1;
            }
            Some(_) => {}
            None => panic!("only {refused} of {excess} lookups over the cap were refused"),
        }
    }
    // Another node's lookups still park at the owner while the flooder's are parked: a get
    // of an object nobody seals times out (it is not refused) ...
    let other = a.new_id();
    match b.get(&[other], Duration::from_millis(300)) {
        Err(GetError::Timeout { not_ready }) => assert_eq!(not_ready, [other]),
        Err(e) => panic!("the other node was refused: {e}"),
        Ok(_) => panic!("nobody sealed {other}"),
    }
    // ... and local clients and the other node get what is sealed.
    a.put_with(id, &pattern(6, 4096), b"").expect("put");
    let v = b.get(&[id], T).expect("remote get during the flood");
    assert!(v[0].data() == pattern(6, 4096).as_slice());
    let v = a.get(&[id], T).expect("local get");
    assert!(v[0].data() == pattern(6, 4096).as_slice());
    // The flooder's parked lookups are answered too.
    let mut found = 0;
    while found < MAX_PARKED_PER_PEER {
        match read_msg(&mut s) {
            Some(Body::LookupReply(r)) => {
                assert_eq!(r.status, Status::Found as i32, "{r:?}");
                found += 1;
            }
            Some(_) => {}
            None => panic!("only {found} parked lookups were answered"),
        }
    }
}

type Getter = std::thread::JoinHandle<Result<Vec<Vec<u8>>, GetError>>;

/// Gets from several clients of node 1 waiting on more unsealed objects of node 0 than node 0
/// takes waiting requests from one peer (`MAX_PARKED_PER_PEER`), so its cap for node 1 fills.
struct CapFill {
    ids: Vec<Vec<ObjectId>>,
    getters: Vec<Getter>,
}

impl CapFill {
    const CLIENTS: usize = 3;

    /// Starts the gets and waits until the owner holds as many of node 1's waiting requests
    /// as it takes.
    fn start_full(nodes: &[Node], owner: &ferroplasma::client::Client) -> Self {
        let fill = Self::start(nodes, owner);
        let cap = ferroplasma::store::MAX_PARKED_PER_PEER as u64;
        eventually("the owner's per-peer cap to fill", || {
            owner.stats().expect("stats").gets_waiting >= cap
        });
        fill
    }

    fn start(nodes: &[Node], owner: &ferroplasma::client::Client) -> Self {
        let per_client = ferroplasma::store::MAX_PARKED_PER_PEER / Self::CLIENTS + 40;
        let ids: Vec<Vec<ObjectId>> = (0..Self::CLIENTS)
            .map(|_| (0..per_client).map(|_| owner.new_id()).collect())
            .collect();
        let getters = ids
            .iter()
            .cloned()
            .map(|mine| {
                let c = connect(&nodes[1]);
                std::thread::spawn(move || {
                    c.get(&mine, Duration::from_secs(60))
                        .map(|views| views.iter().map(|v| v.data().to_vec()).collect())
                })
            })
            .collect();
        Self { ids, getters }
    }

    /// Puts every object the getters wait for (object k holds k as 4 bytes).
    fn seal(&self, owner: &ferroplasma::client::Client) {
        for (k, id) in (0u32..).zip(self.ids.iter().flatten()) {
            owner.put_with(*id, &k.to_le_bytes(), b"").expect("put");
        }
    }

    /// Every get completes with the bytes `seal` put.
    fn check(self) {
        let mut k = 0u32;
        for g in self.getters {
            let got = g.join().expect("getter").expect("every get completes");
            for data in got {
                assert_eq!(data, k.to_le_bytes());
                k += 1;
            }
        }
    }
}

/// More gets waiting on unsealed objects of one owner than that owner takes waiting lookups
/// from one node (`MAX_PARKED_PER_PEER`), from several clients of the asking node: the
/// lookups over the cap are answered `Busy` and asked again later, so every get completes
/// once the objects are sealed (none fails with `RestoreFailed`).
#[test]
fn more_waiting_gets_than_the_peer_cap_all_complete_once_sealed() {
    let net = net_of("mem");
    let nodes = cluster(&net, 2, 64 << 20);
    let owner = connect(&nodes[0]);
    // Once the owner holds the cap, the lookups over it are being refused (a node that failed
    // them ended its get with `RestoreFailed` within milliseconds); nothing is sealed yet, so
    // no get may have ended.
    let fill = CapFill::start_full(&nodes, &owner);
    assert!(
        !fill.getters.iter().any(|g| g.is_finished()),
        "a get ended before anything was sealed"
    );
    fill.seal(&owner);
    fill.check();
}

/// Counts what a cluster's transports do for remote gets: grants issued (by serving nodes,
/// for pins) and reads started (by asking nodes). A get answered inline does neither.
#[derive(Clone, Default)]
struct Counts {
    grants: std::sync::Arc<std::sync::atomic::AtomicU64>,
    reads: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Counts {
    fn get(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.grants.load(Relaxed), self.reads.load(Relaxed))
    }
}

/// A transport that counts grants and reads and passes everything on.
struct Counting {
    inner: Box<dyn ferroplasma_transport::Transport>,
    counts: Counts,
}

impl ferroplasma_transport::Transport for Counting {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn local_addr(&self) -> String {
        self.inner.local_addr()
    }
    fn region(&self) -> ferroplasma_transport::RegionHandle {
        self.inner.region()
    }
    fn data_settings(&self) -> ferroplasma_transport::DataSettings {
        self.inner.data_settings()
    }
    fn max_control_msg(&self) -> usize {
        self.inner.max_control_msg()
    }
    fn connect(&mut self, addr: &str) -> ferroplasma_transport::PeerId {
        self.inner.connect(addr)
    }
    fn send(
        &mut self,
        peer: ferroplasma_transport::PeerId,
        body: Vec<u8>,
    ) -> Result<(), ferroplasma_transport::TransportError> {
        self.inner.send(peer, body)
    }
    unsafe fn read(
        &mut self,
        op: ferroplasma_transport::ReadOp,
    ) -> Result<(), ferroplasma_transport::TransportError> {
        self.counts
            .reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller's contract for this read is the inner transport's, unchanged.
        unsafe { self.inner.read(op) }
    }
    unsafe fn grant(
        &mut self,
        peer: ferroplasma_transport::PeerId,
        offset: u64,
        len: u64,
    ) -> Result<ferroplasma_transport::GrantDescriptor, ferroplasma_transport::TransportError> {
        self.counts
            .grants
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller's contract for this grant is the inner transport's, unchanged.
        unsafe { self.inner.grant(peer, offset, len) }
    }
    fn revoke(&mut self, grant: ferroplasma_transport::GrantId) {
        self.inner.revoke(grant);
    }
    fn disconnect(&mut self, peer: ferroplasma_transport::PeerId) {
        self.inner.disconnect(peer);
    }
    fn poll(
        &mut self,
        events: &mut Vec<ferroplasma_transport::Event>,
        timeout: Option<Duration>,
    ) -> Result<(), ferroplasma_transport::TransportError> {
        self.inner.poll(events, timeout)
    }
    fn waker(&self) -> ferroplasma_transport::Waker {
        self.inner.waker()
    }
    fn ready_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.inner.ready_fd()
    }
    fn has_work(&self) -> bool {
        self.inner.has_work()
    }
}

/// Cluster settings for node `i` whose transport is counted in `counts`; over mem, with the
/// control message cap `mem_cap` when given (a transport with small pre-posted receives).
fn counted_cfg(
    net: &Net,
    i: u8,
    head: Option<&str>,
    counts: &Counts,
    mem_cap: Option<usize>,
) -> ClusterConfig {
    let mut cc = cluster_cfg(net, i, head, TOKEN);
    let counts = counts.clone();
    let net = net.clone();
    cc.transport = TransportChoice::Custom(CustomTransport::new(move |mut t, listen, r| {
        let inner: Box<dyn ferroplasma_transport::Transport> = match &net {
            Net::Mem(n) => {
                t.max_control_msg = mem_cap;
                Box::new(MemTransport::new(n, Some(listen), t, r))
            }
            Net::Tcp => Box::new(ferroplasma_transport_tcp::TcpTransport::new(t, listen, r)?),
        };
        Ok(Box::new(Counting {
            inner,
            counts: counts.clone(),
        }))
    }));
    cc
}

/// Two nodes with counted transports (caps for mem: the head's, the member's).
fn counted_pair(net: &Net, counts: &Counts, caps: [Option<usize>; 2]) -> Vec<Node> {
    let head = Node::start(node_cfg(
        "head",
        64 << 20,
        counted_cfg(net, 0, None, counts, caps[0]),
    ))
    .expect("head starts");
    let addr = head.info().peer_addr.clone().expect("head listens");
    let member = Node::start(node_cfg(
        "member",
        64 << 20,
        counted_cfg(net, 1, Some(&addr), counts, caps[1]),
    ))
    .expect("member starts");
    let nodes = vec![head, member];
    for node in &nodes {
        wait_alive(&connect(node), 2);
    }
    nodes
}

/// Over tcp (80 KiB control messages) a remote get of an object of the inline threshold
/// (64 KiB, data and metadata) comes back in the lookup reply: no grant, no read.
#[test]
fn a_64k_object_over_tcp_comes_back_inline() {
    let counts = Counts::default();
    let nodes = counted_pair(&Net::Tcp, &counts, [None, None]);
    let (a, b) = (connect(&nodes[0]), connect(&nodes[1]));
    let total = usize::try_from(a.inline_threshold()).expect("small");
    assert_eq!(total, 64 << 10, "the default inline threshold");
    let id = a.new_id();
    a.put_with(id, &pattern(1, total - 100), &pattern(2, 100))
        .expect("put");
    let v = b.get(&[id], T).expect("remote get");
    assert!(v[0].data() == pattern(1, total - 100).as_slice());
    assert!(v[0].metadata() == pattern(2, 100).as_slice());
    assert_eq!(
        counts.get(),
        (0, 0),
        "(grants, reads): the object went as a read, not inline"
    );
}

/// With a 4 KiB control message cap on both ends (mem configured so, as an RDMA transport
/// with small pre-posted receives) the same 64 KiB get goes as a read, and succeeds.
#[test]
fn a_64k_object_over_a_small_cap_goes_as_a_read() {
    let counts = Counts::default();
    let cap = Some(ferroplasma_transport::MIN_CONTROL_MSG);
    let nodes = counted_pair(&Net::Mem(MemNetwork::new()), &counts, [cap, cap]);
    let (a, b) = (connect(&nodes[0]), connect(&nodes[1]));
    let total = 64 << 10;
    let id = a.new_id();
    a.put_with(id, &pattern(3, total - 100), &pattern(4, 100))
        .expect("put");
    let v = b.get(&[id], T).expect("remote get");
    assert!(v[0].data() == pattern(3, total - 100).as_slice());
    assert!(v[0].metadata() == pattern(4, 100).as_slice());
    let (grants, reads) = counts.get();
    assert!(
        grants >= 1 && reads >= 1,
        "not a read: {grants} grants, {reads} reads"
    );
}

/// Ends with different caps (the head 80 KiB, the member 4 KiB): each node inlines only what
/// the asker takes and what its own cap sends, so gets both ways succeed without dropping
/// the link; small objects still come inline.
#[test]
fn mixed_caps_inline_only_what_both_ends_take() {
    let counts = Counts::default();
    let small = Some(ferroplasma_transport::MIN_CONTROL_MSG);
    let nodes = counted_pair(&Net::Mem(MemNetwork::new()), &counts, [None, small]);
    let (a, b) = (connect(&nodes[0]), connect(&nodes[1]));
    let sizes = [100usize, 3000, 5000, 64 << 10];
    for (from, to) in [(&a, &b), (&b, &a)] {
        for (i, &n) in sizes.iter().enumerate() {
            let before = counts.get();
            let id = from.new_id();
            let seed = 10 + i as u64;
            from.put_with(id, &pattern(seed, n), &[]).expect("put");
            let v = to.get(&[id], T).expect("remote get");
            assert!(v[0].data() == pattern(seed, n).as_slice(), "{n} bytes");
            let inline = counts.get() == before;
            assert_eq!(inline, n <= 3000, "{n} bytes: inline {inline}");
        }
    }
}

/// A pull whose first lookup is answered `Busy` (the owner holds as many of this node's
/// waiting requests as it takes) asks again and completes: the sizes of an object the owner
/// has not described yet are unknown, not (0, 0), and re-asks after `Busy` spend no lookups.
#[test]
fn a_large_get_refused_busy_at_first_completes_once_sealed() {
    let net = net_of("mem");
    let nodes = cluster(&net, 2, 64 << 20);
    let owner = connect(&nodes[0]);
    // The owner's cap for node 1 is full: the big object's lookup is refused `Busy`.
    let fill = CapFill::start_full(&nodes, &owner);
    let big = owner.new_id();
    let asker = connect(&nodes[1]);
    let big_get = std::thread::spawn(move || {
        asker
            .get(&[big], Duration::from_secs(60))
            .map(|views| views[0].data().to_vec())
    });
    let local = connect(&nodes[1]);
    // Node 1 parks one get per request (the three getters' and the big one).
    eventually("the big get to park at node 1", || {
        local.stats().expect("stats").gets_waiting > CapFill::CLIENTS as u64
    });
    fill.seal(&owner);
    let bytes: Vec<u8> = (0..200 << 10).map(|i: u32| (i % 251) as u8).collect();
    owner.put_with(big, &bytes, b"").expect("put big");
    let got = big_get
        .join()
        .expect("big getter")
        .expect("the big get completes");
    assert!(got == bytes, "the big object's bytes");
    fill.check();
}

/// A wait whose probe the owner refuses `Busy` (its per-peer cap is full) probes again after
/// a backoff: it sees the object sealed once the owner takes the probe, not "not ready" at
/// its deadline.
#[test]
fn a_wait_refused_busy_sees_the_seal() {
    let net = net_of("mem");
    let nodes = cluster(&net, 2, 64 << 20);
    let owner = connect(&nodes[0]);
    let fill = CapFill::start_full(&nodes, &owner);
    let x = owner.new_id();
    let waiter = connect(&nodes[1]);
    let started = Instant::now();
    let wait = std::thread::spawn(move || waiter.wait(&[x], 1, Duration::from_secs(10)));
    let local = connect(&nodes[1]);
    eventually("the wait to park at node 1", || {
        local.stats().expect("stats").gets_waiting > CapFill::CLIENTS as u64
    });
    owner.put_with(x, b"x", b"").expect("put");
    fill.seal(&owner);
    let (ready, _) = wait.join().expect("waiter").expect("wait");
    assert_eq!(ready, vec![x], "sealed, seen after {:?}", started.elapsed());
    fill.check();
}
