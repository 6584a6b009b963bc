//! The official OpenAI Python client against a real server.

use std::path::PathBuf;
use std::process::Command;

use warden_tests::{INFERENCE_KEY, config, root, start};

fn python() -> PathBuf {
    let python = std::env::var_os("WARDEN_TEST_PYTHON")
        .map_or_else(|| root().join(".venv/bin/python"), PathBuf::from);
    assert!(
        python.is_file(),
        "no Python with the OpenAI client at {}: run `make venv` (make test does)",
        python.display()
    );
    python
}

#[tokio::test]
async fn the_openai_python_client_works() {
    run_script("openai_client.py", "openai client: all checks passed").await;
}

/// `client.realtime.connect(...)`: a two-turn text conversation over the Realtime API,
/// streamed, with the client's own typed events.
#[tokio::test]
async fn the_openai_python_client_holds_a_realtime_conversation() {
    run_script("openai_realtime.py", "openai realtime: all checks passed").await;
}

/// Run `tests/python/{script}` against a live server; it must print `passed`.
async fn run_script(script: &str, passed: &'static str) {
    let python = python();
    let t = start(config()).await;
    let base = format!("{}/v1", t.base);
    let script = root().join("tests/python").join(script);
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .arg(base)
            .arg(INFERENCE_KEY)
            .output()
            .expect("run python")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "openai client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(passed), "{stdout}");
    t.server.shutdown().await;
}
