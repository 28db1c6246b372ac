//! Identifiers and randomness for the root: Mongo-style 24-hex object ids (the dashboard and the
//! CLIs expect ids of that shape), random tokens from the kernel, hex helpers. No state here
//! except a process-wide counter that keeps ids unique within one second.

use std::io::Read;
use std::sync::atomic::{AtomicU32, Ordering};

/// `n` bytes from the kernel's CSPRNG. Reading `/dev/urandom` needs no extra crate and blocks
/// never once the pool is initialised, which it is long before orch-lite starts.
pub fn random_bytes(n: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| format!("cannot read /dev/urandom for key material: {e}"))?;
    Ok(buf)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A 24-hex id laid out like a Mongo ObjectId (4 bytes of time, 5 random, 3 of counter), so
/// ids sort by creation time and look familiar to upstream tools.
pub fn new_oid(now_secs: u64) -> String {
    let rand = random_bytes(5).unwrap_or_else(|_| {
        // Without /dev/urandom the counter alone keeps ids unique within this process.
        std::process::id().to_be_bytes()[..]
            .iter()
            .chain(&[0])
            .copied()
            .collect()
    });
    let c = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&(now_secs as u32).to_be_bytes());
    b.extend_from_slice(&rand[..5]);
    b.extend_from_slice(&c.to_be_bytes()[1..]);
    hex(&b)
}

pub fn is_oid(s: &str) -> bool {
    s.len() == 24 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Seconds since the Unix epoch, as upstream stores `last_modified_timestamp`.
pub fn now_secs_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for `created_at` fields; the worker's formatter (one civil-date
/// conversion in the project).
pub fn rfc3339(secs: u64) -> String {
    worker::image::pull::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    use super::*;

    #[test]
    fn oids_are_unique_and_well_formed() {
        let a = new_oid(1_700_000_000);
        let b = new_oid(1_700_000_000);
        assert!(is_oid(&a) && is_oid(&b) && a != b, "{a} {b}");
        assert!(a.starts_with("6553f100"), "time prefix: {a}");
        assert!(!is_oid("xyz") && !is_oid(&"g".repeat(24)));
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(unhex(&hex(&[0, 1, 255])), Some(vec![0, 1, 255]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        assert_eq!(random_bytes(32).unwrap().len(), 32);
    }
}
