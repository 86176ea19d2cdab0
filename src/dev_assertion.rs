//! `prenota dev-assertion`: signs a citizen assertion the way an identity gateway would,
//! to try asserted citizens (README "Citizens and identity") or test a frontend. Not
//! for production: a real gateway authenticates the citizen first.

use std::path::Path;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;

/// What to assert.
pub struct AssertionRequest<'a> {
    /// PKCS#8 PEM private key (Ed25519 signs EdDSA, P-256 signs ES256).
    pub key: &'a Path,
    pub issuer: &'a str,
    pub audience: &'a str,
    pub subject: &'a str,
    pub ttl_seconds: u32,
    pub birth_year: Option<i32>,
    pub groups: &'a [String],
    /// Citizens the subject may book for too (a household's `BookGroup`).
    pub dependants: &'a [String],
    pub now_unix_s: i64,
}

/// A compact JWS of the assertion.
pub fn sign(request: &AssertionRequest<'_>) -> Result<String, String> {
    let pem = std::fs::read(request.key)
        .map_err(|e| format!("cannot read {}: {e}", request.key.display()))?;
    let (algorithm, key) = match EncodingKey::from_ed_pem(&pem) {
        Ok(key) => (Algorithm::EdDSA, key),
        Err(_) => match EncodingKey::from_ec_pem(&pem) {
            Ok(key) => (Algorithm::ES256, key),
            Err(e) => {
                return Err(format!(
                    "{} is neither an Ed25519 nor a P-256 PKCS#8 private key: {e}",
                    request.key.display()
                ))
            }
        },
    };
    let mut claims = json!({
        "iss": request.issuer,
        "aud": request.audience,
        "sub": request.subject,
        "iat": request.now_unix_s,
        "exp": request.now_unix_s + i64::from(request.ttl_seconds),
    });
    if let Some(year) = request.birth_year {
        claims["birth_year"] = json!(year);
    }
    if !request.groups.is_empty() {
        claims["groups"] = json!(request.groups);
    }
    if !request.dependants.is_empty() {
        claims["dependants"] = json!(request.dependants);
    }
    encode(&Header::new(algorithm), &claims, &key).map_err(|e| format!("cannot sign: {e}"))
}
