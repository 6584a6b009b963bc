//! A metrics policy: route and status class; a caller with the `metrics` scope sees all.

use warden_policy::metrics::{Label, Principal, RequestSummary, Visibility};

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {}

pub struct Plugin;

impl warden_policy::MetricsPolicy for Plugin {
    type Config = Config;

    fn new(_config: Config) -> Result<Self, String> {
        Ok(Self)
    }

    fn labels(&self, request: &RequestSummary) -> Vec<Label> {
        let label = |name: &str, value: String| Label { name: name.into(), value };
        let class = format!("{}xx", request.status / 100);
        vec![label("route", request.route.clone()), label("status_class", class)]
    }

    fn visible_series(&self, caller: &Principal) -> Visibility {
        match caller.scopes.iter().any(|s| s == "metrics") {
            true => Visibility::All,
            false => Visibility::None,
        }
    }
}

warden_policy::export_metrics_policy!(Plugin);
