//! `warden plugin new` for each slot and language: the project builds on the first try
//! outside the workspace (plain `cargo build --release --target wasm32-wasip2`, `sh build.sh`,
//! `npm run build`), and its own case file passes through the harness behind
//! `warden plugin test`. docs/plugins.md's tutorial (host/tests/tutorial.rs) runs the whole
//! path, hot swap included, once per language.

use std::process::Command;

use warden::plugins::{Limits, PluginSource, Runtime, Slot, run_cases};
use warden::scaffold::Lang;
use warden_tests::root;

fn runtime() -> std::sync::Arc<Runtime> {
    Runtime::builder()
        .instances(8)
        .call_threads(1)
        .build()
        .expect("runtime")
}

/// Run `project`'s own case file through the harness on its built `component`.
fn passes_its_cases(
    runtime: &std::sync::Arc<Runtime>,
    project: &std::path::Path,
    component: &std::path::Path,
    slot: Slot,
    limits: Limits,
) {
    let config =
        std::fs::read_to_string(project.join("tests/config.json")).expect("tests/config.json");
    let cases =
        std::fs::read_to_string(project.join("tests/cases.jsonl")).expect("tests/cases.jsonl");
    let source = PluginSource::from_file(slot, component, None, config, limits).expect("component");
    let outcomes = run_cases(runtime, &source, &cases).expect("cases run");
    assert!(!outcomes.is_empty());
    for o in outcomes {
        assert!(o.passed, "{}: {}: {}", project.display(), o.name, o.answer);
    }
}

#[test]
fn a_new_plugin_of_every_slot_builds_and_passes_its_cases() {
    let dir = tempfile::tempdir().unwrap();
    // Shared between runs, so only the first build compiles the dependencies.
    let target = root().join("target/scaffold");
    let runtime = runtime();
    for (slot, name) in [
        (Slot::Auth, "new-auth"),
        (Slot::Sanitizer, "new-sanitizer"),
        (Slot::MetricsPolicy, "new-metrics"),
    ] {
        let project = dir.path().join(name);
        warden::scaffold::new(&project, name, slot, Lang::Rust).expect("project written");
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
        passes_its_cases(&runtime, &project, &component, slot, Limits::default());
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
    let runtime = runtime();
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
        warden::scaffold::new(&project, name, slot, Lang::Python).expect("project written");
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
        let component = project.join(format!("{name}.wasm"));
        passes_its_cases(&runtime, &project, &component, slot, limits);
    }
}

/// `warden plugin new --lang js` for each slot: `npm run build` (componentize-js, the
/// version `plugins/jwt-auth-js` pins and `make js-plugins` installs) makes a component that
/// passes its cases.
#[test]
fn a_new_javascript_plugin_of_every_slot_builds_and_passes_its_cases() {
    let modules = root().join("plugins/jwt-auth-js/node_modules");
    assert!(
        modules.join(".bin/componentize-js").exists(),
        "componentize-js is missing: run `make js-plugins` (make test does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime();
    for (slot, name) in [
        (Slot::Auth, "js-auth"),
        (Slot::Sanitizer, "js-sanitizer"),
        (Slot::MetricsPolicy, "js-metrics"),
    ] {
        let project = dir.path().join(name);
        let written =
            warden::scaffold::new(&project, name, slot, Lang::Js).expect("project written");
        // The same pinned packages, without another download.
        std::os::unix::fs::symlink(&modules, project.join("node_modules")).unwrap();
        let out = Command::new("npm")
            .args(["run", "--silent", "build"])
            .current_dir(&project)
            .output()
            .expect("run npm");
        assert!(
            out.status.success(),
            "{name} does not build:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let component = project.join(&written.component);
        passes_its_cases(&runtime, &project, &component, slot, Limits::default());
    }
}
