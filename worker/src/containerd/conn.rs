//! The HTTP/2 client connection as a pure state machine: bytes in, events and bytes out.
//!
//! It owns what RFC 7540 makes the client's duty: the preface and our SETTINGS, ACKs for the
//! server's SETTINGS and PINGs, send windows (connection + stream, including INITIAL_WINDOW_SIZE
//! deltas), receive windows (checked and replenished), header blocks across CONTINUATION, and
//! GOAWAY. It deliberately supports **one active stream at a time** (spec §1.8: sequential
//! unary calls, dedicated connections for streaming calls), so there is no multiplexer, no
//! priority handling and no server push. The caller moves bytes: it feeds received bytes to
//! [`Conn::receive`] and writes [`Conn::output`] to the socket.

use super::frame::{self, Frame};
use super::hpack;

pub const DEFAULT_WINDOW: u32 = 65_535;

#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Our SETTINGS_INITIAL_WINDOW_SIZE and the connection window we open up front. Responses
    /// smaller than this never wait for a WINDOW_UPDATE (spec §1.5: 16 MiB).
    pub initial_window: u32,
    /// Send SETTINGS_HEADER_TABLE_SIZE; `None` keeps the default 4096 and the dynamic table.
    pub header_table_size: Option<u32>,
    /// Largest header block (HEADERS + CONTINUATION) and decoded header list we accept.
    pub max_header_block: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            initial_window: 16 << 20,
            header_table_size: None,
            max_header_block: 64 << 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    Frame(frame::Error),
    Hpack(hpack::Error),
    Protocol(&'static str),
    FlowControl(&'static str),
    /// The server is going away; requests on streams above `last_stream` were not processed,
    /// so a new connection may retry them.
    GoAway {
        code: u32,
        last_stream: u32,
        debug: String,
    },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Frame(e) => write!(f, "HTTP/2 framing error: {e}"),
            Error::Hpack(e) => write!(f, "HTTP/2 header compression error: {e}"),
            Error::Protocol(m) => write!(f, "HTTP/2 protocol error: {m}"),
            Error::FlowControl(m) => write!(f, "HTTP/2 flow-control error: {m}"),
            Error::GoAway {
                code,
                last_stream,
                debug,
            } => {
                write!(
                    f,
                    "server sent GOAWAY (code {code}, last stream {last_stream}, {debug:?})"
                )
            }
        }
    }
}

/// The header fields a gRPC client needs from a response header block; the rest are dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Head {
    pub status: Option<u16>,
    pub content_type: Option<Vec<u8>>,
    pub grpc_status: Option<u32>,
    /// Raw (still percent-encoded) `grpc-message`.
    pub grpc_message: Option<Vec<u8>>,
}

impl Head {
    fn capture(&mut self, name: &[u8], value: &[u8]) {
        match name {
            b":status" => {
                self.status = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok())
            }
            b"content-type" => self.content_type = Some(value.to_vec()),
            // A non-numeric grpc-status is treated as Unknown (2), per the gRPC spec.
            b"grpc-status" => {
                self.grpc_status = Some(
                    std::str::from_utf8(value)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(2),
                )
            }
            b"grpc-message" => self.grpc_message = Some(value.to_vec()),
            _ => {}
        }
    }
}

/// What happened on the active stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// Response headers (not the end of the stream).
    Head(Head),
    /// A DATA payload, padding removed. `end_stream` without trailers is a gRPC error.
    Data { data: &'a [u8], end_stream: bool },
    /// The stream ended with this header block: trailers, or a trailers-only response.
    End(Head),
    /// The server reset the stream with this error code.
    Reset(u32),
}

/// Counters for tests and diagnostics (they prove which protocol paths a peer exercised).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub pings_acked: u32,
    pub settings_acked: u32,
    pub window_updates_received: u32,
    /// Times `send_data` stopped short because a send window was exhausted.
    pub send_stalls: u32,
    /// Entries now in the HPACK dynamic table (grpc-go indexes unless told not to).
    pub hpack_dynamic_entries: usize,
}

struct Stream {
    id: u32,
    /// Signed: a SETTINGS delta may push it below zero (RFC 7540 §6.9.2).
    send_window: i64,
    recv_window: i64,
    local_closed: bool,
    got_head: bool,
}

pub struct Conn {
    out: Vec<u8>,
    hpack: hpack::Decoder,
    cfg: Config,
    conn_recv_target: i64,
    conn_recv: i64,
    conn_send: i64,
    peer_initial_window: i64,
    peer_max_frame: u32,
    next_id: u32,
    active: Option<Stream>,
    /// Header block being assembled across CONTINUATION frames: (stream, end_stream).
    block: Vec<u8>,
    block_of: Option<(u32, bool)>,
    goaway: Option<(u32, u32, String)>,
    stats: Stats,
}

impl Conn {
    /// A new connection; [`Conn::output`] then holds the preface, our SETTINGS and the
    /// connection WINDOW_UPDATE. It is legal to send the first request before the server's
    /// SETTINGS arrive (spec §1.1).
    pub fn new(cfg: Config) -> Self {
        let table = cfg
            .header_table_size
            .map_or(hpack::DEFAULT_TABLE_SIZE, |t| t as usize);
        let initial_window = cfg.initial_window.min(frame::MAX_WINDOW);
        let conn_target = initial_window.max(DEFAULT_WINDOW);
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(frame::PREFACE);
        let mut settings = vec![
            (frame::SETTINGS_ENABLE_PUSH, 0),
            (frame::SETTINGS_INITIAL_WINDOW_SIZE, initial_window),
        ];
        if let Some(t) = cfg.header_table_size {
            settings.push((frame::SETTINGS_HEADER_TABLE_SIZE, t));
        }
        frame::write_settings(&mut out, &settings);
        if conn_target > DEFAULT_WINDOW {
            frame::write_window_update(&mut out, 0, conn_target - DEFAULT_WINDOW);
        }
        Conn {
            out,
            hpack: hpack::Decoder::new(table, cfg.max_header_block),
            cfg: Config {
                initial_window,
                ..cfg
            },
            conn_recv_target: conn_target as i64,
            conn_recv: conn_target as i64,
            conn_send: DEFAULT_WINDOW as i64,
            peer_initial_window: DEFAULT_WINDOW as i64,
            peer_max_frame: frame::DEFAULT_MAX_FRAME,
            next_id: 1,
            active: None,
            block: Vec::new(),
            block_of: None,
            goaway: None,
            stats: Stats::default(),
        }
    }

    pub fn stats(&self) -> Stats {
        Stats {
            hpack_dynamic_entries: self.hpack.dynamic_entries(),
            ..self.stats
        }
    }

    /// Bytes to write to the socket.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// Call after writing all of [`Conn::output`].
    pub fn clear_output(&mut self) {
        self.out.clear();
    }

    /// True once the server sent GOAWAY: finish the current call, then reconnect.
    pub fn is_closing(&self) -> bool {
        self.goaway.is_some()
    }

    /// A stream is open (it may be half-closed by us).
    pub fn stream_open(&self) -> bool {
        self.active.is_some()
    }

    /// The active stream accepts DATA (open and not half-closed by us).
    pub fn can_send(&self) -> bool {
        self.active.as_ref().is_some_and(|s| !s.local_closed)
    }

    /// Opens a stream with these request headers (one HEADERS frame, CONTINUATION if it does
    /// not fit). Pseudo-headers must come first in `headers`.
    pub fn open_stream(&mut self, headers: &[(&str, &str)]) -> Result<u32, Error> {
        if let Some((code, last_stream, debug)) = &self.goaway {
            return Err(Error::GoAway {
                code: *code,
                last_stream: *last_stream,
                debug: debug.clone(),
            });
        }
        if self.active.is_some() {
            return Err(Error::Protocol(
                "a stream is already open on this connection (one call at a time)",
            ));
        }
        let id = self.next_id;
        if id > frame::MAX_WINDOW - 2 {
            return Err(Error::Protocol("stream ids exhausted; reconnect"));
        }
        self.next_id += 2;
        let mut block = std::mem::take(&mut self.block);
        block.clear();
        for (n, v) in headers {
            hpack::encode_literal(&mut block, n, v);
        }
        let max = self.peer_max_frame as usize;
        let mut chunks = block.chunks(max).peekable();
        let mut kind = frame::HEADERS;
        // An empty block still needs one HEADERS frame.
        let first: &[u8] = chunks.next().unwrap_or(&[]);
        let flags = if chunks.peek().is_none() {
            frame::FLAG_END_HEADERS
        } else {
            0
        };
        frame::write_frame(&mut self.out, kind, flags, id, first);
        kind = frame::CONTINUATION;
        while let Some(c) = chunks.next() {
            let flags = if chunks.peek().is_none() {
                frame::FLAG_END_HEADERS
            } else {
                0
            };
            frame::write_frame(&mut self.out, kind, flags, id, c);
        }
        block.clear();
        self.block = block;
        self.active = Some(Stream {
            id,
            send_window: self.peer_initial_window,
            recv_window: self.cfg.initial_window as i64,
            local_closed: false,
            got_head: false,
        });
        Ok(id)
    }

    /// How many DATA bytes could be sent now.
    pub fn send_capacity(&self) -> usize {
        match &self.active {
            Some(s) if !s.local_closed => s.send_window.min(self.conn_send).max(0) as usize,
            _ => 0,
        }
    }

    /// Queues as much of `data` as the windows allow as DATA frames, setting END_STREAM on the
    /// frame that carries the last byte when `end_stream` (an empty DATA frame if `data` is
    /// empty). Returns the number of bytes taken; less than `data.len()` means: read frames
    /// until a WINDOW_UPDATE or SETTINGS opens the window, then call again with the rest.
    pub fn send_data(&mut self, data: &[u8], end_stream: bool) -> usize {
        let max_frame = self.peer_max_frame as usize;
        let Some(s) = self.active.as_mut().filter(|s| !s.local_closed) else {
            return 0;
        };
        let mut sent = 0;
        loop {
            let window = s.send_window.min(self.conn_send).max(0) as usize;
            let n = (data.len() - sent).min(window).min(max_frame);
            let last = sent + n == data.len();
            if n == 0 && !(last && end_stream) {
                self.stats.send_stalls += 1;
                return sent;
            }
            let flags = if last && end_stream {
                frame::FLAG_END_STREAM
            } else {
                0
            };
            frame::write_frame(
                &mut self.out,
                frame::DATA,
                flags,
                s.id,
                &data[sent..sent + n],
            );
            s.send_window -= n as i64;
            self.conn_send -= n as i64;
            sent += n;
            if last {
                if end_stream {
                    s.local_closed = true;
                }
                return sent;
            }
        }
    }

    /// Abandons the active stream (the caller gave up on the call): RST_STREAM(CANCEL) if the
    /// server may still send on it. Later frames for it are ignored.
    pub fn cancel_stream(&mut self) {
        if let Some(s) = self.active.take() {
            frame::write_rst_stream(&mut self.out, s.id, frame::CANCEL);
        }
    }

    /// Processes the first frame in `buf`. Returns `Ok(None)` if `buf` does not yet hold a
    /// whole frame, else the bytes consumed and the event for the active stream, if any.
    /// Control frames are handled here (their answers are appended to the output).
    pub fn receive<'a>(
        &mut self,
        buf: &'a [u8],
    ) -> Result<Option<(usize, Option<Event<'a>>)>, Error> {
        let Some((f, used)) = frame::decode(buf, frame::DEFAULT_MAX_FRAME).map_err(Error::Frame)?
        else {
            return Ok(None);
        };
        if let Some((stream, _)) = self.block_of {
            if !matches!(f, Frame::Continuation { stream: s, .. } if s == stream) {
                return Err(Error::Protocol("expected CONTINUATION of a header block"));
            }
        }
        let ev = match f {
            Frame::Data {
                stream,
                end_stream,
                data,
                flow_len,
            } => self.on_data(stream, end_stream, data, flow_len)?,
            Frame::Headers {
                stream,
                end_stream,
                end_headers,
                block,
            } => {
                self.check_stream_id(stream)?;
                if end_headers {
                    self.on_header_block(stream, end_stream, block)?
                } else {
                    self.append_block(block)?;
                    self.block_of = Some((stream, end_stream));
                    None
                }
            }
            Frame::Continuation {
                stream,
                end_headers,
                block,
            } => {
                let Some((s, end_stream)) = self.block_of else {
                    return Err(Error::Protocol("CONTINUATION without HEADERS"));
                };
                debug_assert_eq!(s, stream, "checked above");
                self.append_block(block)?;
                if end_headers {
                    self.block_of = None;
                    let block = std::mem::take(&mut self.block);
                    let ev = self.on_header_block(s, end_stream, &block);
                    self.block = block;
                    self.block.clear();
                    ev?
                } else {
                    None
                }
            }
            Frame::Priority { .. } | Frame::Unknown { .. } => None,
            Frame::RstStream { stream, code } => {
                self.check_stream_id(stream)?;
                match &self.active {
                    Some(s) if s.id == stream => {
                        self.active = None;
                        Some(Event::Reset(code))
                    }
                    // RST_STREAM(NO_ERROR) after trailers on a stream we did not half-close
                    // is normal (spec §1.3); for closed streams nothing is left to do.
                    _ => None,
                }
            }
            Frame::Settings { ack, params } => {
                if !ack {
                    self.apply_settings(params)?;
                    frame::write_frame(&mut self.out, frame::SETTINGS, frame::FLAG_ACK, 0, &[]);
                    self.stats.settings_acked += 1;
                }
                None
            }
            Frame::PushPromise { .. } => {
                return Err(Error::Protocol("PUSH_PROMISE although we disabled push"))
            }
            Frame::Ping { ack, data } => {
                // grpc-go's BDP estimator pings often; an unanswered PING stalls its window growth.
                if !ack {
                    frame::write_frame(&mut self.out, frame::PING, frame::FLAG_ACK, 0, &data);
                    self.stats.pings_acked += 1;
                }
                None
            }
            Frame::GoAway {
                last_stream,
                code,
                debug,
            } => {
                let debug: String = String::from_utf8_lossy(debug).chars().take(200).collect();
                self.goaway = Some((code, last_stream, debug.clone()));
                match &self.active {
                    // Our request was not (and will not be) processed: fail it now.
                    Some(s) if s.id > last_stream => {
                        self.active = None;
                        return Err(Error::GoAway {
                            code,
                            last_stream,
                            debug,
                        });
                    }
                    _ => None,
                }
            }
            Frame::WindowUpdate { stream, increment } => {
                let inc = increment as i64;
                self.stats.window_updates_received += 1;
                if stream == 0 {
                    self.conn_send += inc;
                    if self.conn_send > frame::MAX_WINDOW as i64 {
                        return Err(Error::FlowControl("connection send window above 2^31-1"));
                    }
                } else if let Some(s) = self.active.as_mut().filter(|s| s.id == stream) {
                    s.send_window += inc;
                    if s.send_window > frame::MAX_WINDOW as i64 {
                        return Err(Error::FlowControl("stream send window above 2^31-1"));
                    }
                }
                None
            }
        };
        Ok(Some((used, ev)))
    }

    /// Frames on streams we never opened (ids we have not used, or even server ids) are a
    /// protocol error; frames on streams we are done with are ignored by the callers.
    fn check_stream_id(&self, stream: u32) -> Result<(), Error> {
        if stream >= self.next_id || stream % 2 == 0 {
            return Err(Error::Protocol("frame on a stream we did not open"));
        }
        Ok(())
    }

    fn append_block(&mut self, part: &[u8]) -> Result<(), Error> {
        if self.block.len() + part.len() > self.cfg.max_header_block {
            return Err(Error::Protocol("header block larger than our limit"));
        }
        self.block.extend_from_slice(part);
        Ok(())
    }

    fn on_data<'a>(
        &mut self,
        stream: u32,
        end_stream: bool,
        data: &'a [u8],
        flow_len: u32,
    ) -> Result<Option<Event<'a>>, Error> {
        self.check_stream_id(stream)?;
        let len = flow_len as i64;
        if len > self.conn_recv {
            return Err(Error::FlowControl(
                "DATA beyond the connection window we granted",
            ));
        }
        self.conn_recv -= len;
        // Replenish once half is used, so a long stream (events) never stalls (spec §1.5).
        if self.conn_recv <= self.conn_recv_target / 2 {
            let inc = self.conn_recv_target - self.conn_recv;
            frame::write_window_update(&mut self.out, 0, inc as u32);
            self.conn_recv = self.conn_recv_target;
        }
        let target = self.cfg.initial_window as i64;
        let Some(s) = self.active.as_mut().filter(|s| s.id == stream) else {
            return Ok(None);
        };
        if !s.got_head {
            return Err(Error::Protocol("DATA before response HEADERS"));
        }
        if len > s.recv_window {
            return Err(Error::FlowControl(
                "DATA beyond the stream window we granted",
            ));
        }
        s.recv_window -= len;
        if end_stream {
            self.active = None;
        } else if s.recv_window <= target / 2 {
            frame::write_window_update(&mut self.out, s.id, (target - s.recv_window) as u32);
            s.recv_window = target;
        }
        Ok(Some(Event::Data { data, end_stream }))
    }

    fn on_header_block(
        &mut self,
        stream: u32,
        end_stream: bool,
        block: &[u8],
    ) -> Result<Option<Event<'static>>, Error> {
        // Every block must go through the decoder, even for finished streams: it updates the
        // dynamic table that later blocks refer to.
        let mut head = Head::default();
        self.hpack
            .decode(block, |n, v| head.capture(n, v))
            .map_err(Error::Hpack)?;
        let Some(s) = self.active.as_mut().filter(|s| s.id == stream) else {
            return Ok(None);
        };
        if !s.got_head && !end_stream {
            s.got_head = true;
            return Ok(Some(Event::Head(head)));
        }
        if !end_stream {
            return Err(Error::Protocol("trailers without END_STREAM"));
        }
        self.active = None;
        Ok(Some(Event::End(head)))
    }

    fn apply_settings(&mut self, params: &[u8]) -> Result<(), Error> {
        for (id, v) in frame::settings(params) {
            match id {
                frame::SETTINGS_INITIAL_WINDOW_SIZE => {
                    if v > frame::MAX_WINDOW {
                        return Err(Error::FlowControl("INITIAL_WINDOW_SIZE above 2^31-1"));
                    }
                    // The change applies to open streams as a delta (RFC 7540 §6.9.2); grpc-go
                    // grows this setting while a large upload is in flight.
                    let delta = v as i64 - self.peer_initial_window;
                    self.peer_initial_window = v as i64;
                    if let Some(s) = self.active.as_mut() {
                        s.send_window += delta;
                        if s.send_window > frame::MAX_WINDOW as i64 {
                            return Err(Error::FlowControl("stream send window above 2^31-1"));
                        }
                    }
                }
                frame::SETTINGS_MAX_FRAME_SIZE => {
                    if !(frame::DEFAULT_MAX_FRAME..=(1 << 24) - 1).contains(&v) {
                        return Err(Error::Protocol("MAX_FRAME_SIZE out of range"));
                    }
                    self.peer_max_frame = v;
                }
                frame::SETTINGS_ENABLE_PUSH if v > 1 => {
                    return Err(Error::Protocol("ENABLE_PUSH not 0 or 1"))
                }
                // HEADER_TABLE_SIZE limits the server's decoder; our encoder never indexes.
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Error;
    use super::*;
    use frame::*;

    /// Decodes our output into owned frames for assertions.
    #[derive(Debug, PartialEq)]
    enum Out {
        Settings(Vec<(u16, u32)>),
        SettingsAck,
        PingAck([u8; 8]),
        Window(u32, u32),
        Headers(u32, u8, Vec<u8>),
        Continuation(u32, u8, usize),
        Data(u32, bool, usize),
        Rst(u32, u32),
    }

    fn drain(c: &mut Conn) -> Vec<Out> {
        let out = c.output().to_vec();
        c.clear_output();
        let mut b = &out[..];
        if b.starts_with(PREFACE) {
            b = &b[PREFACE.len()..];
        }
        let mut res = Vec::new();
        while !b.is_empty() {
            let flags = b[4];
            let (f, n) = decode(b, 1 << 20).unwrap().unwrap();
            res.push(match f {
                Frame::Settings { ack: false, params } => Out::Settings(settings(params).collect()),
                Frame::Settings { ack: true, .. } => Out::SettingsAck,
                Frame::Ping { ack: true, data } => Out::PingAck(data),
                Frame::WindowUpdate { stream, increment } => Out::Window(stream, increment),
                Frame::Headers { stream, block, .. } => Out::Headers(stream, flags, block.to_vec()),
                Frame::Continuation { stream, block, .. } => {
                    Out::Continuation(stream, flags, block.len())
                }
                Frame::Data {
                    stream,
                    end_stream,
                    data,
                    ..
                } => Out::Data(stream, end_stream, data.len()),
                Frame::RstStream { stream, code } => Out::Rst(stream, code),
                f => panic!("unexpected output {f:?}"),
            });
            b = &b[n..];
        }
        res
    }

    fn feed<'a>(c: &mut Conn, bytes: &'a [u8]) -> Result<Vec<Event<'a>>, Error> {
        let mut evs = Vec::new();
        let mut rest = bytes;
        while let Some((n, ev)) = c.receive(rest)? {
            evs.extend(ev);
            rest = &rest[n..];
        }
        assert!(rest.is_empty(), "partial frame left");
        Ok(evs)
    }

    fn fr(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_frame(&mut v, kind, flags, stream, payload);
        v
    }

    fn settings_frame(p: &[(u16, u32)]) -> Vec<u8> {
        let mut v = Vec::new();
        write_settings(&mut v, p);
        v
    }

    fn window(stream: u32, inc: u32) -> Vec<u8> {
        let mut v = Vec::new();
        write_window_update(&mut v, stream, inc);
        v
    }

    const REQ: &[(&str, &str)] = &[
        (":method", "POST"),
        (":path", "/x.v1.X/Y"),
        ("content-type", "application/grpc"),
    ];

    /// `:status 200` + `content-type: application/grpc` indexed into the dynamic table,
    /// Huffman-coded as grpc-go does on a connection's first response.
    fn first_response_head() -> Vec<u8> {
        let mut b = vec![0x88, 0x5f];
        let mut v = Vec::new();
        super::super::huffman::encode(b"application/grpc", &mut v);
        hpack::write_int(&mut b, v.len(), 7, 0x80);
        b.extend_from_slice(&v);
        b
    }

    fn trailers(status: &str, msg: &str) -> Vec<u8> {
        let mut b = Vec::new();
        hpack::encode_literal(&mut b, "grpc-status", status);
        hpack::encode_literal(&mut b, "grpc-message", msg);
        b
    }

    #[test]
    fn preface_settings_and_connection_window() {
        let mut c = Conn::new(Config::default());
        assert!(c.output().starts_with(PREFACE));
        assert_eq!(
            drain(&mut c),
            vec![
                Out::Settings(vec![
                    (SETTINGS_ENABLE_PUSH, 0),
                    (SETTINGS_INITIAL_WINDOW_SIZE, 16 << 20)
                ]),
                Out::Window(0, (16 << 20) - 65_535),
            ]
        );
        let mut c = Conn::new(Config {
            header_table_size: Some(0),
            ..Config::default()
        });
        assert!(
            matches!(&drain(&mut c)[0], Out::Settings(p) if p.contains(&(SETTINGS_HEADER_TABLE_SIZE, 0)))
        );
    }

    #[test]
    fn acks_settings_and_pings() {
        let mut c = Conn::new(Config::default());
        drain(&mut c);
        let mut input = settings_frame(&[(SETTINGS_MAX_FRAME_SIZE, 16_384)]);
        input.extend(fr(SETTINGS, FLAG_ACK, 0, &[]));
        input.extend(fr(PING, 0, 0, &[2, 4, 16, 16, 9, 14, 7, 7]));
        input.extend(fr(PING, FLAG_ACK, 0, &[0; 8]));
        assert_eq!(feed(&mut c, &input).unwrap(), vec![]);
        assert_eq!(
            drain(&mut c),
            vec![Out::SettingsAck, Out::PingAck([2, 4, 16, 16, 9, 14, 7, 7])]
        );
    }

    #[test]
    fn send_flow_control_with_settings_delta_and_window_updates() {
        let mut c = Conn::new(Config::default());
        drain(&mut c);
        assert_eq!(c.open_stream(REQ).unwrap(), 1);
        assert!(matches!(
            &drain(&mut c)[..],
            [Out::Headers(1, FLAG_END_HEADERS, _)]
        ));
        let msg = vec![0u8; 200_000];
        // Both windows start at 65535: 3 full frames and one of 65535 - 3 * 16384 = 16383.
        let n = c.send_data(&msg, true);
        assert_eq!(n, 65_535);
        assert_eq!(
            drain(&mut c),
            vec![
                Out::Data(1, false, 16_384),
                Out::Data(1, false, 16_384),
                Out::Data(1, false, 16_384),
                Out::Data(1, false, 16_383)
            ]
        );
        assert_eq!(c.send_data(&msg[n..], true), 0);
        // INITIAL_WINDOW_SIZE 65535 -> 131070 adds 65535 to the stream, but the connection
        // window is still empty.
        feed(
            &mut c,
            &settings_frame(&[(SETTINGS_INITIAL_WINDOW_SIZE, 131_070)]),
        )
        .unwrap();
        assert_eq!(drain(&mut c), vec![Out::SettingsAck]);
        assert_eq!(c.send_capacity(), 0);
        // A connection WINDOW_UPDATE opens it up to the stream's remaining 65535.
        feed(&mut c, &window(0, 1_000_000)).unwrap();
        assert_eq!(c.send_capacity(), 65_535);
        let m = c.send_data(&msg[n..], true);
        assert_eq!(m, 65_535);
        drain(&mut c);
        // A smaller INITIAL_WINDOW_SIZE makes the stream window negative.
        feed(
            &mut c,
            &settings_frame(&[(SETTINGS_INITIAL_WINDOW_SIZE, 65_535)]),
        )
        .unwrap();
        drain(&mut c);
        assert_eq!(c.send_capacity(), 0);
        feed(&mut c, &window(1, 65_535)).unwrap();
        assert_eq!(c.send_capacity(), 0, "window is exactly back to zero");
        // A stream WINDOW_UPDATE for the whole message, as grpc-go does.
        feed(&mut c, &window(1, 200_000)).unwrap();
        let rest = &msg[n + m..];
        assert_eq!(c.send_data(rest, true), rest.len());
        let out = drain(&mut c);
        assert_eq!(out.last(), Some(&Out::Data(1, true, rest.len() % 16_384)));
        assert!(!c.can_send());
        // Window overflow is a flow-control error.
        assert!(matches!(
            feed(&mut c, &window(0, MAX_WINDOW)),
            Err(Error::FlowControl(_))
        ));
    }

    #[test]
    fn bigger_max_frame_size_is_used() {
        let mut c = Conn::new(Config::default());
        feed(
            &mut c,
            &settings_frame(&[(SETTINGS_MAX_FRAME_SIZE, 32_768)]),
        )
        .unwrap();
        drain(&mut c);
        c.open_stream(REQ).unwrap();
        drain(&mut c);
        c.send_data(&[1; 40_000], false);
        assert_eq!(
            drain(&mut c),
            vec![
                Out::Data(1, false, 32_768),
                Out::Data(1, false, 40_000 - 32_768)
            ]
        );
        assert!(matches!(
            feed(&mut c, &settings_frame(&[(SETTINGS_MAX_FRAME_SIZE, 100)])),
            Err(Error::Protocol(_))
        ));
    }

    #[test]
    fn unary_call_with_dynamic_table_across_streams() {
        let mut c = Conn::new(Config::default());
        drain(&mut c);
        for (i, id) in [1u32, 3].into_iter().enumerate() {
            assert_eq!(c.open_stream(REQ).unwrap(), id);
            assert_eq!(c.send_data(&[0, 0, 0, 0, 0], true), 5);
            assert_eq!(drain(&mut c).last(), Some(&Out::Data(id, true, 5)));
            // First response indexes content-type; the second refers to it (index 62).
            let head = if i == 0 {
                first_response_head()
            } else {
                vec![0x88, 0xbe]
            };
            let mut input = fr(HEADERS, FLAG_END_HEADERS, id, &head);
            input.extend(fr(DATA, 0, id, &[0, 0, 0, 0, 2, 8, 1]));
            input.extend(fr(
                HEADERS,
                FLAG_END_HEADERS | FLAG_END_STREAM,
                id,
                &trailers("0", ""),
            ));
            let evs = feed(&mut c, &input).unwrap();
            assert_eq!(
                evs,
                vec![
                    Event::Head(Head {
                        status: Some(200),
                        content_type: Some(b"application/grpc".to_vec()),
                        ..Head::default()
                    }),
                    Event::Data {
                        data: &[0, 0, 0, 0, 2, 8, 1],
                        end_stream: false
                    },
                    Event::End(Head {
                        grpc_status: Some(0),
                        grpc_message: Some(vec![]),
                        ..Head::default()
                    }),
                ]
            );
            assert!(!c.stream_open());
            // RST_STREAM(NO_ERROR) after the trailers is ignored.
            assert_eq!(
                feed(&mut c, &fr(RST_STREAM, 0, id, &[0, 0, 0, 0])).unwrap(),
                vec![]
            );
        }
    }

    #[test]
    fn trailers_only_error_and_reset() {
        let mut c = Conn::new(Config::default());
        c.open_stream(REQ).unwrap();
        let mut block = vec![0x88];
        block.extend(trailers("5", "snapshot sha256:1 does not exist: not found"));
        let input = fr(HEADERS, FLAG_END_HEADERS | FLAG_END_STREAM, 1, &block);
        let evs = feed(&mut c, &input).unwrap();
        assert_eq!(
            evs,
            vec![Event::End(Head {
                status: Some(200),
                grpc_status: Some(5),
                grpc_message: Some(b"snapshot sha256:1 does not exist: not found".to_vec()),
                ..Head::default()
            })]
        );
        // The stream is over: sending on it is a no-op.
        assert_eq!(c.send_data(b"x", true), 0);
        // RST_STREAM on the active stream ends the call.
        c.open_stream(REQ).unwrap();
        assert_eq!(
            feed(&mut c, &fr(RST_STREAM, 0, 3, &[0, 0, 0, 1])).unwrap(),
            vec![Event::Reset(PROTOCOL_ERROR)]
        );
        assert!(!c.stream_open());
    }

    #[test]
    fn continuation_is_assembled() {
        let mut c = Conn::new(Config::default());
        c.open_stream(REQ).unwrap();
        let mut block = vec![0x88];
        block.extend(trailers("6", &"x".repeat(40)));
        let (a, b) = block.split_at(10);
        let (b, d) = b.split_at(10);
        let mut input = fr(HEADERS, FLAG_END_STREAM, 1, a);
        input.extend(fr(CONTINUATION, 0, 1, b));
        input.extend(fr(CONTINUATION, FLAG_END_HEADERS, 1, d));
        let evs = feed(&mut c, &input).unwrap();
        assert!(matches!(
            &evs[..],
            [Event::End(Head {
                grpc_status: Some(6),
                ..
            })]
        ));
        // Another frame in the middle of a header block is a protocol error.
        c.open_stream(REQ).unwrap();
        let mut input = fr(HEADERS, 0, 3, a);
        input.extend(fr(PING, 0, 0, &[0; 8]));
        assert!(matches!(feed(&mut c, &input), Err(Error::Protocol(_))));
    }

    #[test]
    fn header_block_limit() {
        let mut c = Conn::new(Config {
            max_header_block: 100,
            ..Config::default()
        });
        c.open_stream(REQ).unwrap();
        let mut input = fr(HEADERS, 0, 1, &[0; 60]);
        input.extend(fr(CONTINUATION, 0, 1, &[0; 60]));
        assert!(matches!(feed(&mut c, &input), Err(Error::Protocol(_))));
    }

    #[test]
    fn receive_windows_are_checked_and_replenished() {
        let mut c = Conn::new(Config::default());
        drain(&mut c);
        c.open_stream(REQ).unwrap();
        drain(&mut c);
        feed(
            &mut c,
            &fr(HEADERS, FLAG_END_HEADERS, 1, &first_response_head()),
        )
        .unwrap();
        // Padding counts against the windows too.
        let mut padded = vec![255u8];
        padded.extend_from_slice(&[0; 16_000]);
        padded.extend_from_slice(&[0; 255]);
        let f = fr(DATA, FLAG_PADDED, 1, &padded);
        let flow = padded.len() as u32;
        let mut total = 0u32;
        let mut updates = Vec::new();
        while total < 9 << 20 {
            feed(&mut c, &f).unwrap();
            total += flow;
            updates.extend(drain(&mut c));
        }
        // One connection and one stream update once half of the 16 MiB was used.
        assert_eq!(updates.len(), 2, "{updates:?}");
        assert!(matches!(updates[0], Out::Window(0, n) if n >= 8 << 20));
        assert!(matches!(updates[1], Out::Window(1, n) if n >= 8 << 20));
        // A peer that ignores our stream window gets a flow-control error.
        let mut c = Conn::new(Config {
            initial_window: 10_000,
            ..Config::default()
        });
        c.open_stream(REQ).unwrap();
        feed(&mut c, &fr(HEADERS, FLAG_END_HEADERS, 1, &[0x88])).unwrap();
        assert!(matches!(
            feed(&mut c, &fr(DATA, 0, 1, &[0; 16_000])),
            Err(Error::FlowControl(_))
        ));
    }

    #[test]
    fn goaway() {
        // GOAWAY naming our stream as processed: the call completes, the connection is closing.
        let mut c = Conn::new(Config::default());
        c.open_stream(REQ).unwrap();
        feed(&mut c, &fr(GOAWAY, 0, 0, &[0, 0, 0, 1, 0, 0, 0, 0])).unwrap();
        assert!(c.is_closing() && c.stream_open());
        assert!(matches!(c.open_stream(REQ), Err(Error::GoAway { .. })));
        let input = fr(
            HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            1,
            &trailers("0", ""),
        );
        let evs = feed(&mut c, &input).unwrap();
        assert_eq!(evs.len(), 1);
        assert!(matches!(c.open_stream(REQ), Err(Error::GoAway { .. })));
        // GOAWAY below our stream: the request was not processed, fail it.
        let mut c = Conn::new(Config::default());
        c.open_stream(REQ).unwrap();
        c.open_stream(REQ).unwrap_err();
        let input = fr(GOAWAY, 0, 0, &[0, 0, 0, 0, 0, 0, 0, 2, b'x']);
        let r = feed(&mut c, &input);
        assert_eq!(
            r,
            Err(Error::GoAway {
                code: 2,
                last_stream: 0,
                debug: "x".into()
            })
        );
    }

    #[test]
    fn stray_and_hostile_frames() {
        let mut c = Conn::new(Config::default());
        // Frames on streams never opened.
        assert!(matches!(
            feed(&mut c, &fr(DATA, 0, 1, b"x")),
            Err(Error::Protocol(_))
        ));
        let mut c = Conn::new(Config::default());
        c.open_stream(REQ).unwrap();
        assert!(matches!(
            feed(&mut c, &fr(HEADERS, FLAG_END_HEADERS, 2, &[0x88])),
            Err(Error::Protocol(_))
        ));
        let mut c = Conn::new(Config::default());
        c.open_stream(REQ).unwrap();
        assert!(matches!(
            feed(&mut c, &fr(PUSH_PROMISE, 0, 1, &[0, 0, 0, 2])),
            Err(Error::Protocol(_))
        ));
        // DATA before HEADERS.
        let mut c = Conn::new(Config::default());
        c.open_stream(REQ).unwrap();
        assert!(matches!(
            feed(&mut c, &fr(DATA, 0, 1, b"x")),
            Err(Error::Protocol(_))
        ));
        // Bad HPACK is fatal.
        let mut c = Conn::new(Config::default());
        c.open_stream(REQ).unwrap();
        assert!(matches!(
            feed(&mut c, &fr(HEADERS, FLAG_END_HEADERS, 1, &[0xff, 0xff])),
            Err(Error::Hpack(_))
        ));
        // Trailers without END_STREAM.
        let mut c = Conn::new(Config::default());
        c.open_stream(REQ).unwrap();
        let mut input = fr(HEADERS, FLAG_END_HEADERS, 1, &[0x88]);
        input.extend(fr(HEADERS, FLAG_END_HEADERS, 1, &trailers("0", "")));
        assert!(matches!(feed(&mut c, &input), Err(Error::Protocol(_))));
        // Oversized frame header.
        let mut c = Conn::new(Config::default());
        let mut big = Vec::new();
        write_header(&mut big, 1 << 20, DATA, 0, 1);
        assert!(matches!(
            c.receive(&big),
            Err(Error::Frame(frame::Error::TooLarge(_)))
        ));
        // Unknown frame types and PRIORITY are ignored.
        let mut c = Conn::new(Config::default());
        c.open_stream(REQ).unwrap();
        let mut input = fr(0x20, 0, 0, b"ext");
        input.extend(fr(PRIORITY, 0, 1, &[0, 0, 0, 0, 9]));
        assert_eq!(feed(&mut c, &input).unwrap(), vec![]);
    }

    #[test]
    fn cancel_and_long_headers() {
        let mut c = Conn::new(Config::default());
        drain(&mut c);
        let long = "v".repeat(40_000);
        c.open_stream(&[(":path", "/a"), ("x-long", &long)])
            .unwrap();
        let out = drain(&mut c);
        assert!(matches!(out[0], Out::Headers(1, 0, _)));
        assert!(matches!(out[1], Out::Continuation(1, 0, 16_384)));
        assert!(matches!(out[2], Out::Continuation(1, FLAG_END_HEADERS, _)));
        c.cancel_stream();
        assert_eq!(drain(&mut c), vec![Out::Rst(1, CANCEL)]);
        // Late frames for the cancelled stream are ignored, but still HPACK-decoded.
        let input = fr(HEADERS, FLAG_END_HEADERS, 1, &first_response_head());
        let evs = feed(&mut c, &input).unwrap();
        assert!(evs.is_empty());
        c.open_stream(REQ).unwrap();
        let input = fr(HEADERS, FLAG_END_HEADERS, 3, &[0x88, 0xbe]);
        let evs = feed(&mut c, &input).unwrap();
        assert!(matches!(
            &evs[..],
            [Event::Head(Head {
                content_type: Some(_),
                ..
            })]
        ));
    }
}
