//! The local status endpoint (`OAK_STATUS_ADDR`): `/healthz`, `/status` (JSON) and `/metrics`
//! (Prometheus text), served by tiny_http on its own thread so it never touches the session's
//! executor. Read-only: it renders [`Telemetry`] and changes nothing.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::telemetry::Telemetry;

pub struct StatusServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    pub addr: SocketAddr,
}

pub fn serve(addr: SocketAddr, tel: Arc<Telemetry>) -> io::Result<StatusServer> {
    let server = tiny_http::Server::http(addr).map_err(|e| {
        io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("status endpoint {addr}: {e} (set OAK_STATUS_ADDR)"),
        )
    })?;
    let addr = server.server_addr().to_ip().unwrap_or(addr);
    let server = Arc::new(server);
    let s = server.clone();
    let thread = std::thread::Builder::new()
        .name("oak-status".into())
        .spawn(move || {
            for req in s.incoming_requests() {
                let (code, ctype, body) = route(req.method(), req.url(), &tel);
                let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], ctype.as_bytes())
                    .expect("a static ASCII header is valid");
                let resp = tiny_http::Response::from_string(body)
                    .with_status_code(code)
                    .with_header(header);
                if let Err(e) = req.respond(resp) {
                    log::debug!("status endpoint: {e}");
                }
            }
        })?;
    Ok(StatusServer {
        server,
        thread: Some(thread),
        addr,
    })
}

fn route(method: &tiny_http::Method, url: &str, tel: &Telemetry) -> (u16, &'static str, String) {
    let path = url.split('?').next().unwrap_or("");
    if *method != tiny_http::Method::Get && *method != tiny_http::Method::Head {
        return (405, "text/plain", "only GET\n".into());
    }
    match path {
        "/healthz" => (200, "text/plain", "ok\n".into()),
        "/status" => (
            200,
            "application/json",
            format!("{:#}\n", tel.status_json()),
        ),
        "/metrics" => (200, "text/plain; version=0.0.4", tel.metrics_text()),
        _ => (
            404,
            "text/plain",
            "not found: try /healthz, /status or /metrics\n".into(),
        ),
    }
}

impl Drop for StatusServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
