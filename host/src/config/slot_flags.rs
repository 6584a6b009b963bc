//! The per-slot flags of `warden serve`, made from [`SLOT_KINDS`]: for a slot named NAME,
//! `--NAME-plugin`, `--NAME-plugin-sha256`, `--NAME-plugin-config`, `--NAME-deadline-ms`
//! and `--NAME-memory-mib`; `--NAME-deadline-ms-per-mib` where its calls take client text;
//! `--NAME-failure` where it may fail open. Each reads `WARDEN_` and the flag's name in
//! capitals with underscores.

use std::path::PathBuf;

use clap::{Arg, ArgMatches, Command, FromArgMatches};

use super::{ConfigError, SlotConfig};
use crate::plugins::{FailurePolicy, SLOT_KINDS, Slot, SlotKind};

/// One slot's flags, as given.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SlotArgs {
    /// Component file, relative to the plugin directory.
    pub file: Option<PathBuf>,
    /// Required sha256 of the component.
    pub sha256: Option<String>,
    /// The plugin's configuration, a JSON object.
    pub config: Option<String>,
    /// Per-call deadline.
    pub deadline_ms: Option<u64>,
    /// Deadline added per MiB of client text.
    pub deadline_ms_per_mib: Option<u64>,
    /// Memory cap.
    pub memory_mib: Option<u64>,
    /// What a fault does.
    pub failure: Option<FailurePolicy>,
}

/// Every slot's flags.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SlotFlags(pub [SlotArgs; 3]);

/// Which setting a flag sets.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Key {
    File,
    Sha256,
    Config,
    DeadlineMs,
    DeadlineMsPerMib,
    MemoryMib,
    Failure,
}

/// The flags a slot kind has: (suffix of `--NAME`, setting, value name, help).
fn flags(kind: &SlotKind) -> Vec<(&'static str, Key, &'static str, String)> {
    let name = kind.name;
    let mut flags = vec![
        (
            "plugin",
            Key::File,
            "FILE",
            format!("{name} plugin: component file, relative to the plugin directory"),
        ),
        (
            "plugin-sha256",
            Key::Sha256,
            "HEX",
            format!("{name} plugin: required sha256 of the component (hex)"),
        ),
        (
            "plugin-config",
            Key::Config,
            "JSON",
            format!("{name} plugin: its configuration, a JSON object (replaces the file's table)"),
        ),
        (
            "deadline-ms",
            Key::DeadlineMs,
            "MS",
            format!("{name} plugin: per-call deadline in milliseconds [default: 10]"),
        ),
        (
            "memory-mib",
            Key::MemoryMib,
            "MIB",
            format!("{name} plugin: memory cap in MiB [default: 16]"),
        ),
    ];
    if kind.takes_client_text {
        flags.push((
            "deadline-ms-per-mib",
            Key::DeadlineMsPerMib,
            "MS",
            format!(
                "{name} plugin: milliseconds added to a call's deadline per MiB of client \
                 text in it [default: {}]",
                kind.default_deadline_ms_per_mib()
            ),
        ));
    }
    if kind.may_fail_open {
        flags.push((
            "failure",
            Key::Failure,
            "open|closed",
            format!(
                "{name} plugin: what a fault does, `open` or `closed` [default: {}]",
                failure_name(kind.default_failure)
            ),
        ));
    }
    flags
}

fn failure_name(f: FailurePolicy) -> &'static str {
    match f {
        FailurePolicy::Open => "open",
        FailurePolicy::Closed => "closed",
    }
}

fn parse_failure(s: &str) -> Result<FailurePolicy, String> {
    match s {
        "open" => Ok(FailurePolicy::Open),
        "closed" => Ok(FailurePolicy::Closed),
        _ => Err("expected `open` or `closed`".into()),
    }
}

/// `NAME-SUFFIX`, the flag's long name and id.
fn long(kind: &SlotKind, suffix: &str) -> String {
    format!("{}-{suffix}", kind.name)
}

/// The variable a flag reads: `WARDEN_` and its name in capitals with underscores.
pub fn env_name(flag: &str) -> String {
    format!("WARDEN_{}", flag.replace('-', "_").to_ascii_uppercase())
}

/// Every per-slot flag and its variable, in help order: for the docs' table.
pub fn all_flags() -> Vec<(String, String)> {
    SLOT_KINDS
        .iter()
        .flat_map(|kind| {
            flags(kind).into_iter().map(move |(suffix, ..)| {
                let flag = long(kind, suffix);
                (format!("--{flag}"), env_name(&flag))
            })
        })
        .collect()
}

impl clap::Args for SlotFlags {
    fn augment_args(mut cmd: Command) -> Command {
        for kind in &SLOT_KINDS {
            for (suffix, key, value_name, help) in flags(kind) {
                let id = long(kind, suffix);
                let arg = Arg::new(id.clone())
                    .long(id.clone())
                    .env(env_name(&id))
                    .value_name(value_name)
                    .help(help)
                    .required(false);
                let arg = match key {
                    Key::File => arg.value_parser(clap::value_parser!(PathBuf)),
                    Key::Sha256 => arg,
                    Key::Config => arg.hide_env_values(true),
                    Key::DeadlineMs | Key::DeadlineMsPerMib | Key::MemoryMib => {
                        arg.value_parser(clap::value_parser!(u64))
                    }
                    Key::Failure => arg.value_parser(parse_failure),
                };
                cmd = cmd.arg(arg);
            }
        }
        cmd
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for SlotFlags {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut out = Self::default();
        for kind in &SLOT_KINDS {
            let args = &mut out.0[kind.slot.index()];
            for (suffix, key, ..) in flags(kind) {
                let id = long(kind, suffix);
                match key {
                    Key::File => args.file = m.get_one::<PathBuf>(&id).cloned(),
                    Key::Sha256 => args.sha256 = m.get_one::<String>(&id).cloned(),
                    Key::Config => args.config = m.get_one::<String>(&id).cloned(),
                    Key::DeadlineMs => args.deadline_ms = m.get_one::<u64>(&id).copied(),
                    Key::DeadlineMsPerMib => {
                        args.deadline_ms_per_mib = m.get_one::<u64>(&id).copied();
                    }
                    Key::MemoryMib => args.memory_mib = m.get_one::<u64>(&id).copied(),
                    Key::Failure => args.failure = m.get_one::<FailurePolicy>(&id).copied(),
                }
            }
        }
        Ok(out)
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl SlotFlags {
    /// The flags given for `slot`.
    pub fn slot(&self, slot: Slot) -> &SlotArgs {
        &self.0[slot.index()]
    }

    /// The flags given for `slot`, to set.
    pub fn slot_mut(&mut self, slot: Slot) -> &mut SlotArgs {
        &mut self.0[slot.index()]
    }
}

impl SlotArgs {
    /// Lay these flags over `slot`'s configuration from the file.
    pub(super) fn overlay(&self, slot: Slot, config: &mut SlotConfig) -> Result<(), ConfigError> {
        if let Some(file) = &self.file {
            config.file = Some(file.clone());
            // A digest pinned for the file's component does not hold for another file.
            config.sha256 = None;
        }
        if let Some(v) = &self.sha256 {
            config.sha256 = Some(v.clone());
        }
        if let Some(json) = &self.config {
            match serde_json::from_str::<serde_json::Value>(json) {
                Ok(serde_json::Value::Object(map)) => config.config = map,
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "the {slot} plugin configuration must be a JSON object"
                    )));
                }
            }
        }
        if let Some(v) = self.deadline_ms {
            config.deadline_ms = v;
        }
        if let Some(v) = self.deadline_ms_per_mib {
            config.deadline_ms_per_mib = Some(v);
        }
        if let Some(v) = self.memory_mib {
            config.memory_mib = v;
        }
        if let Some(v) = self.failure {
            config.failure = Some(v);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operations_guide_names_every_slot_flag_and_variable() {
        let docs = include_str!("../../../docs/operations.md");
        for kind in &SLOT_KINDS {
            for (suffix, ..) in flags(kind) {
                let flag = long(kind, suffix);
                let exact = format!("| `--{flag}` | `{}` |", env_name(&flag));
                let generic = format!(
                    "| `--SLOT-{suffix}` | `{}` |",
                    env_name(&format!("SLOT-{suffix}"))
                );
                assert!(
                    docs.contains(&exact) || docs.contains(&generic),
                    "docs/operations.md has no row for --{flag}"
                );
            }
        }
    }

    #[test]
    fn every_slot_gets_its_flags_and_variables() {
        let flags = all_flags();
        for kind in &SLOT_KINDS {
            let plugin = format!("--{}-plugin", kind.name);
            assert!(flags.iter().any(|(f, _)| *f == plugin), "{plugin}");
        }
        assert!(flags.contains(&(
            "--metrics-policy-failure".into(),
            "WARDEN_METRICS_POLICY_FAILURE".into()
        )));
        assert!(!flags.iter().any(|(f, _)| f == "--auth-failure"));
        assert!(flags.contains(&(
            "--sanitizer-deadline-ms-per-mib".into(),
            "WARDEN_SANITIZER_DEADLINE_MS_PER_MIB".into()
        )));
    }
}
