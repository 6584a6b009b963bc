//! The reference plugins' case files (`plugins/*/tests/cases.jsonl`) through the harness
//! behind `warden plugin test`: the real runtime, the slot's limits, the host's checks.

use std::path::PathBuf;

use warden::plugins::{Limits, PluginSource, Runtime, Slot, run_cases};
use warden_tests::{PLUGIN_DIR, root};

/// The component `name` in `slot` with `config`, and a runtime for it.
fn load(name: &str, slot: Slot, config: String) -> (std::sync::Arc<Runtime>, PluginSource) {
    let path = PathBuf::from(PLUGIN_DIR).join(format!("{name}.wasm"));
    let source =
        PluginSource::from_file(slot, &path, None, config, Limits::default()).expect("component");
    let runtime = Runtime::builder()
        .instances(8)
        .call_threads(1)
        .build()
        .expect("runtime");
    (runtime, source)
}

fn run(name: &str, slot: Slot, cases: &str) -> Vec<warden::plugins::CaseOutcome> {
    let dir = root().join("plugins").join(name).join("tests");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap_or_else(|_| "{}".into());
    let (runtime, source) = load(name, slot, config);
    run_cases(&runtime, &source, cases).expect("cases run")
}

fn cases_of(name: &str) -> String {
    std::fs::read_to_string(root().join("plugins").join(name).join("tests/cases.jsonl"))
        .expect("case file")
}

#[test]
fn every_reference_plugin_passes_its_case_file() {
    for (name, slot) in [
        ("auth-api-key", Slot::Auth),
        ("sanitize-basic", Slot::Sanitizer),
        ("metrics-policy-basic", Slot::MetricsPolicy),
    ] {
        let outcomes = run(name, slot, &cases_of(name));
        assert!(outcomes.len() >= 5, "{name}: {} cases", outcomes.len());
        for o in &outcomes {
            assert!(
                o.passed,
                "{name}: {}: expected {} answered {}",
                o.name, o.expected, o.answer
            );
            assert!(o.peak_memory_bytes > 0, "{name}: {}", o.name);
        }
    }
}

#[test]
fn a_wrong_expectation_fails_and_a_fault_is_an_answer() {
    let wrong = r#"{"name": "wrong", "request": {}, "expect": {"principal": {"id": "alice"}}}"#;
    let outcomes = run("auth-api-key", Slot::Auth, wrong);
    assert!(!outcomes[0].passed);
    assert_eq!(outcomes[0].answer["refusal"]["code"], "missing_api_key");

    // A plugin that loops faults with `deadline`, and the case can expect it.
    let (runtime, source) = load(
        "misbehave",
        Slot::Sanitizer,
        r#"{"mode": "loop", "spare_smoke": true}"#.into(),
    );
    let looping =
        r#"{"name": "loops", "input": {"texts": ["x"]}, "expect": {"fault": "deadline"}}"#;
    let outcomes = run_cases(&runtime, &source, looping).expect("cases run");
    assert!(outcomes[0].passed, "{}", outcomes[0].answer);

    // A case that cannot be read names its line.
    let err = run_cases(&runtime, &source, "# comment\n{not json").unwrap_err();
    assert!(err.contains("line 2"), "{err}");
}

/// A plugin built outside cargo (`make python-plugins`, `make js-plugins`; `make test` runs
/// both) with the limits a deployment gives it, and a runtime for it.
fn built(
    name: &str,
    slot: Slot,
    config: String,
    limits: Limits,
) -> Vec<warden::plugins::CaseOutcome> {
    let component = root().join(format!("target/plugins/{name}.wasm"));
    assert!(
        component.is_file(),
        "target/plugins/{name}.wasm is missing: run `make python-plugins js-plugins` (make test does)"
    );
    let source =
        PluginSource::from_file(slot, &component, None, config, limits).expect("component");
    let runtime = Runtime::builder()
        .instances(8)
        .call_threads(1)
        .build()
        .expect("runtime");
    run_cases(&runtime, &source, &cases_of(name)).expect("cases run")
}

fn assert_all_pass(name: &str, outcomes: &[warden::plugins::CaseOutcome], at_least: usize) {
    assert!(
        outcomes.len() >= at_least,
        "{name}: {} cases",
        outcomes.len()
    );
    for o in outcomes {
        assert!(
            o.passed,
            "{name}: {}: expected {} answered {}",
            o.name, o.expected, o.answer
        );
    }
}

/// The Python sanitizer (componentize-py) through the same harness.
#[test]
fn the_python_sanitizer_passes_its_case_file() {
    let limits = Limits {
        memory_bytes: 64 << 20,
        deadline: std::time::Duration::from_secs(1),
        ..Limits::default()
    };
    let outcomes = built("prompt-guard-py", Slot::Sanitizer, "{}".into(), limits);
    assert_all_pass("prompt-guard-py", &outcomes, 6);
}

/// The JavaScript JWT auth plugin (componentize-js) through the same harness, with the
/// auth slot's default memory cap: signature, algorithm, expiry, issuer, audience, scopes.
#[test]
fn the_javascript_jwt_auth_passes_its_case_file() {
    let config = std::fs::read_to_string(root().join("plugins/jwt-auth-js/tests/config.json"))
        .expect("config");
    let limits = Limits {
        deadline: std::time::Duration::from_secs(1),
        ..Limits::default()
    };
    let outcomes = built("jwt-auth-js", Slot::Auth, config, limits);
    assert_all_pass("jwt-auth-js", &outcomes, 20);
}

/// On a metered runtime (as `warden plugin test` runs) each case reports the WebAssembly
/// instructions its `configure` and calls executed: the same on every run, and more for a
/// request that does more work.
#[test]
fn a_metered_run_counts_the_same_instructions_every_time() {
    let dir = root().join("plugins/auth-api-key/tests");
    let config = std::fs::read_to_string(dir.join("config.json")).expect("config");
    let path = PathBuf::from(PLUGIN_DIR).join("auth-api-key.wasm");
    let source = PluginSource::from_file(Slot::Auth, &path, None, config, Limits::default())
        .expect("component");
    let runtime = Runtime::builder()
        .instances(8)
        .call_threads(1)
        .metered(true)
        .build()
        .expect("runtime");
    let cases = cases_of("auth-api-key");
    let first = run_cases(&runtime, &source, &cases).expect("cases run");
    let second = run_cases(&runtime, &source, &cases).expect("cases run");
    for (a, b) in first.iter().zip(&second) {
        assert!(a.call_instructions.is_some_and(|n| n > 0), "{}", a.name);
        assert!(
            a.configure_instructions.is_some_and(|n| n > 0),
            "{}",
            a.name
        );
        assert_eq!(a.call_instructions, b.call_instructions, "{}", a.name);
    }
    let by_name = |name: &str| {
        first
            .iter()
            .find(|o| o.name.contains(name))
            .and_then(|o| o.call_instructions)
            .expect(name)
    };
    // Hashing and comparing a key costs more than finding no header.
    assert!(by_name("is its principal") > by_name("no header"));

    // Unmetered (as the server runs), nothing is counted.
    let (runtime, source) = load("auth-api-key", Slot::Auth, "{\"keys\": []}".into());
    let plain = run_cases(&runtime, &source, &cases).expect("cases run");
    assert!(plain.iter().all(|o| o.call_instructions.is_none()));
}
