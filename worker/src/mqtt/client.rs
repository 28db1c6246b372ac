//! The worker's MQTT 3.1.1 client: one task that owns the broker connection, fed by a bounded
//! command channel and reporting through a bounded event channel. It connects with a timeout,
//! subscribes (QoS 1) on every connect, publishes at QoS 1 with PUBACK tracking in a bounded
//! in-flight window (resent with DUP after a reconnect when the message asks for it), pings,
//! and reconnects with capped backoff. Subscriptions can also be added and removed while it
//! runs (the overlay's per-job topics); those are kept, bounded, and renewed on every connect.
//! It does not interpret topics or payloads.
//!
//! With [`Config::tls`] set it speaks TLS from the first byte (MQTTS, spec §10). Upstream's Go
//! worker tries plain TCP first and TLS second on the same port; we drop that quirk: against a
//! TLS-only listener the plain attempt only adds a failure, and against a plain listener it would
//! send the session unencrypted although a certificate is configured.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender, TrySendError};
use async_io::Timer;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, FutureExt};

use super::codec::{self, ConnectReturnCode, Packet, QoS};
use crate::backoff::{self, Backoff};
use crate::netio;
use crate::tls;

#[derive(Debug, Clone)]
pub struct Config {
    /// Broker host: a name or an IP literal.
    pub host: String,
    pub port: u16,
    pub client_id: String,
    /// Topic filters subscribed at QoS 1 after every CONNACK (clean sessions forget them).
    pub subscriptions: Vec<String>,
    pub keep_alive: Duration,
    /// How long a PINGREQ may stay unanswered before the connection is declared dead.
    pub ping_timeout: Duration,
    /// TCP connect plus CONNACK, and any single write.
    pub connect_timeout: Duration,
    /// Largest incoming packet accepted; a larger one drops the connection.
    pub max_packet: usize,
    /// Unacknowledged QoS 1 publishes at most; further commands wait in the channel.
    pub inflight: usize,
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    /// MQTTS: verify the broker as `host`, present the client certificate if one is configured.
    pub tls: Option<tls::Connector>,
}

impl Config {
    /// paho's defaults as the Go worker uses them (keepalive 30 s, ping timeout 10 s), but a
    /// reconnect cap of 15 s instead of paho's 10 minutes, so reports resume soon after an outage.
    pub fn new(host: &str, port: u16, client_id: &str, subscriptions: Vec<String>) -> Config {
        Config {
            host: host.into(),
            port,
            client_id: client_id.into(),
            subscriptions,
            keep_alive: Duration::from_secs(30),
            ping_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            max_packet: 1 << 20,
            inflight: 32,
            reconnect_initial: Duration::from_millis(250),
            reconnect_max: Duration::from_secs(15),
            tls: None,
        }
    }
}

/// A QoS 1 publish. `resend`: keep it across a reconnect and send it again (with DUP) until
/// acknowledged; otherwise it is dropped when the connection is lost (periodic reports).
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    pub resend: bool,
}

/// Most filters added with [`Handle::subscribe`] at a time; beyond it a subscribe is refused
/// (reported as [`Event::SubscribeRefused`]) rather than growing without bound.
pub const MAX_DYNAMIC_SUBSCRIPTIONS: usize = 1024;

/// What the session asks of the client.
#[derive(Debug, Clone, PartialEq)]
enum Command {
    Publish(Outgoing),
    Subscribe(String),
    Unsubscribe(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// CONNACK accepted and the SUBSCRIBE sent.
    Connected,
    /// A connection that had been `Connected` is gone; reconnecting follows.
    Disconnected {
        reason: String,
    },
    Message {
        topic: String,
        payload: Vec<u8>,
    },
    SubscribeRefused {
        filter: String,
    },
}

/// Counters the client keeps; read by the status endpoint.
#[derive(Debug, Default)]
pub struct Stats {
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub connection_losses: AtomicU64,
    pub published: AtomicU64,
    pub resent: AtomicU64,
    pub dropped: AtomicU64,
    pub received: AtomicU64,
}

/// The session's side of a client.
#[derive(Debug, Clone)]
pub struct Handle {
    commands: Sender<Command>,
    pub events: Receiver<Event>,
    pub stats: Arc<Stats>,
}

impl Handle {
    /// Never waits: the caller must not block on the client while the client may be blocked
    /// delivering an event to the caller. `Err` gives the message back (queue full or client
    /// stopped).
    pub fn try_publish(&self, out: Outgoing) -> Result<(), Outgoing> {
        match self.commands.try_send(Command::Publish(out)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(c) | TrySendError::Closed(c)) => match c {
                Command::Publish(o) => Err(o),
                _ => unreachable!("try_send gives back the command it was given"),
            },
        }
    }

    /// Adds a filter (QoS 1) now if connected, and on every later connect. Never waits; `false`
    /// when the command queue is full or the client stopped (the caller asks again later).
    pub fn subscribe(&self, filter: String) -> bool {
        self.commands.try_send(Command::Subscribe(filter)).is_ok()
    }

    /// Removes a filter added with [`Handle::subscribe`]; never waits, like `subscribe`.
    pub fn unsubscribe(&self, filter: String) -> bool {
        self.commands.try_send(Command::Unsubscribe(filter)).is_ok()
    }

    /// Asks the client to send DISCONNECT and end; its task finishes soon after.
    pub fn close(&self) {
        self.commands.close();
    }
}

/// Creates a client; spawn the returned future on the executor. It runs until [`Handle::close`]
/// or until every `Handle` is dropped. `stats` may be shared by successive clients.
pub fn client(cfg: Config, stats: Arc<Stats>) -> (Handle, impl Future<Output = ()>) {
    let (cmd_tx, cmd_rx) = async_channel::bounded(cfg.inflight.max(1));
    let (ev_tx, ev_rx) = async_channel::bounded(64);
    let c = Client {
        backoff: Backoff::new(cfg.reconnect_initial, cfg.reconnect_max),
        rbuf: vec![0; (64 << 10).min(cfg.max_packet + codec::MAX_FIXED_HEADER)],
        cfg,
        commands: cmd_rx,
        events: ev_tx,
        stats: stats.clone(),
        inflight: VecDeque::new(),
        next_pid: 0,
        wbuf: Vec::new(),
        dynamic: Vec::new(),
        pending_subacks: VecDeque::new(),
    };
    let handle = Handle {
        commands: cmd_tx,
        events: ev_rx,
        stats,
    };
    (handle, c.run())
}

struct Inflight {
    pid: u16,
    topic: String,
    payload: Vec<u8>,
    resend: bool,
    /// When it last went on the wire; `None` while waiting to be (re)sent.
    sent_at: Option<Instant>,
    /// Sent at least once before: the resend carries DUP.
    dup: bool,
}

/// Why a connection ended.
enum End {
    /// The session closed the command channel (or dropped the events): stop for good.
    Stopped,
    Lost(String),
}

/// What an incoming packet asks of the client, detached from the read buffer it came from.
enum Incoming {
    ConnAck(ConnectReturnCode),
    Message {
        topic: String,
        payload: Vec<u8>,
        ack: Option<u16>,
    },
    PubAck(u16),
    SubAck {
        pid: u16,
        refused: Vec<usize>,
    },
    PingResp,
    Ignored(&'static str),
}

struct Client {
    cfg: Config,
    commands: Receiver<Command>,
    events: Sender<Event>,
    stats: Arc<Stats>,
    backoff: Backoff,
    inflight: VecDeque<Inflight>,
    next_pid: u16,
    /// Grows on demand up to `max_packet` + header, then is reused: no per-packet allocation.
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    /// Filters added at run time, in order, at most [`MAX_DYNAMIC_SUBSCRIPTIONS`].
    dynamic: Vec<String>,
    /// SUBSCRIBEs awaiting their SUBACK (pid, filters), to name a refused filter. Bounded: the
    /// oldest is forgotten first (a broker answers in order).
    pending_subacks: VecDeque<(u16, Vec<String>)>,
}

/// SUBSCRIBEs remembered for naming refusals.
const PENDING_SUBACKS: usize = 32;

fn lost(e: impl std::fmt::Display) -> End {
    End::Lost(e.to_string())
}

impl Client {
    async fn run(mut self) {
        let addr = format!("{}:{}", self.cfg.host, self.cfg.port);
        let mut failures: u64 = 0;
        loop {
            let connects = self.stats.connects.load(Relaxed);
            let end = match self.open().await {
                Ok(stream) => self.serve(stream).await,
                Err(e) => End::Lost(format!("cannot connect: {e}")),
            };
            let reason = match end {
                End::Stopped => return,
                End::Lost(r) => r,
            };
            let dropped = self.forget_unsent_reports();
            if self.stats.connects.load(Relaxed) != connects {
                failures = 0;
            } else {
                self.stats.connect_failures.fetch_add(1, Relaxed);
            }
            failures += 1;
            let delay = self.backoff.next_delay(backoff::jitter());
            log::warn!(
                "MQTT {addr} as {}: {reason}; {}retry {failures} in {} ms",
                self.cfg.client_id,
                if dropped > 0 {
                    format!("{dropped} unacknowledged reports dropped; ")
                } else {
                    String::new()
                },
                delay.as_millis()
            );
            if self.wait(delay).await.is_err() {
                return;
            }
        }
    }

    /// The transport: TCP, then TLS when configured (see the module docs).
    async fn open(&mut self) -> io::Result<tls::Stream> {
        let c = &self.cfg;
        tls::connect(&c.host, c.port, c.tls.as_ref(), c.connect_timeout).await
    }

    /// Drops in-flight messages that are not to be resent (stale periodic reports).
    fn forget_unsent_reports(&mut self) -> usize {
        let before = self.inflight.len();
        self.inflight.retain(|m| m.resend);
        let dropped = before - self.inflight.len();
        self.stats.dropped.fetch_add(dropped as u64, Relaxed);
        dropped
    }

    /// Backoff wait that still takes commands: messages to resend are kept (within the
    /// window), others dropped. `Err` when the session closed the channel.
    async fn wait(&mut self, delay: Duration) -> Result<(), ()> {
        let until = Instant::now() + delay;
        loop {
            let cmd = async { Some(self.commands.recv().await) }
                .or(async {
                    Timer::at(until).await;
                    None
                })
                .await;
            match cmd {
                None => return Ok(()),
                Some(Err(_)) => return Err(()),
                // kept for the next connect; a refusal at the bound is logged there
                Some(Ok(Command::Subscribe(f))) => {
                    self.remember(f);
                }
                Some(Ok(Command::Unsubscribe(f))) => self.dynamic.retain(|d| *d != f),
                Some(Ok(Command::Publish(out)))
                    if out.resend && self.inflight.len() < self.cfg.inflight =>
                {
                    let pid = self.alloc_pid();
                    self.inflight.push_back(Inflight {
                        pid,
                        topic: out.topic,
                        payload: out.payload,
                        resend: true,
                        sent_at: None,
                        dup: false,
                    });
                }
                Some(Ok(Command::Publish(out))) => {
                    self.stats.dropped.fetch_add(1, Relaxed);
                    log::debug!("MQTT not connected: dropped a publish on {}", out.topic);
                }
            }
        }
    }

    /// Adds a run-time filter; `false` if the bound is reached.
    fn remember(&mut self, f: String) -> bool {
        if self.dynamic.contains(&f) || self.cfg.subscriptions.contains(&f) {
            return true;
        }
        if self.dynamic.len() >= MAX_DYNAMIC_SUBSCRIPTIONS {
            log::error!(
                "MQTT: not subscribing to {f:?}: {MAX_DYNAMIC_SUBSCRIPTIONS} run-time subscriptions already"
            );
            return false;
        }
        self.dynamic.push(f);
        true
    }

    async fn subscribe<S: AsyncWrite + Unpin>(
        &mut self,
        s: &mut S,
        filters: Vec<String>,
    ) -> Result<(), End> {
        if filters.is_empty() {
            return Ok(());
        }
        let pid = self.alloc_pid();
        let topics: Vec<(&str, QoS)> = filters
            .iter()
            .map(|t| (t.as_str(), QoS::AtLeastOnce))
            .collect();
        let p = Packet::Subscribe(codec::Subscribe {
            pid,
            topics: codec::Topics::List(&topics),
        });
        write_packet(s, &mut self.wbuf, &p, self.cfg.connect_timeout).await?;
        if self.pending_subacks.len() >= PENDING_SUBACKS {
            self.pending_subacks.pop_front();
        }
        self.pending_subacks.push_back((pid, filters));
        Ok(())
    }

    fn alloc_pid(&mut self) -> u16 {
        loop {
            self.next_pid = self.next_pid.wrapping_add(1);
            let p = self.next_pid;
            // The window is far smaller than 65535, so a free id is always near.
            if p != 0 && !self.inflight.iter().any(|m| m.pid == p) {
                return p;
            }
        }
    }

    async fn write<S: AsyncWrite + Unpin>(&mut self, s: &mut S, p: &Packet<'_>) -> Result<(), End> {
        write_packet(s, &mut self.wbuf, p, self.cfg.connect_timeout).await
    }

    async fn send_inflight<S: AsyncWrite + Unpin>(
        &mut self,
        s: &mut S,
        i: usize,
    ) -> Result<(), End> {
        let m = &self.inflight[i];
        let p = Packet::Publish(codec::Publish {
            dup: m.dup,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: &m.topic,
            pid: m.pid,
            payload: &m.payload,
        });
        // Fields borrowed apart: the payload is encoded from `inflight` without a copy.
        write_packet(s, &mut self.wbuf, &p, self.cfg.connect_timeout).await?;
        let m = &mut self.inflight[i];
        if m.dup {
            self.stats.resent.fetch_add(1, Relaxed);
        }
        m.sent_at = Some(Instant::now());
        m.dup = true;
        Ok(())
    }

    /// Reads until at least one whole packet is buffered, then decodes the first one.
    /// `filled` is the number of buffered bytes, kept across calls.
    fn next_packet(&mut self, filled: &mut usize) -> Result<Option<Incoming>, End> {
        let max = self.cfg.max_packet;
        let (pkt, n) = match codec::decode(&self.rbuf[..*filled], max) {
            Ok(Some(x)) => x,
            Ok(None) => {
                if *filled == self.rbuf.len() {
                    // The header said the packet fits the limit, so the buffer may grow to it.
                    let cap = max + codec::MAX_FIXED_HEADER;
                    if self.rbuf.len() >= cap {
                        return Err(End::Lost("incoming packet larger than the buffer".into()));
                    }
                    let grown = (self.rbuf.len() * 2).min(cap);
                    self.rbuf.resize(grown, 0);
                }
                return Ok(None);
            }
            Err(e) => return Err(End::Lost(format!("malformed packet from the broker: {e}"))),
        };
        let inc = match pkt {
            Packet::ConnAck(a) => Incoming::ConnAck(a.code),
            Packet::Publish(p) => Incoming::Message {
                topic: p.topic.to_string(),
                payload: p.payload.to_vec(),
                ack: (p.qos == QoS::AtLeastOnce).then_some(p.pid),
            },
            Packet::PubAck { pid } => Incoming::PubAck(pid),
            Packet::SubAck(s) => Incoming::SubAck {
                pid: s.pid,
                refused: s
                    .codes
                    .iter()
                    .enumerate()
                    .filter(|(_, &c)| c == codec::SUBACK_FAILURE)
                    .map(|(i, _)| i)
                    .collect(),
            },
            Packet::PingResp => Incoming::PingResp,
            Packet::UnsubAck { .. } => Incoming::Ignored("UNSUBACK"),
            // A broker never sends these to a client.
            Packet::Connect(_)
            | Packet::Subscribe(_)
            | Packet::Unsubscribe(_)
            | Packet::PingReq
            | Packet::Disconnect => {
                return Err(End::Lost("broker sent a client-only packet".into()))
            }
        };
        self.rbuf.copy_within(n..*filled, 0);
        *filled -= n;
        Ok(Some(inc))
    }

    async fn emit(&self, ev: Event) -> Result<(), End> {
        self.events.send(ev).await.map_err(|_| End::Stopped)
    }

    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(&mut self, mut s: S) -> End {
        match self.session(&mut s).await {
            Ok(()) => End::Stopped,
            Err(End::Stopped) => {
                // Polite goodbye so the broker does not wait for the keepalive to expire.
                let _ = self.write(&mut s, &Packet::Disconnect).await;
                End::Stopped
            }
            Err(lost) => lost,
        }
    }

    async fn session<S: AsyncRead + AsyncWrite + Unpin>(&mut self, s: &mut S) -> Result<(), End> {
        let keep_alive = self.cfg.keep_alive.as_secs().min(u16::MAX as u64) as u16;
        let client_id = self.cfg.client_id.clone();
        self.write(
            s,
            &Packet::Connect(codec::Connect {
                client_id: &client_id,
                keep_alive,
                clean_session: true,
                will: None,
                username: None,
                password: None,
            }),
        )
        .await?;
        let mut filled = 0;
        let deadline = Instant::now() + self.cfg.connect_timeout;
        let code = loop {
            if let Some(inc) = self.next_packet(&mut filled)? {
                match inc {
                    Incoming::ConnAck(code) => break code,
                    _ => return Err(End::Lost("broker sent a packet before CONNACK".into())),
                }
            }
            let (rbuf, why) = (&mut self.rbuf, Why(&self.cfg));
            let more = async { Some(read_into(s, rbuf, &mut filled, why).await) }
                .or(async {
                    Timer::at(deadline).await;
                    None
                })
                .await;
            match more {
                Some(r) => r?,
                None => return Err(End::Lost("no CONNACK in time".into())),
            }
        };
        if code != ConnectReturnCode::Accepted {
            return Err(End::Lost(format!("broker refused the connection: {code}")));
        }
        self.backoff.reset();
        self.stats.connects.fetch_add(1, Relaxed);

        self.pending_subacks.clear();
        let all: Vec<String> = self
            .cfg
            .subscriptions
            .iter()
            .chain(self.dynamic.iter())
            .cloned()
            .collect();
        self.subscribe(s, all).await?;
        // Unacknowledged messages from before the outage, oldest first.
        for i in 0..self.inflight.len() {
            self.send_inflight(s, i).await?;
        }
        log::info!(
            "MQTT connected to {}:{} as {}{}",
            self.cfg.host,
            self.cfg.port,
            self.cfg.client_id,
            match &self.cfg.tls {
                Some(t) if t.presents_certificate() => " over TLS with a client certificate",
                Some(_) => " over TLS",
                None => "",
            }
        );
        let result = self.connected(s, filled).await;
        if let Err(End::Lost(reason)) = &result {
            self.stats.connection_losses.fetch_add(1, Relaxed);
            // Best effort: the session learns about it before the backoff wait starts.
            let _ = self.events.try_send(Event::Disconnected {
                reason: reason.clone(),
            });
        }
        result
    }

    async fn connected<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut S,
        mut filled: usize,
    ) -> Result<(), End> {
        self.emit(Event::Connected).await?;
        enum Wake {
            Read(Result<(), End>),
            Command(Result<Command, async_channel::RecvError>),
            Timer,
        }
        let ka = self.cfg.keep_alive;
        let mut last_rx = Instant::now();
        let mut last_tx = Instant::now();
        let mut ping_sent: Option<Instant> = None;
        loop {
            while let Some(inc) = self.next_packet(&mut filled)? {
                last_rx = Instant::now();
                self.stats.received.fetch_add(1, Relaxed);
                match inc {
                    Incoming::Message {
                        topic,
                        payload,
                        ack,
                    } => {
                        if let Some(pid) = ack {
                            self.write(s, &Packet::PubAck { pid }).await?;
                            last_tx = Instant::now();
                        }
                        self.emit(Event::Message { topic, payload }).await?;
                    }
                    Incoming::PubAck(pid) => {
                        if let Some(i) = self.inflight.iter().position(|m| m.pid == pid) {
                            self.inflight.remove(i);
                            self.stats.published.fetch_add(1, Relaxed);
                        }
                    }
                    Incoming::SubAck { pid, refused } => {
                        let filters = self
                            .pending_subacks
                            .iter()
                            .position(|(p, _)| *p == pid)
                            .and_then(|i| self.pending_subacks.remove(i))
                            .map(|(_, f)| f)
                            .unwrap_or_default();
                        for i in refused {
                            let filter = filters.get(i).cloned().unwrap_or_default();
                            log::error!("MQTT broker refused the subscription to {filter:?}");
                            self.emit(Event::SubscribeRefused { filter }).await?;
                        }
                    }
                    Incoming::PingResp => ping_sent = None,
                    Incoming::ConnAck(_) => return Err(End::Lost("second CONNACK".into())),
                    Incoming::Ignored(what) => log::debug!("MQTT: ignored {what}"),
                }
            }
            // Next timer: the ping answer deadline, else the keepalive, else an overdue PUBACK
            // (a half-open connection that still takes our writes never acknowledges them).
            let deadline = if ka.is_zero() {
                None
            } else if let Some(t) = ping_sent {
                Some(t + self.cfg.ping_timeout)
            } else {
                let oldest = self
                    .inflight
                    .iter()
                    .filter_map(|m| m.sent_at)
                    .min()
                    .map(|t| t + ka + self.cfg.ping_timeout);
                let idle = last_rx.min(last_tx) + ka;
                Some(oldest.map_or(idle, |o| o.min(idle)))
            };
            let window_open = self.inflight.len() < self.cfg.inflight;
            let wake = {
                let (rbuf, why) = (&mut self.rbuf, Why(&self.cfg));
                let read = async { Wake::Read(read_into(s, rbuf, &mut filled, why).await) };
                let commands = &self.commands;
                let cmd = async {
                    if window_open {
                        Wake::Command(commands.recv().await)
                    } else {
                        std::future::pending().await
                    }
                };
                let timer = async {
                    match deadline {
                        Some(d) => {
                            Timer::at(d).await;
                            Wake::Timer
                        }
                        None => std::future::pending().await,
                    }
                };
                // Commands before reads: acknowledgements never wait behind a burst of input.
                cmd.or(read).or(timer).await
            };
            match wake {
                Wake::Read(r) => r?,
                Wake::Command(Err(_)) => return Err(End::Stopped),
                Wake::Command(Ok(Command::Subscribe(f))) => {
                    if self.remember(f.clone()) {
                        self.subscribe(s, vec![f]).await?;
                        last_tx = Instant::now();
                    } else {
                        self.emit(Event::SubscribeRefused { filter: f }).await?;
                    }
                }
                Wake::Command(Ok(Command::Unsubscribe(f))) => {
                    let known = self.dynamic.len();
                    self.dynamic.retain(|d| *d != f);
                    if self.dynamic.len() != known {
                        let pid = self.alloc_pid();
                        let filters = [f.as_str()];
                        let p = Packet::Unsubscribe(codec::Unsubscribe {
                            pid,
                            filters: codec::Filters::List(&filters),
                        });
                        self.write(s, &p).await?;
                        last_tx = Instant::now();
                    }
                }
                Wake::Command(Ok(Command::Publish(out))) => {
                    let probe = Packet::Publish(codec::Publish {
                        dup: false,
                        qos: QoS::AtLeastOnce,
                        retain: false,
                        topic: &out.topic,
                        pid: 1,
                        payload: &out.payload,
                    });
                    if let Err(e) = probe.encoded_len() {
                        log::error!("MQTT: not publishing on {:?}: {e}", out.topic);
                        self.stats.dropped.fetch_add(1, Relaxed);
                        continue;
                    }
                    let pid = self.alloc_pid();
                    self.inflight.push_back(Inflight {
                        pid,
                        topic: out.topic,
                        payload: out.payload,
                        resend: out.resend,
                        sent_at: None,
                        dup: false,
                    });
                    let i = self.inflight.len() - 1;
                    self.send_inflight(s, i).await?;
                    last_tx = Instant::now();
                }
                Wake::Timer => {
                    let now = Instant::now();
                    if let Some(t) = ping_sent {
                        if now >= t + self.cfg.ping_timeout {
                            return Err(End::Lost(format!(
                                "no PINGRESP within {} ms",
                                self.cfg.ping_timeout.as_millis()
                            )));
                        }
                    } else if self
                        .inflight
                        .iter()
                        .filter_map(|m| m.sent_at)
                        .any(|t| now >= t + ka + self.cfg.ping_timeout)
                    {
                        return Err(End::Lost("a publish stayed unacknowledged too long".into()));
                    } else if now >= last_rx.min(last_tx) + ka {
                        self.write(s, &Packet::PingReq).await?;
                        last_tx = now;
                        ping_sent = Some(now);
                    }
                }
            }
        }
    }
}

async fn write_packet<S: AsyncWrite + Unpin>(
    s: &mut S,
    wbuf: &mut Vec<u8>,
    p: &Packet<'_>,
    limit: Duration,
) -> Result<(), End> {
    let n = p.encoded_len().map_err(lost)?;
    wbuf.resize(n, 0);
    p.encode(wbuf).map_err(lost)?;
    netio::timeout(limit, "write to broker", async {
        s.write_all(wbuf).await?;
        s.flush().await
    })
    .await
    .map_err(lost)
}

/// Turns read errors into operator-facing reasons: under TLS 1.3 a broker that refuses our
/// client certificate (or wants one) says so in an alert on the first read, not in the handshake.
#[derive(Clone, Copy)]
struct Why<'a>(&'a Config);

async fn read_into<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut [u8],
    filled: &mut usize,
    why: Why<'_>,
) -> Result<(), End> {
    match s.read(&mut buf[*filled..]).await {
        Ok(0) => Err(End::Lost("broker closed the connection".into())),
        Ok(n) => {
            *filled += n;
            Ok(())
        }
        Err(e) => match &why.0.tls {
            Some(t) => Err(lost(format!("read: {}", t.explain(&why.0.host, &e)))),
            None => Err(lost(format!("read: {e}"))),
        },
    }
}
