//! Integration tests of `worker::runtime` against the real containerd of the shared `e2e`
//! fixture: deploy, logs, limits, resources, undeploy, exits, failures, duplicate deploys and
//! adoption after a simulated worker crash. Root only (`e2e::require_root`).

use async_channel::Receiver;
use async_executor::LocalExecutor;
use e2e::Fixture;
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;
use worker::containerd::{Client, Options};
use worker::protocol::{DeleteCommand, DeployCommand, Status};
use worker::runtime::cgroups::Host;
use worker::runtime::instance::Timeouts;
use worker::runtime::{
    NoNetwork, NoPuller, PulledImage, Puller, Runtime, RuntimeConfig, StatusChange,
};

const JOB: &str = "app.test.svc.test";

fn config(fx: &Fixture, ns: &str) -> RuntimeConfig {
    // RUST_LOG=info shows the runtime's story (captured unless --nocapture).
    let _ = env_logger::builder().is_test(true).try_init();
    RuntimeConfig {
        socket: fx.containerd_socket.clone(),
        namespace: ns.into(),
        snapshotter: fx.snapshotter.clone(),
        app_logs: fx.dir.join("applogs"),
        // runc state under the fixture dir: the fixture's `down` cleans it (runc roots named
        // by the client are honoured there).
        state_dir: fx.dir.join("state"),
        timeouts: Timeouts {
            stop_grace: Duration::from_secs(2),
            ..Timeouts::default()
        },
        step_timeout: Duration::from_secs(20),
        capacity: 16,
        queue: 16,
        cgroups: None,
    }
}

fn pull(fx: &Fixture, ns: &str) {
    let out = fx
        .ctr(ns)
        .args(["images", "pull", "--plain-http", &fx.image])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ctr pull: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn job(fx: &Fixture, n: u64, cmd: &[&str]) -> DeployCommand {
    DeployCommand {
        job_name: JOB.into(),
        instance_number: n,
        image: fx.image.clone(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        environment: vec!["GREETING=hello-oak".into()],
        virtualization: "docker".into(),
        status_detail: "Waiting for scheduling decision".into(),
        vcpus: 0.5,
        memory: 64,
        ..DeployCommand::default()
    }
}

fn delete(n: u64) -> DeleteCommand {
    DeleteCommand {
        job_name: JOB.into(),
        virtualization: "docker".into(),
        instance_number: n,
    }
}

fn id(n: u64) -> String {
    format!("{JOB}.instance.{n}")
}

async fn within<T>(secs: u64, what: &str, f: impl std::future::Future<Output = T>) -> T {
    let timer = async {
        async_io::Timer::after(Duration::from_secs(secs)).await;
        panic!("timed out after {secs}s waiting for {what}");
    };
    futures_lite::future::or(f, timer).await
}

async fn next(events: &Receiver<StatusChange>, what: &str) -> StatusChange {
    within(30, what, events.recv()).await.unwrap()
}

async fn start(
    cfg: RuntimeConfig,
    puller: Rc<dyn Puller>,
    ex: &LocalExecutor<'_>,
) -> (Runtime, Receiver<StatusChange>, async_executor::Task<()>) {
    let (rt, events, driver) = Runtime::start(cfg, puller, Rc::new(NoNetwork))
        .await
        .unwrap();
    (rt, events, ex.spawn(driver))
}

fn read(p: impl AsRef<Path>) -> String {
    std::fs::read_to_string(p.as_ref()).unwrap_or_default()
}

/// Polls `f` until it is true (the log file fills asynchronously).
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    within(20, what, async {
        while !f() {
            async_io::Timer::after(Duration::from_millis(100)).await;
        }
    })
    .await
}

/// Nothing of instance `id` is left in containerd: task, container, snapshot.
async fn assert_gone(fx: &Fixture, ns: &str, id: &str) {
    let mut cl = Client::new(Options::new(&fx.containerd_socket, ns)).unwrap();
    assert!(
        cl.task_get(id).await.unwrap_err().is_not_found(),
        "task of {id} left"
    );
    let containers = cl.container_list(&[]).await.unwrap();
    assert!(containers.iter().all(|c| c.id != id), "container {id} left");
    let snap = cl.snapshot_stat(&fx.snapshotter, id).await;
    assert!(snap.unwrap_err().is_not_found(), "snapshot {id} left");
    // The deploy's lease pins its snapshot and content until the container record holds them;
    // one left behind keeps them from the GC for good.
    let out = fx.ctr(ns).args(["leases", "ls", "-q"]).output().unwrap();
    assert!(out.status.success(), "ctr leases ls: {out:?}");
    let leases = String::from_utf8_lossy(&out.stdout);
    let lease = format!("oak-deploy-{id}");
    assert!(
        leases.lines().all(|l| l.trim() != lease),
        "lease {lease} left"
    );
}

/// Where the runtime puts container `id`'s cgroup (scoped per state dir, see
/// `RuntimeConfig::cgroup_parent`), in the v1 hierarchy of `controller`.
fn cgroup_file(controller: &str, fx: &Fixture, ns: &str, id: &str, file: &str) -> PathBuf {
    let path = config(fx, ns).cgroups_path(id);
    Path::new("/sys/fs/cgroup")
        .join(controller)
        .join(path.trim_start_matches('/'))
        .join(file)
}

#[test]
fn deploy_run_resources_duplicate_undeploy() {
    if !e2e::require_root("deploy_run_resources_duplicate_undeploy") {
        return;
    }
    let _serial = e2e::serial();
    let fx = Fixture::start().unwrap();
    let ns = "oakrt1";
    pull(&fx, ns);
    let cfg = config(&fx, ns);
    let app_logs = cfg.app_logs.clone();
    let ex = LocalExecutor::new();
    async_io::block_on(ex.run(async {
        let (rt, events, _driver) = start(cfg, Rc::new(NoPuller), &ex).await;
        let script = "echo hi; hostname; env; sleep 30";
        rt.deploy(job(&fx, 0, &["sh", "-c", script])).await.unwrap();
        let s = next(&events, "CREATED").await;
        assert_eq!(
            (s.job_name.as_str(), s.instance, s.status),
            (JOB, 0, Status::Created),
            "{s:?}"
        );
        // CREATED echoes the job's status_detail (limits are enforced on this host).
        assert_eq!(s.detail, "Waiting for scheduling decision");

        // Visible to ctr, running.
        let out = fx.ctr(ns).args(["tasks", "ls"]).output().unwrap();
        let tasks = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            tasks.contains(&id(0)) && tasks.contains("RUNNING"),
            "{tasks}"
        );

        // Output in <applogs>/<id>: stdout, hostname, env (HOSTNAME first, then the job's).
        let log = app_logs.join(id(0));
        eventually("the log file", || read(&log).contains("GREETING=")).await;
        let text = read(&log);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "hi", "{text}");
        assert_eq!(lines[1], "instance-0", "{text}");
        assert!(lines.contains(&"HOSTNAME=instance-0"), "{text}");
        assert!(lines.contains(&"GREETING=hello-oak"), "{text}");

        // Limits from memory (MiB) and vcpus, in the container's cgroup (v1 layout here).
        let mem = read(cgroup_file(
            "memory",
            &fx,
            ns,
            &id(0),
            "memory.limit_in_bytes",
        ));
        assert_eq!(mem.trim(), "67108864");
        let quota = read(cgroup_file("cpu", &fx, ns, &id(0), "cpu.cfs_quota_us"));
        assert_eq!(quota.trim(), "50000");
        let period = read(cgroup_file("cpu", &fx, ns, &id(0), "cpu.cfs_period_us"));
        assert_eq!(period.trim(), "100000");

        // jobs/resources: listed with string metrics and the log tail.
        let res = rt.resources().await.unwrap();
        assert_eq!(res.len(), 1, "{res:?}");
        let r = &res[0];
        assert_eq!((r.job_name.as_str(), r.instance), (JOB, 0));
        assert_eq!(r.virtualization, "docker");
        assert!(r.cpu_percent.parse::<f64>().is_ok(), "{r:?}");
        assert!(r
            .cpu_percent
            .split('.')
            .nth(1)
            .is_some_and(|d| d.len() == 6));
        let mem: f64 = r.memory_percent.parse().unwrap();
        assert!(
            mem > 0.0 && mem < 1.0,
            "a fraction of the available memory: {r:?}"
        );
        assert!(r.disk.parse::<u64>().is_ok(), "{r:?}");
        assert!(r.logs.starts_with("hi\n"), "{r:?}");
        // A second sample has a CPU delta to work with.
        let again = rt.resources().await.unwrap();
        assert!(again[0].cpu_percent.parse::<f64>().unwrap() >= 0.0);

        // Duplicate deploy: no kill, the current status is re-reported.
        let pid_before = task_pid(&fx, ns, &id(0)).await;
        rt.deploy(job(&fx, 0, &["sh", "-c", script])).await.unwrap();
        let s = next(&events, "re-reported CREATED").await;
        assert_eq!((s.instance, s.status), (0, Status::Created));
        assert_eq!(task_pid(&fx, ns, &id(0)).await, pid_before, "not restarted");

        // Undeploy: UNDEPLOYED at once, DEAD after the teardown; nothing left.
        rt.undeploy(delete(0)).await.unwrap();
        let s = next(&events, "UNDEPLOYED").await;
        assert_eq!((s.status, s.detail.as_str()), (Status::Undeployed, ""));
        // While it stops (SIGTERM grace), it is no longer offered to the cluster as running.
        assert!(rt.resources().await.unwrap().is_empty());
        let s = next(&events, "DEAD after undeploy").await;
        assert_eq!(s.status, Status::Dead);
        // sh as pid 1 ignores SIGTERM: SIGKILL after the grace.
        assert_eq!(s.detail, "undeployed (killed by signal 9)");
        assert_gone(&fx, ns, &id(0)).await;
        assert!(rt.resources().await.unwrap().is_empty());

        // An undeploy of an unknown instance: no report.
        rt.undeploy(delete(7)).await.unwrap();
        let quiet = futures_lite::future::or(async { Some(events.recv().await) }, async {
            async_io::Timer::after(Duration::from_millis(500)).await;
            None
        })
        .await;
        assert!(quiet.is_none(), "{quiet:?}");
    }));
    fx.stop().unwrap();
}

async fn task_pid(fx: &Fixture, ns: &str, id: &str) -> u32 {
    let mut cl = Client::new(Options::new(&fx.containerd_socket, ns)).unwrap();
    cl.task_get(id).await.unwrap().pid
}

#[test]
fn exits_and_failures_are_reported_with_reasons() {
    if !e2e::require_root("exits_and_failures_are_reported_with_reasons") {
        return;
    }
    let _serial = e2e::serial();
    let fx = Fixture::start().unwrap();
    let ns = "oakrt2";
    pull(&fx, ns);
    let mut cfg = config(&fx, ns);
    cfg.timeouts.deploy = Duration::from_secs(4);
    let ex = LocalExecutor::new();
    let pulls = Rc::new(Cell::new(0));
    let counted = pulls.clone();
    // References naming "slow" never finish pulling; the others fail like a registry 404.
    let puller = move |reference: &str, _: Option<&str>| {
        counted.set(counted.get() + 1);
        let slow = reference.contains("slow");
        let msg = format!("registry 127.0.0.1:1 answered 404 for the manifest of {reference}: check the image name and tag");
        async move {
            if slow {
                futures_lite::future::pending::<()>().await;
            }
            Err::<PulledImage, String>(msg)
        }
    };
    async_io::block_on(ex.run(async {
        let (rt, events, _driver) = start(cfg, Rc::new(puller), &ex).await;

        // One-shot exiting 0 → COMPLETED (the exit may overtake the start reply).
        let mut one_shot = job(&fx, 1, &["true"]);
        one_shot.one_shot = true;
        rt.deploy(one_shot).await.unwrap();
        let mut s = next(&events, "one-shot report").await;
        if s.status == Status::Created {
            s = next(&events, "COMPLETED").await;
        }
        assert_eq!((s.instance, s.status), (1, Status::Completed), "{s:?}");
        assert_gone(&fx, ns, &id(1)).await;

        // Exit 3 → DEAD "exited with code 3".
        rt.deploy(job(&fx, 2, &["sh", "-c", "sleep 1; exit 3"]))
            .await
            .unwrap();
        assert_eq!(next(&events, "CREATED").await.status, Status::Created);
        let s = next(&events, "DEAD").await;
        assert_eq!(
            (s.instance, s.status, s.detail.as_str()),
            (2, Status::Dead, "exited with code 3")
        );
        assert_gone(&fx, ns, &id(2)).await;

        // The image is only pulled when missing; the puller's reason becomes the detail.
        assert_eq!(pulls.get(), 0, "present image: no pull");
        let mut missing = job(&fx, 3, &["true"]);
        missing.image = format!("{}/oak/nothing:here", fx.registry);
        rt.deploy(missing).await.unwrap();
        let s = next(&events, "FAILED").await;
        assert_eq!((s.instance, s.status), (3, Status::Failed));
        assert!(
            s.detail.contains("answered 404") && s.detail.contains("oak/nothing:here"),
            "{s:?}"
        );
        assert_eq!(pulls.get(), 1);
        assert_gone(&fx, ns, &id(3)).await;

        // A command that cannot start → FAILED with containerd's reason, and cleaned up.
        rt.deploy(job(&fx, 4, &["/no/such/binary"])).await.unwrap();
        let s = next(&events, "FAILED start").await;
        assert_eq!((s.instance, s.status), (4, Status::Failed), "{s:?}");
        assert!(s.detail.contains("/no/such/binary"), "{s:?}");
        assert_gone(&fx, ns, &id(4)).await;

        // Undeploy while the image is still being pulled: UNDEPLOYED, then DEAD once the
        // cancelled deploy is cleaned up.
        let mut slow = job(&fx, 5, &["true"]);
        slow.image = format!("{}/oak/slow:1", fx.registry);
        rt.deploy(slow.clone()).await.unwrap();
        async_io::Timer::after(Duration::from_millis(300)).await;
        rt.undeploy(delete(5)).await.unwrap();
        let s = next(&events, "UNDEPLOYED while pulling").await;
        assert_eq!((s.instance, s.status), (5, Status::Undeployed));
        let s = next(&events, "DEAD after the cancelled deploy").await;
        assert_eq!(
            (s.instance, s.status, s.detail.as_str()),
            (5, Status::Dead, "undeployed before it started")
        );

        // A deploy that never finishes times out (4 s here) into FAILED.
        slow.instance_number = 6;
        rt.deploy(slow).await.unwrap();
        let s = next(&events, "FAILED by the deploy timeout").await;
        assert_eq!((s.instance, s.status), (6, Status::Failed), "{s:?}");
        assert!(s.detail.contains("within 4 s"), "{s:?}");
        assert_gone(&fx, ns, &id(6)).await;
    }));
    fx.stop().unwrap();
}

#[test]
fn runs_without_the_memory_cgroup_and_says_so() {
    if !e2e::require_root("runs_without_the_memory_cgroup_and_says_so") {
        return;
    }
    let _serial = e2e::serial();
    let fx = Fixture::start().unwrap();
    let ns = "oakrt4";
    pull(&fx, ns);
    // This host as a Raspberry Pi OS kernel would show it: no memory controller.
    let mut pi = Host::detect();
    pi.memory = None;
    pi.swap = false;
    let mut cfg = config(&fx, ns);
    cfg.cgroups = Some(pi);
    let ex = LocalExecutor::new();
    async_io::block_on(ex.run(async {
        let (rt, events, _driver) = start(cfg, Rc::new(NoPuller), &ex).await;
        rt.deploy(job(&fx, 0, &["sleep", "30"])).await.unwrap();
        let s = next(&events, "CREATED").await;
        assert_eq!(s.status, Status::Created, "{s:?}");
        assert!(
            s.detail
                .starts_with("memory limit not enforced: memory cgroup disabled")
                && s.detail.contains("cmdline.txt"),
            "{s:?}"
        );
        // Running, without a memory limit, with the CPU quota.
        let mem = read(cgroup_file(
            "memory",
            &fx,
            ns,
            &id(0),
            "memory.limit_in_bytes",
        ));
        assert_ne!(mem.trim(), "67108864");
        let quota = read(cgroup_file("cpu", &fx, ns, &id(0), "cpu.cfs_quota_us"));
        assert_eq!(quota.trim(), "50000");
        assert_eq!(rt.resources().await.unwrap().len(), 1);
        rt.undeploy(delete(0)).await.unwrap();
        assert_eq!(next(&events, "UNDEPLOYED").await.status, Status::Undeployed);
        assert_eq!(next(&events, "DEAD").await.status, Status::Dead);
        assert_gone(&fx, ns, &id(0)).await;
    }));
    fx.stop().unwrap();
}

#[test]
fn adopts_running_instances_and_reports_the_dead_after_a_crash() {
    if !e2e::require_root("adopts_running_instances_and_reports_the_dead_after_a_crash") {
        return;
    }
    let _serial = e2e::serial();
    let fx = Fixture::start().unwrap();
    let ns = "oakrt3";
    pull(&fx, ns);
    let ex = LocalExecutor::new();
    async_io::block_on(ex.run(async {
        let (rt, events, driver) = start(config(&fx, ns), Rc::new(NoPuller), &ex).await;
        // Instance 0 keeps running until we write its stop file; instance 1 exits with 5
        // while "the worker is down"; instance 2 is a one-shot that exits 0 meanwhile.
        let long = job(
            &fx,
            0,
            &[
                "sh",
                "-c",
                "while [ ! -e /tmp/stop ]; do sleep 0.2; done; exit 4",
            ],
        );
        rt.deploy(long).await.unwrap();
        rt.deploy(job(&fx, 1, &["sh", "-c", "sleep 2; exit 5"]))
            .await
            .unwrap();
        let mut one_shot = job(&fx, 2, &["sh", "-c", "sleep 2"]);
        one_shot.one_shot = true;
        rt.deploy(one_shot).await.unwrap();
        for _ in 0..3 {
            assert_eq!(next(&events, "CREATED").await.status, Status::Created);
        }
        // Crash: the driver and handle vanish without any teardown.
        drop(driver);
        drop(rt);
        drop(events);
        async_io::Timer::after(Duration::from_secs(3)).await;

        let (rt, events, _driver) = start(config(&fx, ns), Rc::new(NoPuller), &ex).await;
        let mut dead = Vec::new();
        for _ in 0..2 {
            let s = next(&events, "reports of instances that died meanwhile").await;
            dead.push((s.instance, s.status, s.detail));
        }
        dead.sort_by_key(|d| d.0);
        assert_eq!(
            dead,
            [
                (1, Status::Dead, "exited with code 5".to_owned()),
                (2, Status::Completed, "exited with code 0".to_owned())
            ]
        );
        assert_gone(&fx, ns, &id(1)).await;
        assert_gone(&fx, ns, &id(2)).await;

        // The survivor is adopted: listed, still the same task, and a duplicate deploy is
        // answered without a restart.
        let res = rt.resources().await.unwrap();
        assert_eq!(res.iter().map(|r| r.instance).collect::<Vec<_>>(), [0]);
        rt.deploy(job(&fx, 0, &["true"])).await.unwrap();
        assert_eq!(next(&events, "re-report").await.status, Status::Created);

        // Its exit is still detected through the new runtime's event stream.
        let out = fx
            .ctr(ns)
            .args([
                "tasks",
                "exec",
                "--exec-id",
                "stop",
                &id(0),
                "touch",
                "/tmp/stop",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s = next(&events, "DEAD of the adopted instance").await;
        assert_eq!(
            (s.instance, s.status, s.detail.as_str()),
            (0, Status::Dead, "exited with code 4")
        );
        assert_gone(&fx, ns, &id(0)).await;
    }));
    fx.stop().unwrap();
}

/// Whether the fixture runs containerd 1.7 (FIXTURE_CONTAINERD), whose restart differs.
fn fixture_is_1_7(fx: &Fixture) -> bool {
    fx.env
        .get("FIXTURE_CONTAINERD_VERSION")
        .is_some_and(|v| v.starts_with("1.7"))
}

/// Stops the fixture's containerd (its pid file), runs `gap`, then starts it again the way
/// `fixture.sh` does, updating the pid file so the fixture's `down` still finds it. The
/// caller reaps the returned child after `down` stopped it.
async fn restart_containerd(fx: &Fixture, gap: Duration) -> std::process::Child {
    let pid_file = fx.dir.join("containerd.pid");
    let pid: i32 = read(&pid_file).trim().parse().unwrap();
    // SAFETY: kill(2) on the containerd this test's fixture started (pid from its pid file).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    eventually("containerd to stop", || {
        !Path::new(&format!("/proc/{pid}")).exists()
            || read(format!("/proc/{pid}/stat")).split(' ').nth(2) == Some("Z")
    })
    .await;
    async_io::Timer::after(gap).await;
    let log = std::fs::File::create(fx.dir.join("containerd-restarted.log")).unwrap();
    // The same binary (FIXTURE_CONTAINERD may pick another release), with its dir first on PATH
    // so it finds its own shim, as fixture.sh starts it.
    let bin = fx
        .env
        .get("FIXTURE_CONTAINERD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("containerd"));
    let mut path = std::ffi::OsString::new();
    if let Some(dir) = bin.parent().filter(|d| !d.as_os_str().is_empty()) {
        path.push(dir);
        path.push(":");
    }
    path.push(std::env::var_os("PATH").unwrap_or_default());
    let child = std::process::Command::new("setsid")
        .arg(&bin)
        .env("PATH", path)
        .arg("--config")
        .arg(fx.dir.join("containerd.toml"))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    std::fs::write(&pid_file, child.id().to_string()).unwrap();
    let socket = fx.containerd_socket.clone();
    within(20, "containerd to answer again", async {
        loop {
            let mut cl = Client::new(Options::new(&socket, "probe")).unwrap();
            if cl.version().await.is_ok() {
                return;
            }
            async_io::Timer::after(Duration::from_millis(100)).await;
        }
    })
    .await;
    child
}

#[test]
fn exit_while_containerd_restarts_is_still_reported() {
    if !e2e::require_root("exit_while_containerd_restarts_is_still_reported") {
        return;
    }
    let _serial = e2e::serial();
    let fx = Fixture::start().unwrap();
    let ns = "oakrt5";
    pull(&fx, ns);
    let ex = LocalExecutor::new();
    let mut restarted = async_io::block_on(ex.run(async {
        let (rt, events, _driver) = start(config(&fx, ns), Rc::new(NoPuller), &ex).await;
        rt.deploy(job(&fx, 0, &["sh", "-c", "sleep 2; exit 6"]))
            .await
            .unwrap();
        assert_eq!(next(&events, "CREATED").await.status, Status::Created);
        // The task exits while containerd is down. Events are not replayed to a new
        // subscription; the runtime reconciles with Tasks/List after resubscribing (a shim
        // re-publishing its exit late would be ignored as stale, so either path gives one DEAD).
        let child = restart_containerd(&fx, Duration::from_secs(3)).await;
        let s = next(&events, "DEAD found after the restart").await;
        // containerd 1.7 deletes, while it starts, the shim of a task that has no process left
        // ("cleaning leaked shim process", containerd#6860) and with it the only record of the
        // exit status; 1.6 keeps the stopped task for Tasks/List. Either way one DEAD.
        let lost = "the task disappeared from containerd (containerd restarted?)";
        let expected = if fixture_is_1_7(&fx) {
            lost
        } else {
            "exited with code 6"
        };
        assert_eq!(
            (s.instance, s.status, s.detail.as_str()),
            (0, Status::Dead, expected)
        );
        assert_gone(&fx, ns, &id(0)).await;
        // The new subscription works: a later exit arrives as an event.
        rt.deploy(job(&fx, 1, &["sh", "-c", "exit 2"]))
            .await
            .unwrap();
        let mut s = next(&events, "report of instance 1").await;
        if s.status == Status::Created {
            s = next(&events, "DEAD of instance 1").await;
        }
        assert_eq!((s.instance, s.status), (1, Status::Dead), "{s:?}");
        child
    }));
    fx.stop().unwrap();
    restarted.wait().unwrap();
}

/// An overlay stand-in: hands out a prepared netns and never finishes detaching.
struct StuckNetwork {
    netns: PathBuf,
    detached: Rc<Cell<u32>>,
}

impl worker::runtime::Network for StuckNetwork {
    fn attach<'a>(
        &'a self,
        _: &'a str,
        _: &'a DeployCommand,
    ) -> worker::runtime::BoxFuture<'a, Result<Option<PathBuf>, String>> {
        let p = self.netns.clone();
        Box::pin(async move { Ok(Some(p)) })
    }
    fn detach<'a>(&'a self, _: &'a str) -> worker::runtime::BoxFuture<'a, ()> {
        self.detached.set(self.detached.get() + 1);
        Box::pin(futures_lite::future::pending())
    }
}

#[test]
fn joins_the_overlay_netns_and_survives_a_stuck_detach() {
    if !e2e::require_root("joins_the_overlay_netns_and_survives_a_stuck_detach") {
        return;
    }
    let _serial = e2e::serial();
    let fx = Fixture::start().unwrap();
    let ns = "oakrt6";
    pull(&fx, ns);
    let name = format!("oakrt-{}", std::process::id());
    let ip = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ip(&["netns", "add", &name]);
    // Deleted on every exit path, a failed assert included.
    struct NetnsGuard(String);
    impl Drop for NetnsGuard {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "delete", &self.0])
                .status();
        }
    }
    let _netns = NetnsGuard(name.clone());
    ip(&["-n", &name, "addr", "add", "10.77.0.1/32", "dev", "lo"]);
    let detached = Rc::new(Cell::new(0));
    let net = StuckNetwork {
        netns: PathBuf::from(format!("/var/run/netns/{name}")),
        detached: detached.clone(),
    };
    let mut cfg = config(&fx, ns);
    cfg.step_timeout = Duration::from_secs(2);
    let app_logs = cfg.app_logs.clone();
    let ex = LocalExecutor::new();
    async_io::block_on(ex.run(async {
        let (rt, events, driver) = Runtime::start(cfg, Rc::new(NoPuller), Rc::new(net))
            .await
            .unwrap();
        let _driver = ex.spawn(driver);
        let script = "ip addr show lo; echo ready; exit 0";
        rt.deploy(job(&fx, 0, &["sh", "-c", script])).await.unwrap();
        let mut s = next(&events, "report").await;
        if s.status == Status::Created {
            s = next(&events, "DEAD after the exit").await;
        }
        // The teardown waited at most the step timeout for the stuck detach, then went on.
        assert_eq!(
            (s.status, s.detail.as_str()),
            (Status::Dead, "exited with code 0")
        );
        assert_eq!(detached.get(), 1);
        assert_gone(&fx, ns, &id(0)).await;
        let log = read(app_logs.join(id(0)));
        assert!(
            log.contains("10.77.0.1"),
            "the container joined the overlay's netns: {log}"
        );
    }));
    fx.stop().unwrap();
}
