//! Operator commands that act on a running worker rather than on its config: `status` (asks the
//! status endpoint), `logs` (follows the log file), `stop` and `-d` (through systemd when it
//! runs, else through a pid file). Nothing here is used by the daemon itself.

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const LOG_FILE: &str = "/var/log/oakestra/nodeengine.log";
pub const UNIT: &str = "nodeengine";
pub const PID_FILE_NAME: &str = "nodeengine.pid";

/// True when systemd is PID 1 (the marker directory systemd itself documents for this check).
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Plain HTTP/1.0 GET against the local status endpoint; returns the body of a 200 answer.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("no worker answering on {addr} ({e}); is NodeEngine running?"))?;
    let _ = s.set_read_timeout(Some(timeout));
    // One write: a request split over several segments confuses minimal servers.
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut raw = Vec::new();
    s.take(4 << 20)
        .read_to_end(&mut raw)
        .map_err(|e| format!("{addr}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr}: malformed HTTP answer"))?;
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("{addr}{path} answered {status:?}"));
    }
    Ok(body.to_string())
}

/// Prints the last `tail` bytes of `path`, then keeps printing what is appended (like `tail -f`).
pub fn follow(path: &Path, tail: u64) -> Result<(), String> {
    let mut f =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    f.seek(SeekFrom::Start(len.saturating_sub(tail)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 8192];
    let mut out = std::io::stdout();
    loop {
        match f.read(&mut buf) {
            Ok(0) => std::thread::sleep(Duration::from_millis(300)),
            Ok(n) => {
                out.write_all(&buf[..n]).map_err(|e| e.to_string())?;
                out.flush().map_err(|e| e.to_string())?;
            }
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        }
    }
}

pub fn pid_file(state_dir: &Path) -> PathBuf {
    state_dir.join(PID_FILE_NAME)
}

/// Runs `systemctl <verb> <units…>`, reporting a failure in one line.
pub fn systemctl(verb: &str, units: &[&str]) -> Result<(), String> {
    let st = std::process::Command::new("systemctl")
        .arg(verb)
        .args(units)
        .status()
        .map_err(|e| format!("cannot run systemctl: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!(
            "systemctl {verb} {} failed ({st})",
            units.join(" ")
        ))
    }
}

/// Without systemd: SIGTERM to the pid in the pid file, if that process is a NodeEngine.
pub fn stop_by_pid_file(state_dir: &Path) -> Result<(), String> {
    let path = pid_file(state_dir);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "no pid file {} ({e}): is the worker running?",
            path.display()
        )
    })?;
    let pid: i32 = text
        .trim()
        .parse()
        .map_err(|_| format!("{} holds {text:?}, not a pid", path.display()))?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if !comm.trim().starts_with("NodeEngine") {
        return Err(format!(
            "pid {pid} from {} is not a NodeEngine (stale pid file)",
            path.display()
        ));
    }
    // SAFETY: kill(2) with a validated pid and a constant signal has no memory effects.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(format!("kill {pid}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn http_get_reads_body_and_rejects_errors() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            for answer in [
                "HTTP/1.0 200 OK\r\n\r\n{\"ok\":true}",
                "HTTP/1.0 503 Busy\r\n\r\n",
            ] {
                let (mut c, _) = l.accept().unwrap();
                let mut req = Vec::new();
                let mut byte = [0u8; 1];
                while !req.ends_with(b"\r\n\r\n") && c.read(&mut byte).unwrap() == 1 {
                    req.push(byte[0]);
                }
                assert!(req.starts_with(b"GET /status HTTP/1.0\r\n"));
                c.write_all(answer.as_bytes()).unwrap();
            }
        });
        assert_eq!(
            http_get(addr, "/status", Duration::from_secs(2)).unwrap(),
            "{\"ok\":true}"
        );
        assert!(http_get(addr, "/status", Duration::from_secs(2))
            .unwrap_err()
            .contains("503"));
        server.join().unwrap();
        drop(TcpListener::bind(addr)); // port is free again: nothing listening now
        assert!(http_get(addr, "/status", Duration::from_secs(2))
            .unwrap_err()
            .contains("no worker answering"));
    }

    #[test]
    fn stale_pid_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("oak-pid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(pid_file(&dir), "1\n").unwrap(); // pid 1 is never a NodeEngine here
        assert!(stop_by_pid_file(&dir)
            .unwrap_err()
            .contains("not a NodeEngine"));
        std::fs::write(pid_file(&dir), "garbage").unwrap();
        assert!(stop_by_pid_file(&dir).unwrap_err().contains("not a pid"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
