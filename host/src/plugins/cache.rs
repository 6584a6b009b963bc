//! Compiled components on disk, so that a restart or a swap back to a known plugin does not
//! compile it again.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use super::file_name;

/// Compiled components on disk. Files are named by the engine's compatibility hash and
/// the component's sha256, so a wasmtime upgrade or different settings never load a stale
/// artifact, and a component is compiled once per engine.
#[derive(Debug, Clone)]
pub struct DiskCache {
    dir: PathBuf,
    /// The user that owns the directory, and must own every file loaded from it: Warden's.
    #[cfg(unix)]
    owner: u32,
}

impl DiskCache {
    /// Use `dir` (created with mode 0700 if missing). Refused if group or others may write
    /// to it, or if another user owns it: its files are loaded as machine code.
    pub fn open(dir: &Path) -> Result<Self, String> {
        let name = file_name(dir);
        let io = |e: std::io::Error| format!("plugin cache directory {name}: {}", e.kind());
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(dir).map_err(io)?;
            if meta.mode() & 0o022 != 0 {
                return Err(format!(
                    "plugin cache directory {name} is writable by group or others; \
                     make it 0700 or choose another"
                ));
            }
            // A file Warden creates belongs to Warden's user: the directory must too.
            let probe = dir.join(format!(".owner-{}", std::process::id()));
            let mine = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&probe)
                .and_then(|f| f.metadata())
                .map(|m| m.uid());
            let _ = std::fs::remove_file(&probe);
            let mine = mine.map_err(io)?;
            if meta.uid() != mine {
                return Err(format!(
                    "plugin cache directory {name} belongs to another user; choose another"
                ));
            }
            let cache = Self {
                dir: dir.to_path_buf(),
                owner: mine,
            };
            cache.remove_stale_temporaries();
            Ok(cache)
        }
        #[cfg(not(unix))]
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Whether the file at `path` may be loaded: a regular file (not a link) of the
    /// directory's owner that group and others cannot write. Anything else is ignored (and
    /// replaced by a fresh compile), with a warning unless it is simply missing.
    pub(super) fn trusted(&self, path: &Path) -> bool {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return false;
        };
        #[cfg(unix)]
        let foreign = {
            use std::os::unix::fs::MetadataExt;
            meta.uid() != self.owner || meta.mode() & 0o022 != 0
        };
        #[cfg(not(unix))]
        let foreign = false;
        if !meta.file_type().is_file() || foreign {
            tracing::warn!(
                file = %file_name(path),
                "ignoring a compiled plugin in the cache that is not a regular file of \
                 Warden's user, or that others may change; recompiling"
            );
            return false;
        }
        true
    }

    pub(super) fn path(&self, engine: &Engine, sha256: &[u8; 32]) -> PathBuf {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        self.dir.join(format!(
            "{:016x}-{}.cwasm",
            hasher.finish(),
            hex::encode(sha256)
        ))
    }

    /// The compiled code in a cache file's `bytes`, if its trailing sha256 matches.
    pub(super) fn verified(bytes: &[u8]) -> Option<&[u8]> {
        let (code, sum) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
        (Sha256::digest(code).as_slice() == sum).then_some(code)
    }

    /// Write `component` to `path` atomically (a temporary file, flushed to disk, then
    /// renamed), followed by its sha256; a failure only costs a recompile later.
    pub(super) fn store(&self, path: &Path, component: &Component) {
        let tmp = path.with_extension(format!("{TMP_EXTENSION}{}", std::process::id()));
        let written = component
            .serialize()
            .map_err(|e| e.to_string())
            .and_then(|mut bytes| {
                let sum = Sha256::digest(&bytes);
                bytes.extend_from_slice(&sum);
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create(true).truncate(true);
                // Owner-only whatever the umask: `trusted` refuses files others may change.
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                options
                    .open(&tmp)
                    .and_then(|mut f| {
                        std::io::Write::write_all(&mut f, &bytes)?;
                        f.sync_all()
                    })
                    .and_then(|()| std::fs::rename(&tmp, path))
                    .map_err(|e| e.kind().to_string())
            });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(file = %file_name(path), error = %e, "cannot cache a compiled plugin");
        }
    }

    /// Remove temporary files a process that died mid-write left behind (older than a
    /// minute, so that another live Warden's write in progress is left alone).
    pub(super) fn remove_stale_temporaries(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let temporary = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.starts_with(TMP_EXTENSION));
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(60));
            if temporary && old && std::fs::remove_file(&path).is_ok() {
                tracing::info!(file = %file_name(&path), "removed a partly written cache file");
            }
        }
    }
}

/// Extension (followed by a process id) of a cache file being written.
const TMP_EXTENSION: &str = "tmp";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_cache_file_is_never_handed_to_wasmtime() {
        let mut file = b"compiled code".to_vec();
        file.extend_from_slice(&Sha256::digest(&file));
        assert_eq!(DiskCache::verified(&file), Some(&b"compiled code"[..]));
        for damaged in [
            &file[..file.len() - 1],
            &file[1..],
            &file[..10],
            &[][..],
            &file[..32],
        ] {
            assert_eq!(DiskCache::verified(damaged), None);
        }
        let mut flipped = file.clone();
        flipped[3] ^= 0x10;
        assert_eq!(DiskCache::verified(&flipped), None);
    }

    #[cfg(unix)]
    #[test]
    fn the_disk_cache_loads_only_its_owners_private_files() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("cache");
        let cache = DiskCache::open(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "probe left behind"
        );

        let file = dir.join("a.cwasm");
        std::fs::write(&file, b"x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(cache.trusted(&file));
        assert!(!cache.trusted(&dir.join("missing.cwasm")));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o620)).unwrap();
        assert!(!cache.trusted(&file), "group-writable");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.join("b.cwasm");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(!cache.trusted(&link), "a link");
        let stranger = DiskCache {
            owner: cache.owner.wrapping_add(1),
            ..cache.clone()
        };
        assert!(!stranger.trusted(&file), "another user's file");

        // A directory others may write to is refused.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = DiskCache::open(&dir).unwrap_err();
        assert!(err.contains("writable by group or others"), "{err}");
        assert!(!err.contains(&root.path().display().to_string()), "{err}");
    }
}
