//! Opening TCP connections from async code: name resolution off the executor thread (the
//! libc resolver blocks) and a connect timeout. Knows nothing of the protocols spoken on top.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use async_io::{Async, Timer};
use futures_lite::FutureExt;

/// Runs `fut`, failing with `TimedOut` after `limit`.
pub async fn timeout<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    let what = what.to_string();
    fut.or(async move {
        Timer::after(limit).await;
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{what} timed out after {} ms", limit.as_millis()),
        ))
    })
    .await
}

/// Resolves `host` (an IP literal, `[v6]` literal, or a name) to socket addresses.
pub async fn resolve(host: &str, port: u16, limit: Duration) -> io::Result<Vec<SocketAddr>> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let (tx, rx) = async_channel::bounded(1);
    let name = host.to_string();
    // A short-lived thread per lookup: lookups happen once per (re)connect, not per message.
    std::thread::Builder::new()
        .name("oak-resolve".into())
        .spawn(move || {
            let r = (name.as_str(), port)
                .to_socket_addrs()
                .map(|a| a.collect::<Vec<_>>());
            let _ = tx.send_blocking(r);
        })?;
    let addrs = timeout(limit, &format!("resolving {host}"), async {
        rx.recv()
            .await
            .map_err(|_| io::Error::other("resolver thread ended without an answer"))?
    })
    .await?;
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{host} has no address"),
        ));
    }
    Ok(addrs)
}

/// Connects to the first address of `host:port` that answers, within `limit` per address.
pub async fn connect(host: &str, port: u16, limit: Duration) -> io::Result<Async<TcpStream>> {
    let mut last = None;
    for addr in resolve(host, port, limit).await? {
        match timeout(
            limit,
            &format!("connecting to {addr}"),
            Async::<TcpStream>::connect(addr),
        )
        .await
        {
            Ok(s) => {
                let _ = s.get_ref().set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no address to connect to")))
}
