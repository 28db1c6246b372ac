//! The shared fixture against the real parts: containerd pulls and runs the test image from the
//! private registry, the index carries three real platforms, fixtures coexist, and teardown
//! leaves nothing behind: by drop, while unwinding a failed test, after a failed `up`, by the
//! watchdog once the owner is SIGKILLed, and after containerd and a shim were SIGKILLed.
//! Every test that starts daemons holds `e2e::serial()`: one fixture test at a time.

use e2e::{leftovers, require_root, serial, Fixture};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sh(script: &str) -> String {
    run(Command::new("sh").arg("-c").arg(script))
}

/// Debian architecture of this host, as the image names it in /etc/oak-fixture-arch.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "armhf",
        other => panic!("no test image for host arch {other}"),
    }
}

fn pull(fx: &Fixture, ns: &str, image: &str) {
    run(fx.ctr(ns).args(["images", "pull", "--plain-http", image]));
}

fn unique(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// Kills the child on drop, so a failing test does not leave an owner (and its fixture) alive.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn pulls_and_runs_the_image_with_ctr() {
    if !require_root("pulls_and_runs_the_image_with_ctr") {
        return;
    }
    let _g = serial();
    let t = Instant::now();
    let fx = Fixture::start().unwrap();
    eprintln!("fixture up in {:?}", t.elapsed());
    let ns = "oaktest";
    pull(&fx, ns, &fx.image);
    let out = run(fx.ctr(ns).args([
        "run",
        "--rm",
        &fx.image,
        "marker",
        "sh",
        "-c",
        "echo OAK_MARK_$((6*7)) $(cat /etc/oak-fixture-arch); cat /www/index.html; id -u",
    ]));
    assert!(
        out.contains(&format!("OAK_MARK_42 {}", host_arch())),
        "output: {out}"
    );
    assert!(
        out.contains("OAK_FIXTURE_HTTPD_OK"),
        "no /www/index.html in: {out}"
    );
    assert!(out.lines().any(|l| l.trim() == "0"), "not uid 0: {out}");

    // The Docker schema2 tag is a different manifest of the same content; it must run too.
    let docker = fx
        .image_docker
        .clone()
        .expect("host platform has a Docker manifest");
    pull(&fx, ns, &docker);
    let out = run(fx.ctr(ns).args([
        "run",
        "--rm",
        &docker,
        "marker-docker",
        "cat",
        "/etc/oak-fixture-arch",
    ]));
    assert_eq!(out.trim(), host_arch());
    let images = run(fx.ctr(ns).args(["images", "ls"]));
    assert!(
        images.contains("application/vnd.oci.image.index.v1+json"),
        "{images}"
    );
    assert!(
        images.contains("application/vnd.docker.distribution.manifest.v2+json"),
        "{images}"
    );
    let t = Instant::now();
    fx.stop().unwrap();
    eprintln!("fixture down in {:?}", t.elapsed());
}

#[test]
fn index_lists_three_platforms_with_matching_binaries() {
    if !require_root("index_lists_three_platforms_with_matching_binaries") {
        return;
    }
    let _g = serial();
    let fx = Fixture::start().unwrap();
    let reg = &fx.registry;
    let raw = sh(&format!(
        "curl -fsS -D {d}/h -H 'Accept: application/vnd.oci.image.index.v1+json' http://{reg}/v2/oak/busybox/manifests/latest",
        d = fx.dir.display()
    ));
    let headers = std::fs::read_to_string(fx.dir.join("h"))
        .unwrap()
        .to_lowercase();
    assert!(
        headers.contains("content-type: application/vnd.oci.image.index.v1+json"),
        "{headers}"
    );
    assert!(
        headers.contains(&format!("docker-content-digest: {}", fx.index_digest)),
        "{headers}"
    );
    let index: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let mut platforms = Vec::new();
    for m in index["manifests"].as_array().unwrap() {
        let p = &m["platform"];
        let (arch, variant) = (
            p["architecture"].as_str().unwrap(),
            p["variant"].as_str().unwrap_or(""),
        );
        assert_eq!(p["os"], "linux");
        platforms.push(format!(
            "{arch}{}{variant}",
            if variant.is_empty() { "" } else { "/" }
        ));
        // Follow the manifest to its layer: the busybox inside must be an ELF for that platform,
        // and the config's diff_id must be the sha256 of the uncompressed layer.
        let digest = m["digest"].as_str().unwrap();
        let man: serde_json::Value = serde_json::from_str(&sh(&format!(
            "curl -fsS -H 'Accept: application/vnd.oci.image.manifest.v1+json' http://{reg}/v2/oak/busybox/manifests/{digest}"
        )))
        .unwrap();
        let layer = man["layers"][0]["digest"].as_str().unwrap();
        let cfg: serde_json::Value = serde_json::from_str(&sh(&format!(
            "curl -fsS http://{reg}/v2/oak/busybox/blobs/{}",
            man["config"]["digest"].as_str().unwrap()
        )))
        .unwrap();
        assert_eq!(cfg["architecture"], arch);
        assert_eq!(cfg["config"]["Cmd"][0], "sh");
        let diff = sh(&format!(
            "curl -fsS http://{reg}/v2/oak/busybox/blobs/{layer} | gzip -d | sha256sum"
        ));
        assert_eq!(
            cfg["rootfs"]["diff_ids"][0],
            format!("sha256:{}", &diff[..64])
        );
        let e_machine = sh(&format!(
            "curl -fsS http://{reg}/v2/oak/busybox/blobs/{layer} | gzip -d | tar -xOf - bin/busybox | od -An -tu2 -j18 -N2"
        ));
        let want = match arch {
            "amd64" => "62",
            "arm64" => "183",
            "arm" => "40",
            other => panic!("unexpected architecture {other}"),
        };
        assert_eq!(
            e_machine.trim(),
            want,
            "busybox in the {arch} layer has ELF e_machine {e_machine}"
        );
    }
    platforms.sort();
    assert_eq!(platforms, ["amd64", "arm/v7", "arm64"]);
    let mut from_env = fx.platforms.clone();
    from_env.sort();
    assert_eq!(from_env, ["linux/amd64", "linux/arm/v7", "linux/arm64"]);
}

#[test]
fn two_fixtures_run_side_by_side() {
    if !require_root("two_fixtures_run_side_by_side") {
        return;
    }
    let _g = serial();
    let (a, b) = (Fixture::start().unwrap(), Fixture::start().unwrap());
    assert_ne!(a.dir, b.dir);
    assert_ne!(a.containerd_socket, b.containerd_socket);
    assert_ne!(a.registry, b.registry);
    // Same namespace and container id in both, each with its own runc root (see
    // `Fixture::runc_root`): they must not see each other's.
    let threads: Vec<_> = [&a, &b]
        .into_iter()
        .map(|fx| {
            let (mut pull, mut run_it) = (fx.ctr("oaktest"), fx.ctr("oaktest"));
            let (image, registry, root) =
                (fx.image.clone(), fx.registry.clone(), fx.runc_root.clone());
            std::thread::spawn(move || {
                run(pull.args(["images", "pull", "--plain-http", &image]));
                run(run_it.arg("run").arg("--runc-root").arg(&root).args([
                    "--rm",
                    &image,
                    "same",
                    "sh",
                    "-c",
                    &format!("sleep 1; echo from-{registry}"),
                ]))
            })
        })
        .collect();
    let outs: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(outs[0].trim(), format!("from-{}", a.registry));
    assert_eq!(outs[1].trim(), format!("from-{}", b.registry));
    let a_images = run(a.ctr("oaktest").args(["images", "ls", "-q"]));
    assert!(
        !a_images.contains(&b.registry),
        "fixture a sees b's image: {a_images}"
    );
    let a_dir = a.dir.clone();
    drop(a);
    assert!(leftovers(&a_dir).is_empty(), "{:?}", leftovers(&a_dir));
    // b is untouched by a's teardown.
    run(b.ctr("oaktest").args(["version"]));
    sh(&format!("curl -fsS http://{}/v2/", b.registry));
}

/// What a running container of namespace `ns`, id `id` leaves on the host outside the fixture dir.
fn container_traces(ns: &str, id: &str, shim_socket: &Path) -> Vec<String> {
    let mut left = Vec::new();
    if let Ok(hs) = std::fs::read_dir("/sys/fs/cgroup") {
        for h in hs.flatten() {
            let cg = h.path().join(ns);
            if cg.join("cgroup.procs").exists() {
                left.push(format!("cgroup {}", cg.display()));
            }
        }
    }
    for p in [
        PathBuf::from(format!("/run/containerd/runc/{ns}/{id}")),
        shim_socket.to_path_buf(),
    ] {
        if p.exists() {
            left.push(format!("{}", p.display()));
        }
    }
    left
}

fn start_sleeper(fx: &Fixture, ns: &str, id: &str) -> PathBuf {
    pull(fx, ns, &fx.image);
    run(fx
        .ctr(ns)
        .args(["run", "-d", &fx.image, id, "sleep", "600"]));
    let bundle = fx.dir.join(format!(
        "containerd/state/io.containerd.runtime.v2.task/{ns}/{id}"
    ));
    let address = std::fs::read_to_string(bundle.join("address")).unwrap();
    let socket = PathBuf::from(address.trim().trim_start_matches("unix://"));
    assert!(socket.exists(), "shim socket {} missing", socket.display());
    let tasks = run(fx.ctr(ns).args(["tasks", "ls"]));
    assert!(tasks.contains("RUNNING"), "{tasks}");
    assert!(
        !container_traces(ns, id, &socket).is_empty(),
        "no traces to clean: the check would be vacuous"
    );
    socket
}

#[test]
fn drop_leaves_nothing_behind() {
    if !require_root("drop_leaves_nothing_behind") {
        return;
    }
    let _g = serial();
    let fx = Fixture::start().unwrap();
    let (dir, registry) = (fx.dir.clone(), fx.registry.clone());
    let ns = unique("oakdrop");
    let socket = start_sleeper(&fx, &ns, "sleeper");
    assert!(!leftovers(&dir).is_empty());
    let t = Instant::now();
    drop(fx);
    eprintln!("down with a running container in {:?}", t.elapsed());
    assert_eq!(leftovers(&dir), Vec::<String>::new());
    assert_eq!(
        container_traces(&ns, "sleeper", &socket),
        Vec::<String>::new()
    );
    let probe = Command::new("curl")
        .args(["-fsS", "--max-time", "2", &format!("http://{registry}/v2/")])
        .output()
        .unwrap();
    assert!(
        !probe.status.success(),
        "registry {registry} still answers after down"
    );
    // down is idempotent.
    run(Command::new("bash")
        .arg(Fixture::script())
        .arg("down")
        .arg(&dir));
}

#[test]
fn watchdog_tears_down_after_owner_is_killed() {
    if !require_root("watchdog_tears_down_after_owner_is_killed") {
        return;
    }
    let _g = serial();
    let dir = std::env::temp_dir().join(unique("oak-fx-wd"));
    // The owner is a shell that starts the fixture for itself and then just waits.
    let mut owner = KillOnDrop(
        Command::new("sh")
            .arg("-c")
            .arg(r#"bash "$0" up "$1" --owner-pid $$ >/dev/null && echo UP && exec sleep 600"#)
            .arg(Fixture::script())
            .arg(&dir)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(owner.0.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "UP", "fixture.sh up did not finish");
    // Parse it without taking ownership: dropping this handle would tear it down itself.
    let fx = std::mem::ManuallyDrop::new(Fixture::from_env_file(&dir).unwrap());
    let ns = unique("oakwd");
    let socket = start_sleeper(&fx, &ns, "sleeper");
    owner.0.kill().unwrap(); // SIGKILL
    owner.0.wait().unwrap();
    let t = Instant::now();
    while !leftovers(&dir).is_empty() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("watchdog cleaned up in {:?}", t.elapsed());
    assert_eq!(leftovers(&dir), Vec::<String>::new());
    assert_eq!(
        container_traces(&ns, "sleeper", &socket),
        Vec::<String>::new()
    );
}

#[test]
fn down_refuses_a_directory_it_did_not_create() {
    if !require_root("down_refuses_a_directory_it_did_not_create") {
        return;
    }
    let dir = std::env::temp_dir().join(unique("oak-not-a-fixture"));
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("precious"), "keep").unwrap();
    let out = Command::new("bash")
        .arg(Fixture::script())
        .arg("down")
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "down removed a foreign dir? {err}");
    assert!(err.contains("not a fixture dir"), "{err}");
    assert!(dir.join("precious").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_panicking_test_still_tears_down() {
    if !require_root("a_panicking_test_still_tears_down") {
        return;
    }
    let _g = serial();
    let dir = std::sync::Mutex::new(None);
    let res = std::panic::catch_unwind(|| {
        let fx = Fixture::start().unwrap();
        *dir.lock().unwrap() = Some(fx.dir.clone());
        pull(&fx, "oakpanic", &fx.image);
        panic!("the test body fails while the fixture is up");
    });
    assert!(res.is_err());
    let dir = dir.into_inner().unwrap().expect("fixture started");
    assert_eq!(leftovers(&dir), Vec::<String>::new());
}

#[test]
fn a_failed_up_cleans_up_after_itself() {
    if !require_root("a_failed_up_cleans_up_after_itself") {
        return;
    }
    let _g = serial();
    let dir = std::env::temp_dir().join(unique("oak-fx-fail"));
    let empty = std::env::temp_dir().join(unique("oak-empty-cache"));
    std::fs::create_dir(&empty).unwrap();
    // Daemons start, then the image build finds no busybox: up must fail and undo the daemons.
    let out = Command::new("bash")
        .arg(Fixture::script())
        .arg("up")
        .arg(&dir)
        .env("OAK_BUSYBOX_CACHE", &empty)
        .output()
        .unwrap();
    std::fs::remove_dir(&empty).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "up succeeded without busybox: {err}");
    assert!(err.contains("no busybox binaries found"), "{err}");
    assert!(err.contains("tearing down"), "{err}");
    assert_eq!(leftovers(&dir), Vec::<String>::new());
}

#[test]
fn non_root_gets_a_clear_error() {
    if !require_root("non_root_gets_a_clear_error") {
        return;
    }
    let dir = std::env::temp_dir().join(unique("oak-fx-nonroot"));
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "bash"])
        .arg(Fixture::script())
        .arg("up")
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("must run as root"), "{err}");
    assert!(!dir.exists());
}

/// Pids whose cmdline contains `needle` (for finding this fixture's shims).
fn pids_with(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|p| {
            let pid: u32 = p.file_name().to_str()?.parse().ok()?;
            let cmd = String::from_utf8_lossy(&std::fs::read(p.path().join("cmdline")).ok()?)
                .replace('\0', " ");
            cmd.contains(needle).then_some(pid)
        })
        .collect()
}

#[test]
fn down_cleans_up_after_containerd_and_shim_crash() {
    if !require_root("down_cleans_up_after_containerd_and_shim_crash") {
        return;
    }
    let _g = serial();
    let fx = Fixture::start().unwrap();
    let dir = fx.dir.clone();
    let ns = unique("oakcrash");
    let socket = start_sleeper(&fx, &ns, "sleeper");
    // The worst case: containerd and the shim die hard, so nobody can delete the task.
    let shims = pids_with(&format!("-address {}", fx.containerd_socket.display()));
    assert_eq!(shims.len(), 1, "expected one shim, found {shims:?}");
    let containerd: u32 = fx.env["FIXTURE_CONTAINERD_PID"].parse().unwrap();
    for pid in [containerd, shims[0]] {
        run(Command::new("kill").args(["-KILL", &pid.to_string()]));
    }
    let init_pid = std::fs::read_to_string(dir.join(format!(
        "containerd/state/io.containerd.runtime.v2.task/{ns}/sleeper/init.pid"
    )))
    .unwrap();
    let count_fifos = || {
        sh("ls -d /run/containerd/fifo/*/sleeper-stdout 2>/dev/null | wc -l")
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    let fifos = count_fifos();
    assert!(
        fifos >= 1,
        "ctr run -d left no fifos: the fifo check would be vacuous"
    );
    drop(fx);
    assert_eq!(leftovers(&dir), Vec::<String>::new());
    assert_eq!(
        container_traces(&ns, "sleeper", &socket),
        Vec::<String>::new()
    );
    // SIGKILLed and reparented to pid 1, it may linger as a zombie until pid 1 reaps it.
    let stat = format!("/proc/{}/stat", init_pid.trim());
    let t = Instant::now();
    let alive = || std::fs::read_to_string(&stat).is_ok_and(|s| !s.contains(") Z "));
    while alive() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !alive(),
        "the container's process {} survived",
        init_pid.trim()
    );
    assert!(
        count_fifos() < fifos,
        "ctr fifos of the crashed task remain"
    );
}
