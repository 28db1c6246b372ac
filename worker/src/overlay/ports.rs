//! Port publishing (the SLA's `port`, upstream's `portMappings`): `host[:container][/tcp|/udp]`,
//! several separated by `;`, each makes the instance's `container` port reachable on the
//! worker's `host` port.
//!
//! Why a userspace forwarder and not upstream's DNAT rules: upstream adds
//! `nat OAKESTRA -p tcp --dport <host> -j DNAT` jumped to from both PREROUTING and OUTPUT with
//! no address or interface match, so every connection a container (or the host) makes to *any*
//! address on that port is redirected to the instance (overlay-network §8, bug 1). A listening
//! socket on the host only ever sees traffic addressed to the host: what containers send
//! elsewhere is forwarded by the kernel and never reaches it, so the bug cannot happen by
//! construction. It needs no iptables/nftables (nothing to leak or conflict with other
//! firewalls), a port already taken fails the deploy with the bind error, and undeploy is
//! dropping the tasks. The cost: the instance sees connections from the bridge address, not
//! the client's, and bytes cross user space (a copy per direction; fine for the control and
//! web traffic edge services publish).
//!
//! Bounds: at most [`Limits::max_tcp`] connections and [`Limits::max_udp_flows`] UDP flows
//! per published port (more are refused and counted), UDP flows end after
//! [`Limits::udp_idle`] without traffic. Buffers are allocated per connection or flow, never
//! per packet.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use async_executor::{LocalExecutor, Task};
use async_io::{Async, Timer};
use futures_lite::FutureExt;

/// Mappings one instance may ask for.
pub const MAX_MAPPINGS: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMap {
    pub host: u16,
    pub container: u16,
    pub proto: Proto,
}

fn port(s: &str, what: &str, entry: &str) -> Result<u16, String> {
    s.trim()
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{entry:?}: {what} port {s:?} is not 1-65535"))
}

/// Parses a `port` field; an empty one publishes nothing. The error names the bad entry.
pub fn parse(spec: &str) -> Result<Vec<PortMap>, String> {
    let mut out: Vec<PortMap> = Vec::new();
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (ports, proto) = match entry.split_once('/') {
            None => (entry, Proto::Tcp),
            Some((p, proto)) => match proto.trim().to_ascii_lowercase().as_str() {
                "tcp" => (p, Proto::Tcp),
                "udp" => (p, Proto::Udp),
                other => return Err(format!("{entry:?}: protocol {other:?} is not tcp or udp")),
            },
        };
        let (host, container) = match ports.split_once(':') {
            None => {
                let p = port(ports, "host", entry)?;
                (p, p)
            }
            Some((h, c)) => (port(h, "host", entry)?, port(c, "container", entry)?),
        };
        if out.iter().any(|m| m.host == host && m.proto == proto) {
            return Err(format!(
                "{entry:?}: host port {host}/{proto} is published twice"
            ));
        }
        if out.len() == MAX_MAPPINGS {
            return Err(format!("more than {MAX_MAPPINGS} published ports"));
        }
        out.push(PortMap {
            host,
            container,
            proto,
        });
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_tcp: usize,
    pub max_udp_flows: usize,
    pub udp_idle: Duration,
    pub connect_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_tcp: 256,
            max_udp_flows: 128,
            udp_idle: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Counters over every published port of the worker.
#[derive(Debug, Default)]
pub struct PortStats {
    pub tcp_accepted: Cell<u64>,
    /// Connections and UDP flows turned away by the bounds.
    pub refused: Cell<u64>,
    /// Connections to the instance that failed, accept errors, UDP send errors.
    pub errors: Cell<u64>,
}

fn bump(c: &Cell<u64>) {
    c.set(c.get().wrapping_add(1));
}

/// The forwarders of one instance; dropping it closes the listeners and ends every
/// connection and flow.
pub struct Published {
    _tasks: Vec<Task<()>>,
    _stop: async_channel::Sender<()>,
}

impl std::fmt::Debug for Published {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Published({} ports)", self._tasks.len())
    }
}

/// Binds every host port (all or nothing) and starts forwarding to `target`. `instance`
/// names the instance in logs.
pub fn publish(
    ex: &Rc<LocalExecutor<'static>>,
    maps: &[PortMap],
    target: Ipv4Addr,
    instance: &str,
    limits: Limits,
    stats: &Rc<PortStats>,
) -> Result<Published, String> {
    let (stop, stopped) = async_channel::bounded::<()>(1);
    let mut tasks = Vec::with_capacity(maps.len());
    for m in maps {
        let listen = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, m.host);
        let to = SocketAddrV4::new(target, m.container);
        let taken =
            |e: io::Error| format!("host port {}/{} is not available: {e}", m.host, m.proto);
        let ctx = Ctx {
            ex: Rc::downgrade(ex),
            to,
            what: format!("{instance} port {}/{}", m.host, m.proto),
            limits,
            stats: stats.clone(),
            stopped: stopped.clone(),
            logged_refusal: Cell::new(false),
            logged_error: Cell::new(false),
        };
        let task = match m.proto {
            Proto::Tcp => {
                let l = Async::<TcpListener>::bind(listen).map_err(taken)?;
                ex.spawn(tcp_accept(l, Rc::new(ctx)))
            }
            Proto::Udp => {
                let s = Async::<UdpSocket>::bind(listen).map_err(taken)?;
                ex.spawn(udp_relay(Rc::new(s), Rc::new(ctx)))
            }
        };
        tasks.push(task);
    }
    Ok(Published {
        _tasks: tasks,
        _stop: stop,
    })
}

struct Ctx {
    ex: Weak<LocalExecutor<'static>>,
    to: SocketAddrV4,
    what: String,
    limits: Limits,
    stats: Rc<PortStats>,
    /// Closed when the instance's ports are unpublished.
    stopped: async_channel::Receiver<()>,
    logged_refusal: Cell<bool>,
    logged_error: Cell<bool>,
}

impl Ctx {
    /// Over a bound of `limit` `what`: counted, logged the first time only.
    fn refuse(&self, limit: usize, what: &str) {
        bump(&self.stats.refused);
        if !self.logged_refusal.replace(true) {
            log::warn!(
                "{}: {limit} {what} open; refusing more (counted, logged once)",
                self.what
            );
        }
    }

    fn error(&self, e: &dyn std::fmt::Display) {
        bump(&self.stats.errors);
        if !self.logged_error.replace(true) {
            log::warn!("{}: {e} (further errors counted, logged once)", self.what);
        }
    }

    async fn until_stopped(&self) {
        let _ = self.stopped.recv().await;
    }
}

/// Decrements the connection count when a connection task ends (or is cancelled).
struct Slot(Rc<Cell<usize>>);
impl Drop for Slot {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

async fn tcp_accept(listener: Async<TcpListener>, ctx: Rc<Ctx>) {
    let active = Rc::new(Cell::new(0usize));
    loop {
        let (client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                ctx.error(&format_args!("accept failed: {e}"));
                Timer::after(Duration::from_millis(100)).await;
                continue;
            }
        };
        if active.get() >= ctx.limits.max_tcp {
            ctx.refuse(ctx.limits.max_tcp, "connections");
            continue;
        }
        let Some(ex) = ctx.ex.upgrade() else {
            return;
        };
        bump(&ctx.stats.tcp_accepted);
        active.set(active.get() + 1);
        let slot = Slot(active.clone());
        let c = ctx.clone();
        ex.spawn(async move {
            let _slot = slot;
            let work = async {
                if let Err(e) = tcp_pipe(client, &c).await {
                    c.error(&e);
                }
            };
            work.or(c.until_stopped()).await;
        })
        .detach();
    }
}

async fn tcp_pipe(client: Async<TcpStream>, ctx: &Ctx) -> io::Result<()> {
    let up = Async::<TcpStream>::connect(SocketAddr::V4(ctx.to))
        .or(async {
            Timer::after(ctx.limits.connect_timeout).await;
            Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
        })
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("to the instance at {}: {e}", ctx.to)))?;
    let (c, u) = (&client, &up);
    // Each direction half-closes the other side when its source ends, so protocols that
    // shut down writing first (HTTP/1.0 clients, netcat) still get their answer.
    let out = async move {
        let r = futures_lite::io::copy(c, &mut &*u).await;
        let _ = u.get_ref().shutdown(Shutdown::Write);
        r
    };
    let back = async move {
        let r = futures_lite::io::copy(u, &mut &*c).await;
        let _ = c.get_ref().shutdown(Shutdown::Write);
        r
    };
    let (a, b) = futures_lite::future::zip(out, back).await;
    a.and(b).map(|_| ())
}

struct Flow {
    up: Rc<Async<UdpSocket>>,
    last: Cell<Instant>,
}

async fn udp_relay(sock: Rc<Async<UdpSocket>>, ctx: Rc<Ctx>) {
    let flows: Rc<RefCell<HashMap<SocketAddr, Rc<Flow>>>> = Rc::default();
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                ctx.error(&format_args!("receive failed: {e}"));
                Timer::after(Duration::from_millis(100)).await;
                continue;
            }
        };
        let existing = flows.borrow().get(&from).cloned();
        let flow = match existing {
            Some(f) => f,
            None => {
                if flows.borrow().len() >= ctx.limits.max_udp_flows {
                    ctx.refuse(ctx.limits.max_udp_flows, "UDP flows");
                    continue;
                }
                match new_flow(&sock, &ctx, &flows, from) {
                    Ok(f) => f,
                    Err(e) => {
                        ctx.error(&format_args!("new UDP flow: {e}"));
                        continue;
                    }
                }
            }
        };
        flow.last.set(Instant::now());
        if flow.up.send(&buf[..n]).await.is_err() {
            bump(&ctx.stats.errors);
        }
    }
}

/// A socket connected to the instance for one client, and the task that relays its replies
/// back until the flow is idle.
fn new_flow(
    sock: &Rc<Async<UdpSocket>>,
    ctx: &Rc<Ctx>,
    flows: &Rc<RefCell<HashMap<SocketAddr, Rc<Flow>>>>,
    client: SocketAddr,
) -> io::Result<Rc<Flow>> {
    let up = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    up.connect(ctx.to)?;
    let flow = Rc::new(Flow {
        up: Rc::new(Async::new(up)?),
        last: Cell::new(Instant::now()),
    });
    let ex = ctx
        .ex
        .upgrade()
        .ok_or_else(|| io::Error::other("shutting down"))?;
    flows.borrow_mut().insert(client, flow.clone());
    let (sock, ctx2, flows, f) = (
        sock.clone(),
        ctx.clone(),
        Rc::downgrade(flows),
        flow.clone(),
    );
    ex.spawn(async move {
        let mut buf = vec![0u8; 65536];
        let idle = ctx2.limits.udp_idle;
        let relay = async {
            loop {
                let got = async { Some(f.up.recv(&mut buf).await) }
                    .or(async {
                        Timer::after(idle).await;
                        None
                    })
                    .await;
                match got {
                    Some(Ok(n)) => {
                        f.last.set(Instant::now());
                        if sock.send_to(&buf[..n], client).await.is_err() {
                            bump(&ctx2.stats.errors);
                        }
                    }
                    // ICMP port unreachable from the instance: keep the flow, the client
                    // may retry once the instance listens.
                    Some(Err(_)) => {
                        Timer::after(Duration::from_millis(50)).await;
                    }
                    None if f.last.get().elapsed() >= idle => return,
                    None => {}
                }
            }
        };
        relay.or(ctx2.until_stopped()).await;
        if let Some(flows) = flows.upgrade() {
            flows.borrow_mut().remove(&client);
        }
    })
    .detach();
    Ok(flow)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(host: u16, container: u16, proto: Proto) -> PortMap {
        PortMap {
            host,
            container,
            proto,
        }
    }

    #[test]
    fn upstream_forms_parse() {
        assert_eq!(parse("").unwrap(), vec![]);
        assert_eq!(parse("6080:80/tcp").unwrap(), vec![m(6080, 80, Proto::Tcp)]);
        assert_eq!(parse("80").unwrap(), vec![m(80, 80, Proto::Tcp)]);
        assert_eq!(
            parse(" 6080:80 ; 5353:53/udp;9000/UDP; ").unwrap(),
            vec![
                m(6080, 80, Proto::Tcp),
                m(5353, 53, Proto::Udp),
                m(9000, 9000, Proto::Udp)
            ]
        );
        // the same host port for both protocols is fine
        assert_eq!(parse("53/tcp;53/udp").unwrap().len(), 2);
    }

    fn free_port() -> u16 {
        TcpListener::bind("0.0.0.0:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap()
    }

    /// Real loopback sockets, no root: a published TCP port relays both ways (with the
    /// client's half-close), the connection bound refuses and counts, UDP flows relay replies,
    /// and dropping the publication closes the port.
    #[test]
    fn forwarders_relay_and_enforce_their_bounds() {
        use std::io::{Read, Write};
        let backend = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp_to = backend.local_addr().unwrap().port();
        let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp_to = echo.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut c in backend.incoming().flatten() {
                let mut got = Vec::new();
                let _ = c.read_to_end(&mut got);
                let _ = c.write_all(&[b"echo:".as_slice(), &got].concat());
            }
        });
        std::thread::spawn(move || {
            let mut buf = [0u8; 100];
            while let Ok((n, from)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], from);
            }
        });
        let (tcp_port, udp_port) = (free_port(), free_port());
        let maps = [
            m(tcp_port, tcp_to, Proto::Tcp),
            m(udp_port, udp_to, Proto::Udp),
        ];
        let ex = Rc::new(LocalExecutor::new());
        let stats = Rc::new(PortStats::default());
        let limits = Limits {
            max_tcp: 1,
            ..Limits::default()
        };
        let published = publish(&ex, &maps, Ipv4Addr::LOCALHOST, "t", limits, &stats).unwrap();
        // the same host port again: refused with the bind error
        let e = publish(&ex, &maps[..1], Ipv4Addr::LOCALHOST, "t2", limits, &stats).unwrap_err();
        assert!(
            e.contains(&format!("{tcp_port}/tcp is not available")),
            "{e}"
        );

        let client = std::thread::spawn(move || {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, tcp_port));
            let mut first = TcpStream::connect(addr).unwrap();
            first.write_all(b"hello").unwrap();
            // over the bound while the first is open: closed without data
            std::thread::sleep(Duration::from_millis(100));
            let mut second = TcpStream::connect(addr).unwrap();
            second
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut refused = Vec::new();
            let r = second.read_to_end(&mut refused);
            assert!(r.is_err() || refused.is_empty(), "{refused:?}");
            first.shutdown(Shutdown::Write).unwrap();
            let mut answer = String::new();
            first.read_to_string(&mut answer).unwrap();
            let u = UdpSocket::bind("127.0.0.1:0").unwrap();
            u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            u.send_to(b"dgram", (Ipv4Addr::LOCALHOST, udp_port))
                .unwrap();
            let mut buf = [0u8; 16];
            let (n, from) = u.recv_from(&mut buf).unwrap();
            (answer, buf[..n].to_vec(), from.port())
        });
        let (answer, dgram, from) = async_io::block_on(ex.run(async {
            loop {
                if client.is_finished() {
                    break client.join().unwrap();
                }
                Timer::after(Duration::from_millis(10)).await;
            }
        }));
        assert_eq!(answer, "echo:hello");
        assert_eq!((dgram.as_slice(), from), (b"dgram".as_slice(), udp_port));
        assert_eq!((stats.tcp_accepted.get(), stats.refused.get()), (1, 1));

        drop(published);
        async_io::block_on(ex.run(Timer::after(Duration::from_millis(50))));
        assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, tcp_port)).is_err());
    }

    #[test]
    fn bad_entries_are_named() {
        for bad in [
            "x",
            "0",
            "70000",
            "80:",
            ":80",
            "80/sctp",
            "80:80:80",
            "80;80/tcp",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains('"'), "{bad}: {e}");
        }
        let many: Vec<String> = (1..=33).map(|p| p.to_string()).collect();
        assert!(parse(&many.join(";")).is_err());
    }
}
