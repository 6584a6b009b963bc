//! `warden plugin new`: a plugin project that builds on the first try, outside any
//! workspace, with a passing test case, in Rust, Python or JavaScript. The Python project
//! carries the WIT and a `build.sh` for componentize-py; the JavaScript one the WIT and a
//! `package.json` for componentize-js. The Rust project depends on a copy of the
//! `warden-policy` SDK vendored into it (`vendor/warden-sdk`, the same sources as this
//! binary's `sdk/`), so it needs nothing but crates.io and the `wasm32-wasip2` target.

use std::path::{Path, PathBuf};

use crate::plugins::Slot;

/// The SDK's sources, as this binary was built with them: (path under `vendor/warden-sdk`,
/// contents).
const SDK: [(&str, &str); 12] = [
    ("rust/src/lib.rs", include_str!("../../sdk/rust/src/lib.rs")),
    (
        "rust/src/helpers.rs",
        include_str!("../../sdk/rust/src/helpers.rs"),
    ),
    (
        "rust/wit/0.1.0/types.wit",
        include_str!("../../sdk/rust/wit/0.1.0/types.wit"),
    ),
    (
        "rust/wit/0.1.0/auth.wit",
        include_str!("../../sdk/rust/wit/0.1.0/auth.wit"),
    ),
    (
        "rust/wit/0.1.0/sanitizer.wit",
        include_str!("../../sdk/rust/wit/0.1.0/sanitizer.wit"),
    ),
    (
        "rust/wit/0.1.0/metrics.wit",
        include_str!("../../sdk/rust/wit/0.1.0/metrics.wit"),
    ),
    (
        "rust/wit/0.1.0/worlds.wit",
        include_str!("../../sdk/rust/wit/0.1.0/worlds.wit"),
    ),
    ("auth/src/lib.rs", include_str!("../../sdk/auth/src/lib.rs")),
    (
        "sanitizer/src/lib.rs",
        include_str!("../../sdk/sanitizer/src/lib.rs"),
    ),
    (
        "metrics/src/lib.rs",
        include_str!("../../sdk/metrics/src/lib.rs"),
    ),
    ("rust/Cargo.toml", SDK_MANIFEST),
    (
        "README.md",
        "The warden-policy SDK, vendored by `warden plugin new`.\n",
    ),
];

const SDK_MANIFEST: &str = r#"[package]
name = "warden-policy"
version = "0.1.0"
edition = "2024"
license = "Apache-2.0"
publish = false

[dependencies]
warden-policy-auth = { path = "../auth" }
warden-policy-sanitizer = { path = "../sanitizer" }
warden-policy-metrics = { path = "../metrics" }
wit-bindgen = "0.46"
serde = { version = "1", features = ["derive"] }
serde_json = "1"
subtle = "2.6"
"#;

/// A bindings crate's manifest.
fn bindings_manifest(dir: &str) -> String {
    format!(
        "[package]\nname = \"warden-policy-{dir}\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\
         license = \"Apache-2.0\"\npublish = false\n\n[dependencies]\nwit-bindgen = \"0.46\"\n"
    )
}

/// The project's own manifest.
fn manifest(name: &str) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
warden-policy = {{ path = "vendor/warden-sdk/rust" }}
serde = {{ version = "1", features = ["derive"] }}

# Not part of any enclosing workspace.
[workspace]

[profile.release]
opt-level = "s"
debug = false
strip = "debuginfo"
"#
    )
}

/// What a new plugin of `slot` starts as: its source, its configuration and its cases.
fn template(slot: Slot) -> (&'static str, &'static str, &'static str) {
    match slot {
        Slot::Auth => (
            include_str!("scaffold/auth.rs"),
            "{\"token\": \"change-me-to-a-long-secret\"}\n",
            "{\"name\": \"the configured token is a client\", \"request\": {\"headers\": \
             {\"authorization\": \"Bearer change-me-to-a-long-secret\"}}, \"expect\": \
             {\"principal\": {\"id\": \"client\", \"scopes\": [\"inference\"]}}}\n\
             {\"name\": \"no token is refused\", \"request\": {}, \"expect\": {\"refusal\": \
             {\"status\": 401, \"code\": \"missing_api_key\"}}}\n",
        ),
        Slot::Sanitizer => (
            include_str!("scaffold/sanitizer.rs"),
            "{\"blocked\": [\"secret project\"]}\n",
            "{\"name\": \"plain input passes\", \"input\": {\"kind\": \"chat\", \"messages\": \
             [{\"role\": \"user\", \"content\": \"hello\"}]}, \"expect\": {\"pass\": true}}\n\
             {\"name\": \"a blocked word is refused\", \"input\": {\"kind\": \"embeddings\", \
             \"texts\": [\"about the Secret Project\"]}, \"expect\": {\"refusal\": \
             {\"status\": 400, \"code\": \"blocked_word\"}}}\n",
        ),
        Slot::MetricsPolicy => (
            include_str!("scaffold/metrics.rs"),
            "{}\n",
            "{\"name\": \"route and status class\", \"summary\": {\"route\": \
             \"/v1/embeddings\", \"status\": 200}, \"expect\": {\"labels\": {\"route\": \
             \"/v1/embeddings\", \"status_class\": \"2xx\", \"tenant\": null}}}\n",
        ),
    }
}

/// A project's README: what it is and the commands that build and test it.
fn readme(name: &str, slot: Slot, lang: Lang, steps: &[String]) -> String {
    format!(
        "# {name}\n\nA Warden {slot} plugin in {}, made by `warden plugin new`.\n\n\
         ```sh\n{}\n```\n\nThen put it live: see Warden's docs/plugins.md.\n",
        lang.title(),
        steps.join("\n")
    )
}

/// The languages a project can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// Rust, on the vendored `warden-policy` SDK.
    Rust,
    /// Python, built with componentize-py.
    Python,
    /// JavaScript, built with componentize-js.
    Js,
}

impl Lang {
    /// The names `--lang` takes.
    pub const NAMES: [&'static str; 3] = ["rust", "python", "js"];

    /// The language named `name` (one of [`Lang::NAMES`]).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "rust" => Some(Self::Rust),
            "python" => Some(Self::Python),
            "js" => Some(Self::Js),
            _ => None,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Self::Rust => "Rust",
            Self::Python => "Python",
            Self::Js => "JavaScript",
        }
    }
}

/// A project written by [`new`].
#[derive(Debug, Clone)]
pub struct Project {
    /// The files written, relative to the project directory.
    pub files: Vec<PathBuf>,
    /// The component its build writes, relative to the project directory.
    pub component: PathBuf,
    /// The shell commands, run in the project directory, that build it and run its cases.
    pub steps: Vec<String>,
}

/// Write a new plugin project for `slot` named `name` in `lang` into `dir` (which must not
/// exist, or be empty).
pub fn new(dir: &Path, name: &str, slot: Slot, lang: Lang) -> Result<Project, String> {
    check_target(dir, name)?;
    let component = match lang {
        Lang::Rust => PathBuf::from(format!(
            "target/wasm32-wasip2/release/{}.wasm",
            name.replace('-', "_")
        )),
        Lang::Python | Lang::Js => PathBuf::from(format!("{name}.wasm")),
    };
    let test = |bounds: &str| {
        format!(
            "warden plugin test {} --slot {slot}{bounds} \\\n  \
             --config \"$(cat tests/config.json)\" --cases tests/cases.jsonl",
            component.display()
        )
    };
    let steps = match lang {
        Lang::Rust => vec![
            "rustup target add wasm32-wasip2".into(),
            "cargo build --release --target wasm32-wasip2".into(),
            test(""),
        ],
        // CPython's heap needs more than the default 16 MiB.
        Lang::Python => vec![
            "pip install componentize-py==0.25.1".into(),
            "sh build.sh".into(),
            test(" --memory-mib 64"),
        ],
        Lang::Js => vec!["npm install".into(), "npm run build".into(), test("")],
    };
    let (source, config, cases) = template(slot);
    let mut files: Vec<(PathBuf, String)> = vec![
        ("tests/config.json".into(), config.to_string()),
        ("tests/cases.jsonl".into(), cases.to_string()),
        ("README.md".into(), readme(name, slot, lang, &steps)),
    ];
    match lang {
        Lang::Rust => rust_files(name, source, &mut files),
        Lang::Python => python_files(name, slot, &mut files),
        Lang::Js => js_files(name, slot, &mut files),
    }
    Ok(Project {
        files: write_all(dir, files)?,
        component,
        steps,
    })
}

/// Whether `name` can be a crate and a plugin name: lower-case letters, digits and `-`,
/// starting with a letter, at most 64.
fn valid_name(name: &str) -> bool {
    name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// The WIT files vendored into a Python or JavaScript project (`wit/`).
fn wit_files() -> impl Iterator<Item = (&'static str, &'static str)> {
    SDK.iter()
        .filter_map(|(path, text)| Some((path.strip_prefix("rust/wit/0.1.0/")?, *text)))
}

/// A Python project's build script: bindings from the vendored WIT, then the component.
fn python_build(name: &str, slot: Slot) -> String {
    let world = slot.world();
    format!(
        "#!/bin/sh\n# Needs componentize-py (pip install componentize-py==0.25.1).\nset -e\n\
         cd \"$(dirname \"$0\")\"\n\
         componentize-py -d wit -w warden:policy/{world}@0.1.0 bindings build/bindings\n\
         # Warden gives a plugin no WASI: stub it (CPython would import sockets and files).\n\
         componentize-py -d wit -w warden:policy/{world}@0.1.0 componentize --stub-wasi \\\n  \
         -p src -p build/bindings app -o {name}.wasm\n"
    )
}

/// A Python project's files: its sources, the WIT and `build.sh` for componentize-py.
fn python_files(name: &str, slot: Slot, files: &mut Vec<(PathBuf, String)>) {
    files.push(("build.sh".into(), python_build(name, slot)));
    files.push((".gitignore".into(), "/build\n*.wasm\n".into()));
    let sources: &[(&str, &str)] = match slot {
        Slot::Auth => &[("app.py", include_str!("scaffold/python/auth.py"))],
        Slot::Sanitizer => &[
            ("app.py", include_str!("scaffold/python/sanitizer_app.py")),
            (
                "sanitizer.py",
                include_str!("scaffold/python/sanitizer_filter.py"),
            ),
        ],
        Slot::MetricsPolicy => &[("app.py", include_str!("scaffold/python/metrics.py"))],
    };
    for (file, text) in sources {
        files.push((Path::new("src").join(file), text.to_string()));
    }
    for (file, text) in wit_files() {
        files.push((Path::new("wit").join(file), text.to_string()));
    }
}

/// A JavaScript project's `package.json`: componentize-js, pinned, and the build.
fn js_manifest(name: &str, slot: Slot) -> String {
    let world = slot.world();
    format!(
        r#"{{
  "name": "{name}",
  "version": "0.1.0",
  "private": true,
  "type": "module",
  "scripts": {{
    "build": "componentize-js src/app.js --wit wit --world-name {world} --disable http fetch-event -o {name}.wasm"
  }},
  "devDependencies": {{
    "@bytecodealliance/componentize-js": "0.23.0",
    "@bytecodealliance/preview2-shim": "0.25.0"
  }},
  "comment": "componentize-js 0.23.0 imports preview2-shim without declaring it, hence the second entry. --disable drops the WASI imports Warden does not grant (outbound HTTP)."
}}
"#
    )
}

/// A JavaScript project's files: its source, the WIT and `package.json`.
fn js_files(name: &str, slot: Slot, files: &mut Vec<(PathBuf, String)>) {
    files.push(("package.json".into(), js_manifest(name, slot)));
    files.push((".gitignore".into(), "/node_modules\n*.wasm\n".into()));
    let source = match slot {
        Slot::Auth => include_str!("scaffold/js/auth.js"),
        Slot::Sanitizer => include_str!("scaffold/js/sanitizer.js"),
        Slot::MetricsPolicy => include_str!("scaffold/js/metrics.js"),
    };
    files.push(("src/app.js".into(), source.to_string()));
    for (file, text) in wit_files() {
        files.push((Path::new("wit").join(file), text.to_string()));
    }
}

/// A name and a directory a project may be written to.
fn check_target(dir: &Path, name: &str) -> Result<(), String> {
    if !valid_name(name) {
        return Err(format!(
            "`{name}` is not a plugin name: lower-case letters, digits and `-`, starting \
             with a letter"
        ));
    }
    if dir.exists() && dir.read_dir().map_or(true, |mut d| d.next().is_some()) {
        return Err("the directory exists and is not empty".into());
    }
    Ok(())
}

/// Write `files` under `dir`; the paths written.
fn write_all(dir: &Path, files: Vec<(PathBuf, String)>) -> Result<Vec<PathBuf>, String> {
    let mut written = Vec::with_capacity(files.len());
    for (path, text) in files {
        let full = dir.join(&path);
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create a directory: {}", e.kind()))?;
        }
        std::fs::write(&full, text)
            .map_err(|e| format!("cannot write {}: {}", path.display(), e.kind()))?;
        written.push(path);
    }
    Ok(written)
}

/// A Rust project's files: its manifest, its source and the vendored SDK.
fn rust_files(name: &str, source: &str, files: &mut Vec<(PathBuf, String)>) {
    files.push(("Cargo.toml".into(), manifest(name)));
    files.push(("src/lib.rs".into(), source.to_string()));
    files.push((".gitignore".into(), "/target\n".into()));
    for (path, text) in SDK {
        files.push((Path::new("vendor/warden-sdk").join(path), text.to_string()));
    }
    for crate_dir in ["auth", "sanitizer", "metrics"] {
        files.push((
            Path::new("vendor/warden-sdk")
                .join(crate_dir)
                .join("Cargo.toml"),
            bindings_manifest(crate_dir),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_crate_names() {
        assert!(valid_name("my-auth2"));
        for bad in ["", "My", "9lives", "a_b", "a/b", "../x", &"a".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn a_project_is_written_once_with_the_vendored_sdk() {
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().join("p");
        let files = new(&project, "my-auth", Slot::Auth, Lang::Rust)
            .unwrap()
            .files;
        assert!(
            files
                .iter()
                .any(|f| f.ends_with("vendor/warden-sdk/rust/src/lib.rs"))
        );
        let manifest = std::fs::read_to_string(project.join("Cargo.toml")).unwrap();
        assert!(manifest.contains("name = \"my-auth\"") && manifest.contains("[workspace]"));
        let source = std::fs::read_to_string(project.join("src/lib.rs")).unwrap();
        assert!(source.contains("export_auth!"));
        assert!(
            new(&project, "my-auth", Slot::Auth, Lang::Rust).is_err(),
            "not over itself"
        );
    }
}
