//! The process's open-file limit. Every connection is a file descriptor, and so are the
//! store's files and the directory listing each group commit reads: a server whose
//! connections took every descriptor could not commit (the store would fail). So `serve`
//! raises the soft limit to the hard one, keeps `FILES_RESERVED` for everything but
//! connections, and fits the connection caps under the rest.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

use crate::config::Limits;

/// Descriptors kept for everything but connections: the store's files and its blob
/// directory listing, the commits file, backups, PostgreSQL sessions, TLS files.
pub const FILES_RESERVED: u64 = 256;

/// What the soft limit is raised to when the hard limit cannot be taken (macOS's
/// `OPEN_MAX`).
const PLATFORM_CAP: u64 = 10_240;

/// The fewest gRPC connections worth serving: below them, `serve` refuses to start.
const CONNECTIONS_MIN: u64 = 64;

/// Raises the soft limit on open files to the hard one (as far as allowed); returns the
/// soft limit now (`None`: unlimited).
pub fn raise_to_hard_limit() -> Option<u64> {
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let to = |current| Rlimit {
            current,
            maximum: limit.maximum,
        };
        // Refused where the platform caps it below an unlimited hard limit (macOS:
        // OPEN_MAX): then as many as that cap usually allows.
        if setrlimit(Resource::Nofile, to(limit.maximum)).is_err() {
            let _ = setrlimit(Resource::Nofile, to(Some(PLATFORM_CAP)));
        }
    }
    getrlimit(Resource::Nofile).current
}

/// Fits `connections_max` (and the per-peer cap, kept the same share of it) under
/// `open_files` descriptors,
/// with `FILES_RESERVED` and the metrics port's (if `metrics` is served) kept: returns
/// a warning when it lowered it, an error when too few are left to serve.
pub fn fit_connections(
    limits: &mut Limits,
    open_files: Option<u64>,
    metrics: bool,
) -> Result<Option<String>, String> {
    let Some(open_files) = open_files else {
        return Ok(None);
    };
    let metrics_connections = if metrics {
        limits.metrics_connections_max
    } else {
        0
    };
    let kept = FILES_RESERVED + metrics_connections as u64;
    let room = open_files.saturating_sub(kept);
    if room < CONNECTIONS_MIN {
        return Err(format!(
            "the open-file limit ({open_files}) leaves {room} connections after the {kept} \
             descriptors kept for the store and the metrics port; raise it (ulimit -n, \
             systemd LimitNOFILE) to at least {}",
            kept + CONNECTIONS_MIN
        ));
    }
    let wanted = limits.connections_max as u64;
    if wanted <= room {
        return Ok(None);
    }
    limits.connections_max = room as usize;
    // One peer keeps the share of the places it had (0 stays off), so one host still
    // cannot take every connection.
    let per_peer = limits.connections_per_peer_max as u64;
    // In u128: a per-peer cap set near u64::MAX (meaning "no cap") must not wrap.
    let scaled = u128::from(per_peer) * u128::from(room) / u128::from(wanted);
    let shared = (scaled as u64).max(1).min(per_peer) as usize;
    limits.connections_per_peer_max = shared;
    Ok(Some(format!(
        "connections_max lowered from {wanted} to {room} (connections_per_peer_max from \
         {per_peer} to {shared}) to fit the open-file limit ({open_files}, {kept} kept for \
         the store and the metrics port); raise the limit (ulimit -n, systemd \
         LimitNOFILE) to at least {} to keep them",
        wanted + kept
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_fit_under_the_open_file_limit_or_the_server_refuses_to_start() {
        let mut limits = Limits::default();
        assert_eq!(fit_connections(&mut limits, None, true), Ok(None));
        assert_eq!(fit_connections(&mut limits, Some(1 << 20), true), Ok(None));
        assert_eq!(limits.connections_max, 4_096);
        let lowered = fit_connections(&mut limits, Some(1_024), true).unwrap();
        assert!(lowered.unwrap().contains("lowered from 4096 to 752"));
        assert_eq!(limits.connections_max, 1_024 - 256 - 16);
        // The same share of the places as before: 256 of 4,096, 47 of 752.
        assert_eq!(limits.connections_per_peer_max, 47);
        let mut off = Limits {
            connections_per_peer_max: 0,
            ..Limits::default()
        };
        fit_connections(&mut off, Some(1_024), true).unwrap();
        assert_eq!(off.connections_per_peer_max, 0, "off stays off");
        // A cap set near the top (meaning none) is scaled without wrapping.
        let mut huge = Limits {
            connections_per_peer_max: 1 << 62,
            ..Limits::default()
        };
        fit_connections(&mut huge, Some(1_024), true).unwrap();
        assert!(huge.connections_per_peer_max >= huge.connections_max);
        let refused = fit_connections(&mut limits, Some(300), true).unwrap_err();
        assert!(refused.contains("at least 336"), "{refused}");
        // Without a metrics port, its descriptors are not kept.
        assert!(fit_connections(&mut limits, Some(330), false).is_ok());
    }
}
