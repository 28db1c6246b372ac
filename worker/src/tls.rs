//! TLS for the worker's outgoing connections (cluster registration, MQTT broker, registries):
//! CA roots, a client certificate and key from PEM files, rustls `ClientConfig`s on ring, and
//! handshake failures turned into messages that name the setting to fix. No server side; files
//! are read once at start (a renewed certificate needs a restart); no revocation checks.

use std::fmt;
use std::io;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_io::Async;
use futures_lite::{AsyncRead, AsyncWrite};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError, RootCertStore};

use crate::netio;

/// CA bundles tried in order when `SSL_CERT_FILE` is unset (Debian/Raspberry Pi OS first).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// A certificate or key file is a few KiB; anything this big is the wrong file.
const MAX_PEM_FILE: u64 = 1 << 20;

/// A file named by a setting, so errors can say which setting to change.
#[derive(Debug, Clone, Copy)]
pub struct Setting<'a> {
    pub name: &'static str,
    pub path: &'a Path,
}

#[derive(Debug)]
pub enum TlsError {
    Read {
        setting: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    TooLarge {
        setting: &'static str,
        path: PathBuf,
    },
    NotPem {
        setting: &'static str,
        path: PathBuf,
        detail: String,
    },
    BadCa {
        setting: &'static str,
        path: PathBuf,
        detail: String,
    },
    NoCert {
        setting: &'static str,
        path: PathBuf,
    },
    EncryptedKey {
        setting: &'static str,
        path: PathBuf,
    },
    NoKey {
        setting: &'static str,
        path: PathBuf,
    },
    KeyMismatch {
        cert_setting: &'static str,
        cert: PathBuf,
        key_setting: &'static str,
        key: PathBuf,
    },
    BadKey {
        setting: &'static str,
        path: PathBuf,
        detail: String,
    },
    /// One of a certificate/key pair is configured without the other.
    HalfPair {
        set: &'static str,
        missing: &'static str,
    },
    NoRoots {
        extra_setting: &'static str,
    },
    Setup(String),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Read { setting, path, err } => {
                write!(f, "{setting} {}: cannot read it: {err}", path.display())
            }
            TlsError::TooLarge { setting, path } => write!(
                f,
                "{setting} {}: larger than 1 MiB, so not a PEM certificate or key file",
                path.display()
            ),
            TlsError::NotPem {
                setting,
                path,
                detail,
            } => write!(
                f,
                "{setting} {}: not a PEM certificate file: {detail}",
                path.display()
            ),
            TlsError::BadCa {
                setting,
                path,
                detail,
            } => write!(
                f,
                "{setting} {}: unusable certificate: {detail}",
                path.display()
            ),
            TlsError::NoCert { setting, path } => {
                write!(f, "{setting} {} holds no PEM certificate", path.display())
            }
            TlsError::EncryptedKey { setting, path } => write!(
                f,
                "{setting} {} is an encrypted (password-protected) key, which the worker cannot \
                 unlock unattended: decrypt it with `openssl pkey -in <key> -out <plain key>` and \
                 keep the result readable by root only (chmod 600)",
                path.display()
            ),
            TlsError::NoKey { setting, path } => write!(
                f,
                "{setting} {} holds no PEM private key (expected BEGIN PRIVATE KEY, \
                 BEGIN RSA PRIVATE KEY or BEGIN EC PRIVATE KEY)",
                path.display()
            ),
            TlsError::KeyMismatch {
                cert_setting,
                cert,
                key_setting,
                key,
            } => write!(
                f,
                "{key_setting} {} does not belong to {cert_setting} {}: their public keys \
                 differ; configure the key the certificate was issued for",
                key.display(),
                cert.display(),
            ),
            TlsError::BadKey {
                setting,
                path,
                detail,
            } => write!(
                f,
                "{setting} {}: unusable key: {detail} (RSA, ECDSA P-256/P-384 and Ed25519 keys \
                 are supported)",
                path.display()
            ),
            TlsError::HalfPair { set, missing } => write!(
                f,
                "{set} is set but {missing} is not: a client certificate needs both \
                 (`NodeEngine config auth -c <cert> -k <key>` sets the pair)"
            ),
            TlsError::NoRoots { extra_setting } => write!(
                f,
                "no CA certificates for TLS: install the ca-certificates package, or set \
                 {extra_setting} (or SSL_CERT_FILE) to a PEM file"
            ),
            TlsError::Setup(d) => write!(f, "TLS setup: {d}"),
        }
    }
}

impl std::error::Error for TlsError {}

fn read_pem_file(s: Setting<'_>) -> Result<Vec<u8>, TlsError> {
    let read = |err| TlsError::Read {
        setting: s.name,
        path: s.path.to_owned(),
        err,
    };
    let len = std::fs::metadata(s.path).map_err(read)?.len();
    if len > MAX_PEM_FILE {
        return Err(TlsError::TooLarge {
            setting: s.name,
            path: s.path.to_owned(),
        });
    }
    std::fs::read(s.path).map_err(read)
}

/// The certificates of a PEM file; at least one, all well-formed.
pub fn load_certs(s: Setting<'_>) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem_file(s)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::NotPem {
            setting: s.name,
            path: s.path.to_owned(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert {
            setting: s.name,
            path: s.path.to_owned(),
        });
    }
    Ok(certs)
}

/// An unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(s: Setting<'_>) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_pem_file(s)?;
    // The PEM reader skips sections it does not know, so an encrypted key would otherwise be
    // reported as "no key": say what it is instead (PKCS#8 and OpenSSL's legacy header).
    if find(&pem, b"-----BEGIN ENCRYPTED PRIVATE KEY-----") || find(&pem, b"Proc-Type: 4,ENCRYPTED")
    {
        return Err(TlsError::EncryptedKey {
            setting: s.name,
            path: s.path.to_owned(),
        });
    }
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            setting: s.name,
            path: s.path.to_owned(),
        },
        e => TlsError::BadKey {
            setting: s.name,
            path: s.path.to_owned(),
            detail: e.to_string(),
        },
    })
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The system bundle (or `SSL_CERT_FILE`) plus the CA file of `extra`, which is additive:
/// publicly signed servers stay trusted with it set.
pub fn roots(
    extra: Option<Setting<'_>>,
    extra_setting: &'static str,
) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let bundles: Vec<PathBuf> = match std::env::var_os("SSL_CERT_FILE") {
        Some(p) => vec![PathBuf::from(p)],
        None => SYSTEM_BUNDLES.iter().map(PathBuf::from).collect(),
    };
    if let Some(path) = bundles.iter().find(|p| p.is_file()) {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| TlsError::Setup(format!("cannot read CA bundle {}: {e}", path.display())))?
            .filter_map(Result::ok);
        // A distribution bundle may carry certificates webpki rejects; skipping them is what
        // every TLS client does.
        let (added, _ignored) = roots.add_parsable_certificates(certs);
        log::debug!("{added} CA certificates from {}", path.display());
    }
    if let Some(s) = extra {
        for cert in load_certs(s)? {
            roots.add(cert).map_err(|e| TlsError::BadCa {
                setting: s.name,
                path: s.path.to_owned(),
                detail: e.to_string(),
            })?;
        }
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots { extra_setting });
    }
    Ok(roots)
}

/// A client certificate chain with its key, checked to belong together.
#[derive(Debug)]
pub struct Identity {
    cert_setting: &'static str,
    cert_path: PathBuf,
    key_setting: &'static str,
    key_path: PathBuf,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Identity {
    /// `cert` and `key` as configured; either alone is an error naming the other.
    pub fn load(
        cert: Option<Setting<'_>>,
        key: Option<Setting<'_>>,
    ) -> Result<Option<Identity>, TlsError> {
        let (cert, key) = match (cert, key) {
            (None, None) => return Ok(None),
            (Some(c), Some(k)) => (c, k),
            (Some(c), None) => {
                return Err(TlsError::HalfPair {
                    set: c.name,
                    missing: "its key",
                })
            }
            (None, Some(k)) => {
                return Err(TlsError::HalfPair {
                    set: k.name,
                    missing: "its certificate",
                })
            }
        };
        let chain = load_certs(cert)?;
        let key_der = load_key(key)?;
        Ok(Some(Identity {
            cert_setting: cert.name,
            cert_path: cert.path.to_owned(),
            key_setting: key.name,
            key_path: key.path.to_owned(),
            chain,
            key: key_der,
        }))
    }
}

/// A client configuration on ring with the safe protocol versions; `identity` is presented
/// when the server asks for a certificate. The key is checked against the certificate here.
pub fn client_config(
    roots: RootCertStore,
    identity: Option<Identity>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_root_certificates(roots);
    let cfg = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => {
            let Identity {
                cert_setting,
                cert_path,
                key_setting,
                key_path,
                chain,
                key,
            } = id;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                        TlsError::KeyMismatch {
                            cert_setting,
                            cert: cert_path,
                            key_setting,
                            key: key_path,
                        }
                    }
                    e => TlsError::BadKey {
                        setting: key_setting,
                        path: key_path,
                        detail: e.to_string(),
                    },
                })?
        }
    };
    Ok(Arc::new(cfg))
}

// ------------------------------------------------------------------ connecting

/// Everything needed to open TLS connections to one kind of server, plus what to tell the
/// operator when the handshake fails.
#[derive(Clone)]
pub struct Connector {
    config: Arc<rustls::ClientConfig>,
    /// What the server is verified against, e.g. "the system CAs and OAK_MQTT_CA /etc/ca.pem".
    trust: String,
    /// The setting that adds a CA for this server.
    ca_setting: &'static str,
    /// What to do when the server wants a client certificate and none is configured.
    no_cert_hint: &'static str,
    has_identity: bool,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("trust", &self.trust)
            .field("client_certificate", &self.has_identity)
            .finish()
    }
}

impl Connector {
    /// `ca`: the extra CA file and the setting it came from; `ca_setting`: the setting an
    /// operator should set when the server is not trusted (named even when unset);
    /// `no_cert_hint`: the fix when the server wants a client certificate and `identity` is
    /// `None`.
    pub fn new(
        ca: Option<Setting<'_>>,
        ca_setting: &'static str,
        identity: Option<Identity>,
        no_cert_hint: &'static str,
    ) -> Result<Connector, TlsError> {
        let has_identity = identity.is_some();
        let config = client_config(roots(ca, ca_setting)?, identity)?;
        let trust = match ca {
            Some(s) => format!("the system CAs and {} {}", s.name, s.path.display()),
            None => format!("the system CAs only, {ca_setting} unset"),
        };
        Ok(Connector {
            config,
            trust,
            ca_setting,
            no_cert_hint,
            has_identity,
        })
    }

    pub fn presents_certificate(&self) -> bool {
        self.has_identity
    }

    /// TLS over an open TCP connection; the server must present a certificate valid for
    /// `host` (an IP literal is checked against the certificate's IP addresses).
    pub async fn handshake(
        &self,
        tcp: Async<TcpStream>,
        host: &str,
        limit: Duration,
    ) -> io::Result<Stream> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(bare.to_owned()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{host:?} is not usable as a TLS server name: {e}"),
            )
        })?;
        let connector = futures_rustls::TlsConnector::from(self.config.clone());
        let s = netio::timeout(limit, "TLS handshake", connector.connect(name, tcp))
            .await
            .map_err(|e| self.explain_at(host, &e, true))?;
        Ok(Stream::Tls(Box::new(s)))
    }

    /// The error with what it means for this connection and the setting that fixes it. Used
    /// for reads too: with TLS 1.3 a server's refusal of our certificate (or of its absence)
    /// arrives as an alert after the client has finished its side of the handshake.
    pub fn explain(&self, host: &str, e: &io::Error) -> io::Error {
        self.explain_at(host, e, false)
    }

    fn explain_at(&self, host: &str, e: &io::Error, handshake: bool) -> io::Error {
        let text = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(r) => match self.hint(host, r) {
                Some(h) => format!("TLS: {e}: {h}"),
                None => format!("TLS: {e}"),
            },
            // Servers that reject a client during the handshake often just close (or reset) the
            // socket; so does mosquitto's plain listener when a ClientHello arrives.
            None if handshake
                && matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                ) =>
            {
                format!(
                "TLS: {e}: the server closed the connection during the handshake: is this port \
                 a TLS listener, and does it accept this client?"
                )
            }
            None => e.to_string(),
        };
        io::Error::new(e.kind(), text)
    }

    fn hint(&self, host: &str, e: &rustls::Error) -> Option<String> {
        use rustls::Error as E;
        Some(match e {
            E::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                    "the server's certificate is not signed by a CA trusted here ({}); set {} \
                     to the PEM file of the CA that signed it",
                    self.trust, self.ca_setting
                ),
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => format!(
                    "the server's certificate is not issued for {host}: it needs a \
                     subjectAltName for it (an IP address entry when the cluster address is an IP)"
                ),
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => "a certificate is outside its \
                     validity period: check this device's clock (a Raspberry Pi without a \
                     real-time clock needs NTP before connecting)"
                    .to_string(),
                _ => return None,
            },
            E::AlertReceived(
                AlertDescription::CertificateRequired
                | AlertDescription::HandshakeFailure
                | AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown
                | AlertDescription::AccessDenied,
            ) => {
                if self.has_identity {
                    "the server refused our client certificate: it must be signed by a CA the \
                     server trusts (mosquitto's cafile) and be within its validity period"
                        .to_string()
                } else {
                    format!(
                        "the server requires a client certificate: {}",
                        self.no_cert_hint
                    )
                }
            }
            E::InvalidMessage(rustls::InvalidMessage::InvalidContentType) => {
                "the server does not speak TLS on this port (a plain-text listener?)".to_string()
            }
            _ => return None,
        })
    }
}

/// Opens `host:port`, with TLS when `tls` is given; `limit` bounds the connect and the
/// handshake separately.
pub async fn connect(
    host: &str,
    port: u16,
    tls: Option<&Connector>,
    limit: Duration,
) -> io::Result<Stream> {
    let tcp = netio::connect(host, port, limit).await?;
    match tls {
        Some(c) => c.handshake(tcp, host, limit).await,
        None => Ok(Stream::Plain(tcp)),
    }
}

/// A connection to the cluster, plain or TLS: one concrete type, so the protocol code above it
/// is compiled once.
pub enum Stream {
    Plain(Async<TcpStream>),
    /// Boxed: the rustls state is large and moved around while connecting.
    Tls(Box<futures_rustls::client::TlsStream<Async<TcpStream>>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_close(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_close(cx),
        }
    }
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn dir(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("oak-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
    fn s<'a>(name: &'static str, path: &'a Path) -> Setting<'a> {
        Setting { name, path }
    }

    #[test]
    fn file_errors_name_the_setting_and_the_file() {
        let d = dir("files");
        let missing = d.0.join("missing.pem");
        let e = load_certs(s("OAK_MQTT_CERT", &missing))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!(
                "OAK_MQTT_CERT {}: cannot read it",
                missing.display()
            )),
            "{e}"
        );

        let text = d.0.join("text.pem");
        std::fs::write(&text, "hello").unwrap();
        let e = load_certs(s("OAK_MQTT_CA", &text)).unwrap_err().to_string();
        assert!(
            e.contains("OAK_MQTT_CA") && e.contains("holds no PEM certificate"),
            "{e}"
        );
        let e = load_key(s("OAK_MQTT_KEY", &text)).unwrap_err().to_string();
        assert!(
            e.contains("OAK_MQTT_KEY") && e.contains("holds no PEM private key"),
            "{e}"
        );

        // Detected from the armour alone: both PKCS#8 and OpenSSL's legacy encrypted form.
        let enc = d.0.join("enc.pem");
        std::fs::write(
            &enc,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = load_key(s("OAK_MQTT_KEY", &enc)).unwrap_err().to_string();
        assert!(e.contains("encrypted") && e.contains("openssl pkey"), "{e}");
        std::fs::write(
            &enc,
            "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nAAAA\n-----END RSA PRIVATE KEY-----\n",
        )
        .unwrap();
        assert!(matches!(
            load_key(s("OAK_MQTT_KEY", &enc)),
            Err(TlsError::EncryptedKey { .. })
        ));

        let big = d.0.join("big.pem");
        std::fs::write(&big, vec![b'a'; (MAX_PEM_FILE + 1) as usize]).unwrap();
        assert!(matches!(
            load_key(s("OAK_MQTT_KEY", &big)),
            Err(TlsError::TooLarge { .. })
        ));
    }

    #[test]
    fn half_a_pair_is_refused() {
        let p = Path::new("/x.pem");
        assert!(Identity::load(None, None).unwrap().is_none());
        let e = Identity::load(Some(s("OAK_MQTT_CERT", p)), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("OAK_MQTT_CERT is set but its key is not"),
            "{e}"
        );
        let e = Identity::load(None, Some(s("OAK_MQTT_KEY", p)))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("OAK_MQTT_KEY is set but its certificate is not"),
            "{e}"
        );
    }
}
