//! Image index, manifest and config documents, in their OCI and Docker schema 2 forms
//! (spec §6.5, §6.8); chain ids for unpacking (spec §3.1). Pure parsing and validation of
//! bytes already digest-checked by the caller; schema 1 is rejected, not converted.

use super::platform::{self, Platform};
use super::reference::valid_digest;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// containerd's `Accept` for manifest requests, observed on the wire (spec §6.2).
pub const ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*";

/// Layer media types containerd 1.6's Diff/Apply handles.
const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
];

/// Largest index, manifest or config we accept (containerd's manifest limit is 4 MiB too).
pub const MAX_DOCUMENT: u64 = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<JsonPlatform>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub urls: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct JsonPlatform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub variant: String,
}

impl JsonPlatform {
    pub fn platform(&self) -> Platform {
        Platform::new(&self.os, &self.architecture, &self.variant)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    pub manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// What a manifest endpoint returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Document {
    Index(Index),
    Manifest(Manifest),
}

/// The parts of the image config the runtime needs (`config` in the JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct RunConfig {
    #[serde(rename = "Env", default, deserialize_with = "null_default")]
    pub env: Vec<String>,
    #[serde(rename = "Entrypoint", default, deserialize_with = "null_default")]
    pub entrypoint: Vec<String>,
    #[serde(rename = "Cmd", default, deserialize_with = "null_default")]
    pub cmd: Vec<String>,
    #[serde(rename = "WorkingDir", default, deserialize_with = "null_default")]
    pub working_dir: String,
    #[serde(rename = "User", default, deserialize_with = "null_default")]
    pub user: String,
    #[serde(rename = "StopSignal", default, deserialize_with = "null_default")]
    pub stop_signal: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageConfig {
    pub platform: Platform,
    pub run: RunConfig,
    pub diff_ids: Vec<String>,
}

/// Docker writes `null` for empty lists; treat it as the default.
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Deserialize)]
struct RawDoc {
    #[serde(rename = "schemaVersion", default)]
    schema_version: u32,
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: String,
    #[serde(default, deserialize_with = "null_default")]
    config: RunConfig,
    rootfs: RawRootfs,
}

#[derive(Deserialize)]
struct RawRootfs {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default, deserialize_with = "null_default")]
    diff_ids: Vec<String>,
}

/// Parses a manifest endpoint's body. `content_type` is the response's Content-Type (may be
/// empty); the document's own `mediaType` and shape decide when it is missing or generic.
pub fn parse_document(content_type: &str, body: &[u8]) -> Result<Document, String> {
    let ct = content_type.split(';').next().unwrap_or("").trim();
    if ct == DOCKER_SCHEMA1 || ct == DOCKER_SCHEMA1_SIGNED {
        return Err(schema1());
    }
    let raw: RawDoc =
        serde_json::from_slice(body).map_err(|e| format!("manifest is not valid JSON: {e}"))?;
    if raw.schema_version == 1 {
        return Err(schema1());
    }
    let kind = if is_index_type(&raw.media_type) || is_index_type(ct) {
        Kind::Index
    } else if is_manifest_type(&raw.media_type) || is_manifest_type(ct) {
        Kind::Manifest
    } else if raw.media_type.is_empty() && raw.manifests.is_some() {
        Kind::Index
    } else if raw.media_type.is_empty() && raw.config.is_some() {
        Kind::Manifest
    } else {
        let mt = if raw.media_type.is_empty() {
            ct
        } else {
            &raw.media_type
        };
        return Err(format!("unsupported manifest media type {mt:?}"));
    };
    if raw.schema_version != 2 {
        return Err(format!(
            "unsupported manifest schemaVersion {}",
            raw.schema_version
        ));
    }
    match kind {
        Kind::Index => {
            let manifests = raw
                .manifests
                .ok_or("image index without a \"manifests\" list")?;
            for d in &manifests {
                check_descriptor(d, "index entry")?;
            }
            Ok(Document::Index(Index { manifests }))
        }
        Kind::Manifest => {
            let config = raw.config.ok_or("manifest without a \"config\"")?;
            check_descriptor(&config, "config")?;
            if config.size > MAX_DOCUMENT {
                return Err(format!(
                    "config of {} bytes is larger than the 4 MiB limit",
                    config.size
                ));
            }
            let layers = raw.layers.ok_or("manifest without \"layers\"")?;
            if layers.is_empty() {
                return Err("manifest has no layers".into());
            }
            for l in &layers {
                check_descriptor(l, "layer")?;
                if !LAYER_TYPES.contains(&l.media_type.as_str()) {
                    return Err(if l.media_type.contains("foreign") || !l.urls.is_empty() {
                        format!("layer {} is a foreign (non-distributable) layer, which is not supported", l.digest)
                    } else {
                        format!(
                            "layer {} has unsupported media type {:?}",
                            l.digest, l.media_type
                        )
                    });
                }
            }
            Ok(Document::Manifest(Manifest { config, layers }))
        }
    }
}

enum Kind {
    Index,
    Manifest,
}

fn schema1() -> String {
    "it is a Docker schema 1 manifest, a legacy format this worker does not pull: rebuild or re-push the image with a current docker/buildah (schema 2 or OCI)".into()
}

pub fn is_index_type(mt: &str) -> bool {
    mt == OCI_INDEX || mt == DOCKER_LIST
}

pub fn is_manifest_type(mt: &str) -> bool {
    mt == OCI_MANIFEST || mt == DOCKER_MANIFEST
}

fn check_descriptor(d: &Descriptor, what: &str) -> Result<(), String> {
    if !valid_digest(&d.digest) {
        return Err(format!(
            "{what} digest {:?} is not sha256 (the only algorithm this worker verifies)",
            d.digest
        ));
    }
    Ok(())
}

impl Index {
    /// The entry to pull for `want`, or an error naming what the index offers.
    pub fn select(&self, want: &Platform) -> Result<&Descriptor, String> {
        let plats: Vec<Option<Platform>> = self
            .manifests
            .iter()
            .map(|d| d.platform.as_ref().map(JsonPlatform::platform))
            .collect();
        let entries: Vec<platform::Entry<'_>> = self
            .manifests
            .iter()
            .zip(&plats)
            .map(|(d, p)| platform::Entry {
                platform: p.as_ref(),
                reference_type: d
                    .annotations
                    .get("vnd.docker.reference.type")
                    .map(String::as_str),
            })
            .collect();
        match platform::select(want, &entries) {
            Some(i) if is_manifest_type(&self.manifests[i].media_type) => Ok(&self.manifests[i]),
            Some(i) => Err(format!(
                "the {want} entry has media type {:?}, not an image manifest",
                self.manifests[i].media_type
            )),
            None => {
                let have: Vec<String> = entries
                    .iter()
                    .filter(|e| e.reference_type.is_none())
                    .filter_map(|e| e.platform)
                    .filter(|p| p.os != "unknown")
                    .map(|p| p.normalized().to_string())
                    .collect();
                Err(format!("has no {want} entry (has: {})", have.join(", ")))
            }
        }
    }
}

pub fn parse_config(body: &[u8], layers: usize) -> Result<ImageConfig, String> {
    let raw: RawConfig =
        serde_json::from_slice(body).map_err(|e| format!("image config is not valid JSON: {e}"))?;
    if raw.rootfs.kind != "layers" {
        return Err(format!(
            "image config rootfs type {:?} is not \"layers\"",
            raw.rootfs.kind
        ));
    }
    if raw.rootfs.diff_ids.len() != layers {
        return Err(format!(
            "image config lists {} diff_ids for {layers} layers",
            raw.rootfs.diff_ids.len()
        ));
    }
    if let Some(bad) = raw.rootfs.diff_ids.iter().find(|d| !valid_digest(d)) {
        return Err(format!(
            "image config diff_id {bad:?} is not a sha256 digest"
        ));
    }
    Ok(ImageConfig {
        platform: Platform::new(&raw.os, &raw.architecture, &raw.variant).normalized(),
        run: raw.config,
        diff_ids: raw.rootfs.diff_ids,
    })
}

/// Chain ids of a layer stack: `chain_0 = diff_0`, `chain_i = sha256(chain_{i-1} + " " + diff_i)`.
/// These name the committed snapshots (spec §3.1 step 4).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => {
                let mut h = Sha256::new();
                h.update(prev.as_bytes());
                h.update(b" ");
                h.update(d.as_bytes());
                digest_string(h)
            }
        };
        out.push(next);
    }
    out
}

/// `sha256:<hex>` of a finished hash.
pub fn digest_string(h: Sha256) -> String {
    let bytes = h.finalize();
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

pub fn sha256_of(data: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(data);
    digest_string(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "sha256:ccec24aa6244eb0b6f3a9f2b74ca9dcf054f0174b98bfd86bb73e8c2fa8424f2";
    const B: &str = "sha256:f7f0c26e4290c61cf1794c684936455f52fc0075b0e900bf7c6035c8754bde08";
    const C: &str = "sha256:4c2c31cab5f8e33db5b51ffead9fd4ed1450a9e73afdcca04c8593c22de5db25";

    fn index_json() -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
            {{"mediaType":"{OCI_MANIFEST}","digest":"{A}","size":405,"platform":{{"architecture":"amd64","os":"linux"}}}},
            {{"mediaType":"{OCI_MANIFEST}","digest":"{B}","size":404,"platform":{{"architecture":"arm64","os":"linux"}}}},
            {{"mediaType":"{OCI_MANIFEST}","digest":"{C}","size":404,"platform":{{"architecture":"arm","os":"linux","variant":"v7"}}}},
            {{"mediaType":"{OCI_MANIFEST}","digest":"{A}","size":10,"platform":{{"architecture":"unknown","os":"unknown"}},
              "annotations":{{"vnd.docker.reference.type":"attestation-manifest"}}}}]}}"#
        )
    }

    #[test]
    fn index_selects_platforms_and_names_what_it_has() {
        let Document::Index(ix) = parse_document(OCI_INDEX, index_json().as_bytes()).unwrap()
        else {
            panic!("not an index")
        };
        let sel = |s: &str| {
            ix.select(&Platform::parse(s).unwrap())
                .map(|d| d.digest.clone())
        };
        assert_eq!(sel("linux/amd64").unwrap(), A);
        assert_eq!(sel("linux/arm64").unwrap(), B);
        assert_eq!(sel("linux/arm/v7").unwrap(), C);
        let e = sel("linux/arm/v6").unwrap_err();
        assert_eq!(
            e,
            "has no linux/arm/v6 entry (has: linux/amd64, linux/arm64, linux/arm/v7)"
        );
        // Docker manifest list, Content-Type only (no mediaType in the body).
        let list = index_json()
            .replace(&format!("\"mediaType\":\"{OCI_INDEX}\","), "")
            .replace(OCI_MANIFEST, DOCKER_MANIFEST);
        assert!(matches!(
            parse_document(DOCKER_LIST, list.as_bytes()),
            Ok(Document::Index(_))
        ));
        // Generic content type: the shape decides.
        assert!(matches!(
            parse_document("application/json", list.as_bytes()),
            Ok(Document::Index(_))
        ));
    }

    #[test]
    fn manifests_oci_and_docker() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"{DOCKER_CONFIG}","digest":"{A}","size":391}},
            "layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"{B}","size":1035149}}]}}"#
        );
        let Document::Manifest(m) = parse_document(DOCKER_MANIFEST, m.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(m.config.digest, A);
        assert_eq!(m.layers[0].size, 1035149);
        let oci = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{OCI_CONFIG}","digest":"{A}","size":391}},
            "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{B}","size":5}}]}}"#
        );
        assert!(matches!(
            parse_document("", oci.as_bytes()),
            Ok(Document::Manifest(_))
        ));
        let foreign = oci.replace(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        );
        let e = parse_document(OCI_MANIFEST, foreign.as_bytes()).unwrap_err();
        assert!(e.contains("foreign"), "{e}");
        let sha512 = oci.replace(B, "sha512:abcd");
        assert!(parse_document(OCI_MANIFEST, sha512.as_bytes())
            .unwrap_err()
            .contains("not sha256"));
    }

    #[test]
    fn schema1_is_rejected_clearly() {
        let s1 = br#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}"#;
        let e = parse_document(DOCKER_SCHEMA1_SIGNED, s1).unwrap_err();
        assert!(e.contains("schema 1"), "{e}");
        let e = parse_document("application/json", s1).unwrap_err();
        assert!(e.contains("schema 1"), "{e}");
        assert!(parse_document(OCI_MANIFEST, b"<html>")
            .unwrap_err()
            .contains("not valid JSON"));
    }

    #[test]
    fn config_fields_and_nulls() {
        let cfg = format!(
            r#"{{"architecture":"arm","variant":"v7","os":"linux","config":{{"Env":["PATH=/bin"],"Entrypoint":null,
            "Cmd":["sh"],"WorkingDir":"","User":"1000:1000","StopSignal":"SIGQUIT"}},
            "rootfs":{{"type":"layers","diff_ids":["{A}","{B}"]}},"history":[]}}"#
        );
        let c = parse_config(cfg.as_bytes(), 2).unwrap();
        assert_eq!(c.platform.to_string(), "linux/arm/v7");
        assert_eq!(c.run.env, ["PATH=/bin"]);
        assert!(c.run.entrypoint.is_empty());
        assert_eq!(c.run.cmd, ["sh"]);
        assert_eq!(c.run.user, "1000:1000");
        assert_eq!(c.run.stop_signal, "SIGQUIT");
        assert!(parse_config(cfg.as_bytes(), 1)
            .unwrap_err()
            .contains("2 diff_ids for 1 layers"));
        let no_config = format!(
            r#"{{"os":"linux","architecture":"amd64","rootfs":{{"type":"layers","diff_ids":["{A}"]}}}}"#
        );
        assert_eq!(
            parse_config(no_config.as_bytes(), 1).unwrap().run,
            RunConfig::default()
        );
    }

    #[test]
    fn chain_ids_known_values() {
        // Computed with coreutils: printf '%s %s' "$A" "$B" | sha256sum, then with C.
        let ids = chain_ids(&[A.to_owned(), B.to_owned(), C.to_owned()]);
        assert_eq!(ids[0], A);
        assert_eq!(
            ids[1],
            "sha256:42275a9bd7b27e64d127af6fdb08b393bddeb6ea89592ec8d4b073a87a16e7f2"
        );
        assert_eq!(
            ids[2],
            "sha256:6259683d3b3bbbd74211f4f95f028188135cae23ee55f6a2c9d8663c1b1450eb"
        );
        assert_eq!(
            sha256_of(b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(chain_ids(&[]).is_empty());
    }
}
