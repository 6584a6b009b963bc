//! `metrics-policy-basic`: route, model, status class and tenant labels; a tenant sees its
//! own series. The policy lives in [`logic`]; this is its binding through `warden-policy`.

pub mod logic;

use warden_policy::metrics::{Label, Principal, RequestSummary, Visibility};

/// The plugin: its configuration.
pub struct Basic(logic::Config);

impl warden_policy::MetricsPolicy for Basic {
    type Config = logic::Config;

    fn new(config: logic::Config) -> Result<Self, String> {
        Ok(Self(config))
    }

    fn labels(&self, r: &RequestSummary) -> Vec<Label> {
        let labels = self
            .0
            .labels(&r.route, r.model.as_deref(), r.status, r.tenant.as_deref());
        labels
            .into_iter()
            .map(|(name, value)| Label {
                name: name.into(),
                value,
            })
            .collect()
    }

    fn visible_series(&self, caller: &Principal) -> Visibility {
        match logic::visibility(caller.tenant.as_deref(), &caller.scopes) {
            logic::Visibility::All => Visibility::All,
            logic::Visibility::Tenant(value) => Visibility::Matching(vec![Label {
                name: "tenant".into(),
                value,
            }]),
            logic::Visibility::Nothing => Visibility::None,
        }
    }
}

warden_policy::export_metrics_policy!(Basic);
