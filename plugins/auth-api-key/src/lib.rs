//! `auth-api-key`: the wit-bindgen shim. All logic lives in [`logic`].
// The wit-bindgen glue expands to `unsafe` ABI code; the plugin's own logic forbids it.
#![allow(unsafe_code)]

pub mod logic;

wit_bindgen::generate!({
    path: "../../wit",
    world: "warden:policy/auth-plugin@0.1.0",
});

use std::cell::RefCell;

use exports::warden::policy::auth::{Guest as Auth, Principal, Refusal, RequestInfo};
use exports::warden::policy::lifecycle::Guest as Lifecycle;

thread_local! {
    static KEYS: RefCell<Option<logic::KeySet>> = const { RefCell::new(None) };
}

struct Plugin;

impl Lifecycle for Plugin {
    fn configure(config: String) -> Result<(), String> {
        let keys = logic::KeySet::from_json(&config)?;
        KEYS.with(|k| *k.borrow_mut() = Some(keys));
        Ok(())
    }
}

impl Auth for Plugin {
    fn authenticate(request: RequestInfo) -> Result<Principal, Refusal> {
        let header = request
            .headers
            .iter()
            .find(|h| h.name == "authorization")
            .map(|h| h.value.as_str());
        KEYS.with(|k| {
            let keys = k.borrow();
            let keys = keys.as_ref().ok_or_else(|| Refusal {
                status: 401,
                code: "invalid_api_key".into(),
                message: "authentication is not configured".into(),
            })?;
            match keys.authenticate(header) {
                Ok(key) => Ok(Principal {
                    id: key.id.clone(),
                    tenant: key.tenant.clone(),
                    scopes: key.scopes.clone(),
                }),
                Err(denied) => Err(Refusal {
                    status: 401,
                    code: denied.code().into(),
                    message: denied.message().into(),
                }),
            }
        })
    }
}

// Only the wasm build exports the ABI: native builds (unit tests, clippy) cannot link
// symbol names such as `warden:policy/auth@0.1.0#authenticate`.
#[cfg(target_arch = "wasm32")]
export!(Plugin);
