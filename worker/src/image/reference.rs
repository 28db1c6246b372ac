//! Image references as Docker and containerd understand them: `nginx` is
//! `docker.io/library/nginx:latest`, fetched from `registry-1.docker.io`.
//! Pure parsing and normalisation; no I/O. Follows the distribution/reference grammar.

use std::fmt;

/// Docker Hub's name in image references, and the host its API really lives on (spec §6.1).
pub const DOCKER_HUB: &str = "docker.io";
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// distribution/reference's limit on the whole name (domain + path).
const NAME_MAX: usize = 255;
const TAG_MAX: usize = 128;

/// A parsed, normalised reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `docker.io`, `ghcr.io`, `localhost:5000`, `10.0.0.5:5000`.
    pub domain: String,
    /// Repository path, e.g. `library/nginx`, `oak/busybox`.
    pub path: String,
    pub tag: Option<String>,
    /// `sha256:<64 hex>`: the manifest or index to fetch, whatever the tag says.
    pub digest: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefError {
    pub input: String,
    pub reason: &'static str,
}

impl fmt::Display for RefError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid image reference {:?}: {} (expected e.g. nginx, nginx:1.25, ghcr.io/org/app:tag, host:5000/app@sha256:…)",
            self.input, self.reason
        )
    }
}

impl std::error::Error for RefError {}

impl Reference {
    /// Parses `[domain/]path[:tag][@digest]` and applies Docker's defaults: no domain means
    /// Docker Hub, a one-component Hub path gets `library/`, no tag and no digest means `latest`.
    pub fn parse(input: &str) -> Result<Reference, RefError> {
        let err = |reason| RefError {
            input: input.to_owned(),
            reason,
        };
        if input.is_empty() {
            return Err(err("empty"));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((r, d)) => (r, Some(d)),
            None => (input, None),
        };
        if let Some(d) = digest {
            if !valid_digest(d) {
                return Err(err(
                    "the digest must be sha256: followed by 64 lowercase hex digits",
                ));
            }
        }
        // A tag is after the last ':' that comes after the last '/' (a ':' before it is a port).
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag {
            if !valid_tag(t) {
                return Err(err(
                    "a tag is 1-128 of [A-Za-z0-9_.-] and starts with a letter, digit or _",
                ));
            }
        }
        if name.len() > NAME_MAX {
            return Err(err("the name is longer than 255 characters"));
        }
        // The first component is a registry host if it looks like one (docker's rule).
        let (domain, path) = match name.split_once('/') {
            Some((first, path))
                if first.contains(['.', ':'])
                    || first == "localhost"
                    || first.bytes().any(|b| b.is_ascii_uppercase()) =>
            {
                (first, path.to_owned())
            }
            _ => (DOCKER_HUB, name.to_owned()),
        };
        if !valid_domain(domain) {
            return Err(err("the registry host is not a valid host[:port]"));
        }
        let domain = if domain == "index.docker.io" {
            DOCKER_HUB
        } else {
            domain
        };
        if !valid_path(&path) {
            return Err(if path.bytes().any(|b| b.is_ascii_uppercase()) {
                err("repository names must be lowercase")
            } else {
                err("the repository path has an invalid component")
            });
        }
        let path = if domain == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let tag = match (tag, digest) {
            (None, None) => Some("latest".to_owned()),
            (t, _) => t.map(str::to_owned),
        };
        Ok(Reference {
            domain: domain.to_owned(),
            path,
            tag,
            digest: digest.map(str::to_owned),
        })
    }

    /// The host[:port] to talk HTTP to.
    pub fn api_host(&self) -> &str {
        if self.domain == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.domain
        }
    }

    /// `domain/path`, without tag or digest.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// What to ask `/v2/<path>/manifests/` for: the digest if there is one, else the tag.
    pub fn object(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }
}

/// The normalised name, as containerd stores it. Like containerd's `ParseDockerRef`, a
/// reference with both a tag and a digest keeps only the digest: the digest is what is pulled.
impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.domain, self.path)?;
        match (&self.digest, &self.tag) {
            (Some(d), _) => write!(f, "@{d}"),
            (None, Some(t)) => write!(f, ":{t}"),
            (None, None) => Ok(()),
        }
    }
}

/// `sha256:` + 64 lowercase hex: the only algorithm we can verify.
pub fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= TAG_MAX
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Host labels (letters, digits, inner '-'), dot-separated, optional `:port`; or `[v6]:port`.
fn valid_domain(d: &str) -> bool {
    let (host, port) = if let Some(v6) = d.strip_prefix('[') {
        match v6.split_once(']') {
            Some((addr, rest)) if addr.parse::<std::net::Ipv6Addr>().is_ok() => {
                return rest.is_empty() || rest.strip_prefix(':').is_some_and(valid_port);
            }
            _ => return false,
        }
    } else {
        match d.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (d, None),
        }
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    !host.is_empty() && host.split('.').all(label_ok) && port.map_or(true, valid_port)
}

fn valid_port(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 5
        && p.bytes().all(|b| b.is_ascii_digit())
        && p.parse::<u16>().is_ok()
}

/// Components of `[a-z0-9]+` joined by `.`, `_`, `__` or one or more `-`; separated by `/`.
fn valid_path(p: &str) -> bool {
    !p.is_empty() && p.split('/').all(valid_component)
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:2e7fd3d83ed641a2656cb36e5722fb7c435ec2e1aeafc711fcf461f034ece7b6";

    #[test]
    fn normalisation_table() {
        let at = format!("@{D}");
        let cases: &[(&str, &str, &str, &str)] = &[
            // input, normalised name, api host, object
            (
                "nginx",
                "docker.io/library/nginx:latest",
                "registry-1.docker.io",
                "latest",
            ),
            (
                "nginx:1.25",
                "docker.io/library/nginx:1.25",
                "registry-1.docker.io",
                "1.25",
            ),
            (
                "docker.io/nginx",
                "docker.io/library/nginx:latest",
                "registry-1.docker.io",
                "latest",
            ),
            (
                "index.docker.io/library/nginx",
                "docker.io/library/nginx:latest",
                "registry-1.docker.io",
                "latest",
            ),
            (
                "bitnami/redis:7",
                "docker.io/bitnami/redis:7",
                "registry-1.docker.io",
                "7",
            ),
            (
                "ghcr.io/org/team/app:v1.2",
                "ghcr.io/org/team/app:v1.2",
                "ghcr.io",
                "v1.2",
            ),
            (
                "localhost/app",
                "localhost/app:latest",
                "localhost",
                "latest",
            ),
            (
                "localhost:5000/a/b:tag",
                "localhost:5000/a/b:tag",
                "localhost:5000",
                "tag",
            ),
            (
                "10.0.0.5:5000/oak/app:1",
                "10.0.0.5:5000/oak/app:1",
                "10.0.0.5:5000",
                "1",
            ),
            (
                "[::1]:5000/app",
                "[::1]:5000/app:latest",
                "[::1]:5000",
                "latest",
            ),
            (
                "my-reg.lan/a__b/c-d.e_f",
                "my-reg.lan/a__b/c-d.e_f:latest",
                "my-reg.lan",
                "latest",
            ),
        ];
        for (input, name, host, object) in cases {
            let r = Reference::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.to_string(), *name, "{input}");
            assert_eq!(r.api_host(), *host, "{input}");
            assert_eq!(r.object(), *object, "{input}");
        }
        // Digests: the name keeps only the digest (containerd's ParseDockerRef does the same).
        let r = Reference::parse(&format!("localhost:5000/a/b:tag{at}")).unwrap();
        assert_eq!(r.domain, "localhost:5000");
        assert_eq!(r.path, "a/b");
        assert_eq!(r.tag.as_deref(), Some("tag"));
        assert_eq!(r.object(), D);
        assert_eq!(r.to_string(), format!("localhost:5000/a/b{at}"));
        let r = Reference::parse(&format!("busybox{at}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.to_string(), format!("docker.io/library/busybox{at}"));
        assert_eq!(r.repository(), "docker.io/library/busybox");
    }

    #[test]
    fn rejects() {
        let long = "a".repeat(256);
        let bad = [
            "",
            "Nginx",
            "docker.io/Library/nginx",
            "nginx:",
            "nginx:-x",
            "nginx:.x",
            "a//b",
            "a/",
            "/a",
            "a-/b",
            "a..b",
            "a___b",
            "nginx@sha256:abc",
            "nginx@sha512:0000",
            "nginx@SHA256:2e7fd3d83ed641a2656cb36e5722fb7c435ec2e1aeafc711fcf461f034ece7b6",
            "host:99999/app",
            "host:/app",
            "-host.lan/app",
            "a b",
            &long,
        ];
        for b in bad {
            assert!(Reference::parse(b).is_err(), "{b:?} should be rejected");
        }
        let e = Reference::parse("docker.io/Library/nginx").unwrap_err();
        assert!(e.to_string().contains("must be lowercase"), "{e}");
    }

    #[test]
    fn uppercase_first_component_is_a_domain() {
        // distribution/reference treats it as a registry host (which may be uppercase).
        let r = Reference::parse("MyHost/app").unwrap();
        assert_eq!(r.domain, "MyHost");
        assert_eq!(r.path, "app");
    }
}
