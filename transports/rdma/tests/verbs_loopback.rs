//! The verbs layer against a real RDMA device: two RC QPs on one port connected to each
//! other, RDMA READs, an rkey error with the flush that follows, and a SEND/RECV round trip.
//!
//! Needs an RDMA device (soft-RoCE is enough: run the built test binary inside
//! `/work/shared/rdma/softroce-vm.sh`). The device is `$SOFTROCE_DEV` when set, otherwise
//! the first one. Without a device (or without libibverbs, or on a kernel without RDMA)
//! the device tests print `SKIPPED: no RDMA device` and pass; the host test checks that
//! this case is an `Unavailable` error, not a panic.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferroplasma_transport_rdma::verbs::{
    self, CompChannel, Context, Cq, Mr, Mw, Pd, Qp, QpCaps, RtrParams, VerbsError, Wc,
};

const PORT: u8 = 1;
const CQ_ID: u64 = 0x00c0_ffee;
const DEADLINE: Duration = Duration::from_secs(20);

fn open_or_skip(test: &str) -> Option<Arc<Context>> {
    let want = std::env::var("SOFTROCE_DEV").ok();
    match Context::open(want.as_deref()) {
        Ok(ctx) => Some(ctx),
        Err(VerbsError::Unavailable { reason }) => {
            println!("SKIPPED: no RDMA device ({test}: {reason})");
            None
        }
        Err(e) => panic!("opening the RDMA device failed: {e}"),
    }
}

#[test]
fn without_rdma_the_entry_points_report_unavailable() {
    match verbs::load() {
        Ok(()) => println!("libibverbs loaded"),
        Err(VerbsError::Unavailable { reason }) => println!("libibverbs not loaded: {reason}"),
        Err(e) => panic!("load() must succeed or say Unavailable, got {e:?}"),
    }
    match verbs::devices() {
        Ok(devs) => {
            assert!(!devs.is_empty(), "Ok(devices) must not be empty");
            for d in &devs {
                assert!(!d.name.is_empty());
                println!("device {} guid {:016x}", d.name, d.guid);
            }
            match Context::open(Some("no-such-rdma-device")) {
                Err(VerbsError::NoSuchDevice { name, present }) => {
                    assert_eq!(name, "no-such-rdma-device");
                    assert_eq!(present.len(), devs.len());
                }
                other => panic!("expected NoSuchDevice, got {other:?}"),
            }
        }
        Err(e @ VerbsError::Unavailable { .. }) => {
            println!("devices(): {e}");
            assert!(e.to_string().starts_with("RDMA unavailable: "), "{e}");
            let open = Context::open(None);
            assert!(
                matches!(open, Err(VerbsError::Unavailable { .. })),
                "open without a device must be Unavailable: {open:?}"
            );
        }
        Err(e) => panic!("devices() must succeed or say Unavailable, got {e:?}"),
    }
}

/// Issue 9: the build must not need rdma-core, so nothing may link libibverbs.
#[test]
fn the_test_binary_does_not_link_libibverbs() {
    let exe = std::env::current_exe().expect("current_exe");
    let out = match std::process::Command::new("readelf")
        .arg("-d")
        .arg(&exe)
        .output()
    {
        Ok(out) if out.status.success() => out,
        other => {
            println!("SKIPPED: no readelf ({other:?})");
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("(NEEDED)"),
        "readelf shows no NEEDED entries:\n{text}"
    );
    assert!(
        !text.contains("libibverbs"),
        "the binary links libibverbs:\n{text}"
    );
}

/// Waits until `cq` has produced `want` completions, sleeping in poll(2) on the channel fd
/// between checks (armed with `req_notify` first, then polled once more to close the race).
fn wait_completions(cq: &Cq, ch: &CompChannel, want: usize, deadline: Instant) -> Vec<Wc> {
    let mut got = Vec::new();
    loop {
        let room = want - got.len();
        cq.poll(&mut got, room).expect("poll_cq");
        if got.len() >= want {
            return got;
        }
        cq.req_notify().expect("req_notify_cq");
        let room = want - got.len();
        cq.poll(&mut got, room).expect("poll_cq");
        if got.len() >= want {
            return got;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "deadline passed with {} of {want} completions: {got:?}",
            got.len()
        );
        let mut pfd = libc::pollfd {
            fd: ch.fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis())
            .unwrap_or(libc::c_int::MAX)
            .max(1);
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        assert!(n >= 0, "poll(2): {}", std::io::Error::last_os_error());
        while let Some(id) = ch.next_event().expect("get_cq_event") {
            assert_eq!(id, CQ_ID, "the event names the CQ by its id");
        }
    }
}

struct Buf {
    mem: Vec<u8>,
}

impl Buf {
    fn new(len: usize, fill: impl Fn(usize) -> u8) -> Self {
        Buf {
            mem: (0..len).map(fill).collect(),
        }
    }
    /// # Safety
    /// The returned Mr must be dropped before `self`.
    unsafe fn register(&mut self, pd: &Arc<Pd>, access: u32) -> Mr {
        // SAFETY: the Vec's heap block stays put (never resized) and outlives the Mr
        // (caller's contract).
        unsafe { Mr::register(pd, self.mem.as_mut_ptr(), self.mem.len(), access) }
            .expect("ibv_reg_mr")
    }
}

struct Pair {
    a: Qp,
    b: Qp,
}

fn connect(pd: &Arc<Pd>, cq: &Arc<Cq>, ctx: &Context, access: u32) -> Pair {
    let port = ctx.query_port(PORT).expect("query_port");
    assert_eq!(
        port.state,
        verbs::PORT_ACTIVE,
        "port {PORT} is not ACTIVE: {port:?}"
    );
    let table = verbs::gid_table(ctx.name(), PORT);
    let (gid_index, gid) = match verbs::preferred_roce_v2_gid(&table) {
        Some(g) => {
            let q = ctx.query_gid(PORT, g.index).expect("query_gid");
            assert_eq!(
                q, g.gid,
                "ibv_query_gid and sysfs disagree on gid {}",
                g.index
            );
            (g.index, g.gid)
        }
        None => (0, ctx.query_gid(PORT, 0).expect("query_gid")),
    };
    let dev = ctx.query_device().expect("query_device");
    let rd = u8::try_from(dev.max_qp_rd_atom.clamp(1, 16)).unwrap();
    let caps = QpCaps {
        max_send_wr: 32,
        max_recv_wr: 8,
        max_send_sge: 1,
        max_recv_sge: 1,
        max_inline_data: 0,
    };
    let a = Qp::new_rc(pd, cq, cq, caps).expect("create_qp a");
    let b = Qp::new_rc(pd, cq, cq, caps).expect("create_qp b");
    // Each side's receive PSN is the other side's send PSN.
    const A_PSN: u32 = 0x1234;
    const B_PSN: u32 = 0xab_cdef;
    for (me, peer, peer_psn) in [(&a, &b, B_PSN), (&b, &a, A_PSN)] {
        me.to_init(PORT, access).expect("INIT");
        me.to_rtr(&RtrParams {
            port: PORT,
            mtu: port.active_mtu,
            dest_qpn: peer.qp_num(),
            rq_psn: peer_psn,
            dgid: gid,
            sgid_index: u8::try_from(gid_index).unwrap(),
            max_dest_rd_atomic: rd,
            dlid: port.lid,
        })
        .expect("RTR");
    }
    a.to_rts(A_PSN, rd).expect("RTS a");
    b.to_rts(B_PSN, rd).expect("RTS b");
    println!(
        "connected qp {} <-> qp {} on {} port {PORT}: gid index {gid_index}, mtu {} bytes, rd_atomic {rd}",
        a.qp_num(),
        b.qp_num(),
        ctx.name(),
        verbs::mtu_bytes(port.active_mtu).unwrap_or(0),
    );
    Pair { a, b }
}

#[test]
fn rc_loopback_read_error_flush_and_send_recv() {
    let t0 = Instant::now();
    let Some(ctx) = open_or_skip("rc_loopback") else {
        return;
    };
    let dev = ctx.query_device().expect("query_device");
    println!("device {} {dev:?}", ctx.name());
    for g in verbs::gid_table(ctx.name(), PORT) {
        println!("gid {} {} {:?} {:02x?}", g.index, g.kind, g.netdev, g.gid);
    }
    let pd = Pd::new(&ctx).expect("alloc_pd");
    let ch = CompChannel::new(&ctx).expect("create_comp_channel");
    let cq = Cq::new(&ctx, 128, Some(&ch), CQ_ID).expect("create_cq");
    assert_eq!(cq.id(), CQ_ID);

    const CHUNK: usize = 64 * 1024;
    const CHUNK_U32: u32 = 64 * 1024;
    const CHUNKS: usize = 8;
    const LEN: usize = CHUNK * CHUNKS;
    // Buffers first: locals drop in reverse order, so every Mr goes before its buffer.
    let mut remote = Buf::new(LEN, |i| (i.wrapping_mul(31) ^ (i >> 9)).to_le_bytes()[0]);
    let mut local = Buf::new(LEN, |_| 0);
    let mut msg = Buf::new(64, |i| {
        b"ferroplasma send/recv over rxe "
            .get(i)
            .copied()
            .unwrap_or(b'.')
    });
    let mut inbox = Buf::new(256, |_| 0);
    // SAFETY: each Mr is declared after its buffer, so it is dropped first.
    let remote_mr =
        unsafe { remote.register(&pd, verbs::ACCESS_REMOTE_READ | verbs::ACCESS_LOCAL_WRITE) };
    // SAFETY: as above.
    let local_mr = unsafe { local.register(&pd, verbs::ACCESS_LOCAL_WRITE) };
    // SAFETY: as above.
    let msg_mr = unsafe { msg.register(&pd, 0) };
    // SAFETY: as above.
    let inbox_mr = unsafe { inbox.register(&pd, verbs::ACCESS_LOCAL_WRITE) };
    println!("{remote_mr:?} {local_mr:?}");
    assert_eq!(remote_mr.len(), LEN as u64);

    let t_connect = Instant::now();
    let p = connect(
        &pd,
        &cq,
        &ctx,
        verbs::ACCESS_LOCAL_WRITE | verbs::ACCESS_REMOTE_READ,
    );
    println!(
        "setup {:?} (connect {:?})",
        t0.elapsed(),
        t_connect.elapsed()
    );

    // 1. RDMA READs: a reads b's registered `remote` into `local`, only the last signaled.
    let t_read = Instant::now();
    for i in 0..CHUNKS {
        let off = (i * CHUNK) as u64;
        // SAFETY: local[off..off+CHUNK] is in local_mr and untouched until the completion
        // below (the last, signaled READ completes after all earlier ones on an RC QP).
        unsafe {
            p.a.post_read(
                i as u64,
                local_mr.addr() + off,
                CHUNK_U32,
                local_mr.lkey(),
                remote_mr.addr() + off,
                remote_mr.rkey(),
                i == CHUNKS - 1,
            )
        }
        .expect("post_read");
    }
    let wcs = wait_completions(&cq, &ch, 1, Instant::now() + DEADLINE);
    let read_time = t_read.elapsed();
    assert_eq!(wcs.len(), 1, "only the signaled READ completes: {wcs:?}");
    let wc = wcs[0];
    assert_eq!(
        wc.status,
        verbs::WC_SUCCESS,
        "{}: {wc:?}",
        verbs::wc_status_str(wc.status)
    );
    assert_eq!(wc.wr_id, (CHUNKS - 1) as u64);
    assert_eq!(wc.opcode, verbs::WC_RDMA_READ);
    assert_eq!(wc.byte_len, CHUNK_U32);
    assert_eq!(wc.qp_num, p.a.qp_num());
    if let Some(i) = (0..LEN).find(|&i| local.mem[i] != remote.mem[i]) {
        panic!(
            "byte {i} differs after the READs: {} != {}",
            local.mem[i], remote.mem[i]
        );
    }
    println!(
        "{CHUNKS} READs of {} KiB: {read_time:?} ({:.1} MB/s), all {LEN} bytes verified",
        CHUNK / 1024,
        LEN as f64 / read_time.as_secs_f64() / 1e6
    );

    // 2. SEND/RECV: b posts a receive, a sends `msg`.
    let t_send = Instant::now();
    // SAFETY: inbox is in inbox_mr and untouched until the RECV completion.
    unsafe { p.b.post_recv(77, inbox_mr.addr(), 256, inbox_mr.lkey()) }.expect("post_recv");
    // SAFETY: msg is in msg_mr and not written until the SEND completes.
    unsafe { p.a.post_send(78, msg_mr.addr(), 64, msg_mr.lkey(), true) }.expect("post_send");
    let mut wcs = wait_completions(&cq, &ch, 2, Instant::now() + DEADLINE);
    let send_time = t_send.elapsed();
    wcs.sort_by_key(|w| w.wr_id);
    assert!(wcs.iter().all(|w| w.status == verbs::WC_SUCCESS), "{wcs:?}");
    assert_eq!(
        (wcs[0].wr_id, wcs[0].opcode, wcs[0].qp_num),
        (77, verbs::WC_RECV, p.b.qp_num())
    );
    assert_eq!(wcs[0].byte_len, 64);
    assert_eq!(
        (wcs[1].wr_id, wcs[1].opcode, wcs[1].qp_num),
        (78, verbs::WC_SEND, p.a.qp_num())
    );
    assert_eq!(inbox.mem[..64], msg.mem[..]);
    assert!(inbox.mem[64..].iter().all(|&b| b == 0));
    println!("SEND/RECV of 64 bytes: {send_time:?}");

    // 3. A READ with a wrong rkey fails with REM_ACCESS_ERR; the READs behind it flush.
    let t_err = Instant::now();
    let bad_rkey = remote_mr.rkey() ^ 0x00ff_ff00;
    let posts: [(u64, u32); 3] = [
        (100, bad_rkey),
        (101, remote_mr.rkey()),
        (102, remote_mr.rkey()),
    ];
    for (wr_id, rkey) in posts {
        // SAFETY: local is in local_mr; we read it again only after every completion.
        unsafe {
            p.a.post_read(
                wr_id,
                local_mr.addr(),
                4096,
                local_mr.lkey(),
                remote_mr.addr(),
                rkey,
                true,
            )
        }
        .expect("post_read");
    }
    let mut wcs = wait_completions(&cq, &ch, 3, Instant::now() + DEADLINE);
    wcs.sort_by_key(|w| w.wr_id);
    let statuses: Vec<&str> = wcs.iter().map(|w| verbs::wc_status_str(w.status)).collect();
    println!("wrong rkey: {statuses:?} in {:?}", t_err.elapsed());
    assert_eq!(wcs[0].wr_id, 100);
    assert_eq!(wcs[0].status, verbs::WC_REM_ACCESS_ERR, "{statuses:?}");
    for w in &wcs[1..] {
        assert_eq!(w.status, verbs::WC_WR_FLUSH_ERR, "{statuses:?}");
    }
    // The QP is in ERR now: a further WR flushes too; to_err on an ERR QP is allowed.
    p.a.to_err().expect("to_err");
    // SAFETY: as above.
    unsafe {
        p.a.post_read(
            103,
            local_mr.addr(),
            64,
            local_mr.lkey(),
            remote_mr.addr(),
            bad_rkey,
            true,
        )
    }
    .expect("post_read on an ERR QP");
    let wcs = wait_completions(&cq, &ch, 1, Instant::now() + DEADLINE);
    assert_eq!(
        (wcs[0].wr_id, wcs[0].status),
        (103, verbs::WC_WR_FLUSH_ERR),
        "{wcs:?}"
    );
    while let Some(ev) = ctx.next_async_event().expect("get_async_event") {
        println!("async event {ev:?}");
    }
    drop(p);
    println!("total {:?}", t0.elapsed());
}

#[test]
fn type2_memory_window_bind_read_invalidate() {
    let t0 = Instant::now();
    let Some(ctx) = open_or_skip("memory_window") else {
        return;
    };
    let pd = Pd::new(&ctx).expect("alloc_pd");
    let ch = CompChannel::new(&ctx).expect("create_comp_channel");
    let cq = Cq::new(&ctx, 64, Some(&ch), CQ_ID).expect("create_cq");
    let mut mw = match Mw::new(&pd) {
        Ok(mw) => mw,
        Err(
            e @ VerbsError::Call {
                errno: libc::EOPNOTSUPP,
                ..
            },
        ) => {
            println!("SKIPPED: no memory windows on {} ({e})", ctx.name());
            return;
        }
        Err(e) => panic!("alloc_mw: {e}"),
    };
    const LEN: usize = 64 * 1024;
    const WIN_OFF: u64 = 4096;
    const WIN_LEN: u32 = 8192;
    let mut remote = Buf::new(LEN, |i| (i.wrapping_mul(7) ^ (i >> 8)).to_le_bytes()[0]);
    let mut local = Buf::new(LEN, |_| 0);
    // SAFETY: each Mr is declared after its buffer, so it is dropped first.
    let remote_mr = unsafe {
        remote.register(
            &pd,
            verbs::ACCESS_LOCAL_WRITE | verbs::ACCESS_REMOTE_READ | verbs::ACCESS_MW_BIND,
        )
    };
    // SAFETY: as above.
    let local_mr = unsafe { local.register(&pd, verbs::ACCESS_LOCAL_WRITE) };
    let access = verbs::ACCESS_LOCAL_WRITE | verbs::ACCESS_REMOTE_READ | verbs::ACCESS_MW_BIND;
    let p = connect(&pd, &cq, &ctx, access);
    let first = mw.rkey();

    // b (the memory's owner) binds the window to 8 KiB inside its MR.
    let t_bind = Instant::now();
    let rkey =
        p.b.post_bind_mw(
            1,
            &mut mw,
            &remote_mr,
            remote_mr.addr() + WIN_OFF,
            u64::from(WIN_LEN),
            verbs::ACCESS_REMOTE_READ,
            true,
        )
        .expect("post_bind_mw");
    assert_eq!(mw.rkey(), rkey);
    assert_ne!(rkey, first, "a bind hands out a new rkey");
    assert_eq!(rkey >> 8, first >> 8, "same window index, new 8-bit key");
    let wc = wait_completions(&cq, &ch, 1, Instant::now() + DEADLINE)[0];
    assert_eq!(
        (wc.wr_id, wc.status, wc.opcode),
        (1, verbs::WC_SUCCESS, verbs::WC_BIND_MW),
        "{}: {wc:?}",
        verbs::wc_status_str(wc.status)
    );
    println!(
        "bind {:?}: mw rkey {first:#x} -> {rkey:#x} (MR rkey {:#x})",
        t_bind.elapsed(),
        remote_mr.rkey()
    );

    // a reads the window through the MW rkey.
    // SAFETY: local is in local_mr and untouched until the completion.
    unsafe {
        p.a.post_read(
            2,
            local_mr.addr(),
            WIN_LEN,
            local_mr.lkey(),
            remote_mr.addr() + WIN_OFF,
            rkey,
            true,
        )
    }
    .expect("post_read");
    let wc = wait_completions(&cq, &ch, 1, Instant::now() + DEADLINE)[0];
    assert_eq!(
        (wc.wr_id, wc.status),
        (2, verbs::WC_SUCCESS),
        "{}: {wc:?}",
        verbs::wc_status_str(wc.status)
    );
    let off = usize::try_from(WIN_OFF).unwrap();
    let n = usize::try_from(WIN_LEN).unwrap();
    assert_eq!(
        local.mem[..n],
        remote.mem[off..off + n],
        "READ through the window"
    );

    // b invalidates the window; a READ with its rkey now fails.
    p.b.post_local_inv(3, rkey, true).expect("post_local_inv");
    let wc = wait_completions(&cq, &ch, 1, Instant::now() + DEADLINE)[0];
    assert_eq!(
        (wc.wr_id, wc.status, wc.opcode),
        (3, verbs::WC_SUCCESS, verbs::WC_LOCAL_INV),
        "{}: {wc:?}",
        verbs::wc_status_str(wc.status)
    );
    // SAFETY: as above.
    unsafe {
        p.a.post_read(
            4,
            local_mr.addr(),
            WIN_LEN,
            local_mr.lkey(),
            remote_mr.addr() + WIN_OFF,
            rkey,
            true,
        )
    }
    .expect("post_read");
    let wc = wait_completions(&cq, &ch, 1, Instant::now() + DEADLINE)[0];
    assert_eq!(
        (wc.wr_id, wc.status),
        (4, verbs::WC_REM_ACCESS_ERR),
        "{}: {wc:?}",
        verbs::wc_status_str(wc.status)
    );
    println!(
        "memory window: bind, READ through it, invalidate, READ refused; total {:?}",
        t0.elapsed()
    );
    drop(p);
}
