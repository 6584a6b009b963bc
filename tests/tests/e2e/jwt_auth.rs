//! The JavaScript auth plugin (`plugins/jwt-auth-js`, componentize-js; built by
//! `make js-plugins`, which `make test` runs) uploaded to a live server through the admin
//! API, as an operator would, and driven with HS256 tokens made here.

use base64::Engine as _;
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use warden_tests::{INFERENCE_KEY, admin_config, sha256_hex, start};

const SECRET: &str = "e2e-jwt-secret-0123456789abcdef-0123456789";
const ISSUER: &str = "https://id.example.test";

/// HMAC-SHA-256 (RFC 2104), from the test's SHA-256.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    block[..key.len()].copy_from_slice(key);
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// An HS256 token with these claims, signed with `secret`.
fn token(claims: Value, secret: &str) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let signed = format!(
        "{}.{}",
        b64.encode(br#"{"alg":"HS256","typ":"JWT"}"#),
        b64.encode(claims.to_string())
    );
    let signature = b64.encode(hmac_sha256(secret.as_bytes(), signed.as_bytes()));
    format!("{signed}.{signature}")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims for `sub` with `scope`, valid for an hour, changed by `with`.
fn claims(sub: &str, scope: &str, with: Value) -> Value {
    let mut c = json!({"iss": ISSUER, "aud": "warden", "sub": sub, "tenant": "acme",
                       "scope": scope, "iat": now(), "exp": now() + 3600});
    for (k, v) in with.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

#[tokio::test]
async fn the_javascript_jwt_plugin_swaps_in_and_decides_by_its_claims() {
    let component = warden_tests::root().join("target/plugins/jwt-auth-js.wasm");
    let bytes = std::fs::read(&component).unwrap_or_else(|_| {
        panic!("target/plugins/jwt-auth-js.wasm is missing: run `make js-plugins` (make test does)")
    });
    let t = start(admin_config()).await;
    let config = json!({"secret": SECRET, "issuer": ISSUER, "audience": "warden"});
    let r = t
        .send(
            t.admin(Method::PUT, "/admin/plugins/auth")
                .header("content-type", "application/wasm")
                .header("x-plugin-sha256", sha256_hex(&bytes))
                .header("x-plugin-name", "jwt-auth-js")
                .header("x-plugin-config", config.to_string())
                .body(bytes),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["plugin"]["plugin"], "jwt-auth-js");
    assert!(!r.text.contains(SECRET), "the secret echoed: {}", r.text);

    // The API keys of the plugin it replaced no longer work; a token does.
    t.get("/v1/models", Some(INFERENCE_KEY)).await.error(401);
    let alice = token(claims("alice", "inference", json!({})), SECRET);
    let r = t
        .post(
            "/v1/chat/completions",
            Some(&alice),
            &json!({"model": "SmolLM2-135M-Instruct", "max_tokens": 4,
                    "messages": [{"role": "user", "content": "Say hello."}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);

    // The host's scope rule over the plugin's principal: no `metrics` scope, 403.
    t.get("/v1/metrics", Some(&alice)).await.error(403);
    let ops = token(claims("ops", "metrics", json!({})), SECRET);
    assert_eq!(t.get("/v1/metrics", Some(&ops)).await.status, 200);

    for (name, bad, code) in [
        (
            "expired",
            token(
                claims("alice", "inference", json!({"exp": now() - 120})),
                SECRET,
            ),
            "token_expired",
        ),
        (
            "another audience",
            token(
                claims("alice", "inference", json!({"aud": "billing"})),
                SECRET,
            ),
            "invalid_audience",
        ),
        (
            "another issuer",
            token(
                claims("alice", "inference", json!({"iss": "https://evil.test"})),
                SECRET,
            ),
            "invalid_issuer",
        ),
        (
            "another secret",
            token(
                claims("alice", "inference", json!({})),
                "not-the-secret-0123456789abcdef-xyz",
            ),
            "invalid_api_key",
        ),
    ] {
        let r = t.get("/v1/models", Some(&bad)).await;
        assert_eq!(r.error(401)["code"], code, "{name}: {}", r.text);
        assert_eq!(
            r.headers
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap()),
            Some("Bearer"),
            "{name}"
        );
        assert!(!r.text.contains(&bad), "{name}: the token echoed");
    }

    // Rolled back, the API keys work again and tokens do not.
    let r = t
        .send(t.admin(Method::POST, "/admin/plugins/auth/rollback"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(t.get("/v1/models", Some(INFERENCE_KEY)).await.status, 200);
    t.get("/v1/models", Some(&alice)).await.error(401);
    t.server.shutdown().await;
}
