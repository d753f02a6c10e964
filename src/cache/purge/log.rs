//! The purge log on disk: `<cache.disk.path>/purges.log`, JSON lines.
//!
//! ```text
//! {"log":"5f0c2a9e81d4b7c3"}                                   the log's identity
//! {"seq":1,"id":1234567890,"o":"movie","v":"1080p","at":1700000000000}
//! {"seq":2,"id":987654321,"o":"movie","v":null,"at":1700000000123}   every version
//! ```
//! Each purge is appended as one line with an fsync, before it is swept. A line that
//! does not parse (the last one, cut by a crash) is skipped, and the file is rewritten
//! whole at the next purge; so is a file with no head. When the file holds twice
//! [`super::MAX_ENTRIES`] lines it is rewritten with the newest entries (to a temporary
//! file, fsynced, renamed). Blocking: called on the blocking pool or at start.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::Entry;

/// File name of the log in the disk tier's directory.
pub const FILE_NAME: &str = "purges.log";

/// The first line.
#[derive(Serialize, Deserialize)]
struct Head {
    log: String,
}

/// What a log file held when it was opened.
pub struct Loaded {
    /// `None` when the file is new or its first line is unreadable.
    pub incarnation: Option<String>,
    pub entries: Vec<Entry>,
}

/// The log file; appends and rewrites take turns.
pub struct LogFile {
    path: PathBuf,
    /// Lines in the file (its head included); 0: not created yet.
    lines: AtomicUsize,
    /// Held while writing, so a rewrite never loses an append.
    write: Mutex<()>,
}

impl LogFile {
    /// Reads `dir/purges.log` if it exists; writes nothing.
    pub fn open(dir: &Path) -> io::Result<(Self, Loaded)> {
        let path = dir.join(FILE_NAME);
        let mut loaded = Loaded {
            incarnation: None,
            entries: Vec::new(),
        };
        let mut lines = 0;
        match std::fs::read(&path) {
            Ok(bytes) => {
                let mut skipped = 0;
                for (i, line) in bytes.lines().enumerate() {
                    let line = line?;
                    lines += 1;
                    if i == 0 {
                        if let Ok(h) = serde_json::from_str::<Head>(&line) {
                            loaded.incarnation = Some(h.log);
                            continue;
                        }
                    }
                    match serde_json::from_str::<Entry>(&line) {
                        Ok(e) => loaded.entries.push(e),
                        Err(_) => skipped += 1,
                    }
                }
                if skipped > 0 {
                    tracing::warn!(path = %path.display(), lines = skipped, "unreadable lines in the purge log skipped");
                }
                if loaded.incarnation.is_none() {
                    // Started again under a new identity, so peers read it all again.
                    loaded.entries.clear();
                }
                if loaded.incarnation.is_none() || skipped > 0 || !bytes.ends_with(b"\n") {
                    // Rewritten whole at the next purge, never appended to.
                    lines = 0;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        loaded.entries.sort_by_key(|e| e.seq);
        let file = Self {
            path,
            lines: AtomicUsize::new(lines),
            write: Mutex::new(()),
        };
        Ok((file, loaded))
    }

    /// Lines in the file; 0 when it must be written whole ([`LogFile::rewrite`]) rather
    /// than appended to: new, or found damaged.
    pub fn lines(&self) -> usize {
        self.lines.load(Ordering::Relaxed)
    }

    /// Appends one entry and fsyncs. The file must exist whole (`lines() > 0`).
    pub fn append(&self, entry: &Entry) -> io::Result<()> {
        let _turn = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let mut line = serde_json::to_vec(entry).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut f = OpenOptions::new().append(true).open(&self.path)?;
        f.write_all(&line)?;
        f.sync_data()?;
        self.lines.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Replaces the file with `entries` under `incarnation`.
    pub fn rewrite(&self, incarnation: &str, entries: &[Entry]) -> io::Result<()> {
        let _turn = self.write.lock().unwrap_or_else(|e| e.into_inner());
        self.rewrite_locked(incarnation, entries)
    }

    fn rewrite_locked(&self, incarnation: &str, entries: &[Entry]) -> io::Result<()> {
        let tmp = self.path.with_extension("log.tmp");
        let mut text = serde_json::to_vec(&Head {
            log: incarnation.to_string(),
        })
        .map_err(io::Error::other)?;
        text.push(b'\n');
        for e in entries {
            serde_json::to_writer(&mut text, e).map_err(io::Error::other)?;
            text.push(b'\n');
        }
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            // The rename itself is durable once the directory is.
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        self.lines.store(entries.len() + 1, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::PurgeRecord;
    use super::*;

    fn entry(seq: u64) -> Entry {
        Entry {
            seq,
            record: PurgeRecord {
                id: 1000 + seq,
                o: "movie".into(),
                v: seq.is_multiple_of(2).then(|| seq.to_string()),
            },
            at: 5000 + seq,
        }
    }

    #[test]
    fn entries_survive_a_reopen_and_a_torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (log, loaded) = LogFile::open(dir.path()).unwrap();
        assert!(loaded.incarnation.is_none() && loaded.entries.is_empty());
        assert!(
            !dir.path().join(FILE_NAME).exists(),
            "opening writes nothing"
        );
        log.rewrite("abc", &[entry(1)]).unwrap();
        log.append(&entry(2)).unwrap();
        assert_eq!(log.lines(), 3);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE_NAME))
            .unwrap();
        f.write_all(b"{\"seq\":3,\"id\":").unwrap();
        let (log, loaded) = LogFile::open(dir.path()).unwrap();
        assert_eq!(loaded.incarnation.as_deref(), Some("abc"));
        assert_eq!(loaded.entries, vec![entry(1), entry(2)]);
        assert_eq!(
            log.lines(),
            0,
            "a damaged file is rewritten, not appended to"
        );
        log.rewrite("abc", &loaded.entries[1..]).unwrap();
        let (_, loaded) = LogFile::open(dir.path()).unwrap();
        assert_eq!(loaded.entries, vec![entry(2)]);
    }
}
