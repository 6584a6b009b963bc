//! docs/plugins.md's tutorial, run as written: every `sh` block of its "Tutorial" section,
//! in order, in one `bash -euo pipefail` in an empty directory, with this build's `warden` on
//! the `PATH`. It writes, builds, tests and hot-swaps a plugin in Rust, Python and
//! JavaScript on a live server, so the document cannot drift from what works.
//!
//! Needs what `make test` prepares: the models, the reference plugins in `target/plugins`
//! (`make plugins`), componentize-py in `.venv` (`make python-plugins`), and Node.js with npm
//! (its cache filled by `make js-plugins`).

// Test helpers outside `#[test]` functions may unwrap: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_warden");
/// The whole tutorial: three builds (the Rust one compiles its dependencies), three swaps.
const TIMEOUT: Duration = Duration::from_secs(900);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The `sh` blocks of the section headed `## Tutorial…` of `markdown`, in order.
fn tutorial_blocks(markdown: &str) -> Vec<String> {
    let start = markdown
        .find("\n## Tutorial")
        .expect("docs/plugins.md has a `## Tutorial` section");
    let section = &markdown[start + 1..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in section.lines() {
        match current.as_mut() {
            None if line.trim_end() == "```sh" => current = Some(String::new()),
            None => {}
            Some(_) if line.trim_end() == "```" => blocks.push(current.take().unwrap()),
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
        }
    }
    assert!(current.is_none(), "an unclosed block in the tutorial");
    blocks
}

/// A port free on loopback now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_blocks_of_the_tutorial_are_found() {
    let blocks = tutorial_blocks(
        "# T\n```sh\nnot this\n```\n## Tutorial: x\ntext\n```sh\na\nb\n```\n```rust\nno\n```\n\
         ### Sub\n```sh\nc\n```\n## Next\n```sh\nnot this either\n```\n",
    );
    assert_eq!(blocks, ["a\nb\n", "c\n"]);
}

#[test]
fn the_plugin_tutorial_runs_as_written() {
    let root = root();
    let doc = std::fs::read_to_string(root.join("docs/plugins.md")).unwrap();
    let blocks = tutorial_blocks(&doc);
    assert!(blocks.len() >= 8, "{} blocks", blocks.len());
    let script = blocks.join("\n");
    for tool in ["warden plugin new", "warden plugin test", "/admin/plugins/"] {
        assert!(script.contains(tool), "the tutorial never runs `{tool}`");
    }

    let plugins = root.join("target/plugins");
    assert!(
        plugins.join("auth-api-key.wasm").is_file(),
        "target/plugins has no reference plugins: run `make plugins` (make test does)"
    );
    let venv = root.join(".venv/bin");
    assert!(
        venv.join("componentize-py").is_file(),
        "componentize-py is missing from .venv: run `make python-plugins` (make test does)"
    );
    let models =
        std::env::var_os("WARDEN_MODELS_DIR").map_or_else(|| root.join("models"), PathBuf::from);
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}:{}",
        bin_dir.display(),
        venv.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tutorial.sh"), &script).unwrap();
    let mut command = Command::new("bash");
    command
        .args(["-euo", "pipefail", "tutorial.sh"])
        .current_dir(dir.path())
        .env("PATH", path)
        .env("WARDEN_MODELS_DIR", &models)
        .env("WARDEN_PLUGIN_DIR", &plugins)
        .env("WARDEN_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("WARDEN_ADMIN_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env_remove("WARDEN_CONFIG")
        .env_remove("WARDEN_LOG")
        // The reader's environment: no build settings of this workspace.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Its own process group, so the server it starts goes with it whatever happens.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let child = command.spawn().expect("bash");
    let group = child.id();
    let killer = std::thread::spawn(move || {
        let started = Instant::now();
        while started.elapsed() < TIMEOUT {
            std::thread::sleep(Duration::from_millis(200));
            if Command::new("kill")
                .args(["-0", &group.to_string()])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| !s.success())
            {
                return false;
            }
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{group}")])
            .status();
        true
    });
    let out = child.wait_with_output().unwrap();
    // Whatever the script left running (a server, if it failed half-way) goes too.
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{group}")])
        .stderr(Stdio::null())
        .status();
    let timed_out = killer.join().unwrap();
    let log = std::fs::read_to_string(dir.path().join("warden.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(40)..].join("\n");
    assert!(
        out.status.success() && !timed_out,
        "the tutorial failed ({}{}):\n--- stdout\n{}\n--- stderr\n{}\n--- warden.log (end)\n{}",
        out.status,
        if timed_out { ", timed out" } else { "" },
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        tail,
    );
}
