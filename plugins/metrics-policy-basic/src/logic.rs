//! Which labels a request is recorded under, and which series a caller may see.

#![forbid(unsafe_code)]

use serde::Deserialize;

/// The plugin's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Record the caller's tenant as a label (bounded by the number of tenants).
    pub tenant_label: bool,
    /// Record the model id as a label.
    pub model_label: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            tenant_label: true,
            model_label: true,
        }
    }
}

impl Config {
    /// Parse the configuration (`{}` gives the defaults).
    pub fn from_json(json: &str) -> Result<Self, String> {
        serde_json::from_str(json).map_err(|e| format!("invalid configuration: {e}"))
    }

    /// The labels for one finished request: route, model, status class and tenant.
    /// Never a raw principal id or free text: the host does not even offer them.
    pub fn labels(
        &self,
        route: &str,
        model: Option<&str>,
        status: u16,
        tenant: Option<&str>,
    ) -> Vec<(&'static str, String)> {
        let mut out = vec![
            ("route", route.to_string()),
            ("status_class", status_class(status)),
        ];
        if self.model_label {
            out.push(("model", model.unwrap_or("none").to_string()));
        }
        if self.tenant_label {
            out.push(("tenant", tenant.unwrap_or("none").to_string()));
        }
        out
    }
}

/// `2xx`, `4xx`, ...; anything outside 100..=599 is `other`.
pub fn status_class(status: u16) -> String {
    match status {
        100..=599 => format!("{}xx", status / 100),
        _ => "other".into(),
    }
}

/// What a caller may read from `/v1/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visibility {
    /// Everything.
    All,
    /// Only series of this tenant.
    Tenant(String),
    /// Nothing.
    Nothing,
}

/// Operators (a `metrics` scope and no tenant) see everything; a tenant's principal sees its
/// own tenant's series; anyone else nothing.
pub fn visibility(tenant: Option<&str>, scopes: &[String]) -> Visibility {
    match tenant {
        Some(t) => Visibility::Tenant(t.to_string()),
        None if scopes.iter().any(|s| s == "metrics") => Visibility::All,
        None => Visibility::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        let c = Config::default();
        let l = c.labels(
            "/v1/embeddings",
            Some("all-MiniLM-L6-v2"),
            429,
            Some("acme"),
        );
        assert_eq!(
            l,
            [
                ("route", "/v1/embeddings".to_string()),
                ("status_class", "4xx".to_string()),
                ("model", "all-MiniLM-L6-v2".to_string()),
                ("tenant", "acme".to_string()),
            ]
        );
        let c = Config::from_json(r#"{"tenant_label": false}"#).unwrap();
        assert!(
            c.labels("/health", None, 200, Some("acme"))
                .iter()
                .all(|(n, _)| *n != "tenant")
        );
        assert!(Config::from_json(r#"{"principal_label": true}"#).is_err());
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_class(200), "2xx");
        assert_eq!(status_class(503), "5xx");
        assert_eq!(status_class(42), "other");
    }

    #[test]
    fn visibility_by_tenant_and_scope() {
        let metrics = vec!["metrics".to_string()];
        assert_eq!(visibility(None, &metrics), Visibility::All);
        assert_eq!(
            visibility(Some("acme"), &metrics),
            Visibility::Tenant("acme".into())
        );
        assert_eq!(
            visibility(None, &["inference".to_string()]),
            Visibility::Nothing
        );
    }
}
