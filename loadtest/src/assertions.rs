//! `--asserted`: the spawned server trusts no frontend about citizens; every call that
//! names one carries an `x-citizen-assertion` (EdDSA), as an identity gateway would sign
//! it. The assertions are signed before the timed phase, so the run measures the
//! server's verification, not the generator's signing.

use std::collections::HashMap;
use std::sync::OnceLock;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use prenota::config::{CitizenIssuerEntry, Config, ConfigFile};
use tonic::metadata::MetadataValue;

const ISSUER: &str = "loadtest-gateway";
const AUDIENCE: &str = "prenota";
/// The longest lifetime the server accepts by default (`citizen_assertion_lifetime_seconds_max`).
const LIFETIME_S: i64 = 900;

/// The signing key, and the server config that trusts its public half.
pub struct Gateway {
    key: EncodingKey,
}

impl Gateway {
    /// A throwaway Ed25519 gateway key, and a config whose only issuer it is (open mode:
    /// every caller is then asserted).
    pub fn generate() -> Result<(Self, Config), String> {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .map_err(|e| format!("generating a gateway key: {e}"))?;
        let key = EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes())
            .map_err(|e| format!("reading the gateway key: {e}"))?;
        let file = ConfigFile {
            citizen_issuers: vec![CitizenIssuerEntry {
                name: ISSUER.into(),
                audience: AUDIENCE.into(),
                public_key_pem: pair.public_key_pem(),
            }],
            ..ConfigFile::default()
        };
        let config = file.check().map_err(|problems| problems.join("; "))?;
        Ok((Self { key }, config))
    }

    /// Signs one assertion per citizen id, valid from now for 15 minutes, and makes
    /// them the ones every later call attaches.
    pub fn sign_all(&self, citizen_ids: impl Iterator<Item = String>) -> Result<usize, String> {
        let now = chrono::Utc::now().timestamp();
        let header = Header::new(Algorithm::EdDSA);
        let mut signed = HashMap::new();
        for sub in citizen_ids {
            let claims = serde_json::json!({
                "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + LIFETIME_S,
            });
            let token = encode(&header, &claims, &self.key).map_err(|e| e.to_string())?;
            let value = MetadataValue::try_from(token).map_err(|e| e.to_string())?;
            signed.insert(sub, value);
        }
        let count = signed.len();
        SIGNED
            .set(signed)
            .map_err(|_| "assertions were signed twice".to_string())?;
        Ok(count)
    }
}

static SIGNED: OnceLock<HashMap<String, MetadataValue<tonic::metadata::Ascii>>> = OnceLock::new();

/// `message` as a request for `citizen_id`: with its assertion when the run is asserted.
pub fn request<T>(citizen_id: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = SIGNED.get().and_then(|signed| signed.get(citizen_id)) {
        request
            .metadata_mut()
            .insert("x-citizen-assertion", value.clone());
    }
    request
}
