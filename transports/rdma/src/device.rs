//! The RDMA device a node uses: opened once at start, its port, GID and MTU chosen, and the
//! whole arena registered for remote reads (never remote writes).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferroplasma_region::Region;

use crate::proto::{RegionEntry, RemoteTable};
use crate::verbs::{self, CompChannel, Context, DeviceAttr, Mr, Pd, VerbsError};

/// `IBV_DEVICE_MEM_WINDOW_TYPE_2B` in `device_cap_flags`.
const MEM_WINDOW_TYPE_2B: u32 = 1 << 24;
/// `IBV_PORT_ACTIVE`.
const PORT_ACTIVE: u32 = 4;
/// Registrations of arenas at least this large run on several threads.
const PARALLEL_FROM: u64 = 1 << 30;
/// MRs of a hugepage arena are cut at multiples of this.
const HUGEPAGE: u64 = 2 << 20;

/// How to pick the device (`--rdma-device`, `--rdma-gid-index`, `--rdma-windows`).
#[derive(Clone, Debug)]
pub struct DeviceChoice {
    /// A device by name; `None`: the first with an active port.
    pub device: Option<String>,
    /// A GID index; `None`: the RoCE v2 GID whose address is the node's listen address, else
    /// the first RoCE v2 GID, else index 0.
    pub gid_index: Option<u32>,
    /// The address the node listens on (matched against GIDs).
    pub local_ip: Option<IpAddr>,
    /// Enforce grants with memory windows where the device has them (`--rdma-windows`).
    pub windows: bool,
}

impl Default for DeviceChoice {
    fn default() -> Self {
        Self {
            device: None,
            gid_index: None,
            local_ip: None,
            windows: true,
        }
    }
}

/// Why the device cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// No libibverbs, no device, no active port.
    #[error("no usable RDMA device: {0}")]
    Unavailable(String),
    /// The memlock limit is below the arena's size.
    #[error(
        "RLIMIT_MEMLOCK is {limit} bytes but the {need}-byte arena must be registered (pinned) \
         for RDMA: raise it (`ulimit -l unlimited`; systemd: LimitMEMLOCK=infinity; docker: \
         --ulimit memlock=-1) or run with CAP_IPC_LOCK"
    )]
    Memlock {
        /// The soft limit.
        limit: u64,
        /// The arena's length.
        need: u64,
    },
    /// A verbs call failed.
    #[error("{0}")]
    Verbs(#[from] VerbsError),
}

/// An opened device with the arena registered.
pub struct Device {
    pub(crate) ctx: Arc<Context>,
    pub(crate) pd: Arc<Pd>,
    pub(crate) channel: Arc<CompChannel>,
    pub(crate) attr: DeviceAttr,
    pub(crate) port: u8,
    pub(crate) gid: [u8; 16],
    pub(crate) gid_index: u8,
    pub(crate) gid_kind: String,
    /// The port's RoCE v2 GIDs (for a GID per connection), unless `--rdma-gid-index` fixed one.
    table: Vec<verbs::GidEntry>,
    pub(crate) mtu: u32,
    pub(crate) lid: u16,
    /// The arena's MRs in order; kept alive for the device's life.
    mrs: Vec<Mr>,
    /// Our arena as (local address, lkey) per MR.
    pub(crate) local: RemoteTable,
    /// What peers get: (remote address, rkey) per MR.
    pub(crate) regions: Vec<RegionEntry>,
    pub(crate) region_len: u64,
    pub(crate) registration: Duration,
    /// Grants are type-2 memory windows: the memory regions have no REMOTE_READ.
    pub(crate) windows: bool,
    // Dropped after the MRs (field order): keeps the registered mapping alive.
    region: Region,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("name", &self.ctx.name())
            .field("port", &self.port)
            .field("gid_index", &self.gid_index)
            .field("mtu", &self.mtu)
            .field("mrs", &self.mrs.len())
            .finish()
    }
}

/// The bytes of an IPv4 address as a RoCE v2 GID (IPv4-mapped IPv6).
fn gid_of(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Whether this process may pin `need` bytes: CAP_IPC_LOCK, or a memlock limit that large.
fn check_memlock(need: u64) -> Result<(), DeviceError> {
    let cap_ipc_lock = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 14) != 0);
    if cap_ipc_lock {
        return Ok(());
    }
    let limit = rustix::process::getrlimit(rustix::process::Resource::Memlock)
        .current
        .unwrap_or(u64::MAX);
    if limit < need {
        return Err(DeviceError::Memlock { limit, need });
    }
    Ok(())
}

impl Device {
    /// Opens the device, picks the port and GID, and registers `region` (the arena), cut into
    /// MRs no larger than the device's `max_mr_size` (multiples of 2 MiB when `hugepages`),
    /// registered on several threads when the arena is large.
    pub fn open(
        choice: &DeviceChoice,
        region: &Region,
        hugepages: bool,
    ) -> Result<Self, DeviceError> {
        verbs::load().map_err(|e| DeviceError::Unavailable(e.to_string()))?;
        let devices = verbs::devices().map_err(|e| DeviceError::Unavailable(e.to_string()))?;
        if devices.is_empty() {
            return Err(DeviceError::Unavailable("no RDMA devices".into()));
        }
        let names: Vec<&str> = match &choice.device {
            Some(d) => {
                if !devices.iter().any(|x| &x.name == d) {
                    return Err(DeviceError::Unavailable(format!(
                        "no device {d} (devices: {})",
                        devices
                            .iter()
                            .map(|x| x.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                vec![d.as_str()]
            }
            None => devices.iter().map(|x| x.name.as_str()).collect(),
        };
        let mut why = Vec::new();
        for name in names {
            match Self::open_one(name, choice, region, hugepages) {
                Ok(d) => return Ok(d),
                Err(e @ (DeviceError::Memlock { .. } | DeviceError::Verbs(_)))
                    if choice.device.is_some() =>
                {
                    return Err(e)
                }
                Err(e) => why.push(format!("{name}: {e}")),
            }
        }
        Err(DeviceError::Unavailable(why.join("; ")))
    }

    fn open_one(
        name: &str,
        choice: &DeviceChoice,
        region: &Region,
        hugepages: bool,
    ) -> Result<Self, DeviceError> {
        let ctx = Context::open(Some(name))?;
        let attr = ctx.query_device()?;
        let mut port = None;
        for p in 1..=u8::MAX {
            match ctx.query_port(p) {
                Ok(a) if a.state == PORT_ACTIVE => {
                    port = Some((p, a));
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let (port, pattr) =
            port.ok_or_else(|| DeviceError::Unavailable(format!("{name} has no active port")))?;
        let table = verbs::gid_table(name, port);
        let wanted = choice
            .local_ip
            .filter(|ip| !ip.is_unspecified())
            .map(gid_of);
        let pick = match choice.gid_index {
            Some(i) => table
                .iter()
                .find(|g| g.index == i)
                .cloned()
                .ok_or_else(|| {
                    DeviceError::Unavailable(format!("{name} port {port} has no GID {i}"))
                })?,
            None => table
                .iter()
                .filter(|g| g.is_roce_v2())
                .find(|g| Some(g.gid) == wanted)
                .or_else(|| verbs::preferred_roce_v2_gid(&table))
                .or_else(|| table.first())
                .cloned()
                .ok_or_else(|| {
                    DeviceError::Unavailable(format!("{name} port {port} has no GID"))
                })?,
        };
        let gid_index = u8::try_from(pick.index)
            .map_err(|_| DeviceError::Unavailable(format!("GID index {} too large", pick.index)))?;
        check_memlock(region.len())?;
        let pd = Pd::new(&ctx)?;
        let channel = CompChannel::new(&ctx)?;
        // Memory windows: the device says it has type 2B windows and one can be allocated.
        let windows = choice.windows
            && attr.device_cap_flags & MEM_WINDOW_TYPE_2B != 0
            && verbs::Mw::new(&pd).is_ok();
        let started = Instant::now();
        let mrs = register(&pd, region, attr.max_mr_size, hugepages, windows)?;
        let registration = started.elapsed();
        if mrs.len() > crate::proto::MAX_REGIONS {
            return Err(DeviceError::Unavailable(format!(
                "the arena needs {} memory regions on {name}, more than the {} an offer carries",
                mrs.len(),
                crate::proto::MAX_REGIONS
            )));
        }
        let mut at = 0u64;
        let mut local_entries = Vec::new();
        let mut regions = Vec::new();
        for mr in &mrs {
            local_entries.push(RegionEntry {
                addr: mr.addr(),
                len: mr.len(),
                rkey: mr.lkey(),
            });
            regions.push(RegionEntry {
                addr: mr.addr(),
                len: mr.len(),
                rkey: mr.rkey(),
            });
            at += mr.len();
        }
        let local = RemoteTable::from_entries(local_entries, at);
        tracing::info!(
            device = name,
            port,
            gid_index,
            gid = %fmt_gid(&pick.gid),
            gid_kind = %pick.kind,
            mtu = mtu_bytes(pattr.active_mtu),
            mrs = mrs.len(),
            bytes = at,
            registration_ms = registration.as_secs_f64() * 1e3,
            windows,
            "RDMA device ready, arena registered for remote reads"
        );
        Ok(Self {
            ctx,
            pd,
            channel,
            attr,
            port,
            gid: pick.gid,
            gid_index,
            gid_kind: pick.kind,
            table: if choice.gid_index.is_some() {
                Vec::new()
            } else {
                table.iter().filter(|g| g.is_roce_v2()).cloned().collect()
            },
            mtu: pattr.active_mtu,
            lid: pattr.lid,
            mrs,
            local,
            regions,
            region_len: at,
            registration,
            windows,
            region: region.clone(),
        })
    }
}

impl Device {
    /// The GID (and its index) for a connection whose local address is `ip`: the RoCE v2
    /// GID carrying that address, else the node's default.
    pub(crate) fn gid_for(&self, ip: Option<IpAddr>) -> ([u8; 16], u8) {
        let want = ip.map(gid_of);
        self.table
            .iter()
            .find(|g| Some(g.gid) == want)
            .and_then(|g| u8::try_from(g.index).ok().map(|i| (g.gid, i)))
            .unwrap_or((self.gid, self.gid_index))
    }

    /// Whether `region` is the one this device registered (same mapping, same length).
    pub fn registered(&self, region: &Region) -> bool {
        region.len() == self.region.len() && region.ptr_at(0, 0) == self.region.ptr_at(0, 0)
    }

    /// How many memory regions cover the arena.
    pub fn mr_count(&self) -> usize {
        self.mrs.len()
    }

    /// `[offset, offset + len)` of the arena cut at memory region boundaries: (region, the
    /// piece's virtual address, its length) in order; empty when the range lies outside or
    /// is empty.
    pub(crate) fn mr_pieces(&self, offset: u64, len: u64) -> Vec<(&Mr, u64, u64)> {
        let Some(end) = offset
            .checked_add(len)
            .filter(|&e| e <= self.region_len && len > 0)
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut at = 0u64;
        for mr in &self.mrs {
            let mr_end = at + mr.len();
            let (s, e) = (offset.max(at), end.min(mr_end));
            if s < e {
                out.push((mr, mr.addr() + (s - at), e - s));
            }
            at = mr_end;
        }
        out
    }
}

/// Registers the region as MRs of at most `max_mr` bytes (rounded down to 2 MiB on
/// hugepages), in parallel for large regions.
fn register(
    pd: &Arc<Pd>,
    region: &Region,
    max_mr: u64,
    hugepages: bool,
    windows: bool,
) -> Result<Vec<Mr>, DeviceError> {
    let len = region.len();
    let mut piece = max_mr.clamp(4096, 1 << 40);
    if hugepages {
        piece = (piece / HUGEPAGE).max(1) * HUGEPAGE;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if len >= PARALLEL_FROM && threads > 1 {
        // Several MRs so that several threads can pin at once.
        let per = len.div_ceil(threads as u64);
        let per = if hugepages {
            per.div_ceil(HUGEPAGE) * HUGEPAGE
        } else {
            per.div_ceil(4096) * 4096
        };
        piece = piece.min(per.max(HUGEPAGE));
    }
    let mut ranges = Vec::new();
    let mut off = 0u64;
    while off < len {
        let n = piece.min(len - off);
        ranges.push((off, n));
        off += n;
    }
    // Never REMOTE_WRITE. With memory windows not even REMOTE_READ: peers read only through
    // the windows bound for live grants.
    let access = verbs::ACCESS_LOCAL_WRITE
        | if windows {
            verbs::ACCESS_MW_BIND
        } else {
            verbs::ACCESS_REMOTE_READ
        };
    let one = |(off, n): (u64, u64)| -> Result<Mr, VerbsError> {
        let (ptr, n) = region
            .ptr_at(off, n)
            .ok_or_else(|| VerbsError::Unavailable {
                reason: "range outside the arena".into(),
            })?;
        // SAFETY: the region keeps its mapping alive while any clone of it lives, and the
        // `Device` holding these MRs holds a clone, dropped after them (field order).
        unsafe { Mr::register(pd, ptr, n, access) }
    };
    let results: Vec<Result<Mr, VerbsError>> = if ranges.len() > 1 && len >= PARALLEL_FROM {
        std::thread::scope(|s| {
            let handles: Vec<_> = ranges.iter().map(|&r| s.spawn(move || one(r))).collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(VerbsError::Unavailable {
                            reason: "registration thread panicked".into(),
                        })
                    })
                })
                .collect()
        })
    } else {
        ranges.into_iter().map(one).collect()
    };
    results
        .into_iter()
        .map(|r| r.map_err(DeviceError::from))
        .collect()
}

/// `enum ibv_mtu` in bytes.
pub fn mtu_bytes(mtu: u32) -> u32 {
    match mtu {
        1..=5 => 128 << mtu,
        _ => 0,
    }
}

/// A GID as IPv6 text.
pub fn fmt_gid(g: &[u8; 16]) -> String {
    std::net::Ipv6Addr::from(*g).to_string()
}
