//! An external mosquitto broker for the end-to-end tests that run the cluster with
//! `OAK_MQTT_URL`: its own config and log under the test's directory, a fixed loopback port kept
//! across restarts (the outage drills stop it and bring it back where clients expect it), and no
//! persistence, so a restart loses every session and subscription as a broker host crash does.

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
    /// Writes `<dir>/mosquitto.conf` for a free port and starts the broker.
    pub fn start(dir: &Path) -> Result<Mosquitto, String> {
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        let log = dir.join("mosquitto.log");
        // `user root`: mosquitto started as root otherwise drops to the `mosquitto` user, which
        // cannot write the log under the test's directory.
        let text = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             log_dest file {}\nlog_type error\nlog_type warning\nlog_type notice\n\
             log_type information\nconnection_messages true\nuser root\n",
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
