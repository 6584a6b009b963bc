//! An auth plugin: a bearer token from the configuration, compared in constant time.

use warden_policy::auth::{Principal, Refusal, RequestInfo};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The token clients send as `Authorization: Bearer <token>`.
    token: String,
}

pub struct Plugin(Config);

impl warden_policy::Auth for Plugin {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.token.len() < 16 {
            return Err("token must be at least 16 characters".into());
        }
        Ok(Self(config))
    }

    fn authenticate(&self, request: &RequestInfo) -> Result<Principal, Refusal> {
        match warden_policy::bearer(request) {
            Some(t) if warden_policy::same_secret(t, &self.0.token) => {
                Ok(warden_policy::principal("client", ["inference"]))
            }
            Some(_) => Err(warden_policy::unauthorized("invalid_api_key", "invalid token").into()),
            None => Err(warden_policy::unauthorized("missing_api_key", "send a bearer token").into()),
        }
    }
}

warden_policy::export_auth!(Plugin);
