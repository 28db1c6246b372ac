//! The embedded broker with TLS (`OAK_MQTT_CERT`, `OAK_MQTT_KEY`, `OAK_MQTT_CA`): a worker with a
//! client certificate from the CA gets its deploy over MQTTS; one without a certificate is
//! refused. Certificates are made with the `openssl` CLI; real `mosquitto_sub`/`mosquitto_pub`.
//! The clients connect by name (`localhost`): OpenSSL sends an IP literal as SNI, which rustls
//! 0.22 (inside rumqttd 0.20) rejects; Go's and rustls' clients send no SNI for IPs.

mod cluster_support;

use cluster_support::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn openssl(dir: &Path, args: &[&str]) {
    let st = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl CLI");
    assert!(st.success(), "openssl {args:?}");
}

fn make_certs(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    for name in ["server", "client"] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "san.ext",
                "-out",
                &format!("{name}.crt"),
            ],
        );
    }
}

#[test]
fn cluster_tls_broker_requires_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certs(d);
    let p = |f: &str| d.join(f).display().to_string();
    let orch = Orch::start(
        d,
        free_port(),
        &[
            ("OAK_MQTT_CERT", &p("server.crt")),
            ("OAK_MQTT_KEY", &p("server.key")),
            ("OAK_MQTT_CA", &p("ca.crt")),
        ],
    );
    let (_, b) = orch.register(&node_doc("tls1", "m-tls", 2, 2000, None));
    let id = b["id"].as_str().unwrap().to_string();
    let port = orch.mqtt.to_string();
    let topic = format!("nodes/{id}/control/deploy");
    let sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "localhost",
            "-p",
            &port,
            "--cafile",
            &p("ca.crt"),
            "--cert",
            &p("client.crt"),
            "--key",
            &p("client.key"),
            "-i",
            &format!("{id}-ne"),
            "-q",
            "1",
            "-t",
            &topic,
            "-C",
            "1",
            "-W",
            "15",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Worker heartbeat over TLS with the real client, so the node is active.
    let info = format!("nodes/{id}/information");
    let publish = |extra: &[&str]| {
        Command::new("mosquitto_pub")
            .args([
                "-h",
                "localhost",
                "-p",
                &port,
                "--cafile",
                &p("ca.crt"),
                "-q",
                "1",
                "-t",
                &info,
                "-m",
                "{\"vcpus\":2,\"memory\":2000}",
            ])
            .args(extra)
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    assert!(publish(&[
        "--cert",
        &p("client.crt"),
        "--key",
        &p("client.key")
    ]));
    assert!(
        !publish(&[]),
        "a client without a certificate must be refused"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        orch.deploy("tlsjob", 0, &job_doc("app.ns.tls.ns"), None),
        200
    );
    let out = sub.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mosquitto_sub over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(v["job_name"], "app.ns.tls.ns");
    assert_eq!(v["instance_number"], 0);
}
