//! MQTT 3.1.1 packet codec: bytes in, packets out; packets into caller-owned buffers.
//! Pure (no I/O, no clock, no allocation): decoded packets borrow from the input, and every
//! malformed or unsupported input is an error value, never a panic. QoS 2 and MQTT 5 are
//! deliberately not supported; they decode to [`DecodeError::Qos2Unsupported`] or
//! [`DecodeError::UnsupportedProtocol`] so a broker can refuse them cleanly.
//!
//! Streaming use: keep unread bytes in a buffer, call [`decode`] on it; `Ok(None)` means "need
//! more bytes", `Ok(Some((packet, n)))` means `n` bytes were consumed. A declared length above
//! the caller's `max_packet` is refused as soon as the fixed header is complete, so a peer can
//! never make the caller buffer more than `max_packet` + 5 bytes.

use std::fmt;
use std::str;

/// The largest remaining length the protocol can express (4 length bytes).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;
/// Fixed header size for the largest remaining length: type byte + 4 length bytes.
pub const MAX_FIXED_HEADER: usize = 5;
const PROTOCOL_NAME: &str = "MQTT";
const PROTOCOL_LEVEL_311: u8 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    /// Only meaningful as a requested or granted subscription QoS: PUBLISH at QoS 2 is refused.
    ExactlyOnce = 2,
}

impl QoS {
    fn from_bits(b: u8) -> Option<QoS> {
        match b {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Will<'a> {
    pub topic: &'a str,
    pub message: &'a [u8],
    pub qos: QoS,
    pub retain: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connect<'a> {
    pub client_id: &'a str,
    /// Seconds; 0 disables keepalive.
    pub keep_alive: u16,
    pub clean_session: bool,
    pub will: Option<Will<'a>>,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectReturnCode {
    Accepted = 0,
    UnacceptableProtocol = 1,
    IdentifierRejected = 2,
    ServerUnavailable = 3,
    BadCredentials = 4,
    NotAuthorized = 5,
}

impl ConnectReturnCode {
    fn from_byte(b: u8) -> Option<Self> {
        use ConnectReturnCode::*;
        Some(match b {
            0 => Accepted,
            1 => UnacceptableProtocol,
            2 => IdentifierRejected,
            3 => ServerUnavailable,
            4 => BadCredentials,
            5 => NotAuthorized,
            _ => return None,
        })
    }
}

impl fmt::Display for ConnectReturnCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnectReturnCode::Accepted => "accepted",
            ConnectReturnCode::UnacceptableProtocol => "unacceptable protocol version",
            ConnectReturnCode::IdentifierRejected => "client identifier rejected",
            ConnectReturnCode::ServerUnavailable => "server unavailable",
            ConnectReturnCode::BadCredentials => "bad user name or password",
            ConnectReturnCode::NotAuthorized => "not authorized",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    pub code: ConnectReturnCode,
}

/// A PUBLISH. Invariants (checked by both [`decode`] and [`Packet::encode`]): QoS 0 has
/// `pid == 0` and `dup == false`; QoS 1 has a non-zero `pid`; QoS 2 does not exist here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish<'a> {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub topic: &'a str,
    pub pid: u16,
    pub payload: &'a [u8],
}

/// Topic filters of a SUBSCRIBE: a caller's list when encoding, validated wire bytes when
/// decoded (iterating them cannot fail).
#[derive(Debug, Clone, Copy)]
pub enum Topics<'a> {
    List(&'a [(&'a str, QoS)]),
    Wire(&'a [u8]),
}

impl<'a> Topics<'a> {
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, QoS)> + 'a {
        let (list, wire): (&'a [(&'a str, QoS)], &'a [u8]) = match *self {
            Topics::List(l) => (l, &[]),
            Topics::Wire(w) => (&[], w),
        };
        let mut r = Reader::new(wire);
        list.iter().copied().chain(std::iter::from_fn(move || {
            if r.is_empty() {
                return None;
            }
            // Validated by `decode`; a failure here would mean a `Wire` built elsewhere.
            let filter = r.str().ok()?;
            let qos = QoS::from_bits(r.u8().ok()?)?;
            Some((filter, qos))
        }))
    }
}

impl PartialEq for Topics<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

/// Topic filters of an UNSUBSCRIBE, as for [`Topics`].
#[derive(Debug, Clone, Copy)]
pub enum Filters<'a> {
    List(&'a [&'a str]),
    Wire(&'a [u8]),
}

impl<'a> Filters<'a> {
    pub fn iter(&self) -> impl Iterator<Item = &'a str> + 'a {
        let (list, wire): (&'a [&'a str], &'a [u8]) = match *self {
            Filters::List(l) => (l, &[]),
            Filters::Wire(w) => (&[], w),
        };
        let mut r = Reader::new(wire);
        list.iter().copied().chain(std::iter::from_fn(move || {
            (!r.is_empty()).then(|| r.str().ok()).flatten()
        }))
    }
}

impl PartialEq for Filters<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Subscribe<'a> {
    pub pid: u16,
    pub topics: Topics<'a>,
}

/// SUBACK return codes: granted QoS 0/1/2, or 0x80 for a refused filter.
pub const SUBACK_FAILURE: u8 = 0x80;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubAck<'a> {
    pub pid: u16,
    /// One byte per filter of the SUBSCRIBE, in order: 0, 1, 2 or [`SUBACK_FAILURE`].
    pub codes: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Unsubscribe<'a> {
    pub pid: u16,
    pub filters: Filters<'a>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Packet<'a> {
    Connect(Connect<'a>),
    ConnAck(ConnAck),
    Publish(Publish<'a>),
    PubAck { pid: u16 },
    Subscribe(Subscribe<'a>),
    SubAck(SubAck<'a>),
    Unsubscribe(Unsubscribe<'a>),
    UnsubAck { pid: u16 },
    PingReq,
    PingResp,
    Disconnect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Packet type 0 or 15.
    ReservedPacketType(u8),
    /// PUBLISH at QoS 2, or PUBREC/PUBREL/PUBCOMP: this codec does not do QoS 2.
    Qos2Unsupported,
    /// Fixed-header flag bits that the packet type fixes to another value.
    InvalidFlags {
        packet_type: u8,
        flags: u8,
    },
    /// More than 4 remaining-length bytes.
    MalformedRemainingLength,
    /// The declared remaining length exceeds the caller's limit.
    PacketTooLarge {
        len: usize,
        max: usize,
    },
    /// A field runs past the end of the packet.
    Truncated,
    /// Bytes left after the last field.
    TrailingBytes,
    /// A string that is not UTF-8 or contains U+0000.
    InvalidString,
    /// CONNECT with a protocol name other than "MQTT".
    BadProtocolName,
    /// CONNECT with a protocol level other than 4 (3.1.1); a broker answers CONNACK code 1.
    UnsupportedProtocol {
        level: u8,
    },
    InvalidConnectFlags(u8),
    PasswordWithoutUsername,
    InvalidQoS(u8),
    ZeroPacketId,
    /// PUBLISH topic empty or with wildcards, or a SUBSCRIBE/UNSUBSCRIBE filter that is invalid.
    InvalidTopic,
    /// SUBSCRIBE or UNSUBSCRIBE without any filter.
    NoTopics,
    InvalidConnAckFlags(u8),
    InvalidReturnCode(u8),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use DecodeError::*;
        match self {
            ReservedPacketType(t) => write!(f, "reserved packet type {t}"),
            Qos2Unsupported => f.write_str("QoS 2 is not supported"),
            InvalidFlags { packet_type, flags } => {
                write!(
                    f,
                    "invalid flags {flags:#06b} for packet type {packet_type}"
                )
            }
            MalformedRemainingLength => f.write_str("malformed remaining length"),
            PacketTooLarge { len, max } => {
                write!(f, "packet of {len} bytes exceeds the limit of {max}")
            }
            Truncated => f.write_str("field runs past the end of the packet"),
            TrailingBytes => f.write_str("trailing bytes after the last field"),
            InvalidString => f.write_str("string is not valid UTF-8 or contains U+0000"),
            BadProtocolName => f.write_str("protocol name is not MQTT"),
            UnsupportedProtocol { level } => {
                write!(
                    f,
                    "protocol level {level} is not supported (only 4, MQTT 3.1.1)"
                )
            }
            InvalidConnectFlags(b) => write!(f, "invalid CONNECT flags {b:#010b}"),
            PasswordWithoutUsername => f.write_str("password without user name"),
            InvalidQoS(q) => write!(f, "invalid QoS {q}"),
            ZeroPacketId => f.write_str("packet identifier 0"),
            InvalidTopic => f.write_str("invalid topic name or filter"),
            NoTopics => f.write_str("no topic filter"),
            InvalidConnAckFlags(b) => write!(f, "invalid CONNACK flags {b:#04x}"),
            InvalidReturnCode(b) => write!(f, "invalid return code {b:#04x}"),
        }
    }
}

impl std::error::Error for DecodeError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeError {
    /// The output slice is shorter than the packet; `needed` is the full packet size.
    BufferTooSmall {
        needed: usize,
    },
    /// A string or binary field over 65535 bytes.
    FieldTooLong,
    PacketTooLarge,
    ZeroPacketId,
    Qos2Unsupported,
    /// QoS 0 PUBLISH with a packet id or the DUP flag.
    InvalidPublishFlags,
    InvalidTopic,
    InvalidString,
    NoTopics,
    PasswordWithoutUsername,
    InvalidReturnCode(u8),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use EncodeError::*;
        match self {
            BufferTooSmall { needed } => {
                write!(f, "output buffer too small ({needed} bytes needed)")
            }
            FieldTooLong => f.write_str("string or binary field longer than 65535 bytes"),
            PacketTooLarge => f.write_str("packet longer than the MQTT maximum"),
            ZeroPacketId => f.write_str("packet identifier 0"),
            Qos2Unsupported => f.write_str("QoS 2 is not supported"),
            InvalidPublishFlags => f.write_str("QoS 0 PUBLISH with a packet id or DUP"),
            InvalidTopic => f.write_str("invalid topic name or filter"),
            InvalidString => f.write_str("string contains U+0000"),
            NoTopics => f.write_str("no topic filter"),
            PasswordWithoutUsername => f.write_str("password without user name"),
            InvalidReturnCode(b) => write!(f, "invalid return code {b:#04x}"),
        }
    }
}

impl std::error::Error for EncodeError {}

/// A topic name a PUBLISH may carry: non-empty, no wildcards, no U+0000, at most 65535 bytes.
pub fn valid_topic_name(t: &str) -> bool {
    !t.is_empty() && t.len() <= u16::MAX as usize && !t.contains(['+', '#', '\0'])
}

/// A subscription filter: `+` only as a whole level, `#` only as the whole last level.
pub fn valid_topic_filter(f: &str) -> bool {
    if f.is_empty() || f.len() > u16::MAX as usize || f.contains('\0') {
        return false;
    }
    let levels = f.split('/').count();
    f.split('/').enumerate().all(|(i, level)| match level {
        "#" => i + 1 == levels,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// Whether `topic` matches `filter` (3.1.1 §4.7), including the rule that wildcards at the
/// first level do not match topics starting with `$`. Both must be valid.
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

// --- decoding ---

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(DecodeError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn binary(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u16()? as usize;
        self.take(n)
    }
    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let s = str::from_utf8(self.binary()?).map_err(|_| DecodeError::InvalidString)?;
        if s.contains('\0') {
            return Err(DecodeError::InvalidString);
        }
        Ok(s)
    }
    fn pid(&mut self) -> Result<u16, DecodeError> {
        match self.u16()? {
            0 => Err(DecodeError::ZeroPacketId),
            p => Ok(p),
        }
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos.min(self.buf.len())..];
        self.pos = self.buf.len();
        s
    }
    fn finish(&self) -> Result<(), DecodeError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes)
        }
    }
}

/// Decodes one packet from the start of `buf`. `Ok(None)`: incomplete, read more. The remaining
/// length is bounded by `max_packet` (and by the protocol's own maximum).
pub fn decode(buf: &[u8], max_packet: usize) -> Result<Option<(Packet<'_>, usize)>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let (ptype, flags) = (first >> 4, first & 0x0f);
    // Refuse a bad header before waiting for its body, so a caller can drop the peer at once.
    match ptype {
        0 | 15 => return Err(DecodeError::ReservedPacketType(ptype)),
        5..=7 => return Err(DecodeError::Qos2Unsupported),
        3 => {
            if (flags >> 1) & 0b11 >= 2 {
                return Err(if (flags >> 1) & 0b11 == 2 {
                    DecodeError::Qos2Unsupported
                } else {
                    DecodeError::InvalidQoS(3)
                });
            }
        }
        8 | 10 => {
            if flags != 0b0010 {
                return Err(DecodeError::InvalidFlags {
                    packet_type: ptype,
                    flags,
                });
            }
        }
        _ => {
            if flags != 0 {
                return Err(DecodeError::InvalidFlags {
                    packet_type: ptype,
                    flags,
                });
            }
        }
    }
    let mut len: usize = 0;
    let mut header = 1;
    loop {
        if header > 4 {
            return Err(DecodeError::MalformedRemainingLength);
        }
        let Some(&b) = buf.get(header) else {
            return Ok(None);
        };
        len |= ((b & 0x7f) as usize) << (7 * (header - 1));
        header += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    let max = max_packet.min(MAX_REMAINING_LENGTH);
    if len > max {
        return Err(DecodeError::PacketTooLarge { len, max });
    }
    let total = header + len;
    let Some(body) = buf.get(header..total) else {
        return Ok(None);
    };
    let mut r = Reader::new(body);
    let packet = match ptype {
        1 => Packet::Connect(decode_connect(&mut r)?),
        2 => {
            let ack_flags = r.u8()?;
            if ack_flags & !1 != 0 {
                return Err(DecodeError::InvalidConnAckFlags(ack_flags));
            }
            let code = r.u8()?;
            let code =
                ConnectReturnCode::from_byte(code).ok_or(DecodeError::InvalidReturnCode(code))?;
            Packet::ConnAck(ConnAck {
                session_present: ack_flags == 1,
                code,
            })
        }
        3 => {
            let qos = QoS::from_bits((flags >> 1) & 0b11).ok_or(DecodeError::InvalidQoS(3))?;
            let dup = flags & 0b1000 != 0;
            let topic = r.str()?;
            if !valid_topic_name(topic) {
                return Err(DecodeError::InvalidTopic);
            }
            let pid = match qos {
                QoS::AtMostOnce if dup => {
                    return Err(DecodeError::InvalidFlags {
                        packet_type: 3,
                        flags,
                    })
                }
                QoS::AtMostOnce => 0,
                _ => r.pid()?,
            };
            let payload = r.rest();
            Packet::Publish(Publish {
                dup,
                qos,
                retain: flags & 1 != 0,
                topic,
                pid,
                payload,
            })
        }
        4 => Packet::PubAck { pid: r.pid()? },
        8 => {
            let pid = r.pid()?;
            let wire = r.rest();
            let mut w = Reader::new(wire);
            if w.is_empty() {
                return Err(DecodeError::NoTopics);
            }
            while !w.is_empty() {
                if !valid_topic_filter(w.str()?) {
                    return Err(DecodeError::InvalidTopic);
                }
                let q = w.u8()?;
                if q > 2 {
                    return Err(DecodeError::InvalidQoS(q));
                }
            }
            Packet::Subscribe(Subscribe {
                pid,
                topics: Topics::Wire(wire),
            })
        }
        9 => {
            let pid = r.pid()?;
            let codes = r.rest();
            if let Some(&c) = codes.iter().find(|&&c| c > 2 && c != SUBACK_FAILURE) {
                return Err(DecodeError::InvalidReturnCode(c));
            }
            if codes.is_empty() {
                return Err(DecodeError::NoTopics);
            }
            Packet::SubAck(SubAck { pid, codes })
        }
        10 => {
            let pid = r.pid()?;
            let wire = r.rest();
            let mut w = Reader::new(wire);
            if w.is_empty() {
                return Err(DecodeError::NoTopics);
            }
            while !w.is_empty() {
                if !valid_topic_filter(w.str()?) {
                    return Err(DecodeError::InvalidTopic);
                }
            }
            Packet::Unsubscribe(Unsubscribe {
                pid,
                filters: Filters::Wire(wire),
            })
        }
        11 => Packet::UnsubAck { pid: r.pid()? },
        12 => Packet::PingReq,
        13 => Packet::PingResp,
        14 => Packet::Disconnect,
        _ => return Err(DecodeError::ReservedPacketType(ptype)),
    };
    r.finish()?;
    Ok(Some((packet, total)))
}

fn decode_connect<'a>(r: &mut Reader<'a>) -> Result<Connect<'a>, DecodeError> {
    let name = r.binary()?;
    let level = r.u8()?;
    // "MQIsdp" is 3.1: a known protocol at an unsupported level, answered with CONNACK 1.
    if name == b"MQIsdp" {
        return Err(DecodeError::UnsupportedProtocol { level });
    }
    if name != PROTOCOL_NAME.as_bytes() {
        return Err(DecodeError::BadProtocolName);
    }
    if level != PROTOCOL_LEVEL_311 {
        return Err(DecodeError::UnsupportedProtocol { level });
    }
    let flags = r.u8()?;
    let will_flag = flags & 0b100 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0b10_0000 != 0;
    if flags & 1 != 0 || will_qos == 3 || (!will_flag && (will_qos != 0 || will_retain)) {
        return Err(DecodeError::InvalidConnectFlags(flags));
    }
    let has_user = flags & 0b1000_0000 != 0;
    let has_pass = flags & 0b0100_0000 != 0;
    if has_pass && !has_user {
        return Err(DecodeError::PasswordWithoutUsername);
    }
    let keep_alive = r.u16()?;
    let client_id = r.str()?;
    let will = if will_flag {
        let topic = r.str()?;
        if !valid_topic_name(topic) {
            return Err(DecodeError::InvalidTopic);
        }
        let message = r.binary()?;
        let qos = QoS::from_bits(will_qos).ok_or(DecodeError::InvalidQoS(will_qos))?;
        Some(Will {
            topic,
            message,
            qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = if has_user { Some(r.str()?) } else { None };
    let password = if has_pass { Some(r.binary()?) } else { None };
    Ok(Connect {
        client_id,
        keep_alive,
        clean_session: flags & 0b10 != 0,
        will,
        username,
        password,
    })
}

// --- encoding ---

struct Writer<'a> {
    out: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    // Callers size the buffer first (`Packet::encoded_len`), so these cannot run past the end.
    fn u8(&mut self, b: u8) {
        self.out[self.pos] = b;
        self.pos += 1;
    }
    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_be_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.out[self.pos..self.pos + b.len()].copy_from_slice(b);
        self.pos += b.len();
    }
    fn binary(&mut self, b: &[u8]) {
        self.u16(b.len() as u16);
        self.bytes(b);
    }
}

fn field(b: &[u8]) -> Result<usize, EncodeError> {
    if b.len() > u16::MAX as usize {
        return Err(EncodeError::FieldTooLong);
    }
    Ok(2 + b.len())
}

fn string(s: &str) -> Result<usize, EncodeError> {
    if s.contains('\0') {
        return Err(EncodeError::InvalidString);
    }
    field(s.as_bytes())
}

fn nonzero(pid: u16) -> Result<(), EncodeError> {
    if pid == 0 {
        Err(EncodeError::ZeroPacketId)
    } else {
        Ok(())
    }
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

impl Packet<'_> {
    /// Validates the packet and returns its remaining length.
    fn body_len(&self) -> Result<usize, EncodeError> {
        let n = match self {
            Packet::Connect(c) => {
                if c.password.is_some() && c.username.is_none() {
                    return Err(EncodeError::PasswordWithoutUsername);
                }
                let mut n = 2 + PROTOCOL_NAME.len() + 1 + 1 + 2 + string(c.client_id)?;
                if let Some(w) = &c.will {
                    if !valid_topic_name(w.topic) {
                        return Err(EncodeError::InvalidTopic);
                    }
                    n += string(w.topic)? + field(w.message)?;
                }
                if let Some(u) = c.username {
                    n += string(u)?;
                }
                if let Some(p) = c.password {
                    n += field(p)?;
                }
                n
            }
            Packet::ConnAck(_) => 2,
            Packet::Publish(p) => {
                if !valid_topic_name(p.topic) {
                    return Err(EncodeError::InvalidTopic);
                }
                let pid_len = match p.qos {
                    QoS::AtMostOnce if p.pid != 0 || p.dup => {
                        return Err(EncodeError::InvalidPublishFlags)
                    }
                    QoS::AtMostOnce => 0,
                    QoS::AtLeastOnce => {
                        nonzero(p.pid)?;
                        2
                    }
                    QoS::ExactlyOnce => return Err(EncodeError::Qos2Unsupported),
                };
                string(p.topic)? + pid_len + p.payload.len()
            }
            Packet::PubAck { pid } | Packet::UnsubAck { pid } => {
                nonzero(*pid)?;
                2
            }
            Packet::Subscribe(s) => {
                nonzero(s.pid)?;
                let mut n = 2;
                for (f, _) in s.topics.iter() {
                    if !valid_topic_filter(f) {
                        return Err(EncodeError::InvalidTopic);
                    }
                    n += string(f)? + 1;
                }
                if n == 2 {
                    return Err(EncodeError::NoTopics);
                }
                n
            }
            Packet::SubAck(s) => {
                nonzero(s.pid)?;
                if s.codes.is_empty() {
                    return Err(EncodeError::NoTopics);
                }
                if let Some(&c) = s.codes.iter().find(|&&c| c > 2 && c != SUBACK_FAILURE) {
                    return Err(EncodeError::InvalidReturnCode(c));
                }
                2 + s.codes.len()
            }
            Packet::Unsubscribe(u) => {
                nonzero(u.pid)?;
                let mut n = 2;
                for f in u.filters.iter() {
                    if !valid_topic_filter(f) {
                        return Err(EncodeError::InvalidTopic);
                    }
                    n += string(f)?;
                }
                if n == 2 {
                    return Err(EncodeError::NoTopics);
                }
                n
            }
            Packet::PingReq | Packet::PingResp | Packet::Disconnect => 0,
        };
        if n > MAX_REMAINING_LENGTH {
            return Err(EncodeError::PacketTooLarge);
        }
        Ok(n)
    }

    /// Total encoded size, fixed header included; validates the packet.
    pub fn encoded_len(&self) -> Result<usize, EncodeError> {
        let body = self.body_len()?;
        Ok(1 + varint_len(body) + body)
    }

    /// Writes the packet at the start of `out` and returns its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        let body = self.body_len()?;
        let needed = 1 + varint_len(body) + body;
        if out.len() < needed {
            return Err(EncodeError::BufferTooSmall { needed });
        }
        let mut w = Writer { out, pos: 0 };
        let first = match self {
            Packet::Connect(_) => 0x10,
            Packet::ConnAck(_) => 0x20,
            Packet::Publish(p) => {
                0x30 | (u8::from(p.dup) << 3) | ((p.qos as u8) << 1) | u8::from(p.retain)
            }
            Packet::PubAck { .. } => 0x40,
            Packet::Subscribe(_) => 0x82,
            Packet::SubAck(_) => 0x90,
            Packet::Unsubscribe(_) => 0xa2,
            Packet::UnsubAck { .. } => 0xb0,
            Packet::PingReq => 0xc0,
            Packet::PingResp => 0xd0,
            Packet::Disconnect => 0xe0,
        };
        w.u8(first);
        let mut n = body;
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                w.u8(b);
                break;
            }
            w.u8(b | 0x80);
        }
        match self {
            Packet::Connect(c) => {
                w.binary(PROTOCOL_NAME.as_bytes());
                w.u8(PROTOCOL_LEVEL_311);
                let mut flags = u8::from(c.clean_session) << 1;
                if let Some(will) = &c.will {
                    flags |= 0b100 | ((will.qos as u8) << 3) | (u8::from(will.retain) << 5);
                }
                flags |= u8::from(c.password.is_some()) << 6;
                flags |= u8::from(c.username.is_some()) << 7;
                w.u8(flags);
                w.u16(c.keep_alive);
                w.binary(c.client_id.as_bytes());
                if let Some(will) = &c.will {
                    w.binary(will.topic.as_bytes());
                    w.binary(will.message);
                }
                if let Some(u) = c.username {
                    w.binary(u.as_bytes());
                }
                if let Some(p) = c.password {
                    w.binary(p);
                }
            }
            Packet::ConnAck(a) => {
                w.u8(u8::from(a.session_present));
                w.u8(a.code as u8);
            }
            Packet::Publish(p) => {
                w.binary(p.topic.as_bytes());
                if p.qos != QoS::AtMostOnce {
                    w.u16(p.pid);
                }
                w.bytes(p.payload);
            }
            Packet::PubAck { pid } | Packet::UnsubAck { pid } => w.u16(*pid),
            Packet::Subscribe(s) => {
                w.u16(s.pid);
                for (f, q) in s.topics.iter() {
                    w.binary(f.as_bytes());
                    w.u8(q as u8);
                }
            }
            Packet::SubAck(s) => {
                w.u16(s.pid);
                w.bytes(s.codes);
            }
            Packet::Unsubscribe(u) => {
                w.u16(u.pid);
                for f in u.filters.iter() {
                    w.binary(f.as_bytes());
                }
            }
            Packet::PingReq | Packet::PingResp | Packet::Disconnect => {}
        }
        debug_assert_eq!(
            w.pos, needed,
            "body_len and encode agree on every packet type"
        );
        Ok(needed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    fn encode_vec(p: &Packet<'_>) -> Vec<u8> {
        let mut buf = vec![0u8; p.encoded_len().unwrap()];
        let n = p.encode(&mut buf).unwrap();
        assert_eq!(n, buf.len());
        buf
    }

    const TOPICS: &[(&str, QoS)] = &[
        ("nodes/abc/control/deploy", QoS::AtLeastOnce),
        ("nodes/+/information", QoS::AtMostOnce),
        ("nodes/#", QoS::ExactlyOnce),
    ];
    const FILTERS: &[&str] = &["nodes/abc/control/delete", "a/+/b", "#"];
    static BIG: [u8; 70_000] = [0x5a; 70_000];

    fn samples() -> Vec<Packet<'static>> {
        vec![
            Packet::Connect(Connect {
                client_id: "6650f0c2e4b0a1b2c3d4e5f6-ne",
                keep_alive: 30,
                clean_session: true,
                will: None,
                username: None,
                password: None,
            }),
            Packet::Connect(Connect {
                client_id: "",
                keep_alive: 0,
                clean_session: false,
                will: Some(Will {
                    topic: "w/t",
                    message: b"bye",
                    qos: QoS::AtLeastOnce,
                    retain: true,
                }),
                username: Some("user"),
                password: Some(b"p\0ss"),
            }),
            Packet::ConnAck(ConnAck {
                session_present: false,
                code: ConnectReturnCode::Accepted,
            }),
            Packet::ConnAck(ConnAck {
                session_present: true,
                code: ConnectReturnCode::NotAuthorized,
            }),
            Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: "nodes/x/job",
                pid: 0,
                payload: b"",
            }),
            Packet::Publish(Publish {
                dup: true,
                qos: QoS::AtLeastOnce,
                retain: true,
                topic: "nodes/x/jobs/resources",
                pid: 65535,
                payload: br#"{"services":[]}"#,
            }),
            // Payload beyond 16 KiB: three remaining-length bytes.
            Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: "big",
                pid: 7,
                payload: &BIG,
            }),
            Packet::PubAck { pid: 1 },
            Packet::Subscribe(Subscribe {
                pid: 2,
                topics: Topics::List(TOPICS),
            }),
            Packet::SubAck(SubAck {
                pid: 2,
                codes: &[0, 1, 2, SUBACK_FAILURE],
            }),
            Packet::Unsubscribe(Unsubscribe {
                pid: 3,
                filters: Filters::List(FILTERS),
            }),
            Packet::UnsubAck { pid: 3 },
            Packet::PingReq,
            Packet::PingResp,
            Packet::Disconnect,
        ]
    }

    #[test]
    fn every_packet_type_round_trips() {
        for p in samples() {
            let bytes = encode_vec(&p);
            let (back, n) = decode(&bytes, MAX).unwrap().unwrap();
            assert_eq!(n, bytes.len());
            assert_eq!(back, p, "{p:?}");
            // Re-encoding the decoded (wire-backed) form gives the same bytes.
            assert_eq!(encode_vec(&back), bytes);
        }
    }

    #[test]
    fn known_wire_bytes() {
        assert_eq!(encode_vec(&Packet::PingReq), [0xc0, 0]);
        assert_eq!(encode_vec(&Packet::PubAck { pid: 0x0102 }), [0x40, 2, 1, 2]);
        let connect = Packet::Connect(Connect {
            client_id: "a",
            keep_alive: 30,
            clean_session: true,
            will: None,
            username: None,
            password: None,
        });
        assert_eq!(
            encode_vec(&connect),
            [0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0b10, 0, 30, 0, 1, b'a']
        );
        let sub = Packet::Subscribe(Subscribe {
            pid: 1,
            topics: Topics::List(&[("a/b", QoS::AtLeastOnce)]),
        });
        assert_eq!(encode_vec(&sub), [0x82, 8, 0, 1, 0, 3, b'a', b'/', b'b', 1]);
    }

    #[test]
    fn split_reads_at_every_byte_boundary() {
        let mut stream = Vec::new();
        let packets = samples();
        for p in &packets {
            stream.extend_from_slice(&encode_vec(p));
        }
        // Every prefix of every packet is "incomplete", never an error or a wrong packet.
        let mut off = 0;
        for p in &packets {
            let len = p.encoded_len().unwrap();
            for k in 0..len {
                assert_eq!(
                    decode(&stream[off..off + k], MAX),
                    Ok(None),
                    "{p:?} cut at {k}"
                );
            }
            off += len;
        }
        // Feeding the stream in chunks of every size gives the same packet sequence.
        for chunk in [1, 2, 3, 5, 7, 64, 4096] {
            let mut buf: Vec<u8> = Vec::new();
            let mut got = 0;
            for piece in stream.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some((p, n)) = decode(&buf, MAX).unwrap() {
                    assert_eq!(p, packets[got]);
                    got += 1;
                    buf.drain(..n);
                }
            }
            assert_eq!(got, packets.len());
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn remaining_length_limits() {
        // Five length bytes is malformed, even before the body arrives.
        assert_eq!(
            decode(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], MAX),
            Err(DecodeError::MalformedRemainingLength)
        );
        // Largest expressible length is refused by the caller's limit as soon as it is known.
        assert_eq!(
            decode(&[0x30, 0xff, 0xff, 0xff, 0x7f], MAX),
            Err(DecodeError::PacketTooLarge {
                len: MAX_REMAINING_LENGTH,
                max: MAX
            })
        );
        assert_eq!(decode(&[0x30, 0x81], 100), Ok(None));
        assert_eq!(
            decode(&[0x30, 0x81, 0x01], 100),
            Err(DecodeError::PacketTooLarge { len: 129, max: 100 })
        );
        // Non-minimal encodings of small lengths are accepted (3.1.1 does not forbid them).
        assert_eq!(
            decode(&[0xc0, 0x80, 0x00], MAX),
            Ok(Some((Packet::PingReq, 3)))
        );
        // Body shorter or longer than the fields it declares.
        assert_eq!(decode(&[0x40, 1, 0], MAX), Err(DecodeError::Truncated));
        assert_eq!(
            decode(&[0x40, 3, 0, 1, 9], MAX),
            Err(DecodeError::TrailingBytes)
        );
        assert_eq!(decode(&[0xc0, 1, 0], MAX), Err(DecodeError::TrailingBytes));
        assert_eq!(
            decode(&[0x20, 3, 0, 0, 0], MAX),
            Err(DecodeError::TrailingBytes)
        );
        // A string length running past the packet.
        assert_eq!(
            decode(&[0x30, 3, 0, 9, b'a'], MAX),
            Err(DecodeError::Truncated)
        );
    }

    fn connect_bytes(name: &[u8], level: u8, flags: u8) -> Vec<u8> {
        let mut body = vec![0, name.len() as u8];
        body.extend_from_slice(name);
        body.extend_from_slice(&[level, flags, 0, 30, 0, 1, b'c']);
        let mut v = vec![0x10, body.len() as u8];
        v.extend(body);
        v
    }

    #[test]
    fn bad_protocol_names_levels_and_flags() {
        assert!(decode(&connect_bytes(b"MQTT", 4, 2), MAX)
            .unwrap()
            .is_some());
        assert_eq!(
            decode(&connect_bytes(b"MQTT", 5, 2), MAX),
            Err(DecodeError::UnsupportedProtocol { level: 5 })
        );
        assert_eq!(
            decode(&connect_bytes(b"MQTT", 3, 2), MAX),
            Err(DecodeError::UnsupportedProtocol { level: 3 })
        );
        assert_eq!(
            decode(&connect_bytes(b"MQIsdp", 3, 2), MAX),
            Err(DecodeError::UnsupportedProtocol { level: 3 })
        );
        assert_eq!(
            decode(&connect_bytes(b"HTTP", 4, 2), MAX),
            Err(DecodeError::BadProtocolName)
        );
        // Reserved bit, will QoS 3, will QoS without will flag, password without user name.
        for flags in [0b0000_0011, 0b0001_1100, 0b0000_1000, 0b0010_0000] {
            assert_eq!(
                decode(&connect_bytes(b"MQTT", 4, flags), MAX),
                Err(DecodeError::InvalidConnectFlags(flags))
            );
        }
        assert_eq!(
            decode(&connect_bytes(b"MQTT", 4, 0b0100_0010), MAX),
            Err(DecodeError::PasswordWithoutUsername)
        );
        // Flags the fixed header fixes.
        assert_eq!(
            decode(&[0x80, 0], MAX),
            Err(DecodeError::InvalidFlags {
                packet_type: 8,
                flags: 0
            })
        );
        assert_eq!(
            decode(&[0xc1, 0], MAX),
            Err(DecodeError::InvalidFlags {
                packet_type: 12,
                flags: 1
            })
        );
        assert_eq!(
            decode(&[0x00, 0], MAX),
            Err(DecodeError::ReservedPacketType(0))
        );
        assert_eq!(
            decode(&[0xf0, 0], MAX),
            Err(DecodeError::ReservedPacketType(15))
        );
        assert_eq!(
            decode(&[0x20, 2, 2, 0], MAX),
            Err(DecodeError::InvalidConnAckFlags(2))
        );
        assert_eq!(
            decode(&[0x20, 2, 0, 6], MAX),
            Err(DecodeError::InvalidReturnCode(6))
        );
    }

    #[test]
    fn qos2_is_rejected_cleanly() {
        // PUBLISH QoS 2 (flags 0b0100), QoS 3 and the QoS 2 handshake packets.
        assert_eq!(
            decode(&[0x34, 5, 0, 1, b't', 0, 1], MAX),
            Err(DecodeError::Qos2Unsupported)
        );
        assert_eq!(decode(&[0x36], MAX), Err(DecodeError::InvalidQoS(3)));
        for t in [0x50, 0x62, 0x70] {
            assert_eq!(
                decode(&[t, 2, 0, 1], MAX),
                Err(DecodeError::Qos2Unsupported)
            );
        }
        let p = Packet::Publish(Publish {
            dup: false,
            qos: QoS::ExactlyOnce,
            retain: false,
            topic: "t",
            pid: 1,
            payload: b"",
        });
        assert_eq!(p.encoded_len(), Err(EncodeError::Qos2Unsupported));
    }

    #[test]
    fn bad_publish_fields() {
        // QoS 0 with DUP; QoS 1 with packet id 0; wildcard and empty topics; invalid UTF-8; NUL.
        assert_eq!(
            decode(&[0x38, 3, 0, 1, b't'], MAX),
            Err(DecodeError::InvalidFlags {
                packet_type: 3,
                flags: 8
            })
        );
        assert_eq!(
            decode(&[0x32, 5, 0, 1, b't', 0, 0], MAX),
            Err(DecodeError::ZeroPacketId)
        );
        assert_eq!(
            decode(&[0x30, 3, 0, 1, b'#'], MAX),
            Err(DecodeError::InvalidTopic)
        );
        assert_eq!(
            decode(&[0x30, 2, 0, 0], MAX),
            Err(DecodeError::InvalidTopic)
        );
        assert_eq!(
            decode(&[0x30, 3, 0, 1, 0xff], MAX),
            Err(DecodeError::InvalidString)
        );
        assert_eq!(
            decode(&[0x30, 3, 0, 1, 0], MAX),
            Err(DecodeError::InvalidString)
        );
        // Subscribe without filters, with a bad filter, with requested QoS 3.
        assert_eq!(decode(&[0x82, 2, 0, 1], MAX), Err(DecodeError::NoTopics));
        assert_eq!(
            decode(&[0x82, 7, 0, 1, 0, 2, b'a', b'#', 0], MAX),
            Err(DecodeError::InvalidTopic)
        );
        assert_eq!(
            decode(&[0x82, 6, 0, 1, 0, 1, b'a', 3], MAX),
            Err(DecodeError::InvalidQoS(3))
        );
        assert_eq!(
            decode(&[0x90, 3, 0, 1, 0x81], MAX),
            Err(DecodeError::InvalidReturnCode(0x81))
        );
        assert_eq!(decode(&[0xa2, 2, 0, 1], MAX), Err(DecodeError::NoTopics));
        // Encoding refuses the same mistakes.
        let publish = |qos, pid, dup, topic| {
            Packet::Publish(Publish {
                dup,
                qos,
                retain: false,
                topic,
                pid,
                payload: b"",
            })
            .encoded_len()
        };
        assert_eq!(
            publish(QoS::AtMostOnce, 1, false, "t"),
            Err(EncodeError::InvalidPublishFlags)
        );
        assert_eq!(
            publish(QoS::AtMostOnce, 0, true, "t"),
            Err(EncodeError::InvalidPublishFlags)
        );
        assert_eq!(
            publish(QoS::AtLeastOnce, 0, false, "t"),
            Err(EncodeError::ZeroPacketId)
        );
        assert_eq!(
            publish(QoS::AtLeastOnce, 1, false, "a/+"),
            Err(EncodeError::InvalidTopic)
        );
        let empty = Packet::Subscribe(Subscribe {
            pid: 1,
            topics: Topics::List(&[]),
        });
        assert_eq!(empty.encoded_len(), Err(EncodeError::NoTopics));
        let mut small = [0u8; 3];
        assert_eq!(
            Packet::PubAck { pid: 1 }.encode(&mut small),
            Err(EncodeError::BufferTooSmall { needed: 4 })
        );
    }

    #[test]
    fn topic_rules() {
        assert!(valid_topic_filter("nodes/+/information"));
        assert!(valid_topic_filter("#") && valid_topic_filter("a/#") && valid_topic_filter("+"));
        assert!(
            !valid_topic_filter("a/#/b") && !valid_topic_filter("a+") && !valid_topic_filter("")
        );
        assert!(
            valid_topic_name("nodes/a/job") && !valid_topic_name("a/+") && !valid_topic_name("")
        );
        assert!(topic_matches("nodes/+/information", "nodes/n1/information"));
        assert!(!topic_matches("nodes/+/information", "nodes/n1/job"));
        assert!(topic_matches("nodes/#", "nodes/n1/net/subnet"));
        assert!(topic_matches("nodes/#", "nodes"));
        assert!(topic_matches("a/+", "a/"));
        assert!(!topic_matches("#", "$SYS/broker"));
        assert!(!topic_matches("a/b", "a/b/c"));
    }

    /// Deterministic pseudo-random inputs: decode must never panic, and whatever it accepts
    /// must re-encode to the same bytes (modulo non-minimal length encodings, excluded here).
    #[test]
    fn hostile_bytes_never_panic() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let valid: Vec<Vec<u8>> = samples().iter().map(encode_vec).collect();
        let mut buf = Vec::new();
        for i in 0..60_000 {
            buf.clear();
            if i % 2 == 0 {
                // Mutated valid packets reach deep into each parser.
                buf.extend_from_slice(&valid[(next() as usize) % valid.len()]);
                let flips = 1 + next() % 4;
                for _ in 0..flips {
                    let at = (next() as usize) % buf.len();
                    buf[at] ^= 1 << (next() % 8);
                }
            } else {
                let len = (next() % 40) as usize;
                buf.extend((0..len).map(|_| next() as u8));
            }
            if let Ok(Some((p, n))) = decode(&buf, 1 << 17) {
                let again = encode_vec(&p);
                if buf[1] & 0x80 == 0 || again.len() == n {
                    assert_eq!(again, buf[..n], "re-encode of {p:?}");
                }
            }
        }
        // Every two-byte input.
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                let _ = decode(&[a, b], MAX);
            }
        }
    }
}
