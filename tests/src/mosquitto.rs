//! A real mosquitto broker for the tests (the end-to-end drills that run the cluster with
//! `OAK_MQTT_URL`, the worker's session tests, the cluster's external-broker test): its own
//! config and a full log under the test's directory, and a fixed loopback port kept across
//! restarts (outage tests stop it and bring it back where clients expect it). Without
//! persistence a restart loses every session and subscription, as a broker host crash does;
//! [`Mosquitto::start_persistent`] keeps them, as a broker restarted cleanly does.

use crate::free_port;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A mosquitto process on `127.0.0.1:port`, killed when dropped.
pub struct Mosquitto {
    child: Option<Child>,
    pub port: u16,
    conf: PathBuf,
    pub log: PathBuf,
}

impl Mosquitto {
    /// Writes `<dir>/mosquitto.conf` for a free port and starts the broker, without persistence.
    pub fn start(dir: &Path) -> Result<Mosquitto, String> {
        Mosquitto::start_with(dir, false)
    }

    /// As [`Mosquitto::start`], with persistence in `dir`: sessions with clean_session=false and
    /// their subscriptions survive [`Mosquitto::stop`] and [`Mosquitto::restart`].
    pub fn start_persistent(dir: &Path) -> Result<Mosquitto, String> {
        Mosquitto::start_with(dir, true)
    }

    fn start_with(dir: &Path, persistent: bool) -> Result<Mosquitto, String> {
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        let log = dir.join("mosquitto.log");
        // `user root`: mosquitto started as root otherwise drops to the `mosquitto` user, which
        // cannot write the log under the test's directory.
        let persistence = if persistent {
            format!(
                "persistence true\npersistence_location {}/\n",
                dir.display()
            )
        } else {
            "persistence false\n".to_string()
        };
        // `log_type all`: tests look for protocol events (e.g. a client's DISCONNECT).
        let text = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\n{persistence}\
             log_dest file {}\nlog_type all\nconnection_messages true\nuser root\n",
            log.display()
        );
        std::fs::write(&conf, text).map_err(|e| format!("{}: {e}", conf.display()))?;
        let mut m = Mosquitto {
            child: None,
            port,
            conf,
            log,
        };
        m.restart()?;
        Ok(m)
    }

    /// `mqtt://127.0.0.1:<port>`, the cluster's `OAK_MQTT_URL`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Starts the broker again on the same port and waits until it accepts connections.
    pub fn restart(&mut self) -> Result<(), String> {
        if self.running() {
            return Err("mosquitto is already running".into());
        }
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start mosquitto (apt install mosquitto): {e}"))?;
        self.child = Some(child);
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if !self.running() {
                return Err(format!(
                    "mosquitto exited at start (port {} taken?):\n{}",
                    self.port,
                    self.tail(10)
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!("mosquitto does not listen on {addr} after 5 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: the broker host going away, no goodbye to its clients.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (mosquitto then writes its persistence file), and wait for the exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Our child, not reaped yet, so the pid is still its own.
            let term = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            if !term.is_ok_and(|s| s.success()) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}
