//! Bearer API keys, held only as sha256 hashes and compared in constant time.

#![forbid(unsafe_code)]

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The plugin's configuration: `{"keys":[{"id","sha256","scopes","tenant"}]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    keys: Vec<KeyConfig>,
}

/// One key as configured: its id, the sha256 of the key (hex), its scopes and tenant.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyConfig {
    id: String,
    sha256: String,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    tenant: Option<String>,
}

/// One accepted key: its hash and the principal it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// Key id, reported as the principal id.
    pub id: String,
    /// The principal's tenant.
    pub tenant: Option<String>,
    /// The principal's scopes.
    pub scopes: Vec<String>,
    hash: [u8; 32],
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization` header.
    Missing,
    /// A header that is not `Bearer <token>`.
    Malformed,
    /// A bearer token that matches no key.
    Unknown,
}

impl Denied {
    /// Machine-readable refusal code.
    pub fn code(self) -> &'static str {
        match self {
            Denied::Missing => "missing_api_key",
            Denied::Malformed | Denied::Unknown => "invalid_api_key",
        }
    }

    /// Message for the client; never echoes the presented token.
    pub fn message(self) -> &'static str {
        match self {
            Denied::Missing => "no API key provided: send `Authorization: Bearer <key>`",
            Denied::Malformed => "malformed Authorization header: expected `Bearer <key>`",
            Denied::Unknown => "invalid API key",
        }
    }
}

/// The configured keys.
#[derive(Debug, Default)]
pub struct KeySet {
    keys: Vec<Key>,
}

impl KeySet {
    /// Parse and validate the plugin configuration.
    pub fn from_json(config: &str) -> Result<Self, String> {
        let config: Config =
            serde_json::from_str(config).map_err(|e| format!("invalid configuration: {e}"))?;
        Self::from_config(config)
    }

    /// Validate a parsed configuration.
    pub fn from_config(config: Config) -> Result<Self, String> {
        let mut keys = Vec::with_capacity(config.keys.len());
        for (i, key) in config.keys.into_iter().enumerate() {
            if key.id.is_empty() {
                return Err(format!("keys[{i}].id is empty"));
            }
            let mut hash = [0u8; 32];
            hex::decode_to_slice(key.sha256.trim(), &mut hash).map_err(|_| {
                format!("keys[{i}].sha256 must be 64 hex digits (the sha256 of the key)")
            })?;
            if keys.iter().any(|k: &Key| k.id == key.id) {
                return Err(format!("keys[{i}].id `{}` is not unique", key.id));
            }
            keys.push(Key {
                id: key.id,
                tenant: key.tenant,
                scopes: key.scopes,
                hash,
            });
        }
        Ok(Self { keys })
    }

    /// Authenticate the value of an `Authorization` header.
    ///
    /// Every configured hash is compared, in constant time, whatever matches first, so the
    /// time taken says nothing about which key (or which prefix of a hash) matched.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<&Key, Denied> {
        let value = authorization.ok_or(Denied::Missing)?;
        let token = bearer_token(value).ok_or(Denied::Malformed)?;
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for key in &self.keys {
            if bool::from(key.hash.ct_eq(&presented)) {
                found = Some(key);
            }
        }
        found.ok_or(Denied::Unknown)
    }
}

/// `Bearer <token>`, scheme case-insensitive as RFC 6750 allows.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && !token.contains(' '))
        .then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(key: &str) -> String {
        hex::encode(Sha256::digest(key.as_bytes()))
    }

    fn set() -> KeySet {
        let json = format!(
            r#"{{"keys":[
                {{"id":"ops","sha256":"{}","scopes":["inference","metrics"]}},
                {{"id":"acme-app","sha256":"{}","scopes":["inference"],"tenant":"acme"}}
            ]}}"#,
            sha("ops-secret"),
            sha("acme-secret")
        );
        KeySet::from_json(&json).expect("valid config")
    }

    #[test]
    fn accepts_configured_keys() {
        let set = set();
        let ops = set
            .authenticate(Some("Bearer ops-secret"))
            .expect("ops key");
        assert_eq!(ops.id, "ops");
        assert_eq!(ops.scopes, ["inference", "metrics"]);
        assert_eq!(ops.tenant, None);
        let acme = set
            .authenticate(Some("bearer  acme-secret "))
            .expect("acme key");
        assert_eq!(acme.tenant.as_deref(), Some("acme"));
    }

    #[test]
    fn refuses_missing_malformed_and_unknown() {
        let set = set();
        assert_eq!(set.authenticate(None), Err(Denied::Missing));
        assert_eq!(
            set.authenticate(Some("Basic b3BzOng=")),
            Err(Denied::Malformed)
        );
        assert_eq!(set.authenticate(Some("Bearer")), Err(Denied::Malformed));
        assert_eq!(set.authenticate(Some("Bearer a b")), Err(Denied::Malformed));
        assert_eq!(
            set.authenticate(Some("Bearer ops-secreT")),
            Err(Denied::Unknown)
        );
        // The hash itself is not a key.
        let hash = format!("Bearer {}", sha("ops-secret"));
        assert_eq!(set.authenticate(Some(&hash)), Err(Denied::Unknown));
    }

    #[test]
    fn empty_key_set_refuses_everything() {
        let set = KeySet::from_json(r#"{"keys":[]}"#).expect("valid");
        assert_eq!(set.authenticate(Some("Bearer x")), Err(Denied::Unknown));
    }

    #[test]
    fn bad_config_is_explained() {
        assert!(
            KeySet::from_json("{")
                .unwrap_err()
                .contains("invalid configuration")
        );
        let short = KeySet::from_json(r#"{"keys":[{"id":"a","sha256":"abc"}]}"#).unwrap_err();
        assert!(short.contains("keys[0].sha256"), "{short}");
        let unknown = KeySet::from_json(r#"{"keys":[],"key":1}"#).unwrap_err();
        assert!(unknown.contains("unknown field"), "{unknown}");
        let dup = format!(
            r#"{{"keys":[{{"id":"a","sha256":"{0}"}},{{"id":"a","sha256":"{0}"}}]}}"#,
            sha("k")
        );
        assert!(KeySet::from_json(&dup).unwrap_err().contains("not unique"));
    }

    #[test]
    fn messages_never_echo_the_token() {
        for d in [Denied::Missing, Denied::Malformed, Denied::Unknown] {
            assert!(!d.message().contains("secret"));
        }
    }
}
