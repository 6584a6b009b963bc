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

/// `warden plugin new --lang python` for each slot: `sh build.sh` (componentize-py, which
/// `make python-plugins` installs into `.venv`) makes a component that passes its cases.
#[test]
fn a_new_python_plugin_of_every_slot_builds_and_passes_its_cases() {
    let venv = root().join(".venv/bin");
    assert!(
        venv.join("componentize-py").is_file(),
        "componentize-py is missing from .venv: run `make python-plugins` (make test does)"
    );
    let path = format!(
        "{}:{}",
        venv.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::builder()
        .instances(8)
        .call_threads(1)
        .build()
        .expect("runtime");
    let limits = Limits {
        memory_bytes: 64 << 20,
        deadline: std::time::Duration::from_secs(2),
        ..Limits::default()
    };
    for (slot, name) in [
        (Slot::Auth, "py-auth"),
        (Slot::Sanitizer, "py-sanitizer"),
        (Slot::MetricsPolicy, "py-metrics"),
    ] {
        let project = dir.path().join(name);
        warden::scaffold::new_python(&project, name, slot).expect("project written");
        let out = Command::new("sh")
            .arg("build.sh")
            .current_dir(&project)
            .env("PATH", &path)
            .output()
            .expect("run build.sh");
        assert!(
            out.status.success(),
            "{name} does not build:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let config = std::fs::read_to_string(project.join("tests/config.json")).unwrap();
        let cases = std::fs::read_to_string(project.join("tests/cases.jsonl")).unwrap();
        let component = project.join(format!("{name}.wasm"));
        let source =
            PluginSource::from_file(slot, &component, None, config, limits).expect("component");
        let outcomes = run_cases(&runtime, &source, &cases).expect("cases run");
        assert!(!outcomes.is_empty());
        for o in outcomes {
            assert!(o.passed, "{name}: {}: {}", o.name, o.answer);
        }
    }
}
