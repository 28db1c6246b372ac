//! Integration tests of `worker::containerd` against a real, private containerd (the shared
//! `e2e` fixture: `scripts/fixture.sh`). They need root; `e2e::require_root` skips loudly
//! outside CI and fails under CI=true.

use e2e::Fixture;
use sha2::{Digest as _, Sha256};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use worker::containerd::{
    self as ctrd, Client, Descriptor, Event, Image, Ingest, Options, WriteOutcome,
};

/// Namespace of these tests (containers, images, leases live per namespace).
const NS: &str = "oaktest";

fn client(fx: &Fixture) -> Client {
    Client::new(Options::new(&fx.containerd_socket, NS)).unwrap()
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
fn spec_json(ns: &str, id: &str, args: &str) -> Vec<u8> {
    let caps = r#"["CAP_CHOWN","CAP_DAC_OVERRIDE","CAP_FSETID","CAP_FOWNER","CAP_MKNOD","CAP_NET_RAW","CAP_SETGID","CAP_SETUID","CAP_SETFCAP","CAP_SETPCAP","CAP_NET_BIND_SERVICE","CAP_SYS_CHROOT","CAP_KILL","CAP_AUDIT_WRITE"]"#;
    format!(
        r#"{{"ociVersion":"1.0.2",
  "process":{{"terminal":false,"user":{{"uid":0,"gid":0}},
    "args":{args},
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
    if !e2e::require_root("version_lease_and_content") {
        return;
    }
    let _serial = e2e::serial();
    let fx = Fixture::start().unwrap();
    block_on(async {
        let mut cl = client(&fx);
        let v = cl.version().await.unwrap();
        assert!(
            v.version.contains("1.6") || v.version.contains("1.7"),
            "{v:?}"
        );
        // Our client must read the same version ctr read, so a FIXTURE_CONTAINERD run is known
        // to have talked to the release it names.
        let expected = fx
            .env
            .get("FIXTURE_CONTAINERD_VERSION")
            .expect("fixture env");
        assert_eq!(&v.version, expected, "{v:?}");
        eprintln!("containerd {} ({})", v.version, v.revision);

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

        // An ingest abandoned half-way (writer dropped: its connection closes) is resumed from
        // containerd's offset by the next writer of the same ref.
        let part: Vec<u8> = big.iter().rev().copied().take((2 << 20) + 7).collect();
        let pd = sha256(&part);
        let pref = format!("layer-{pd}");
        let Ingest::Writer(mut w) = cl
            .content_writer(&pref, &pd, part.len() as u64)
            .await
            .unwrap()
        else {
            panic!("new blob reported as existing")
        };
        w.write(&part[..1 << 20]).await.unwrap();
        drop(w);
        // The server releases the ingest lock when it notices the closed stream; until then
        // it answers Unavailable (spec §1.4).
        let mut tries = 0;
        let w = loop {
            match cl.content_writer(&pref, &pd, part.len() as u64).await {
                Ok(Ingest::Writer(w)) => break w,
                Ok(Ingest::Exists) => panic!("not committed yet"),
                Err(e) if e.code() == Some(ctrd::Code::Unavailable) && tries < 100 => {
                    tries += 1;
                    async_io::Timer::after(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(w.offset(), 1 << 20);
        drop(w);
        let r = loop {
            match cl.write_blob(&pref, &pd, &part, &[]).await {
                Err(e) if e.code() == Some(ctrd::Code::Unavailable) => {
                    async_io::Timer::after(Duration::from_millis(20)).await;
                }
                r => break r.unwrap(),
            }
        };
        assert_eq!(r, WriteOutcome::Written);
        assert_eq!(cl.content_info(&pd).await.unwrap().size, part.len() as i64);

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
    fx.stop().unwrap();
}

#[test]
fn dead_socket_error_says_what_to_check() {
    let dead = std::env::temp_dir().join(format!("oak-no-containerd-{}.sock", std::process::id()));
    let mut cl = Client::new(Options::new(&dead, NS)).unwrap();
    let e = block_on(cl.version()).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(&*dead.to_string_lossy()) && msg.contains("is containerd running?"),
        "{msg}"
    );
    assert!(matches!(e, ctrd::Error::Connect { .. }), "{e:?}");
}

#[test]
fn errors_are_typed_and_clear() {
    if !e2e::require_root("errors_are_typed_and_clear") {
        return;
    }
    let _serial = e2e::serial();
    let fx = Fixture::start().unwrap();
    let snapshotter = fx.snapshotter.as_str();
    block_on(async {
        let mut cl = client(&fx);
        let e = cl
            .snapshot_stat(snapshotter, "sha256:does-not-exist")
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
        let mut opts = Options::new(&fx.containerd_socket, NS);
        opts.header_table_size = Some(0);
        let mut cl0 = Client::new(opts).unwrap();
        for _ in 0..3 {
            cl0.version().await.unwrap();
            assert!(cl0
                .snapshot_stat(snapshotter, "missing")
                .await
                .unwrap_err()
                .is_not_found());
        }
        assert_eq!(cl0.stats().unwrap().hpack_dynamic_entries, 0);
    });
    // containerd going away under an open client: the next call fails naming the socket.
    let mut cl = client(&fx);
    block_on(cl.version()).unwrap();
    let socket = fx.containerd_socket.clone();
    fx.stop().unwrap();
    let e = block_on(cl.version()).unwrap_err();
    assert!(e.to_string().contains(&*socket.to_string_lossy()), "{e}");
}

#[test]
fn unpack_and_run_busybox() {
    if !e2e::require_root("unpack_and_run_busybox") {
        return;
    }
    let _serial = e2e::serial();
    let fx = Fixture::start().unwrap();
    let snapshotter = fx.snapshotter.as_str();
    let runc_root = fx.runc_root.to_string_lossy().into_owned();
    let id = "oak-run-1";
    let work = fx.dir.join("ctrd-test");
    std::fs::create_dir_all(&work).unwrap();
    let layer = busybox_layer(&work);
    let log = work.join("logs").join(format!("{id}.log"));
    block_on(async {
        let mut cl = client(&fx);
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
        let snap_label = format!("containerd.io/gc.ref.snapshot.{snapshotter}");
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
            .snapshot_stat(snapshotter, &chain_id)
            .await
            .unwrap_err()
            .is_not_found());
        let key = format!("extract-1 {chain_id}");
        let snap_ref = [("containerd.io/snapshot.ref", chain_id.as_str())];
        let mounts = cl
            .snapshot_prepare(snapshotter, &key, "", &snap_ref)
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
        cl.snapshot_commit(snapshotter, &chain_id, &key, &snap_ref)
            .await
            .unwrap();
        let info = cl.snapshot_stat(snapshotter, &chain_id).await.unwrap();
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
        let spec = spec_json(NS, id, r#"["/bin/busybox","sh","-c","echo hello; exit 7"]"#);
        let created = cl
            .container_create(&ctrd::NewContainer {
                id,
                labels: &[("oakestra.io/test", "1")],
                image: "oak.test/busybox:1",
                runtime: ctrd::RUNC_V2,
                // runc's default root is shared by every containerd on the host (fixture docs).
                runc_options: Some(ctrd::RuncOptions {
                    root: &runc_root,
                    ..Default::default()
                }),
                spec_json: &spec,
                snapshotter,
                snapshot_key: id,
            })
            .await
            .unwrap();
        assert_eq!(created.id, id);
        let rootfs = cl
            .snapshot_prepare(snapshotter, id, &chain_id, &[])
            .await
            .unwrap();
        assert_eq!(cl.snapshot_mounts(snapshotter, id).await.unwrap(), rootfs);
        let listed = cl.container_list(&[]).await.unwrap();
        assert!(
            listed.iter().any(|x| x.id == id && x.spec == spec),
            "{listed:?}"
        );

        // Subscribe BEFORE start so a fast exit is not missed.
        let filter = format!("namespace=={NS},topic==\"/tasks/exit\"");
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
        // Containers/Delete un-roots the active snapshot, and containerd's GC may remove it
        // before we do (spec §3.5): NotFound is a success here.
        match cl.snapshot_remove(snapshotter, id).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => panic!("{e}"),
        }
        assert!(cl.task_get(id).await.unwrap_err().is_not_found());

        // A long-running task: Kill(SIGKILL) → exit 137 through events and Tasks/Delete.
        let id2 = "oak-run-2";
        let spec2 = spec_json(NS, id2, r#"["/bin/busybox","sleep","600"]"#);
        cl.container_create(&ctrd::NewContainer {
            id: id2,
            labels: &[],
            image: "",
            runtime: ctrd::RUNC_V2,
            runc_options: Some(ctrd::RuncOptions {
                root: &runc_root,
                ..Default::default()
            }),
            spec_json: &spec2,
            snapshotter,
            snapshot_key: id2,
        })
        .await
        .unwrap();
        let rootfs2 = cl
            .snapshot_prepare(snapshotter, id2, &chain_id, &[])
            .await
            .unwrap();
        let t = ctrd::CreateTask {
            container_id: id2,
            rootfs: &rootfs2,
            stdin: "",
            stdout: "",
            stderr: "",
            terminal: false,
        };
        cl.task_create(&t).await.unwrap();
        cl.task_start(id2).await.unwrap();
        assert_eq!(
            cl.task_get(id2).await.unwrap().status,
            ctrd::ProcessStatus::Running
        );
        // Deleting a running task is refused (spec §3.5).
        assert!(cl.task_delete(id2).await.is_err());
        cl.task_kill(id2, 9, false).await.unwrap();
        let exit = timeout(30, "the SIGKILL exit event", async {
            loop {
                if let Event::TaskExit(e) = events.next().await.unwrap().event {
                    if e.container_id == id2 && e.id == id2 {
                        break e;
                    }
                }
            }
        })
        .await;
        assert_eq!(exit.exit_status, 137);
        assert_eq!(cl.task_delete(id2).await.unwrap().exit_status, 137);
        cl.container_delete(id2).await.unwrap();
        let _ = cl.snapshot_remove(snapshotter, id2).await;
    });
    let out = std::fs::read_to_string(&log).unwrap();
    assert_eq!(out, "hello\n");
    fx.stop().unwrap();
}
