//! What verifying a citizen assertion costs per request (issue #13): one EdDSA or ES256
//! signature check plus the claims, as `Assertions::verify` does it for every call that
//! names a citizen. Run: `cargo bench --bench assertion`. Numbers: BENCHMARKS.md.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use prenota::config::{CitizenIssuerEntry, ConfigFile};
use prenota::grpc::assertion::Assertions;
use rcgen::KeyPair;
use tonic::metadata::MetadataMap;

fn verify(c: &mut Criterion) {
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
        let file = ConfigFile {
            citizen_issuers: vec![CitizenIssuerEntry {
                name: "gateway".into(),
                audience: "prenota".into(),
                public_key_pem: key.public_key_pem(),
            }],
            ..ConfigFile::default()
        };
        let config = file.check().expect("config");
        // Nothing remembered: every call pays the signature check.
        let assertions = Assertions::new(&config.citizen_issuers, 900, 0);
        let now = 1_800_000_000i64;
        let claims = serde_json::json!({
            "iss": "gateway", "aud": "prenota", "sub": "RSSMRA80A01H501U",
            "iat": now, "exp": now + 600,
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
        group.bench_function(name, |b| {
            b.iter(|| black_box(assertions.verify(&metadata, now + 1)).expect("valid"))
        });
        // The same assertion again: remembered, no signature check.
        let remembering = Assertions::new(&config.citizen_issuers, 900, 1_024);
        group.bench_function(format!("{name}_remembered"), |b| {
            b.iter(|| black_box(remembering.verify(&metadata, now + 1)).expect("valid"))
        });
    }
    group.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
