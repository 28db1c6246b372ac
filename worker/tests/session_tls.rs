//! The NodeEngine binary over TLS against real parts: certificates made by `openssl`, a real
//! mosquitto with TLS listeners (client certificates required on one), the registration
//! stand-in behind a small rustls TLS front (what spec §10 expects in front of the cluster),
//! and `mosquitto_sub`/`mosquitto_pub` with their own client certificate as observer.

mod session_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use session_support::*;

const S: Duration = Duration::from_secs(1);

// ------------------------------------------------------------------ certificates

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 (IP SAN) and localhost, client certificates for
/// the worker and the observer, and a second CA that signed none of them.
struct Pki(PathBuf);

impl Pki {
    fn new(dir: &Path) -> Pki {
        let d = dir.join("pki");
        std::fs::create_dir_all(&d).expect("pki dir");
        // EC P-256 keys: fast to make, and what a Pi should use.
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            let (key, crt, subj) = (
                format!("{ca}.key"),
                format!("{ca}.crt"),
                format!("/CN=oak {ca}"),
            );
            let mut a = vec!["req", "-x509"];
            a.extend(ec);
            a.extend([
                "-keyout",
                &key,
                "-out",
                &crt,
                "-days",
                "2",
                "-subj",
                &subj,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
            openssl(&d, &a);
        }
        let leaf = |name: &str, cn: &str, ext: &str| {
            let (key, csr, crt, cnf) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
                format!("{name}.cnf"),
            );
            std::fs::write(d.join(&cnf), ext).expect("extfile");
            let subj = format!("/CN={cn}");
            let mut a = vec!["req", "-new"];
            a.extend(ec);
            a.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(&d, &a);
            openssl(
                &d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &crt,
                    "-days",
                    "2",
                    "-extfile",
                    &cnf,
                ],
            );
        };
        leaf(
            "server",
            "oak cluster",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        );
        for (name, cn) in [("client", "pi-test"), ("observer", "observer")] {
            leaf(
                name,
                cn,
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 extendedKeyUsage=clientAuth\n",
            );
        }
        // The same key, password-protected: what `openssl genpkey -aes256` hands out.
        openssl(
            &d,
            &[
                "pkey",
                "-in",
                "client.key",
                "-aes256",
                "-passout",
                "pass:secret",
                "-out",
                "client-encrypted.key",
            ],
        );
        Pki(d)
    }

    fn path(&self, file: &str) -> String {
        self.0.join(file).display().to_string()
    }
}

// ------------------------------------------------------------------ mosquitto with TLS

/// One mosquitto with three listeners: TLS requiring client certificates, TLS without that
/// requirement, and plain TCP (to see a TLS client meet a plain listener).
struct Broker {
    child: Child,
    mtls: u16,
    tls: u16,
    plain: u16,
    log: PathBuf,
}

impl Broker {
    fn start(dir: &Path, pki: &Pki) -> Broker {
        let (mtls, tls, plain) = (free_port(), free_port(), free_port());
        let conf = dir.join("mosquitto-tls.conf");
        let log = dir.join("mosquitto-tls.log");
        let tls_files = format!(
            "cafile {}\ncertfile {}\nkeyfile {}\n",
            pki.path("ca.crt"),
            pki.path("server.crt"),
            pki.path("server.key")
        );
        // Upstream's opt-in broker configuration (spec §10) on the first listener.
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings false\nallow_anonymous true\nlog_dest file {}\nlog_type all\nuser root\n\
                 listener {mtls} 127.0.0.1\n{tls_files}require_certificate true\nuse_identity_as_username true\n\
                 listener {tls} 127.0.0.1\n{tls_files}require_certificate false\n\
                 listener {plain} 127.0.0.1\n",
                log.display()
            ),
        )
        .expect("write mosquitto conf");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto is installed");
        let b = Broker {
            child,
            mtls,
            tls,
            plain,
            log,
        };
        for p in [mtls, tls, plain] {
            let addr: SocketAddr = ([127, 0, 0, 1], p).into();
            wait_for(5 * S, || TcpStream::connect(addr).ok())
                .unwrap_or_else(|| panic!("mosquitto listens on {p}:\n{}", b.log()));
        }
        b
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mosquitto_sub` with the observer's client certificate, lines `topic payload` collected.
struct Sub {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Sub {
    fn start(port: u16, pki: &Pki, filter: &str) -> Sub {
        let mut child = Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-i",
                "observer",
                "-v",
            ])
            .args(["--cafile", &pki.path("ca.crt")])
            .args([
                "--cert",
                &pki.path("observer.crt"),
                "--key",
                &pki.path("observer.key"),
            ])
            .args(["-t", filter])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub is installed");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Sub { child, lines }
    }

    /// The next message on `topic` whose JSON payload satisfies `want`.
    fn expect(
        &self,
        limit: Duration,
        what: &str,
        topic: &str,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let end = Instant::now() + limit;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            let Ok(line) = self.lines.recv_timeout(left) else {
                break;
            };
            let Some((t, payload)) = line.split_once(' ') else {
                continue;
            };
            if t != topic {
                continue;
            }
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(payload) {
                if want(&v) {
                    return v;
                }
            }
        }
        panic!("no {what} on {topic} within {limit:?}");
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn publish(port: u16, pki: &Pki, topic: &str, payload: &str) {
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-i", "injector"])
        .args(["--cafile", &pki.path("ca.crt")])
        .args([
            "--cert",
            &pki.path("observer.crt"),
            "--key",
            &pki.path("observer.key"),
        ])
        .args(["-t", topic, "-m", payload])
        .output()
        .expect("mosquitto_pub is installed");
    assert!(
        out.status.success(),
        "mosquitto_pub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ------------------------------------------------------------------ HTTPS front

/// A TLS terminator in front of the plain registration stand-in (rustls server side): one
/// request per connection, as the worker sends them. Counts the requests it carried.
struct HttpsFront {
    port: u16,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpsFront {
    fn start(pki: &Pki, backend: u16) -> HttpsFront {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(pki.0.join("server.crt"))
                .expect("server.crt")
                .collect::<Result<_, _>>()
                .expect("server.crt is PEM");
        let key = PrivateKeyDer::from_pem_file(pki.0.join("server.key")).expect("server.key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .expect("server certificate"),
        );
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the HTTPS front");
        listener.set_nonblocking(true).expect("nonblocking accept");
        let port = listener.local_addr().expect("addr").port();
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, halt) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((tcp, _)) => {
                        if relay(&cfg, tcp, backend).is_ok() {
                            n.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        HttpsFront {
            port,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }
}

/// Handshake, read one request (head + Content-Length body), forward it, relay the answer.
fn relay(cfg: &Arc<rustls::ServerConfig>, tcp: TcpStream, backend: u16) -> std::io::Result<()> {
    tcp.set_nonblocking(false)?;
    tcp.set_read_timeout(Some(5 * S))?;
    let conn = rustls::ServerConnection::new(cfg.clone()).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut req = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tls.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        req.extend_from_slice(&chunk[..n]);
        let Some(end) = req.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&req[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if req.len() >= end + 4 + len {
            break;
        }
    }
    let mut up = TcpStream::connect(("127.0.0.1", backend))?;
    up.write_all(&req)?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    tls.write_all(&answer)?;
    tls.conn.send_close_notify();
    tls.flush()?;
    Ok(())
}

impl Drop for HttpsFront {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ------------------------------------------------------------------ helpers

fn conf_with_ssl(dir: &Path) {
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).expect("etc dir");
    std::fs::write(etc.join("conf.json"), r#"{"cluster_ssl": true}"#).expect("conf.json");
}

fn wait_log(worker: &Worker, limit: Duration, what: &str, f: impl Fn(&str) -> bool) -> String {
    wait_for(limit, || {
        let log = worker.log();
        f(&log).then_some(log)
    })
    .unwrap_or_else(|| panic!("{what} not in the worker log:\n{}", worker.log()))
}

fn topic(suffix: &str) -> String {
    format!("nodes/{NODE_ID}/{suffix}")
}

// ------------------------------------------------------------------ tests

#[test]
fn registers_over_https_and_reports_over_mqtts_with_a_client_certificate() {
    let dir = TempDir::new("tls-ok");
    let pki = Pki::new(&dir.0);
    let broker = Broker::start(&dir.0, &pki);
    let standin = StandIn::start(NODE_ID, broker.mtls, None);
    let front = HttpsFront::start(&pki, standin.port);
    let sub = Sub::start(broker.mtls, &pki, "nodes/#");
    conf_with_ssl(&dir.0);
    let mut worker = Worker::start(
        &dir.0,
        front.port,
        &[
            ("OAK_MQTT_CERT", &pki.path("client.crt")),
            ("OAK_MQTT_KEY", &pki.path("client.key")),
            ("OAK_MQTT_CA", &pki.path("ca.crt")),
        ],
    );

    let info = sub.expect(15 * S, "information report", &topic("information"), |_| {
        true
    });
    assert_eq!(info["host"], "pi-test");
    // Registered through the TLS front only: the stand-in itself is plain HTTP on another port.
    assert_eq!(standin.registrations(), 1);
    assert!(front.requests() >= 1);
    assert!(standin.problems().is_empty(), "{:?}", standin.problems());
    let log = worker.log();
    assert!(log.contains("over TLS with a client certificate"), "{log}");
    // mosquitto took the certificate's CN as the username (use_identity_as_username).
    let blog = broker.log();
    assert!(
        blog.contains(&format!("as {NODE_ID}-ne (p2, c1, k30, u'pi-test')")),
        "{blog}"
    );

    // A deploy over the TLS broker is answered on `job` (this build's runtime answer).
    let deploy = serde_json::json!({"_id": "x", "job_name": "app.ns.svc.ns", "image": "docker.io/library/nginx:latest",
        "virtualization": "docker", "instance_number": 0, "instance_list": [{"instance_number": 0}]});
    publish(
        broker.mtls,
        &pki,
        &topic("control/deploy"),
        &deploy.to_string(),
    );
    let answer = sub.expect(10 * S, "status report for the deploy", &topic("job"), |v| {
        v["sname"] == "app.ns.svc.ns" && v["instance"] == 0
    });
    assert_eq!(answer["status"], "FAILED", "{answer}");
    assert!(answer["status_detail"]
        .as_str()
        .is_some_and(|d| !d.is_empty()));

    let status: serde_json::Value = serde_json::from_str(&worker.get("/status")).unwrap();
    assert_eq!(status["registration"], "registered");
    assert_eq!(status["broker"]["state"], "connected");
    assert!(worker.terminate().success());
}

#[test]
fn wrong_ca_is_named_in_the_log_and_retried() {
    let dir = TempDir::new("tls-wrong-ca");
    let pki = Pki::new(&dir.0);
    let broker = Broker::start(&dir.0, &pki);

    // HTTPS registration: OAK_MQTT_CA serves registration while OAK_CLUSTER_CA is unset; the
    // message names both, and the setting that fixes it.
    let standin = StandIn::start(NODE_ID, broker.mtls, None);
    let front = HttpsFront::start(&pki, standin.port);
    let https_dir = dir.0.join("https");
    conf_with_ssl(&https_dir);
    let mut https = Worker::start(
        &https_dir,
        front.port,
        &[("OAK_MQTT_CA", &pki.path("other-ca.crt"))],
    );
    let log = wait_log(&https, 20 * S, "a second registration failure", |l| {
        l.contains("registration attempt 2 failed")
    });
    assert!(
        log.contains("not signed by a CA trusted here (the system CAs and OAK_MQTT_CA")
            && log.contains("set OAK_CLUSTER_CA to the PEM file of the CA that signed it"),
        "{log}"
    );
    assert!(log.contains("https://127.0.0.1:"), "{log}");
    assert_eq!(standin.registrations(), 0);
    assert!(https.alive());

    // OAK_CLUSTER_CA wins for registration; the broker is still checked against OAK_MQTT_CA.
    let mqtt_dir = dir.0.join("mqtt");
    conf_with_ssl(&mqtt_dir);
    let mut mqtt = Worker::start(
        &mqtt_dir,
        front.port,
        &[
            ("OAK_CLUSTER_CA", &pki.path("ca.crt")),
            ("OAK_MQTT_CERT", &pki.path("client.crt")),
            ("OAK_MQTT_KEY", &pki.path("client.key")),
            ("OAK_MQTT_CA", &pki.path("other-ca.crt")),
        ],
    );
    let log = wait_log(&mqtt, 20 * S, "a second MQTT failure", |l| {
        l.contains("retry 2 in")
    });
    assert!(
        log.contains("not signed by a CA trusted here (the system CAs and OAK_MQTT_CA")
            && log.contains("set OAK_MQTT_CA to the PEM file"),
        "{log}"
    );
    assert!(log.contains("registered as node"), "{log}");
    assert!(mqtt.alive() && https.alive());
    let status: serde_json::Value = serde_json::from_str(&mqtt.get("/status")).unwrap();
    assert_eq!(status["broker"]["state"], "disconnected");
}

#[test]
fn broker_requirements_without_a_client_certificate() {
    let dir = TempDir::new("tls-nocert");
    let pki = Pki::new(&dir.0);
    let broker = Broker::start(&dir.0, &pki);
    let ca_only = [("OAK_MQTT_CA", pki.path("ca.crt"))];
    let ca_only: Vec<(&str, &str)> = ca_only.iter().map(|(k, v)| (*k, v.as_str())).collect();

    // OAK_MQTT_CA alone: TLS without a client certificate, fine where none is required.
    let relaxed = StandIn::start(NODE_ID, broker.tls, None);
    let ok_dir = dir.0.join("ok");
    std::fs::create_dir_all(&ok_dir).unwrap();
    let ok = Worker::start(&ok_dir, relaxed.port, &ca_only);
    let sub = Sub::start(broker.tls, &pki, "nodes/#");
    sub.expect(
        15 * S,
        "information over TLS without a client certificate",
        &topic("information"),
        |_| true,
    );
    let log = ok.log();
    assert!(
        log.contains("-ne over TLS") && !log.contains("with a client certificate"),
        "{log}"
    );
    drop(ok);

    // The same worker against the listener that requires one: a clear error, retries, no crash.
    let strict = StandIn::start(NODE_ID, broker.mtls, None);
    let strict_dir = dir.0.join("strict");
    std::fs::create_dir_all(&strict_dir).unwrap();
    let mut w = Worker::start(&strict_dir, strict.port, &ca_only);
    let log = wait_log(&w, 20 * S, "a second MQTT failure", |l| {
        l.contains("retry 2 in")
    });
    assert!(
        log.contains(
            "the server requires a client certificate: set OAK_MQTT_CERT and OAK_MQTT_KEY"
        ),
        "{log}"
    );
    assert!(w.alive());

    // TLS configured, but the port is a plain listener.
    let plain = StandIn::start(NODE_ID, broker.plain, None);
    let plain_dir = dir.0.join("plain");
    std::fs::create_dir_all(&plain_dir).unwrap();
    let mut p = Worker::start(&plain_dir, plain.port, &ca_only);
    let log = wait_log(&p, 20 * S, "a second MQTT failure", |l| {
        l.contains("retry 2 in")
    });
    assert!(
        log.contains("is this port a TLS listener") || log.contains("does not speak TLS"),
        "{log}"
    );
    assert!(p.alive() && w.alive());
}

#[test]
fn bad_client_files_stop_the_worker_at_start() {
    let dir = TempDir::new("tls-files");
    let pki = Pki::new(&dir.0);
    let missing = dir.0.join("nope.crt").display().to_string();
    // (case, environment, expected message)
    type Case = (&'static str, Vec<(&'static str, String)>, &'static str);
    let cases: [Case; 4] = [
        (
            "missing",
            vec![
                ("OAK_MQTT_CERT", missing.clone()),
                ("OAK_MQTT_KEY", pki.path("client.key")),
            ],
            "OAK_MQTT_CERT",
        ),
        (
            "encrypted",
            vec![
                ("OAK_MQTT_CERT", pki.path("client.crt")),
                ("OAK_MQTT_KEY", pki.path("client-encrypted.key")),
            ],
            "is an encrypted (password-protected) key",
        ),
        (
            "mismatch",
            vec![
                ("OAK_MQTT_CERT", pki.path("client.crt")),
                ("OAK_MQTT_KEY", pki.path("observer.key")),
            ],
            "does not belong to OAK_MQTT_CERT",
        ),
        (
            "half",
            vec![("OAK_MQTT_CERT", pki.path("client.crt"))],
            "is set but its key is not",
        ),
    ];
    for (name, env, want) in cases {
        let d = dir.0.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut w = Worker::start(&d, free_port(), &env);
        let exited = wait_for(10 * S, || (!w.alive()).then_some(()));
        let log = w.log();
        assert!(exited.is_some(), "{name}: worker still running:\n{log}");
        assert!(log.contains(want), "{name}: {want:?} not in:\n{log}");
        if name == "missing" {
            assert!(log.contains(&missing), "{log}");
        }
    }
}
