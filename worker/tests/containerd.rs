//! Integration tests of `worker::containerd` against a real, private containerd 1.6.
//!
//! Each test starts its own containerd (config in a temp dir, CRI disabled) and tears it down
//! in Drop. They need root (containerd, runc, overlay mounts); without it they say so and pass.
//! TODO: switch `Ctrd` to the shared `e2e::fixture::Fixture` once it lands on main.

use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use worker::containerd::{
    self as ctrd, Client, Descriptor, Event, Image, Ingest, Options, WriteOutcome,
};

const SNAPSHOTTER: &str = "overlayfs";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root to run containerd and runc (CI runs as root)");
            return;
        }
    };
}

/// A private containerd in a temporary directory.
struct Ctrd {
    dir: PathBuf,
    child: Child,
}

impl Ctrd {
    fn start(name: &str) -> Ctrd {
        let dir = std::env::temp_dir().join(format!("oak-ctrd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/c.sock\"\n[ttrpc]\n  address = \"{d}/c.sock.ttrpc\"\n",
            d = dir.display()
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("containerd binary (apt install containerd)");
        let c = Ctrd { dir, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.socket().exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not create its socket; see {}",
                c.dir.join("containerd.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("c.sock")
    }

    fn namespace(&self) -> String {
        // runc's state dir (/run/containerd/runc/<ns>) is shared by every containerd on the
        // host: a namespace of our own keeps parallel test runs apart.
        format!("oaktest-{}", std::process::id())
    }

    fn client(&self) -> Client {
        Client::new(Options::new(self.socket(), self.namespace())).unwrap()
    }
}

impl Drop for Ctrd {
    fn drop(&mut self) {
        // Shims of a failed test still run; they carry our socket path on their command line.
        let sock = self.socket().to_string_lossy().into_owned();
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for p in procs.flatten() {
                let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
                if pid != self.child.id() as i32 && String::from_utf8_lossy(&cmd).contains(&sock) {
                    // SAFETY: plain kill(2) on a pid we identified as one of our shims.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        // SAFETY: SIGTERM to the containerd we spawned.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Unmount whatever is left under our dir (snapshots, shm), deepest first.
        let dir = self.dir.to_string_lossy().into_owned();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
            .filter(|m| m.starts_with(&dir))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    async_io::block_on(f)
}

async fn timeout<T>(secs: u64, what: &str, f: impl std::future::Future<Output = T>) -> T {
    let timer = async {
        async_io::Timer::after(Duration::from_secs(secs)).await;
        panic!("timed out after {secs}s waiting for {what}");
    };
    futures_lite::future::or(f, timer).await
}

fn sha256(data: &[u8]) -> String {
    let mut s = String::from("sha256:");
    for b in Sha256::digest(data) {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A one-layer rootfs: /bin/busybox and /bin/sh, as an uncompressed ustar built by `tar`.
fn busybox_layer(work: &Path) -> Vec<u8> {
    let root = work.join("layer");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        _ => "armhf",
    };
    let cached = format!("/var/cache/oakestra-test/busybox/busybox-{arch}");
    let bb = if Path::new(&cached).exists() {
        cached.as_str()
    } else {
        "/bin/busybox"
    };
    std::fs::copy(bb, root.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    let tar = work.join("layer.tar");
    let ok = Command::new("tar")
        .args([
            "--format=ustar",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-cf",
        ])
        .arg(&tar)
        .arg("-C")
        .arg(&root)
        .arg("bin")
        .status()
        .unwrap()
        .success();
    assert!(ok, "tar failed");
    std::fs::read(tar).unwrap()
}

/// The minimal OCI spec of spec §5.2, with a new (empty) network namespace.
fn spec_json(ns: &str, id: &str) -> Vec<u8> {
    let caps = r#"["CAP_CHOWN","CAP_DAC_OVERRIDE","CAP_FSETID","CAP_FOWNER","CAP_MKNOD","CAP_NET_RAW","CAP_SETGID","CAP_SETUID","CAP_SETFCAP","CAP_SETPCAP","CAP_NET_BIND_SERVICE","CAP_SYS_CHROOT","CAP_KILL","CAP_AUDIT_WRITE"]"#;
    format!(
        r#"{{"ociVersion":"1.0.2",
  "process":{{"terminal":false,"user":{{"uid":0,"gid":0}},
    "args":["/bin/busybox","sh","-c","echo hello; exit 7"],
    "env":["PATH=/bin"],"cwd":"/",
    "capabilities":{{"bounding":{caps},"effective":{caps},"permitted":{caps}}},
    "rlimits":[{{"type":"RLIMIT_NOFILE","hard":1024,"soft":1024}}],"noNewPrivileges":true}},
  "root":{{"path":"rootfs"}},
  "hostname":"instance-0",
  "mounts":[
    {{"destination":"/proc","type":"proc","source":"proc","options":["nosuid","noexec","nodev"]}},
    {{"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["nosuid","strictatime","mode=755","size=65536k"]}},
    {{"destination":"/dev/pts","type":"devpts","source":"devpts","options":["nosuid","noexec","newinstance","ptmxmode=0666","mode=0620","gid=5"]}},
    {{"destination":"/dev/shm","type":"tmpfs","source":"shm","options":["nosuid","noexec","nodev","mode=1777","size=65536k"]}},
    {{"destination":"/sys","type":"sysfs","source":"sysfs","options":["nosuid","noexec","nodev","ro"]}}],
  "linux":{{
    "namespaces":[{{"type":"pid"}},{{"type":"ipc"}},{{"type":"uts"}},{{"type":"mount"}},{{"type":"network"}}],
    "resources":{{"devices":[{{"allow":false,"access":"rwm"}}]}},
    "cgroupsPath":"/{ns}/{id}",
    "maskedPaths":["/proc/kcore","/proc/keys","/sys/firmware"],
    "readonlyPaths":["/proc/bus","/proc/fs","/proc/irq","/proc/sys","/proc/sysrq-trigger"]}}}}"#
    )
    .into_bytes()
}

#[test]
fn version_lease_and_content() {
    require_root!();
    let c = Ctrd::start("content");
    block_on(async {
        let mut cl = c.client();
        let v = cl.version().await.unwrap();
        assert!(
            v.version.contains("1.6") || v.version.contains("1.7"),
            "{v:?}"
        );

        let expire = [("containerd.io/gc.expire", "2100-01-01T00:00:00Z")];
        let lease = cl.create_lease("oak-test-lease", &expire).await.unwrap();
        assert_eq!(lease.id, "oak-test-lease");
        assert!(lease
            .labels
            .iter()
            .any(|(k, _)| k == "containerd.io/gc.expire"));
        cl.set_lease(Some("oak-test-lease"));

        // Small blob, then the same again: AlreadyExists is reported, not an error.
        let small = b"{\"hello\":\"containerd\"}".to_vec();
        let d = sha256(&small);
        let r = cl
            .write_blob(&format!("config-{d}"), &d, &small, &[])
            .await
            .unwrap();
        assert_eq!(r, WriteOutcome::Written);
        let r = cl
            .write_blob(&format!("config-{d}"), &d, &small, &[])
            .await
            .unwrap();
        assert_eq!(r, WriteOutcome::AlreadyExists);

        // > 1 MiB: several WRITE messages, each larger than the initial 64 KiB windows, so
        // the send path has to wait for WINDOW_UPDATEs and SETTINGS deltas.
        let big: Vec<u8> = (0..(3 << 20) + 12_345u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let bd = sha256(&big);
        let labels = [("containerd.io/gc.ref.content.config", d.as_str())];
        let mut w = match cl
            .content_writer(&format!("layer-{bd}"), &bd, big.len() as u64)
            .await
            .unwrap()
        {
            Ingest::Writer(w) => w,
            Ingest::Exists => panic!("new blob reported as existing"),
        };
        assert_eq!(w.offset(), 0);
        w.write(&big).await.unwrap();
        let st = w.stats();
        assert!(
            st.send_stalls > 0 && st.window_updates_received > 0,
            "{st:?}"
        );
        // grpc-go's BDP probes and INITIAL_WINDOW_SIZE growth (spec §1.5) were answered.
        assert!(st.settings_acked > 1 && st.pings_acked > 0, "{st:?}");
        assert_eq!(w.commit(&labels).await.unwrap(), WriteOutcome::Written);
        let r = cl
            .write_blob(&format!("layer-{bd}"), &bd, &big, &labels)
            .await
            .unwrap();
        assert_eq!(r, WriteOutcome::AlreadyExists);
        let info = cl.content_info(&bd).await.unwrap();
        assert_eq!(info.size, big.len() as i64);
        assert!(
            info.labels
                .iter()
                .any(|(k, v)| k == "containerd.io/gc.ref.content.config" && *v == d),
            "{info:?}"
        );

        // A wrong expected digest is refused by containerd at commit.
        let zero = format!("sha256:{}", "0".repeat(64));
        let e = cl.write_blob("layer-bad", &zero, b"x", &[]).await;
        assert!(e.is_err(), "{e:?}");

        cl.set_lease(None);
        cl.delete_lease("oak-test-lease", true).await.unwrap();
        // Nothing roots the blobs once the lease is gone (no image refers to them), so the
        // synchronous GC run by `sync = true` has collected them before the call returned.
        assert!(cl.content_info(&bd).await.unwrap_err().is_not_found());
        cl.version().await.unwrap();
    });
}

#[test]
fn errors_are_typed_and_clear() {
    require_root!();
    let c = Ctrd::start("errors");
    block_on(async {
        let mut cl = c.client();
        let e = cl
            .snapshot_stat(SNAPSHOTTER, "sha256:does-not-exist")
            .await
            .unwrap_err();
        assert!(e.is_not_found(), "{e}");
        assert!(
            e.to_string().contains("Snapshots/Stat: NotFound (5)"),
            "{e}"
        );
        let e = cl.task_get("no-such-task").await.unwrap_err();
        assert!(e.is_not_found(), "{e}");
        // Still usable after error statuses.
        cl.version().await.unwrap();
        // grpc-go indexed response headers in its dynamic table and we followed it.
        assert!(
            cl.stats().unwrap().hpack_dynamic_entries > 0,
            "{:?}",
            cl.stats()
        );

        // With HEADER_TABLE_SIZE=0 grpc-go stops using the dynamic table: both paths work.
        let mut opts = Options::new(c.socket(), c.namespace());
        opts.header_table_size = Some(0);
        let mut cl0 = Client::new(opts).unwrap();
        for _ in 0..3 {
            cl0.version().await.unwrap();
            assert!(cl0
                .snapshot_stat(SNAPSHOTTER, "missing")
                .await
                .unwrap_err()
                .is_not_found());
        }
        assert_eq!(cl0.stats().unwrap().hpack_dynamic_entries, 0);
    });
    // A socket nobody listens on: the message says what to check.
    let dead = c.dir.join("nobody.sock");
    let mut cl = Client::new(Options::new(&dead, "oaktest")).unwrap();
    let e = block_on(cl.version()).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(&*dead.to_string_lossy()) && msg.contains("is containerd running?"),
        "{msg}"
    );
    // containerd going away under an open client: the next call fails naming the socket.
    let mut cl = c.client();
    block_on(cl.version()).unwrap();
    let socket = c.socket();
    drop(c);
    let e = block_on(cl.version()).unwrap_err();
    assert!(e.to_string().contains(&*socket.to_string_lossy()), "{e}");
}

#[test]
fn unpack_and_run_busybox() {
    require_root!();
    let c = Ctrd::start("run");
    let ns = c.namespace();
    let id = "oak-run-1";
    let work = c.dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let layer = busybox_layer(&work);
    let log = c.dir.join("logs").join(format!("{id}.log"));
    block_on(async {
        let mut cl = c.client();
        cl.create_lease("oak-pull", &[]).await.unwrap();
        cl.set_lease(Some("oak-pull"));

        // Blobs: layer, config, manifest (gc labels on commit, spec §3.2).
        let diff_id = sha256(&layer);
        let chain_id = diff_id.clone(); // one layer: chainID_0 = diff_id_0
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}},"config":{{}}}}"#
        );
        let config_digest = sha256(config.as_bytes());
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{diff_id}","size":{}}}]}}"#,
            config.len(),
            layer.len()
        );
        let manifest_digest = sha256(manifest.as_bytes());
        let snap_label = format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}");
        cl.write_blob(&format!("layer-{diff_id}"), &diff_id, &layer, &[])
            .await
            .unwrap();
        let config_labels = [(snap_label.as_str(), chain_id.as_str())];
        cl.write_blob(
            &format!("config-{config_digest}"),
            &config_digest,
            config.as_bytes(),
            &config_labels,
        )
        .await
        .unwrap();
        let manifest_labels = [
            (
                "containerd.io/gc.ref.content.config",
                config_digest.as_str(),
            ),
            ("containerd.io/gc.ref.content.l.0", diff_id.as_str()),
        ];
        cl.write_blob(
            &format!("manifest-{manifest_digest}"),
            &manifest_digest,
            manifest.as_bytes(),
            &manifest_labels,
        )
        .await
        .unwrap();

        // Unpack: Stat (NotFound) → Prepare → Apply → Commit.
        assert!(cl
            .snapshot_stat(SNAPSHOTTER, &chain_id)
            .await
            .unwrap_err()
            .is_not_found());
        let key = format!("extract-1 {chain_id}");
        let snap_ref = [("containerd.io/snapshot.ref", chain_id.as_str())];
        let mounts = cl
            .snapshot_prepare(SNAPSHOTTER, &key, "", &snap_ref)
            .await
            .unwrap();
        assert!(!mounts.is_empty());
        let desc = Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            digest: diff_id.clone(),
            size: layer.len() as i64,
            annotations: vec![],
        };
        let applied = cl.diff_apply(&desc, &mounts).await.unwrap();
        assert_eq!(
            applied.digest, diff_id,
            "applied digest must be the uncompressed tar's sha256"
        );
        cl.snapshot_commit(SNAPSHOTTER, &chain_id, &key, &snap_ref)
            .await
            .unwrap();
        let info = cl.snapshot_stat(SNAPSHOTTER, &chain_id).await.unwrap();
        assert_eq!(info.kind, ctrd::SnapshotKind::Committed);

        // Image record (Create, then Update on AlreadyExists).
        let image = Image {
            name: "oak.test/busybox:1".into(),
            target: Descriptor {
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                digest: manifest_digest.clone(),
                size: manifest.len() as i64,
                annotations: vec![],
            },
            ..Image::default()
        };
        cl.image_put(&image).await.unwrap();
        let again = cl.image_put(&image).await.unwrap();
        assert_eq!(again.target.digest, manifest_digest);
        assert_eq!(
            cl.image_get("oak.test/busybox:1").await.unwrap().target,
            image.target
        );
        cl.set_lease(None);
        cl.delete_lease("oak-pull", true).await.unwrap();

        // Container: record first, then its snapshot (the record protects it from GC).
        let spec = spec_json(&ns, id);
        let created = cl
            .container_create(&ctrd::NewContainer {
                id,
                labels: &[("oakestra.io/test", "1")],
                image: "oak.test/busybox:1",
                runtime: ctrd::RUNC_V2,
                spec_json: &spec,
                snapshotter: SNAPSHOTTER,
                snapshot_key: id,
            })
            .await
            .unwrap();
        assert_eq!(created.id, id);
        let rootfs = cl
            .snapshot_prepare(SNAPSHOTTER, id, &chain_id, &[])
            .await
            .unwrap();
        let listed = cl.container_list(&[]).await.unwrap();
        assert!(
            listed.iter().any(|x| x.id == id && x.spec == spec),
            "{listed:?}"
        );

        // Subscribe BEFORE start so a fast exit is not missed.
        let filter = format!("namespace=={ns},topic==\"/tasks/exit\"");
        let mut events = cl.subscribe(&[&filter]).await.unwrap();

        let uri = format!("file://{}", log.display());
        let task = cl
            .task_create(&ctrd::CreateTask {
                container_id: id,
                rootfs: &rootfs,
                stdin: "",
                stdout: &uri,
                stderr: &uri,
                terminal: false,
            })
            .await
            .unwrap();
        assert!(task.pid > 0);
        let tasks = cl.task_list("").await.unwrap();
        assert!(
            tasks
                .iter()
                .any(|t| t.id == id && t.status == ctrd::ProcessStatus::Created),
            "{tasks:?}"
        );
        let pid = cl.task_start(id).await.unwrap();
        assert_eq!(pid, task.pid);

        let exit = timeout(30, "the /tasks/exit event", async {
            loop {
                let env = events.next().await.unwrap();
                assert_eq!(env.topic, "/tasks/exit");
                if let Event::TaskExit(e) = env.event {
                    if e.container_id == id && e.id == id {
                        break e;
                    }
                }
            }
        })
        .await;
        assert_eq!(exit.exit_status, 7);
        assert_eq!(exit.pid, pid);
        assert!(exit.exited_at.seconds > 0);

        let waited = timeout(30, "Tasks/Wait", cl.task_wait(id)).await.unwrap();
        assert_eq!(waited.exit_status, 7);
        let got = cl.task_get(id).await.unwrap();
        assert_eq!(got.status, ctrd::ProcessStatus::Stopped);
        // Kill on an exited task fails ("process already finished").
        assert!(cl.task_kill(id, 9, false).await.is_err());
        let deleted = cl.task_delete(id).await.unwrap();
        assert_eq!(deleted.exit_status, 7);
        cl.container_delete(id).await.unwrap();
        cl.snapshot_remove(SNAPSHOTTER, id).await.unwrap();
        assert!(cl.task_get(id).await.unwrap_err().is_not_found());
    });
    let out = std::fs::read_to_string(&log).unwrap();
    assert_eq!(out, "hello\n");
}
