//! Protocol buffers wire format (proto3), just enough for hand-written messages.
//!
//! Encoding appends to a caller-owned `Vec<u8>`; decoding walks a borrowed slice field by field
//! and never allocates or trusts a length beyond the bytes actually present. Unknown fields are
//! skipped (containerd 1.7 added some). No reflection, no groups (wire types 3/4 are refused).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    Truncated,
    VarintTooLong,
    BadWireType(u8),
    FieldZero,
    /// A field had the wrong wire type for its declared type.
    WrongType(u32),
    Utf8(u32),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Truncated => f.write_str("protobuf message truncated"),
            Error::VarintTooLong => f.write_str("protobuf varint longer than 10 bytes"),
            Error::BadWireType(t) => write!(f, "protobuf wire type {t} unsupported"),
            Error::FieldZero => f.write_str("protobuf field number 0"),
            Error::WrongType(n) => write!(f, "protobuf field {n} has an unexpected wire type"),
            Error::Utf8(n) => write!(f, "protobuf field {n} is not valid UTF-8"),
        }
    }
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

// ---------------------------------------------------------------- encoding

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(out, ((field as u64) << 3) | wire as u64);
}

/// uint32/uint64/int64/enum; proto3 omits zero. Negative int64 goes as 10-byte two's complement.
pub fn uint(out: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        key(out, field, VARINT);
        put_varint(out, v);
    }
}

pub fn int64(out: &mut Vec<u8>, field: u32, v: i64) {
    uint(out, field, v as u64);
}

pub fn boolean(out: &mut Vec<u8>, field: u32, v: bool) {
    uint(out, field, v as u64);
}

pub fn bytes(out: &mut Vec<u8>, field: u32, v: &[u8]) {
    if !v.is_empty() {
        key(out, field, LEN);
        put_varint(out, v.len() as u64);
        out.extend_from_slice(v);
    }
}

pub fn string(out: &mut Vec<u8>, field: u32, v: &str) {
    bytes(out, field, v.as_bytes());
}

/// Repeated strings must be emitted even when empty (an empty element is still an element).
pub fn repeated_string(out: &mut Vec<u8>, field: u32, v: &str) {
    key(out, field, LEN);
    put_varint(out, v.len() as u64);
    out.extend_from_slice(v.as_bytes());
}

/// An embedded message, always emitted (an empty sub-message is still "set"). The body is
/// written in place after a 1-byte length guess and shifted if the length needs more bytes,
/// so no temporary buffer is needed.
pub fn message(out: &mut Vec<u8>, field: u32, body: impl FnOnce(&mut Vec<u8>)) {
    key(out, field, LEN);
    let at = out.len();
    out.push(0);
    body(out);
    let len = out.len() - at - 1;
    let n = varint_len(len as u64);
    if n > 1 {
        out.splice(at + 1..at + 1, std::iter::repeat(0).take(n - 1));
    }
    let mut tmp = Vec::with_capacity(10);
    put_varint(&mut tmp, len as u64);
    out[at..at + n].copy_from_slice(&tmp);
}

/// One `map<string, string>` entry.
pub fn map_entry(out: &mut Vec<u8>, field: u32, k: &str, v: &str) {
    message(out, field, |m| {
        string(m, 1, k);
        string(m, 2, v);
    });
}

// ---------------------------------------------------------------- decoding

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// One decoded field: its number and value. Accessors check the wire type.
#[derive(Debug, Clone, Copy)]
pub struct Field<'a> {
    pub num: u32,
    pub value: Value<'a>,
}

impl<'a> Field<'a> {
    pub fn u64(&self) -> Result<u64, Error> {
        match self.value {
            Value::Varint(v) => Ok(v),
            _ => Err(Error::WrongType(self.num)),
        }
    }
    /// uint32 and enums: proto3 truncates to the low 32 bits.
    pub fn u32(&self) -> Result<u32, Error> {
        self.u64().map(|v| v as u32)
    }
    pub fn i64(&self) -> Result<i64, Error> {
        self.u64().map(|v| v as i64)
    }
    pub fn i32(&self) -> Result<i32, Error> {
        self.u64().map(|v| v as i32)
    }
    pub fn bool(&self) -> Result<bool, Error> {
        self.u64().map(|v| v != 0)
    }
    pub fn bytes(&self) -> Result<&'a [u8], Error> {
        match self.value {
            Value::Bytes(b) => Ok(b),
            _ => Err(Error::WrongType(self.num)),
        }
    }
    pub fn str(&self) -> Result<&'a str, Error> {
        std::str::from_utf8(self.bytes()?).map_err(|_| Error::Utf8(self.num))
    }
    pub fn string(&self) -> Result<String, Error> {
        self.str().map(str::to_owned)
    }
}

/// Iterates the fields of one message.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64, Error> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = *self.buf.get(self.pos).ok_or(Error::Truncated)?;
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Error::VarintTooLong)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(Error::Truncated)?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    pub fn next_field(&mut self) -> Result<Option<Field<'a>>, Error> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let k = self.varint()?;
        let num = u32::try_from(k >> 3).map_err(|_| Error::Truncated)?;
        if num == 0 {
            return Err(Error::FieldZero);
        }
        let value = match (k & 7) as u8 {
            VARINT => Value::Varint(self.varint()?),
            FIXED64 => {
                let b = self.take(8)?;
                Value::Fixed64(u64::from_le_bytes(
                    b.try_into().map_err(|_| Error::Truncated)?,
                ))
            }
            LEN => {
                let n = self.varint()?;
                let n = usize::try_from(n).map_err(|_| Error::Truncated)?;
                Value::Bytes(self.take(n)?)
            }
            FIXED32 => {
                let b = self.take(4)?;
                Value::Fixed32(u32::from_le_bytes(
                    b.try_into().map_err(|_| Error::Truncated)?,
                ))
            }
            t => return Err(Error::BadWireType(t)),
        };
        Ok(Some(Field { num, value }))
    }
}

/// Calls `f` for every field of `buf`; `f` ignores the numbers it does not know.
pub fn for_each<'a>(
    buf: &'a [u8],
    mut f: impl FnMut(Field<'a>) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut r = Reader::new(buf);
    while let Some(field) = r.next_field()? {
        f(field)?;
    }
    Ok(())
}

/// Decodes one `map<string, string>` entry.
pub fn map_entry_decode(buf: &[u8]) -> Result<(String, String), Error> {
    let (mut k, mut v) = (String::new(), String::new());
    for_each(buf, |f| {
        match f.num {
            1 => k = f.string()?,
            2 => v = f.string()?,
            _ => {}
        }
        Ok(())
    })?;
    Ok((k, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints() {
        for v in [
            0u64,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u32::MAX as u64,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
            let mut r = Reader::new(&out);
            assert_eq!(r.varint(), Ok(v));
        }
        let mut out = Vec::new();
        put_varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
        // -1 as int64 takes 10 bytes.
        let mut out = Vec::new();
        int64(&mut out, 1, -1);
        assert_eq!(out.len(), 11);
        let f = Reader::new(&out).next_field().unwrap().unwrap();
        assert_eq!(f.i64(), Ok(-1));
        // 11 continuation bytes.
        assert_eq!(Reader::new(&[0x80; 11]).varint(), Err(Error::VarintTooLong));
    }

    #[test]
    fn fields_round_trip_and_skip_unknown() {
        let mut out = Vec::new();
        string(&mut out, 1, "id");
        uint(&mut out, 2, 0); // omitted
        uint(&mut out, 3, 42);
        boolean(&mut out, 4, true);
        // Unknown fields of every supported wire type.
        key(&mut out, 20, FIXED64);
        out.extend_from_slice(&[0; 8]);
        key(&mut out, 21, FIXED32);
        out.extend_from_slice(&[0; 4]);
        bytes(&mut out, 22, b"zzz");
        message(&mut out, 5, |m| map_entry(m, 1, "k", "v"));
        let (mut id, mut n, mut b, mut kv, mut count) = (String::new(), 0, false, None, 0);
        for_each(&out, |f| {
            count += 1;
            match f.num {
                1 => id = f.string()?,
                3 => n = f.u64()?,
                4 => b = f.bool()?,
                5 => for_each(f.bytes()?, |e| {
                    kv = Some(map_entry_decode(e.bytes()?)?);
                    Ok(())
                })?,
                _ => {}
            }
            Ok(())
        })
        .unwrap();
        assert_eq!((id.as_str(), n, b, count), ("id", 42, true, 7));
        assert_eq!(kv, Some(("k".into(), "v".into())));
    }

    #[test]
    fn nested_message_length_shift() {
        for len in [0usize, 1, 127, 128, 16_383, 16_384, 200_000] {
            let mut out = vec![0xee];
            message(&mut out, 7, |m| m.resize(m.len() + len, 0x5a));
            let mut r = Reader::new(&out[1..]);
            let f = r.next_field().unwrap().unwrap();
            assert_eq!(f.num, 7);
            assert_eq!(f.bytes().unwrap().len(), len);
            assert!(f.bytes().unwrap().iter().all(|&b| b == 0x5a));
            assert!(matches!(r.next_field(), Ok(None)));
        }
    }

    #[test]
    fn truncated_and_malformed() {
        let mut out = Vec::new();
        string(&mut out, 1, "hello");
        for cut in 1..out.len() {
            assert_eq!(
                for_each(&out[..cut], |_| Ok(())),
                Err(Error::Truncated),
                "cut {cut}"
            );
        }
        // A length far beyond the buffer is refused without allocating.
        let mut huge = vec![0x0a];
        put_varint(&mut huge, u64::MAX >> 1);
        assert_eq!(for_each(&huge, |_| Ok(())), Err(Error::Truncated));
        assert_eq!(for_each(&[0x00, 0x01], |_| Ok(())), Err(Error::FieldZero));
        assert_eq!(for_each(&[0x0b], |_| Ok(())), Err(Error::BadWireType(3)));
        // Wrong type for a field.
        let f = Reader::new(&[0x08, 0x01]).next_field().unwrap().unwrap();
        assert_eq!(f.bytes(), Err(Error::WrongType(1)));
        let f = Reader::new(&[0x0a, 0x01, 0xff])
            .next_field()
            .unwrap()
            .unwrap();
        assert_eq!(f.str(), Err(Error::Utf8(1)));
    }
}
