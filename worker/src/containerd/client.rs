//! The async client: a thin async-io shell around the pure `conn`/`grpc`/`api` cores.
//!
//! Connection model (spec §1.8): one active stream per connection. [`Client`] makes
//! sequential unary calls on one lazily (re)opened connection; [`EventStream`] and
//! [`ContentWriter`] each own a dedicated connection. No multiplexer, no background task:
//! frames (PING/SETTINGS ACKs, window updates) are processed whenever a call reads.
//! Long blocking calls (`Tasks/Wait`) hold the connection: use a second `Client` for them.

use super::api::{self, path, Decode, Encode};
use super::conn::{self, Conn, Event, Head};
use super::frame;
use super::grpc::{self, Code, Reassembler, Status};
use super::pb;
use async_io::Async;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Content/Write chunk size: big enough to be fast, far below the 16 MiB message limit.
pub const WRITE_CHUNK: usize = 1 << 20;
/// Read buffer: always room for one whole frame (9 + 16384 bytes) after compaction.
const READ_BUF: usize = 64 << 10;

#[derive(Debug, Clone)]
pub struct Options {
    pub socket: PathBuf,
    pub namespace: String,
    /// Sent as SETTINGS_HEADER_TABLE_SIZE; `None` keeps the default (dynamic table in use).
    pub header_table_size: Option<u32>,
    /// Largest response message accepted.
    pub max_message: usize,
}

impl Options {
    pub fn new(socket: impl Into<PathBuf>, namespace: impl Into<String>) -> Options {
        Options {
            socket: socket.into(),
            namespace: namespace.into(),
            header_table_size: None,
            max_message: grpc::MAX_MESSAGE,
        }
    }
}

/// Errors at the containerd client boundary. Messages name the socket or method and the fix.
#[derive(Debug)]
pub enum Error {
    /// The namespace does not match containerd's rule (spec §2).
    InvalidNamespace(String),
    Connect {
        socket: PathBuf,
        source: io::Error,
    },
    Io {
        socket: PathBuf,
        source: io::Error,
    },
    /// containerd closed the connection (restart or crash).
    Closed {
        socket: PathBuf,
    },
    /// containerd is shutting the connection down; the request was not processed.
    GoAway {
        socket: PathBuf,
        detail: String,
    },
    /// containerd broke the HTTP/2 or gRPC rules (or we have a bug).
    Protocol {
        socket: PathBuf,
        detail: String,
    },
    /// containerd reset the call's stream.
    Reset {
        method: &'static str,
        code: u32,
    },
    /// The call failed with a gRPC status (NotFound, AlreadyExists, ...).
    Status {
        method: &'static str,
        status: Status,
    },
    /// The response did not decode as the expected message.
    Decode {
        method: &'static str,
        detail: String,
    },
}

/// `/containerd.services.snapshots.v1.Snapshots/Stat` → `Snapshots/Stat`.
fn short(method: &str) -> &str {
    method.rsplit('.').next().unwrap_or(method)
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::InvalidNamespace(ns) => write!(
                f,
                "containerd namespace {ns:?} is invalid: use letters and digits, optionally joined by single '.', '_' or '-' (OAK_CONTAINERD_NAMESPACE)"
            ),
            Error::Connect { socket, source } => {
                let hint = match source.kind() {
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                        "is containerd running? (socket path from OAK_CONTAINERD_SOCKET)"
                    }
                    io::ErrorKind::PermissionDenied => "the worker needs root (or access to the socket)",
                    _ => "check that containerd is running and the path (OAK_CONTAINERD_SOCKET)",
                };
                write!(f, "containerd at {}: {source} — {hint}", socket.display())
            }
            Error::Io { socket, source } => {
                write!(f, "containerd at {}: connection lost ({source}); it will be reopened on the next call", socket.display())
            }
            Error::Closed { socket } => write!(
                f,
                "containerd at {} closed the connection (restarted?); it will be reopened on the next call",
                socket.display()
            ),
            Error::GoAway { socket, detail } => {
                write!(f, "containerd at {} is closing the connection: {detail}; retry on a new connection", socket.display())
            }
            Error::Protocol { socket, detail } => write!(
                f,
                "containerd at {}: {detail} (incompatible containerd version or a client bug; please report)",
                socket.display()
            ),
            Error::Reset { method, code } => {
                write!(f, "containerd {}: the call was reset (HTTP/2 error code {code})", short(method))
            }
            Error::Status { method, status } => write!(
                f,
                "containerd {}: {:?} ({}): {}",
                short(method),
                status.code,
                code_number(status.code),
                status.message
            ),
            Error::Decode { method, detail } => {
                write!(f, "containerd {}: cannot decode the response: {detail}", short(method))
            }
        }
    }
}

fn code_number(c: Code) -> u32 {
    match c {
        Code::Ok => 0,
        Code::Canceled => 1,
        Code::Unknown => 2,
        Code::InvalidArgument => 3,
        Code::DeadlineExceeded => 4,
        Code::NotFound => 5,
        Code::AlreadyExists => 6,
        Code::PermissionDenied => 7,
        Code::ResourceExhausted => 8,
        Code::FailedPrecondition => 9,
        Code::Aborted => 10,
        Code::OutOfRange => 11,
        Code::Unimplemented => 12,
        Code::Internal => 13,
        Code::Unavailable => 14,
        Code::DataLoss => 15,
        Code::Unauthenticated => 16,
        Code::Other(n) => n,
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Connect { source, .. } | Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl Error {
    /// The gRPC code, if containerd answered with a status.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Status { status, .. } => Some(status.code),
            _ => None,
        }
    }
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(Code::NotFound)
    }
    pub fn is_already_exists(&self) -> bool {
        self.code() == Some(Code::AlreadyExists)
    }
    /// The connection is unusable after this error (anything but a clean gRPC status).
    fn poisons_connection(&self) -> bool {
        !matches!(self, Error::Status { .. })
    }
}

/// containerd's namespace rule: `^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$`.
pub fn valid_namespace(ns: &str) -> bool {
    !ns.is_empty()
        && ns
            .split(['.', '_', '-'])
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric()))
}

// ------------------------------------------------------------------ connection shell

/// State of the call on the connection's single stream.
#[derive(Default)]
struct Call {
    method: &'static str,
    got_head: bool,
    /// Set when the stream is over: Ok for grpc-status 0.
    end: Option<Result<(), Error>>,
}

struct Connection {
    io: Async<UnixStream>,
    socket: PathBuf,
    h2: Conn,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    reasm: Reassembler,
    max_message: usize,
    /// Request encoding buffer, reused.
    msg: Vec<u8>,
    /// The last response message kept, reused.
    resp: Vec<u8>,
    call: Call,
    /// A call is in progress; if it is still set when the next call starts, the previous
    /// future was dropped mid-call and the stream state is unknown: reconnect.
    busy: bool,
}

impl Connection {
    async fn open(opts: &Options) -> Result<Connection, Error> {
        let io = Async::<UnixStream>::connect(&opts.socket)
            .await
            .map_err(|source| Error::Connect {
                socket: opts.socket.clone(),
                source,
            })?;
        let cfg = conn::Config {
            header_table_size: opts.header_table_size,
            ..conn::Config::default()
        };
        let mut c = Connection {
            io,
            socket: opts.socket.clone(),
            h2: Conn::new(cfg),
            rbuf: vec![0; READ_BUF],
            rstart: 0,
            rend: 0,
            reasm: Reassembler::new(opts.max_message),
            max_message: opts.max_message,
            msg: Vec::new(),
            resp: Vec::new(),
            call: Call::default(),
            busy: false,
        };
        // Preface + SETTINGS go out now; requests may follow without waiting (spec §1.1).
        c.flush().await?;
        Ok(c)
    }

    fn io_err(&self, source: io::Error) -> Error {
        Error::Io {
            socket: self.socket.clone(),
            source,
        }
    }

    fn conn_err(&self, e: conn::Error) -> Error {
        match e {
            conn::Error::GoAway { .. } => Error::GoAway {
                socket: self.socket.clone(),
                detail: e.to_string(),
            },
            e => Error::Protocol {
                socket: self.socket.clone(),
                detail: e.to_string(),
            },
        }
    }

    async fn flush(&mut self) -> Result<(), Error> {
        if self.h2.output().is_empty() {
            return Ok(());
        }
        let r = self.io.write_all(self.h2.output()).await;
        r.map_err(|e| self.io_err(e))?;
        self.h2.clear_output();
        Ok(())
    }

    /// Processes one frame, reading from the socket if none is buffered.
    async fn pump(&mut self) -> Result<(), Error> {
        loop {
            if self.process_one()? {
                return Ok(());
            }
            // About to block: send what we owe first (ACKs, window updates).
            self.flush().await?;
            if self.rstart > 0 {
                self.rbuf.copy_within(self.rstart..self.rend, 0);
                self.rend -= self.rstart;
                self.rstart = 0;
            }
            let n = self.io.read(&mut self.rbuf[self.rend..]).await;
            let n = n.map_err(|e| self.io_err(e))?;
            if n == 0 {
                return Err(Error::Closed {
                    socket: self.socket.clone(),
                });
            }
            self.rend += n;
        }
    }

    /// Handles one buffered frame; false if no whole frame is buffered.
    fn process_one(&mut self) -> Result<bool, Error> {
        let Connection {
            h2,
            rbuf,
            rstart,
            rend,
            reasm,
            call,
            max_message,
            ..
        } = self;
        match h2.receive(&rbuf[*rstart..*rend]) {
            Ok(Some((used, ev))) => {
                *rstart += used;
                if let Some(ev) = ev {
                    on_event(call, reasm, *max_message, ev);
                }
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(e) => Err(self.conn_err(e)),
        }
    }

    /// Before reusing an idle connection: process whatever arrived meanwhile (PINGs, a
    /// GOAWAY, EOF after a containerd restart) without blocking. False: do not reuse it.
    fn still_usable(&mut self) -> bool {
        loop {
            match self.process_one() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(_) => return false,
            }
            if self.h2.is_closing() {
                return false;
            }
            if self.rstart > 0 {
                self.rbuf.copy_within(self.rstart..self.rend, 0);
                self.rend -= self.rstart;
                self.rstart = 0;
            }
            // The socket is non-blocking (async-io sets O_NONBLOCK).
            match io::Read::read(&mut self.io.get_ref(), &mut self.rbuf[self.rend..]) {
                Ok(0) => return false,
                Ok(n) => self.rend += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(_) => return false,
            }
        }
    }

    /// Opens the stream for `method` (HEADERS only; nothing is flushed yet).
    fn start(
        &mut self,
        method: &'static str,
        namespace: &str,
        lease: Option<&str>,
    ) -> Result<(), Error> {
        let mut headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", method),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            (
                "user-agent",
                concat!("oakestra-worker/", env!("CARGO_PKG_VERSION")),
            ),
            ("containerd-namespace", namespace),
            ("containerd-lease", ""),
        ];
        let n = match lease {
            Some(l) => {
                headers[8].1 = l;
                9
            }
            None => 8,
        };
        self.h2
            .open_stream(&headers[..n])
            .map_err(|e| self.conn_err(e))?;
        self.reasm.clear();
        self.call = Call {
            method,
            ..Call::default()
        };
        self.busy = true;
        Ok(())
    }

    /// Encodes `req` as one gRPC message into the request buffer.
    fn encode(&mut self, req: &dyn Encode) {
        self.msg.clear();
        let at = grpc::begin_message(&mut self.msg);
        req.encode(&mut self.msg);
        grpc::finish_message(&mut self.msg, at);
    }

    /// Sends the request buffer on the stream, waiting for window as needed. Returns early
    /// (Ok) if the server ends the stream meanwhile; the caller then reads the status.
    async fn send(&mut self, end_stream: bool) -> Result<(), Error> {
        let mut off = 0;
        loop {
            off += self.h2.send_data(&self.msg[off..], end_stream);
            self.flush().await?;
            if off == self.msg.len() || !self.h2.can_send() {
                return Ok(());
            }
            self.pump().await?;
        }
    }

    /// Waits for the next response message. True: it is in `self.resp` (if `keep`); false:
    /// the stream ended with status OK. Not generic, so its state machine exists once.
    async fn next_message(&mut self, keep: bool) -> Result<bool, Error> {
        loop {
            let next = self.reasm.next_message().map_err(|e| Error::Protocol {
                socket: self.socket.clone(),
                detail: e.to_string(),
            })?;
            if let Some(range) = next {
                if keep {
                    self.resp.clear();
                    self.resp.extend_from_slice(self.reasm.get(range));
                }
                return Ok(true);
            }
            if let Some(end) = self.call.end.take() {
                self.busy = false;
                return end.map(|()| false);
            }
            self.pump().await?;
        }
    }

    /// Decodes the message last kept by `next_message`.
    fn decode<R: Decode>(&self) -> Result<R, Error> {
        decode(self.call.method, &self.resp)
    }

    /// The next response message, decoded, or None when the stream ended with status OK.
    async fn recv<R: Decode>(&mut self) -> Result<Option<R>, Error> {
        if self.next_message(true).await? {
            self.decode().map(Some)
        } else {
            Ok(None)
        }
    }

    /// Reads to the end of the stream, discarding further messages (the duplicate
    /// Content/Write commit reply, spec §3.1), and returns the final status.
    async fn finish(&mut self) -> Result<(), Error> {
        while self.next_message(false).await? {}
        Ok(())
    }

    /// One unary call: request, exactly one response message (left in `self.resp`), OK status.
    async fn unary(
        &mut self,
        method: &'static str,
        namespace: &str,
        lease: Option<&str>,
        req: &dyn Encode,
    ) -> Result<(), Error> {
        self.start(method, namespace, lease)?;
        self.encode(req);
        self.send(true).await?;
        if self.next_message(true).await? {
            self.finish().await
        } else {
            Err(Error::Protocol {
                socket: self.socket.clone(),
                detail: format!(
                    "{} returned status OK without a response message",
                    short(method)
                ),
            })
        }
    }
}

/// The Content/Read stream: chunks in order, at most `limit` bytes in all.
async fn read_stream(
    conn: &mut Connection,
    method: &'static str,
    namespace: &str,
    req: &dyn Encode,
    digest: &str,
    limit: usize,
) -> Result<Vec<u8>, Error> {
    conn.start(method, namespace, None)?;
    conn.encode(req);
    conn.send(true).await?;
    let mut out = Vec::new();
    while let Some(chunk) = conn.recv::<api::ContentChunk>().await? {
        if chunk.offset != out.len() as i64 {
            return Err(Error::Decode {
                method,
                detail: format!(
                    "{digest}: chunk at offset {} after {} bytes",
                    chunk.offset,
                    out.len()
                ),
            });
        }
        if out.len() + chunk.data.len() > limit {
            return Err(Error::Decode {
                method,
                detail: format!("{digest} is larger than the {limit} bytes allowed here"),
            });
        }
        out.extend_from_slice(&chunk.data);
    }
    Ok(out)
}

fn decode<R: Decode>(method: &'static str, bytes: &[u8]) -> Result<R, Error> {
    R::decode(bytes).map_err(|e: pb::Error| Error::Decode {
        method,
        detail: e.to_string(),
    })
}

/// Applies a stream event to the call state. Data is appended to the reassembler, which the
/// readers drain between frames; the bound below stops a peer that sends unasked-for data.
fn on_event(call: &mut Call, reasm: &mut Reassembler, max_message: usize, ev: Event<'_>) {
    let method = call.method;
    match ev {
        Event::Head(h) => {
            call.got_head = true;
            if let Err(e) = check_head(method, &h) {
                call.end = Some(Err(e));
            }
        }
        Event::Data { data, end_stream } => {
            reasm.push(data);
            // At most one partial message plus one frame is legitimately buffered: readers pop
            // complete messages before reading the next frame.
            if reasm.pending() > max_message + 5 + 2 * frame::DEFAULT_MAX_FRAME as usize {
                call.end = Some(Err(Error::Decode {
                    method,
                    detail: "unrequested data beyond the message limit".into(),
                }));
            } else if end_stream {
                call.end = Some(Err(Error::Decode {
                    method,
                    detail: "stream ended without gRPC trailers".into(),
                }));
            }
        }
        Event::End(h) => {
            let trailers_only = !call.got_head;
            call.end = Some(if trailers_only {
                check_head(method, &h).and_then(|()| status_of(method, &h))
            } else {
                status_of(method, &h)
            });
        }
        Event::Reset(code) => call.end = Some(Err(Error::Reset { method, code })),
    }
}

fn check_head(method: &'static str, h: &Head) -> Result<(), Error> {
    if h.status != Some(200) {
        return Err(Error::Decode {
            method,
            detail: format!("HTTP status {:?} instead of 200", h.status),
        });
    }
    match &h.content_type {
        Some(ct) if ct.starts_with(b"application/grpc") => Ok(()),
        ct => Err(Error::Decode {
            method,
            detail: format!(
                "content-type {:?} is not gRPC",
                ct.as_deref().map(String::from_utf8_lossy)
            ),
        }),
    }
}

fn status_of(method: &'static str, h: &Head) -> Result<(), Error> {
    match h.grpc_status {
        Some(0) => Ok(()),
        Some(code) => Err(Error::Status {
            method,
            status: Status {
                code: Code::from_u32(code),
                message: h
                    .grpc_message
                    .as_deref()
                    .map(grpc::percent_decode)
                    .unwrap_or_default(),
            },
        }),
        None => Err(Error::Decode {
            method,
            detail: "trailers without grpc-status".into(),
        }),
    }
}

// ------------------------------------------------------------------ client

/// The control connection, reopened if missing, abandoned mid-call or closed by containerd.
async fn reuse_or_open<'a>(
    slot: &'a mut Option<Connection>,
    opts: &Options,
) -> Result<&'a mut Connection, Error> {
    let reusable = slot.as_mut().is_some_and(|c| !c.busy && c.still_usable());
    if !reusable {
        *slot = Some(Connection::open(opts).await?);
    }
    // Some on both paths above.
    slot.as_mut().ok_or_else(|| Error::Closed {
        socket: opts.socket.clone(),
    })
}

/// A containerd client for one namespace. Cheap to create; connects on first use and
/// reconnects after any connection-level error (containerd restart, GOAWAY).
pub struct Client {
    opts: Options,
    conn: Option<Connection>,
    lease: Option<String>,
    /// The last unary response (swapped out of the connection, which may be dropped).
    resp: Vec<u8>,
}

/// Result of writing a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    Written,
    /// The content store already had it (grpc-status 6): nothing was written.
    AlreadyExists,
}

impl Client {
    /// Checks the options; does not connect yet.
    pub fn new(opts: Options) -> Result<Client, Error> {
        if !valid_namespace(&opts.namespace) {
            return Err(Error::InvalidNamespace(opts.namespace));
        }
        Ok(Client {
            opts,
            conn: None,
            lease: None,
            resp: Vec::new(),
        })
    }

    /// Creates a client and checks containerd answers (Version).
    pub async fn connect(opts: Options) -> Result<(Client, api::Version), Error> {
        let mut c = Client::new(opts)?;
        let v = c.version().await?;
        Ok((c, v))
    }

    pub fn socket(&self) -> &Path {
        &self.opts.socket
    }

    pub fn namespace(&self) -> &str {
        &self.opts.namespace
    }

    /// Protocol counters of the control connection, if one is open.
    pub fn stats(&self) -> Option<conn::Stats> {
        self.conn.as_ref().map(|c| c.h2.stats())
    }

    /// Attach `containerd-lease` to the following calls (pull and unpack, spec §2).
    pub fn set_lease(&mut self, lease: Option<&str>) {
        self.lease = lease.map(str::to_owned);
    }

    /// A unary call on the control connection; the response bytes are left in `self.resp`.
    /// A request that containerd refused with GOAWAY was not processed, so it is retried once
    /// on a new connection. Not generic: one copy of this state machine serves every method.
    async fn call(&mut self, method: &'static str, req: &dyn Encode) -> Result<(), Error> {
        let mut retried = false;
        loop {
            let conn = reuse_or_open(&mut self.conn, &self.opts).await?;
            let res = conn
                .unary(method, &self.opts.namespace, self.lease.as_deref(), req)
                .await;
            if res.is_ok() {
                std::mem::swap(&mut self.resp, &mut conn.resp);
            }
            let closing = conn.h2.is_closing();
            match res {
                Err(Error::GoAway { .. }) if !retried => {
                    retried = true;
                    self.conn = None;
                }
                res => {
                    if closing || res.as_ref().err().is_some_and(Error::poisons_connection) {
                        self.conn = None;
                    }
                    return res;
                }
            }
        }
    }

    async fn unary<R: Decode>(
        &mut self,
        method: &'static str,
        req: &dyn Encode,
    ) -> Result<R, Error> {
        self.call(method, req).await?;
        decode(method, &self.resp)
    }

    /// `Version/Version`: a cheap health check.
    pub async fn version(&mut self) -> Result<api::Version, Error> {
        self.unary(path::VERSION, &()).await
    }

    pub async fn create_lease(
        &mut self,
        id: &str,
        labels: &[(&str, &str)],
    ) -> Result<api::Lease, Error> {
        let r: api::Field1<api::Lease> = self
            .unary(path::LEASES_CREATE, &api::CreateLease { id, labels })
            .await?;
        Ok(r.0)
    }

    /// `sync` runs containerd's garbage collector before returning.
    pub async fn delete_lease(&mut self, id: &str, sync: bool) -> Result<(), Error> {
        self.unary(path::LEASES_DELETE, &api::DeleteLease { id, sync })
            .await
    }

    pub async fn content_info(&mut self, digest: &str) -> Result<api::ContentInfo, Error> {
        let r: api::Field1<api::ContentInfo> =
            self.unary(path::CONTENT_INFO, &api::Digest(digest)).await?;
        Ok(r.0)
    }

    /// Content/Read of a whole (small) blob on the control connection: index, manifest and
    /// image config documents. Refuses blobs above `limit` bytes without reading them all
    /// (the abandoned stream makes the next call reopen the connection).
    pub async fn content_read(&mut self, digest: &str, limit: usize) -> Result<Vec<u8>, Error> {
        let method = path::CONTENT_READ;
        let req = api::ReadContent {
            digest,
            offset: 0,
            size: 0,
        };
        let conn = reuse_or_open(&mut self.conn, &self.opts).await?;
        let res = read_stream(conn, method, &self.opts.namespace, &req, digest, limit).await;
        if conn.h2.is_closing() || res.as_ref().err().is_some_and(Error::poisons_connection) {
            self.conn = None;
        }
        res
    }

    /// Content/Update of the labels `labels` of an existing blob; its other labels are kept.
    pub async fn content_update_labels(
        &mut self,
        digest: &str,
        labels: &[(&str, &str)],
    ) -> Result<(), Error> {
        // The answer is the updated Info, which nobody needs.
        self.call(
            path::CONTENT_UPDATE,
            &api::UpdateContentLabels { digest, labels },
        )
        .await
    }

    /// Starts a Content/Write ingest on its own connection with a STAT for `reference`
    /// (`"layer-<digest>"` etc.). [`Ingest::Exists`] means the blob is already there.
    pub async fn content_writer(
        &self,
        reference: &str,
        expected: &str,
        total: u64,
    ) -> Result<Ingest, Error> {
        let mut conn = Connection::open(&self.opts).await?;
        conn.start(
            path::CONTENT_WRITE,
            &self.opts.namespace,
            self.lease.as_deref(),
        )?;
        let total = total as i64;
        conn.encode(&api::WriteContent {
            action: api::WriteAction::Stat,
            reference,
            total,
            expected,
            offset: 0,
            data: &[],
            labels: &[],
        });
        conn.send(false).await?;
        match conn.recv::<api::WriteContentResponse>().await {
            Ok(Some(r)) => {
                if r.offset < 0 || r.offset > total {
                    return Err(Error::Decode {
                        method: path::CONTENT_WRITE,
                        detail: format!("ingest {reference} is at offset {} of {total}", r.offset),
                    });
                }
                Ok(Ingest::Writer(Box::new(ContentWriter {
                    conn,
                    expected: expected.to_owned(),
                    total,
                    offset: r.offset,
                })))
            }
            Err(e) if e.is_already_exists() => Ok(Ingest::Exists),
            Err(e) => Err(e),
            Ok(None) => Err(Error::Decode {
                method: path::CONTENT_WRITE,
                detail: "stream ended without a STAT reply".into(),
            }),
        }
    }

    /// Writes a whole blob held in memory: STAT, WRITEs of 1 MiB in lockstep, COMMIT with
    /// `labels` (put the gc labels here, spec §3.2). Resumes a partial ingest left by a
    /// crash; AlreadyExists is success.
    pub async fn write_blob(
        &self,
        reference: &str,
        expected: &str,
        data: &[u8],
        labels: &[(&str, &str)],
    ) -> Result<WriteOutcome, Error> {
        let mut w = match self
            .content_writer(reference, expected, data.len() as u64)
            .await?
        {
            Ingest::Exists => return Ok(WriteOutcome::AlreadyExists),
            Ingest::Writer(w) => w,
        };
        let from = w.offset() as usize;
        w.write(&data[from..]).await?;
        w.commit(labels).await
    }

    pub async fn snapshot_stat(
        &mut self,
        snapshotter: &str,
        key: &str,
    ) -> Result<api::SnapshotInfo, Error> {
        let r: api::Field1<api::SnapshotInfo> = self
            .unary(path::SNAPSHOTS_STAT, &api::SnapshotKey { snapshotter, key })
            .await?;
        Ok(r.0)
    }

    /// Creates an active snapshot `key` on top of `parent` ("" for none); returns its mounts.
    pub async fn snapshot_prepare(
        &mut self,
        snapshotter: &str,
        key: &str,
        parent: &str,
        labels: &[(&str, &str)],
    ) -> Result<Vec<api::Mount>, Error> {
        let r: api::Mounts = self
            .unary(
                path::SNAPSHOTS_PREPARE,
                &api::PrepareSnapshot {
                    snapshotter,
                    key,
                    parent,
                    labels,
                },
            )
            .await?;
        Ok(r.0)
    }

    pub async fn snapshot_mounts(
        &mut self,
        snapshotter: &str,
        key: &str,
    ) -> Result<Vec<api::Mount>, Error> {
        let r: api::Mounts = self
            .unary(
                path::SNAPSHOTS_MOUNTS,
                &api::SnapshotKey { snapshotter, key },
            )
            .await?;
        Ok(r.0)
    }

    pub async fn snapshot_commit(
        &mut self,
        snapshotter: &str,
        name: &str,
        key: &str,
        labels: &[(&str, &str)],
    ) -> Result<(), Error> {
        self.unary(
            path::SNAPSHOTS_COMMIT,
            &api::CommitSnapshot {
                snapshotter,
                name,
                key,
                labels,
            },
        )
        .await
    }

    /// Snapshots/Usage: bytes and inodes of the snapshot's own layer (a container's writes).
    pub async fn snapshot_usage(
        &mut self,
        snapshotter: &str,
        key: &str,
    ) -> Result<api::SnapshotUsage, Error> {
        self.unary(
            path::SNAPSHOTS_USAGE,
            &api::SnapshotKey { snapshotter, key },
        )
        .await
    }

    pub async fn snapshot_remove(&mut self, snapshotter: &str, key: &str) -> Result<(), Error> {
        self.unary(
            path::SNAPSHOTS_REMOVE,
            &api::SnapshotKey { snapshotter, key },
        )
        .await
    }

    /// Unpacks the layer blob `diff` (from the content store) onto `mounts`; returns the
    /// applied (uncompressed) descriptor, whose digest must equal the layer's diff_id.
    pub async fn diff_apply(
        &mut self,
        diff: &api::Descriptor,
        mounts: &[api::Mount],
    ) -> Result<api::Descriptor, Error> {
        let r: api::Field1<api::Descriptor> = self
            .unary(path::DIFF_APPLY, &api::ApplyDiff { diff, mounts })
            .await?;
        Ok(r.0)
    }

    pub async fn image_get(&mut self, name: &str) -> Result<api::Image, Error> {
        let r: api::Field1<api::Image> = self.unary(path::IMAGES_GET, &api::Str1(name)).await?;
        Ok(r.0)
    }

    /// Images/Create, falling back to Images/Update (all fields) if the name exists.
    pub async fn image_put(&mut self, image: &api::Image) -> Result<api::Image, Error> {
        let r: Result<api::Field1<api::Image>, Error> = self
            .unary(path::IMAGES_CREATE, &api::ImageRequest(image))
            .await;
        match r {
            Ok(r) => Ok(r.0),
            Err(e) if e.is_already_exists() => {
                let r: api::Field1<api::Image> = self
                    .unary(path::IMAGES_UPDATE, &api::ImageRequest(image))
                    .await?;
                Ok(r.0)
            }
            Err(e) => Err(e),
        }
    }

    pub async fn container_create(
        &mut self,
        c: &api::NewContainer<'_>,
    ) -> Result<api::Container, Error> {
        let r: api::Field1<api::Container> = self.unary(path::CONTAINERS_CREATE, c).await?;
        Ok(r.0)
    }

    /// Note: containerd does not refuse this while the task runs (spec §3.5); delete the task first.
    pub async fn container_delete(&mut self, id: &str) -> Result<(), Error> {
        self.unary(path::CONTAINERS_DELETE, &api::Str1(id)).await
    }

    /// Containers of our namespace matching any of `filters` (containerd filter syntax).
    pub async fn container_list(&mut self, filters: &[&str]) -> Result<Vec<api::Container>, Error> {
        let r: api::Containers = self
            .unary(path::CONTAINERS_LIST, &api::Filters(filters))
            .await?;
        Ok(r.0)
    }

    pub async fn task_create(
        &mut self,
        t: &api::CreateTask<'_>,
    ) -> Result<api::TaskCreated, Error> {
        self.unary(path::TASKS_CREATE, t).await
    }

    pub async fn task_start(&mut self, container_id: &str) -> Result<u32, Error> {
        let r: api::Pid = self
            .unary(
                path::TASKS_START,
                &api::ProcessRef {
                    container_id,
                    exec_id: "",
                },
            )
            .await?;
        Ok(r.0)
    }

    /// Blocks until the init process exits (returns at once if it already has).
    pub async fn task_wait(&mut self, container_id: &str) -> Result<api::ExitStatus, Error> {
        self.unary(
            path::TASKS_WAIT,
            &api::ProcessRef {
                container_id,
                exec_id: "",
            },
        )
        .await
    }

    pub async fn task_kill(
        &mut self,
        container_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), Error> {
        self.unary(
            path::TASKS_KILL,
            &api::KillTask {
                container_id,
                exec_id: "",
                signal,
                all,
            },
        )
        .await
    }

    pub async fn task_delete(&mut self, container_id: &str) -> Result<api::TaskDeleted, Error> {
        self.unary(path::TASKS_DELETE, &api::Str1(container_id))
            .await
    }

    pub async fn task_get(&mut self, container_id: &str) -> Result<api::Process, Error> {
        let r: api::Field1<api::Process> = self
            .unary(
                path::TASKS_GET,
                &api::ProcessRef {
                    container_id,
                    exec_id: "",
                },
            )
            .await?;
        Ok(r.0)
    }

    /// Tasks of our namespace (`filter` in containerd filter syntax, "" for all).
    pub async fn task_list(&mut self, filter: &str) -> Result<Vec<api::Process>, Error> {
        let r: api::Processes = self.unary(path::TASKS_LIST, &api::Str1(filter)).await?;
        Ok(r.0)
    }

    /// Events/Subscribe on a dedicated connection. Subscribe before Tasks/Start: events are
    /// not replayed. Note containerd does not filter by the namespace header: pass
    /// `namespace==<ns>` in the filters (spec §3.6).
    pub async fn subscribe(&self, filters: &[&str]) -> Result<EventStream, Error> {
        let mut conn = Connection::open(&self.opts).await?;
        conn.start(path::EVENTS_SUBSCRIBE, &self.opts.namespace, None)?;
        conn.encode(&api::Filters(filters));
        conn.send(true).await?;
        Ok(EventStream { conn })
    }
}

/// A live event subscription.
pub struct EventStream {
    conn: Connection,
}

impl EventStream {
    /// The next event. An error means the subscription is over (containerd restarted):
    /// subscribe again and reconcile with Tasks/List (spec §3.6).
    pub async fn next(&mut self) -> Result<api::Envelope, Error> {
        match self.conn.recv::<api::Envelope>().await? {
            Some(e) => Ok(e),
            None => Err(Error::Closed {
                socket: self.conn.socket.clone(),
            }),
        }
    }
}

pub enum Ingest {
    /// The blob is already in the content store.
    Exists,
    Writer(Box<ContentWriter>),
}

/// A Content/Write stream in lockstep (one reply per request, spec §3.1).
pub struct ContentWriter {
    conn: Connection,
    expected: String,
    total: i64,
    offset: i64,
}

impl ContentWriter {
    /// Bytes the store already holds for this ingest (non-zero when resuming).
    pub fn offset(&self) -> u64 {
        self.offset as u64
    }

    /// Protocol counters of this writer's connection.
    pub fn stats(&self) -> conn::Stats {
        self.conn.h2.stats()
    }

    /// Appends `data` at the current offset, in messages of at most [`WRITE_CHUNK`].
    pub async fn write(&mut self, data: &[u8]) -> Result<(), Error> {
        for chunk in data.chunks(WRITE_CHUNK) {
            if self.offset + chunk.len() as i64 > self.total {
                return Err(Error::Decode {
                    method: path::CONTENT_WRITE,
                    detail: format!("writing past the announced total of {} bytes", self.total),
                });
            }
            self.conn.encode(&api::WriteContent {
                action: api::WriteAction::Write,
                reference: "",
                total: 0,
                expected: "",
                offset: self.offset,
                data: chunk,
                labels: &[],
            });
            self.conn.send(false).await?;
            let r = self.conn.recv::<api::WriteContentResponse>().await?;
            let want = self.offset + chunk.len() as i64;
            match r {
                Some(r) if r.offset == want => self.offset = want,
                Some(r) => {
                    return Err(Error::Decode {
                        method: path::CONTENT_WRITE,
                        detail: format!(
                            "containerd is at offset {} after a write, expected {want}",
                            r.offset
                        ),
                    })
                }
                None => {
                    return Err(Error::Closed {
                        socket: self.conn.socket.clone(),
                    })
                }
            }
        }
        Ok(())
    }

    /// Commits with `labels`; checks containerd computed the expected digest.
    pub async fn commit(mut self, labels: &[(&str, &str)]) -> Result<WriteOutcome, Error> {
        self.conn.encode(&api::WriteContent {
            action: api::WriteAction::Commit,
            reference: "",
            total: self.total,
            expected: &self.expected,
            offset: self.offset,
            data: &[],
            labels,
        });
        self.conn.send(true).await?;
        let r = match self.conn.recv::<api::WriteContentResponse>().await {
            Ok(r) => r,
            // Another writer committed the same blob first.
            Err(e) if e.is_already_exists() => return Ok(WriteOutcome::AlreadyExists),
            Err(e) => return Err(e),
        };
        match r {
            Some(r) if self.expected.is_empty() || r.digest == self.expected => {}
            Some(r) => {
                return Err(Error::Decode {
                    method: path::CONTENT_WRITE,
                    detail: format!(
                        "committed digest {} is not the expected {}",
                        r.digest, self.expected
                    ),
                })
            }
            None => {
                return Err(Error::Closed {
                    socket: self.conn.socket.clone(),
                })
            }
        }
        self.conn.finish().await?;
        Ok(WriteOutcome::Written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_rule() {
        for ok in ["oakestra", "a", "k8s.io", "my_ns-1.x"] {
            assert!(valid_namespace(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "a..b", "a b", "ä", "a/b"] {
            assert!(!valid_namespace(bad), "{bad}");
        }
        assert!(matches!(
            Client::new(Options::new("/x", "bad ns")),
            Err(Error::InvalidNamespace(_))
        ));
    }

    #[test]
    fn messages_name_the_thing_and_the_fix() {
        let e = Error::Connect {
            socket: "/run/containerd/containerd.sock".into(),
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        };
        let s = e.to_string();
        assert!(
            s.starts_with("containerd at /run/containerd/containerd.sock: "),
            "{s}"
        );
        assert!(s.contains("is containerd running?"), "{s}");
        let e = Error::Status {
            method: path::SNAPSHOTS_STAT,
            status: Status {
                code: Code::NotFound,
                message: "snapshot x does not exist: not found".into(),
            },
        };
        assert_eq!(
            e.to_string(),
            "containerd Snapshots/Stat: NotFound (5): snapshot x does not exist: not found"
        );
        assert!(e.is_not_found() && !e.is_already_exists());
    }

    #[test]
    fn events_map_to_call_results() {
        let mut call = Call {
            method: path::VERSION,
            ..Call::default()
        };
        let mut r = Reassembler::new(1024);
        // Trailers-only NotFound.
        let h = Head {
            status: Some(200),
            content_type: Some(b"application/grpc".to_vec()),
            grpc_status: Some(5),
            grpc_message: Some(b"no%20such".to_vec()),
        };
        on_event(&mut call, &mut r, 1024, Event::End(h));
        match call.end.take() {
            Some(Err(Error::Status { status, .. })) => assert_eq!(
                status,
                Status {
                    code: Code::NotFound,
                    message: "no such".into()
                }
            ),
            other => panic!("{other:?}"),
        }
        // Wrong content type on the response head.
        let mut call = Call {
            method: path::VERSION,
            ..Call::default()
        };
        let h = Head {
            status: Some(200),
            content_type: Some(b"text/html".to_vec()),
            ..Head::default()
        };
        on_event(&mut call, &mut r, 1024, Event::Head(h));
        assert!(matches!(call.end, Some(Err(Error::Decode { .. }))));
        // DATA with END_STREAM and no trailers.
        let mut call = Call {
            method: path::VERSION,
            got_head: true,
            ..Call::default()
        };
        on_event(
            &mut call,
            &mut r,
            1024,
            Event::Data {
                data: &[0, 0, 0, 0, 0],
                end_stream: true,
            },
        );
        assert!(matches!(call.end, Some(Err(Error::Decode { .. }))));
        // Reset.
        let mut call = Call {
            method: path::VERSION,
            ..Call::default()
        };
        on_event(&mut call, &mut r, 1024, Event::Reset(8));
        assert!(matches!(call.end, Some(Err(Error::Reset { code: 8, .. }))));
    }
}
