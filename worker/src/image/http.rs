//! A small HTTP/1.1 client for registries: HTTPS with rustls (ring, system roots plus an
//! optional extra CA), plain HTTP only for hosts the operator listed as insecure, redirects
//! (credentials never follow to another origin), streaming bodies through a bounded buffer and
//! per-operation timeouts. One request per connection (`Connection: close`): no pooling.
//! The parsers (URL, response head, chunked framing) are pure; `Client` is the async-io shell.

use async_io::{Async, Timer};
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use rustls::pki_types::ServerName;
use std::fmt;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Largest response head (status line + headers) accepted.
const MAX_HEAD: usize = 16 << 10;
const MAX_HEADERS: usize = 64;
/// Connection read buffer; body bytes pass through it to the caller's buffer.
const READ_BUF: usize = 64 << 10;
const MAX_REDIRECTS: usize = 5;

// ------------------------------------------------------------------ URLs

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub https: bool,
    /// Host without brackets (an IPv6 literal is bare here).
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub target: String,
}

impl Url {
    pub fn parse(s: &str) -> Result<Url, String> {
        let (https, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("URL {s:?} is not http:// or https://"));
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, target) = rest.split_at(end);
        let target = target.split('#').next().unwrap_or("");
        // No userinfo: credentials in URLs are not something a registry sends us.
        if authority.contains('@') || authority.is_empty() {
            return Err(format!("URL {s:?} has an unusable host"));
        }
        let (host, port) = split_host_port(authority)
            .ok_or_else(|| format!("URL {s:?} has a bad host or port"))?;
        let port = port.unwrap_or(if https { 443 } else { 80 });
        if target.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(format!("URL {s:?} contains spaces or control characters"));
        }
        let target = match target {
            "" => "/".to_owned(),
            t if t.starts_with('?') => format!("/{t}"),
            t => t.to_owned(),
        };
        Ok(Url {
            https,
            host,
            port,
            target,
        })
    }

    fn default_port(&self) -> bool {
        self.port == if self.https { 443 } else { 80 }
    }

    /// `host[:port]` as written in a `Host` header and in `OAK_INSECURE_REGISTRIES`.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.default_port() {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    pub fn same_origin(&self, other: &Url) -> bool {
        self.https == other.https
            && self.host.eq_ignore_ascii_case(&other.host)
            && self.port == other.port
    }

    /// Resolves a `Location` header against this URL.
    pub fn join(&self, location: &str) -> Result<Url, String> {
        if location.starts_with("http://") || location.starts_with("https://") {
            return Url::parse(location);
        }
        let scheme = if self.https { "https" } else { "http" };
        if let Some(rest) = location.strip_prefix("//") {
            return Url::parse(&format!("{scheme}://{rest}"));
        }
        let path = if location.starts_with('/') {
            location.to_owned()
        } else {
            let base = self.target.split('?').next().unwrap_or("/");
            let dir = &base[..base.rfind('/').map_or(0, |i| i + 1)];
            format!("{dir}{location}")
        };
        Url::parse(&format!("{scheme}://{}{path}", self.authority()))
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority(), self.target)
    }
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`.
pub fn split_host_port(a: &str) -> Option<(String, Option<u16>)> {
    if let Some(v6) = a.strip_prefix('[') {
        let (host, rest) = v6.split_once(']')?;
        let port = match rest {
            "" => None,
            r => Some(r.strip_prefix(':')?.parse().ok()?),
        };
        return Some((host.to_owned(), port));
    }
    match a.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h.to_owned(), Some(p.parse().ok()?))),
        Some(_) => None,
        None => Some((a.to_owned(), None)),
    }
    .filter(|(h, _)| {
        !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    })
}

/// Whether `host:port` may be spoken to in plain HTTP: an entry `host:port` matches exactly,
/// a bare `host` entry matches any port of that host.
pub fn is_insecure(list: &[String], url: &Url) -> bool {
    let host = if url.host.contains(':') {
        format!("[{}]", url.host)
    } else {
        url.host.clone()
    };
    let with_port = format!("{host}:{}", url.port);
    list.iter()
        .any(|e| e.eq_ignore_ascii_case(&with_port) || e.eq_ignore_ascii_case(&host))
}

// ------------------------------------------------------------------ response head

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn framing(&self, method: &str) -> Result<Framing, String> {
        if method == "HEAD"
            || self.status == 204
            || self.status == 304
            || (100..200).contains(&self.status)
        {
            return Ok(Framing::Length(0));
        }
        if let Some(te) = self.header("transfer-encoding") {
            if te.eq_ignore_ascii_case("chunked") {
                return Ok(Framing::Chunked(Chunk::Size));
            }
            return Err(format!("unsupported Transfer-Encoding {te:?}"));
        }
        match self.header("content-length") {
            Some(v) => v
                .trim()
                .parse()
                .map(Framing::Length)
                .map_err(|_| format!("bad Content-Length {v:?}")),
            None => Ok(Framing::UntilClose),
        }
    }
}

/// Parses a response head from the start of `buf`: `Ok(None)` if it is not complete yet,
/// else the head and the number of bytes it took.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, String> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        if buf.len() >= MAX_HEAD {
            return Err("response head larger than 16 KiB".into());
        }
        return Ok(None);
    };
    let text =
        std::str::from_utf8(&buf[..end]).map_err(|_| "response head is not text".to_owned())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(format!(
            "not an HTTP/1.x response: {:?}",
            truncate(status_line, 40)
        ));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| format!("bad status line {:?}", truncate(status_line, 60)))?;
    let mut headers = Vec::new();
    for l in lines {
        let (k, v) = l
            .split_once(':')
            .ok_or_else(|| format!("bad header line {:?}", truncate(l, 60)))?;
        if headers.len() == MAX_HEADERS {
            return Err("more than 64 response headers".into());
        }
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    Ok(Some((Head { status, headers }, end + 4)))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

// ------------------------------------------------------------------ body framing

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting `hex[;ext]\r\n`.
    Size,
    Data(u64),
    /// Expecting the `\r\n` after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
}

/// One step of body decoding over buffered input: returns (input consumed, body bytes copied
/// to `out`), or None if more input is needed to make progress.
fn decode_step(
    f: &mut Framing,
    input: &[u8],
    out: &mut [u8],
) -> Result<Option<(usize, usize)>, String> {
    match f {
        Framing::Done => Ok(Some((0, 0))),
        Framing::Length(0) => {
            *f = Framing::Done;
            Ok(Some((0, 0)))
        }
        Framing::Length(n) => {
            if input.is_empty() {
                return Ok(None);
            }
            let k = input
                .len()
                .min(out.len())
                .min(usize::try_from(*n).unwrap_or(usize::MAX));
            out[..k].copy_from_slice(&input[..k]);
            *n -= k as u64;
            Ok(Some((k, k)))
        }
        Framing::UntilClose => {
            if input.is_empty() {
                return Ok(None);
            }
            let k = input.len().min(out.len());
            out[..k].copy_from_slice(&input[..k]);
            Ok(Some((k, k)))
        }
        Framing::Chunked(c) => match *c {
            Chunk::Size | Chunk::DataEnd | Chunk::Trailers => {
                let Some(eol) = find(input, b"\r\n") else {
                    if input.len() > 4096 {
                        return Err("chunk header line too long".into());
                    }
                    return Ok(None);
                };
                let line = &input[..eol];
                match *c {
                    Chunk::Size => {
                        let hex = line.split(|&b| b == b';').next().unwrap_or(b"");
                        let hex =
                            std::str::from_utf8(hex).map_err(|_| "bad chunk size".to_owned())?;
                        let size = u64::from_str_radix(hex.trim(), 16)
                            .map_err(|_| format!("bad chunk size {:?}", truncate(hex, 20)))?;
                        *c = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::DataEnd => {
                        if !line.is_empty() {
                            return Err("chunk data longer than its size".into());
                        }
                        *c = Chunk::Size;
                    }
                    _ => {
                        if line.is_empty() {
                            *f = Framing::Done;
                        }
                    }
                }
                Ok(Some((eol + 2, 0)))
            }
            Chunk::Data(n) => {
                if input.is_empty() {
                    return Ok(None);
                }
                let k = input
                    .len()
                    .min(out.len())
                    .min(usize::try_from(n).unwrap_or(usize::MAX));
                out[..k].copy_from_slice(&input[..k]);
                *c = if n == k as u64 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(n - k as u64)
                };
                Ok(Some((k, k)))
            }
        },
    }
}

// ------------------------------------------------------------------ errors

#[derive(Debug)]
pub enum Error {
    /// `http://` to a host not in `OAK_INSECURE_REGISTRIES`.
    NotInsecure {
        authority: String,
    },
    Connect {
        authority: String,
        detail: String,
    },
    Tls {
        authority: String,
        detail: String,
        plain_http: bool,
    },
    Timeout {
        authority: String,
        what: &'static str,
    },
    Io {
        authority: String,
        detail: String,
    },
    Protocol {
        authority: String,
        detail: String,
    },
    Redirects {
        url: String,
    },
    /// The CA configuration cannot be used.
    Roots(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotInsecure { authority } => write!(
                f,
                "{authority} would be reached over plain HTTP, which is only allowed for hosts in OAK_INSECURE_REGISTRIES"
            ),
            Error::Connect { authority, detail } => write!(f, "cannot connect to {authority}: {detail}"),
            Error::Tls { authority, plain_http: true, .. } => write!(
                f,
                "{authority} speaks plain HTTP, not HTTPS: add {authority} to OAK_INSECURE_REGISTRIES if that is intended"
            ),
            Error::Tls { authority, detail, .. } => write!(
                f,
                "TLS with {authority} failed: {detail} (for a private CA set OAK_REGISTRY_CA to its PEM file)"
            ),
            Error::Timeout { authority, what } => write!(f, "{authority} timed out while {what}"),
            Error::Io { authority, detail } => write!(f, "connection to {authority} failed: {detail}"),
            Error::Protocol { authority, detail } => write!(f, "{authority} sent a broken HTTP response: {detail}"),
            Error::Redirects { url } => write!(f, "too many redirects, last to {url}"),
            Error::Roots(d) => write!(f, "{d}"),
        }
    }
}

impl std::error::Error for Error {}

// ------------------------------------------------------------------ TLS roots

/// Builds the rustls configuration: the system bundle (or `SSL_CERT_FILE`) plus `extra_ca`.
/// `extra_ca` is additive: public registries keep working with it set.
pub fn tls_config(extra_ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, Error> {
    const SETTING: &str = "OAK_REGISTRY_CA";
    let extra = extra_ca.map(|path| crate::tls::Setting {
        name: SETTING,
        path,
    });
    crate::tls::roots(extra, SETTING)
        .and_then(|roots| crate::tls::client_config(roots, None))
        .map_err(|e| Error::Roots(e.to_string()))
}

// ------------------------------------------------------------------ client shell

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

#[derive(Debug, Clone)]
pub struct Options {
    /// `host:port` (or `host`) entries reached over plain HTTP.
    pub insecure: Vec<String>,
    /// Extra CA file (`OAK_REGISTRY_CA`), added to the system roots.
    pub extra_ca: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// Longest wait for any single read or write (a stalled transfer), not for a whole body.
    pub io_timeout: Duration,
}

/// The client: options plus a TLS configuration loaded on the first HTTPS request.
pub struct Client {
    opts: Options,
    tls: OnceLock<Arc<rustls::ClientConfig>>,
}

/// A response whose body has not been read yet.
pub struct Response {
    pub head: Head,
    /// Where the response came from, after redirects.
    pub url: Url,
    io: Box<dyn Stream>,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    framing: Framing,
    io_timeout: Duration,
    eof: bool,
}

async fn timed<T>(
    d: Duration,
    authority: &str,
    what: &'static str,
    fut: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    futures_lite::future::or(fut, async {
        Timer::after(d).await;
        Err(Error::Timeout {
            authority: authority.to_owned(),
            what,
        })
    })
    .await
}

impl Client {
    pub fn new(opts: Options) -> Client {
        Client {
            opts,
            tls: OnceLock::new(),
        }
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }

    fn tls(&self) -> Result<Arc<rustls::ClientConfig>, Error> {
        if let Some(c) = self.tls.get() {
            return Ok(c.clone());
        }
        let c = tls_config(self.opts.extra_ca.as_deref())?;
        Ok(self.tls.get_or_init(|| c).clone())
    }

    /// Sends a request, following redirects. `authorization` goes only to `url`'s origin: a
    /// redirect to another host (Docker Hub's blob CDN, spec §6.7) gets none.
    pub async fn send(
        &self,
        method: &str,
        url: &Url,
        headers: &[(&str, &str)],
        authorization: Option<&str>,
    ) -> Result<Response, Error> {
        let mut url = url.clone();
        let origin = url.clone();
        let mut method = method;
        for _ in 0..=MAX_REDIRECTS {
            let auth = authorization.filter(|_| url.same_origin(&origin));
            let resp = self.send_once(method, &url, headers, auth).await?;
            let status = resp.head.status;
            if !matches!(status, 301 | 302 | 303 | 307 | 308) {
                return Ok(resp);
            }
            let Some(loc) = resp.head.header("location") else {
                return Ok(resp);
            };
            let next = url.join(loc).map_err(|detail| Error::Protocol {
                authority: url.authority(),
                detail: format!("redirect: {detail}"),
            })?;
            log::debug!("{method} {url} → {status} {next}");
            if status == 303 {
                method = "GET";
            }
            url = next;
        }
        Err(Error::Redirects {
            url: url.to_string(),
        })
    }

    async fn send_once(
        &self,
        method: &str,
        url: &Url,
        headers: &[(&str, &str)],
        authorization: Option<&str>,
    ) -> Result<Response, Error> {
        let authority = url.authority();
        if !url.https && !is_insecure(&self.opts.insecure, url) {
            return Err(Error::NotInsecure { authority });
        }
        let tls = if url.https { Some(self.tls()?) } else { None };
        let tcp = timed(self.opts.connect_timeout, &authority, "connecting", async {
            let addrs = async_net::resolve((url.host.as_str(), url.port))
                .await
                .map_err(|e| Error::Connect {
                    authority: authority.clone(),
                    detail: format!("cannot resolve {}: {e}", url.host),
                })?;
            let mut last = String::from("no address");
            for a in addrs {
                match Async::<TcpStream>::connect(a).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = format!("{a}: {e}"),
                }
            }
            Err(Error::Connect {
                authority: authority.clone(),
                detail: last,
            })
        })
        .await?;
        let mut io: Box<dyn Stream> = match tls {
            Some(cfg) => {
                let name = ServerName::try_from(url.host.clone()).map_err(|e| Error::Tls {
                    authority: authority.clone(),
                    detail: format!("bad server name: {e}"),
                    plain_http: false,
                })?;
                let connector = futures_rustls::TlsConnector::from(cfg);
                let s = timed(
                    self.opts.connect_timeout,
                    &authority,
                    "in the TLS handshake",
                    async {
                        connector
                            .connect(name, tcp)
                            .await
                            .map_err(|e| tls_error(&authority, e))
                    },
                )
                .await?;
                Box::new(s)
            }
            None => Box::new(tcp),
        };
        let mut req = format!(
            "{method} {} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: oakestra-worker/{}\r\nConnection: close\r\n",
            url.target,
            env!("CARGO_PKG_VERSION")
        );
        for (k, v) in headers {
            push_header(&mut req, k, v);
        }
        if let Some(a) = authorization {
            push_header(&mut req, "Authorization", a);
        }
        req.push_str("\r\n");
        timed(
            self.opts.io_timeout,
            &authority,
            "sending the request",
            async {
                io.write_all(req.as_bytes()).await?;
                io.flush().await
            }
            .map_err_io(&authority),
        )
        .await?;
        let mut resp = Response {
            head: Head {
                status: 0,
                headers: Vec::new(),
            },
            url: url.clone(),
            io,
            buf: vec![0; READ_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            framing: Framing::Done,
            io_timeout: self.opts.io_timeout,
            eof: false,
        };
        loop {
            match parse_head(&resp.buf[..resp.end]) {
                Ok(Some((head, used))) => {
                    resp.framing = head.framing(method).map_err(|detail| Error::Protocol {
                        authority: authority.clone(),
                        detail,
                    })?;
                    resp.head = head;
                    resp.start = used;
                    return Ok(resp);
                }
                Ok(None) => {}
                Err(detail) => return Err(Error::Protocol { authority, detail }),
            }
            if resp.fill().await? == 0 {
                return Err(Error::Protocol {
                    authority,
                    detail: "connection closed before a complete response head".into(),
                });
            }
        }
    }
}

/// Header values come from the registry (tokens) or from us; never let one split a header.
fn push_header(req: &mut String, k: &str, v: &str) {
    if v.bytes().any(|b| b == b'\r' || b == b'\n') {
        return;
    }
    req.push_str(k);
    req.push_str(": ");
    req.push_str(v);
    req.push_str("\r\n");
}

fn tls_error(authority: &str, e: std::io::Error) -> Error {
    let detail = e.to_string();
    // A plain-HTTP server answers the ClientHello with "HTTP/1.1 400 …", which rustls sees as
    // a record of an invalid content type.
    let plain_http = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| {
            matches!(
                r,
                rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)
            )
        })
        || detail.contains("InvalidContentType");
    Error::Tls {
        authority: authority.to_owned(),
        detail,
        plain_http,
    }
}

trait MapIo<T> {
    fn map_err_io(self, authority: &str) -> impl std::future::Future<Output = Result<T, Error>>;
}

impl<T, F: std::future::Future<Output = std::io::Result<T>>> MapIo<T> for F {
    fn map_err_io(self, authority: &str) -> impl std::future::Future<Output = Result<T, Error>> {
        let authority = authority.to_owned();
        async move {
            self.await.map_err(|e| Error::Io {
                authority,
                detail: e.to_string(),
            })
        }
    }
}

impl Response {
    pub fn status(&self) -> u16 {
        self.head.status
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }

    pub fn content_length(&self) -> Option<u64> {
        match self.framing {
            Framing::Length(n) => Some(n),
            _ => None,
        }
    }

    /// Reads more bytes into the connection buffer; 0 at EOF.
    async fn fill(&mut self) -> Result<usize, Error> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            return Err(Error::Protocol {
                authority: self.url.authority(),
                detail: "response line longer than the read buffer".into(),
            });
        }
        let authority = self.url.authority();
        let Response { io, buf, end, .. } = self;
        let n = timed(
            self.io_timeout,
            &authority,
            "waiting for data",
            io.read(&mut buf[*end..]).map_err_io(&authority),
        )
        .await?;
        self.end += n;
        if n == 0 {
            self.eof = true;
        }
        Ok(n)
    }

    /// Reads body bytes into `out`; 0 means the body is complete.
    pub async fn read(&mut self, out: &mut [u8]) -> Result<usize, Error> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            let step = decode_step(&mut self.framing, &self.buf[self.start..self.end], out)
                .map_err(|detail| Error::Protocol {
                    authority: self.url.authority(),
                    detail,
                })?;
            match step {
                Some((used, produced)) => {
                    self.start += used;
                    if produced > 0 || self.framing == Framing::Done {
                        return Ok(produced);
                    }
                }
                None => {
                    if self.eof || self.fill().await? == 0 {
                        return match self.framing {
                            Framing::UntilClose => {
                                self.framing = Framing::Done;
                                Ok(0)
                            }
                            _ => Err(Error::Io {
                                authority: self.url.authority(),
                                detail: "connection closed in the middle of the body".into(),
                            }),
                        };
                    }
                }
            }
        }
    }

    /// Reads the whole body if it is at most `limit` bytes (manifests, tokens, error texts).
    pub async fn read_limited(&mut self, limit: usize) -> Result<Vec<u8>, Error> {
        if self.content_length().is_some_and(|n| n > limit as u64) {
            return Err(Error::Protocol {
                authority: self.url.authority(),
                detail: format!(
                    "body of {} bytes is over the {limit}-byte limit",
                    self.content_length().unwrap_or(0)
                ),
            });
        }
        let mut out = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = self.read(&mut chunk).await?;
            if n == 0 {
                return Ok(out);
            }
            if out.len() + n > limit {
                return Err(Error::Protocol {
                    authority: self.url.authority(),
                    detail: format!("body is over the {limit}-byte limit"),
                });
            }
            out.extend_from_slice(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("https://auth.docker.io/token?service=x").unwrap();
        assert_eq!(
            (u.https, u.host.as_str(), u.port, u.target.as_str()),
            (true, "auth.docker.io", 443, "/token?service=x")
        );
        assert_eq!(u.authority(), "auth.docker.io");
        let u = Url::parse("http://127.0.0.1:5000").unwrap();
        assert_eq!(
            (u.port, u.target.as_str(), u.authority().as_str()),
            (5000, "/", "127.0.0.1:5000")
        );
        let u = Url::parse("http://[::1]:8080/v2/?a").unwrap();
        assert_eq!(
            (u.host.as_str(), u.authority().as_str()),
            ("::1", "[::1]:8080")
        );
        assert_eq!(u.to_string(), "http://[::1]:8080/v2/?a");
        for bad in [
            "ftp://x/",
            "http://",
            "http://u:p@h/",
            "http://h:99999/",
            "https://h/a b",
            "http://a:b:c/",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn redirects_resolve_and_origins() {
        let base =
            Url::parse("https://registry-1.docker.io/v2/library/alpine/blobs/sha256:x").unwrap();
        let cdn = base
            .join("https://production.cloudflare.docker.com/registry-v2/blob?sig=1")
            .unwrap();
        assert!(!cdn.same_origin(&base));
        let same = base.join("/v2/other").unwrap();
        assert!(same.same_origin(&base));
        assert_eq!(same.to_string(), "https://registry-1.docker.io/v2/other");
        assert_eq!(
            base.join("//cdn.lan/x").unwrap().to_string(),
            "https://cdn.lan/x"
        );
        assert_eq!(
            base.join("data?x=1").unwrap().target,
            "/v2/library/alpine/blobs/data?x=1"
        );
        let other_port = Url::parse("https://registry-1.docker.io:444/").unwrap();
        assert!(!other_port.same_origin(&base));
        let plain = Url::parse("http://registry-1.docker.io/").unwrap();
        assert!(!plain.same_origin(&base), "scheme is part of the origin");
    }

    #[test]
    fn insecure_matching() {
        let list = vec![
            "127.0.0.1:5000".to_owned(),
            "reg.lan".to_owned(),
            "[::1]:5000".to_owned(),
        ];
        let m = |s: &str| is_insecure(&list, &Url::parse(s).unwrap());
        assert!(m("http://127.0.0.1:5000/v2/"));
        assert!(!m("http://127.0.0.1:5001/v2/"));
        assert!(m("http://reg.lan:8080/"));
        assert!(m("http://REG.lan/"));
        assert!(m("http://[::1]:5000/"));
        assert!(!m("http://other/"));
    }

    #[test]
    fn heads() {
        let raw = b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"x\"\r\nContent-Length: 5\r\n\r\nhello";
        let (h, used) = parse_head(raw).unwrap().unwrap();
        assert_eq!(h.status, 401);
        assert_eq!(h.header("www-authenticate"), Some("Bearer realm=\"x\""));
        assert_eq!(&raw[used..], b"hello");
        assert_eq!(h.framing("GET").unwrap(), Framing::Length(5));
        assert_eq!(h.framing("HEAD").unwrap(), Framing::Length(0));
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nA: b\r\n").unwrap(), None);
        assert!(parse_head(b"\x16\x03\x01garbage\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 abc\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n").is_err());
        assert!(parse_head(&vec![b'a'; MAX_HEAD]).is_err());
        let (h, _) = parse_head(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.framing("GET").unwrap(), Framing::UntilClose);
        let (h, _) = parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.framing("GET").is_err());
    }

    /// Feeds `input` in pieces of `piece` bytes through the decoder with an output buffer of
    /// `outsz`, as the shell does.
    fn decode_all(
        mut f: Framing,
        input: &[u8],
        piece: usize,
        outsz: usize,
    ) -> Result<Vec<u8>, String> {
        let mut body = Vec::new();
        let mut avail = 0;
        let mut pos = 0;
        let mut out = vec![0; outsz];
        loop {
            match decode_step(&mut f, &input[pos..avail], &mut out)? {
                Some((used, n)) => {
                    pos += used;
                    body.extend_from_slice(&out[..n]);
                    if f == Framing::Done {
                        return Ok(body);
                    }
                }
                None if avail == input.len() => return Err("eof".into()),
                None => avail = (avail + piece).min(input.len()),
            }
        }
    }

    #[test]
    fn chunked_bodies_any_split() {
        let wire = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n";
        for piece in [1, 2, 3, 7, 100] {
            for outsz in [1, 3, 64] {
                let body = decode_all(Framing::Chunked(Chunk::Size), wire, piece, outsz).unwrap();
                assert_eq!(body, b"hello, world", "piece {piece} out {outsz}");
            }
        }
        assert!(decode_all(Framing::Chunked(Chunk::Size), b"zz\r\n", 4, 8).is_err());
        assert!(decode_all(
            Framing::Chunked(Chunk::Size),
            b"2\r\nabc\r\n0\r\n\r\n",
            64,
            8
        )
        .is_err());
        assert_eq!(
            decode_all(Framing::Length(3), b"abcdef", 2, 2).unwrap(),
            b"abc"
        );
    }

    #[test]
    fn roots_errors_name_the_setting() {
        let e = tls_config(Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("OAK_REGISTRY_CA /nonexistent/ca.pem"),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("oak-http-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a cert").unwrap();
        let e = tls_config(Some(&empty)).unwrap_err();
        assert!(e.to_string().contains("holds no PEM certificate"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
