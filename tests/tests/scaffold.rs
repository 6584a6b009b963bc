//! `warden plugin new` for each slot: the project builds on the first try with plain
//! `cargo build --release --target wasm32-wasip2`, outside the workspace, and its own case
//! file passes through the harness behind `warden plugin test`.

use std::process::Command;

use warden::plugins::{Limits, PluginSource, Runtime, Slot, run_cases};
use warden_tests::root;

#[test]
fn a_new_plugin_of_every_slot_builds_and_passes_its_cases() {
    let dir = tempfile::tempdir().unwrap();
    // Shared between runs, so only the first build compiles the dependencies.
    let target = root().join("target/scaffold");
    let runtime = Runtime::builder()
        .instances(8)
        .call_threads(1)
        .build()
        .expect("runtime");
    for (slot, name) in [
        (Slot::Auth, "new-auth"),
        (Slot::Sanitizer, "new-sanitizer"),
        (Slot::MetricsPolicy, "new-metrics"),
    ] {
        let project = dir.path().join(name);
        warden::scaffold::new_rust(&project, name, slot).expect("project written");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .current_dir(&project)
            .args(["build", "--release", "--target", "wasm32-wasip2", "--quiet"])
            .env("CARGO_TARGET_DIR", &target)
            // The host's flags (target-cpu=native) must never reach the wasm target.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_RUSTFLAGS")
            .output()
            .expect("run cargo");
        assert!(
            out.status.success(),
            "{name} does not build:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let component = target.join(format!(
            "wasm32-wasip2/release/{}.wasm",
            name.replace('-', "_")
        ));
        let config = std::fs::read_to_string(project.join("tests/config.json")).unwrap();
        let cases = std::fs::read_to_string(project.join("tests/cases.jsonl")).unwrap();
        let source = PluginSource::from_file(slot, &component, None, config, Limits::default())
            .expect("component");
        let outcomes = run_cases(&runtime, &source, &cases).expect("cases run");
        assert!(!outcomes.is_empty());
        for o in outcomes {
            assert!(o.passed, "{name}: {}: {}", o.name, o.answer);
        }
    }
}
