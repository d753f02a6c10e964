//! Drain (SPEC 7): a node taken out of rotation for maintenance. While draining,
//! `/healthz` answers 503 `draining` so load balancers and the control plane send new
//! clients elsewhere, and every request that still arrives is served as usual.
//!
//! The state is a file next to `server.upgrade_sock` (`draining`): it survives an
//! upgrade hand-over (the new process reads it at start) and, since that directory is
//! usually on a tmpfs (`/run/cdn-edge`), not a reboot.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Name of the file that says the node is draining.
const FILE_NAME: &str = "draining";

pub struct Drain {
    draining: AtomicBool,
    file: PathBuf,
}

impl Drain {
    /// The drain state of a node whose upgrade socket is `upgrade_sock`, as left by the
    /// process before (blocking: call at start).
    pub fn load(upgrade_sock: &Path) -> Self {
        let file = upgrade_sock
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(FILE_NAME);
        let draining = file.exists();
        if draining {
            tracing::warn!(file = %file.display(), "starting drained: /healthz answers 503 until DELETE /drain");
        }
        Self {
            draining: AtomicBool::new(draining),
            file,
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Turns draining on or off and records it for the next process; an error means it
    /// is on (or off) now but will not survive an upgrade.
    pub async fn set(&self, on: bool) -> std::io::Result<()> {
        self.draining.store(on, Ordering::Relaxed);
        let file = self.file.clone();
        let write = tokio::task::spawn_blocking(move || {
            if on {
                if let Some(dir) = file.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(&file, b"draining\n")
            } else {
                match std::fs::remove_file(&file) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    other => other,
                }
            }
        })
        .await;
        let result = write.unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match &result {
            Ok(()) => tracing::info!(draining = on, "drain state changed"),
            Err(e) => tracing::error!(draining = on, file = %self.file.display(), error = %e,
                "drain state changed but not recorded: an upgrade will not keep it"),
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_state_survives_into_the_next_process() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("upgrade.sock");
        let first = Drain::load(&sock);
        assert!(!first.is_draining());
        first.set(true).await.unwrap();
        assert!(first.is_draining());
        assert!(Drain::load(&sock).is_draining());
        first.set(false).await.unwrap();
        assert!(!Drain::load(&sock).is_draining());
        first.set(false).await.unwrap();
    }
}
