//! Defaults shared by the daemon, the client and the CLI.

use std::path::PathBuf;

/// Environment variable that overrides the default socket path.
pub const SOCKET_ENV: &str = "FERROPLASMA_SOCKET";

/// The per-user runtime directory: `$XDG_RUNTIME_DIR/ferroplasma`, else `/run/ferroplasma`
/// for root, else `/tmp/ferroplasma-$UID`.
pub fn runtime_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("ferroplasma");
    }
    let uid = rustix::process::getuid().as_raw();
    if uid == 0 {
        PathBuf::from("/run/ferroplasma")
    } else {
        PathBuf::from(format!("/tmp/ferroplasma-{uid}"))
    }
}

/// The default spill directory of the node listening on `socket`:
/// `/var/tmp/ferroplasma-$UID/<socket file name>.spill`. Not the runtime directory: that is
/// usually tmpfs, and spilling into RAM would free nothing. `/var/tmp` is world-writable and
/// the name predictable, so the node makes these directories 0700 and refuses ones it does
/// not own alone (`spill::dir::lock_dir`).
pub fn default_spill_dir(socket: &std::path::Path) -> PathBuf {
    let uid = rustix::process::getuid().as_raw();
    let name = socket
        .file_name()
        .map_or_else(|| "node.sock".into(), |n| n.to_string_lossy().into_owned());
    PathBuf::from(format!("/var/tmp/ferroplasma-{uid}")).join(format!("{name}.spill"))
}

/// The default node socket: `$FERROPLASMA_SOCKET`, else `<runtime dir>/node.sock`.
pub fn default_socket_path() -> PathBuf {
    match std::env::var_os(SOCKET_ENV).filter(|x| !x.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => runtime_dir().join("node.sock"),
    }
}
