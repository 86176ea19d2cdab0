//! Signed citizen assertions (PRODUCT.md part A): a frontend whose token is `asserted`
//! sends, on every call that names a citizen, `x-citizen-assertion: <compact JWS>`
//! issued by an identity gateway; the citizen is its `sub`. Verified with the
//! `jsonwebtoken` crate (EdDSA or ES256 only; never `none` or HMAC), against every key
//! configured for the issuer (rotation), then its times against the engine's clock.
//!
//! Must not import sled.

use std::sync::Arc;

use jsonwebtoken::{decode, Validation};
use serde::Deserialize;
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

/// The configured issuers, shared by every handler.
#[derive(Clone, Default)]
pub struct Assertions {
    issuers: Arc<[CitizenIssuer]>,
    lifetime_max_s: i64,
}

impl Assertions {
    pub fn new(issuers: &[CitizenIssuer], lifetime_max_s: u32) -> Self {
        Self {
            issuers: issuers.into(),
            lifetime_max_s: i64::from(lifetime_max_s),
        }
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
        Ok(AssertedCitizen {
            sub: claims.sub,
            birth_year: claims.birth_year,
            groups: claims.groups,
            dependants: claims.dependants,
        })
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
