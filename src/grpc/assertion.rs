//! Signed citizen assertions (PRODUCT.md part A): a frontend whose token is `asserted`
//! sends, on every call that names a citizen, `x-citizen-assertion: <compact JWS>`
//! issued by an identity gateway; the citizen is its `sub`. EdDSA or ES256 only (never
//! `none` or HMAC), against every key configured for the issuer and audience
//! (rotation); its times against the engine's clock.
//!
//! The header and claims are decoded by the `jsonwebtoken` crate; the signature over
//! the JWS signing input is checked by `ed25519_dalek` in batches across the requests
//! in flight (`signature_batch.rs`; the curve arithmetic is most of an asserted call's
//! cost) or, for ES256, by `jsonwebtoken::crypto::verify`. Issuer, audience, times and
//! the header's `crit` are checked here, before the signature: a claim that fails costs
//! no signature check, and nothing is accepted unless every check holds.
//!
//! Must not import sled.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, Header};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;

use crate::config::CitizenIssuer;
use crate::grpc::signature_batch::{Check, SignatureBatches};

/// The metadata key that carries the assertion.
pub const ASSERTION_HEADER: &str = "x-citizen-assertion";

use crate::limits::{
    ASSERTION_BYTES_MAX, ASSERTION_CLOCK_SKEW_S, ASSERTION_REMEMBERED_BYTES_MAX,
    ASSERTION_REMEMBERED_NAMES_MAX,
};

/// Who an assertion says the caller acts for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssertedCitizen {
    /// The citizen id (`sub`), before the id scheme canonicalises it.
    pub sub: String,
    pub birth_year: Option<i32>,
    pub groups: Vec<String>,
    /// Citizen ids the subject may book for (group bookings).
    pub dependants: Vec<String>,
}

#[derive(Deserialize)]
struct Claims {
    iss: String,
    aud: Audience,
    sub: String,
    iat: i64,
    exp: i64,
    #[serde(default)]
    nbf: Option<i64>,
    #[serde(default)]
    birth_year: Option<i32>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    dependants: Vec<String>,
}

/// RFC 7519 `aud`: one audience or several.
#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Several(Vec<String>),
}

impl Audience {
    fn includes(&self, audience: &str) -> bool {
        match self {
            Audience::One(one) => one == audience,
            Audience::Several(several) => several.iter().any(|one| one == audience),
        }
    }
}

/// Why an assertion was refused: the message of CITIZEN_ASSERTION_INVALID. It says what
/// is wrong with what the client sent (never a value from it), so an integrator can
/// tell an expired assertion from a wrong audience without the server's logs.
pub type Refusal = &'static str;

/// A compact JWS taken apart, nothing of it verified yet.
struct Jws<'a> {
    header: Header,
    claims: Claims,
    /// `header.payload`, what the signature signs.
    signing_input: &'a str,
    /// The signature, base64url.
    signature: &'a str,
}

impl<'a> Jws<'a> {
    fn parse(token: &'a str) -> Result<Self, Refusal> {
        let parts: Vec<&str> = token.split('.').collect();
        let [header, payload, signature] = parts[..] else {
            return Err("the assertion is not a compact JWS (three parts)");
        };
        let signing_input = &token[..header.len() + 1 + payload.len()];
        // jsonwebtoken reads the same two parts; it knows no `alg` "none".
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| "the assertion's header does not decode as a JWS header")?;
        // No extension is understood, so none that must be (RFC 7515 4.1.11) is accepted.
        if header.crit.is_some() {
            return Err("the assertion's header has crit parameters");
        }
        let claims = jsonwebtoken::dangerous::insecure_decode_claims(token)
            // Not the decoder's words: they quote the value (a citizen id, a birth year).
            .map_err(|_| "the assertion's claims do not decode as the contract's claims")?;
        Ok(Self {
            header,
            claims,
            signing_input,
            signature,
        })
    }
}

/// Verified assertions by the SHA-256 of their text, with their `exp`: a citizen's
/// hold, book and list within one assertion's lifetime pay one signature check.
type Verified = HashMap<[u8; 32], (AssertedCitizen, i64)>;

/// The configured issuers, shared by every handler.
#[derive(Clone, Default)]
pub struct Assertions {
    issuers: Arc<[CitizenIssuer]>,
    lifetime_max_s: i64,
    verified: Arc<Mutex<Verified>>,
    /// Bound on `verified`: when full, expired entries go, and if it is still full, all.
    verified_max: usize,
    /// The Ed25519 verifier thread; `None` when no issuer has an Ed25519 key.
    batches: Option<SignatureBatches>,
    /// When each of `issuers` last verified an assertion (Unix seconds; 0: never).
    /// Batches check with the most recent key of an issuer first: after a rotation,
    /// the new one.
    last_verified: Arc<[AtomicI64]>,
}

impl Assertions {
    /// Starts the verifier thread if an issuer has an Ed25519 key.
    pub fn new(
        issuers: &[CitizenIssuer],
        lifetime_max_s: u32,
        verified_max: usize,
    ) -> std::io::Result<Self> {
        let ed25519 = issuers.iter().any(|issuer| issuer.ed25519.is_some());
        Ok(Self {
            issuers: issuers.into(),
            lifetime_max_s: i64::from(lifetime_max_s),
            verified: Arc::default(),
            verified_max,
            batches: ed25519.then(SignatureBatches::start).transpose()?,
            last_verified: issuers.iter().map(|_| AtomicI64::new(0)).collect(),
        })
    }

    /// How many verified assertions are remembered.
    pub fn verified_count(&self) -> usize {
        self.remembered().len()
    }

    fn remembered(&self) -> std::sync::MutexGuard<'_, Verified> {
        // Each critical section is one map operation: a poisoned lock guards sound data.
        self.verified.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The citizen of an assertion verified before and not expired at `now_unix_s`.
    fn recall(&self, digest: &[u8; 32], now_unix_s: i64) -> Option<AssertedCitizen> {
        let remembered = self.remembered();
        let (citizen, exp) = remembered.get(digest)?;
        (*exp > now_unix_s).then(|| citizen.clone())
    }

    fn remember(&self, digest: [u8; 32], citizen: &AssertedCitizen, exp: i64, now_unix_s: i64) {
        if self.verified_max == 0 {
            return;
        }
        let mut remembered = self.remembered();
        if remembered.len() >= self.verified_max {
            remembered.retain(|_, (_, exp)| *exp > now_unix_s);
            if remembered.len() >= self.verified_max {
                remembered.clear();
            }
        }
        remembered.insert(digest, (citizen.clone(), exp));
    }

    /// The citizen the request's assertion names, or why there is none valid (the
    /// message of its CITIZEN_ASSERTION_INVALID).
    pub async fn verify(
        &self,
        metadata: &MetadataMap,
        now_unix_s: i64,
    ) -> Result<AssertedCitizen, Refusal> {
        let mut sent = metadata.get_all(ASSERTION_HEADER).iter();
        let token = sent.next().ok_or("no x-citizen-assertion was sent")?;
        // Which of two would name the citizen is anyone's guess (a frontend appending its
        // own to one a client sent): none does (an outside test).
        if sent.next().is_some() {
            return Err("more than one x-citizen-assertion was sent");
        }
        let token = token.to_str().map_err(|_| "the assertion is not ASCII")?;
        if token.len() > ASSERTION_BYTES_MAX {
            const _: () = assert!(ASSERTION_BYTES_MAX == 8 * 1024, "the message says 8 KiB");
            return Err("the assertion is longer than 8 KiB");
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(citizen) = self.recall(&digest, now_unix_s) {
            return Ok(citizen);
        }
        let jws = Jws::parse(token)?;
        let keys = self.keys_for(&jws)?;
        self.check_times(&jws.claims, now_unix_s)?;
        let signer = self.signer(&jws, &keys).await;
        let Some(signer) = signer else {
            return Err("the assertion's signature does not verify with its issuer's keys");
        };
        self.last_verified[signer].store(now_unix_s, Ordering::Relaxed);
        let claims = jws.claims;
        let citizen = AssertedCitizen {
            sub: claims.sub,
            birth_year: claims.birth_year,
            groups: claims.groups,
            dependants: claims.dependants,
        };
        let names = citizen.groups.len() + citizen.dependants.len();
        if token.len() <= ASSERTION_REMEMBERED_BYTES_MAX && names <= ASSERTION_REMEMBERED_NAMES_MAX
        {
            self.remember(digest, &citizen, claims.exp, now_unix_s);
        }
        Ok(citizen)
    }

    /// The configured keys (indexes in `issuers`) that may have signed `jws`: its
    /// issuer's, for its algorithm and one of its audiences; the last to verify first.
    fn keys_for(&self, jws: &Jws<'_>) -> Result<Vec<usize>, Refusal> {
        if ![Algorithm::EdDSA, Algorithm::ES256].contains(&jws.header.alg) {
            return Err("the assertion's alg is neither EdDSA nor ES256");
        }
        let mut keys: Vec<usize> = (0..self.issuers.len())
            .filter(|&i| self.issuers[i].name == jws.claims.iss)
            .filter(|&i| self.issuers[i].algorithm == jws.header.alg)
            .filter(|&i| jws.claims.aud.includes(&self.issuers[i].audience))
            .collect();
        keys.sort_by_key(|&i| std::cmp::Reverse(self.last_verified[i].load(Ordering::Relaxed)));
        if keys.is_empty() {
            return Err(
                "no configured issuer has a key for the assertion's iss, alg and aud together",
            );
        }
        Ok(keys)
    }

    /// `exp`, `nbf`, `iat` and the lifetime against `now_unix_s`; a named citizen.
    fn check_times(&self, claims: &Claims, now_unix_s: i64) -> Result<(), Refusal> {
        if claims.exp <= now_unix_s {
            return Err("the assertion has expired (exp)");
        }
        if claims
            .nbf
            .is_some_and(|nbf| nbf > now_unix_s + ASSERTION_CLOCK_SKEW_S)
        {
            return Err("the assertion is not valid yet (nbf)");
        }
        let lifetime = claims.exp.checked_sub(claims.iat);
        let lifetime_ok = lifetime.is_some_and(|s| (0..=self.lifetime_max_s).contains(&s));
        if claims.iat > now_unix_s + ASSERTION_CLOCK_SKEW_S || !lifetime_ok {
            return Err(
                "the assertion's iat is in the future, or exp - iat is negative or over \
                 citizen_assertion_lifetime_seconds_max",
            );
        }
        if claims.sub.is_empty() {
            return Err("the assertion names no citizen (sub)");
        }
        Ok(())
    }

    /// Which of `keys` (all of `jws`'s algorithm) signed `jws`, if one did.
    async fn signer(&self, jws: &Jws<'_>, keys: &[usize]) -> Option<usize> {
        let message = jws.signing_input.as_bytes();
        if jws.header.alg != Algorithm::EdDSA {
            return keys.iter().copied().find(|&i| {
                let issuer = &self.issuers[i];
                jsonwebtoken::crypto::verify(jws.signature, message, &issuer.key, issuer.algorithm)
                    .unwrap_or(false)
            });
        }
        debug_assert!(self.batches.is_some(), "keys_for found an Ed25519 key");
        let batches = self.batches.as_ref()?;
        let signature = URL_SAFE_NO_PAD.decode(jws.signature).ok()?;
        let check = Check {
            message: message.to_vec(),
            signature: ed25519_dalek::Signature::from_slice(&signature).ok()?,
            keys: keys
                .iter()
                .filter_map(|&i| self.issuers[i].ed25519)
                .collect(),
        };
        debug_assert_eq!(
            check.keys.len(),
            keys.len(),
            "EdDSA keys have an Ed25519 key"
        );
        batches.verify(check).await.map(|k| keys[k])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CitizenIssuerEntry, ConfigFile};
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

    fn signed(key: &rcgen::KeyPair, sub: &str, now: i64) -> MetadataMap {
        let claims = serde_json::json!({
            "iss": "gw", "aud": "prenota", "sub": sub, "iat": now, "exp": now + 600,
        });
        carrying(&token(key, Header::new(Algorithm::EdDSA), &claims))
    }

    fn token(key: &rcgen::KeyPair, header: Header, claims: &serde_json::Value) -> String {
        let signing = EncodingKey::from_ed_pem(key.serialize_pem().as_bytes()).unwrap();
        encode(&header, claims, &signing).unwrap()
    }

    fn carrying(token: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert(ASSERTION_HEADER, token.parse().unwrap());
        metadata
    }

    #[tokio::test]
    async fn two_assertions_in_one_call_are_refused() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let now = 1_800_000_000;
        let assertions = assertions(&key, 0);
        let mut both = signed(&key, "BOT", now);
        let victim = signed(&key, "ALICE", now);
        let second = victim.get(ASSERTION_HEADER).unwrap().clone();
        both.append(ASSERTION_HEADER, second);
        let refused = assertions.verify(&both, now).await.unwrap_err();
        assert!(refused.contains("more than one"), "{refused}");
        assert!(assertions.verify(&victim, now).await.is_ok());
    }

    #[tokio::test]
    async fn after_a_rotation_the_new_key_is_tried_first() {
        let old = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let new = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let entry = |key: &rcgen::KeyPair| CitizenIssuerEntry {
            name: "gw".into(),
            audience: "prenota".into(),
            public_key_pem: key.public_key_pem(),
        };
        let file = ConfigFile {
            citizen_issuers: vec![entry(&old), entry(&new)],
            ..ConfigFile::default()
        };
        let assertions = Assertions::new(&file.check().unwrap().citizen_issuers, 900, 0).unwrap();
        let now = 1_800_000_000;
        let by_new = signed(&new, "ALICE", now);
        let token = by_new.get(ASSERTION_HEADER).unwrap().to_str().unwrap();
        let jws = Jws::parse(token).unwrap();
        assert_eq!(assertions.keys_for(&jws).unwrap(), [0, 1]);
        assert!(assertions.verify(&by_new, now).await.is_ok());
        assert_eq!(assertions.keys_for(&jws).unwrap(), [1, 0]);
        assert!(assertions
            .verify(&signed(&old, "BOB", now), now + 1)
            .await
            .is_ok());
        assert_eq!(assertions.keys_for(&jws).unwrap(), [0, 1]);
    }

    #[tokio::test]
    async fn audiences_crit_headers_and_swapped_payloads() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let now = 1_800_000_000;
        let assertions = assertions(&key, 0);
        let claims = |aud: serde_json::Value| serde_json::json!({"iss": "gw", "aud": aud, "sub": "ALICE", "iat": now, "exp": now + 600});
        let eddsa = || Header::new(Algorithm::EdDSA);
        let listed = token(
            &key,
            eddsa(),
            &claims(serde_json::json!(["other", "prenota"])),
        );
        assert!(assertions.verify(&carrying(&listed), now).await.is_ok());
        let elsewhere = token(&key, eddsa(), &claims(serde_json::json!(["other"])));
        assert!(assertions.verify(&carrying(&elsewhere), now).await.is_err());
        let mut critical = eddsa();
        critical.crit = Some(vec!["exp".into()]);
        let critical = token(&key, critical, &claims("prenota".into()));
        assert!(assertions.verify(&carrying(&critical), now).await.is_err());
        // Bob's claims under Alice's signature.
        let alice = token(&key, eddsa(), &claims("prenota".into()));
        let bob = token(
            &key,
            eddsa(),
            &claims(serde_json::json!(["prenota", "bob"])),
        );
        let alice_parts: Vec<&str> = alice.split('.').collect();
        let bob_parts: Vec<&str> = bob.split('.').collect();
        let swapped = [alice_parts[0], bob_parts[1], alice_parts[2]].join(".");
        assert!(assertions.verify(&carrying(&alice), now).await.is_ok());
        assert!(assertions.verify(&carrying(&swapped), now).await.is_err());
    }

    fn assertions(key: &rcgen::KeyPair, remembered_max: usize) -> Assertions {
        let file = ConfigFile {
            citizen_issuers: vec![CitizenIssuerEntry {
                name: "gw".into(),
                audience: "prenota".into(),
                public_key_pem: key.public_key_pem(),
            }],
            ..ConfigFile::default()
        };
        Assertions::new(&file.check().unwrap().citizen_issuers, 900, remembered_max).unwrap()
    }

    #[tokio::test]
    async fn a_remembered_assertion_still_expires_and_memory_stays_bounded() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let now = 1_800_000_000;
        let assertions = assertions(&key, 2);
        let alice = signed(&key, "ALICE", now);
        assert_eq!(assertions.verify(&alice, now).await.unwrap().sub, "ALICE");
        assert_eq!(
            assertions.verify(&alice, now + 1).await.unwrap().sub,
            "ALICE"
        );
        assert_eq!(assertions.verified_count(), 1);
        assert!(
            assertions.verify(&alice, now + 600).await.is_err(),
            "expired, remembered or not"
        );
        for (index, sub) in ["BOB", "CAROL", "DAVE"].iter().enumerate() {
            let metadata = signed(&key, sub, now + index as i64);
            assertions.verify(&metadata, now + 10).await.unwrap();
            assert!(assertions.verified_count() <= 2);
        }
    }

    /// An assertion of more than `ASSERTION_REMEMBERED_BYTES_MAX` (long groups), or
    /// naming more than `ASSERTION_REMEMBERED_NAMES_MAX` groups (short ones), is
    /// verified, but not remembered: the remembered ones stay small.
    #[tokio::test]
    async fn a_large_assertion_is_verified_each_time_not_remembered() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let now = 1_800_000_000;
        let assertions = assertions(&key, 8);
        let groups: Vec<String> = (0..100).map(|i| format!("group-number-{i}")).collect();
        let claims = serde_json::json!({
            "iss": "gw", "aud": "prenota", "sub": "ALICE", "iat": now, "exp": now + 600,
            "groups": groups,
        });
        let large = token(&key, Header::new(Algorithm::EdDSA), &claims);
        assert!(large.len() > ASSERTION_REMEMBERED_BYTES_MAX);
        assert!(large.len() <= ASSERTION_BYTES_MAX);
        for _ in 0..2 {
            let citizen = assertions.verify(&carrying(&large), now).await.unwrap();
            assert_eq!(citizen.groups.len(), 100);
        }
        assert_eq!(assertions.verified_count(), 0);
        let short: Vec<String> = (0..40).map(|i| format!("g{i}")).collect();
        let claims = serde_json::json!({
            "iss": "gw", "aud": "prenota", "sub": "CAROL", "iat": now, "exp": now + 600,
            "groups": short,
        });
        let many = token(&key, Header::new(Algorithm::EdDSA), &claims);
        assert!(many.len() <= ASSERTION_REMEMBERED_BYTES_MAX);
        assertions.verify(&carrying(&many), now).await.unwrap();
        assert_eq!(assertions.verified_count(), 0);
        assertions
            .verify(&signed(&key, "BOB", now), now)
            .await
            .unwrap();
        assert_eq!(assertions.verified_count(), 1);
    }
}
