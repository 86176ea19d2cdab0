//! The README's walk-through, as a newcomer copy-pastes it: its shell blocks are read
//! from README.md itself and run by bash against `prenota serve --demo` whose demo
//! starts days after today (so no id or date of the day the README was written can
//! pass). grpcurl is stood in for by `prenota call` (same JSON, same answers' shape):
//! a fresh machine has no grpcurl.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::child::{ChildOptions, ChildServer};

/// Every ```sh block of the section under `heading` (up to the next heading of its
/// level or above), joined.
fn blocks_in(readme: &str, heading: &str) -> String {
    let level = heading.split(' ').next().unwrap_or("##").len();
    let mut lines = readme.lines().skip_while(|line| *line != heading).skip(1);
    let (mut blocks, mut block, mut fence) = (Vec::new(), None::<String>, false);
    for line in lines.by_ref() {
        if line.starts_with("```") {
            fence = !fence;
            match (fence, line == "```sh", block.take()) {
                (true, true, _) => block = Some(String::new()),
                (false, _, Some(code)) => blocks.push(code),
                _ => {}
            }
            continue;
        }
        let hashes = line.len() - line.trim_start_matches('#').len();
        if !fence && hashes > 0 && hashes <= level && line[hashes..].starts_with(' ') {
            break;
        }
        if let Some(code) = block.as_mut() {
            code.push_str(line);
            code.push('\n');
        }
    }
    assert!(!blocks.is_empty(), "no sh block under {heading:?}");
    blocks.join("\n")
}

/// A `grpcurl` that sends `-d` (and `-H`) to `prenota call` against `$PRENOTA_URL`,
/// whatever address the README names.
const GRPCURL_SHIM: &str = r#"#!/usr/bin/env bash
set -euo pipefail
data='{}'; headers=(); args=()
while [ $# -gt 0 ]; do
  case "$1" in
    -plaintext) shift ;;
    -d) data="$2"; shift 2 ;;
    -H) headers+=(-H "$2"); shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
exec "$PRENOTA" call --server "$PRENOTA_URL" -d "$data" ${headers[@]+"${headers[@]}"} "${args[1]}"
"#;

fn write_shim(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let shim = dir.join("grpcurl");
    std::fs::write(&shim, GRPCURL_SHIM).unwrap();
    std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn the_readme_walk_through_works_by_copy_paste_on_another_day() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let script = [
        blocks_in(&readme, "## A first booking with grpcurl"),
        blocks_in(
            &readme,
            "## Fair release: announced openings and the waiting room",
        ),
        blocks_in(&readme, "### Capacity changes and closures"),
        blocks_in(&readme, "## Campaigns: pre-registration, waves and offers"),
        blocks_in(&readme, "## At the desk: references, check-in and no-shows"),
        // Every id the steps took from an answer was there.
        r#": "${SLOT1:?} ${SLOT2:?} ${SLOT3:?} ${BOOKING:?} ${HOLD:?} ${SLOT:?} ${DAY:?} ${REFERENCE:?} ${CODE:?} ${HOLD_ID:?}""#
            .to_string(),
    ]
    .join("\n");

    let data = tempfile::tempdir().unwrap();
    let options = ChildOptions {
        args: vec!["--demo".into()],
        // As the desk section says: the demo's slots are days ahead.
        env: vec![
            (prenota::demo::DAYS_AHEAD_VARIABLE.into(), "5".into()),
            ("PRENOTA_LIMITS_CHECK_IN_WINDOW_HOURS".into(), "720".into()),
        ],
        ..ChildOptions::default()
    };
    let mut server = ChildServer::start_recovering(data.path(), options);
    server.wait_serving();

    let work = tempfile::tempdir().unwrap();
    write_shim(work.path());
    let path = format!(
        "{}:{}",
        work.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let run = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(work.path())
        .env("PATH", path)
        .env("PRENOTA", env!("CARGO_BIN_EXE_prenota"))
        .env("PRENOTA_URL", &server.url)
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "the walk-through failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- script\n{script}",
        run.status
    );
    // Each step did what the README says it does.
    for expected in [
        "\"status\": \"SERVING\"",
        "\"state\": \"BOOKING_STATE_CONFIRMED\"",
        "\"state\": \"BOOKING_STATE_CANCELLED\"",
        "\"cancelReason\": \"rescheduled\"",
        "\"phase\": \"RELEASE_PHASE_QUEUE_OPEN\"",
        "\"state\": \"QUEUE_TICKET_STATE_WAITING\"",
        "\"capacity\": 6",
        "\"state\": \"REGISTRATION_STATE_OFFERED\"",
        "\"campaignId\": \"dose1-nh\"",
        "\"state\": \"BOOKING_STATE_ATTENDED\"",
    ] {
        assert!(stdout.contains(expected), "no {expected} in:\n{stdout}");
    }
    let closed: u32 = stdout
        .lines()
        .find_map(|line| line.trim().strip_prefix("\"slotsClosed\": "))
        .and_then(|n| n.trim_end_matches(',').parse().ok())
        .expect("CloseSlots answered slotsClosed");
    assert!(closed > 0, "the closure closed nothing:\n{stdout}");
}
