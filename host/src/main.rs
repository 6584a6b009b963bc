//! The `warden` binary: `serve`, and `plugin inspect`/`plugin check` for plugin authors.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use warden::plugins::{Limits, PluginSource, Slot};
use warden::scaffold::Lang;

/// jemalloc, which hands freed memory back to the system (after two seconds, set in
/// `.cargo/config.toml`) where glibc's per-thread arenas kept hundreds of MiB after a burst
/// of large requests (docs/performance.md, "Memory").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "warden",
    version,
    about = "An inference server with sandboxed policy plugins"
)]
struct Cli {
    /// Log as JSON lines.
    #[arg(long, env = "WARDEN_LOG_JSON", global = true)]
    log_json: bool,
    /// Log filter, e.g. `info` or `warn,warden=debug` [default: RUST_LOG, else info].
    #[arg(long, env = "WARDEN_LOG", global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the API.
    Serve(Box<warden::config::ServeArgs>),
    /// Inspect or check a plugin component.
    #[command(subcommand)]
    Plugin(PluginCommand),
}

#[derive(Debug, Subcommand)]
enum PluginCommand {
    /// Show a component's world, WIT version, imports, exports, size and sha256.
    Inspect {
        /// The component file.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the validation a live swap runs (integrity, world and version, configuration,
    /// smoke call), offline.
    Check {
        #[command(flatten)]
        plugin: Plugin,
        /// Required sha256 (hex).
        #[arg(long)]
        sha256: Option<String>,
        #[command(flatten)]
        bounds: Bounds,
    },
    /// Start a plugin project that builds on the first try: its source, a passing test case,
    /// and the SDK vendored into it.
    New {
        /// The plugin's name (lower-case letters, digits and `-`).
        name: String,
        /// The slot it fills.
        #[arg(long, value_parser = parse_slot)]
        slot: Slot,
        /// Where to write it [default: ./NAME].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The language: rust, python (componentize-py) or js (componentize-js).
        #[arg(long, default_value = "rust", value_parser = Lang::NAMES)]
        lang: String,
    },
    /// Run test cases (JSON lines) through the plugin on the real runtime, with its slot's
    /// limits: PASS or FAIL per case, with the time and the WebAssembly instructions of each
    /// phase and the memory it took.
    /// Exit status 0 only if every case passes.
    Test {
        #[command(flatten)]
        plugin: Plugin,
        /// The cases: one JSON object per line (see docs/plugins.md).
        #[arg(long)]
        cases: PathBuf,
        /// Print one JSON object per case.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        bounds: Bounds,
    },
}

/// A component, the slot it is for and its configuration.
#[derive(Debug, Clone, clap::Args)]
struct Plugin {
    /// The component file.
    file: PathBuf,
    /// The slot it is for.
    #[arg(long, value_parser = parse_slot)]
    slot: Slot,
    /// Its configuration, a JSON object.
    #[arg(long, default_value = "{}")]
    config: String,
}

/// A plugin's per-call bounds, as the server would give it.
#[derive(Debug, Clone, clap::Args)]
struct Bounds {
    /// Per-call deadline in milliseconds.
    #[arg(long, default_value_t = 10)]
    deadline_ms: u64,
    /// Memory cap in MiB.
    #[arg(long, default_value_t = 16)]
    memory_mib: u64,
}

impl Bounds {
    fn limits(&self, slot: Slot) -> Limits {
        Limits {
            deadline: Duration::from_millis(self.deadline_ms),
            deadline_per_mib: Duration::from_millis(warden::config::default_deadline_ms_per_mib(
                slot,
            )),
            memory_bytes: usize::try_from(self.memory_mib.saturating_mul(1 << 20))
                .unwrap_or(usize::MAX),
        }
    }
}

fn parse_slot(s: &str) -> Result<Slot, String> {
    Slot::from_name(s).ok_or_else(|| "expected auth, sanitizer or metrics-policy".into())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match &cli.log_level {
        Some(level) => EnvFilter::try_new(level).unwrap_or_else(|e| {
            eprintln!("error: --log-level: {e}");
            std::process::exit(2)
        }),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    if !matches!(cli.command, Command::Serve(_)) {
        restore_sigpipe();
    }
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Plugin(PluginCommand::Inspect { file, json }) => inspect(&file, json),
        Command::Plugin(PluginCommand::Check {
            plugin: Plugin { file, slot, config },
            sha256,
            bounds,
        }) => check(&file, slot, config, sha256, bounds.limits(slot)),
        Command::Plugin(PluginCommand::New {
            name,
            slot,
            dir,
            lang,
        }) => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            let lang = Lang::from_name(&lang).unwrap_or(Lang::Rust);
            match warden::scaffold::new(&dir, &name, slot, lang) {
                Ok(project) => {
                    println!(
                        "wrote the {slot} plugin `{name}` ({} files); next:",
                        project.files.len()
                    );
                    println!("  cd {}", dir.display());
                    for step in &project.steps {
                        println!("  {}", step.replace('\n', "\n  "));
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Plugin(PluginCommand::Test {
            plugin: Plugin { file, slot, config },
            cases,
            json,
            bounds,
        }) => test(&file, slot, config, &cases, json, bounds.limits(slot)),
    }
}

/// The tool commands write reports that are piped into `head` or `grep`: like any Unix
/// tool, they end quietly when the reader goes away, where Rust's ignored SIGPIPE would make
/// `println!` panic. The server keeps SIGPIPE ignored, so a closed socket is an error value.
fn restore_sigpipe() {
    // SAFETY: setting a signal to its default disposition has no memory-safety effect; it
    // is done before any of our threads runs, and only changes what a write to a closed
    // pipe does.
    #[allow(unsafe_code)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn serve(args: warden::config::ServeArgs) -> ExitCode {
    let config = match args.resolve() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "invalid configuration");
            return ExitCode::from(2);
        }
    };
    let reloader = warden::Reloader::new(move || args.resolve());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(warden::run(config, reloader)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "warden stopped");
            ExitCode::FAILURE
        }
    }
}

fn read(file: &std::path::Path) -> Result<Vec<u8>, String> {
    std::fs::read(file).map_err(|e| {
        let name = file
            .file_name()
            .map_or_else(|| "?".into(), |n| n.to_string_lossy());
        match e.kind() {
            std::io::ErrorKind::NotFound => format!("plugin file not found: {name}"),
            _ => format!("plugin file not readable: {name}"),
        }
    })
}

/// The plugin runtime of one CLI command: the server's settings, with room for a few
/// instances and one plugin thread.
/// A small runtime for the tool commands; `metered` counts instructions (`plugin test`),
/// otherwise it runs guests as the server does (`plugin check`).
fn cli_runtime(metered: bool) -> Result<std::sync::Arc<warden::plugins::Runtime>, String> {
    warden::plugins::Runtime::builder()
        .instances(16)
        .call_threads(1)
        .metered(metered)
        .build()
}

fn inspect(file: &std::path::Path, json: bool) -> ExitCode {
    let report =
        read(file).and_then(|bytes| warden::plugins::inspect(&*cli_runtime(false)?, &bytes));
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    println!(
        "world:    {}",
        report
            .world
            .as_deref()
            .unwrap_or("none (no warden:policy export)")
    );
    println!(
        "version:  warden:policy@{} ({} this host, which serves {})",
        report.wit_versions.join(", @"),
        if report.served {
            "served by"
        } else {
            "NOT served by"
        },
        warden::plugins::versions_served()
    );
    println!("size:     {} bytes", report.size);
    println!("sha256:   {}", report.sha256);
    println!("imports:");
    for i in &report.imports {
        println!("  {i}");
    }
    println!("exports:");
    for e in &report.exports {
        println!("  {e}");
    }
    ExitCode::SUCCESS
}

fn config_object(config: &str) -> bool {
    matches!(
        serde_json::from_str::<serde_json::Value>(config),
        Ok(serde_json::Value::Object(_))
    )
}

fn test(
    file: &std::path::Path,
    slot: Slot,
    config: String,
    cases: &std::path::Path,
    json: bool,
    limits: Limits,
) -> ExitCode {
    if !config_object(&config) {
        eprintln!("error: --config must be a JSON object");
        return ExitCode::from(2);
    }
    let Ok(text) = std::fs::read_to_string(cases) else {
        eprintln!("error: cannot read the cases file");
        return ExitCode::from(2);
    };
    let outcomes = PluginSource::from_file(slot, file, None, config, limits)
        .map_err(|e| e.to_string())
        .and_then(|source| warden::plugins::run_cases(&cli_runtime(true)?, &source, &text));
    let outcomes = match outcomes {
        Ok(o) => o,
        Err(e) => {
            println!("FAIL: {e}");
            return ExitCode::FAILURE;
        }
    };
    let failed = outcomes.iter().filter(|o| !o.passed).count();
    for o in &outcomes {
        if json {
            println!("{}", serde_json::to_string(o).unwrap_or_default());
            continue;
        }
        let instructions = |n: Option<u64>| n.map_or_else(String::new, |n| format!(", {n} instr."));
        println!(
            "{} {}  (instantiate {:.1} µs, configure {:.1} µs{}, call {:.1} µs{}, memory {} KiB)",
            if o.passed { "PASS" } else { "FAIL" },
            o.name,
            o.instantiate_us,
            o.configure_us,
            instructions(o.configure_instructions),
            o.call_us,
            instructions(o.call_instructions),
            o.peak_memory_bytes >> 10
        );
        if !o.passed {
            println!("  expected: {}", o.expected);
            println!("  answered: {}", o.answer);
        }
    }
    if !json {
        println!("{} passed, {failed} failed", outcomes.len() - failed);
    }
    if failed == 0 && !outcomes.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn check(
    file: &std::path::Path,
    slot: Slot,
    config: String,
    sha256: Option<String>,
    limits: Limits,
) -> ExitCode {
    if !config_object(&config) {
        eprintln!("error: --config must be a JSON object");
        return ExitCode::from(2);
    }
    let source = PluginSource::from_file(slot, file, sha256, config, limits);
    let checked = source.and_then(|s| {
        let runtime = cli_runtime(false).map_err(warden::plugins::LoadError::Runtime)?;
        warden::plugins::check(&runtime, &s)
    });
    match checked {
        Ok(status) => {
            println!(
                "PASS: {} plugin `{}` implements {}@{}, accepts its configuration and \
                 answered its smoke call within {} ms (sha256 {})",
                status.slot,
                status.plugin,
                status.world,
                status.wit_version,
                status.deadline_ms,
                status.sha256
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}
