//! Names and classes of verbs async events (`enum ibv_event_type`).

const NAMES: [&str; 20] = [
    "IBV_EVENT_CQ_ERR",
    "IBV_EVENT_QP_FATAL",
    "IBV_EVENT_QP_REQ_ERR",
    "IBV_EVENT_QP_ACCESS_ERR",
    "IBV_EVENT_COMM_EST",
    "IBV_EVENT_SQ_DRAINED",
    "IBV_EVENT_PATH_MIG",
    "IBV_EVENT_PATH_MIG_ERR",
    "IBV_EVENT_DEVICE_FATAL",
    "IBV_EVENT_PORT_ACTIVE",
    "IBV_EVENT_PORT_ERR",
    "IBV_EVENT_LID_CHANGE",
    "IBV_EVENT_PKEY_CHANGE",
    "IBV_EVENT_SM_CHANGE",
    "IBV_EVENT_SRQ_ERR",
    "IBV_EVENT_SRQ_LIMIT_REACHED",
    "IBV_EVENT_QP_LAST_WQE_REACHED",
    "IBV_EVENT_CLIENT_REREGISTER",
    "IBV_EVENT_GID_CHANGE",
    "IBV_EVENT_WQ_FATAL",
];

/// `IBV_EVENT_DEVICE_FATAL`: the device is gone.
pub const DEVICE_FATAL: u32 = 8;
/// `IBV_EVENT_PORT_ACTIVE`: the port came (back) up.
pub const PORT_ACTIVE: u32 = 9;
/// `IBV_EVENT_PORT_ERR`: the port went down.
pub const PORT_ERR: u32 = 10;

/// The event's name.
pub fn name(kind: u32) -> &'static str {
    usize::try_from(kind)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("unknown event")
}

/// A queue pair is broken (`QP_FATAL`, `QP_REQ_ERR`, `QP_ACCESS_ERR`).
pub fn qp_fatal(kind: u32) -> bool {
    matches!(kind, 1..=3)
}

/// The device or a port stopped (`CQ_ERR`, `DEVICE_FATAL`, `PORT_ERR`): every endpoint
/// falls back.
pub fn device_fatal(kind: u32) -> bool {
    matches!(kind, 0 | 8 | 10)
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_and_classes() {
        assert_eq!(super::name(8), "IBV_EVENT_DEVICE_FATAL");
        assert_eq!(super::name(99), "unknown event");
        assert!(super::qp_fatal(1) && !super::qp_fatal(4));
        assert!(super::device_fatal(10) && !super::device_fatal(9));
    }
}
