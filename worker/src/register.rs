//! Registration with the cluster orchestrator: `POST /api/node/register` with the node document
//! over a minimal HTTP/1.1 client, and the answer's `id` and `MQTT_BROKER_PORT` (spec §2).
//! HTTPS (`cluster_ssl`) goes through [`crate::tls`]; retrying is the caller's business (see
//! `session`). One request per connection, no redirects, no client certificate (as upstream).

use std::fmt;
use std::io;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};

use crate::protocol::{self, NodeInfo, RegisterAnswer};
use crate::{netio, tls};

/// Head and body bounds: the answer is a few dozen bytes; anything near these is not a cluster.
pub const MAX_HEAD: usize = 16 << 10;
pub const MAX_BODY: usize = 64 << 10;

#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    pub node_id: String,
    pub mqtt_port: u16,
}

#[derive(Debug)]
pub enum RegisterError {
    Connect(String, io::Error),
    /// Already explained by [`tls::Connector::explain`].
    Tls(String, io::Error),
    Io(String, io::Error),
    Http(String, HttpError),
    Status {
        url: String,
        status: u16,
        body: String,
    },
    Answer {
        url: String,
        why: String,
    },
}

impl fmt::Display for RegisterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegisterError::Connect(url, e) => write!(f, "cannot reach the cluster at {url}: {e}; is the cluster orchestrator running and OAK_CLUSTER_ADDRESS/PORT right?"),
            RegisterError::Tls(url, e) | RegisterError::Io(url, e) => write!(f, "{url}: {e}"),
            RegisterError::Http(url, e) => write!(f, "{url} answered with broken HTTP: {e}"),
            RegisterError::Status { url, status, body } => {
                write!(f, "{url} answered HTTP {status}: {body}")?;
                if *status == 401 || *status == 403 {
                    f.write_str(" (check OAK_JOIN_TOKEN)")?;
                }
                Ok(())
            }
            RegisterError::Answer { url, why } => write!(f, "{url}: {why}"),
        }
    }
}

impl std::error::Error for RegisterError {}

/// Posts `node` to the cluster and validates the answer, over HTTPS when `tls` is given.
/// `limit` bounds the connect, the handshake and the exchange, each.
pub async fn register(
    host: &str,
    port: u16,
    tls: Option<&tls::Connector>,
    node: &NodeInfo,
    limit: Duration,
) -> Result<Registration, RegisterError> {
    let authority = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{authority}{}", protocol::REGISTER_PATH);
    let body = serde_json::to_vec(node).map_err(|e| RegisterError::Answer {
        url: url.clone(),
        why: format!("cannot encode the node document: {e}"),
    })?;
    let request = build_post(&authority, protocol::REGISTER_PATH, &body);
    let tcp = netio::connect(host, port, limit)
        .await
        .map_err(|e| RegisterError::Connect(url.clone(), e))?;
    let mut stream = match tls {
        Some(c) => c
            .handshake(tcp, host, limit)
            .await
            .map_err(|e| RegisterError::Tls(url.clone(), e))?,
        None => tls::Stream::Plain(tcp),
    };
    let response = netio::timeout(limit, "registration", async {
        stream.write_all(&request).await?;
        stream.flush().await?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 2048];
        loop {
            let n = stream.read(&mut chunk).await?;
            buf.extend_from_slice(&chunk[..n]);
            match parse_response(&buf, n == 0, MAX_BODY) {
                Ok(Some(r)) => return Ok(Ok(r)),
                Ok(None) => {}
                Err(e) => return Ok(Err(e)),
            }
        }
    })
    .await
    .map_err(|e| match tls {
        // A TLS 1.3 server refuses a client certificate after the handshake, on our first read.
        Some(c) => RegisterError::Tls(url.clone(), c.explain(host, &e)),
        None => RegisterError::Io(url.clone(), e),
    })?
    .map_err(|e| RegisterError::Http(url.clone(), e))?;
    answer(&url, &response)
}

/// Interprets the cluster's HTTP answer.
pub fn answer(url: &str, r: &Response) -> Result<Registration, RegisterError> {
    if r.status != 200 {
        let text = String::from_utf8_lossy(&r.body);
        let mut excerpt: String = text.chars().take(200).collect();
        if excerpt.len() < text.len() {
            excerpt.push('…');
        }
        return Err(RegisterError::Status {
            url: url.into(),
            status: r.status,
            body: excerpt.trim().into(),
        });
    }
    let a: RegisterAnswer = protocol::decode(&r.body).map_err(|e| RegisterError::Answer {
        url: url.into(),
        why: format!("the answer is not {{\"id\", \"MQTT_BROKER_PORT\"}}: {e}"),
    })?;
    let mqtt_port = a.validate().map_err(|why| RegisterError::Answer {
        url: url.into(),
        why,
    })?;
    Ok(Registration {
        node_id: a.id,
        mqtt_port,
    })
}

/// A complete request in one buffer (one write: minimal servers mishandle split requests).
pub fn build_post(authority: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: NodeEngine/{}\r\n\
         Content-Type: application/json\r\nAccept: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        crate::VERSION,
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HttpError {
    HeadTooLarge,
    BodyTooLarge,
    BadStatusLine,
    BadHeader,
    BadContentLength,
    BadChunk,
    /// The connection closed before the declared body was complete.
    Truncated,
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HttpError::HeadTooLarge => "response head too large",
            HttpError::BodyTooLarge => "response body too large",
            HttpError::BadStatusLine => "malformed status line",
            HttpError::BadHeader => "malformed header",
            HttpError::BadContentLength => "invalid Content-Length",
            HttpError::BadChunk => "malformed chunked body",
            HttpError::Truncated => "connection closed before the response was complete",
        })
    }
}

impl std::error::Error for HttpError {}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses an HTTP/1.x response from `buf`: `Ok(None)` = read more. `eof`: the peer closed,
/// which ends a close-delimited body (and truncates any other). Framing by Content-Length,
/// chunked, or connection close; 1xx interim answers are skipped; bodies over `max_body` fail.
pub fn parse_response(
    mut buf: &[u8],
    eof: bool,
    max_body: usize,
) -> Result<Option<Response>, HttpError> {
    loop {
        let Some(end) = find(&buf[..buf.len().min(MAX_HEAD)], b"\r\n\r\n") else {
            return if buf.len() >= MAX_HEAD {
                Err(HttpError::HeadTooLarge)
            } else if eof {
                Err(HttpError::Truncated)
            } else {
                Ok(None)
            };
        };
        let head = std::str::from_utf8(&buf[..end]).map_err(|_| HttpError::BadHeader)?;
        let rest = &buf[end + 4..];
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let mut parts = status_line.splitn(3, ' ');
        let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if !version.starts_with("HTTP/1.") || code.len() != 3 {
            return Err(HttpError::BadStatusLine);
        }
        let status: u16 = code.parse().map_err(|_| HttpError::BadStatusLine)?;
        if !(100..=599).contains(&status) {
            return Err(HttpError::BadStatusLine);
        }
        if (100..200).contains(&status) {
            buf = rest;
            continue;
        }
        let mut length: Option<usize> = None;
        let mut chunked = false;
        for line in lines {
            let (name, value) = line.split_once(':').ok_or(HttpError::BadHeader)?;
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                let n: usize = value.parse().map_err(|_| HttpError::BadContentLength)?;
                if length.is_some_and(|l| l != n) {
                    return Err(HttpError::BadContentLength);
                }
                length = Some(n);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value
                    .split(',')
                    .any(|v| v.trim().eq_ignore_ascii_case("chunked"));
            }
        }
        if status == 204 || status == 304 {
            return Ok(Some(Response {
                status,
                body: Vec::new(),
            }));
        }
        let body = if chunked {
            match dechunk(rest, max_body)? {
                Some(b) => b,
                None if eof => return Err(HttpError::Truncated),
                None => return Ok(None),
            }
        } else if let Some(n) = length {
            if n > max_body {
                return Err(HttpError::BodyTooLarge);
            }
            if rest.len() < n {
                return if eof {
                    Err(HttpError::Truncated)
                } else {
                    Ok(None)
                };
            }
            rest[..n].to_vec()
        } else {
            if rest.len() > max_body {
                return Err(HttpError::BodyTooLarge);
            }
            if !eof {
                return Ok(None);
            }
            rest.to_vec()
        };
        return Ok(Some(Response { status, body }));
    }
}

/// Decodes a complete chunked body; `Ok(None)` when more bytes are needed.
fn dechunk(mut rest: &[u8], max_body: usize) -> Result<Option<Vec<u8>>, HttpError> {
    let mut body = Vec::new();
    loop {
        let Some(eol) = find(rest, b"\r\n") else {
            return if rest.len() > 64 {
                Err(HttpError::BadChunk)
            } else {
                Ok(None)
            };
        };
        let line = std::str::from_utf8(&rest[..eol]).map_err(|_| HttpError::BadChunk)?;
        let size_hex = line.split(';').next().unwrap_or("").trim();
        if size_hex.is_empty() || size_hex.len() > 8 {
            return Err(HttpError::BadChunk);
        }
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| HttpError::BadChunk)?;
        rest = &rest[eol + 2..];
        if size == 0 {
            // Trailers, then the final empty line.
            loop {
                let Some(eol) = find(rest, b"\r\n") else {
                    return Ok(None);
                };
                if eol == 0 {
                    return Ok(Some(body));
                }
                rest = &rest[eol + 2..];
            }
        }
        if body.len() + size > max_body {
            return Err(HttpError::BodyTooLarge);
        }
        if rest.len() < size + 2 {
            return Ok(None);
        }
        if &rest[size..size + 2] != b"\r\n" {
            return Err(HttpError::BadChunk);
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &[u8] = br#"{"id": "6650f0c2e4b0a1b2c3d4e5f6", "MQTT_BROKER_PORT": "10003"}"#;

    fn with_len(head: &str, body: &[u8]) -> Vec<u8> {
        let mut v = format!("{head}\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn content_length_answer_at_every_split() {
        let raw = with_len("HTTP/1.1 200 OK\r\nContent-Type: application/json", OK);
        for k in 0..raw.len() {
            assert_eq!(
                parse_response(&raw[..k], false, MAX_BODY),
                Ok(None),
                "cut at {k}"
            );
            assert!(
                parse_response(&raw[..k], true, MAX_BODY).is_err(),
                "eof at {k}"
            );
        }
        let r = parse_response(&raw, false, MAX_BODY).unwrap().unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, OK));
        let reg = answer("u", &r).unwrap();
        assert_eq!(
            reg,
            Registration {
                node_id: "6650f0c2e4b0a1b2c3d4e5f6".into(),
                mqtt_port: 10003
            }
        );
    }

    #[test]
    fn chunked_and_close_delimited_answers() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;ext=1\r\n{\"id\"\r\n1a\r\n:\"abc\",\"MQTT_BROKER_PORT\":\r\n8\r\n \"10003\"\r\n1\r\n}\r\n0\r\nX-Trailer: y\r\n\r\n";
        for k in 0..raw.len() {
            assert_eq!(
                parse_response(&raw[..k], false, MAX_BODY),
                Ok(None),
                "cut at {k}"
            );
        }
        let r = parse_response(raw, false, MAX_BODY).unwrap().unwrap();
        assert_eq!(answer("u", &r).unwrap().node_id, "abc");

        // HTTP/1.0 style: no length, the body ends when the server closes.
        let raw = [b"HTTP/1.0 200 OK\r\n\r\n".as_slice(), OK].concat();
        assert_eq!(parse_response(&raw, false, MAX_BODY), Ok(None));
        assert_eq!(
            parse_response(&raw, true, MAX_BODY).unwrap().unwrap().body,
            OK
        );

        // An interim 100 Continue is skipped.
        let raw = [
            b"HTTP/1.1 100 Continue\r\n\r\n".as_slice(),
            &with_len("HTTP/1.1 200 OK", OK),
        ]
        .concat();
        assert_eq!(
            parse_response(&raw, false, MAX_BODY)
                .unwrap()
                .unwrap()
                .status,
            200
        );
    }

    #[test]
    fn hostile_answers_are_errors() {
        let big = with_len("HTTP/1.1 200 OK", &[b'x'; 100]);
        assert_eq!(
            parse_response(&big, false, 50),
            Err(HttpError::BodyTooLarge)
        );
        assert_eq!(
            parse_response(&vec![b'a'; MAX_HEAD + 1], false, 50),
            Err(HttpError::HeadTooLarge)
        );
        assert_eq!(
            parse_response(b"SSH-2.0-OpenSSH\r\n\r\n", false, 50),
            Err(HttpError::BadStatusLine)
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 2000 OK\r\n\r\n", false, 50),
            Err(HttpError::BadStatusLine)
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", false, 50),
            Err(HttpError::BadContentLength)
        );
        assert_eq!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                false,
                50
            ),
            Err(HttpError::BadContentLength)
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nnocolon\r\n\r\n", false, 50),
            Err(HttpError::BadHeader)
        );
        let bad_chunk = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert_eq!(
            parse_response(bad_chunk, false, 50),
            Err(HttpError::BadChunk)
        );
        let long_chunk = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffff\r\n";
        assert_eq!(
            parse_response(long_chunk, false, 50),
            Err(HttpError::BodyTooLarge)
        );
    }

    #[test]
    fn cluster_errors_name_the_problem() {
        let r = Response {
            status: 500,
            body: br#"{"message":"Failed to register node"}"#.to_vec(),
        };
        let e = answer("http://c:10100/api/node/register", &r)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("HTTP 500") && e.contains("Failed to register node"),
            "{e}"
        );
        let r = Response {
            status: 401,
            body: Vec::new(),
        };
        assert!(answer("u", &r)
            .unwrap_err()
            .to_string()
            .contains("OAK_JOIN_TOKEN"));
        let r = Response {
            status: 200,
            body: br#"{"id":"abc","MQTT_BROKER_PORT":null}"#.to_vec(),
        };
        assert!(answer("u", &r)
            .unwrap_err()
            .to_string()
            .contains("MQTT_BROKER_PORT"));
        let r = Response {
            status: 200,
            body: b"[]".to_vec(),
        };
        assert!(answer("u", &r).unwrap_err().to_string().contains("not {"));
    }

    #[test]
    fn request_is_one_complete_post() {
        let r = build_post("10.0.0.1:10100", "/api/node/register", b"{}");
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("POST /api/node/register HTTP/1.1\r\nHost: 10.0.0.1:10100\r\n"));
        assert!(text.contains("Content-Type: application/json\r\n"));
        assert!(text.ends_with("Content-Length: 2\r\nConnection: close\r\n\r\n{}"));
    }
}
