//! Reads an image already in containerd: Images/Get → (index → this platform's) manifest →
//! config → run config and top chain id, and checks that chain is unpacked for our
//! snapshotter (containerd-client spec §3.3). Pulling is the [`super::Puller`] seam's job.

use super::{ImageConfig, PulledImage};
use crate::containerd::{self as ctrd, Client};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Index, manifest and config documents are small; refuse anything bigger than this.
const MAX_DOCUMENT: usize = 4 << 20;

#[derive(Deserialize, Default)]
#[serde(default)]
struct Platform {
    os: String,
    architecture: String,
    variant: String,
}

#[derive(Deserialize)]
struct Entry {
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Document {
    #[serde(default)]
    manifests: Option<Vec<Entry>>,
    #[serde(default)]
    config: Option<Entry>,
}

#[derive(Deserialize)]
struct Config {
    #[serde(default)]
    config: Option<ImageConfig>,
    rootfs: Rootfs,
}

#[derive(Deserialize)]
struct Rootfs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// `os/arch[/variant]` of this build, in OCI spelling.
pub fn host_platform() -> (&'static str, &'static str, &'static str) {
    match std::env::consts::ARCH {
        "x86_64" => ("linux", "amd64", ""),
        "aarch64" => ("linux", "arm64", ""),
        "arm" => ("linux", "arm", "v7"),
        other => ("linux", other, ""),
    }
}

/// Picks the manifest for `want` (`os/arch[/variant]`) from an index's entries; an exact
/// variant wins, then an entry that names none (arm64's `v8` is implied).
fn select<'e>(entries: &'e [Entry], want: (&str, &str, &str)) -> Option<&'e Entry> {
    let (os, arch, variant) = want;
    let fits = |e: &&Entry| {
        e.platform
            .as_ref()
            .is_some_and(|p| p.os == os && p.architecture == arch)
    };
    let v = |e: &Entry| {
        e.platform
            .as_ref()
            .map_or("", |p| p.variant.as_str())
            .to_owned()
    };
    entries
        .iter()
        .filter(fits)
        .find(|e| v(e) == variant)
        .or_else(|| {
            entries
                .iter()
                .filter(fits)
                .find(|e| variant.is_empty() || v(e).is_empty())
        })
}

/// `chainID(n) = sha256(chainID(n-1) + " " + diffID(n))`, `chainID(0) = diffID(0)`.
pub fn chain_id(diff_ids: &[String]) -> Option<String> {
    let mut it = diff_ids.iter();
    let mut chain = it.next()?.clone();
    for d in it {
        let h = Sha256::digest(format!("{chain} {d}").as_bytes());
        chain = format!("sha256:{}", hex(&h));
    }
    Some(chain)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What to run from a config document, and its top chain id.
pub fn parse_config(body: &[u8]) -> Result<(ImageConfig, String), String> {
    let c: Config =
        serde_json::from_slice(body).map_err(|e| format!("image config is not valid JSON: {e}"))?;
    let chain = chain_id(&c.rootfs.diff_ids).ok_or("image config lists no layers")?;
    Ok((c.config.unwrap_or_default(), chain))
}

/// The image `name` if containerd has it, with its content and our snapshotter's unpacked
/// layers; `Ok(None)` when something is missing and a pull should fill it in.
pub async fn resolve_local(
    client: &mut Client,
    name: &str,
    snapshotter: &str,
    platform: Option<&str>,
) -> Result<Option<PulledImage>, String> {
    let fail =
        |what: &str, e: ctrd::Error| format!("reading image {name} from containerd: {what}: {e}");
    let image = match client.image_get(name).await {
        Ok(i) => i,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(fail("Images/Get", e)),
    };
    let want = match platform.filter(|p| !p.is_empty()) {
        Some(p) => {
            let mut parts = p.split('/');
            (
                parts.next().unwrap_or("linux"),
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
            )
        }
        None => host_platform(),
    };
    let mut digest = image.target.digest.clone();
    // At most one index level, then a manifest (nested indexes do not occur in practice).
    for _ in 0..2 {
        let body = match client.content_read(&digest, MAX_DOCUMENT).await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(fail("Content/Read", e)),
        };
        let doc: Document = serde_json::from_slice(&body)
            .map_err(|e| format!("image {name}: {digest} is not a manifest or index: {e}"))?;
        if let Some(entries) = doc.manifests {
            let e = select(&entries, want).ok_or_else(|| {
                format!(
                    "image {name} has no manifest for {}/{}{}{}: use an image built for this platform",
                    want.0,
                    want.1,
                    if want.2.is_empty() { "" } else { "/" },
                    want.2
                )
            })?;
            digest = e.digest.clone();
            continue;
        }
        let config = doc
            .config
            .ok_or_else(|| format!("image {name}: manifest {digest} has no config"))?;
        let body = match client.content_read(&config.digest, MAX_DOCUMENT).await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(fail("Content/Read", e)),
        };
        let (config, chain_id) = parse_config(&body).map_err(|e| format!("image {name}: {e}"))?;
        return match client.snapshot_stat(snapshotter, &chain_id).await {
            Ok(_) => Ok(Some(PulledImage {
                name: name.to_owned(),
                config,
                chain_id,
            })),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(fail("Snapshots/Stat", e)),
        };
    }
    Err(format!("image {name}: index nested deeper than one level"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        assert_eq!(chain_id(&[]), None);
        assert_eq!(chain_id(&["sha256:a".into()]).as_deref(), Some("sha256:a"));
        let two = chain_id(&["sha256:a".into(), "sha256:b".into()]).unwrap();
        let expect = format!("sha256:{}", hex(&Sha256::digest(b"sha256:a sha256:b")));
        assert_eq!(two, expect);
    }

    #[test]
    fn config_with_nulls() {
        let body = br#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"Entrypoint":null,"Cmd":["sh"],"WorkingDir":"","User":null},"rootfs":{"type":"layers","diff_ids":["sha256:x"]}}"#;
        let (c, chain) = parse_config(body).unwrap();
        assert_eq!(c.env, ["PATH=/bin"]);
        assert!(c.entrypoint.is_empty() && c.user.is_empty());
        assert_eq!(c.cmd, ["sh"]);
        assert_eq!(chain, "sha256:x");
        assert!(parse_config(br#"{"rootfs":{"diff_ids":[]}}"#).is_err());
    }

    #[test]
    fn platform_selection() {
        let entries: Vec<Entry> = serde_json::from_str(
            r#"[{"digest":"a","platform":{"os":"linux","architecture":"amd64"}},
                {"digest":"v6","platform":{"os":"linux","architecture":"arm","variant":"v6"}},
                {"digest":"v7","platform":{"os":"linux","architecture":"arm","variant":"v7"}},
                {"digest":"a64","platform":{"os":"linux","architecture":"arm64","variant":"v8"}}]"#,
        )
        .unwrap();
        let d = |w| select(&entries, w).map(|e| e.digest.as_str());
        assert_eq!(d(("linux", "amd64", "")), Some("a"));
        assert_eq!(d(("linux", "arm", "v7")), Some("v7"));
        assert_eq!(d(("linux", "arm64", "")), Some("a64"));
        assert_eq!(d(("linux", "riscv64", "")), None);
    }
}
