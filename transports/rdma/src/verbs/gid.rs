//! The GID table as the kernel lists it in sysfs.

use super::*;

/// One GID table entry as the kernel lists it in sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GidEntry {
    pub index: u32,
    pub gid: [u8; 16],
    /// The kernel's type text: `"RoCE v2"`, `"IB/RoCE v1"`, ...
    pub kind: String,
    /// The net device of a RoCE GID.
    pub netdev: Option<String>,
}

impl GidEntry {
    pub fn is_roce_v2(&self) -> bool {
        self.kind == "RoCE v2"
    }

    /// An IPv4-mapped GID (`::ffff:a.b.c.d`), i.e. the GID of an IPv4 address.
    pub fn is_ipv4_mapped(&self) -> bool {
        self.gid[..10] == [0; 10] && self.gid[10..12] == [0xff, 0xff]
    }
}

/// The GID to use for RoCE v2 connections from a [`gid_table`]: an IPv4-mapped RoCE v2
/// entry if there is one (routable; the IPv6 link-local one is not on every netdev), else
/// the first RoCE v2 entry. `None`: no RoCE v2 entry (e.g. InfiniBand; use index 0).
pub fn preferred_roce_v2_gid(table: &[GidEntry]) -> Option<&GidEntry> {
    table
        .iter()
        .find(|g| g.is_roce_v2() && g.is_ipv4_mapped())
        .or_else(|| table.iter().find(|g| g.is_roce_v2()))
}

/// Parses a sysfs GID (`fe80:0000:0000:0000:0000:0000:0000:0001`, eight 16-bit hex groups).
pub fn parse_gid(text: &str) -> Option<[u8; 16]> {
    let mut out = [0u8; 16];
    let mut groups = text.trim().split(':');
    for pair in out.chunks_exact_mut(2) {
        let g = groups.next()?;
        if g.is_empty() || g.len() > 4 {
            return None;
        }
        let v = u16::from_str_radix(g, 16).ok()?;
        pair.copy_from_slice(&v.to_be_bytes());
    }
    groups.next().is_none().then_some(out)
}

/// The GIDs of `dev`'s `port`, from `/sys/class/infiniband/<dev>/ports/<port>/`: entries
/// whose gid or type cannot be read, or whose gid is all zero, are skipped. Sorted by index.
pub fn gid_table(dev: &str, port: u8) -> Vec<GidEntry> {
    gid_table_at(
        &Path::new("/sys/class/infiniband")
            .join(dev)
            .join("ports")
            .join(port.to_string()),
    )
}

fn gid_table_at(port_dir: &Path) -> Vec<GidEntry> {
    let Ok(dir) = std::fs::read_dir(port_dir.join("gids")) else {
        return Vec::new();
    };
    let mut out: Vec<GidEntry> = dir
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            let index: u32 = name.to_str()?.parse().ok()?;
            let gid = parse_gid(&std::fs::read_to_string(e_path(port_dir, "gids", &name)).ok()?)?;
            if gid == [0; 16] {
                return None;
            }
            let kind = std::fs::read_to_string(e_path(port_dir, "gid_attrs/types", &name)).ok()?;
            let netdev = std::fs::read_to_string(e_path(port_dir, "gid_attrs/ndevs", &name))
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty());
            Some(GidEntry {
                index,
                gid,
                kind: kind.trim().to_owned(),
                netdev,
            })
        })
        .collect();
    out.sort_by_key(|g| g.index);
    out
}

fn e_path(port_dir: &Path, sub: &str, name: &std::ffi::OsStr) -> std::path::PathBuf {
    port_dir.join(sub).join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gid_text_parses() {
        let g = parse_gid("fe80:0000:0000:0000:0000:5efe:a9fe:4d01\n").unwrap();
        assert_eq!(g[..2], [0xfe, 0x80]);
        assert_eq!(g[12..], [0xa9, 0xfe, 0x4d, 0x01]);
        assert_eq!(
            parse_gid("0000:0000:0000:0000:0000:ffff:a9fe:4d01").unwrap()[10..12],
            [0xff; 2]
        );
        assert!(parse_gid("fe80::1").is_none());
        assert!(parse_gid("fe80:0:0:0:0:0:0:1:2").is_none());
        assert!(parse_gid("fe80:0:0:0:0:0:0:xyz").is_none());
        assert!(parse_gid("fe80:0:0:0:0:0:0:12345").is_none());
    }

    #[test]
    fn gid_table_reads_a_sysfs_like_tree() {
        let root = std::env::temp_dir().join(format!("fp-rdma-gids-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for d in ["gids", "gid_attrs/types", "gid_attrs/ndevs"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let w = |p: &str, s: &str| std::fs::write(root.join(p), s).unwrap();
        w("gids/0", "fe80:0000:0000:0000:0000:0000:0000:0001\n");
        w("gid_attrs/types/0", "IB/RoCE v1\n");
        w("gid_attrs/ndevs/0", "rdmanet0\n");
        w("gids/1", "0000:0000:0000:0000:0000:ffff:a9fe:4d01\n");
        w("gid_attrs/types/1", "RoCE v2\n");
        w("gid_attrs/ndevs/1", "rdmanet0\n");
        w("gids/2", "0000:0000:0000:0000:0000:0000:0000:0000\n");
        w("gid_attrs/types/2", "RoCE v2\n");
        // Index 10 has a gid but no readable type: skipped.
        w("gids/10", "fe80:0000:0000:0000:0000:0000:0000:0002\n");
        let t = gid_table_at(&root);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(t.len(), 2, "{t:?}");
        assert_eq!(t[0].index, 0);
        assert_eq!(t[0].kind, "IB/RoCE v1");
        assert_eq!(t[1].index, 1);
        assert!(t[1].is_roce_v2());
        assert_eq!(t[1].netdev.as_deref(), Some("rdmanet0"));
        assert_eq!(t[1].gid[12..], [169, 254, 77, 1]);
        assert!(t[1].is_ipv4_mapped() && !t[0].is_ipv4_mapped());
        assert_eq!(preferred_roce_v2_gid(&t).map(|g| g.index), Some(1));
        assert_eq!(preferred_roce_v2_gid(&t[..1]), None);
    }
}
