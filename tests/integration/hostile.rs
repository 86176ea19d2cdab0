//! Hostile input against a real server on 127.0.0.1:0: oversized messages, bytes that
//! are not protobuf, absurd numbers and ranges, unicode and control characters in ids,
//! and capacity files with a gigantic line or a million columns. Every one gets a clear
//! error naming what is wrong, nothing is changed, and the server keeps serving.
//! Fuzz-style property tests over the same edges are in `tests/integration/fuzz.rs`.

use crate::common;

use std::io::Read;

use bytes::{Buf, BufMut};
use common::*;
use prenota::capacity_file::{self, Parsed, LINE_BYTES_MAX};
use prenota::proto;
use prenota::proto::booking_service_client::BookingServiceClient;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Code;

/// Sends raw bytes as a gRPC message, whatever they are.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Self::Error> {
        let bytes = src.copy_to_bytes(src.remaining());
        Ok(Some(bytes.to_vec()))
    }
}

async fn raw_call(
    server: &TestServer,
    path: &str,
    bytes: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    grpc.unary(tonic::Request::new(bytes), path.parse().unwrap(), RawCodec)
        .await
        .map(|response| response.into_inner())
}

/// The server still books after whatever came before.
async fn still_serving(server: &TestServer, slot_id: &str, n: usize) {
    book_ok(
        &mut server.booking().await,
        book_request(slot_id, &format!("calm-{n}"), &format!("calm-{n}")),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_undecodable_messages_get_clear_errors_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let slot_id = one_slot_site(&server, "hostile", 100).await;

    // 5 MiB citizen id: over the 4 MiB message limit, refused before decoding.
    let huge = book_request(&slot_id, &"x".repeat(5 * 1024 * 1024), "huge");
    let refused = BookingServiceClient::new(server.channel().await)
        .max_encoding_message_size(usize::MAX)
        .book(huge)
        .await
        .unwrap_err();
    assert!(
        matches!(refused.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{refused:?}"
    );
    assert!(refused.message().contains("too large"), "{refused:?}");
    still_serving(&server, &slot_id, 0).await;

    // Not protobuf: an invalid wire type, a truncated varint, a field claiming 2 GiB,
    // and 10,000 nested groups (past prost's recursion limit).
    let nested: Vec<u8> = std::iter::repeat_n(0x0b_u8, 10_000) // field 1, start group
        .chain(std::iter::repeat_n(0x0c_u8, 10_000)) // end group
        .collect();
    let garbage: [(&str, Vec<u8>); 4] = [
        ("wire type 7", vec![0x0f, 0x01, 0x02]),
        ("truncated varint", vec![0x08, 0xff, 0xff, 0xff]),
        (
            "length past the end",
            vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x07, b'a'],
        ),
        ("10,000 nested groups", nested),
    ];
    for (what, bytes) in garbage {
        for path in [
            "/prenota.v1.BookingService/Book",
            "/prenota.v1.CapacityService/PublishSchedule",
        ] {
            // The caller's mistake, not a server failure (prost's INTERNAL was logged
            // as a warning per request).
            let status = raw_call(&server, path, bytes.clone()).await.unwrap_err();
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{what} to {path}: {status:?}"
            );
            assert!(
                status.message().contains("not valid protobuf"),
                "{what} to {path}: {status:?}"
            );
            assert_eq!(violated_fields(&status), [""], "{what} to {path}");
        }
    }
    // Valid protobuf of the wrong shape decodes as unknown fields: refused by validation.
    let status = raw_call(
        &server,
        "/prenota.v1.BookingService/Book",
        vec![0xf8, 0xff, 0x03, 0x01], // field 8191, varint 1
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // An unknown method answers UNIMPLEMENTED.
    let status = raw_call(&server, "/prenota.v1.BookingService/DropAllTables", vec![])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    still_serving(&server, &slot_id, 1).await;
    let stats = site_stats(&server, "hostile").await;
    assert_eq!(stats.booked, 2, "only the two calm bookings");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_numbers_and_ranges_are_refused_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let slot_id = one_slot_site(&server, "absurd", 5).await;
    let mut capacity = server.capacity().await;
    let today = day_ahead(1);
    let cases: Vec<(proto::PublishScheduleRequest, &str)> = vec![
        (
            // A schedule for 100 years.
            publish_request(
                "absurd",
                "vax",
                (&today, "2126-11-23"),
                ("09:00", "17:00"),
                15,
                4,
            ),
            "last_day",
        ),
        (
            publish_request(
                "absurd",
                "vax",
                (&today, &today),
                ("09:00", "17:00"),
                15,
                1 << 31,
            ),
            "capacity_per_slot",
        ),
        (
            publish_request("absurd", "vax", (&today, &today), ("09:00", "17:00"), 0, 4),
            "slot_minutes",
        ),
        (
            publish_request(
                "absurd",
                "vax",
                (&today, &today),
                ("09:00", "17:00"),
                u32::MAX,
                4,
            ),
            "slot_minutes",
        ),
        (
            publish_request(
                "absurd",
                "vax",
                ("0000-01-01", "9999-12-31"),
                ("09:00", "17:00"),
                15,
                4,
            ),
            "last_day",
        ),
        (
            publish_request("absurd", "vax", (&today, &today), ("25:00", "99:99"), 15, 4),
            "opens",
        ),
    ];
    for (request, field) in cases {
        let status = capacity.publish_schedule(request).await.unwrap_err();
        let fields = violated_fields(&status);
        assert!(
            fields.iter().any(|f| f.contains(field)),
            "{field} not named in {fields:?}"
        );
    }
    let status = capacity
        .set_slot_capacity(proto::SetSlotCapacityRequest {
            slot_id: slot_id.clone(),
            capacity: 1 << 31,
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert!(violated_fields(&status).iter().any(|f| f == "capacity"));
    let mut booking = server.booking().await;
    let status = booking
        .hold_slot(proto::HoldSlotRequest {
            slot_id: slot_id.clone(),
            citizen_id: "c".into(),
            request_id: "h".into(),
            ttl_seconds: u32::MAX,
        })
        .await
        .unwrap_err();
    assert!(violated_fields(&status).iter().any(|f| f == "ttl_seconds"));
    let status = booking
        .search_slots(proto::SearchSlotsRequest {
            scope: Some(proto::search_slots_request::Scope::SiteId("absurd".into())),
            service_id: "vax".into(),
            from: at_s(i64::MIN),
            to: Some(prost_types::Timestamp {
                seconds: i64::MAX,
                nanos: -1,
            }),
            page_size: i32::MAX,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Nothing changed: the one slot, its capacity.
    let stats = site_stats(&server, "absurd").await;
    assert_eq!((stats.slots, stats.capacity), (1, 5));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unicode_and_control_characters_in_ids_and_names_are_refused_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let slot_id = one_slot_site(&server, "text", 5).await;
    let mut capacity = server.capacity().await;
    let site = |site_id: &str, name: &str| proto::UpsertSiteRequest {
        site: Some(proto::Site {
            site_id: site_id.into(),
            name: name.into(),
            region_id: "r".into(),
            time_zone: "Etc/UTC".into(),
        }),
        request_id: String::new(),
    };
    for bad_id in [
        "rome\0",
        "ローマ",
        "rome termini",
        "rome/../etc",
        "r\u{202e}emor",
        "🦀",
    ] {
        let status = capacity
            .upsert_site(site(bad_id, "Rome"))
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), ["site.site_id"], "{bad_id:?}");
    }
    for bad_name in [
        "Rome\nTermini",
        "Rome\u{0}",
        "Rome \u{202e}inimreT",
        "\u{2066}Rome\u{2069}",
    ] {
        let status = capacity
            .upsert_site(site("text-2", bad_name))
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), ["site.name"], "{bad_name:?}");
    }
    // Unicode that is only text is a fine name.
    capacity
        .upsert_site(site("text-3", "Roma Termini — ローマ 🏥"))
        .await
        .expect("a unicode name");
    let mut booking = server.booking().await;
    for (citizen, request) in [
        ("RSSMRA80A01H501U\n", "ok-request"),
        ("citizen\u{0}", "ok-request"),
        ("çitizen", "ok-request"),
        ("citizen", "request\u{7f}"),
        ("citizen", "request with spaces"),
    ] {
        let status = booking
            .book(book_request(&slot_id, citizen, request))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{citizen:?} {request:?}"
        );
    }
    let status = booking
        .book(book_request("text/vax/\u{0}", "c", "r"))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["slot_id"]);
    let status = capacity
        .close_slots(proto::CloseSlotsRequest {
            site_id: "text".into(),
            service_id: None,
            from: at_s(0),
            to: at_s(4_000_000_000),
            reason: "closed \u{202e}nepo si".into(),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["reason"]);
    let stats = site_stats(&server, "text").await;
    assert_eq!((stats.slots_closed, stats.booked), (0, 0));
    server.stop().await;
}

/// Produces `total` bytes of `byte` without holding them, counting what was read.
struct Endless {
    byte: u8,
    left: u64,
    read: u64,
}

impl Read for Endless {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = (out.len() as u64).min(self.left) as usize;
        out[..n].fill(self.byte);
        self.left -= n as u64;
        self.read += n as u64;
        Ok(n)
    }
}

#[test]
fn a_capacity_file_with_a_huge_line_or_a_million_columns_is_refused_after_4_kib() {
    // A 1 GiB first line.
    let mut endless = Endless {
        byte: b'a',
        left: 1 << 30,
        read: 0,
    };
    let parsed = capacity_file::parse(std::io::BufReader::new(&mut endless), 1_000, 10).unwrap();
    let Parsed::Errors { listed, .. } = parsed else {
        panic!("a 1 GiB line was accepted");
    };
    assert_eq!(listed[0].line, 1);
    assert!(listed[0].message.contains("longer than"), "{:?}", listed[0]);
    assert!(
        endless.read < 64 * 1024,
        "read {} bytes of it",
        endless.read
    );

    // A valid header, then a row of a million columns.
    let header = "site_id,name,region_id,time_zone,service_id,first_day,last_day,weekdays,opens,closes,slot_minutes,capacity_per_slot\n";
    let mut file = header.as_bytes().to_vec();
    file.extend(std::iter::repeat_n(b',', 1_000_000));
    file.push(b'\n');
    let Parsed::Errors { listed, .. } = capacity_file::parse(file.as_slice(), 1_000, 10).unwrap()
    else {
        panic!("a million columns were accepted");
    };
    assert_eq!(listed[0].line, 2);
    assert!(listed[0].message.contains(&LINE_BYTES_MAX.to_string()));

    // A row of 40 columns, short enough to read: the column count is named.
    let mut file = header.as_bytes().to_vec();
    file.extend_from_slice(&[b'x', b','].repeat(39));
    file.extend_from_slice(b"x\n");
    let Parsed::Errors { listed, .. } = capacity_file::parse(file.as_slice(), 1_000, 10).unwrap()
    else {
        panic!("40 columns were accepted");
    };
    assert!(
        listed
            .iter()
            .any(|e| e.line == 2 && e.message.contains("12")),
        "{listed:?}"
    );
}

#[test]
fn the_import_cli_refuses_a_sparse_1_gib_file_at_once_without_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.csv");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 30) // sparse: 1 GiB of NUL bytes, no newline, no disk
        .unwrap();
    // The parser reads at most 4 KiB of a line (shown above with a counting reader).
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_prenota"))
        .args([
            "import",
            path.to_str().unwrap(),
            "--server",
            "http://127.0.0.1:9",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 1"), "{stderr}");
    assert!(stderr.contains("longer than"), "{stderr}");
}

/// A refusal printed to a stderr that cannot take it (a log file on a full disk) still
/// exits 1: `eprintln!` panicked there and exited 101 (an outside test).
#[test]
fn a_refusal_on_a_full_stderr_still_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, b"").unwrap();
    let commands: [&[&str]; 2] = [
        &["config", "check", "/nonexistent/prenota.toml"],
        &["serve", "--data-dir", not_a_dir.to_str().unwrap()],
    ];
    for args in commands {
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full");
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_prenota"))
            .args(args)
            .stderr(full.unwrap())
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(1), "{args:?}");
    }
}

/// `prenota backup-key` into a reader already gone fails: the new key was never seen
/// by anyone (it exited 0, and a script went on without its key).
#[test]
fn a_backup_key_nobody_read_is_a_failure() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_prenota"))
        .arg("backup-key")
        .stdout(writer)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(1));
}

/// `prenota call` streaming a watch into a reader that went away (`| head`) once went
/// on reading the stream for ever, holding the server's watcher place: it now ends at
/// the first answer it cannot write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prenota_call_ends_when_its_reader_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    one_slot_site(&server, "piped", 5).await;
    let from = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let request = format!(r#"{{"site_id": "piped", "service_id": "vax", "from": "{from}"}}"#);
    let mut call = std::process::Command::new(env!("CARGO_BIN_EXE_prenota"))
        .args(["call", "--server", &server.url(), "-d", &request])
        .arg("prenota.v1.BookingService/WatchAvailability")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(call.stdout.take()); // the reader goes away before the first answer
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = call.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            call.kill().unwrap();
            panic!("prenota call went on after its reader went away");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    server.stop().await;
}

/// `prenota` client commands: TLS files with an `http://` URL are refused (tonic would
/// connect in clear, the token readable on the way); a failed connection says why (it
/// said "transport error"); `call` refuses text after its JSON request (it sent the first
/// object only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_refuse_tls_files_in_clear_and_say_why_a_call_failed() {
    let dir = tempfile::tempdir().unwrap();
    let prenota = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_prenota"))
            .args(args)
            .env("PRENOTA_TOKEN", "from-the-environment")
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.success(), said)
    };
    let health = "grpc.health.v1.Health/Check";
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nobody = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let (ok, said) = prenota(&["call", "--server", &nobody, "--ca", "/dev/null", health]);
    assert!(!ok && said.contains("are for https:// servers"), "{said}");
    let (ok, said) = prenota(&["call", "--server", &nobody, health]);
    assert!(!ok && said.to_lowercase().contains("refused"), "{said}");

    let server = TestServer::start(dir.path()).await;
    let url = server.url();
    let twice = ["call", "--server", &url, "-d", "{}{}", health];
    let (ok, said) = prenota(&twice);
    assert!(!ok && said.contains("trailing characters"), "{said}");
    server.stop().await;
}

/// A release announced for a past instant is refused before anything is sent: the real
/// run used to register the file's sites and then hear the release refused ("nothing was
/// applied"), and the dry run predicted the release.
#[test]
fn an_import_with_a_past_release_is_refused_before_anything_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("past-release.csv");
    let text = "site_id,name,region_id,time_zone,service_id,first_day,last_day,weekdays,opens,\
                closes,slot_minutes,capacity_per_slot,release_id,release_at,queue_opens_at,\
                admissions_per_minute,reserved_percent,reserve_released_hours_before_start\n\
                relp-new,P,lazio,Europe/Rome,svc-p,2027-10-01,2027-10-30,1-5,09:00,12:00,30,4,\
                relp,2025-01-01T00:00:00+01:00,,0,,0\n";
    std::fs::write(&path, text).unwrap();
    for dry_run in [false, true] {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_prenota"));
        command.args([
            "import",
            path.to_str().unwrap(),
            "--server",
            "http://127.0.0.1:9",
        ]);
        if dry_run {
            command.arg("--dry-run");
        }
        let output = command.output().unwrap();
        let said = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{said}");
        assert!(
            said.contains("release_at must be in the future; nothing was sent"),
            "{said}"
        );
    }
}
