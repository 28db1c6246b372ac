//! The pull sequence of spec §3.2: resolve through the registry, stream and verify every blob
//! into containerd's content store under a lease with the gc labels, unpack the layers into
//! snapshots named by chain id, create the image record, drop the lease. An image that is
//! already complete in containerd is answered from there without any network request.

use super::auth::{self, TokenCache};
use super::http::{self, Url};
use super::manifest::{self, Descriptor, Document, ImageConfig, Manifest, RunConfig, MAX_DOCUMENT};
use super::platform::{self, Platform};
use super::progress::{human, Counters, Progress};
use super::reference::{valid_digest, RefError, Reference};
use crate::containerd::{self as ctrd, Client, Ingest, SnapshotKind};
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Registry-side settings and caches, built once per process and shared by all pulls.
pub struct PullConfig {
    http: http::Client,
    tokens: Mutex<TokenCache>,
    /// containerd snapshotter to unpack into (`overlayfs`; `native` where overlay cannot mount).
    pub snapshotter: String,
}

impl PullConfig {
    /// `insecure`: `OAK_INSECURE_REGISTRIES` entries; `extra_ca`: `OAK_REGISTRY_CA`.
    pub fn new(insecure: Vec<String>, extra_ca: Option<PathBuf>, snapshotter: &str) -> PullConfig {
        PullConfig {
            http: http::Client::new(http::Options {
                insecure,
                extra_ca,
                connect_timeout: Duration::from_secs(15),
                io_timeout: Duration::from_secs(60),
            }),
            tokens: Mutex::new(TokenCache::new(32)),
            snapshotter: snapshotter.to_owned(),
        }
    }

    /// `insecure` from the worker's settings; `OAK_REGISTRY_CA` and `OAK_CONTAINERD_SNAPSHOTTER`
    /// (default `overlayfs`) from the environment.
    pub fn from_env(insecure: Vec<String>) -> PullConfig {
        let ca = std::env::var_os("OAK_REGISTRY_CA")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        let snap = std::env::var("OAK_CONTAINERD_SNAPSHOTTER")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| ctrd::DEFAULT_SNAPSHOTTER.to_owned());
        PullConfig::new(insecure, ca, &snap)
    }

    /// Shorter timeouts (tests).
    pub fn with_timeouts(mut self, connect: Duration, io: Duration) -> PullConfig {
        let mut o = self.http.options().clone();
        o.connect_timeout = connect;
        o.io_timeout = io;
        self.http = http::Client::new(o);
        self
    }
}

/// What the runtime needs to create a container from the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    /// The containerd image name (normalised reference).
    pub name: String,
    /// The image record's target: the index for multi-platform images, else the manifest.
    pub target: ctrd::Descriptor,
    pub manifest_digest: String,
    pub config_digest: String,
    /// The platform of the selected manifest (from its config).
    pub platform: Platform,
    pub config: RunConfig,
    /// Top chain id: the parent snapshot of a container's rootfs.
    pub chain_id: String,
    pub snapshotter: String,
    /// True when nothing was fetched from the network.
    pub cached: bool,
}

/// Errors of a pull; `Display` (and [`PullError::status_detail`]) names the image, the party
/// at fault and what the operator can do.
#[derive(Debug)]
pub enum PullError {
    Reference(RefError),
    Platform(String),
    /// Transport failure talking to a registry or token endpoint.
    Http {
        image: String,
        source: http::Error,
    },
    /// The registry answered with an unexpected status.
    Status {
        registry: String,
        image: String,
        what: String,
        status: u16,
        detail: String,
    },
    Auth {
        registry: String,
        image: String,
        detail: String,
    },
    NoPlatform {
        image: String,
        detail: String,
    },
    Unsupported {
        image: String,
        detail: String,
    },
    /// Content did not match its digest or size: the registry (or something between) is broken.
    Verify {
        image: String,
        what: String,
        detail: String,
    },
    Containerd {
        image: String,
        step: &'static str,
        source: ctrd::Error,
    },
}

impl fmt::Display for PullError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PullError::Reference(e) => write!(f, "{e}"),
            PullError::Platform(e) => write!(f, "{e}"),
            PullError::Http { image, source } => write!(f, "pulling {image}: {source}"),
            PullError::Status { registry, image, what, status, detail } => {
                let hint = match status {
                    404 => ": check the image name and tag",
                    401 | 403 => ": the repository may be private (only anonymous pulls are supported)",
                    429 => ": rate limited by the registry; retry later or use a mirror",
                    500..=599 => ": registry-side failure; retry later",
                    _ => "",
                };
                write!(f, "registry {registry} answered {status} for {what} of {image}{hint}")?;
                if !detail.is_empty() {
                    write!(f, " ({detail})")?;
                }
                Ok(())
            }
            PullError::Auth { registry, image, detail } => {
                write!(f, "registry {registry} refused access to {image}: {detail}")
            }
            PullError::NoPlatform { image, detail } => write!(f, "image {image} {detail}"),
            PullError::Unsupported { image, detail } => write!(f, "cannot pull {image}: {detail}"),
            PullError::Verify { image, what, detail } => write!(
                f,
                "pulling {image}: {what} failed verification: {detail}; nothing was kept (a broken registry or proxy?)"
            ),
            PullError::Containerd { image, step, source } => {
                write!(f, "pulling {image}: {step}: {source}")
            }
        }
    }
}

impl std::error::Error for PullError {}

impl PullError {
    /// The text for an instance's `status_detail`.
    pub fn status_detail(&self) -> String {
        self.to_string()
    }
}

impl From<RefError> for PullError {
    fn from(e: RefError) -> Self {
        PullError::Reference(e)
    }
}

/// Makes sure `reference` is pulled and unpacked for `platform_override` (default: this
/// host's platform), pulling only what is missing.
pub async fn ensure(
    client: &mut Client,
    cfg: &PullConfig,
    reference: &str,
    platform_override: Option<&str>,
    counters: &Counters,
) -> Result<PulledImage, PullError> {
    let r = ensure_inner(client, cfg, reference, platform_override, counters).await;
    match &r {
        Ok(p) if p.cached => Counters::add(&counters.cache_hits, 1),
        Ok(_) => Counters::add(&counters.pulls, 1),
        Err(e) => {
            Counters::add(&counters.failures, 1);
            log::warn!("{e}");
        }
    }
    r
}

async fn ensure_inner(
    client: &mut Client,
    cfg: &PullConfig,
    reference: &str,
    platform_override: Option<&str>,
    counters: &Counters,
) -> Result<PulledImage, PullError> {
    let r = Reference::parse(reference)?;
    let want = match platform_override {
        Some(p) => Platform::parse(p).map_err(PullError::Platform)?,
        None => platform::host(),
    };
    let name = r.to_string();
    if let Some(img) = local(client, cfg, &name, &want).await? {
        log::info!("image {name} ({}) is already present", img.platform);
        return Ok(img);
    }
    let started = Instant::now();
    let mut session = Session {
        cfg,
        r: &r,
        name: &name,
        base: registry_base(cfg, &r)?,
        counters,
    };
    let plan = session.resolve(&want).await?;
    let lease = lease_id();
    let expire = rfc3339(SystemTime::now() + Duration::from_secs(24 * 3600));
    client
        .create_lease(&lease, &[("containerd.io/gc.expire", &expire)])
        .await
        .map_err(|source| cerr(&name, "creating the pull lease", source))?;
    client.set_lease(Some(&lease));
    let res = session.fetch_and_unpack(client, &plan).await;
    client.set_lease(None);
    // The gc labels now hold everything we keep; a failed pull's blobs and snapshots go with
    // the lease (spec §3.2).
    if let Err(e) = client.delete_lease(&lease, false).await {
        log::warn!("pulling {name}: deleting lease {lease}: {e} (it expires in 24 h)");
    }
    let (downloaded, fetched_layers) = res?;
    log::info!(
        "pulled {name} ({}) in {:.1} s: {} in {} of {} layers downloaded",
        plan.config.platform,
        started.elapsed().as_secs_f64(),
        human(downloaded),
        fetched_layers,
        plan.manifest.layers.len()
    );
    Ok(plan.pulled(&name, &cfg.snapshotter, false))
}

fn cerr(image: &str, step: &'static str, source: ctrd::Error) -> PullError {
    PullError::Containerd {
        image: image.to_owned(),
        step,
        source,
    }
}

/// `https://host` (or `http://` for insecure registries).
fn registry_base(cfg: &PullConfig, r: &Reference) -> Result<Url, PullError> {
    let host = r.api_host();
    let probe = Url::parse(&format!("http://{host}/")).map_err(|e| PullError::Unsupported {
        image: r.to_string(),
        detail: e,
    })?;
    let https = !http::is_insecure(&cfg.http.options().insecure, &probe);
    let scheme = if https { "https" } else { "http" };
    Url::parse(&format!("{scheme}://{host}/")).map_err(|e| PullError::Unsupported {
        image: r.to_string(),
        detail: e,
    })
}

/// Everything resolved from the registry's small documents, before any layer moves.
struct Plan {
    /// The index or manifest the reference points at, with its bytes.
    top: ctrd::Descriptor,
    top_bytes: Vec<u8>,
    /// The index, if the top is one (its entries get gc labels).
    index: Option<manifest::Index>,
    manifest_desc: ctrd::Descriptor,
    manifest_bytes: Vec<u8>,
    manifest: Manifest,
    config_bytes: Vec<u8>,
    config: ImageConfig,
    chain: Vec<String>,
}

impl Plan {
    fn pulled(&self, name: &str, snapshotter: &str, cached: bool) -> PulledImage {
        PulledImage {
            name: name.to_owned(),
            target: self.top.clone(),
            manifest_digest: self.manifest_desc.digest.clone(),
            config_digest: self.manifest.config.digest.clone(),
            platform: self.config.platform.clone(),
            config: self.config.run.clone(),
            chain_id: self.chain.last().cloned().unwrap_or_default(),
            snapshotter: snapshotter.to_owned(),
            cached,
        }
    }
}

fn descriptor(media_type: &str, digest: &str, size: u64) -> ctrd::Descriptor {
    ctrd::Descriptor {
        media_type: media_type.to_owned(),
        digest: digest.to_owned(),
        size: size as i64,
        annotations: Vec::new(),
    }
}

/// The manifest out of an index (or the document itself), checked against `want`.
fn choose(image: &str, doc: &Document, want: &Platform) -> Result<Option<Descriptor>, PullError> {
    match doc {
        Document::Index(ix) => {
            ix.select(want)
                .cloned()
                .map(Some)
                .map_err(|detail| PullError::NoPlatform {
                    image: image.to_owned(),
                    detail: format!("is an image index that {detail}"),
                })
        }
        Document::Manifest(_) => Ok(None),
    }
}

fn check_single_platform(image: &str, cfg: &ImageConfig, want: &Platform) -> Result<(), PullError> {
    // A single-manifest image says its platform only in its config.
    if cfg.platform.architecture.is_empty() || want.rank(&cfg.platform).is_some() {
        return Ok(());
    }
    Err(PullError::NoPlatform {
        image: image.to_owned(),
        detail: format!(
            "is a single-platform {} image; this node needs {want}",
            cfg.platform
        ),
    })
}

// ------------------------------------------------------------------ the local fast path

/// The image as containerd already has it, if complete: record, documents and the top
/// snapshot. Anything missing means "pull", not an error.
async fn local(
    client: &mut Client,
    cfg: &PullConfig,
    name: &str,
    want: &Platform,
) -> Result<Option<PulledImage>, PullError> {
    let img = match client.image_get(name).await {
        Ok(i) => i,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(cerr(name, "looking up the image", e)),
    };
    match local_plan(client, name, &img.target, want).await {
        Ok(Some(plan)) => {
            let top = plan.chain.last().cloned().unwrap_or_default();
            match client.snapshot_stat(&cfg.snapshotter, &top).await {
                Ok(info) if info.kind == SnapshotKind::Committed => {
                    Ok(Some(plan.pulled(name, &cfg.snapshotter, true)))
                }
                Ok(_) => Ok(None),
                Err(e) if e.is_not_found() => {
                    log::info!(
                        "image {name} is recorded but not unpacked into {}: pulling",
                        cfg.snapshotter
                    );
                    Ok(None)
                }
                Err(e) => Err(cerr(name, "checking the unpacked layers", e)),
            }
        }
        Ok(None) => Ok(None),
        // The stored index may be stale (the tag moved since): let the registry decide.
        Err(e @ PullError::NoPlatform { .. }) => {
            log::info!("{e}: asking the registry");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

async fn read_doc(
    client: &mut Client,
    name: &str,
    digest: &str,
) -> Result<Option<Vec<u8>>, PullError> {
    match client.content_read(digest, MAX_DOCUMENT as usize).await {
        Ok(b) if manifest::sha256_of(&b) == digest => Ok(Some(b)),
        Ok(_) => {
            log::warn!("image {name}: containerd's copy of {digest} does not match its digest; pulling again");
            Ok(None)
        }
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(cerr(name, "reading stored image content", e)),
    }
}

async fn local_plan(
    client: &mut Client,
    name: &str,
    target: &ctrd::Descriptor,
    want: &Platform,
) -> Result<Option<Plan>, PullError> {
    let unsupported = |detail: String| PullError::Unsupported {
        image: name.to_owned(),
        detail,
    };
    let Some(top_bytes) = read_doc(client, name, &target.digest).await? else {
        return Ok(None);
    };
    let doc = manifest::parse_document(&target.media_type, &top_bytes).map_err(unsupported)?;
    let (index, manifest_desc, manifest_bytes, m) = match choose(name, &doc, want)? {
        Some(d) => {
            let Some(b) = read_doc(client, name, &d.digest).await? else {
                return Ok(None);
            };
            let Document::Manifest(m) =
                manifest::parse_document(&d.media_type, &b).map_err(unsupported)?
            else {
                return Err(unsupported(format!(
                    "index entry {} is not a manifest",
                    d.digest
                )));
            };
            let Document::Index(ix) = doc else {
                return Ok(None);
            };
            (Some(ix), descriptor(&d.media_type, &d.digest, d.size), b, m)
        }
        None => {
            let Document::Manifest(m) = doc else {
                return Ok(None);
            };
            (None, target.clone(), top_bytes.clone(), m)
        }
    };
    let Some(config_bytes) = read_doc(client, name, &m.config.digest).await? else {
        return Ok(None);
    };
    let config = manifest::parse_config(&config_bytes, m.layers.len()).map_err(unsupported)?;
    if index.is_none() {
        check_single_platform(name, &config, want)?;
    }
    let chain = manifest::chain_ids(&config.diff_ids);
    Ok(Some(Plan {
        top: target.clone(),
        top_bytes,
        index,
        manifest_desc,
        manifest_bytes,
        manifest: m,
        config_bytes,
        config,
        chain,
    }))
}

// ------------------------------------------------------------------ registry session

struct Session<'a> {
    cfg: &'a PullConfig,
    r: &'a Reference,
    name: &'a str,
    base: Url,
    counters: &'a Counters,
}

/// Longest error body we quote from a registry.
const ERROR_BODY: usize = 4096;

impl Session<'_> {
    fn registry(&self) -> String {
        self.base.authority()
    }

    fn http_err(&self, source: http::Error) -> PullError {
        PullError::Http {
            image: self.name.to_owned(),
            source,
        }
    }

    fn verify_err(&self, what: &str, detail: String) -> PullError {
        PullError::Verify {
            image: self.name.to_owned(),
            what: what.to_owned(),
            detail,
        }
    }

    fn unsupported(&self, detail: String) -> PullError {
        PullError::Unsupported {
            image: self.name.to_owned(),
            detail,
        }
    }

    /// A request to the registry with the cached token; on a Bearer challenge, fetches an
    /// anonymous token and retries once (spec §6.3: containerd also answers every 401 so).
    async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<http::Response, PullError> {
        let url = self.base.join(path).map_err(|e| self.unsupported(e))?;
        let key = TokenCache::key(&self.registry(), &self.r.path);
        let cached = self.cached_token(&key);
        let auth = cached.as_ref().map(|t| format!("Bearer {t}"));
        Counters::add(&self.counters.requests, 1);
        let resp = self
            .cfg
            .http
            .send(method, &url, headers, auth.as_deref())
            .await
            .map_err(|e| self.http_err(e))?;
        if resp.status() != 401 {
            return Ok(resp);
        }
        let challenge = resp.header("www-authenticate").unwrap_or("").to_owned();
        if cached.is_some() {
            if let Ok(mut c) = self.cfg.tokens.lock() {
                c.forget(&key);
            }
        }
        let token = self.token(&challenge, &key).await?;
        Counters::add(&self.counters.requests, 1);
        let auth = format!("Bearer {token}");
        let resp = self
            .cfg
            .http
            .send(method, &url, headers, Some(&auth))
            .await
            .map_err(|e| self.http_err(e))?;
        if resp.status() == 401 {
            return Err(PullError::Auth {
                registry: self.registry(),
                image: self.name.to_owned(),
                detail: "it answered 401 even with a fresh anonymous token: the repository is private or does not exist (only anonymous pulls are supported)".into(),
            });
        }
        Ok(resp)
    }

    fn cached_token(&self, key: &str) -> Option<String> {
        let c = self.cfg.tokens.lock().ok()?;
        c.get(key, Instant::now()).map(str::to_owned)
    }

    async fn token(&self, challenge: &str, key: &str) -> Result<String, PullError> {
        let auth_err = |detail: String| PullError::Auth {
            registry: self.registry(),
            image: self.name.to_owned(),
            detail,
        };
        let chs = auth::parse_challenges(challenge);
        let Some(bearer) = chs.iter().find(|c| c.scheme == "bearer") else {
            return Err(auth_err(if chs.iter().any(|c| c.scheme == "basic") {
                "it wants credentials (Basic auth); only anonymous pulls are supported".into()
            } else {
                format!("it answered 401 without a Bearer challenge ({challenge:?})")
            }));
        };
        let scope = format!("repository:{}:pull", self.r.path);
        let url = auth::token_url(bearer, &scope).map_err(auth_err)?;
        let url = Url::parse(&url).map_err(|e| auth_err(format!("token realm: {e}")))?;
        Counters::add(&self.counters.requests, 1);
        let mut resp = self
            .cfg
            .http
            .send("GET", &url, &[("Accept", "application/json")], None)
            .await
            .map_err(|e| self.http_err(e))?;
        let body = resp
            .read_limited(64 << 10)
            .await
            .map_err(|e| self.http_err(e))?;
        Counters::add(&self.counters.bytes, body.len() as u64);
        if resp.status() != 200 {
            return Err(auth_err(format!(
                "token endpoint {} answered {}: {}",
                url.authority(),
                resp.status(),
                snippet(&body)
            )));
        }
        let (token, ttl) = auth::parse_token(&body).map_err(auth_err)?;
        if let Ok(mut c) = self.cfg.tokens.lock() {
            c.put(key, token.clone(), ttl, Instant::now());
        }
        Ok(token)
    }

    /// Fails with a readable error unless the status is one of `ok`.
    async fn expect(
        &self,
        resp: &mut http::Response,
        ok: &[u16],
        what: &str,
    ) -> Result<(), PullError> {
        if ok.contains(&resp.status()) {
            return Ok(());
        }
        let body = resp.read_limited(ERROR_BODY).await.unwrap_or_default();
        Err(PullError::Status {
            registry: self.registry(),
            image: self.name.to_owned(),
            what: what.to_owned(),
            status: resp.status(),
            detail: snippet(&body),
        })
    }

    /// GET a manifest or index by digest and verify it.
    async fn get_manifest(
        &self,
        digest: &str,
        size: Option<u64>,
    ) -> Result<(String, Vec<u8>), PullError> {
        let what = format!("manifest {digest}");
        let mut resp = self
            .request(
                "GET",
                &format!("/v2/{}/manifests/{digest}", self.r.path),
                &[("Accept", manifest::ACCEPT)],
            )
            .await?;
        self.expect(&mut resp, &[200], &what).await?;
        let body = resp
            .read_limited(MAX_DOCUMENT as usize)
            .await
            .map_err(|e| self.http_err(e))?;
        Counters::add(&self.counters.bytes, body.len() as u64);
        let got = manifest::sha256_of(&body);
        if got != digest {
            return Err(self.verify_err(&what, format!("the bytes received hash to {got}")));
        }
        if let Some(s) = size.filter(|&s| s != body.len() as u64) {
            return Err(self.verify_err(
                &what,
                format!("{} bytes received, the index says {s}", body.len()),
            ));
        }
        let ct = resp.header("content-type").unwrap_or("").to_owned();
        Ok((ct, body))
    }

    /// Reference → top descriptor → platform manifest → config: everything small, verified.
    async fn resolve(&mut self, want: &Platform) -> Result<Plan, PullError> {
        let r = self.r;
        let digest = match &r.digest {
            Some(d) => d.clone(),
            None => {
                // HEAD first: it does not count against Docker Hub's pull limit (spec §6.4).
                let tag = r.object();
                let path = format!("/v2/{}/manifests/{tag}", r.path);
                let mut resp = self
                    .request("HEAD", &path, &[("Accept", manifest::ACCEPT)])
                    .await?;
                self.expect(&mut resp, &[200], &format!("manifest {tag}"))
                    .await?;
                match resp
                    .header("docker-content-digest")
                    .filter(|d| valid_digest(d))
                {
                    Some(d) => d.to_owned(),
                    None => {
                        // Without the header the bytes of a GET by tag are the only anchor.
                        let mut resp = self
                            .request("GET", &path, &[("Accept", manifest::ACCEPT)])
                            .await?;
                        self.expect(&mut resp, &[200], &format!("manifest {tag}"))
                            .await?;
                        let body = resp
                            .read_limited(MAX_DOCUMENT as usize)
                            .await
                            .map_err(|e| self.http_err(e))?;
                        manifest::sha256_of(&body)
                    }
                }
            }
        };
        let (ct, top_bytes) = self.get_manifest(&digest, None).await?;
        let doc = manifest::parse_document(&ct, &top_bytes).map_err(|e| self.unsupported(e))?;
        let top_type = match (&doc, ct.split(';').next().unwrap_or("").trim()) {
            (_, t) if manifest::is_index_type(t) || manifest::is_manifest_type(t) => t.to_owned(),
            (Document::Index(_), _) => manifest::OCI_INDEX.to_owned(),
            (Document::Manifest(_), _) => manifest::OCI_MANIFEST.to_owned(),
        };
        let top = descriptor(&top_type, &digest, top_bytes.len() as u64);
        let (index, manifest_desc, manifest_bytes, m) = match choose(self.name, &doc, want)? {
            Some(d) => {
                let (_, b) = self.get_manifest(&d.digest, Some(d.size)).await?;
                let Document::Manifest(m) =
                    manifest::parse_document(&d.media_type, &b).map_err(|e| self.unsupported(e))?
                else {
                    return Err(self.unsupported(format!(
                        "index entry {} is not an image manifest",
                        d.digest
                    )));
                };
                let Document::Index(ix) = doc else {
                    return Err(self.unsupported("index changed shape".into()));
                };
                (Some(ix), descriptor(&d.media_type, &d.digest, d.size), b, m)
            }
            None => {
                let Document::Manifest(m) = doc else {
                    return Err(self.unsupported("expected a manifest".into()));
                };
                (None, top.clone(), top_bytes.clone(), m)
            }
        };
        let config_bytes = self.get_small_blob(&m.config).await?;
        let config = manifest::parse_config(&config_bytes, m.layers.len())
            .map_err(|e| self.unsupported(e))?;
        if index.is_none() {
            check_single_platform(self.name, &config, want)?;
        }
        let chain = manifest::chain_ids(&config.diff_ids);
        Ok(Plan {
            top,
            top_bytes,
            index,
            manifest_desc,
            manifest_bytes,
            manifest: m,
            config_bytes,
            config,
            chain,
        })
    }

    async fn get_small_blob(&self, d: &Descriptor) -> Result<Vec<u8>, PullError> {
        let what = format!("config {}", d.digest);
        let mut resp = self
            .request(
                "GET",
                &format!("/v2/{}/blobs/{}", self.r.path, d.digest),
                &[],
            )
            .await?;
        self.expect(&mut resp, &[200], &what).await?;
        let body = resp
            .read_limited(d.size as usize)
            .await
            .map_err(|e| self.http_err(e))?;
        Counters::add(&self.counters.bytes, body.len() as u64);
        if body.len() as u64 != d.size {
            return Err(self.verify_err(
                &what,
                format!("{} bytes received, expected {}", body.len(), d.size),
            ));
        }
        let got = manifest::sha256_of(&body);
        if got != d.digest {
            return Err(self.verify_err(&what, format!("the bytes received hash to {got}")));
        }
        Ok(body)
    }

    /// Under the lease: layers, then config, manifest, index (children before the parents whose
    /// labels point at them), then unpack and the image record. Returns (bytes, layers) fetched.
    async fn fetch_and_unpack(
        &mut self,
        client: &mut Client,
        plan: &Plan,
    ) -> Result<(u64, usize), PullError> {
        let name = self.name;
        let layers = &plan.manifest.layers;
        let total: u64 = layers.iter().map(|l| l.size).sum();
        log::info!(
            "pulling {name} ({}) from {}: {} layers, {}",
            plan.config.platform,
            self.registry(),
            layers.len(),
            human(total)
        );
        let mut progress = Progress::new(total);
        let (mut fetched, mut downloaded) = (0, 0);
        let source_key = format!("containerd.io/distribution.source.{}", self.r.domain);
        for (i, layer) in layers.iter().enumerate() {
            let diff_id = &plan.config.diff_ids[i];
            let labels = [
                ("containerd.io/uncompressed", diff_id.as_str()),
                (source_key.as_str(), self.r.path.as_str()),
            ];
            let n = self
                .fetch_layer(client, i, layer, &labels, &mut progress)
                .await?;
            if n > 0 {
                fetched += 1;
                downloaded += n;
            } else {
                progress.advance(layer.size);
            }
        }
        // Config: its snapshot label keeps the unpacked chain alive (spec §3.1 step 4).
        let top_chain = plan.chain.last().cloned().unwrap_or_default();
        let snap_key = format!("containerd.io/gc.ref.snapshot.{}", self.cfg.snapshotter);
        let c = &plan.manifest.config;
        self.put_small(
            client,
            "config",
            &c.digest,
            &plan.config_bytes,
            &[(&snap_key, &top_chain), (&source_key, &self.r.path)],
        )
        .await?;
        let mut mlabels: Vec<(String, String)> = vec![(
            "containerd.io/gc.ref.content.config".into(),
            c.digest.clone(),
        )];
        for (i, l) in layers.iter().enumerate() {
            mlabels.push((
                format!("containerd.io/gc.ref.content.l.{i}"),
                l.digest.clone(),
            ));
        }
        mlabels.push((source_key.clone(), self.r.path.clone()));
        self.put_small(
            client,
            "manifest",
            &plan.manifest_desc.digest,
            &plan.manifest_bytes,
            &pairs(&mlabels),
        )
        .await?;
        if let Some(ix) = &plan.index {
            let mut ilabels: Vec<(String, String)> = ix
                .manifests
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    (
                        format!("containerd.io/gc.ref.content.m.{i}"),
                        d.digest.clone(),
                    )
                })
                .collect();
            ilabels.push((source_key.clone(), self.r.path.clone()));
            self.put_small(
                client,
                "index",
                &plan.top.digest,
                &plan.top_bytes,
                &pairs(&ilabels),
            )
            .await?;
        }
        unpack(client, &self.cfg.snapshotter, name, plan, self.counters).await?;
        let image = ctrd::Image {
            name: name.to_owned(),
            target: plan.top.clone(),
            ..ctrd::Image::default()
        };
        client
            .image_put(&image)
            .await
            .map_err(|e| cerr(name, "creating the image record", e))?;
        Ok((downloaded, fetched))
    }

    /// Writes an in-memory document; if it already existed, makes sure it has our labels.
    async fn put_small(
        &self,
        client: &Client,
        kind: &str,
        digest: &str,
        bytes: &[u8],
        labels: &[(&str, &str)],
    ) -> Result<(), PullError> {
        let reference = format!("{kind}-{digest}");
        let outcome = with_retry(|| client.write_blob(&reference, digest, bytes, labels))
            .await
            .map_err(|e| cerr(self.name, "writing content", e))?;
        if outcome == ctrd::client::WriteOutcome::AlreadyExists {
            ensure_labels(client, self.name, digest, labels).await?;
        }
        Ok(())
    }

    /// Streams one layer from the registry into containerd, verifying size and digest on the
    /// way; returns the bytes downloaded (0: containerd already had it).
    async fn fetch_layer(
        &self,
        client: &Client,
        i: usize,
        layer: &Descriptor,
        labels: &[(&str, &str)],
        progress: &mut Progress,
    ) -> Result<u64, PullError> {
        let name = self.name;
        let what = format!("layer {}", layer.digest);
        let reference = format!("layer-{}", layer.digest);
        let ingest = with_retry(|| client.content_writer(&reference, &layer.digest, layer.size))
            .await
            .map_err(|e| cerr(name, "starting a content write", e))?;
        let mut w = match ingest {
            Ingest::Exists => {
                ensure_labels(client, name, &layer.digest, labels).await?;
                return Ok(0);
            }
            Ingest::Writer(w) => w,
        };
        let resume = w.offset();
        if resume < layer.size {
            let range = format!("bytes={resume}-");
            let mut headers = vec![];
            if resume > 0 {
                headers.push(("Range", range.as_str()));
            }
            let mut resp = self
                .request(
                    "GET",
                    &format!("/v2/{}/blobs/{}", self.r.path, layer.digest),
                    &headers,
                )
                .await?;
            self.expect(&mut resp, &[200, 206], &what).await?;
            // A registry that ignores Range sends everything: skip what containerd holds, but
            // hash it, which then verifies the whole blob locally.
            let mut skip = if resp.status() == 200 { resume } else { 0 };
            let mut hasher = (skip > 0 || resume == 0).then(Sha256::new);
            let mut received = if resp.status() == 206 { resume } else { 0 };
            let mut buf = vec![0u8; ctrd::client::WRITE_CHUNK];
            let mut filled = 0;
            loop {
                let n = resp
                    .read(&mut buf[filled..])
                    .await
                    .map_err(|e| self.http_err(e))?;
                if n == 0 {
                    break;
                }
                received += n as u64;
                if received > layer.size {
                    return Err(self.verify_err(
                        &what,
                        format!("more than the {} bytes announced", layer.size),
                    ));
                }
                if let Some(h) = hasher.as_mut() {
                    h.update(&buf[filled..filled + n]);
                }
                Counters::add(&self.counters.bytes, n as u64);
                if progress.advance(n as u64) {
                    log::info!(
                        "pulling {name}: {} of {} ({}%), layer {}",
                        human(progress.done),
                        human(progress.total),
                        progress.percent(),
                        i + 1
                    );
                }
                filled += n;
                if skip > 0 {
                    let k = (skip as usize).min(filled);
                    buf.copy_within(k..filled, 0);
                    filled -= k;
                    skip -= k as u64;
                }
                if filled == buf.len() {
                    w.write(&buf)
                        .await
                        .map_err(|e| cerr(name, "writing a layer", e))?;
                    filled = 0;
                }
            }
            if received != layer.size {
                return Err(self.verify_err(
                    &what,
                    format!("{received} bytes received, expected {}", layer.size),
                ));
            }
            if let Some(h) = hasher {
                let got = manifest::digest_string(h);
                if got != layer.digest {
                    return Err(self.verify_err(&what, format!("the bytes received hash to {got}")));
                }
            }
            w.write(&buf[..filled])
                .await
                .map_err(|e| cerr(name, "writing a layer", e))?;
            Counters::add(&self.counters.layers, 1);
        }
        // containerd checks the digest of the whole ingest again at commit (the only check
        // there is for a resumed download).
        w.commit(labels).await.map_err(|e| match e.code() {
            Some(ctrd::Code::FailedPrecondition) => {
                self.verify_err(&what, format!("containerd refused the commit: {e}"))
            }
            _ => cerr(name, "committing a layer", e),
        })?;
        Ok(layer.size - resume)
    }
}

fn pairs(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Sets the labels a blob lacks (it existed before this pull, perhaps pulled without unpack).
async fn ensure_labels(
    client: &Client,
    name: &str,
    digest: &str,
    labels: &[(&str, &str)],
) -> Result<(), PullError> {
    // Content/Info and Update need `&mut` (the control connection) while the layer writers
    // share `&Client`: a short-lived second client costs one connection.
    let mut c = Client::new(ctrd::Options::new(client.socket(), client.namespace()))
        .map_err(|e| cerr(name, "checking content labels", e))?;
    let info = c
        .content_info(digest)
        .await
        .map_err(|e| cerr(name, "checking content labels", e))?;
    let missing: Vec<(&str, &str)> = labels
        .iter()
        .filter(|(k, v)| !info.labels.iter().any(|(ik, iv)| ik == k && iv == v))
        .copied()
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    c.content_update_labels(digest, &missing)
        .await
        .map_err(|e| cerr(name, "labelling existing content", e))
}

/// containerd answers Unavailable while another writer holds the same ingest ref (a
/// concurrent pull of the same image): wait for it, up to a minute.
async fn with_retry<T, F, Fut>(mut f: F) -> Result<T, ctrd::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ctrd::Error>>,
{
    let mut tries = 0;
    loop {
        match f().await {
            Err(e) if e.code() == Some(ctrd::Code::Unavailable) && tries < 120 => {
                tries += 1;
                async_io::Timer::after(Duration::from_millis(500)).await;
            }
            r => return r,
        }
    }
}

// ------------------------------------------------------------------ unpack

/// Per layer: Stat the chain id (skip if committed), else Prepare on the parent chain, Apply
/// the blob, check the diff_id, Commit as the chain id (spec §3.1 step 4).
async fn unpack(
    client: &mut Client,
    snapshotter: &str,
    name: &str,
    plan: &Plan,
    counters: &Counters,
) -> Result<(), PullError> {
    let mut parent = String::new();
    for (i, layer) in plan.manifest.layers.iter().enumerate() {
        let chain = &plan.chain[i];
        match client.snapshot_stat(snapshotter, chain).await {
            Ok(info) if info.kind == SnapshotKind::Committed => {
                parent.clone_from(chain);
                continue;
            }
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(cerr(name, "checking a snapshot", e)),
        }
        let key = format!("extract-{}-{} {chain}", nanos(), std::process::id());
        let labels = [("containerd.io/snapshot.ref", chain.as_str())];
        let mounts = client
            .snapshot_prepare(snapshotter, &key, &parent, &labels)
            .await
            .map_err(|e| cerr(name, "preparing a snapshot", e))?;
        let desc = descriptor(&layer.media_type, &layer.digest, layer.size);
        let applied = match client.diff_apply(&desc, &mounts).await {
            Ok(a) => a,
            Err(e) => {
                let _ = client.snapshot_remove(snapshotter, &key).await;
                return Err(cerr(name, "unpacking a layer", e));
            }
        };
        let diff_id = &plan.config.diff_ids[i];
        if applied.digest != *diff_id {
            let _ = client.snapshot_remove(snapshotter, &key).await;
            return Err(PullError::Verify {
                image: name.to_owned(),
                what: format!("layer {}", layer.digest),
                detail: format!(
                    "it unpacks to {}, but the image config says diff_id {diff_id}",
                    applied.digest
                ),
            });
        }
        match client
            .snapshot_commit(snapshotter, chain, &key, &labels)
            .await
        {
            Ok(()) => {}
            // Another pull committed the same chain meanwhile: theirs is as good as ours.
            Err(e) if e.is_already_exists() => {
                let _ = client.snapshot_remove(snapshotter, &key).await;
            }
            Err(e) => {
                let _ = client.snapshot_remove(snapshotter, &key).await;
                return Err(cerr(name, "committing a snapshot", e));
            }
        }
        Counters::add(&counters.layers_unpacked, 1);
        parent.clone_from(chain);
    }
    Ok(())
}

// ------------------------------------------------------------------ small helpers

fn nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn lease_id() -> String {
    format!("oak-pull-{}-{}", nanos(), std::process::id())
}

fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    let s: String = s.chars().filter(|c| !c.is_control()).take(200).collect();
    s.trim().to_owned()
}

/// RFC 3339 UTC (`2024-05-01T12:00:00Z`) for containerd's `gc.expire` label.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        let at = |s: u64| rfc3339(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_714_564_800), "2024-05-01T12:00:00Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59Z");
    }

    #[test]
    fn error_messages_name_registry_image_and_fix() {
        let e = PullError::Status {
            registry: "10.0.0.5:5000".into(),
            image: "10.0.0.5:5000/oak/app:1".into(),
            what: "manifest 1".into(),
            status: 404,
            detail: "{\"errors\":[{\"code\":\"MANIFEST_UNKNOWN\"}]}".into(),
        };
        let s = e.status_detail();
        assert!(s.starts_with("registry 10.0.0.5:5000 answered 404 for manifest 1 of 10.0.0.5:5000/oak/app:1: check the image name and tag"), "{s}");
        let e = PullError::NoPlatform {
            image: "x".into(),
            detail:
                "is an image index that has no linux/arm/v7 entry (has: linux/amd64, linux/arm64)"
                    .into(),
        };
        assert_eq!(
            e.to_string(),
            "image x is an image index that has no linux/arm/v7 entry (has: linux/amd64, linux/arm64)"
        );
        let e = PullError::Http {
            image: "127.0.0.1:5000/a:latest".into(),
            source: http::Error::Tls {
                authority: "127.0.0.1:5000".into(),
                detail: String::new(),
                plain_http: true,
            },
        };
        assert!(
            e.to_string().contains(
                "speaks plain HTTP, not HTTPS: add 127.0.0.1:5000 to OAK_INSECURE_REGISTRIES"
            ),
            "{e}"
        );
    }

    #[test]
    fn single_platform_images_must_fit() {
        let cfg = |p: &str| ImageConfig {
            platform: Platform::parse(p).unwrap(),
            run: RunConfig::default(),
            diff_ids: vec![],
        };
        let want = Platform::parse("linux/arm/v7").unwrap();
        assert!(check_single_platform("x", &cfg("linux/arm/v6"), &want).is_ok());
        let e = check_single_platform("x", &cfg("linux/amd64"), &want).unwrap_err();
        assert_eq!(
            e.to_string(),
            "image x is a single-platform linux/amd64 image; this node needs linux/arm/v7"
        );
    }
}
