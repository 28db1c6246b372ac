//! `worker::image` against real parts: the shared fixture's containerd and docker-registry,
//! plus registries started here for HTTPS (a CA made with openssl) and for Docker-Hub-style
//! token auth (a real `auth.token` registry whose JWTs are signed with openssl, blobs
//! redirected to another host). Small in-test HTTP servers play only the token endpoint, the
//! "CDN" and a byte-flipping proxy. Root only; each test starts its own fixture.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use worker::containerd::{Client, Options};
use worker::image::{self, Counters, PullConfig, PullError};

fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    // RUST_LOG=info with --nocapture shows the pull's log lines.
    let _ = env_logger::builder().is_test(true).try_init();
    async_io::block_on(f)
}

fn client(fx: &e2e::Fixture, ns: &str) -> Client {
    Client::new(Options::new(&fx.containerd_socket, ns)).unwrap()
}

fn config(fx: &e2e::Fixture, insecure: &[&str], ca: Option<&Path>) -> PullConfig {
    PullConfig::new(
        insecure.iter().map(|s| s.to_string()).collect(),
        ca.map(Path::to_path_buf),
        &fx.snapshotter,
    )
    .with_timeouts(Duration::from_secs(5), Duration::from_secs(10))
}

fn ctr_out(fx: &e2e::Fixture, ns: &str, args: &[&str]) -> String {
    let out = fx.ctr(ns).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ctr {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ctr run` of the pulled image, printing the fixture's architecture marker.
fn run_marker(fx: &e2e::Fixture, ns: &str, image: &str, id: &str) -> String {
    let root = fx.runc_root.to_string_lossy().into_owned();
    ctr_out(
        fx,
        ns,
        &[
            "run",
            "--rm",
            "--runc-root",
            &root,
            image,
            id,
            "cat",
            "/etc/oak-fixture-arch",
        ],
    )
    .trim()
    .to_owned()
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        _ => "arm",
    }
}

/// Runs containerd's garbage collector now (a lease deleted with sync=true), so a test sees
/// what the gc labels really keep.
fn collect_garbage(c: &mut Client) {
    run(async {
        c.create_lease("oak-test-gc", &[]).await.unwrap();
        c.delete_lease("oak-test-gc", true).await.unwrap();
    });
}

macro_rules! fixture {
    ($name:expr) => {{
        if !e2e::require_root($name) {
            return;
        }
        let guard = e2e::serial();
        (guard, e2e::Fixture::start().expect("fixture"))
    }};
}

#[test]
fn pulls_oci_index_over_http_unpacks_runs_and_survives_gc() {
    let (_g, fx) = fixture!("pulls_oci_index_over_http_unpacks_runs_and_survives_gc");
    let ns = "imgpull";
    let cfg = config(&fx, &[&fx.registry], None);
    let counters = Counters::default();
    let mut c = client(&fx, ns);
    let img = run(image::ensure(&mut c, &cfg, &fx.image, None, &counters)).unwrap();
    assert!(!img.cached);
    assert_eq!(img.name, fx.image);
    assert_eq!(img.target.digest, fx.index_digest);
    assert_eq!(
        img.target.media_type,
        "application/vnd.oci.image.index.v1+json"
    );
    assert_eq!(img.platform.to_string(), format!("linux/{}", host_arch()));
    if host_arch() == "amd64" {
        assert_eq!(img.manifest_digest, fx.env["FIXTURE_MANIFEST_AMD64"]);
    }
    assert!(img.chain_id.starts_with("sha256:"));
    assert_eq!(Counters::get(&counters.pulls), 1);
    assert_eq!(Counters::get(&counters.layers), 1);
    assert_eq!(Counters::get(&counters.layers_unpacked), 1);
    assert!(Counters::get(&counters.bytes) > 1_000_000);

    // GC now: only the image record and the gc labels keep anything alive.
    collect_garbage(&mut c);
    let images = ctr_out(&fx, ns, &["images", "ls"]);
    assert!(
        images.contains(&fx.image) && images.contains(&fx.index_digest),
        "{images}"
    );
    let snaps = ctr_out(&fx, ns, &["snapshots", "ls"]);
    assert!(
        snaps
            .lines()
            .any(|l| l.starts_with(&img.chain_id) && l.contains("Committed")),
        "{snaps}"
    );
    let content = ctr_out(&fx, ns, &["content", "ls"]);
    for d in [&img.target.digest, &img.manifest_digest, &img.config_digest] {
        assert!(content.contains(d.as_str()), "{d} missing from\n{content}");
    }
    assert!(
        content.contains("containerd.io/gc.ref.snapshot."),
        "{content}"
    );
    assert_eq!(run_marker(&fx, ns, &fx.image, "pull1"), host_arch());
    assert!(fx
        .ctr(ns)
        .args(["leases", "ls"])
        .output()
        .map(|o| !String::from_utf8_lossy(&o.stdout).contains("oak-pull"))
        .unwrap());

    // Second pull: answered by containerd alone. The registry is frozen (SIGSTOP) to prove
    // it: any request would hang into the 5 s connect/10 s read timeouts and fail.
    let reg_pid = fx.env["FIXTURE_REGISTRY_PID"].clone();
    let frozen = Command::new("kill")
        .args(["-STOP", &reg_pid])
        .status()
        .unwrap();
    assert!(frozen.success());
    let before = Counters::get(&counters.requests);
    let t = Instant::now();
    let again = run(image::ensure(&mut c, &cfg, &fx.image, None, &counters));
    let _ = Command::new("kill").args(["-CONT", &reg_pid]).status();
    let again = again.unwrap();
    assert!(again.cached, "{again:?}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(
        Counters::get(&counters.requests),
        before,
        "no registry request"
    );
    assert_eq!(Counters::get(&counters.cache_hits), 1);
    assert_eq!(again.chain_id, img.chain_id);
    assert_eq!(again.config, img.config);
}

#[test]
fn pulls_docker_schema2_and_other_platforms() {
    let (_g, fx) = fixture!("pulls_docker_schema2_and_other_platforms");
    let Some(docker) = fx.image_docker.clone() else {
        panic!("fixture built no Docker schema2 tag");
    };
    let ns = "imgdocker";
    let cfg = config(&fx, &[&fx.registry], None);
    let counters = Counters::default();
    let mut c = client(&fx, ns);
    let img = run(image::ensure(&mut c, &cfg, &docker, None, &counters)).unwrap();
    assert_eq!(
        img.target.media_type,
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(img.target.digest, fx.env["FIXTURE_DOCKER_MANIFEST_DIGEST"]);
    assert_eq!(img.manifest_digest, img.target.digest);
    collect_garbage(&mut c);
    assert_eq!(run_marker(&fx, ns, &docker, "docker1"), host_arch());

    // The arm/v7 entry of the index, as a Pi would pull it (unpacked, not run here).
    let ns7 = "imgarm";
    let mut c7 = client(&fx, ns7);
    let arm = run(image::ensure(
        &mut c7,
        &cfg,
        &fx.image,
        Some("linux/arm/v7"),
        &counters,
    ))
    .unwrap();
    assert_eq!(arm.platform.to_string(), "linux/arm/v7");
    assert_eq!(arm.manifest_digest, fx.env["FIXTURE_MANIFEST_ARM_V7"]);
    let snaps = ctr_out(&fx, ns7, &["snapshots", "ls"]);
    assert!(snaps.contains(&arm.chain_id), "{snaps}");
    // A digest reference names the same index.
    let by_digest = format!("{}/oak/busybox@{}", fx.registry, fx.index_digest);
    let d = run(image::ensure(
        &mut c7,
        &cfg,
        &by_digest,
        Some("linux/arm/v7"),
        &counters,
    ))
    .unwrap();
    assert_eq!(d.name, by_digest);
    assert_eq!(d.chain_id, arm.chain_id);
    // A platform the index lacks, and a single-platform image of the wrong architecture.
    let e = run(image::ensure(
        &mut c7,
        &cfg,
        &fx.image,
        Some("linux/riscv64"),
        &counters,
    ))
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("has no linux/riscv64 entry (has: linux/amd64, linux/arm64, linux/arm/v7)"),
        "{e}"
    );
    let e = run(image::ensure(
        &mut c7,
        &cfg,
        &docker,
        Some("linux/arm/v7"),
        &counters,
    ))
    .unwrap_err();
    assert!(matches!(e, PullError::NoPlatform { .. }), "{e}");
    // Unknown tag: the registry's 404, named.
    let missing = format!("{}/oak/busybox:nope", fx.registry);
    let e = run(image::ensure(&mut c7, &cfg, &missing, None, &counters)).unwrap_err();
    let s = e.status_detail();
    assert!(
        s.starts_with(&format!(
            "registry {} answered 404 for manifest nope",
            fx.registry
        )),
        "{s}"
    );
    assert_eq!(Counters::get(&counters.failures), 3);
}

#[test]
fn plain_http_registry_outside_the_insecure_list_is_a_clear_error() {
    let (_g, fx) = fixture!("plain_http_registry_outside_the_insecure_list_is_a_clear_error");
    let cfg = config(&fx, &[], None);
    let mut c = client(&fx, "imgplain");
    let e = run(image::ensure(
        &mut c,
        &cfg,
        &fx.image,
        None,
        &Counters::default(),
    ))
    .unwrap_err();
    let s = e.to_string();
    assert!(
        s.contains(&format!(
            "{} speaks plain HTTP, not HTTPS: add {} to OAK_INSECURE_REGISTRIES",
            fx.registry, fx.registry
        )),
        "{s}"
    );
}

#[test]
fn unreachable_registry_fails_fast_with_its_address_and_leaves_nothing() {
    let (_g, fx) = fixture!("unreachable_registry_fails_fast_with_its_address_and_leaves_nothing");
    // A port nobody listens on (bound, then released): connection refused, as for a registry
    // host that is down.
    let dead = format!("127.0.0.1:{}", free_port());
    let cfg = config(&fx, &[&dead], None);
    let ns = "imgdead";
    let mut c = client(&fx, ns);
    let counters = Counters::default();
    let t0 = std::time::Instant::now();
    let e = run(image::ensure(
        &mut c,
        &cfg,
        &format!("{dead}/oak/busybox:latest"),
        None,
        &counters,
    ))
    .unwrap_err();
    let s = e.status_detail();
    assert!(s.contains(&dead), "the reason names the registry: {s}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "a refused connection is not waited out: {:?}",
        t0.elapsed()
    );
    assert_eq!(Counters::get(&counters.failures), 1);
    assert_eq!(ctr_out(&fx, ns, &["images", "ls", "-q"]).trim(), "");
    assert_eq!(ctr_out(&fx, ns, &["leases", "ls", "-q"]).trim(), "");
}

// ------------------------------------------------------------------ corrupt content

#[test]
fn corrupt_layer_is_detected_and_nothing_is_left_as_an_image() {
    let (_g, fx) = fixture!("corrupt_layer_is_detected_and_nothing_is_left_as_an_image");
    let layer = fx.env[&format!("FIXTURE_LAYER_{}", host_arch().to_uppercase())].clone();
    let upstream = fx.registry.clone();
    let flip = format!("/blobs/{layer}");
    let proxy = TestServer::start(move |req, stream| {
        // Forward as is (our client sends Connection: close), flip the body's last byte.
        let mut up = TcpStream::connect(&upstream).unwrap();
        up.write_all(&req.raw).unwrap();
        let mut resp = Vec::new();
        up.read_to_end(&mut resp).unwrap();
        if req.path.ends_with(&flip) && req.method == "GET" {
            if let Some(last) = resp.last_mut() {
                *last ^= 0x01;
            }
        }
        stream.write_all(&resp).unwrap();
    });
    let image_ref = format!("{}/oak/busybox:latest", proxy.addr);
    let ns = "imgcorrupt";
    let cfg = config(&fx, &[&proxy.addr], None);
    let mut c = client(&fx, ns);
    let e = run(image::ensure(
        &mut c,
        &cfg,
        &image_ref,
        None,
        &Counters::default(),
    ))
    .unwrap_err();
    assert!(matches!(e, PullError::Verify { .. }), "{e}");
    let s = e.to_string();
    assert!(
        s.contains(&format!(
            "layer {layer} failed verification: the bytes received hash to sha256:"
        )),
        "{s}"
    );
    let err = run(c.image_get(&image_ref)).unwrap_err();
    assert!(err.is_not_found(), "{err}");
    collect_garbage(&mut c);
    let images = ctr_out(&fx, ns, &["images", "ls", "-q"]);
    assert!(images.trim().is_empty(), "{images}");
    let content = ctr_out(&fx, ns, &["content", "ls", "-q"]);
    assert!(!content.contains(&layer), "{content}");
    assert!(ctr_out(&fx, ns, &["snapshots", "ls"]).lines().count() <= 1);
    // A good source afterwards works: nothing stuck from the failed attempt.
    let img = run(image::ensure(
        &mut c,
        &config(&fx, &[&fx.registry], None),
        &fx.image,
        None,
        &Counters::default(),
    ))
    .unwrap();
    assert!(!img.cached);
}

// ------------------------------------------------------------------ HTTPS

#[test]
fn pulls_over_https_with_a_private_ca() {
    let (_g, fx) = fixture!("pulls_over_https_with_a_private_ca");
    let dir = fx.dir.join("tls");
    std::fs::create_dir_all(&dir).unwrap();
    sh(
        &dir,
        r#"
        openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=oak-test-ca -keyout ca.key -out ca.pem \
          -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout srv.key -out srv.csr 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > ext
        openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile ext -out srv.pem 2>/dev/null
    "#,
    );
    let extra = format!(
        "  tls:\n    certificate: {d}/srv.pem\n    key: {d}/srv.key\n",
        d = dir.display()
    );
    let reg = Registry::start(&fx, &dir, "", &extra);
    let image_ref = format!("{}/oak/busybox:latest", reg.addr);
    let ns = "imghttps";
    let mut c = client(&fx, ns);
    // Without the CA: a TLS error that names the setting.
    let e = run(image::ensure(
        &mut c,
        &config(&fx, &[], None),
        &image_ref,
        None,
        &Counters::default(),
    ))
    .unwrap_err();
    assert!(e.to_string().contains("OAK_REGISTRY_CA"), "{e}");
    let ca = dir.join("ca.pem");
    let img = run(image::ensure(
        &mut c,
        &config(&fx, &[], Some(&ca)),
        &image_ref,
        None,
        &Counters::default(),
    ))
    .unwrap();
    assert_eq!(img.target.digest, fx.index_digest);
    collect_garbage(&mut c);
    assert_eq!(run_marker(&fx, ns, &image_ref, "https1"), host_arch());
}

// ------------------------------------------------------------------ token auth + redirect

#[test]
fn anonymous_token_auth_and_blob_redirect_without_credentials() {
    let (_g, fx) = fixture!("anonymous_token_auth_and_blob_redirect_without_credentials");
    let dir = fx.dir.join("auth");
    std::fs::create_dir_all(&dir).unwrap();
    // The token signer: a self-signed cert the registry trusts (rootcertbundle); tokens carry
    // it in the JWT's x5c header.
    sh(&dir, "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=oak-token -keyout tok.key -out tok.pem 2>/dev/null");
    let jwt = sh(
        &dir,
        r#"
        b64() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
        x5c=$(openssl x509 -in tok.pem -outform DER | openssl base64 -A)
        now=$(date +%s)
        h=$(printf '{"typ":"JWT","alg":"RS256","x5c":["%s"]}' "$x5c" | b64)
        p=$(printf '{"iss":"oak-test-issuer","sub":"","aud":"oak-test-registry","exp":%d,"nbf":%d,"iat":%d,"jti":"t1","access":[{"type":"repository","name":"oak/busybox","actions":["pull"]}]}' $((now+3600)) $((now-60)) $((now-60)) | b64)
        s=$(printf '%s.%s' "$h" "$p" | openssl dgst -sha256 -sign tok.key | b64)
        printf '%s.%s.%s' "$h" "$p" "$s"
    "#,
    );
    let data = fx.dir.join("registry/data");
    let tokens = Arc::new(AtomicU64::new(0));
    let cdn_hits = Arc::new(AtomicU64::new(0));
    let leaked_auth = Arc::new(AtomicBool::new(false));
    let seen_scope = Arc::new(Mutex::new(String::new()));
    let (t, h, l, sc) = (
        tokens.clone(),
        cdn_hits.clone(),
        leaked_auth.clone(),
        seen_scope.clone(),
    );
    // Stand-in for two other parties at once: the token endpoint (/token) and the blob CDN the
    // registry redirects to (every other path, served from the registry's storage).
    let side = TestServer::start(move |req, stream| {
        if req.path.starts_with("/token") {
            t.fetch_add(1, Ordering::SeqCst);
            *sc.lock().unwrap() = req.path.clone();
            let body = format!(r#"{{"token":"{jwt}","expires_in":300}}"#);
            respond(stream, "200 OK", "application/json", body.as_bytes());
            return;
        }
        h.fetch_add(1, Ordering::SeqCst);
        if req.has_authorization {
            l.store(true, Ordering::SeqCst);
        }
        let path = data.join(req.path.trim_start_matches('/').split('?').next().unwrap());
        match std::fs::read(&path) {
            Ok(b) => respond(stream, "200 OK", "application/octet-stream", &b),
            Err(_) => respond(stream, "404 Not Found", "text/plain", b"no"),
        }
    });
    let extra = format!(
        "auth:\n  token:\n    realm: http://{side}/token\n    service: oak-test-registry\n    issuer: oak-test-issuer\n    rootcertbundle: {d}/tok.pem\n",
        side = side.addr,
        d = dir.display()
    );
    let middleware = format!(
        "middleware:\n  storage:\n    - name: redirect\n      options:\n        baseurl: http://{}/\n",
        side.addr
    );
    let reg = Registry::start(&fx, &dir, &format!("{middleware}{extra}"), "");
    let image_ref = format!("{}/oak/busybox:latest", reg.addr);
    let ns = "imgauth";
    let counters = Counters::default();
    let cfg = config(&fx, &[&reg.addr, &side.addr], None);
    let mut c = client(&fx, ns);
    let img = run(image::ensure(&mut c, &cfg, &image_ref, None, &counters)).unwrap();
    assert_eq!(img.target.digest, fx.index_digest);
    // One token for the whole pull (cached per repository), the layer and config via the CDN.
    assert_eq!(tokens.load(Ordering::SeqCst), 1);
    assert!(seen_scope
        .lock()
        .unwrap()
        .contains("scope=repository%3Aoak%2Fbusybox%3Apull"));
    assert!(
        cdn_hits.load(Ordering::SeqCst) >= 2,
        "blobs were not redirected"
    );
    assert!(
        !leaked_auth.load(Ordering::SeqCst),
        "Authorization was forwarded to another host"
    );
    collect_garbage(&mut c);
    assert_eq!(run_marker(&fx, ns, &image_ref, "auth1"), host_arch());

    // A registry that wants credentials we do not have: the refusal is named.
    let other = format!("{}/oak/private:latest", reg.addr);
    let e = run(image::ensure(&mut c, &cfg, &other, None, &counters)).unwrap_err();
    assert!(matches!(e, PullError::Auth { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("registry {} refused access to {other}", reg.addr)),
        "{e}"
    );
}

// ------------------------------------------------------------------ helpers

/// Runs a bash snippet in `dir`; returns stdout.
fn sh(dir: &Path, script: &str) -> String {
    let out = Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A second docker-registry over the fixture registry's storage (read-only use).
struct Registry {
    child: Child,
    addr: String,
}

impl Registry {
    /// `top` goes at the config's top level, `http_extra` under `http:`.
    fn start(fx: &e2e::Fixture, dir: &Path, top: &str, http_extra: &str) -> Registry {
        for _ in 0..5 {
            let port = free_port();
            let addr = format!("127.0.0.1:{port}");
            let cfg = format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {data}\n  maintenance:\n    uploadpurging:\n      enabled: false\n{top}http:\n  addr: {addr}\n{http_extra}",
                data = fx.dir.join("registry/data").display()
            );
            let path = dir.join("registry.yml");
            std::fs::write(&path, cfg).unwrap();
            let log = std::fs::File::create(dir.join("registry.log")).unwrap();
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(&path)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if TcpStream::connect(&addr).is_ok() {
                    return Registry { child, addr };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "docker-registry did not start; see {}",
            dir.join("registry.log").display()
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Req {
    method: String,
    path: String,
    has_authorization: bool,
    raw: Vec<u8>,
}

/// A tiny threaded HTTP/1.1 server: one request per connection.
struct TestServer {
    addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    fn start(handler: impl Fn(&Req, &mut TcpStream) + Send + Sync + 'static) -> TestServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handler = Arc::new(handler);
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((mut stream, _)) => {
                        let h = handler.clone();
                        std::thread::spawn(move || {
                            stream.set_nonblocking(false).unwrap();
                            if let Some(req) = read_request(&mut stream) {
                                h(&req, &mut stream);
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        TestServer {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_request(s: &mut TcpStream) -> Option<Req> {
    let mut raw = Vec::new();
    let mut b = [0u8; 4096];
    while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut b).ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&b[..n]);
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let mut first = text.lines().next()?.split(' ');
    let method = first.next()?.to_owned();
    let path = first.next()?.to_owned();
    let has_authorization = text
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("authorization:"));
    Some(Req {
        method,
        path,
        has_authorization,
        raw,
    })
}

fn respond(s: &mut TcpStream, status: &str, ct: &str, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ct}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
}
