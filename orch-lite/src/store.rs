//! The embedded store shared by the roles: named tables of JSON documents keyed by string, held
//! in memory and persisted under one directory as a snapshot plus an append-only JSON-lines log.
//! It knows nothing about nodes, jobs or clusters, and it is not a database: no queries, no
//! transactions across keys; one process owns a directory at a time (an exclusive `flock`).
//!
//! Files in the directory:
//! - `snapshot.json`: `{"version":1,"tables":{"<table>":{"<key>":<doc>,…},…}}`, replaced
//!   atomically (write `snapshot.json.tmp`, fsync, rename, fsync the directory);
//! - `log.jsonl`: one operation per line, `{"op":"put","table","key","value"}` or
//!   `{"op":"del","table","key"}`, applied on top of the snapshot at open. Operations are
//!   absolute (no increments), so replaying a log whose compaction already reached the snapshot
//!   is harmless;
//! - `lock`: held with `flock` while the store is open.
//!
//! After a crash the log may end in a partial or garbled line: `open` keeps every operation
//! before the first bad line, truncates the file there, logs how many bytes were dropped and
//! reports it in [`Recovery`].

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

const SNAPSHOT: &str = "snapshot.json";
const LOG: &str = "log.jsonl";
const LOCK: &str = "lock";
/// Log lines after which `put`/`delete` compact on their own. Small enough that a restart replays
/// quickly, large enough that a busy cluster does not rewrite the snapshot every few seconds.
pub const DEFAULT_COMPACT_AFTER: usize = 10_000;

/// Whether a write must be on disk before the call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync before returning: registrations, placements, deletions — anything a restart must
    /// not forget.
    Sync,
    /// Written to the OS, fsynced by the next `Sync` write, [`Store::sync`] or compaction:
    /// metrics and other values the next report refreshes anyway.
    Lazy,
}

#[derive(Debug)]
pub enum StoreError {
    Io {
        path: PathBuf,
        op: &'static str,
        err: std::io::Error,
    },
    Locked(PathBuf),
    Snapshot {
        path: PathBuf,
        err: String,
    },
    Encode(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Io { path, op, err } => write!(
                f,
                "store: cannot {op} {}: {err} (check that OAK_DATA_DIR exists, is writable and the disk is not full)",
                path.display()
            ),
            StoreError::Locked(p) => write!(
                f,
                "store: {} is in use by another orch-lite process; stop it or set a different OAK_DATA_DIR",
                p.display()
            ),
            StoreError::Snapshot { path, err } => write!(
                f,
                "store: snapshot {} is unreadable ({err}); restore it from a backup or move it away to start empty",
                path.display()
            ),
            StoreError::Encode(e) => write!(f, "store: cannot encode document: {e}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// What `open` found on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    pub snapshot_docs: usize,
    pub log_ops: usize,
    /// Bytes cut from the end of the log because they did not form a complete operation.
    pub truncated_bytes: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Op {
    Put {
        table: String,
        key: String,
        value: Value,
    },
    Del {
        table: String,
        key: String,
    },
}

#[derive(Serialize, Deserialize, Default)]
struct Snapshot {
    version: u32,
    tables: BTreeMap<String, BTreeMap<String, Value>>,
}

pub struct Store {
    dir: PathBuf,
    log: File,
    _lock: File,
    tables: BTreeMap<String, BTreeMap<String, Value>>,
    log_ops: usize,
    dirty: bool,
    compact_after: usize,
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |err| StoreError::Io {
        path: path.to_path_buf(),
        op,
        err,
    }
}

impl Store {
    /// Opens (creating if needed) the store in `dir`, replaying the snapshot and the log.
    pub fn open(dir: &Path) -> Result<(Store, Recovery), StoreError> {
        std::fs::create_dir_all(dir).map_err(io(dir, "create directory"))?;
        let lock_path = dir.join(LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path, "open"))?;
        // SAFETY: flock on a file descriptor we own; no memory is shared with the kernel.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(StoreError::Locked(dir.to_path_buf()));
        }

        let mut recovery = Recovery::default();
        let snap_path = dir.join(SNAPSHOT);
        let mut tables = match std::fs::read(&snap_path) {
            Ok(bytes) => {
                let snap: Snapshot =
                    serde_json::from_slice(&bytes).map_err(|e| StoreError::Snapshot {
                        path: snap_path.clone(),
                        err: e.to_string(),
                    })?;
                snap.tables
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io(&snap_path, "read")(e)),
        };
        recovery.snapshot_docs = tables.values().map(BTreeMap::len).sum();

        let log_path = dir.join(LOG);
        let mut log = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&log_path)
            .map_err(io(&log_path, "open"))?;
        let len = log.metadata().map_err(io(&log_path, "stat"))?.len();
        let mut good_end = 0u64;
        {
            let mut reader = BufReader::new(&log);
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = reader
                    .read_until(b'\n', &mut line)
                    .map_err(io(&log_path, "read"))?;
                if n == 0 {
                    break;
                }
                // A line without its newline was cut by the crash, even if it happens to parse.
                let complete = line.last() == Some(&b'\n');
                match serde_json::from_slice::<Op>(&line) {
                    Ok(op) if complete => {
                        apply(&mut tables, op);
                        recovery.log_ops += 1;
                        good_end += n as u64;
                    }
                    _ => break,
                }
            }
        }
        if good_end < len {
            recovery.truncated_bytes = len - good_end;
            log::warn!(
                "store {}: dropped {} bytes of incomplete log after {} good operations (interrupted write)",
                log_path.display(),
                recovery.truncated_bytes,
                recovery.log_ops
            );
            log.set_len(good_end).map_err(io(&log_path, "truncate"))?;
            log.sync_all().map_err(io(&log_path, "fsync"))?;
        }
        log.seek(SeekFrom::End(0)).map_err(io(&log_path, "seek"))?;
        let store = Store {
            dir: dir.to_path_buf(),
            log,
            _lock: lock,
            tables,
            log_ops: recovery.log_ops,
            dirty: false,
            compact_after: DEFAULT_COMPACT_AFTER,
        };
        Ok((store, recovery))
    }

    /// Changes the automatic compaction threshold (tests use small values).
    pub fn set_compact_after(&mut self, ops: usize) {
        self.compact_after = ops.max(1);
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The raw document.
    pub fn get_value(&self, table: &str, key: &str) -> Option<&Value> {
        self.tables.get(table)?.get(key)
    }

    /// The document decoded as `T`; `None` when absent or when it no longer decodes (logged:
    /// a document written by an older version with an incompatible shape).
    pub fn get<T: DeserializeOwned>(&self, table: &str, key: &str) -> Option<T> {
        let v = self.get_value(table, key)?;
        match T::deserialize(v) {
            Ok(t) => Some(t),
            Err(e) => {
                log::error!("store: {table}/{key} does not decode ({e}); ignoring it");
                None
            }
        }
    }

    /// Every document of a table that decodes as `T`, in key order.
    pub fn all<T: DeserializeOwned>(&self, table: &str) -> Vec<(String, T)> {
        let Some(t) = self.tables.get(table) else {
            return Vec::new();
        };
        t.iter()
            .filter_map(|(k, v)| match T::deserialize(v) {
                Ok(doc) => Some((k.clone(), doc)),
                Err(e) => {
                    log::error!("store: {table}/{k} does not decode ({e}); ignoring it");
                    None
                }
            })
            .collect()
    }

    pub fn len(&self, table: &str) -> usize {
        self.tables.get(table).map_or(0, BTreeMap::len)
    }

    pub fn is_empty(&self, table: &str) -> bool {
        self.len(table) == 0
    }

    pub fn put<T: Serialize + ?Sized>(
        &mut self,
        table: &str,
        key: &str,
        value: &T,
        durability: Durability,
    ) -> Result<(), StoreError> {
        let value = serde_json::to_value(value).map_err(|e| StoreError::Encode(e.to_string()))?;
        if self.get_value(table, key) == Some(&value) {
            return Ok(());
        }
        self.write(
            Op::Put {
                table: table.into(),
                key: key.into(),
                value,
            },
            durability,
        )
    }

    /// Removes a document; `Ok(false)` if it was not there.
    pub fn delete(
        &mut self,
        table: &str,
        key: &str,
        durability: Durability,
    ) -> Result<bool, StoreError> {
        if self.get_value(table, key).is_none() {
            return Ok(false);
        }
        self.write(
            Op::Del {
                table: table.into(),
                key: key.into(),
            },
            durability,
        )?;
        Ok(true)
    }

    fn write(&mut self, op: Op, durability: Durability) -> Result<(), StoreError> {
        let mut line = serde_json::to_vec(&op).map_err(|e| StoreError::Encode(e.to_string()))?;
        line.push(b'\n');
        let log_path = self.dir.join(LOG);
        // One write call per line: a crash leaves at most this line partial, which open() cuts.
        self.log
            .write_all(&line)
            .map_err(io(&log_path, "append to"))?;
        apply(&mut self.tables, op);
        self.log_ops += 1;
        self.dirty = true;
        if durability == Durability::Sync {
            self.sync()?;
        }
        if self.log_ops >= self.compact_after {
            self.compact()?;
        }
        Ok(())
    }

    /// fsyncs the log if anything was written since the last fsync.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        if self.dirty {
            self.log
                .sync_data()
                .map_err(io(&self.dir.join(LOG), "fsync"))?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Writes the whole state as the new snapshot and empties the log.
    pub fn compact(&mut self) -> Result<(), StoreError> {
        let snap_path = self.dir.join(SNAPSHOT);
        let tmp_path = self.dir.join(format!("{SNAPSHOT}.tmp"));
        let snap = SnapshotRef {
            version: 1,
            tables: &self.tables,
        };
        let bytes = serde_json::to_vec(&snap).map_err(|e| StoreError::Encode(e.to_string()))?;
        {
            let mut tmp = File::create(&tmp_path).map_err(io(&tmp_path, "create"))?;
            tmp.write_all(&bytes).map_err(io(&tmp_path, "write"))?;
            tmp.sync_all().map_err(io(&tmp_path, "fsync"))?;
        }
        std::fs::rename(&tmp_path, &snap_path).map_err(io(&snap_path, "replace"))?;
        // The rename is durable only once the directory entry is on disk.
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        let log_path = self.dir.join(LOG);
        self.log.set_len(0).map_err(io(&log_path, "truncate"))?;
        self.log
            .seek(SeekFrom::Start(0))
            .map_err(io(&log_path, "seek"))?;
        self.log.sync_all().map_err(io(&log_path, "fsync"))?;
        self.log_ops = 0;
        self.dirty = false;
        Ok(())
    }
}

#[derive(Serialize)]
struct SnapshotRef<'a> {
    version: u32,
    tables: &'a BTreeMap<String, BTreeMap<String, Value>>,
}

fn apply(tables: &mut BTreeMap<String, BTreeMap<String, Value>>, op: Op) {
    match op {
        Op::Put { table, key, value } => {
            tables.entry(table).or_default().insert(key, value);
        }
        Op::Del { table, key } => {
            if let Some(t) = tables.get_mut(&table) {
                t.remove(&key);
                if t.is_empty() {
                    tables.remove(&table);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn survives_reopen_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, rec) = Store::open(dir.path()).unwrap();
            assert_eq!(rec, Recovery::default());
            s.put("nodes", "a", &json!({"name": "w1"}), Durability::Sync)
                .unwrap();
            s.put("nodes", "b", &json!({"name": "w2"}), Durability::Lazy)
                .unwrap();
            s.put("nodes", "a", &json!({"name": "w1b"}), Durability::Sync)
                .unwrap();
            assert!(s.delete("nodes", "b", Durability::Sync).unwrap());
            assert!(!s.delete("nodes", "zz", Durability::Sync).unwrap());
        }
        let (mut s, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.log_ops, 4);
        assert_eq!(s.get_value("nodes", "a"), Some(&json!({"name": "w1b"})));
        assert!(s.get_value("nodes", "b").is_none());
        s.set_compact_after(6);
        s.put("jobs", "j", &json!([1, 2]), Durability::Lazy)
            .unwrap();
        s.put("jobs", "k", &json!(3), Durability::Lazy).unwrap(); // triggers compaction
        assert_eq!(std::fs::metadata(dir.path().join(LOG)).unwrap().len(), 0);
        s.put("jobs", "k", &json!(4), Durability::Sync).unwrap();
        drop(s);
        let (s, rec) = Store::open(dir.path()).unwrap();
        assert_eq!((rec.snapshot_docs, rec.log_ops), (3, 1));
        assert_eq!(s.get::<u32>("jobs", "k"), Some(4));
        assert_eq!(
            s.all::<Value>("jobs")
                .into_iter()
                .map(|(k, _)| k)
                .collect::<Vec<_>>(),
            ["j", "k"]
        );
    }

    #[test]
    fn corrupt_tail_is_truncated_and_earlier_ops_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Store::open(dir.path()).unwrap();
            s.put("t", "a", &1, Durability::Sync).unwrap();
            s.put("t", "b", &2, Durability::Sync).unwrap();
        }
        let log = dir.path().join(LOG);
        let good_len = std::fs::metadata(&log).unwrap().len();
        // A crash in the middle of a line: no newline, half a document.
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(br#"{"op":"put","table":"t","key":"c","val"#)
            .unwrap();
        drop(f);
        let (mut s, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.log_ops, 2);
        assert!(rec.truncated_bytes > 0);
        assert_eq!(std::fs::metadata(&log).unwrap().len(), good_len);
        assert_eq!(s.get::<u32>("t", "b"), Some(2));
        assert!(s.get_value("t", "c").is_none());
        // Appending after recovery produces a clean log.
        s.put("t", "c", &3, Durability::Sync).unwrap();
        drop(s);
        let (s, rec) = Store::open(dir.path()).unwrap();
        assert_eq!((rec.log_ops, rec.truncated_bytes), (3, 0));
        assert_eq!(s.get::<u32>("t", "c"), Some(3));
    }

    #[test]
    fn complete_line_without_newline_and_garbage_lines_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(LOG),
            concat!(
                r#"{"op":"put","table":"t","key":"a","value":1}"#,
                "\n",
                "\u{0}\u{0}garbage\n",
                r#"{"op":"put","table":"t","key":"b","value":2}"#
            ),
        )
        .unwrap();
        let (s, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.log_ops, 1);
        assert_eq!(s.get::<u32>("t", "a"), Some(1));
        assert!(s.get_value("t", "b").is_none());
    }

    #[test]
    fn second_open_of_same_dir_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, _) = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).err().unwrap();
        assert!(err.to_string().contains("OAK_DATA_DIR"), "{err}");
    }

    #[test]
    fn unreadable_snapshot_is_an_error_not_an_empty_store() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SNAPSHOT), b"{not json").unwrap();
        let err = Store::open(dir.path()).err().unwrap();
        assert!(matches!(err, StoreError::Snapshot { .. }), "{err}");
    }
}
