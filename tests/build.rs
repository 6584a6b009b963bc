//! Builds every plugin under `plugins/` and the test fixtures for wasm32-wasip2 and exposes
//! the component directory as `PLUGIN_DIR`. Fails loudly when the target is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

const PLUGINS: [(&str, &str); 5] = [
    ("auth-api-key", "auth_api_key"),
    ("sanitize-basic", "sanitize_basic"),
    ("metrics-policy-basic", "metrics_policy_basic"),
    ("misbehave", "misbehave"),
    ("phone-home", "phone_home"),
];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().expect("workspace root").to_path_buf();
    for dir in ["plugins", "wit", "tests/fixtures/plugins"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    // The same directory `make plugins` uses, so the components are built once.
    let target_dir = root.join("target/wasm-plugins");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-wasip2",
        ])
        .env("CARGO_TARGET_DIR", &target_dir)
        // The host's flags (target-cpu=native) must never reach the wasm target.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS");
    for (package, _) in PLUGINS {
        cmd.args(["-p", package]);
    }
    let status = cmd.status().expect("cannot run cargo to build the plugins");
    assert!(
        status.success(),
        "building the plugins for wasm32-wasip2 failed; is the target installed? \
         (`rustup target add wasm32-wasip2`, which `make test` does)"
    );
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("plugins");
    std::fs::create_dir_all(&out).expect("create plugin dir");
    for (package, artifact) in PLUGINS {
        let built = target_dir.join(format!("wasm32-wasip2/release/{artifact}.wasm"));
        copy(&built, &out.join(format!("{package}.wasm")));
    }
    println!("cargo:rustc-env=WARDEN_TEST_PLUGIN_DIR={}", out.display());
    println!("cargo:rustc-env=WARDEN_TEST_ROOT={}", root.display());
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
}
