//! The audit trail of plugin changes: what was asked, by what, and what became of it, kept
//! in memory and appended to a file.

use std::path::Path;
use std::sync::Mutex;

use super::Slot;

/// What set a plugin change in motion; recorded in every audit event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// `PUT /admin/plugins/{slot}`.
    Admin,
    /// `POST /admin/plugins/{slot}/rollback`.
    Rollback,
    /// `POST /admin/reload`.
    Reload,
    /// `SIGHUP`.
    Sighup,
    /// A call from the embedding program (tests, tools).
    Api,
}

impl Trigger {
    /// The trigger's name in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Admin => "admin",
            Trigger::Rollback => "rollback",
            Trigger::Reload => "reload",
            Trigger::Sighup => "sighup",
            Trigger::Api => "api",
        }
    }
}

/// What became of a requested change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The new plugin is live.
    Accepted,
    /// Refused; the old plugin stays live.
    Refused,
    /// The requested plugin is the live one (same bytes, configuration and bounds).
    Unchanged,
}

impl Outcome {
    /// The outcome's name in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Refused => "refused",
            Outcome::Unchanged => "unchanged",
        }
    }
}

/// One change to a slot, accepted or refused.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AuditEvent {
    /// Unix time, milliseconds.
    pub at_ms: u64,
    /// Slot.
    pub slot: Slot,
    /// What asked for the change.
    pub trigger: Trigger,
    /// What became of it.
    pub outcome: Outcome,
    /// The plugin asked for (name).
    pub plugin: String,
    /// The live plugin's sha256 before the change.
    pub old_sha256: String,
    /// The sha256 of the plugin asked for, when its bytes were read.
    pub new_sha256: Option<String>,
    /// Why it was refused.
    pub reason: Option<String>,
    /// How long validation and the swap took, milliseconds.
    pub took_ms: f64,
}

/// Most audit events kept in memory (the log and the audit file keep them all).
pub const AUDIT_EVENTS_KEPT: usize = 256;

/// The audit file: one JSON object per line, appended and flushed to disk for every
/// change, readable by its owner only.
pub struct AuditLog {
    file: Mutex<std::fs::File>,
    name: String,
}

impl AuditLog {
    /// Open (creating it with mode 0600) the audit file at `path` for appending. Called
    /// at start, before the server listens, so that an audit trail that cannot be written
    /// stops the start with this error rather than losing events later.
    pub fn open(path: &Path) -> Result<Self, String> {
        let name = super::file_name(path);
        let io = |e: std::io::Error| format!("audit log {name}: {}", e.kind());
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(path).map_err(io)?;
        Ok(Self {
            file: Mutex::new(file),
            name,
        })
    }

    /// Append `event` and flush it to disk; a failure is logged as an error.
    pub(super) fn append(&self, event: &AuditEvent) {
        let mut line = serde_json::to_vec(event).unwrap_or_default();
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let written = std::io::Write::write_all(&mut *file, &line).and_then(|()| file.sync_data());
        if let Err(e) = written {
            tracing::error!(file = %self.name, error = %e.kind(), "cannot append to the audit log");
        }
    }
}
