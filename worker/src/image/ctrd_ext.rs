//! The two containerd calls the pull needs that `containerd::Client` does not offer yet:
//! `Content/Read` (to find an already pulled image's manifest and config without the network)
//! and `Content/Update` (to add gc labels to a blob that already existed). Each runs on its own
//! short connection over the client's pure HTTP/2 and gRPC cores. Delete this module once
//! `Client::content_read`/`content_update` exist (see README.md).

use crate::containerd::api::{Decode, Encode};
use crate::containerd::conn::{self, Conn, Event};
use crate::containerd::grpc::{self, Code, Reassembler, Status};
use crate::containerd::{pb, Client, Error};
use async_io::Async;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

const CONTENT_READ: &str = "/containerd.services.content.v1.Content/Read";
const CONTENT_UPDATE: &str = "/containerd.services.content.v1.Content/Update";

struct ReadRequest<'a>(&'a str);

impl Encode for ReadRequest<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        pb::string(out, 1, self.0);
    }
}

struct ReadChunk(Vec<u8>);

impl Decode for ReadChunk {
    fn decode(buf: &[u8]) -> Result<Self, pb::Error> {
        let mut data = Vec::new();
        pb::for_each(buf, |f| {
            if f.num == 2 {
                data = f.bytes()?.to_vec();
            }
            Ok(())
        })?;
        Ok(ReadChunk(data))
    }
}

/// `UpdateRequest{info{digest, labels}, update_mask{paths: labels.<key>…}}`.
struct UpdateLabels<'a> {
    digest: &'a str,
    labels: &'a [(&'a str, &'a str)],
}

impl Encode for UpdateLabels<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        pb::message(out, 1, |m| {
            pb::string(m, 1, self.digest);
            for (k, v) in self.labels {
                pb::map_entry(m, 5, k, v);
            }
        });
        pb::message(out, 2, |m| {
            for (k, _) in self.labels {
                pb::repeated_string(m, 1, &format!("labels.{k}"));
            }
        });
    }
}

/// Reads a whole (small) blob from the content store; refuses more than `limit` bytes.
pub async fn content_read(client: &Client, digest: &str, limit: usize) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    call(client, CONTENT_READ, &ReadRequest(digest), |msg| {
        let ReadChunk(data) =
            ReadChunk::decode(msg).map_err(|e| decode_err(CONTENT_READ, e.to_string()))?;
        if out.len() + data.len() > limit {
            return Err(decode_err(
                CONTENT_READ,
                format!("blob {digest} is larger than {limit} bytes"),
            ));
        }
        out.extend_from_slice(&data);
        Ok(())
    })
    .await?;
    Ok(out)
}

/// Sets `labels` on an existing blob (only those keys; others are kept).
pub async fn content_update_labels(
    client: &Client,
    digest: &str,
    labels: &[(&str, &str)],
) -> Result<(), Error> {
    call(
        client,
        CONTENT_UPDATE,
        &UpdateLabels { digest, labels },
        |_| Ok(()),
    )
    .await
}

fn decode_err(method: &'static str, detail: String) -> Error {
    Error::Decode { method, detail }
}

/// One call on a fresh connection: request with END_STREAM, every response message to
/// `on_message`, then the status.
async fn call(
    client: &Client,
    method: &'static str,
    req: &impl Encode,
    mut on_message: impl FnMut(&[u8]) -> Result<(), Error>,
) -> Result<(), Error> {
    let socket: PathBuf = client.socket().to_path_buf();
    let io_err = |source| Error::Io {
        socket: socket.clone(),
        source,
    };
    let proto = |detail: String| Error::Protocol {
        socket: socket.clone(),
        detail,
    };
    let mut io = Async::<UnixStream>::connect(client.socket())
        .await
        .map_err(|source| Error::Connect {
            socket: socket.clone(),
            source,
        })?;
    let mut h2 = Conn::new(conn::Config::default());
    let headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", method),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("containerd-namespace", client.namespace()),
    ];
    h2.open_stream(&headers).map_err(|e| proto(e.to_string()))?;
    let mut msg = Vec::new();
    let at = grpc::begin_message(&mut msg);
    req.encode(&mut msg);
    grpc::finish_message(&mut msg, at);
    let mut sent = 0;
    let mut reasm = Reassembler::new(grpc::MAX_MESSAGE);
    let mut buf = vec![0u8; 64 << 10];
    let (mut start, mut end) = (0usize, 0usize);
    let mut got_head = false;
    loop {
        if sent < msg.len() {
            sent += h2.send_data(&msg[sent..], true);
        }
        if !h2.output().is_empty() {
            io.write_all(h2.output()).await.map_err(io_err)?;
            h2.clear_output();
        }
        // Process every buffered frame before reading again.
        loop {
            let r = h2
                .receive(&buf[start..end])
                .map_err(|e| proto(e.to_string()))?;
            let Some((used, ev)) = r else { break };
            start += used;
            let finished = match ev {
                None => None,
                Some(Event::Head(h)) => {
                    got_head = true;
                    if h.status != Some(200) {
                        return Err(proto(format!("{method}: HTTP status {:?}", h.status)));
                    }
                    None
                }
                Some(Event::Data { data, .. }) => {
                    reasm.push(data);
                    while let Some(range) =
                        reasm.next_message().map_err(|e| proto(e.to_string()))?
                    {
                        on_message(reasm.get(range))?;
                    }
                    None
                }
                Some(Event::End(h)) => Some(match h.grpc_status {
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
                    None if !got_head => Err(proto(format!("{method}: response without status"))),
                    None => Err(proto(format!("{method}: trailers without grpc-status"))),
                }),
                Some(Event::Reset(code)) => Some(Err(Error::Reset { method, code })),
            };
            if let Some(r) = finished {
                return r;
            }
        }
        if !h2.output().is_empty() {
            io.write_all(h2.output()).await.map_err(io_err)?;
            h2.clear_output();
        }
        if start > 0 {
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        let n = io.read(&mut buf[end..]).await.map_err(io_err)?;
        if n == 0 {
            return Err(Error::Closed { socket });
        }
        end += n;
    }
}
