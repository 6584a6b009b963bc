//! Credentials for the auth plugin: from `WARDEN_API_KEY`/`WARDEN_METRICS_API_KEY`, from the
//! config file, or — when none is configured — a key generated on first start. There is
//! no built-in key.

use std::io::Write;
use std::path::Path;

use base64::Engine;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::config::Config;

/// Credential set-up failures.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The generated key file could not be read or written.
    #[error("generated API key file {file}: {reason}")]
    File {
        /// File name.
        file: String,
        /// Why.
        reason: String,
    },
    /// No randomness.
    #[error("cannot generate an API key: {0}")]
    Random(String),
}

fn sha256_hex(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The JSON configuration for the auth plugin.
pub fn auth_plugin_config(config: &Config) -> Result<String, KeyError> {
    let mut keys: Vec<(String, String, Vec<&str>)> = Vec::new();
    let mut add = |id: &str, key: &str, scope: &'static str| {
        let hash = sha256_hex(key);
        match keys.iter_mut().find(|(_, h, _)| *h == hash) {
            Some((_, _, scopes)) => scopes.push(scope),
            None => keys.push((id.to_string(), hash, vec![scope])),
        }
    };
    if let Some(k) = &config.api_key {
        add("api-key", k.expose(), "inference");
    }
    if let Some(k) = &config.metrics_api_key {
        add("metrics-api-key", k.expose(), "metrics");
    }
    if !keys.is_empty() {
        let keys: Vec<_> = keys
            .into_iter()
            .map(|(id, sha256, scopes)| json!({"id": id, "sha256": sha256, "scopes": scopes}))
            .collect();
        return Ok(json!({ "keys": keys }).to_string());
    }
    if !config.plugins.auth.config.is_empty() {
        return Ok(serde_json::Value::Object(config.plugins.auth.config.clone()).to_string());
    }
    let key = generated_key(&config.generated_key_file)?;
    Ok(json!({"keys": [{
        "id": "generated",
        "sha256": sha256_hex(&key),
        "scopes": ["inference", "metrics"],
    }]})
    .to_string())
}

/// Read the generated key, creating it (readable by its owner only) on first start.
fn generated_key(path: &Path) -> Result<String, KeyError> {
    let err = |reason: String| KeyError::File {
        file: crate::plugins::file_name(path),
        reason,
    };
    match std::fs::read_to_string(path) {
        Ok(key) if !key.trim().is_empty() => {
            tracing::info!(
                file = %crate::plugins::file_name(path),
                "using the generated API key kept in this file (setting generated_key_file)"
            );
            return Ok(key.trim().to_string());
        }
        Ok(_) => return Err(err("file is empty".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e.kind().to_string())),
    }
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| KeyError::Random(e.to_string()))?;
    let key = format!(
        "wdn_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    );
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| err(e.kind().to_string()))?;
    }
    // Written whole to a temporary file and linked into place, so that a crash never
    // leaves a half-written key and two processes starting at once agree on one key.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(key.as_bytes())?;
            file.sync_all()
        })
        .and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match written {
        Ok(()) => {}
        // Another process created it first: use its key.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return generated_key(path),
        Err(e) => return Err(err(e.kind().to_string())),
    }
    tracing::warn!(
        file = %crate::plugins::file_name(path),
        "no API key configured: generated one and wrote it to this file (owner-only; \
         setting generated_key_file); set WARDEN_API_KEY to choose your own"
    );
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn env_keys_become_hashed_entries() {
        let config = Config {
            api_key: Some(Secret::new("inf-key")),
            metrics_api_key: Some(Secret::new("met-key")),
            ..Config::default()
        };
        let json = auth_plugin_config(&config).unwrap();
        assert!(!json.contains("inf-key") && !json.contains("met-key"));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["keys"][0]["sha256"], sha256_hex("inf-key"));
        assert_eq!(v["keys"][0]["scopes"], json!(["inference"]));
        assert_eq!(v["keys"][1]["scopes"], json!(["metrics"]));
    }

    #[test]
    fn one_key_for_both_gets_both_scopes() {
        let config = Config {
            api_key: Some(Secret::new("same")),
            metrics_api_key: Some(Secret::new("same")),
            ..Config::default()
        };
        let v: serde_json::Value =
            serde_json::from_str(&auth_plugin_config(&config).unwrap()).unwrap();
        assert_eq!(v["keys"].as_array().unwrap().len(), 1);
        assert_eq!(v["keys"][0]["scopes"], json!(["inference", "metrics"]));
    }

    #[test]
    fn generated_key_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/api-key");
        let config = Config {
            generated_key_file: path.clone(),
            ..Config::default()
        };
        let first = auth_plugin_config(&config).unwrap();
        let key = std::fs::read_to_string(&path).unwrap();
        assert!(key.starts_with("wdn_") && key.len() > 40);
        assert!(!first.contains(&key));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(auth_plugin_config(&config).unwrap(), first);
    }
}
