//! Per-instance log files: the shim appends the task's stdout and stderr to
//! `<app_logs>/<container id>` (upstream's name, worker-protocol §5.2), and reports carry the
//! last ≤1024 bytes. Reads are bounded; files are never rotated or removed here (as upstream).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// `logs` in `jobs/resources` (worker-protocol §3.6).
pub const TAIL_BYTES: usize = 1024;

pub fn path(app_logs: &Path, container_id: &str) -> PathBuf {
    app_logs.join(container_id)
}

/// The `stdout`/`stderr` URI that makes the shim append both streams to `path` (containerd
/// spec §3.4); the shim creates the parent directory.
pub fn uri(path: &Path) -> String {
    format!("file://{}", path.display())
}

/// The last `max` bytes of `path` as text, reading only those bytes into `buf` (reused by the
/// caller). A missing file is an empty log. A UTF-8 sequence cut at the start is dropped.
pub fn tail(path: &Path, max: usize, buf: &mut Vec<u8>) -> String {
    buf.clear();
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max as u64);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let _ = f.take(max as u64).read_to_end(buf);
    text_tail(buf, start > 0)
}

/// Pure core of [`tail`]: when the bytes start mid-file, skip UTF-8 continuation bytes.
pub fn text_tail(bytes: &[u8], cut: bool) -> String {
    let skip = if cut {
        bytes
            .iter()
            .take(3)
            .take_while(|b| (**b & 0xC0) == 0x80)
            .count()
    } else {
        0
    };
    String::from_utf8_lossy(&bytes[skip..]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_is_bounded_and_utf8_clean() {
        let dir = std::env::temp_dir().join(format!("oak-logs-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = path(&dir, "a.b.c.d.instance.0");
        let mut buf = Vec::new();
        assert_eq!(
            tail(&p, TAIL_BYTES, &mut buf),
            "",
            "missing file: empty log"
        );
        std::fs::write(&p, "short\n").unwrap();
        assert_eq!(tail(&p, TAIL_BYTES, &mut buf), "short\n");
        // 2000 bytes ending in a marker: exactly the last 1024 come back.
        let mut big = "x".repeat(1990);
        big.push_str("0123456789");
        std::fs::write(&p, &big).unwrap();
        let t = tail(&p, TAIL_BYTES, &mut buf);
        assert_eq!(t.len(), 1024);
        assert!(t.ends_with("0123456789"));
        assert!(buf.capacity() >= 1024, "buffer kept for reuse");
        // A cut through "é" (2 bytes) at the start is dropped, not replaced.
        let s = format!("{}{}", "é".repeat(600), "end");
        std::fs::write(&p, &s).unwrap();
        let t = tail(&p, TAIL_BYTES, &mut buf);
        assert!(!t.contains('\u{FFFD}'), "{t}");
        assert!(t.ends_with("end"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(uri(Path::new("/tmp/x")), "file:///tmp/x");
    }

    #[test]
    fn text_tail_only_skips_when_cut() {
        assert_eq!(text_tail(&[0x80, b'a'], true), "a");
        assert_eq!(text_tail(b"ab", true), "ab");
        assert_eq!(text_tail(&[0x80, b'a'], false), "\u{FFFD}a");
    }
}
