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
    let python = python();
    let t = start(config()).await;
    let base = format!("{}/v1", t.base);
    let script = root().join("tests/python/openai_client.py");
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
    assert!(
        stdout.contains("openai client: all checks passed"),
        "{stdout}"
    );
    t.server.shutdown().await;
}
