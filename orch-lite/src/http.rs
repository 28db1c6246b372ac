//! The HTTP edge shared by the root and cluster APIs: a `tiny_http` server on a few threads
//! that turns each request into a [`Request`] and hands it to a synchronous handler. Handlers
//! are plain functions from request to [`Response`], so they are tested without sockets. What it
//! deliberately does not do: routing tables, middleware, async. Paths are matched by handlers.

use serde::Serialize;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;

/// Largest accepted request body; SLA descriptors are a few KiB.
pub const MAX_BODY: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub method: String,
    /// Path without query string and without a trailing slash (`/api/service/` → `/api/service`):
    /// upstream registers collections with the slash and clients call both forms.
    pub path: String,
    pub query: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub remote: Option<SocketAddr>,
}

impl Request {
    pub fn new(method: &str, path: &str, body: &[u8]) -> Request {
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        Request {
            method: method.to_ascii_uppercase(),
            path: normalize_path(path),
            query: query.to_string(),
            headers: Vec::new(),
            body: body.to_vec(),
            remote: None,
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Request {
        self.headers
            .push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The token of `Authorization: Bearer <token>`.
    pub fn bearer(&self) -> Option<&str> {
        let v = self.header("authorization")?.trim();
        let (scheme, token) = v.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim())
            .filter(|t| !t.is_empty())
    }

    /// Path segments after a prefix: `segments("/api/service")` on `/api/service/x/1` → `["x","1"]`.
    pub fn segments_after(&self, prefix: &str) -> Option<Vec<&str>> {
        let rest = self.path.strip_prefix(prefix)?;
        if rest.is_empty() {
            return Some(Vec::new());
        }
        let rest = rest.strip_prefix('/')?;
        Some(rest.split('/').collect())
    }

    /// Parses the body as JSON, answering 400 with serde's message (which names the field).
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, Response> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Err(Response::error(400, "request body is empty; expected JSON"));
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| Response::error(400, &format!("invalid JSON body: {e}")))
    }
}

fn normalize_path(path: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".into()
    } else {
        trimmed.into()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json<T: Serialize + ?Sized>(status: u16, value: &T) -> Response {
        match serde_json::to_vec(value) {
            Ok(body) => Response {
                status,
                content_type: "application/json",
                body,
            },
            Err(e) => Response::error(500, &format!("cannot encode response: {e}")),
        }
    }

    /// `{"message": …}`: the error shape upstream's own handlers use and its clients print.
    pub fn error(status: u16, message: &str) -> Response {
        Response::json(status, &serde_json::json!({ "message": message }))
    }

    pub fn not_found(what: &str) -> Response {
        Response::error(404, &format!("{what} not found"))
    }

    /// Body as JSON, for tests.
    pub fn value(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

pub type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

/// A running server; dropping it stops accepting and joins the threads.
pub struct Server {
    server: Arc<tiny_http::Server>,
    threads: Vec<std::thread::JoinHandle<()>>,
    pub addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.server.unblock();
        for _ in 1..self.threads.len() {
            self.server.unblock();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Binds `addr` and serves `handler` on `threads` threads.
pub fn serve(
    addr: SocketAddr,
    threads: usize,
    name: &str,
    handler: Handler,
) -> Result<Server, String> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| format!("{name}: cannot listen on {addr}: {e}"))?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| format!("{name}: {addr} is not an IP address"))?;
    let server = Arc::new(server);
    let threads = (0..threads.max(1))
        .map(|i| {
            let (server, handler) = (server.clone(), handler.clone());
            std::thread::Builder::new()
                .name(format!("{name}-http-{i}"))
                .spawn(move || {
                    while let Ok(rq) = server.recv() {
                        respond(rq, &handler);
                    }
                })
                .map_err(|e| format!("{name}: cannot start thread: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    log::info!("{name} API listening on http://{bound}");
    Ok(Server {
        server,
        threads,
        addr: bound,
    })
}

fn respond(mut rq: tiny_http::Request, handler: &Handler) {
    let mut body = Vec::new();
    let too_big = match rq
        .as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body)
    {
        Ok(n) => n > MAX_BODY,
        Err(e) => {
            log::warn!("reading request body from {:?}: {e}", rq.remote_addr());
            let _ = rq.respond(to_tiny(Response::error(400, "unreadable request body")));
            return;
        }
    };
    let resp = if too_big {
        Response::error(413, &format!("request body larger than {MAX_BODY} bytes"))
    } else if rq.method() == &tiny_http::Method::Options {
        // CORS preflight from the dashboard: upstream allows any origin.
        Response {
            status: 204,
            content_type: "text/plain",
            body: Vec::new(),
        }
    } else {
        let mut req = Request::new(rq.method().as_str(), rq.url(), &body);
        req.remote = rq.remote_addr().copied();
        req.headers = rq
            .headers()
            .iter()
            .map(|h| {
                (
                    h.field.as_str().as_str().to_ascii_lowercase(),
                    h.value.as_str().to_string(),
                )
            })
            .collect();
        handler(&req)
    };
    if let Err(e) = rq.respond(to_tiny(resp)) {
        log::debug!("writing response: {e}");
    }
}

fn to_tiny(resp: Response) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    let header = |k: &str, v: &str| tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()).ok();
    let mut r = tiny_http::Response::from_data(resp.body).with_status_code(resp.status);
    for h in [
        header("Content-Type", resp.content_type),
        header("Access-Control-Allow-Origin", "*"),
        header(
            "Access-Control-Allow-Headers",
            "Authorization, Content-Type",
        ),
        header(
            "Access-Control-Allow-Methods",
            "GET, POST, PUT, DELETE, OPTIONS",
        ),
    ]
    .into_iter()
    .flatten()
    {
        r.add_header(h);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized_and_split() {
        let r = Request::new("get", "/api/service/?x=1", b"");
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.query.as_str()),
            ("GET", "/api/service", "x=1")
        );
        let r = Request::new("DELETE", "/api/service/abc/instance/3/", b"");
        assert_eq!(
            r.segments_after("/api/service"),
            Some(vec!["abc", "instance", "3"])
        );
        assert_eq!(
            r.segments_after("/api/serv"),
            None,
            "prefix must end at a segment boundary"
        );
        assert_eq!(Request::new("GET", "/", b"").path, "/");
    }

    #[test]
    fn bearer_and_json_errors() {
        let r = Request::new("POST", "/x", b"{\"a\":").with_header("Authorization", "Bearer  abc ");
        assert_eq!(r.bearer(), Some("abc"));
        let err = r.json::<serde_json::Value>().unwrap_err();
        assert_eq!(err.status, 400);
        assert!(err.value()["message"]
            .as_str()
            .unwrap()
            .contains("invalid JSON"));
        assert_eq!(
            Request::new("POST", "/x", b" ")
                .json::<serde_json::Value>()
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            Request::new("GET", "/x", b"")
                .with_header("authorization", "Basic x")
                .bearer(),
            None
        );
    }

    #[test]
    fn serves_over_a_real_socket() {
        use std::io::Write;
        let handler: Handler =
            Arc::new(|r: &Request| Response::json(200, &serde_json::json!({"path": r.path})));
        let server = serve("127.0.0.1:0".parse().unwrap(), 2, "test", handler).unwrap();
        let get = |raw: &[u8]| {
            let mut s = std::net::TcpStream::connect(server.addr).unwrap();
            s.write_all(raw).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        let out = get(b"GET /api/clusters/ HTTP/1.0\r\n\r\n");
        assert!(
            out.starts_with("HTTP/1.0 200") && out.contains("{\"path\":\"/api/clusters\"}"),
            "{out}"
        );
        assert!(out.contains("Access-Control-Allow-Origin: *"), "{out}");
        let big = format!(
            "POST /x HTTP/1.0\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 10
        );
        let mut raw = big.into_bytes();
        raw.extend(std::iter::repeat_n(b'a', MAX_BODY + 10));
        assert!(get(&raw).starts_with("HTTP/1.0 413"));
    }
}
