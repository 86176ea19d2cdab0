//! Fuzz-style property tests on stable Rust (proptest): arbitrary bytes into the CSV
//! parser, and arbitrary field values into the gRPC handlers (validation, then the
//! engine, in process). Nothing may panic, and every refusal must be a client error with
//! a clear code, never INTERNAL or UNKNOWN.
//!
//! `PRENOTA_FUZZ_CASES` sets the cases per property (default 256; e.g. 100000 to soak).

use std::sync::{Arc, OnceLock};

use prenota::capacity_file::{self, Parsed};
use prenota::config::Config;
use prenota::grpc::auth::Caller;
use prenota::grpc::{BookingApi, CapacityApi};
use prenota::proto;
use prenota::proto::booking_service_server::BookingService;
use prenota::proto::capacity_service_server::CapacityService;
use prenota::service::{Clock, Engine};
use proptest::prelude::*;
use tonic::{Code, Request};

fn cases() -> u32 {
    std::env::var("PRENOTA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

const HEADER: &str = "site_id,name,region_id,time_zone,service_id,first_day,last_day,weekdays,opens,closes,slot_minutes,capacity_per_slot\n";

/// Field values that sit on the edges: empty, huge numbers, odd dates, quotes, unicode.
fn tricky_field() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("rome".to_string()),
        Just("Europe/Rome".to_string()),
        Just("2027-02-29".to_string()),
        Just("2028-02-29".to_string()),
        Just("Mon-Sun".to_string()),
        Just("Sun-Mon".to_string()),
        Just("24:00".to_string()),
        Just("00:00".to_string()),
        Just("4294967296".to_string()),
        Just("-1".to_string()),
        Just("\"quoted, with comma\"".to_string()),
        Just("\"unterminated".to_string()),
        Just("\u{202e}".to_string()),
        "[ -~]{0,12}",
        any::<String>().prop_map(|s| s.chars().take(12).collect()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn the_csv_parser_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..6_000)) {
        let parsed = capacity_file::parse(bytes.as_slice(), 100, 10).unwrap();
        if let Parsed::Errors { listed, .. } = parsed {
            prop_assert!(!listed.is_empty() && listed.len() <= 10);
            prop_assert!(listed.iter().all(|e| e.line >= 1 && !e.message.is_empty()));
        }
    }

    #[test]
    fn the_csv_parser_names_the_line_of_every_bad_row(
        rows in proptest::collection::vec(proptest::collection::vec(tricky_field(), 0..14), 1..6)
    ) {
        let mut file = HEADER.to_string();
        for row in &rows {
            file.push_str(&row.join(","));
            file.push('\n');
        }
        match capacity_file::parse(file.as_bytes(), 100, 50).unwrap() {
            Parsed::Rows(parsed, _) => prop_assert!(parsed.len() <= rows.len()),
            Parsed::Errors { listed, .. } => {
                let lines = rows.len() as u64 + 1;
                prop_assert!(listed.iter().all(|e| e.line >= 2 && e.line <= lines), "{listed:?}");
            }
        }
    }
}

/// One engine for every case: a temp dir that lives as long as the test process.
fn engine() -> &'static (tokio::runtime::Runtime, Arc<Engine>) {
    static ENGINE: OnceLock<(tokio::runtime::Runtime, Arc<Engine>)> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let dir = Box::leak(Box::new(tempfile::tempdir().unwrap()));
        let mut config = Config::default();
        config.limits.rate_citizen_attempts_per_min = 0;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let engine = runtime.block_on(async {
            let engine = Arc::new(Engine::open(dir.path(), &config, Clock::system()).unwrap());
            let capacity = CapacityApi::new(Arc::clone(&engine));
            capacity
                .upsert_site(open(proto::UpsertSiteRequest {
                    site: Some(proto::Site {
                        site_id: "fuzz".into(),
                        name: "Fuzz".into(),
                        region_id: "r".into(),
                        time_zone: "Europe/Rome".into(),
                    }),
                    request_id: String::new(),
                }))
                .await
                .unwrap();
            engine
        });
        (runtime, engine)
    })
}

/// A request as the authentication gate passes it on in open mode.
fn open<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(Caller::Open);
    request
        .extensions_mut()
        .insert(prenota::config::CitizenTrust::Trusted);
    request
}

/// A refusal a client can act on; the server's own failures are not allowed.
fn client_error(status: &tonic::Status) -> Result<(), TestCaseError> {
    prop_assert!(
        !matches!(
            status.code(),
            Code::Internal | Code::Unknown | Code::DataLoss
        ),
        "{status:?}"
    );
    prop_assert!(!status.message().is_empty());
    Ok(())
}

fn slot_id() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "fuzz/[a-z]{1,4}/-?[0-9]{1,20}",
        "[a-z/]{0,20}",
    ]
}

fn timestamp() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
    proptest::option::of(
        (any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn booking_requests_get_answers_or_client_errors(
        slot in slot_id(),
        citizen in any::<String>(),
        request_id in prop_oneof![any::<String>(), "[!-~]{1,140}"],
        hold_id in proptest::option::of(any::<String>()),
    ) {
        let (runtime, engine) = engine();
        let api = BookingApi::new(Arc::clone(engine), Default::default());
        let answered = runtime.block_on(api.book(open(proto::BookRequest {
            slot_id: slot,
            citizen_id: citizen,
            request_id,
            hold_id,
        })));
        if let Err(status) = answered {
            client_error(&status)?;
        }
    }

    #[test]
    fn searches_get_answers_or_client_errors(
        site in prop_oneof![Just("fuzz".to_string()), any::<String>()],
        service in prop_oneof![Just("vax".to_string()), any::<String>()],
        from in timestamp(),
        to in timestamp(),
        page_size in any::<i32>(),
        page_token in slot_id(),
        by_region in any::<bool>(),
    ) {
        use proto::search_slots_request::Scope;
        let (runtime, engine) = engine();
        let api = BookingApi::new(Arc::clone(engine), Default::default());
        let answered = runtime.block_on(api.search_slots(open(proto::SearchSlotsRequest {
            scope: Some(if by_region { Scope::RegionId(site) } else { Scope::SiteId(site) }),
            service_id: service,
            from,
            to,
            only_available: false,
            page_size,
            page_token,
        })));
        if let Err(status) = answered {
            client_error(&status)?;
        }
    }

    #[test]
    fn schedules_get_answers_or_client_errors(
        first_day in tricky_field(),
        last_day in tricky_field(),
        hours in proptest::collection::vec((any::<u32>(), tricky_field(), tricky_field()), 0..4),
        slot_minutes in prop_oneof![any::<u32>(), 0..120u32],
        capacity_per_slot in prop_oneof![any::<u32>(), 0..10u32],
    ) {
        let (runtime, engine) = engine();
        let api = CapacityApi::new(Arc::clone(engine));
        let answered = runtime.block_on(api.publish_schedule(open(proto::PublishScheduleRequest {
            site_id: "fuzz".into(),
            service_id: "vax".into(),
            first_day,
            last_day,
            opening_hours: hours
                .into_iter()
                .map(|(weekday, opens, closes)| proto::OpeningHours { weekday, opens, closes })
                .collect(),
            slot_minutes,
            capacity_per_slot,
            request_id: String::new(),
        })));
        if let Err(status) = answered {
            client_error(&status)?;
        }
    }
}
