//! `metrics-policy-basic`: the wit-bindgen shim. All logic lives in [`logic`].
// The wit-bindgen glue expands to `unsafe` ABI code; the plugin's own logic forbids it.
#![allow(unsafe_code)]

pub mod logic;

wit_bindgen::generate!({
    path: "../../wit",
    world: "warden:policy/metrics-policy-plugin@0.1.0",
});

use std::cell::RefCell;

use exports::warden::policy::lifecycle::Guest as Lifecycle;
use exports::warden::policy::metrics_policy::{
    Guest as MetricsPolicy, Label, Principal, RequestSummary, Visibility,
};

thread_local! {
    static CONFIG: RefCell<logic::Config> = RefCell::new(logic::Config::default());
}

struct Plugin;

impl Lifecycle for Plugin {
    fn configure(config: String) -> Result<(), String> {
        let parsed = logic::Config::from_json(&config)?;
        CONFIG.with(|c| *c.borrow_mut() = parsed);
        Ok(())
    }
}

impl MetricsPolicy for Plugin {
    fn labels(request: RequestSummary) -> Vec<Label> {
        CONFIG.with(|c| {
            c.borrow()
                .labels(
                    &request.route,
                    request.model.as_deref(),
                    request.status,
                    request.tenant.as_deref(),
                )
                .into_iter()
                .map(|(name, value)| Label {
                    name: name.into(),
                    value,
                })
                .collect()
        })
    }

    fn visible_series(caller: Principal) -> Visibility {
        match logic::visibility(caller.tenant.as_deref(), &caller.scopes) {
            logic::Visibility::All => Visibility::All,
            logic::Visibility::Tenant(t) => Visibility::Matching(vec![Label {
                name: "tenant".into(),
                value: t,
            }]),
            logic::Visibility::Nothing => Visibility::None,
        }
    }
}

// Only the wasm build exports the ABI: native builds (unit tests, clippy) cannot link
// symbol names such as `warden:policy/auth@0.1.0#authenticate`.
#[cfg(target_arch = "wasm32")]
export!(Plugin);
