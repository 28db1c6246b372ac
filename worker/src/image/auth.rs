//! Anonymous bearer-token auth as Docker Hub does it (spec §6.3): parse the registry's
//! `WWW-Authenticate` challenge, build the token request, read the token answer, and keep
//! tokens per scope until they expire. Pure: the HTTP calls live in `pull`. No credentials.

use serde::Deserialize;
use std::time::{Duration, Instant};

/// One `WWW-Authenticate` challenge: `Bearer realm="…",service="…",scope="…"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lower-cased scheme (`bearer`, `basic`).
    pub scheme: String,
    pub params: Vec<(String, String)>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Parses a header value holding one or more challenges (RFC 7235 §4.1). Quoted values may
/// contain commas and `\"`; a token followed by a space and not by `=` starts a new challenge.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let b = header.as_bytes();
    let mut out: Vec<Challenge> = Vec::new();
    let mut i = 0;
    let skip = |i: &mut usize, set: &[u8]| {
        while *i < b.len() && set.contains(&b[*i]) {
            *i += 1;
        }
    };
    let token = |i: &mut usize| {
        let s = *i;
        while *i < b.len() && !b" \t,=\"".contains(&b[*i]) {
            *i += 1;
        }
        &header[s..*i]
    };
    loop {
        skip(&mut i, b" \t,");
        if i >= b.len() {
            return out;
        }
        let word = token(&mut i);
        if word.is_empty() {
            // Stray character (a quote where a name belongs): skip it rather than loop.
            i += 1;
            continue;
        }
        let mut j = i;
        skip(&mut j, b" \t");
        if j < b.len() && b[j] == b'=' {
            // `name=value` of the current challenge.
            i = j + 1;
            skip(&mut i, b" \t");
            let value = if i < b.len() && b[i] == b'"' {
                i += 1;
                let mut v = String::new();
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    // Push whole UTF-8 characters (headers are ASCII in practice).
                    let ch_len = header[i..].chars().next().map_or(1, char::len_utf8);
                    v.push_str(&header[i..i + ch_len]);
                    i += ch_len;
                }
                i += 1; // closing quote (or end)
                v
            } else {
                token(&mut i).to_owned()
            };
            if let Some(c) = out.last_mut() {
                c.params.push((word.to_ascii_lowercase(), value));
            }
        } else {
            out.push(Challenge {
                scheme: word.to_ascii_lowercase(),
                params: Vec::new(),
            });
        }
    }
}

/// The token endpoint's answer (`token`, or the OAuth2 `access_token`).
#[derive(Debug, Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: String,
    #[serde(default)]
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// Docker's token spec: a token without `expires_in` lasts 60 s.
const DEFAULT_TTL: u64 = 60;
/// Refresh this much before the expiry the server announced (clock skew, slow requests).
const MARGIN: Duration = Duration::from_secs(10);

pub fn parse_token(body: &[u8]) -> Result<(String, Duration), String> {
    let a: TokenAnswer = serde_json::from_slice(body)
        .map_err(|e| format!("token endpoint answered something that is not a token: {e}"))?;
    let t = if a.token.is_empty() {
        a.access_token
    } else {
        a.token
    };
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("token endpoint answered without a usable token".into());
    }
    Ok((
        t,
        Duration::from_secs(a.expires_in.unwrap_or(DEFAULT_TTL).max(1)),
    ))
}

/// `realm?service=…&scope=…`, values percent-encoded.
pub fn token_url(ch: &Challenge, fallback_scope: &str) -> Result<String, String> {
    let realm = ch
        .param("realm")
        .ok_or("the Bearer challenge has no realm")?;
    let mut url = realm.to_owned();
    let mut sep = if realm.contains('?') { '&' } else { '?' };
    if let Some(service) = ch.param("service") {
        url.push(sep);
        url.push_str("service=");
        percent_encode(service, &mut url);
        sep = '&';
    }
    // The scope in the challenge is what the registry wants; fall back to our own guess.
    let scope = ch.param("scope").unwrap_or(fallback_scope);
    if !scope.is_empty() {
        url.push(sep);
        url.push_str("scope=");
        percent_encode(scope, &mut url);
    }
    Ok(url)
}

fn percent_encode(s: &str, out: &mut String) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// Tokens by (registry host, repository), bounded: a full cache evicts the entry expiring
/// first. Tokens are scoped to one repository (spec §6.3), so the key is the repository.
pub struct TokenCache {
    entries: Vec<Entry>,
    capacity: usize,
}

struct Entry {
    key: String,
    token: String,
    expires: Instant,
}

impl TokenCache {
    pub fn new(capacity: usize) -> TokenCache {
        TokenCache {
            entries: Vec::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn key(host: &str, repository: &str) -> String {
        format!("{host}/{repository}")
    }

    pub fn get(&self, key: &str, now: Instant) -> Option<&str> {
        self.entries
            .iter()
            .find(|e| e.key == key && now < e.expires)
            .map(|e| e.token.as_str())
    }

    pub fn put(&mut self, key: &str, token: String, ttl: Duration, now: Instant) {
        let expires = now + ttl.saturating_sub(MARGIN).max(Duration::from_secs(1));
        self.entries.retain(|e| e.key != key && now < e.expires);
        if self.entries.len() >= self.capacity {
            if let Some(i) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.expires)
                .map(|(i, _)| i)
            {
                self.entries.swap_remove(i);
            }
        }
        self.entries.push(Entry {
            key: key.to_owned(),
            token,
            expires,
        });
    }

    /// After a 401 with a token we thought valid.
    pub fn forget(&mut self, key: &str) {
        self.entries.retain(|e| e.key != key);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_challenge() {
        let h = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#;
        let c = parse_challenges(h);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c[0].param("Service"), Some("registry.docker.io"));
        assert_eq!(
            token_url(&c[0], "").unwrap(),
            "https://auth.docker.io/token?service=registry.docker.io&scope=repository%3Alibrary%2Falpine%3Apull"
        );
    }

    #[test]
    fn quoted_commas_escapes_and_several_challenges() {
        let h = r#"Bearer realm="http://t/tok?a=1",scope="repository:a/b:pull,push", error="insufficient_scope", Basic realm="say \"hi\", ok""#;
        let c = parse_challenges(h);
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c[0].param("scope"), Some("repository:a/b:pull,push"));
        assert_eq!(c[0].param("error"), Some("insufficient_scope"));
        assert_eq!(c[1].scheme, "basic");
        assert_eq!(c[1].param("realm"), Some(r#"say "hi", ok"#));
        // Realm with a query, no service, scope from the caller.
        let c = parse_challenges(r#"Bearer realm="http://t/tok?a=1""#);
        assert_eq!(
            token_url(&c[0], "repository:x:pull").unwrap(),
            "http://t/tok?a=1&scope=repository%3Ax%3Apull"
        );
        // Unquoted values, odd spacing, garbage.
        let c = parse_challenges("bearer  realm = https://r/t ,service=s");
        assert_eq!(c[0].param("realm"), Some("https://r/t"));
        assert_eq!(c[0].param("service"), Some("s"));
        assert!(parse_challenges("").is_empty());
        assert_eq!(parse_challenges("\"\"\",,=").len(), 0);
        assert!(token_url(&parse_challenges("Bearer service=x")[0], "").is_err());
    }

    #[test]
    fn token_answers() {
        let (t, ttl) = parse_token(br#"{"token":"abc","expires_in":300,"issued_at":"x"}"#).unwrap();
        assert_eq!((t.as_str(), ttl.as_secs()), ("abc", 300));
        let (t, ttl) = parse_token(br#"{"access_token":"xyz"}"#).unwrap();
        assert_eq!((t.as_str(), ttl.as_secs()), ("xyz", 60));
        assert!(parse_token(br#"{"token":""}"#).is_err());
        assert!(
            parse_token(b"{\"token\":\"a\\nb\"}").is_err(),
            "header injection"
        );
        assert!(parse_token(b"<html>").is_err());
    }

    #[test]
    fn cache_expiry_and_bound() {
        let now = Instant::now();
        let mut c = TokenCache::new(2);
        let k1 = TokenCache::key("r", "a");
        c.put(&k1, "t1".into(), Duration::from_secs(300), now);
        assert_eq!(c.get(&k1, now + Duration::from_secs(200)), Some("t1"));
        // Refreshed MARGIN before the announced expiry.
        assert_eq!(c.get(&k1, now + Duration::from_secs(295)), None);
        c.put("k2", "t2".into(), Duration::from_secs(100), now);
        c.put("k3", "t3".into(), Duration::from_secs(500), now);
        assert_eq!(c.len(), 2);
        assert_eq!(
            c.get("k2", now),
            None,
            "the entry expiring first was evicted"
        );
        assert_eq!(c.get("k3", now), Some("t3"));
        c.forget("k3");
        assert_eq!(c.get("k3", now), None);
        // A short TTL still lives at least a second.
        c.put("k4", "t4".into(), Duration::from_secs(5), now);
        assert_eq!(c.get("k4", now), Some("t4"));
    }
}
