//! HPACK Huffman decoding (RFC 7541 §5.2, Appendix B).
//!
//! The Appendix B code is canonical: codes of one length are consecutive and ordered by symbol
//! value, and each length starts at `(last code of the previous length + 1) << gap`. So the RFC
//! table is fully determined by its bit-length column, which is all we store; the codes are
//! derived at compile time and checked against the RFC's explicit codes in the tests. We only
//! decode (our encoder sends raw literals, which every peer must accept).

/// Bit length of the code of each symbol 0..=255 and EOS (256), RFC 7541 Appendix B.
const CODE_LEN: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, // 0x00
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, // 0x10
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, // ' ' .. '/'
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, // '0' .. '?'
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, // '@' .. 'O'
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, // 'P' .. '_'
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, // '`' .. 'o'
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, // 'p' .. 0x7f
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, // 0x80
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, // 0x90
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, // 0xa0
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, // 0xb0
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, // 0xc0
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, // 0xd0
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, // 0xe0
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, // 0xf0
    30, // EOS
];

const MAX_LEN: usize = 30;
const EOS: u16 = 256;

/// Canonical-code decoding tables, built at compile time from `CODE_LEN`.
struct Tables {
    /// Symbols ordered by (length, value).
    sorted: [u16; 257],
    /// Number of codes of each length.
    count: [u16; MAX_LEN + 1],
    /// First code of each length.
    first: [u32; MAX_LEN + 1],
    /// Index in `sorted` of the first symbol of each length.
    offset: [u16; MAX_LEN + 1],
}

const TABLES: Tables = build();

const fn build() -> Tables {
    let mut count = [0u16; MAX_LEN + 1];
    let mut i = 0;
    while i < 257 {
        count[CODE_LEN[i] as usize] += 1;
        i += 1;
    }
    let mut first = [0u32; MAX_LEN + 1];
    let mut offset = [0u16; MAX_LEN + 1];
    let mut code = 0u32;
    let mut off = 0u16;
    let mut len = 1;
    while len <= MAX_LEN {
        first[len] = code;
        offset[len] = off;
        code = (code + count[len] as u32) << 1;
        off += count[len];
        len += 1;
    }
    let mut sorted = [0u16; 257];
    let mut next = offset;
    let mut sym = 0;
    while sym < 257 {
        let l = CODE_LEN[sym] as usize;
        sorted[next[l] as usize] = sym as u16;
        next[l] += 1;
        sym += 1;
    }
    Tables {
        sorted,
        count,
        first,
        offset,
    }
}

/// The code of `sym` as (bits, length); used by tests and by the test-only encoder.
#[cfg(test)]
pub(crate) fn code_of(sym: u16) -> (u32, u8) {
    let len = CODE_LEN[sym as usize];
    let t = &TABLES;
    let base = t.offset[len as usize] as usize;
    let pos = t.sorted[base..base + t.count[len as usize] as usize]
        .iter()
        .position(|&s| s == sym)
        .unwrap_or(0);
    (t.first[len as usize] + pos as u32, len)
}

/// Test-only encoder, for round trips.
#[cfg(test)]
pub(crate) fn encode(input: &[u8], out: &mut Vec<u8>) {
    let (mut acc, mut bits) = (0u64, 0u32);
    for &b in input {
        let (code, len) = code_of(b as u16);
        acc = (acc << len) | code as u64;
        bits += len as u32;
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if bits > 0 {
        // Pad with the most significant bits of EOS (all ones).
        out.push(((acc << (8 - bits)) | (0xff >> bits)) as u8);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The string contains the EOS symbol, which RFC 7541 §5.2 forbids.
    Eos,
    /// More than 7 bits of padding, or padding that is not a prefix of EOS (not all ones).
    BadPadding,
}

/// Appends the decoding of `input` to `out`. Output grows by at most `input.len() * 8 / 5`
/// bytes (the shortest code is 5 bits), so the caller bounds memory by bounding the input.
pub fn decode(input: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
    let t = &TABLES;
    let mut code = 0u32;
    let mut len = 0usize;
    for &byte in input {
        for shift in (0..8).rev() {
            code = (code << 1) | ((byte >> shift) & 1) as u32;
            len += 1;
            let idx = code.wrapping_sub(t.first[len]);
            if idx < t.count[len] as u32 {
                let sym = t.sorted[t.offset[len] as usize + idx as usize];
                if sym == EOS {
                    return Err(Error::Eos);
                }
                out.push(sym as u8);
                code = 0;
                len = 0;
            } else if len >= MAX_LEN {
                // Unreachable for a complete code, kept so that `len` can never index past
                // the tables whatever the input.
                return Err(Error::Eos);
            }
        }
    }
    // What is left must be a prefix of EOS (all ones) and shorter than a byte (§5.2).
    if len > 7 || code != (1u32 << len) - 1 {
        return Err(Error::BadPadding);
    }
    Ok(())
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

    fn dec(input: &[u8]) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        decode(input, &mut out).map(|()| out)
    }

    #[test]
    fn derived_codes_match_rfc_appendix_b() {
        // The code column of RFC 7541 Appendix B, symbols 0..=255 (EOS checked below).
        const RFC_CODES: [u32; 256] = [
            0x1ff8, 0x7fffd8, 0xfffffe2, 0xfffffe3, 0xfffffe4, 0xfffffe5, 0xfffffe6, 0xfffffe7,
            0xfffffe8, 0xffffea, 0x3ffffffc, 0xfffffe9, 0xfffffea, 0x3ffffffd, 0xfffffeb,
            0xfffffec, 0xfffffed, 0xfffffee, 0xfffffef, 0xffffff0, 0xffffff1, 0xffffff2,
            0x3ffffffe, 0xffffff3, 0xffffff4, 0xffffff5, 0xffffff6, 0xffffff7, 0xffffff8,
            0xffffff9, 0xffffffa, 0xffffffb, 0x14, 0x3f8, 0x3f9, 0xffa, 0x1ff9, 0x15, 0xf8, 0x7fa,
            0x3fa, 0x3fb, 0xf9, 0x7fb, 0xfa, 0x16, 0x17, 0x18, 0x0, 0x1, 0x2, 0x19, 0x1a, 0x1b,
            0x1c, 0x1d, 0x1e, 0x1f, 0x5c, 0xfb, 0x7ffc, 0x20, 0xffb, 0x3fc, 0x1ffa, 0x21, 0x5d,
            0x5e, 0x5f, 0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x6b,
            0x6c, 0x6d, 0x6e, 0x6f, 0x70, 0x71, 0x72, 0xfc, 0x73, 0xfd, 0x1ffb, 0x7fff0, 0x1ffc,
            0x3ffc, 0x22, 0x7ffd, 0x3, 0x23, 0x4, 0x24, 0x5, 0x25, 0x26, 0x27, 0x6, 0x74, 0x75,
            0x28, 0x29, 0x2a, 0x7, 0x2b, 0x76, 0x2c, 0x8, 0x9, 0x2d, 0x77, 0x78, 0x79, 0x7a, 0x7b,
            0x7ffe, 0x7fc, 0x3ffd, 0x1ffd, 0xffffffc, 0xfffe6, 0x3fffd2, 0xfffe7, 0xfffe8,
            0x3fffd3, 0x3fffd4, 0x3fffd5, 0x7fffd9, 0x3fffd6, 0x7fffda, 0x7fffdb, 0x7fffdc,
            0x7fffdd, 0x7fffde, 0xffffeb, 0x7fffdf, 0xffffec, 0xffffed, 0x3fffd7, 0x7fffe0,
            0xffffee, 0x7fffe1, 0x7fffe2, 0x7fffe3, 0x7fffe4, 0x1fffdc, 0x3fffd8, 0x7fffe5,
            0x3fffd9, 0x7fffe6, 0x7fffe7, 0xffffef, 0x3fffda, 0x1fffdd, 0xfffe9, 0x3fffdb,
            0x3fffdc, 0x7fffe8, 0x7fffe9, 0x1fffde, 0x7fffea, 0x3fffdd, 0x3fffde, 0xfffff0,
            0x1fffdf, 0x3fffdf, 0x7fffeb, 0x7fffec, 0x1fffe0, 0x1fffe1, 0x3fffe0, 0x1fffe2,
            0x7fffed, 0x3fffe1, 0x7fffee, 0x7fffef, 0xfffea, 0x3fffe2, 0x3fffe3, 0x3fffe4,
            0x7ffff0, 0x3fffe5, 0x3fffe6, 0x7ffff1, 0x3ffffe0, 0x3ffffe1, 0xfffeb, 0x7fff1,
            0x3fffe7, 0x7ffff2, 0x3fffe8, 0x1ffffec, 0x3ffffe2, 0x3ffffe3, 0x3ffffe4, 0x7ffffde,
            0x7ffffdf, 0x3ffffe5, 0xfffff1, 0x1ffffed, 0x7fff2, 0x1fffe3, 0x3ffffe6, 0x7ffffe0,
            0x7ffffe1, 0x3ffffe7, 0x7ffffe2, 0xfffff2, 0x1fffe4, 0x1fffe5, 0x3ffffe8, 0x3ffffe9,
            0xffffffd, 0x7ffffe3, 0x7ffffe4, 0x7ffffe5, 0xfffec, 0xfffff3, 0xfffed, 0x1fffe6,
            0x3fffe9, 0x1fffe7, 0x1fffe8, 0x7ffff3, 0x3fffea, 0x3fffeb, 0x1ffffee, 0x1ffffef,
            0xfffff4, 0xfffff5, 0x3ffffea, 0x7ffff4, 0x3ffffeb, 0x7ffffe6, 0x3ffffec, 0x3ffffed,
            0x7ffffe7, 0x7ffffe8, 0x7ffffe9, 0x7ffffea, 0x7ffffeb, 0xffffffe, 0x7ffffec, 0x7ffffed,
            0x7ffffee, 0x7ffffef, 0x7fffff0, 0x3ffffee,
        ];
        for (sym, &code) in RFC_CODES.iter().enumerate() {
            assert_eq!(code_of(sym as u16), (code, CODE_LEN[sym]), "symbol {sym}");
        }
        assert_eq!(code_of(EOS), (0x3fffffff, 30));
        // The length histogram of Appendix B.
        let t = &TABLES;
        let hist: Vec<(usize, u16)> = (1..=MAX_LEN)
            .filter(|&l| t.count[l] > 0)
            .map(|l| (l, t.count[l]))
            .collect();
        assert_eq!(
            hist,
            vec![
                (5, 10),
                (6, 26),
                (7, 32),
                (8, 6),
                (10, 5),
                (11, 3),
                (12, 2),
                (13, 6),
                (14, 2),
                (15, 3),
                (19, 3),
                (20, 8),
                (21, 13),
                (22, 26),
                (23, 29),
                (24, 12),
                (25, 4),
                (26, 15),
                (27, 19),
                (28, 29),
                (30, 4)
            ]
        );
        // Canonical codes of the longest length end exactly at all ones (a complete code).
        assert_eq!(t.first[30] + t.count[30] as u32 - 1, 0x3fffffff);
    }

    #[test]
    fn rfc_c4_and_c6_strings() {
        let cases: &[(&str, &str)] = &[
            ("f1e3 c2e5 f23a 6ba0 ab90 f4ff", "www.example.com"),
            ("a8eb 1064 9cbf", "no-cache"),
            ("25a8 49e9 5ba9 7d7f", "custom-key"),
            ("25a8 49e9 5bb8 e8b4 bf", "custom-value"),
            ("6402", "302"),
            ("aec3 771a 4b", "private"),
            ("d07a be94 1054 d444 a820 0595 040b 8166 e082 a62d 1bff", "Mon, 21 Oct 2013 20:13:21 GMT"),
            ("9d29 ad17 1863 c78f 0b97 c8e9 ae82 ae43 d3", "https://www.example.com"),
            ("640e ff", "307"),
            ("d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff", "Mon, 21 Oct 2013 20:13:22 GMT"),
            ("9bd9 ab", "gzip"),
            (
                "94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
                "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
            ),
        ];
        for (h, s) in cases {
            assert_eq!(dec(&hex(h)).unwrap(), s.as_bytes(), "{s}");
            let mut enc = Vec::new();
            encode(s.as_bytes(), &mut enc);
            assert_eq!(enc, hex(h), "encode {s}");
        }
    }

    #[test]
    fn round_trip_every_byte_value() {
        let all: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        for n in [0, 1, 2, 3, 7, 100, all.len()] {
            let mut enc = Vec::new();
            encode(&all[..n], &mut enc);
            assert_eq!(dec(&enc).unwrap(), &all[..n]);
        }
    }

    #[test]
    fn eos_and_padding_errors() {
        // EOS encoded explicitly (30 ones) then padding: forbidden.
        assert_eq!(dec(&[0xff, 0xff, 0xff, 0xff]), Err(Error::Eos));
        // 'a' (00011) + 3 one-bits of padding is fine; a zero in the padding is not.
        assert_eq!(dec(&[0x1f]).unwrap(), b"a");
        assert_eq!(dec(&[0x1e]), Err(Error::BadPadding));
        // A whole byte of ones after a symbol is > 7 bits of padding.
        assert_eq!(dec(&[0x1f, 0xff]), Err(Error::BadPadding));
        // 8 one-bits alone: padding longer than 7 bits.
        assert_eq!(dec(&[0xff]), Err(Error::BadPadding));
        // Empty input decodes to nothing.
        assert_eq!(dec(&[]).unwrap(), b"");
    }
}
