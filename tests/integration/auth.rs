//! Tokens and roles on a real server: who may call which service, and which regions
//! an authority may touch. Protected mode refuses a public address without tokens.

use crate::common;

use std::process::Command;

use common::*;
use prenota::config::{token_sha256, ConfigFile};
use prenota::proto;
use prenota::proto::booking_service_client::BookingServiceClient;
use prenota::proto::capacity_service_client::CapacityServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

const FRONTEND: &str = "frontend-token-0123456789";
const LAZIO: &str = "lazio-authority-0123456789";
const ADMIN: &str = "admin-token-0123456789abcdef";
const VENETO: &str = "veneto-authority-0123456789";

fn config() -> prenota::config::Config {
    let text = format!(
        r#"
[[tokens]]
name = "web"
sha256 = "{}"
role = "frontend"

[[tokens]]
name = "lazio-health"
sha256 = "{}"
role = "authority"
regions = ["lazio"]

[[tokens]]
name = "ops"
sha256 = "{}"
role = "admin"

[[tokens]]
name = "veneto-health"
sha256 = "{}"
role = "authority"
regions = ["veneto"]
"#,
        hex::encode(token_sha256(FRONTEND)),
        hex::encode(token_sha256(LAZIO)),
        hex::encode(token_sha256(ADMIN)),
        hex::encode(token_sha256(VENETO)),
    );
    let mut config = toml::from_str::<ConfigFile>(&text)
        .unwrap()
        .check()
        .expect("a valid configuration");
    let backup_key = prenota::store::backup_key::BackupKey::from_secret(&[3; 32]);
    config.backup_key = Some(std::sync::Arc::new(backup_key));
    config
}

type Capacity = CapacityServiceClient<InterceptedService<Channel, Bearer>>;
type Booking = BookingServiceClient<InterceptedService<Channel, Bearer>>;

async fn clients(server: &TestServer, token: Option<&'static str>) -> (Booking, Capacity) {
    let channel = server.channel().await;
    (
        BookingServiceClient::with_interceptor(channel.clone(), Bearer(token)),
        CapacityServiceClient::with_interceptor(channel, Bearer(token)),
    )
}

fn site(site_id: &str, region_id: &str) -> proto::UpsertSiteRequest {
    proto::UpsertSiteRequest {
        site: Some(proto::Site {
            site_id: site_id.into(),
            name: site_id.into(),
            region_id: region_id.into(),
            time_zone: "Europe/Rome".into(),
        }),
        request_id: String::new(),
    }
}

fn denied<T: std::fmt::Debug>(result: Result<T, Status>) {
    let status = result.expect_err("must be refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_decide_services_and_regions() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), config()).await;
    let (mut anonymous, mut anonymous_capacity) = clients(&server, None).await;
    let (mut web, mut web_capacity) = clients(&server, Some(FRONTEND)).await;
    let (mut lazio_booking, mut lazio) = clients(&server, Some(LAZIO)).await;
    let (_, mut admin) = clients(&server, Some(ADMIN)).await;
    let (_, mut forged) = clients(&server, Some("not-a-configured-token")).await;

    // Health answers without a token; prenota's services do not.
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health needs no token");
    let search = proto::SearchSlotsRequest {
        scope: Some(proto::search_slots_request::Scope::SiteId("rome".into())),
        service_id: "vax".into(),
        ..Default::default()
    };
    let status = anonymous.search_slots(search.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = forged.upsert_site(site("rome", "lazio")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = anonymous_capacity
        .upsert_site(site("rome", "lazio"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    // The scheme's name in any case; a token glued to it, or another scheme, is not one
    // (a site not made yet: NOT_FOUND once authenticated).
    let mut raw = CapacityServiceClient::new(server.channel().await);
    for (header, authenticated) in [
        (format!("bearer {ADMIN}"), true),
        (format!("BEARER  {ADMIN} "), true),
        (format!("Bearer{ADMIN}"), false),
        (format!("Basic {ADMIN}"), false),
    ] {
        let mut request = tonic::Request::new(proto::GetSiteStatsRequest {
            site_id: "ostia".into(),
        });
        let value = header.parse().unwrap();
        request.metadata_mut().insert("authorization", value);
        let status = raw.get_site_stats(request).await.unwrap_err();
        let expected = match authenticated {
            true => Code::NotFound,
            false => Code::Unauthenticated,
        };
        assert_eq!(status.code(), expected, "{header}: {status:?}");
    }
    // Two authorization headers: refused, whichever comes first (the first used to win
    // silently: an admin's before a frontend's acted as the admin).
    for pair in [[ADMIN, FRONTEND], [FRONTEND, ADMIN], [ADMIN, ADMIN]] {
        let mut request = tonic::Request::new(proto::GetSiteStatsRequest {
            site_id: "ostia".into(),
        });
        for token in pair {
            let value = format!("Bearer {token}").parse().unwrap();
            request.metadata_mut().append("authorization", value);
        }
        let status = raw.get_site_stats(request).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{pair:?}: {status:?}");
    }

    // A frontend books, an authority manages its region, neither does the other's job.
    // An admin registers a new site to its region; its authority then manages it.
    denied(web_capacity.upsert_site(site("rome", "lazio")).await);
    denied(lazio.upsert_site(site("rome", "lazio")).await); // new ids: admins only
    admin
        .upsert_site(site("rome", "lazio"))
        .await
        .expect("admin");
    lazio
        .upsert_site(site("rome", "lazio"))
        .await
        .expect("own region");
    denied(lazio_booking.search_slots(search.clone()).await);
    let status = web.search_slots(search).await;
    assert!(status.is_ok(), "{status:?}");

    // Region B is out of an authority-of-A's reach, in every capacity RPC.
    denied(lazio.upsert_site(site("venice", "veneto")).await);
    admin
        .upsert_site(site("venice", "veneto"))
        .await
        .expect("admin");
    denied(lazio.upsert_site(site("venice", "lazio")).await); // moving it away
    denied(lazio.upsert_site(site("rome", "veneto")).await); // moving one's own away
    let day = day_ahead(30);
    let publish =
        |site_id: &str| publish_request(site_id, "vax", (&day, &day), ("10:00", "11:00"), 30, 2);
    admin
        .publish_schedule(publish("venice"))
        .await
        .expect("admin");
    lazio
        .publish_schedule(publish("rome"))
        .await
        .expect("own region");
    denied(lazio.publish_schedule(publish("venice")).await);
    denied(
        lazio
            .get_site_stats(proto::GetSiteStatsRequest {
                site_id: "venice".into(),
            })
            .await,
    );
    let venice_slot = web
        .search_slots(proto::SearchSlotsRequest {
            scope: Some(proto::search_slots_request::Scope::SiteId("venice".into())),
            service_id: "vax".into(),
            to: at_s(chrono::Utc::now().timestamp() + 60 * 86_400),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .slots[0]
        .clone();
    denied(
        lazio
            .set_slot_capacity(proto::SetSlotCapacityRequest {
                slot_id: venice_slot.slot_id.clone(),
                capacity: 9,
                request_id: String::new(),
            })
            .await,
    );
    denied(
        lazio
            .close_slots(proto::CloseSlotsRequest {
                site_id: "venice".into(),
                service_id: None,
                from: venice_slot.start,
                to: venice_slot.end,
                reason: "not yours".into(),
                request_id: String::new(),
            })
            .await,
    );
    use proto::export_bookings_request::Scope;
    for scope in [
        None,
        Some(Scope::RegionId("veneto".into())),
        Some(Scope::SiteId("venice".into())),
    ] {
        denied(
            lazio
                .export_bookings(proto::ExportBookingsRequest { scope })
                .await,
        );
    }
    lazio
        .export_bookings(proto::ExportBookingsRequest {
            scope: Some(Scope::RegionId("lazio".into())),
        })
        .await
        .expect("own region");
    let rows = vec![proto::CapacityRow {
        site: Some(proto::Site {
            site_id: "padua".into(),
            name: "Padua".into(),
            region_id: "veneto".into(),
            time_zone: "Europe/Rome".into(),
        }),
        service_id: "vax".into(),
        first_day: day.clone(),
        last_day: day.clone(),
        weekdays: (1..=7).collect(),
        opens: "10:00".into(),
        closes: "11:00".into(),
        slot_minutes: 30,
        capacity_per_slot: 1,
        line: 2,
    }];
    denied(
        lazio
            .import_capacity(tokio_stream::iter(vec![proto::ImportCapacityRequest {
                rows,
                dry_run: false,
                ..Default::default()
            }]))
            .await,
    );
    let stats = admin
        .get_site_stats(proto::GetSiteStatsRequest {
            site_id: "padua".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        stats.code(),
        Code::NotFound,
        "the refused import applied nothing"
    );
    let venice = admin
        .get_site_stats(proto::GetSiteStatsRequest {
            site_id: "venice".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (venice.slots, venice.capacity, venice.slots_closed),
        (2, 4, 0)
    );

    // Every change is in the audit log with its token's name; refused ones are not.
    let refused = lazio
        .export_audit_log(proto::ExportAuditLogRequest {})
        .await
        .expect_err("admins only");
    assert_eq!(refused.code(), Code::PermissionDenied);
    // It says why (it once asked for a region_id the request has no field for).
    assert!(refused.message().contains("audit log"), "{refused:?}");
    // The backup holds every region and the citizen hash key: admins only.
    denied(lazio.export_backup(proto::ExportBackupRequest {}).await);
    let mut backup = admin
        .export_backup(proto::ExportBackupRequest {})
        .await
        .expect("admin takes a backup")
        .into_inner();
    let first = backup.message().await.unwrap().expect("backup bytes");
    assert!(first.data.starts_with(b"PRENOTA-BACKUP"));
    let mut log = admin
        .export_audit_log(proto::ExportAuditLogRequest {})
        .await
        .expect("admin reads the audit log")
        .into_inner();
    let mut entries = Vec::new();
    while let Some(item) = log.message().await.unwrap() {
        let entry = item.entry.unwrap();
        entries.push((entry.actor, entry.action, entry.detail));
    }
    let actions: Vec<(&str, &str)> = entries
        .iter()
        .map(|(actor, action, _)| (actor.as_str(), action.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("ops", "UpsertSite"),
            ("lazio-health", "UpsertSite"),
            ("ops", "UpsertSite"),
            ("ops", "PublishSchedule"),
            ("lazio-health", "PublishSchedule"),
        ]
    );
    assert!(entries[1].2.contains("site rome"), "{entries:?}");
    assert!(entries[3].2.contains("2 slots created"), "{entries:?}");

    // The CLI sends its token: from --token, --token-file or PRENOTA_TOKEN.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/capacity.csv");
    let url = server.url();
    let import = |token: Vec<String>, env: Option<&'static str>| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let mut command = Command::new(env!("CARGO_BIN_EXE_prenota"));
            command
                .args(["import", example, "--dry-run", "--server", &url])
                .args(token)
                .env_remove("PRENOTA_TOKEN");
            if let Some(token) = env {
                command.env("PRENOTA_TOKEN", token);
            }
            command.output().unwrap()
        })
    };
    let flag = |token: &str| vec!["--token".to_string(), token.to_string()];
    let refused = import(flag(FRONTEND), None).await.unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("the server refused the file (PERMISSION_DENIED): token"),
        "{stderr}"
    );
    // Every command refuses in the same style: code, reason, message.
    let url_for_export = url.clone();
    let exported = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_prenota"))
            .args(["export", "--site", "nowhere", "--server", &url_for_export])
            .args(["--token", ADMIN])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&exported.stderr);
    assert!(
        stderr.starts_with("prenota: the server refused it (NOT_FOUND, SITE_NOT_FOUND): "),
        "{stderr}"
    );
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{ADMIN}\n")).unwrap();
    let from_file = vec!["--token-file".into(), token_file.display().to_string()];
    for (token, env) in [
        (flag(ADMIN), None),
        (from_file, None),
        (vec![], Some(ADMIN)),
    ] {
        let accepted = import(token, env).await.unwrap();
        let stderr = String::from_utf8_lossy(&accepted.stderr);
        assert!(accepted.status.success(), "{stderr}");
    }
    server.stop().await;
}

/// Bearer tokens never cross a network in clear unless the operator insists: `serve`
/// refuses a non-loopback address without TLS, and `config check` warns of it.
#[test]
fn with_tokens_a_public_address_needs_tls() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prenota.toml");
    let text = format!(
        "[server]\nlisten = \"0.0.0.0:50051\"\n\n[[tokens]]\nname = \"ops\"\nsha256 = \"{}\"\nrole = \"admin\"\n",
        hex::encode(token_sha256(ADMIN))
    );
    std::fs::write(&file, &text).unwrap();
    let (_, stderr) = config_check(&file, true);
    assert!(
        stderr.contains("serve would stop") && stderr.contains("TLS"),
        "{stderr}"
    );
    let loopback = dir.path().join("loopback.toml");
    std::fs::write(&loopback, text.replace("0.0.0.0", "127.0.0.1")).unwrap();
    let (checked, _) = config_check(&loopback, true);
    let stdout = String::from_utf8_lossy(&checked.stdout);
    assert!(!stdout.contains("Open mode"), "tokens configured: {stdout}");
    let open = Command::new(env!("CARGO_BIN_EXE_prenota"))
        .args(["config", "check", "/dev/null"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&open.stdout);
    assert!(stdout.contains("shares do not apply"), "{stdout}");
    let served = Command::new(env!("CARGO_BIN_EXE_prenota"))
        .args(["serve", "--config"])
        .arg(&file)
        .args([
            "--listen",
            "0.0.0.0:0",
            "--metrics-listen",
            "off",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&served.stderr);
    assert!(!served.status.success());
    assert!(stderr.contains("--insecure-plaintext-tokens"), "{stderr}");
    assert!(
        !dir.path().join("data").exists(),
        "refused before opening anything"
    );
}

/// `config check` warns of settings that do nothing or less than they seem to (an
/// outside test): a token hashed from nothing, a channel on a token that books nothing,
/// two identity gateways with one key. And `serve` names a data dir that is a file as
/// such (it said "the stored state breaks an invariant").
#[test]
fn config_check_warns_of_settings_that_do_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prenota.toml");
    let key = "-----BEGIN PUBLIC KEY-----\n\
               MCowBQYDK2VwAyEA2AZkfgg9XSxlfwfckkeFFDb3WeFndQbL7T/4u3hL5w4=\n\
               -----END PUBLIC KEY-----\n";
    let issuer = |name: &str| {
        format!("[[citizen_issuers]]\nname = \"{name}\"\naudience = \"prenota\"\npublic_key_pem = \"\"\"\n{key}\"\"\"\n\n")
    };
    let token = |name: &str, token: &str, role: &str, more: &str| {
        let sha256 = hex::encode(token_sha256(token));
        format!("[[tokens]]\nname = \"{name}\"\nsha256 = \"{sha256}\"\nrole = \"{role}\"\n{more}\n")
    };
    let text = [
        token("blank", "", "frontend", ""),
        token(
            "region",
            LAZIO,
            "authority",
            "regions = [\"lazio\"]\nchannel = \"phone\"",
        ),
        token("ok", ADMIN, "admin", ""),
        issuer("spid"),
        issuer("cie"),
    ]
    .concat();
    std::fs::write(&file, text).unwrap();
    let (_, stderr) = config_check(&file, true);
    for said in [
        "token \"blank\": sha256 is that of an empty token",
        "token \"region\": channel does nothing",
        "citizen_issuers \"spid\" and \"cie\" have the same public key",
    ] {
        assert!(stderr.contains(said), "{said}: {stderr}");
    }
    assert_eq!(stderr.matches("warning:").count(), 3, "{stderr}");
    let plain_file = dir.path().join("a-file");
    std::fs::write(&plain_file, "").unwrap();
    let served = Command::new(env!("CARGO_BIN_EXE_prenota"))
        .args([
            "serve",
            "--metrics-listen",
            "off",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&plain_file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&served.stderr);
    assert!(!served.status.success());
    assert!(stderr.contains("a-file: not a directory"), "{stderr}");
}

#[test]
fn without_tokens_a_public_address_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_prenota"))
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("serves loopback addresses only"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("sled").exists(),
        "refused before touching the store"
    );
    // `config check` warns of the same file (it once said only "valid"); read by
    // `head`, it ends quietly (it once panicked on the broken pipe).
    let file = dir.path().join("prenota.toml");
    std::fs::write(&file, "[server]\nlisten = \"0.0.0.0:50051\"\n").unwrap();
    let (_, stderr) = config_check(&file, true);
    assert!(stderr.contains("serve would stop"), "{stderr}");
    // And of the files `serve` reads at start, each of them.
    let files =
        "[server]\ntls_cert = \"/nonexistent/cert.pem\"\ntls_key = \"/nonexistent/key.pem\"\n\
                 backup_key_file = \"/nonexistent/backup.key\"\n\n\
                 [citizens]\nhash_key_file = \"/nonexistent/hash.key\"\n";
    std::fs::write(&file, files).unwrap();
    let (_, stderr) = config_check(&file, false);
    for named in ["cert.pem", "backup.key", "hash.key"] {
        assert!(stderr.contains(named), "{named}: {stderr}");
    }
    let mut head = Command::new(env!("CARGO_BIN_EXE_prenota"))
        .args(["config", "check", "/dev/null"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(head.stdout.take()); // the reader goes away before anything is written
    let read = head.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&read.stderr);
    assert!(read.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Request ids are scoped to the token (#13): the same id sent through another token is
/// another request, so one frontend (or authority) cannot squat another's ids, nor get
/// another's outcome back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_scoped_to_the_token() {
    const KIOSK: &str = "kiosk-token-0123456789abcd";
    let mut config = config();
    let mut kiosk = config.tokens[0].clone();
    kiosk.name = "kiosk".into();
    kiosk.sha256 = token_sha256(KIOSK);
    config.tokens.push(kiosk);
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), config).await;
    let (_, mut admin) = clients(&server, Some(ADMIN)).await;
    let (mut web, _) = clients(&server, Some(FRONTEND)).await;
    let (mut kiosk, _) = clients(&server, Some(KIOSK)).await;
    admin.upsert_site(site("scoped", "lazio")).await.unwrap();
    let day = day_ahead(30);
    admin
        .publish_schedule(publish_request(
            "scoped",
            "vax",
            (&day, &day),
            ("10:00", "11:00"),
            30,
            5,
        ))
        .await
        .unwrap();
    let slots = web
        .search_slots(proto::SearchSlotsRequest {
            scope: Some(proto::search_slots_request::Scope::SiteId("scoped".into())),
            service_id: "vax".into(),
            from: None,
            to: None,
            only_available: false,
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .slots;
    assert_eq!(slots.len(), 2);

    // The web portal books; the kiosk reusing its request id for the same citizen is a
    // new request (refused on its merits), not a retry that returns the web's booking.
    let booked = web
        .book(book_request(&slots[0].slot_id, "citizen", "shared-id"))
        .await
        .unwrap()
        .into_inner();
    let status = kiosk
        .book(book_request(&slots[0].slot_id, "citizen", "shared-id"))
        .await
        .unwrap_err();
    assert_eq!(reason(&status).as_deref(), Some("CITIZEN_ALREADY_BOOKED"));
    // And another citizen through the kiosk is not refused as REQUEST_ID_REUSED.
    kiosk
        .book(book_request(&slots[1].slot_id, "other", "shared-id"))
        .await
        .unwrap();
    // The web portal's retry still gets its first booking back.
    let retried = web
        .book(book_request(&slots[0].slot_id, "citizen", "shared-id"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.booking, booked.booking);
    server.stop().await;
}

/// The services reflection lists, or its refusal.
async fn reflected_services(
    server: &TestServer,
    token: Option<&'static str>,
) -> Result<Vec<String>, Status> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut client =
        ServerReflectionClient::with_interceptor(server.channel().await, Bearer(token));
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    match answers.message().await?.and_then(|a| a.message_response) {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => panic!("not a service list: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_is_off_with_tokens_unless_switched_on_and_then_needs_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), config()).await;
    let off = reflected_services(&server, Some(ADMIN)).await.unwrap_err();
    assert_eq!(off.code(), Code::Unimplemented, "{off:?}");
    server.stop().await;

    let mut switched_on = config();
    switched_on.reflection = Some(true);
    let server = TestServer::start_with(dir.path(), switched_on).await;
    let anonymous = reflected_services(&server, None).await.unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated, "{anonymous:?}");
    let services = reflected_services(&server, Some(FRONTEND)).await.unwrap();
    assert!(
        services.iter().any(|s| s == "prenota.v1.BookingService"),
        "{services:?}"
    );
    server.stop().await;
}

/// The region check ran in the handler, before the authority lock: an authority of one
/// region published slots on a site being created for another region at that moment.
/// Now the engine checks under the lock, against the catalog as it is then: over 1,000
/// races, Lazio never publishes on a site registered to Veneto.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_another_region_is_creating_is_never_written_by_a_racing_authority() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), config()).await;
    let (_, admin) = clients(&server, Some(ADMIN)).await;
    let (_, lazio) = clients(&server, Some(LAZIO)).await;
    let day = day_ahead(3);
    let mut published = 0;
    for index in 0..1_000 {
        let site_id = format!("race-{index}");
        let (mut veneto, mut lazio) = (admin.clone(), lazio.clone());
        let schedule = publish_request(&site_id, "vax", (&day, &day), ("09:00", "10:00"), 30, 1);
        let creating =
            tokio::spawn(async move { veneto.upsert_site(site(&site_id, "veneto")).await });
        let racing = tokio::spawn(async move { lazio.publish_schedule(schedule).await });
        creating
            .await
            .unwrap()
            .expect("a site registered to Veneto");
        match racing.await.unwrap() {
            Ok(_) => published += 1,
            Err(status) => assert_eq!(status.code(), Code::PermissionDenied, "{status:?}"),
        }
    }
    assert_eq!(published, 0, "Lazio published on Veneto's sites");
    let mut admin = admin;
    let stats = admin
        .get_site_stats(proto::GetSiteStatsRequest {
            site_id: "race-999".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.slots, 0);
    server.stop().await;
}

/// A region-scoped authority learns nothing of other regions' site ids: another
/// region's site and a site that does not exist get the same answer, in every capacity
/// RPC that names a site (creating one included: new ids are an admin's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_regions_site_and_an_unknown_one_look_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), config()).await;
    let (_, mut admin) = clients(&server, Some(ADMIN)).await;
    let (_, mut lazio) = clients(&server, Some(LAZIO)).await;
    admin.upsert_site(site("venice", "veneto")).await.unwrap();
    let day = day_ahead(3);
    let mut answers = Vec::new();
    for site_id in ["venice", "nowhere"] {
        let schedule = publish_request(site_id, "vax", (&day, &day), ("09:00", "10:00"), 30, 1);
        let published = lazio.publish_schedule(schedule).await.unwrap_err();
        let stats = lazio
            .get_site_stats(proto::GetSiteStatsRequest {
                site_id: site_id.into(),
            })
            .await
            .unwrap_err();
        let closed = lazio
            .close_slots(proto::CloseSlotsRequest {
                site_id: site_id.into(),
                from: at_s(0),
                to: at_s(4_000_000_000),
                reason: "probe".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        let upserted = lazio.upsert_site(site(site_id, "lazio")).await.unwrap_err();
        let row = proto::CapacityRow {
            site: site(site_id, "lazio").site,
            service_id: "vax".into(),
            first_day: day.clone(),
            last_day: day.clone(),
            weekdays: (1..=7).collect(),
            opens: "09:00".into(),
            closes: "10:00".into(),
            slot_minutes: 30,
            capacity_per_slot: 1,
            line: 2,
        };
        let import = proto::ImportCapacityRequest {
            rows: vec![row],
            dry_run: true,
            ..Default::default()
        };
        let imported = lazio
            .import_capacity(tokio_stream::iter([import]))
            .await
            .unwrap_err();
        let capacity_set = lazio
            .set_slot_capacity(proto::SetSlotCapacityRequest {
                slot_id: format!("{site_id}/vax/4102444800"),
                capacity: 3,
                ..Default::default()
            })
            .await
            .unwrap_err();
        let exported = lazio
            .export_bookings(proto::ExportBookingsRequest {
                scope: Some(proto::export_bookings_request::Scope::SiteId(
                    site_id.into(),
                )),
            })
            .await
            .unwrap_err();
        answers.push(
            [
                published,
                stats,
                closed,
                upserted,
                imported,
                capacity_set,
                exported,
            ]
            .map(|status| (status.code(), status.message().to_string())),
        );
    }
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0][0].0, Code::PermissionDenied);
    server.stop().await;
}

/// An authority's event watch shows the sites of its regions only, checked at every
/// event: a site an admin moves to another region stops showing at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authority_watches_the_events_of_its_own_regions_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), config()).await;
    let (_, mut admin) = clients(&server, Some(ADMIN)).await;
    let (_, mut lazio) = clients(&server, Some(LAZIO)).await;
    let (mut web, _) = clients(&server, Some(FRONTEND)).await;
    let day = day_ahead(30);
    let mut slot_of = std::collections::HashMap::new();
    for (site_id, region) in [("rome", "lazio"), ("venice", "veneto")] {
        admin.upsert_site(site(site_id, region)).await.unwrap();
        let schedule = publish_request(site_id, "vax", (&day, &day), ("09:00", "09:30"), 30, 5);
        admin.publish_schedule(schedule).await.unwrap();
        let search = proto::SearchSlotsRequest {
            scope: Some(proto::search_slots_request::Scope::SiteId(site_id.into())),
            service_id: "vax".into(),
            from: at_s(chrono::Utc::now().timestamp()),
            to: at_s(chrono::Utc::now().timestamp() + 40 * 86_400),
            ..Default::default()
        };
        let slots = web.search_slots(search).await.unwrap().into_inner().slots;
        slot_of.insert(site_id, slots[0].slot_id.clone());
    }
    let watch = |scope| proto::WatchEventsRequest {
        scope,
        after_sequence: 0,
        log_id: String::new(),
    };
    let mut stream = lazio.watch_events(watch(None)).await.unwrap().into_inner();
    denied(
        lazio
            .watch_events(watch(Some(proto::watch_events_request::Scope::RegionId(
                "veneto".into(),
            ))))
            .await,
    );
    // Rome moves to Veneto: from then on its events are no longer Lazio's.
    admin.upsert_site(site("rome", "veneto")).await.unwrap();
    for (n, site_id) in ["venice", "rome", "venice", "rome"].iter().enumerate() {
        let citizen = format!("citizen-{n}");
        let request = book_request(&slot_of[site_id], &citizen, &citizen);
        web.book(request).await.unwrap();
    }
    admin.upsert_site(site("ostia", "lazio")).await.unwrap();
    let schedule = publish_request("ostia", "vax", (&day, &day), ("09:00", "09:30"), 30, 5);
    admin.publish_schedule(schedule).await.unwrap();
    admin
        .set_slot_capacity(proto::SetSlotCapacityRequest {
            slot_id: slot_of["rome"].replace("rome", "ostia"),
            capacity: 7,
            request_id: String::new(),
        })
        .await
        .unwrap();
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), stream.message())
        .await
        .expect("an event comes")
        .unwrap()
        .unwrap()
        .event
        .unwrap();
    // Nothing of Venice, nothing of Rome since it left: only Ostia's capacity change.
    assert_eq!(first.site_id, "ostia", "{first:?}");
    assert_eq!(first.kind(), proto::EventKind::CapacityChanged);
    let more = tokio::time::timeout(std::time::Duration::from_millis(300), stream.message()).await;
    assert!(more.is_err(), "no other event is Lazio's: {more:?}");
    server.stop().await;
}

/// A campaign's counts and its registrations' export are for the authorities of its
/// region (and admins): another region's authority and a frontend are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaigns_stats_and_registrations_are_for_its_regions_authorities() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), config()).await;
    let (_, mut admin) = clients(&server, Some(ADMIN)).await;
    let (_, mut lazio) = clients(&server, Some(LAZIO)).await;
    let (_, mut veneto) = clients(&server, Some(VENETO)).await;
    let (_, mut web) = clients(&server, Some(FRONTEND)).await;
    admin
        .upsert_campaign(proto::UpsertCampaignRequest {
            campaign: Some(open_campaign("veneto-vax", "veneto")),
            request_id: String::new(),
        })
        .await
        .expect("an admin creates a campaign");
    let stats = || proto::GetCampaignStatsRequest {
        campaign_id: "veneto-vax".into(),
    };
    let export = || proto::ExportRegistrationsRequest {
        campaign_id: "veneto-vax".into(),
    };
    for client in [&mut lazio, &mut web] {
        denied(client.get_campaign_stats(stats()).await);
        denied(client.export_registrations(export()).await);
    }
    veneto
        .get_campaign_stats(stats())
        .await
        .expect("own region");
    let mut exported = veneto
        .export_registrations(export())
        .await
        .expect("own region")
        .into_inner();
    assert!(
        exported.message().await.expect("a stream").is_none(),
        "none yet"
    );
    admin
        .export_registrations(export())
        .await
        .expect("an admin");
    server.stop().await;
}

/// Two authorities' stalled imports: one holds at most `imports_per_token_max` places of
/// the imports' pool, the other still gets the rest, and past `imports_max` everyone's
/// next import is shed until one ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_authority_cannot_take_every_import_place() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config();
    config.limits.imports_max = 3;
    config.limits.imports_per_token_max = 2;
    let server = TestServer::start_with(dir.path(), config).await;
    let mut lazio = Vec::new();
    for _ in 0..3 {
        lazio.push(stalled_import(&server, Some(LAZIO)).await);
    }
    let refused = first_finished(&mut lazio).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(reason(&refused).as_deref(), Some("OVERLOADED"));
    // Veneto's two: whichever arrives second finds the pool full (imports_max).
    let mut veneto = Vec::new();
    for _ in 0..2 {
        veneto.push(stalled_import(&server, Some(VENETO)).await);
    }
    let refused = first_finished(&mut veneto).await.unwrap_err();
    assert_eq!(
        refused.code(),
        Code::Unavailable,
        "imports_max: {refused:?}"
    );
    let (veneto_rows, veneto) = veneto.remove(0);
    assert!(!veneto.is_finished(), "another authority's import is held");
    assert!(lazio.iter().all(|(_, call)| !call.is_finished()));
    let (ended_rows, ended) = lazio.remove(0);
    drop(ended_rows);
    let served = ended.await.unwrap().unwrap_err();
    assert_eq!(
        served.code(),
        Code::InvalidArgument,
        "no rows: served, not shed"
    );
    let (again_rows, again) = stalled_import(&server, Some(VENETO)).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!again.is_finished(), "admitted in the place given back");
    for (rows, call) in lazio
        .into_iter()
        .chain([(veneto_rows, veneto), (again_rows, again)])
    {
        drop(rows);
        let served = call.await.unwrap().unwrap_err();
        assert_eq!(served.code(), Code::InvalidArgument, "{served:?}");
    }
    server.stop().await;
}

/// One frontend could hold every `WatchAvailability` place (`watch_subscribers_max`),
/// and another frontend's citizens then watched nothing. Now a token holds at most
/// `watch_subscribers_per_token_max` of them; another token still gets the rest, and a
/// watch that ends gives its token's place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_frontend_cannot_take_every_availability_watch() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config();
    config.limits.watch_subscribers_max = 3;
    config.limits.watch_subscribers_per_token_max = 2;
    let server = TestServer::start_with(dir.path(), config).await;
    let (mut web, _) = clients(&server, Some(FRONTEND)).await;
    let (mut ops, mut admin) = clients(&server, Some(ADMIN)).await;
    admin.upsert_site(site("rome", "lazio")).await.unwrap();
    let day = day_ahead(1);
    let publish = publish_request("rome", "vax", (&day, &day), ("10:00", "11:00"), 30, 2);
    admin.publish_schedule(publish).await.unwrap();
    let watch = || proto::WatchAvailabilityRequest {
        scope: Some(proto::watch_availability_request::Scope::SiteId(
            "rome".into(),
        )),
        service_id: "vax".into(),
        ..Default::default()
    };
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(
            web.watch_availability(watch())
                .await
                .expect("within its share"),
        );
    }
    let status = web.watch_availability(watch()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status).as_deref(), Some("WATCHERS_EXHAUSTED"));
    let _other = ops
        .watch_availability(watch())
        .await
        .expect("another token");
    let status = ops.watch_availability(watch()).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "watch_subscribers_max"
    );
    drop(held.pop());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while let Err(status) = web.watch_availability(watch()).await {
        assert!(
            std::time::Instant::now() < deadline,
            "not given back: {status:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// `--token-file` wins over `PRENOTA_TOKEN` (clap used to refuse the pair as if both
/// were typed): a wrong token in the environment, the right one in the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_wins_over_the_token_in_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), config()).await;
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{ADMIN}\n")).unwrap();
    let call = |with_file: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_prenota"));
        command.args(["call", "--server", &server.url()]);
        if with_file {
            command.arg("--token-file").arg(&file);
        }
        let output = command
            .arg("prenota.v1.CapacityService/ExportAuditLog")
            .env("PRENOTA_TOKEN", "not-a-token-0123456789")
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.success(), said)
    };
    let (ok, said) = call(false);
    assert!(!ok && said.contains("UNAUTHENTICATED"), "{said}");
    let (ok, said) = call(true);
    assert!(ok, "{said}");
    server.stop().await;
}
