//! gRPC over HTTP/2 (the "PROTOCOL-HTTP2" document): message framing, status, headers.
//!
//! Pure helpers: the 5-byte length prefix, a reassembler that cuts messages out of DATA
//! payloads however they are split, and `grpc-status`/`grpc-message` decoding into [`Status`].
//! No compression (containerd never uses it), no deadlines (callers time out themselves).

use std::fmt;

/// Largest message we accept: containerd's own default `max_send_message_size` (16 MiB).
pub const MAX_MESSAGE: usize = 16 << 20;

/// gRPC status codes (the ones containerd's errdefs map to, and the rest for completeness).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Ok,
    Canceled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
    Other(u32),
}

impl Code {
    pub fn from_u32(c: u32) -> Code {
        use Code::*;
        match c {
            0 => Ok,
            1 => Canceled,
            2 => Unknown,
            3 => InvalidArgument,
            4 => DeadlineExceeded,
            5 => NotFound,
            6 => AlreadyExists,
            7 => PermissionDenied,
            8 => ResourceExhausted,
            9 => FailedPrecondition,
            10 => Aborted,
            11 => OutOfRange,
            12 => Unimplemented,
            13 => Internal,
            14 => Unavailable,
            15 => DataLoss,
            16 => Unauthenticated,
            n => Other(n),
        }
    }
}

/// A non-OK gRPC status as returned by containerd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub code: Code,
    /// `grpc-message`, percent-decoded.
    pub message: String,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

/// Starts a message: writes the 5-byte prefix with a placeholder length. Encode the body into
/// `out` after it, then call [`finish_message`] with the returned offset.
pub fn begin_message(out: &mut Vec<u8>) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0; 5]);
    at
}

pub fn finish_message(out: &mut [u8], at: usize) {
    let len = (out.len() - at - 5) as u32;
    out[at + 1..at + 5].copy_from_slice(&len.to_be_bytes());
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The compressed flag is set: we never negotiated compression.
    Compressed,
    /// The declared message length is above our limit.
    TooLarge(u32),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Compressed => {
                f.write_str("compressed gRPC message (compression was not negotiated)")
            }
            FrameError::TooLarge(n) => write!(
                f,
                "gRPC message of {n} bytes exceeds the {MAX_MESSAGE}-byte limit"
            ),
        }
    }
}

/// Reassembles length-prefixed messages from DATA payloads. Holds at most one partial message
/// plus the data pushed since the last pop, so pop messages before pushing more.
pub struct Reassembler {
    buf: Vec<u8>,
    start: usize,
    max: usize,
}

impl Reassembler {
    pub fn new(max: usize) -> Self {
        Reassembler {
            buf: Vec::new(),
            start: 0,
            max,
        }
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.start = 0;
    }

    pub fn push(&mut self, data: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered that are not yet a whole message.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete message as a range of [`Reassembler::get`], if one is buffered.
    /// The prefix is checked as soon as its 5 bytes are in, before the body is buffered.
    pub fn next_message(&mut self) -> Result<Option<std::ops::Range<usize>>, FrameError> {
        let avail = &self.buf[self.start..];
        if avail.len() < 5 {
            return Ok(None);
        }
        if avail[0] != 0 {
            return Err(FrameError::Compressed);
        }
        let len = u32::from_be_bytes([avail[1], avail[2], avail[3], avail[4]]);
        if len as usize > self.max {
            return Err(FrameError::TooLarge(len));
        }
        if avail.len() < 5 + len as usize {
            return Ok(None);
        }
        let body = self.start + 5..self.start + 5 + len as usize;
        self.start = body.end;
        Ok(Some(body))
    }

    pub fn get(&self, r: std::ops::Range<usize>) -> &[u8] {
        &self.buf[r]
    }
}

/// Decodes `grpc-message` (percent-encoded, RFC 3986 style, for bytes outside 0x20–0x7E).
/// Invalid escapes are kept literally, as grpc-go does; invalid UTF-8 is replaced.
pub fn percent_decode(s: &[u8]) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            if let (Some(h), Some(l)) = (hex(s[i + 1]), hex(s[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `grpc-status`; anything but a decimal number is Unknown (gRPC spec).
pub fn parse_status(v: &[u8]) -> u32 {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(bodies: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for b in bodies {
            let at = begin_message(&mut out);
            out.extend_from_slice(b);
            finish_message(&mut out, at);
        }
        out
    }

    #[test]
    fn prefix() {
        assert_eq!(framed(&[b""]), [0, 0, 0, 0, 0]);
        assert_eq!(framed(&[b"ab"]), [0, 0, 0, 0, 2, b'a', b'b']);
    }

    #[test]
    fn reassembles_across_any_split() {
        let big = vec![7u8; 40_000];
        let stream = framed(&[b"one", b"", &big, b"two"]);
        for chunk in [1, 2, 5, 6, 16_384, stream.len()] {
            let mut r = Reassembler::new(MAX_MESSAGE);
            let mut got: Vec<Vec<u8>> = Vec::new();
            for piece in stream.chunks(chunk) {
                while let Some(m) = r.next_message().unwrap() {
                    got.push(r.get(m).to_vec());
                }
                r.push(piece);
            }
            while let Some(m) = r.next_message().unwrap() {
                got.push(r.get(m).to_vec());
            }
            assert_eq!(
                got,
                vec![b"one".to_vec(), vec![], big.clone(), b"two".to_vec()],
                "chunk {chunk}"
            );
            assert_eq!(r.pending(), 0);
        }
    }

    #[test]
    fn refuses_compressed_and_oversized_from_the_prefix() {
        let mut r = Reassembler::new(1024);
        r.push(&[1, 0, 0, 0, 1]);
        assert_eq!(r.next_message(), Err(FrameError::Compressed));
        let mut r = Reassembler::new(1024);
        r.push(&[0, 0, 0, 4, 1]);
        assert_eq!(r.next_message(), Err(FrameError::TooLarge(1025)));
    }

    #[test]
    fn status_and_message() {
        assert_eq!(
            percent_decode(b"snapshot sha256:ab does not exist: not found"),
            "snapshot sha256:ab does not exist: not found"
        );
        assert_eq!(percent_decode(b"caf%C3%A9 %0Aline"), "café \nline");
        assert_eq!(percent_decode(b"100%"), "100%");
        assert_eq!(percent_decode(b"%zz%4"), "%zz%4");
        assert_eq!(parse_status(b"5"), 5);
        assert_eq!(parse_status(b"x"), 2);
        assert_eq!(Code::from_u32(5), Code::NotFound);
        assert_eq!(Code::from_u32(6), Code::AlreadyExists);
        assert_eq!(Code::from_u32(14), Code::Unavailable);
        assert_eq!(Code::from_u32(99), Code::Other(99));
    }
}
