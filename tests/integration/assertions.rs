//! Signed citizen assertions (#13, PRODUCT.md part A) on a real server: with
//! `[[citizen_issuers]]` configured, every call that names a citizen needs a valid
//! `x-citizen-assertion` (EdDSA or ES256, the issuer's audience, in time), and acts for
//! its `sub`.

use crate::common;

use common::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use prenota::config::{CitizenIssuerEntry, ConfigFile};
use prenota::proto;
use rcgen::KeyPair;
use serde_json::json;
use tonic::{Code, Request, Status};

const AUDIENCE: &str = "prenota-test";

struct Keys {
    spid_old: KeyPair,
    spid_new: KeyPair,
    cie: KeyPair,
    stranger: KeyPair,
}

fn keys() -> Keys {
    let ed = || KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    Keys {
        spid_old: ed(),
        spid_new: ed(),
        cie: KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        stranger: ed(),
    }
}

/// Issuer `spid` with two Ed25519 keys (rotation), issuer `cie` with a P-256 key.
fn config(keys: &Keys) -> prenota::config::Config {
    let issuer = |name: &str, key: &KeyPair| CitizenIssuerEntry {
        name: name.into(),
        audience: AUDIENCE.into(),
        public_key_pem: key.public_key_pem(),
    };
    let file = ConfigFile {
        citizen_issuers: vec![
            issuer("spid", &keys.spid_old),
            issuer("spid", &keys.spid_new),
            issuer("cie", &keys.cie),
        ],
        ..ConfigFile::default()
    };
    file.check().expect("a valid configuration")
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A compact JWS of `claims` signed with `key` as `alg`.
fn sign(key: &KeyPair, alg: Algorithm, claims: serde_json::Value) -> String {
    let pem = key.serialize_pem();
    let key = match alg {
        Algorithm::EdDSA => EncodingKey::from_ed_pem(pem.as_bytes()).unwrap(),
        _ => EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
    };
    encode(&Header::new(alg), &claims, &key).unwrap()
}

fn claims(iss: &str, sub: &str) -> serde_json::Value {
    json!({"iss": iss, "aud": AUDIENCE, "sub": sub, "iat": now(), "exp": now() + 600})
}

fn with_assertion<T>(message: T, assertion: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("x-citizen-assertion", assertion.parse().unwrap());
    request
}

/// `status` is CITIZEN_ASSERTION_INVALID and its message names the `cause`.
fn invalid(status: Status, cause: &str) {
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(
        reason(&status).as_deref(),
        Some("CITIZEN_ASSERTION_INVALID")
    );
    assert!(status.message().contains(cause), "{cause}: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_assertions_act_for_their_subject() {
    let keys = keys();
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), config(&keys)).await;
    let slot = one_slot_site(&server, "asserted", 5).await;
    let mut client = server.booking().await;

    // EdDSA with the old key, citizen_id left empty: the subject books.
    let alice = sign(&keys.spid_old, Algorithm::EdDSA, claims("spid", "ALICE"));
    let booked = client
        .book(with_assertion(book_request(&slot, "", "a1"), &alice))
        .await
        .unwrap()
        .into_inner()
        .booking
        .unwrap();
    // The rotated key and ES256 work too; the subject's bookings are its own.
    let alice_again = sign(&keys.spid_new, Algorithm::EdDSA, claims("spid", "ALICE"));
    let listed = client
        .list_citizen_bookings(with_assertion(
            proto::ListCitizenBookingsRequest {
                citizen_id: "ALICE".into(),
                ..Default::default()
            },
            &alice_again,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.bookings[0].booking_id, booked.booking_id);
    let bob = sign(&keys.cie, Algorithm::ES256, claims("cie", "BOB"));
    client
        .book(with_assertion(book_request(&slot, "BOB", "b1"), &bob))
        .await
        .unwrap();
    // Searching names no citizen and needs no assertion.
    search_all(&mut client, "asserted", "vax").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_assertions_are_refused_and_a_mismatch_is_denied() {
    let keys = keys();
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), config(&keys)).await;
    let slot = one_slot_site(&server, "guarded", 5).await;
    let mut client = server.booking().await;
    let book = |assertion: Option<&str>| {
        let message = book_request(&slot, "ALICE", "x");
        match assertion {
            Some(assertion) => with_assertion(message, assertion),
            None => Request::new(message),
        }
    };

    let refused = client.book(book(None)).await.unwrap_err();
    invalid(refused, "no x-citizen-assertion was sent");
    let forged = sign(&keys.stranger, Algorithm::EdDSA, claims("spid", "ALICE"));
    let refused = client.book(book(Some(&forged))).await.unwrap_err();
    invalid(refused, "signature does not verify");
    let mut expired = claims("spid", "ALICE");
    expired["iat"] = json!(now() - 1_000);
    expired["exp"] = json!(now() - 10);
    let expired = sign(&keys.spid_old, Algorithm::EdDSA, expired);
    let refused = client.book(book(Some(&expired))).await.unwrap_err();
    invalid(refused, "has expired (exp)");
    let mut too_long = claims("spid", "ALICE");
    too_long["exp"] = json!(now() + 901);
    let too_long = sign(&keys.spid_old, Algorithm::EdDSA, too_long);
    let refused = client.book(book(Some(&too_long))).await.unwrap_err();
    invalid(refused, "exp - iat is negative or over");
    let mut early = claims("spid", "ALICE");
    early["nbf"] = json!(now() + 3_600);
    let early = sign(&keys.spid_old, Algorithm::EdDSA, early);
    let refused = client.book(book(Some(&early))).await.unwrap_err();
    invalid(refused, "not valid yet (nbf)");
    let mut elsewhere = claims("spid", "ALICE");
    elsewhere["aud"] = json!("another-service");
    let elsewhere = sign(&keys.spid_old, Algorithm::EdDSA, elsewhere);
    let refused = client.book(book(Some(&elsewhere))).await.unwrap_err();
    invalid(refused, "iss, alg and aud");
    let unknown = sign(&keys.spid_old, Algorithm::EdDSA, claims("nobody", "ALICE"));
    let refused = client.book(book(Some(&unknown))).await.unwrap_err();
    invalid(refused, "iss, alg and aud");
    let hmac = encode(
        &Header::new(Algorithm::HS256),
        &claims("spid", "ALICE"),
        &EncodingKey::from_secret(b"guessable-secret-of-32-bytes-long").unwrap(),
    )
    .unwrap();
    let refused = client.book(book(Some(&hmac))).await.unwrap_err();
    invalid(refused, "neither EdDSA nor ES256");
    // `alg: none`: a header and claims with an empty signature.
    let part = |value: serde_json::Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
    };
    let unsigned = format!(
        "{}.{}.",
        part(json!({"alg": "none", "typ": "JWT"})),
        part(claims("spid", "ALICE"))
    );
    let refused = client.book(book(Some(&unsigned))).await.unwrap_err();
    invalid(refused, "header does not decode");
    let not_an_id = sign(
        &keys.spid_old,
        Algorithm::EdDSA,
        claims("spid", "AL\u{7}ICE"),
    );
    let refused = client.book(book(Some(&not_an_id))).await.unwrap_err();
    invalid(refused, "sub is not a citizen id");

    // A valid assertion for ALICE cannot act for BOB.
    let alice = sign(&keys.spid_old, Algorithm::EdDSA, claims("spid", "ALICE"));
    let status = client
        .book(with_assertion(book_request(&slot, "BOB", "y"), &alice))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status).as_deref(), Some("CITIZEN_MISMATCH"));
    // A malformed id is a field error, not another citizen.
    let status = client
        .book(with_assertion(
            book_request(&slot, "AL\u{7}ICE", "z"),
            &alice,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(violated_fields(&status), ["citizen_id"]);
    assert_eq!(site_stats(&server, "guarded").await.booked, 0);
    server.stop().await;
}

/// Many citizens at once, as in a rush: their Ed25519 signatures meet in the verifier
/// thread's batches, mixed with forged ones, ones signed by the rotated key and ES256
/// ones. Each forged one is refused and each other one books: a bad signature in a
/// batch neither passes nor fails its neighbours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assertions_checked_together_are_judged_each_on_its_own() {
    let keys = keys();
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), config(&keys)).await;
    let slot = one_slot_site(&server, "rush", 100).await;
    let client = server.booking().await;
    let books = (0..80).map(|i| {
        let citizen = format!("CITIZEN{i:02}");
        let assertion = match i % 10 {
            3 => sign(&keys.stranger, Algorithm::EdDSA, claims("spid", &citizen)),
            5 => sign(&keys.cie, Algorithm::ES256, claims("cie", &citizen)),
            7 => sign(&keys.spid_new, Algorithm::EdDSA, claims("spid", &citizen)),
            _ => sign(&keys.spid_old, Algorithm::EdDSA, claims("spid", &citizen)),
        };
        let request = with_assertion(book_request(&slot, "", &format!("r{i}")), &assertion);
        let mut client = client.clone();
        tokio::spawn(async move { (i, client.book(request).await) })
    });
    let mut forged = 0;
    for book in books.collect::<Vec<_>>() {
        let (i, outcome) = book.await.unwrap();
        if i % 10 == 3 {
            invalid(outcome.unwrap_err(), "signature does not verify");
            forged += 1;
        } else {
            outcome.unwrap_or_else(|status| panic!("citizen {i}: {status:?}"));
        }
    }
    assert_eq!(forged, 8);
    assert_eq!(site_stats(&server, "rush").await.booked, 72);
    server.stop().await;
}

/// `prenota dev-assertion` signs what the server accepts (README "Citizens and identity").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dev_assertion_is_accepted() {
    let keys = keys();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("gateway.pem");
    std::fs::write(&key_file, keys.cie.serialize_pem()).unwrap();
    let server = TestServer::start_with(&dir.path().join("data"), config(&keys)).await;
    let slot = one_slot_site(&server, "dev", 5).await;
    let assertion = prenota::dev_assertion::sign(&prenota::dev_assertion::AssertionRequest {
        key: &key_file,
        issuer: "cie",
        audience: AUDIENCE,
        subject: "CAROL",
        ttl_seconds: 600,
        birth_year: Some(1980),
        groups: &["health-workers".to_string()],
        dependants: &[],
        now_unix_s: now(),
    })
    .unwrap();
    server
        .booking()
        .await
        .book(with_assertion(book_request(&slot, "", "c1"), &assertion))
        .await
        .unwrap();
    // The command line's, for a household: the subject and its dependant, in one group.
    let signed = std::process::Command::new(env!("CARGO_BIN_EXE_prenota"))
        .arg("dev-assertion")
        .arg("--key")
        .arg(&key_file)
        .args(["--iss", "cie", "--aud", AUDIENCE, "--sub", "DAN"])
        .args(["--dependant", "KID"])
        .output()
        .unwrap();
    assert!(signed.status.success(), "{:?}", signed);
    let household = String::from_utf8(signed.stdout).unwrap();
    let booked = server
        .booking()
        .await
        .book_group(with_assertion(
            proto::BookGroupRequest {
                slot_id: slot.clone(),
                citizen_ids: vec!["DAN".into(), "KID".into()],
                request_id: "g1".into(),
            },
            household.trim(),
        ))
        .await
        .expect("the subject and its dependant");
    assert_eq!(booked.into_inner().bookings.len(), 2);
    server.stop().await;
}

/// A campaign's eligibility comes from the assertion (its birth year and groups), never
/// from the request, which any frontend could fill in as it likes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_takes_birth_year_and_groups_from_the_assertion() {
    let keys = keys();
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), config(&keys)).await;
    one_slot_site(&server, "asserted-campaign", 5).await;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let at = |ms: i64| at_s(ms / 1_000);
    server
        .capacity()
        .await
        .upsert_campaign(proto::UpsertCampaignRequest {
            campaign: Some(proto::Campaign {
                campaign_id: "c".into(),
                service_id: "vax".into(),
                region_id: "test-region".into(),
                waves: vec![
                    proto::Wave {
                        wave_id: "born-by-1950".into(),
                        opens_at: at(now_ms + 3_600_000),
                        birth_year_max: 1950,
                        ..Default::default()
                    },
                    proto::Wave {
                        wave_id: "carers".into(),
                        opens_at: at(now_ms + 3_600_000),
                        priority_groups: vec!["carer".into()],
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .expect("campaign");
    let mut client = server.booking().await;
    let register = |citizen: &'static str, asserted: serde_json::Value| {
        let mut claimed = claims("spid", citizen);
        for (key, value) in asserted.as_object().unwrap() {
            claimed[key] = value.clone();
        }
        let assertion = sign(&keys.spid_old, Algorithm::EdDSA, claimed);
        let request = proto::PreRegisterRequest {
            campaign_id: "c".into(),
            citizen_id: citizen.into(),
            // What the frontend says is ignored for an asserted citizen.
            birth_year: 1930,
            priority_groups: vec!["carer".into()],
            request_id: format!("register-{citizen}"),
            ..Default::default()
        };
        let mut client = client.clone();
        async move {
            client
                .pre_register(with_assertion(request, &assertion))
                .await
                .expect("registered")
                .into_inner()
                .registration
                .unwrap()
                .wave_id
        }
    };
    assert_eq!(
        register("ALICE", json!({"birth_year": 1940})).await,
        "born-by-1950"
    );
    let groups = json!({"birth_year": 1990, "groups": ["carer", "not a group name!"]});
    assert_eq!(register("BOB", groups).await, "carers");
    assert_eq!(
        register("CAROL", json!({"birth_year": 1990})).await,
        "",
        "no wave admits her"
    );
    let status = client
        .pre_register(proto::PreRegisterRequest {
            campaign_id: "c".into(),
            citizen_id: "DAVE".into(),
            request_id: "no-assertion".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    invalid(status, "no x-citizen-assertion was sent");
    // Claims a registration cannot keep whole refuse the assertion: dropping some would
    // cost the citizen the wave they are entitled to (here `carers`, the 17th group).
    let mut seventeen: Vec<String> = (0..16).map(|n| format!("g{n}")).collect();
    seventeen.push("carer".into());
    for (citizen, claimed, cause) in [
        (
            "ERIN",
            json!({"birth_year": 1990, "groups": seventeen}),
            "more than 16 groups",
        ),
        (
            "FRANK",
            json!({"birth_year": -5}),
            "birth_year is out of range",
        ),
    ] {
        let mut all = claims("spid", citizen);
        for (key, value) in claimed.as_object().unwrap() {
            all[key] = value.clone();
        }
        let assertion = sign(&keys.spid_old, Algorithm::EdDSA, all);
        let request = proto::PreRegisterRequest {
            campaign_id: "c".into(),
            citizen_id: citizen.into(),
            request_id: format!("register-{citizen}"),
            ..Default::default()
        };
        let refused = client
            .pre_register(with_assertion(request, &assertion))
            .await
            .expect_err(citizen);
        invalid(refused, cause);
    }
    server.stop().await;
}

/// A server with one 5-place slot (its id), and ALICE's assertion naming KID1 and KID2
/// as her dependants.
async fn household(dir: &std::path::Path, keys: &Keys) -> (TestServer, String, String) {
    let server = TestServer::start_with(dir, config(keys)).await;
    let slot = one_slot_site(&server, "household", 5).await;
    let mut parent = claims("spid", "ALICE");
    parent["dependants"] = json!(["KID1", "KID2"]);
    let assertion = sign(&keys.spid_old, Algorithm::EdDSA, parent);
    (server, slot, assertion)
}

/// An asserted caller books a household only of its `sub` and `dependants`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_household_is_the_subject_and_its_dependants() {
    let keys = keys();
    let dir = tempfile::tempdir().unwrap();
    let (server, slot, assertion) = household(dir.path(), &keys).await;
    let group = |citizens: &[&str], request_id: &str| proto::BookGroupRequest {
        slot_id: slot.clone(),
        citizen_ids: citizens.iter().map(|c| c.to_string()).collect(),
        request_id: request_id.into(),
    };
    let mut client = server.booking().await;
    let status = client
        .book_group(with_assertion(
            group(&["ALICE", "STRANGER"], "h1"),
            &assertion,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status).as_deref(), Some("CITIZEN_MISMATCH"));
    invalid(
        client
            .book_group(group(&["ALICE", "KID1"], "h2"))
            .await
            .unwrap_err(),
        "no x-citizen-assertion was sent",
    );
    let booked = client
        .book_group(with_assertion(
            group(&["ALICE", "KID1", "KID2"], "h3"),
            &assertion,
        ))
        .await
        .expect("the subject and its dependants")
        .into_inner()
        .bookings;
    assert_eq!(booked.len(), 3);
    server.stop().await;
}

/// A parent booking for its children only asks as itself: its request id is its own,
/// not its first child's (a child's own request of that id was refused as
/// REQUEST_ID_REUSED, and the parent's rate limit was the child's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_household_booked_for_dependants_is_the_subjects_request() {
    let keys = keys();
    let dir = tempfile::tempdir().unwrap();
    let (server, slot, parent) = household(dir.path(), &keys).await;
    let kid = sign(&keys.spid_old, Algorithm::EdDSA, claims("spid", "KID1"));
    let group = |citizens: &[&str]| proto::BookGroupRequest {
        slot_id: slot.clone(),
        citizen_ids: citizens.iter().map(|c| c.to_string()).collect(),
        request_id: "family-visit".into(),
    };
    let mut client = server.booking().await;
    let kids = client
        .book_group(with_assertion(group(&["KID1", "KID2"]), &parent))
        .await
        .expect("the dependants, without the subject")
        .into_inner()
        .bookings;
    // KID1, grown up, cancels its place and books again with the same request id.
    client
        .cancel_booking(with_assertion(
            proto::CancelBookingRequest {
                booking_id: kids[0].booking_id.clone(),
                citizen_id: "KID1".into(),
                request_id: "kid1-cancel".into(),
            },
            &kid,
        ))
        .await
        .expect("cancelled by its owner");
    let own = client
        .book_group(with_assertion(group(&["KID1"]), &kid))
        .await
        .expect("KID1's own request, not its parent's")
        .into_inner()
        .bookings;
    assert_ne!(own[0].booking_id, kids[0].booking_id);
    // The parent's retry still answers the first outcome.
    let again = client
        .book_group(with_assertion(group(&["KID1", "KID2"]), &parent))
        .await
        .expect("the parent's retry")
        .into_inner()
        .bookings;
    let ids = |bookings: &[proto::Booking]| -> Vec<String> {
        bookings.iter().map(|b| b.booking_id.clone()).collect()
    };
    assert_eq!(ids(&again), ids(&kids));
    server.stop().await;
}
