//! Signed citizen assertions (PRODUCT.md part A): a frontend whose token is `asserted`
//! sends, on every call that names a citizen, `x-citizen-assertion: <compact JWS>`
//! issued by an identity gateway; the citizen is its `sub`. Verified with the
//! `jsonwebtoken` crate (EdDSA or ES256 only; never `none` or HMAC), against every key
//! configured for the issuer (rotation), then its times against the engine's clock.
//!
//! Must not import sled.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use jsonwebtoken::{decode, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;

use crate::config::CitizenIssuer;

/// The metadata key that carries the assertion.
pub const ASSERTION_HEADER: &str = "x-citizen-assertion";

/// Largest assertion read (a JWS is a few hundred bytes).
const ASSERTION_BYTES_MAX: usize = 8 * 1024;

/// Future `iat` tolerated, for clocks that disagree a little.
const CLOCK_SKEW_S: i64 = 60;

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
}

impl Assertions {
    pub fn new(issuers: &[CitizenIssuer], lifetime_max_s: u32, verified_max: usize) -> Self {
        Self {
            issuers: issuers.into(),
            lifetime_max_s: i64::from(lifetime_max_s),
            verified: Arc::default(),
            verified_max,
        }
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

    /// The citizen the request's assertion names, or why there is none valid (for the
    /// logs: the client only learns CITIZEN_ASSERTION_INVALID).
    pub fn verify(
        &self,
        metadata: &MetadataMap,
        now_unix_s: i64,
    ) -> Result<AssertedCitizen, String> {
        let token = metadata
            .get(ASSERTION_HEADER)
            .ok_or("no x-citizen-assertion")?
            .to_str()
            .map_err(|_| "the assertion is not ASCII")?;
        if token.len() > ASSERTION_BYTES_MAX {
            return Err("the assertion is too long".into());
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(citizen) = self.recall(&digest, now_unix_s) {
            return Ok(citizen);
        }
        let claims = self.signed_claims(token)?;
        if claims.exp <= now_unix_s {
            return Err("the assertion has expired".into());
        }
        if claims
            .nbf
            .is_some_and(|nbf| nbf > now_unix_s + CLOCK_SKEW_S)
        {
            return Err("the assertion is not valid yet".into());
        }
        let lifetime = claims.exp.checked_sub(claims.iat);
        let lifetime_ok = lifetime.is_some_and(|s| (0..=self.lifetime_max_s).contains(&s));
        if claims.iat > now_unix_s + CLOCK_SKEW_S || !lifetime_ok {
            return Err("the assertion's iat or lifetime is out of bounds".into());
        }
        if claims.sub.is_empty() {
            return Err("the assertion names no citizen".into());
        }
        let citizen = AssertedCitizen {
            sub: claims.sub,
            birth_year: claims.birth_year,
            groups: claims.groups,
            dependants: claims.dependants,
        };
        self.remember(digest, &citizen, claims.exp, now_unix_s);
        Ok(citizen)
    }

    /// The claims of a JWS signed by a configured issuer for its audience. Only the keys
    /// of the issuer the token names are tried (one signature check per key of it).
    fn signed_claims(&self, token: &str) -> Result<Claims, String> {
        #[derive(Deserialize)]
        struct Claimed {
            iss: String,
        }
        // Read unverified only to pick the keys; nothing of it is trusted.
        let claimed = jsonwebtoken::dangerous::insecure_decode_claims::<Claimed>(token)
            .map_err(|e| format!("the assertion does not decode: {e}"))?;
        let mut last_error = format!("issuer {:?} is not configured", claimed.iss);
        for issuer in self.issuers.iter().filter(|i| i.name == claimed.iss) {
            let mut validation = Validation::new(issuer.algorithm);
            validation.set_issuer(&[&issuer.name]);
            validation.set_audience(&[&issuer.audience]);
            validation.set_required_spec_claims(&["iss", "aud", "sub", "iat", "exp"]);
            // Times are checked against the engine's clock, above.
            validation.validate_exp = false;
            match decode::<Claims>(token, &issuer.key, &validation) {
                Ok(data) => return Ok(data.claims),
                Err(error) => last_error = error.to_string(),
            }
        }
        Err(last_error)
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
        let signing = EncodingKey::from_ed_pem(key.serialize_pem().as_bytes()).unwrap();
        let token = encode(&Header::new(Algorithm::EdDSA), &claims, &signing).unwrap();
        let mut metadata = MetadataMap::new();
        metadata.insert(ASSERTION_HEADER, token.parse().unwrap());
        metadata
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
        Assertions::new(&file.check().unwrap().citizen_issuers, 900, remembered_max)
    }

    #[test]
    fn a_remembered_assertion_still_expires_and_memory_stays_bounded() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let now = 1_800_000_000;
        let assertions = assertions(&key, 2);
        let alice = signed(&key, "ALICE", now);
        assert_eq!(assertions.verify(&alice, now).unwrap().sub, "ALICE");
        assert_eq!(assertions.verify(&alice, now + 1).unwrap().sub, "ALICE");
        assert_eq!(assertions.verified_count(), 1);
        assert!(
            assertions.verify(&alice, now + 600).is_err(),
            "expired, remembered or not"
        );
        for (index, sub) in ["BOB", "CAROL", "DAVE"].iter().enumerate() {
            let metadata = signed(&key, sub, now + index as i64);
            assertions.verify(&metadata, now + 10).unwrap();
            assert!(assertions.verified_count() <= 2);
        }
    }
}
