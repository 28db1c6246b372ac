//! HTTP/2 frames (RFC 7540 §4, §6): decoding from and encoding into caller-owned buffers.
//!
//! Decoding validates everything that is a property of a single frame (sizes, padding, stream
//! id 0 or not); what depends on connection state (which stream is open, windows) is `conn`'s
//! job. Nothing here allocates except appending to the caller's output buffer.

pub const HEADER_LEN: usize = 9;
/// The protocol's default and minimum SETTINGS_MAX_FRAME_SIZE; we never advertise more.
pub const DEFAULT_MAX_FRAME: u32 = 16_384;
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const FLAG_END_STREAM: u8 = 0x1;
pub const FLAG_ACK: u8 = 0x1;
pub const FLAG_END_HEADERS: u8 = 0x4;
pub const FLAG_PADDED: u8 = 0x8;
pub const FLAG_PRIORITY: u8 = 0x20;

pub const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
pub const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

/// Error codes (RFC 7540 §7).
pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const FLOW_CONTROL_ERROR: u32 = 0x3;
pub const FRAME_SIZE_ERROR: u32 = 0x6;
pub const CANCEL: u32 = 0x8;
pub const COMPRESSION_ERROR: u32 = 0x9;

pub const MAX_WINDOW: u32 = (1 << 31) - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Longer than the SETTINGS_MAX_FRAME_SIZE we advertised.
    TooLarge(u32),
    /// A fixed-size frame with the wrong length, or padding longer than the payload.
    BadLength(u8),
    /// A stream frame on stream 0 or a connection frame on a stream.
    BadStream(u8),
    /// WINDOW_UPDATE with a zero increment (§6.9).
    ZeroIncrement,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::TooLarge(n) => write!(f, "frame of {n} bytes exceeds our MAX_FRAME_SIZE"),
            Error::BadLength(t) => write!(f, "frame type {t} has an invalid length or padding"),
            Error::BadStream(t) => write!(f, "frame type {t} on the wrong stream id"),
            Error::ZeroIncrement => f.write_str("WINDOW_UPDATE with a zero increment"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// `flow_len` is the whole payload length including padding: it counts against windows.
    Data {
        stream: u32,
        end_stream: bool,
        data: &'a [u8],
        flow_len: u32,
    },
    /// Priority fields and padding are stripped; we do not do prioritisation.
    Headers {
        stream: u32,
        end_stream: bool,
        end_headers: bool,
        block: &'a [u8],
    },
    Priority {
        stream: u32,
    },
    RstStream {
        stream: u32,
        code: u32,
    },
    /// `params` is a multiple of 6 bytes; iterate with [`settings`].
    Settings {
        ack: bool,
        params: &'a [u8],
    },
    PushPromise {
        stream: u32,
    },
    Ping {
        ack: bool,
        data: [u8; 8],
    },
    GoAway {
        last_stream: u32,
        code: u32,
        debug: &'a [u8],
    },
    WindowUpdate {
        stream: u32,
        increment: u32,
    },
    Continuation {
        stream: u32,
        end_headers: bool,
        block: &'a [u8],
    },
    /// Unknown frame types must be ignored (§4.1).
    Unknown {
        kind: u8,
    },
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Decodes one frame from the front of `buf`. `Ok(None)` means more bytes are needed; the
/// frame header is checked against `max_frame` first, so a peer cannot make us buffer more.
pub fn decode(buf: &[u8], max_frame: u32) -> Result<Option<(Frame<'_>, usize)>, Error> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]);
    if len > max_frame {
        return Err(Error::TooLarge(len));
    }
    let total = HEADER_LEN + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let (kind, flags) = (buf[3], buf[4]);
    let stream = be32(&buf[5..9]) & MAX_WINDOW;
    let p = &buf[HEADER_LEN..total];
    let need_stream = |ok: bool| {
        if ok {
            Ok(())
        } else {
            Err(Error::BadStream(kind))
        }
    };
    let frame = match kind {
        DATA => {
            need_stream(stream != 0)?;
            let data = unpad(p, flags, kind)?;
            Frame::Data {
                stream,
                end_stream: flags & FLAG_END_STREAM != 0,
                data,
                flow_len: len,
            }
        }
        HEADERS => {
            need_stream(stream != 0)?;
            let mut block = unpad(p, flags, kind)?;
            if flags & FLAG_PRIORITY != 0 {
                // 4-byte stream dependency + 1-byte weight (§6.2).
                block = block.get(5..).ok_or(Error::BadLength(kind))?;
            }
            Frame::Headers {
                stream,
                end_stream: flags & FLAG_END_STREAM != 0,
                end_headers: flags & FLAG_END_HEADERS != 0,
                block,
            }
        }
        PRIORITY => {
            need_stream(stream != 0)?;
            if p.len() != 5 {
                return Err(Error::BadLength(kind));
            }
            Frame::Priority { stream }
        }
        RST_STREAM => {
            need_stream(stream != 0)?;
            if p.len() != 4 {
                return Err(Error::BadLength(kind));
            }
            Frame::RstStream {
                stream,
                code: be32(p),
            }
        }
        SETTINGS => {
            need_stream(stream == 0)?;
            let ack = flags & FLAG_ACK != 0;
            if p.len() % 6 != 0 || (ack && !p.is_empty()) {
                return Err(Error::BadLength(kind));
            }
            Frame::Settings { ack, params: p }
        }
        PUSH_PROMISE => {
            need_stream(stream != 0)?;
            Frame::PushPromise { stream }
        }
        PING => {
            need_stream(stream == 0)?;
            let data: [u8; 8] = p.try_into().map_err(|_| Error::BadLength(kind))?;
            Frame::Ping {
                ack: flags & FLAG_ACK != 0,
                data,
            }
        }
        GOAWAY => {
            need_stream(stream == 0)?;
            if p.len() < 8 {
                return Err(Error::BadLength(kind));
            }
            Frame::GoAway {
                last_stream: be32(p) & MAX_WINDOW,
                code: be32(&p[4..]),
                debug: &p[8..],
            }
        }
        WINDOW_UPDATE => {
            if p.len() != 4 {
                return Err(Error::BadLength(kind));
            }
            let increment = be32(p) & MAX_WINDOW;
            if increment == 0 {
                return Err(Error::ZeroIncrement);
            }
            Frame::WindowUpdate { stream, increment }
        }
        CONTINUATION => {
            need_stream(stream != 0)?;
            Frame::Continuation {
                stream,
                end_headers: flags & FLAG_END_HEADERS != 0,
                block: p,
            }
        }
        kind => Frame::Unknown { kind },
    };
    Ok(Some((frame, total)))
}

/// Strips the PADDED prefix and trailing padding (§6.1): pad length byte + padding must fit.
fn unpad(p: &[u8], flags: u8, kind: u8) -> Result<&[u8], Error> {
    if flags & FLAG_PADDED == 0 {
        return Ok(p);
    }
    let (&pad, rest) = p.split_first().ok_or(Error::BadLength(kind))?;
    let keep = rest
        .len()
        .checked_sub(pad as usize)
        .ok_or(Error::BadLength(kind))?;
    Ok(&rest[..keep])
}

/// Iterates the (identifier, value) pairs of a SETTINGS payload.
pub fn settings(params: &[u8]) -> impl Iterator<Item = (u16, u32)> + '_ {
    params
        .chunks_exact(6)
        .map(|c| (u16::from_be_bytes([c[0], c[1]]), be32(&c[2..])))
}

pub fn write_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    debug_assert!(
        len < 1 << 24,
        "frame payloads are bounded by MAX_FRAME_SIZE"
    );
    let l = (len as u32).to_be_bytes();
    out.extend_from_slice(&[l[1], l[2], l[3], kind, flags]);
    out.extend_from_slice(&(stream & MAX_WINDOW).to_be_bytes());
}

pub fn write_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    write_header(out, payload.len(), kind, flags, stream);
    out.extend_from_slice(payload);
}

pub fn write_settings(out: &mut Vec<u8>, params: &[(u16, u32)]) {
    write_header(out, params.len() * 6, SETTINGS, 0, 0);
    for (id, v) in params {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&v.to_be_bytes());
    }
}

pub fn write_window_update(out: &mut Vec<u8>, stream: u32, increment: u32) {
    write_frame(
        out,
        WINDOW_UPDATE,
        0,
        stream,
        &(increment & MAX_WINDOW).to_be_bytes(),
    );
}

pub fn write_rst_stream(out: &mut Vec<u8>, stream: u32, code: u32) {
    write_frame(out, RST_STREAM, 0, stream, &code.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, Error> {
        decode(buf, DEFAULT_MAX_FRAME)
    }

    #[test]
    fn round_trips() {
        let mut out = Vec::new();
        write_frame(&mut out, DATA, FLAG_END_STREAM, 3, b"hello");
        write_settings(
            &mut out,
            &[
                (SETTINGS_ENABLE_PUSH, 0),
                (SETTINGS_INITIAL_WINDOW_SIZE, 1 << 24),
            ],
        );
        write_window_update(&mut out, 0, 12345);
        write_rst_stream(&mut out, 5, CANCEL);
        write_frame(&mut out, PING, FLAG_ACK, 0, &[1, 2, 3, 4, 5, 6, 7, 8]);
        write_frame(&mut out, HEADERS, FLAG_END_HEADERS, 7, &[0x88]);
        write_frame(&mut out, CONTINUATION, FLAG_END_HEADERS, 7, &[0x82]);
        write_frame(
            &mut out,
            GOAWAY,
            0,
            0,
            &[0, 0, 0, 9, 0, 0, 0, 0, b'b', b'y', b'e'],
        );
        write_frame(&mut out, 0xfa, 0, 0, b"xyz");
        let mut frames = Vec::new();
        let mut rest = &out[..];
        while let Some((f, n)) = one(rest).unwrap() {
            frames.push(f);
            rest = &rest[n..];
        }
        assert!(rest.is_empty());
        assert_eq!(
            frames[0],
            Frame::Data {
                stream: 3,
                end_stream: true,
                data: b"hello",
                flow_len: 5
            }
        );
        match frames[1] {
            Frame::Settings { ack: false, params } => assert_eq!(
                settings(params).collect::<Vec<_>>(),
                vec![
                    (SETTINGS_ENABLE_PUSH, 0),
                    (SETTINGS_INITIAL_WINDOW_SIZE, 1 << 24)
                ]
            ),
            f => panic!("{f:?}"),
        }
        assert_eq!(
            frames[2],
            Frame::WindowUpdate {
                stream: 0,
                increment: 12345
            }
        );
        assert_eq!(
            frames[3],
            Frame::RstStream {
                stream: 5,
                code: CANCEL
            }
        );
        assert_eq!(
            frames[4],
            Frame::Ping {
                ack: true,
                data: [1, 2, 3, 4, 5, 6, 7, 8]
            }
        );
        assert_eq!(
            frames[5],
            Frame::Headers {
                stream: 7,
                end_stream: false,
                end_headers: true,
                block: &[0x88]
            }
        );
        assert_eq!(
            frames[6],
            Frame::Continuation {
                stream: 7,
                end_headers: true,
                block: &[0x82]
            }
        );
        assert_eq!(
            frames[7],
            Frame::GoAway {
                last_stream: 9,
                code: 0,
                debug: b"bye"
            }
        );
        assert_eq!(frames[8], Frame::Unknown { kind: 0xfa });
    }

    #[test]
    fn incomplete_input_needs_more() {
        let mut out = Vec::new();
        write_frame(&mut out, DATA, 0, 1, &[7; 100]);
        for cut in 0..out.len() {
            assert_eq!(one(&out[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(one(&out).unwrap().is_some());
    }

    #[test]
    fn padding_and_priority_are_stripped() {
        // DATA, PADDED: pad length 3, "abc", 3 bytes of padding.
        let mut out = Vec::new();
        write_frame(
            &mut out,
            DATA,
            FLAG_PADDED,
            1,
            &[3, b'a', b'b', b'c', 0, 0, 0],
        );
        let (f, _) = one(&out).unwrap().unwrap();
        assert_eq!(
            f,
            Frame::Data {
                stream: 1,
                end_stream: false,
                data: b"abc",
                flow_len: 7
            }
        );
        // HEADERS, PADDED + PRIORITY: pad 2, 5 priority bytes, block [0x88], 2 padding bytes.
        let mut out = Vec::new();
        write_frame(
            &mut out,
            HEADERS,
            FLAG_PADDED | FLAG_PRIORITY | FLAG_END_HEADERS | FLAG_END_STREAM,
            1,
            &[2, 0, 0, 0, 0, 16, 0x88, 0, 0],
        );
        let (f, _) = one(&out).unwrap().unwrap();
        assert_eq!(
            f,
            Frame::Headers {
                stream: 1,
                end_stream: true,
                end_headers: true,
                block: &[0x88]
            }
        );
    }

    #[test]
    fn malformed_frames() {
        let frame = |kind, flags, stream, p: &[u8]| {
            let mut out = Vec::new();
            write_frame(&mut out, kind, flags, stream, p);
            out
        };
        // Padding longer than the payload.
        assert_eq!(
            one(&frame(DATA, FLAG_PADDED, 1, &[5, 1, 2])),
            Err(Error::BadLength(DATA))
        );
        assert_eq!(
            one(&frame(DATA, FLAG_PADDED, 1, &[])),
            Err(Error::BadLength(DATA))
        );
        // Priority flag without room for the priority fields.
        assert_eq!(
            one(&frame(HEADERS, FLAG_PRIORITY, 1, &[0, 0])),
            Err(Error::BadLength(HEADERS))
        );
        // Wrong stream ids.
        assert_eq!(one(&frame(DATA, 0, 0, b"x")), Err(Error::BadStream(DATA)));
        assert_eq!(
            one(&frame(SETTINGS, 0, 1, &[])),
            Err(Error::BadStream(SETTINGS))
        );
        assert_eq!(
            one(&frame(PING, 0, 3, &[0; 8])),
            Err(Error::BadStream(PING))
        );
        // Wrong fixed sizes.
        assert_eq!(
            one(&frame(PING, 0, 0, &[0; 7])),
            Err(Error::BadLength(PING))
        );
        assert_eq!(
            one(&frame(SETTINGS, 0, 0, &[0; 7])),
            Err(Error::BadLength(SETTINGS))
        );
        assert_eq!(
            one(&frame(SETTINGS, FLAG_ACK, 0, &[0; 6])),
            Err(Error::BadLength(SETTINGS))
        );
        assert_eq!(
            one(&frame(RST_STREAM, 0, 1, &[0; 3])),
            Err(Error::BadLength(RST_STREAM))
        );
        assert_eq!(
            one(&frame(WINDOW_UPDATE, 0, 1, &[0; 5])),
            Err(Error::BadLength(WINDOW_UPDATE))
        );
        assert_eq!(
            one(&frame(GOAWAY, 0, 0, &[0; 7])),
            Err(Error::BadLength(GOAWAY))
        );
        assert_eq!(
            one(&frame(WINDOW_UPDATE, 0, 0, &[0; 4])),
            Err(Error::ZeroIncrement)
        );
        // Too large: refused from the header alone, before the payload arrived.
        let mut big = Vec::new();
        write_header(&mut big, 16_385, DATA, 0, 1);
        assert_eq!(one(&big), Err(Error::TooLarge(16_385)));
        // The reserved bit of the stream id is ignored.
        let mut r = frame(DATA, 0, 1, b"x");
        r[5] |= 0x80;
        assert!(matches!(
            one(&r),
            Ok(Some((Frame::Data { stream: 1, .. }, _)))
        ));
    }
}
