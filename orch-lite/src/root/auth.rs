//! Authentication cores: HS256 JWTs with upstream's claim names (spec §2.1), PBKDF2-HMAC-SHA256
//! password hashes, constant-time comparison. Pure functions of (key, input, now); the key's
//! storage and the HTTP edge live elsewhere. HS256 instead of upstream's RS256: the dashboard
//! never checks signatures and the CLI treats tokens as opaque, and only the root verifies.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// Upstream's access-token lifetime (flask-jwt-extended default used by jwt_generator).
pub const ACCESS_TTL_SECS: i64 = 10 * 60;
/// Upstream's refresh lifetime is the library default, 30 days (spec §11, uncertain).
pub const REFRESH_TTL_SECS: i64 = 30 * 24 * 3600;
/// Tolerated clock difference for `nbf`/`iat` (tokens minted on this host, so a few seconds).
const LEEWAY_SECS: i64 = 5;
/// PBKDF2 rounds for new hashes; stored with each hash, so raising it later keeps old ones valid.
/// 20 000 keeps a login under ~0.1 s on a Raspberry Pi 3 while costing an offline guesser a lot.
pub const PBKDF2_ROUNDS: u32 = 20_000;

// ---------------------------------------------------------------- primitives

pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    // RFC 2104 with SHA-256's 64-byte block.
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// PBKDF2-HMAC-SHA256 (RFC 8018) with one 32-byte output block.
pub fn pbkdf2_sha256(password: &[u8], salt: &[u8], rounds: u32) -> [u8; 32] {
    let mut msg = salt.to_vec();
    msg.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac_sha256(password, &msg);
    let mut out = u;
    for _ in 1..rounds.max(1) {
        u = hmac_sha256(password, &u);
        out.iter_mut().zip(u).for_each(|(o, x)| *o ^= x);
    }
    out
}

/// Equality that takes the same time wherever the inputs differ (signatures, hashes, tokens).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// base64url without padding (RFC 7515 §2).
pub fn b64url(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

pub fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| B64.iter().position(|&x| x == c).map(|v| v as u32);
    let bytes = s.as_bytes();
    if bytes.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c)? << (18 - 6 * i);
        }
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

// ---------------------------------------------------------------- passwords

/// `pbkdf2-sha256$<rounds>$<salt b64url>$<hash b64url>`.
pub fn hash_password(password: &str, salt: &[u8], rounds: u32) -> String {
    let h = pbkdf2_sha256(password.as_bytes(), salt, rounds);
    format!("pbkdf2-sha256${rounds}${}${}", b64url(salt), b64url(&h))
}

pub fn verify_password(password: &str, stored: &str) -> bool {
    let parts: Vec<&str> = stored.split('$').collect();
    let [scheme, rounds, salt, hash] = parts.as_slice() else {
        return false;
    };
    let (Ok(rounds), Some(salt), Some(hash)) = (
        rounds.parse::<u32>(),
        b64url_decode(salt),
        b64url_decode(hash),
    ) else {
        return false;
    };
    *scheme == "pbkdf2-sha256"
        && (1..=10_000_000).contains(&rounds)
        && ct_eq(&pbkdf2_sha256(password.as_bytes(), &salt, rounds), &hash)
}

// ---------------------------------------------------------------- JWT

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    Access,
    Refresh,
}

/// The claims upstream's jwt_generator puts in both token kinds (spec §2.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
    #[serde(rename = "type")]
    pub kind: TokenKind,
    pub fresh: bool,
    pub user: String,
    pub roles: Vec<String>,
    pub organization: String,
}

impl Claims {
    pub fn new(
        kind: TokenKind,
        user: &str,
        roles: &[String],
        organization: &str,
        now: i64,
        ttl: i64,
        jti: String,
    ) -> Claims {
        Claims {
            sub: user.into(),
            iat: now,
            nbf: now,
            exp: now + ttl,
            jti,
            kind,
            fresh: false,
            user: user.into(),
            roles: roles.to_vec(),
            organization: organization.into(),
        }
    }

    pub fn is_admin(&self) -> bool {
        self.roles.iter().any(|r| r == "Admin")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum TokenError {
    Malformed(&'static str),
    Signature,
    Expired { exp: i64, now: i64 },
    NotYetValid,
    WrongKind { expected: TokenKind },
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Malformed(why) => write!(
                f,
                "malformed token ({why}); log in again with POST /api/auth/login"
            ),
            TokenError::Signature => f.write_str(
                "token signature is invalid (issued by another server or altered); log in again",
            ),
            TokenError::Expired { exp, now } => write!(
                f,
                "token expired {}s ago; refresh it with POST /api/auth/refresh or log in again",
                now - exp
            ),
            TokenError::NotYetValid => f.write_str("token is not valid yet (clock skew?)"),
            TokenError::WrongKind {
                expected: TokenKind::Access,
            } => f.write_str(
                "a refresh token cannot be used here; send the access token (\"token\" from login)",
            ),
            TokenError::WrongKind {
                expected: TokenKind::Refresh,
            } => f.write_str(
                "this endpoint needs the refresh token (\"refresh_token\" from login) as Bearer",
            ),
        }
    }
}

const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

pub fn sign(key: &[u8], claims: &Claims) -> String {
    let payload = serde_json::to_vec(claims).unwrap_or_default();
    let signing_input = format!("{}.{}", b64url(HEADER.as_bytes()), b64url(&payload));
    let sig = hmac_sha256(key, signing_input.as_bytes());
    format!("{signing_input}.{}", b64url(&sig))
}

/// Checks signature, algorithm, time window and kind, in that order.
pub fn verify(
    key: &[u8],
    token: &str,
    now: i64,
    expected: TokenKind,
) -> Result<Claims, TokenError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed("not three dot-separated parts"));
    };
    let sig = b64url_decode(s).ok_or(TokenError::Malformed("signature is not base64url"))?;
    let expect = hmac_sha256(key, format!("{h}.{p}").as_bytes());
    if !ct_eq(&sig, &expect) {
        return Err(TokenError::Signature);
    }
    // The signature covers the header, so only our own header can get here; still refuse any
    // other algorithm rather than trusting that invariant.
    let header: serde_json::Value = b64url_decode(h)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(TokenError::Malformed("header is not JSON"))?;
    if header["alg"] != "HS256" {
        return Err(TokenError::Malformed("unsupported alg"));
    }
    let claims: Claims = b64url_decode(p)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(TokenError::Malformed("claims are not the expected JSON"))?;
    if now >= claims.exp {
        return Err(TokenError::Expired {
            exp: claims.exp,
            now,
        });
    }
    if now + LEEWAY_SECS < claims.nbf {
        return Err(TokenError::NotYetValid);
    }
    if claims.kind != expected {
        return Err(TokenError::WrongKind { expected });
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(kind: TokenKind, now: i64, ttl: i64) -> Claims {
        Claims::new(
            kind,
            "Admin",
            &["Admin".into()],
            "0123456789abcdef01234567",
            now,
            ttl,
            "j1".into(),
        )
    }

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        assert_eq!(
            crate::root::ids::hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Case 6: key longer than the block size.
        assert_eq!(
            crate::root::ids::hex(&hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn pbkdf2_matches_known_vector() {
        // RFC 7914 §11 (PBKDF2-HMAC-SHA256, "passwd"/"salt", c=1), first 32 bytes.
        assert_eq!(
            crate::root::ids::hex(&pbkdf2_sha256(b"passwd", b"salt", 1)),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        );
    }

    #[test]
    fn base64url_round_trips_every_length() {
        assert_eq!(b64url(b"\xfb\xff"), "-_8");
        for n in 0..40 {
            let data: Vec<u8> = (0..n as u8).map(|i| i.wrapping_mul(37)).collect();
            assert_eq!(b64url_decode(&b64url(&data)), Some(data));
        }
        assert_eq!(b64url_decode("a"), None);
        assert_eq!(b64url_decode("a=b+"), None);
    }

    #[test]
    fn password_hashes_verify_and_reject() {
        let h = hash_password("s3cret", b"0123456789abcdef", 1000);
        assert!(h.starts_with("pbkdf2-sha256$1000$"), "{h}");
        assert!(!h.contains("s3cret"));
        assert!(verify_password("s3cret", &h));
        assert!(!verify_password("s3cret ", &h));
        assert!(!verify_password("s3cret", "s3cret"));
        assert!(!verify_password("s3cret", "pbkdf2-sha256$0$AA$AA"));
    }

    #[test]
    fn jwt_round_trip_has_upstream_claims() {
        let key = b"k".repeat(32);
        let t = sign(&key, &claims(TokenKind::Access, 1000, ACCESS_TTL_SECS));
        assert_eq!(t.split('.').count(), 3);
        let payload: serde_json::Value =
            serde_json::from_slice(&b64url_decode(t.split('.').nth(1).unwrap()).unwrap()).unwrap();
        for k in [
            "sub",
            "iat",
            "nbf",
            "exp",
            "jti",
            "type",
            "fresh",
            "user",
            "roles",
            "organization",
        ] {
            assert!(payload.get(k).is_some(), "claim {k} missing: {payload}");
        }
        assert_eq!(payload["type"], "access");
        let c = verify(&key, &t, 1000 + 599, TokenKind::Access).unwrap();
        assert_eq!((c.sub.as_str(), c.exp), ("Admin", 1600));
        assert!(c.is_admin());
    }

    #[test]
    fn jwt_expiry_tamper_and_kind() {
        let key = b"k".repeat(32);
        let t = sign(&key, &claims(TokenKind::Access, 1000, 600));
        assert_eq!(
            verify(&key, &t, 1600, TokenKind::Access),
            Err(TokenError::Expired {
                exp: 1600,
                now: 1600
            })
        );
        assert_eq!(
            verify(&key, &t, 900, TokenKind::Access),
            Err(TokenError::NotYetValid)
        );
        assert_eq!(
            verify(b"other", &t, 1000, TokenKind::Access),
            Err(TokenError::Signature)
        );
        // Swap in claims with more roles, keep the signature.
        let mut forged = claims(TokenKind::Access, 1000, 600);
        forged.sub = "Mallory".into();
        let f = sign(b"attacker", &forged);
        let spliced = format!(
            "{}.{}.{}",
            t.split('.').next().unwrap(),
            f.split('.').nth(1).unwrap(),
            t.split('.').nth(2).unwrap()
        );
        assert_eq!(
            verify(&key, &spliced, 1000, TokenKind::Access),
            Err(TokenError::Signature)
        );
        assert!(matches!(
            verify(&key, "a.b", 1000, TokenKind::Access),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            verify(&key, "a.b.c.d", 1000, TokenKind::Access),
            Err(TokenError::Malformed(_))
        ));
        // Refresh and access tokens are not interchangeable.
        let r = sign(&key, &claims(TokenKind::Refresh, 1000, REFRESH_TTL_SECS));
        assert_eq!(
            verify(&key, &r, 1001, TokenKind::Access),
            Err(TokenError::WrongKind {
                expected: TokenKind::Access
            })
        );
        assert!(verify(&key, &r, 1001, TokenKind::Refresh).is_ok());
        assert_eq!(
            verify(&key, &t, 1001, TokenKind::Refresh),
            Err(TokenError::WrongKind {
                expected: TokenKind::Refresh
            })
        );
        assert!(TokenError::Expired { exp: 1, now: 2 }
            .to_string()
            .contains("/api/auth/refresh"));
    }
}
