//! HTTP JSON calls of the end-to-end tests (root, cluster and worker status APIs) and polling.

use serde_json::Value;
use std::time::{Duration, Instant};

/// One JSON request; any HTTP status is an answer, only transport failures are errors.
pub fn call(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let mut req = ureq::request(method, url).timeout(Duration::from_secs(10));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let res = match body {
        Some(b) => req.send_json(b.clone()),
        None => req.call(),
    };
    let resp = match res {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(format!("{method} {url}: {e}")),
    };
    let code = resp.status();
    let text = resp
        .into_string()
        .map_err(|e| format!("{method} {url}: {e}"))?;
    Ok((
        code,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

pub fn ok(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<Value, String> {
    match call(method, url, token, body)? {
        (200, v) => Ok(v),
        (c, v) => Err(format!("{method} {url} answered {c}: {v}")),
    }
}

/// Polls `f` every 50 ms until it yields a value; its last error (or the last "not yet" note)
/// goes into the timeout message.
pub fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> Result<Option<T>, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = e,
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "timed out after {} s waiting for {what}; last: {last}",
                limit.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
