//! `auth-api-key`: bearer API keys held as sha256 hashes, compared in constant time. The
//! policy lives in [`logic`]; this is its binding through `warden-policy`.

pub mod logic;

use warden_policy::auth::{Principal, Refusal, RequestInfo};

impl warden_policy::Auth for logic::KeySet {
    type Config = logic::Config;

    fn new(config: logic::Config) -> Result<Self, String> {
        Self::from_config(config)
    }

    fn authenticate(&self, request: &RequestInfo) -> Result<Principal, Refusal> {
        match logic::KeySet::authenticate(self, warden_policy::header(request, "authorization")) {
            Ok(key) => Ok(Principal {
                id: key.id.clone(),
                tenant: key.tenant.clone(),
                scopes: key.scopes.clone(),
            }),
            Err(denied) => Err(warden_policy::unauthorized(denied.code(), denied.message()).into()),
        }
    }
}

warden_policy::export_auth!(logic::KeySet);
