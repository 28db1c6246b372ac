//! HPACK (RFC 7541): a full decoder and a trivial literal encoder.
//!
//! The decoder handles integers, the static table, Huffman strings, the dynamic table with size
//! updates and every literal form, because grpc-go indexes `content-type` and the gRPC trailers
//! in its dynamic table (spec §1.6). Memory is bounded: the table by the size we advertise, a
//! decoded header list by `max_list_size`. The encoder never indexes and never uses Huffman
//! ("literal without indexing, new name"), so there is no encoder state that could diverge.

use super::huffman;
use std::collections::VecDeque;

/// HEADER_TABLE_SIZE we advertise (the protocol default: we do not send the setting).
pub const DEFAULT_TABLE_SIZE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The block ended in the middle of a representation.
    Truncated,
    /// An integer does not fit in 32 bits.
    IntegerOverflow,
    /// Index 0 or past the end of the static + dynamic table.
    BadIndex,
    /// A size update above the size we allow, or after a header field (§4.2).
    BadSizeUpdate,
    /// The decoded header list is larger than the limit.
    ListTooLarge,
    Huffman(huffman::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Truncated => f.write_str("HPACK block truncated"),
            Error::IntegerOverflow => f.write_str("HPACK integer overflow"),
            Error::BadIndex => f.write_str("HPACK index out of range"),
            Error::BadSizeUpdate => f.write_str("HPACK invalid dynamic table size update"),
            Error::ListTooLarge => f.write_str("header list larger than our limit"),
            Error::Huffman(huffman::Error::Eos) => f.write_str("HPACK Huffman string contains EOS"),
            Error::Huffman(huffman::Error::BadPadding) => f.write_str("HPACK Huffman bad padding"),
        }
    }
}

/// RFC 7541 Appendix A.
static STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// Per-entry overhead of the dynamic table size accounting (§4.1).
const ENTRY_OVERHEAD: usize = 32;

pub struct Decoder {
    /// Newest entry first.
    table: Table,
    table_size: usize,
    /// Current maximum, set by size updates, never above `limit`.
    max_size: usize,
    /// The SETTINGS_HEADER_TABLE_SIZE we advertised.
    limit: usize,
    max_list_size: usize,
    // Scratch buffers for literal strings, reused across blocks.
    name: Vec<u8>,
    value: Vec<u8>,
}

impl Decoder {
    pub fn new(table_limit: usize, max_list_size: usize) -> Self {
        Decoder {
            table: VecDeque::new(),
            table_size: 0,
            max_size: table_limit,
            limit: table_limit,
            max_list_size,
            name: Vec::new(),
            value: Vec::new(),
        }
    }

    pub fn dynamic_entries(&self) -> usize {
        self.table.len()
    }

    /// Decodes one complete header block, calling `emit(name, value)` for each field in order.
    /// After an error the table state is undefined: the connection must be closed
    /// (COMPRESSION_ERROR, RFC 7540 §4.3).
    pub fn decode(
        &mut self,
        block: &[u8],
        mut emit: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), Error> {
        let mut pos = 0;
        let mut list_size = 0usize;
        let mut seen_field = false;
        while pos < block.len() {
            let b = block[pos];
            if b & 0x80 != 0 {
                // Indexed header field (§6.1).
                let idx = read_int(block, &mut pos, 7)?;
                let (n, v) = lookup(&self.table, idx)?;
                list_size += n.len() + v.len() + ENTRY_OVERHEAD;
                if list_size > self.max_list_size {
                    return Err(Error::ListTooLarge);
                }
                emit(n, v);
                seen_field = true;
                continue;
            }
            if b & 0xe0 == 0x20 {
                // Dynamic table size update (§6.3): only at the start of a block (§4.2).
                let size = read_int(block, &mut pos, 5)? as usize;
                if seen_field || size > self.limit {
                    return Err(Error::BadSizeUpdate);
                }
                self.max_size = size;
                self.evict(0);
                continue;
            }
            // Literal: with incremental indexing (01xxxxxx, 6-bit index), without indexing
            // (0000xxxx) or never indexed (0001xxxx); the last two differ only for proxies.
            let (prefix, index) = if b & 0x40 != 0 { (6, true) } else { (4, false) };
            let idx = read_int(block, &mut pos, prefix)?;
            self.name.clear();
            if idx == 0 {
                read_string(block, &mut pos, &mut self.name)?;
            } else {
                let (n, _) = lookup(&self.table, idx)?;
                self.name.extend_from_slice(n);
            }
            self.value.clear();
            read_string(block, &mut pos, &mut self.value)?;
            list_size += self.name.len() + self.value.len() + ENTRY_OVERHEAD;
            if list_size > self.max_list_size {
                return Err(Error::ListTooLarge);
            }
            emit(&self.name, &self.value);
            seen_field = true;
            if index {
                let size = self.name.len() + self.value.len() + ENTRY_OVERHEAD;
                self.evict(size);
                // An entry larger than the table empties it and is not added (§4.4).
                if size <= self.max_size {
                    let entry = (self.name.as_slice().into(), self.value.as_slice().into());
                    self.table.push_front(entry);
                    self.table_size += size;
                }
            }
        }
        Ok(())
    }

    /// Evicts oldest entries until `extra` more bytes fit under the current maximum.
    fn evict(&mut self, extra: usize) {
        while self.table_size + extra > self.max_size {
            match self.table.pop_back() {
                Some((n, v)) => self.table_size -= n.len() + v.len() + ENTRY_OVERHEAD,
                None => break,
            }
        }
    }

    #[cfg(test)]
    fn table_entries(&self) -> Vec<(String, String)> {
        self.table
            .iter()
            .map(|(n, v)| {
                (
                    String::from_utf8_lossy(n).into(),
                    String::from_utf8_lossy(v).into(),
                )
            })
            .collect()
    }
}

type Table = VecDeque<(Box<[u8]>, Box<[u8]>)>;

/// Looks up a static (1..=61) or dynamic (62.., newest first) index.
fn lookup(table: &Table, idx: u32) -> Result<(&[u8], &[u8]), Error> {
    let idx = idx as usize;
    if idx == 0 {
        return Err(Error::BadIndex);
    }
    if idx <= STATIC_TABLE.len() {
        let (n, v) = STATIC_TABLE[idx - 1];
        return Ok((n.as_bytes(), v.as_bytes()));
    }
    match table.get(idx - STATIC_TABLE.len() - 1) {
        Some((n, v)) => Ok((n, v)),
        None => Err(Error::BadIndex),
    }
}

/// Reads an integer with an N-bit prefix (§5.1). Values above u32 are refused: nothing we
/// decode (indexes, lengths, sizes) can legitimately be that large.
fn read_int(buf: &[u8], pos: &mut usize, prefix: u8) -> Result<u32, Error> {
    let mask = (1u32 << prefix) - 1;
    let first = *buf.get(*pos).ok_or(Error::Truncated)? as u32 & mask;
    *pos += 1;
    if first < mask {
        return Ok(first);
    }
    let mut value = mask as u64;
    let mut shift = 0;
    loop {
        let b = *buf.get(*pos).ok_or(Error::Truncated)?;
        *pos += 1;
        value += ((b & 0x7f) as u64) << shift;
        if value > u32::MAX as u64 {
            return Err(Error::IntegerOverflow);
        }
        if b & 0x80 == 0 {
            return Ok(value as u32);
        }
        shift += 7;
        if shift > 28 {
            return Err(Error::IntegerOverflow);
        }
    }
}

/// Reads a string literal (§5.2) into `out`. The length is checked against the block before
/// anything is copied, so the output is bounded by the block size (×8/5 for Huffman).
fn read_string(buf: &[u8], pos: &mut usize, out: &mut Vec<u8>) -> Result<(), Error> {
    let huff = buf.get(*pos).ok_or(Error::Truncated)? & 0x80 != 0;
    let len = read_int(buf, pos, 7)? as usize;
    let end = pos
        .checked_add(len)
        .filter(|&e| e <= buf.len())
        .ok_or(Error::Truncated)?;
    let raw = &buf[*pos..end];
    *pos = end;
    if huff {
        huffman::decode(raw, out).map_err(Error::Huffman)
    } else {
        out.extend_from_slice(raw);
        Ok(())
    }
}

/// Appends an integer with an N-bit prefix; `first` carries the representation's flag bits.
pub fn write_int(out: &mut Vec<u8>, mut value: usize, prefix: u8, first: u8) {
    let mask = (1usize << prefix) - 1;
    if value < mask {
        out.push(first | value as u8);
        return;
    }
    out.push(first | mask as u8);
    value -= mask;
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Appends "literal header field without indexing, new name", no Huffman (§6.2.2).
pub fn encode_literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0);
    write_int(out, name.len(), 7, 0);
    out.extend_from_slice(name.as_bytes());
    write_int(out, value.len(), 7, 0);
    out.extend_from_slice(value.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn decode(d: &mut Decoder, block: &[u8]) -> Result<Vec<(String, String)>, Error> {
        let mut out = Vec::new();
        d.decode(block, |n, v| {
            out.push((
                String::from_utf8_lossy(n).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            ))
        })?;
        Ok(out)
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn size(d: &Decoder) -> usize {
        d.table_size
    }

    #[test]
    fn rfc_c1_integers() {
        let mut out = Vec::new();
        write_int(&mut out, 10, 5, 0);
        assert_eq!(out, [0x0a]);
        out.clear();
        write_int(&mut out, 1337, 5, 0);
        assert_eq!(out, [0x1f, 0x9a, 0x0a]);
        out.clear();
        write_int(&mut out, 42, 8, 0);
        assert_eq!(out, [0x2a]);
        let mut pos = 0;
        assert_eq!(read_int(&[0x1f, 0x9a, 0x0a], &mut pos, 5), Ok(1337));
        assert_eq!(pos, 3);
        let mut pos = 0;
        assert_eq!(read_int(&[0x1f, 0x9a], &mut pos, 5), Err(Error::Truncated));
        let mut pos = 0;
        let big = [0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(read_int(&big, &mut pos, 5), Err(Error::IntegerOverflow));
    }

    #[test]
    fn rfc_c2_literal_forms() {
        // C.2.1 literal with indexing
        let mut d = Decoder::new(4096, 1 << 16);
        let b = hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572");
        assert_eq!(
            decode(&mut d, &b).unwrap(),
            pairs(&[("custom-key", "custom-header")])
        );
        assert_eq!(size(&d), 55);
        // C.2.2 without indexing, C.2.3 never indexed: no table change
        let mut d = Decoder::new(4096, 1 << 16);
        let b = hex("040c 2f73 616d 706c 652f 7061 7468");
        assert_eq!(
            decode(&mut d, &b).unwrap(),
            pairs(&[(":path", "/sample/path")])
        );
        let b = hex("1008 7061 7373 776f 7264 0673 6563 7265 74");
        assert_eq!(
            decode(&mut d, &b).unwrap(),
            pairs(&[("password", "secret")])
        );
        assert_eq!(size(&d), 0);
        // C.2.4 indexed
        assert_eq!(
            decode(&mut d, &[0x82]).unwrap(),
            pairs(&[(":method", "GET")])
        );
    }

    #[test]
    fn rfc_c3_requests_without_huffman() {
        let mut d = Decoder::new(4096, 1 << 16);
        let r1 = hex("8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d");
        assert_eq!(
            decode(&mut d, &r1).unwrap(),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ])
        );
        assert_eq!(size(&d), 57);
        let r2 = hex("8286 84be 5808 6e6f 2d63 6163 6865");
        assert_eq!(
            decode(&mut d, &r2).unwrap(),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache")
            ])
        );
        assert_eq!(size(&d), 110);
        let r3 = hex("8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65");
        assert_eq!(
            decode(&mut d, &r3).unwrap(),
            pairs(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value")
            ])
        );
        assert_eq!(size(&d), 164);
        assert_eq!(
            d.table_entries(),
            pairs(&[
                ("custom-key", "custom-value"),
                ("cache-control", "no-cache"),
                (":authority", "www.example.com")
            ])
        );
    }

    #[test]
    fn rfc_c4_requests_with_huffman() {
        let mut d = Decoder::new(4096, 1 << 16);
        let r1 = hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff");
        assert_eq!(
            decode(&mut d, &r1).unwrap(),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ])
        );
        let r2 = hex("8286 84be 5886 a8eb 1064 9cbf");
        assert_eq!(
            decode(&mut d, &r2).unwrap()[4],
            ("cache-control".into(), "no-cache".into())
        );
        assert_eq!(size(&d), 110);
        let r3 = hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf");
        assert_eq!(
            decode(&mut d, &r3).unwrap(),
            pairs(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value")
            ])
        );
        assert_eq!(size(&d), 164);
    }

    fn c5_c6_expected() -> [Vec<(String, String)>; 3] {
        [
            pairs(&[
                (":status", "302"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com"),
            ]),
            pairs(&[
                (":status", "307"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com"),
            ]),
            pairs(&[
                (":status", "200"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
                ("location", "https://www.example.com"),
                ("content-encoding", "gzip"),
                (
                    "set-cookie",
                    "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
                ),
            ]),
        ]
    }

    /// C.5 / C.6 use a 256-byte table, so entries are evicted.
    fn run_responses(blocks: [&str; 3]) {
        let mut d = Decoder::new(256, 1 << 16);
        let want = c5_c6_expected();
        assert_eq!(decode(&mut d, &hex(blocks[0])).unwrap(), want[0]);
        assert_eq!(size(&d), 222);
        assert_eq!(decode(&mut d, &hex(blocks[1])).unwrap(), want[1]);
        assert_eq!(size(&d), 222);
        assert_eq!(
            d.table_entries(),
            pairs(&[
                (":status", "307"),
                ("location", "https://www.example.com"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("cache-control", "private")
            ])
        );
        assert_eq!(decode(&mut d, &hex(blocks[2])).unwrap(), want[2]);
        assert_eq!(size(&d), 215);
        assert_eq!(
            d.table_entries(),
            pairs(&[
                (
                    "set-cookie",
                    "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
                ),
                ("content-encoding", "gzip"),
                ("date", "Mon, 21 Oct 2013 20:13:22 GMT")
            ])
        );
    }

    #[test]
    fn rfc_c5_responses_without_huffman() {
        run_responses([
            "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
            "4803 3330 37c1 c0bf",
            "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d 54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e 3d31",
        ]);
    }

    #[test]
    fn rfc_c6_responses_with_huffman() {
        run_responses([
            "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
            "4883 640e ffc1 c0bf",
            "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
        ]);
    }

    #[test]
    fn size_updates() {
        let mut d = Decoder::new(4096, 1 << 16);
        decode(
            &mut d,
            &hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572"),
        )
        .unwrap();
        assert_eq!(size(&d), 55);
        // Size update to 0 empties the table (what grpc-go sends after HEADER_TABLE_SIZE=0).
        assert_eq!(decode(&mut d, &[0x20]).unwrap(), vec![]);
        assert_eq!(size(&d), 0);
        assert_eq!(decode(&mut d, &[0xbe]), Err(Error::BadIndex));
        // Back up to the limit is fine, above it is not.
        let mut up = Vec::new();
        write_int(&mut up, 4096, 5, 0x20);
        assert!(decode(&mut d, &up).is_ok());
        let mut over = Vec::new();
        write_int(&mut over, 4097, 5, 0x20);
        assert_eq!(decode(&mut d, &over), Err(Error::BadSizeUpdate));
        // A size update after a field is an error (§4.2).
        assert_eq!(decode(&mut d, &[0x82, 0x20]), Err(Error::BadSizeUpdate));
    }

    #[test]
    fn oversized_entry_empties_table() {
        let mut d = Decoder::new(64, 1 << 16);
        decode(&mut d, &hex("4001 6101 62")).unwrap(); // a: b, 34 bytes
        assert_eq!(size(&d), 34);
        let mut b = vec![0x40, 0x01, b'x', 0x28];
        b.extend_from_slice(&[b'y'; 40]);
        decode(&mut d, &b).unwrap();
        assert_eq!(size(&d), 0);
        assert!(d.table_entries().is_empty());
    }

    #[test]
    fn malformed_blocks() {
        let mut d = Decoder::new(4096, 1 << 16);
        assert_eq!(decode(&mut d, &[0x80]), Err(Error::BadIndex));
        assert_eq!(decode(&mut d, &[0xbe]), Err(Error::BadIndex));
        assert_eq!(decode(&mut d, &[0x40, 0x05, b'a']), Err(Error::Truncated));
        assert_eq!(decode(&mut d, &[0x00, 0x01]), Err(Error::Truncated));
        assert_eq!(
            decode(&mut d, &[0x00, 0x81, 0x00, 0x00]),
            Err(Error::Huffman(huffman::Error::BadPadding))
        );
        // Header list cap.
        let mut d = Decoder::new(4096, 50);
        assert_eq!(decode(&mut d, &[0x82]).unwrap().len(), 1);
        assert_eq!(decode(&mut d, &[0x82, 0x82]), Err(Error::ListTooLarge));
    }

    #[test]
    fn literal_encoder_round_trip() {
        let mut out = Vec::new();
        encode_literal(
            &mut out,
            ":path",
            "/containerd.services.version.v1.Version/Version",
        );
        let long = "x".repeat(300);
        encode_literal(&mut out, "grpc-message", &long);
        let mut d = Decoder::new(4096, 1 << 16);
        let got = decode(&mut d, &out).unwrap();
        assert_eq!(
            got,
            pairs(&[
                (":path", "/containerd.services.version.v1.Version/Version"),
                ("grpc-message", &long)
            ])
        );
        assert_eq!(size(&d), 0);
    }
}
