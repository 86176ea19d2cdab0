//! What verifying a citizen assertion costs per request (issue #13): one EdDSA or ES256
//! signature check plus the claims, as `Assertions::verify` does it for every call that
//! names a citizen; and EdDSA with many requests in flight, whose signatures the
//! verifier thread checks in batches. Run: `cargo bench --bench assertion`. Numbers:
//! BENCHMARKS.md.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use prenota::config::{CitizenIssuerEntry, ConfigFile};
use prenota::grpc::assertion::Assertions;
use rcgen::KeyPair;
use tonic::metadata::MetadataMap;

const NOW: i64 = 1_800_000_000;

/// Verifies with `key`'s issuer; remembers up to `remembered_max` assertions.
fn issuer_assertions(key: &KeyPair, remembered_max: usize) -> Assertions {
    let file = ConfigFile {
        citizen_issuers: vec![CitizenIssuerEntry {
            name: "gateway".into(),
            audience: "prenota".into(),
            public_key_pem: key.public_key_pem(),
        }],
        ..ConfigFile::default()
    };
    let config = file.check().expect("config");
    Assertions::new(&config.citizen_issuers, 900, remembered_max).expect("verifier")
}

/// Request metadata carrying `sub`'s assertion, signed by `key`.
fn signed(key: &KeyPair, algorithm: Algorithm, sub: &str) -> MetadataMap {
    let claims = serde_json::json!({
        "iss": "gateway", "aud": "prenota", "sub": sub, "iat": NOW, "exp": NOW + 600,
    });
    let pem = key.serialize_pem();
    let signing = match algorithm {
        Algorithm::EdDSA => EncodingKey::from_ed_pem(pem.as_bytes()),
        _ => EncodingKey::from_ec_pem(pem.as_bytes()),
    }
    .expect("signing key");
    let token = encode(&Header::new(algorithm), &claims, &signing).expect("token");
    let mut metadata = MetadataMap::new();
    metadata.insert("x-citizen-assertion", token.parse().expect("ascii"));
    metadata
}

fn verify(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut group = c.benchmark_group("citizen_assertion_verify");
    for (name, algorithm, key) in [
        (
            "eddsa",
            Algorithm::EdDSA,
            KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key"),
        ),
        (
            "es256",
            Algorithm::ES256,
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key"),
        ),
    ] {
        let metadata = signed(&key, algorithm, "RSSMRA80A01H501U");
        // Nothing remembered: every call pays the signature check.
        let assertions = issuer_assertions(&key, 0);
        group.bench_function(name, |b| {
            b.iter(|| {
                black_box(runtime.block_on(assertions.verify(&metadata, NOW + 1))).expect("valid")
            })
        });
        // The same assertion again: remembered, no signature check.
        let remembering = issuer_assertions(&key, 1_024);
        group.bench_function(format!("{name}_remembered"), |b| {
            b.iter(|| {
                black_box(runtime.block_on(remembering.verify(&metadata, NOW + 1))).expect("valid")
            })
        });
    }
    group.finish();
}

/// `in_flight` citizens' assertions verified at once (a rush): their Ed25519 signatures
/// meet on the verifier thread, which checks them in batches. Time per assertion.
fn verify_in_flight(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
    let assertions = issuer_assertions(&key, 0);
    let mut group = c.benchmark_group("citizen_assertion_verify_in_flight");
    for in_flight in [1usize, 16, 256] {
        let citizens: Arc<[MetadataMap]> = (0..in_flight)
            .map(|i| signed(&key, Algorithm::EdDSA, &format!("CITIZEN{i}")))
            .collect();
        group.throughput(Throughput::Elements(in_flight as u64));
        group.bench_function(format!("eddsa_{in_flight}"), |b| {
            b.iter(|| runtime.block_on(all_verified(&assertions, &citizens)))
        });
    }
    group.finish();
}

async fn all_verified(assertions: &Assertions, citizens: &Arc<[MetadataMap]>) {
    let tasks: Vec<_> = (0..citizens.len())
        .map(|i| {
            let (assertions, citizens) = (assertions.clone(), Arc::clone(citizens));
            tokio::spawn(async move { assertions.verify(&citizens[i], NOW + 1).await })
        })
        .collect();
    for task in tasks {
        task.await.expect("task").expect("valid");
    }
}

criterion_group!(benches, verify, verify_in_flight);
criterion_main!(benches);
