//! Airlock's egress proxy: the only way out of a sandbox container.
//!
//! One [`Egress`] per runtime holds the configuration, the runtime's
//! [`EgressCa`], the [`SecretSource`] credentials come from, and the
//! [`DecisionSink`] every decision is reported to. [`Egress::bind_sandbox`]
//! gives a sandbox its own proxy: a Unix socket (`proxy.sock`) and a trust
//! bundle (`ca-bundle.pem`) in a directory the runtime bind-mounts into the
//! container; the sandbox is identified by the socket it connects to.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use airlock_core::network::NetworkPolicy;
//! # use airlock_egress::{Egress, EgressCa, EgressConfig, NoSink, SecretSource};
//! # struct Store;
//! # impl SecretSource for Store { fn secret(&self, _: &str) -> Option<String> { None } }
//! # async fn run(home: &std::path::Path, policy: NetworkPolicy, narrower: NetworkPolicy) -> Result<(), airlock_egress::EgressError> {
//! let ca = EgressCa::load_or_create(&home.join("egress-ca"))?;
//! let egress = Egress::new(EgressConfig::default(), ca, Arc::new(Store), Arc::new(NoSink))?;
//! let (policy_tx, policy_rx) = tokio::sync::watch::channel(Arc::new(policy));
//! let handle = egress.bind_sandbox("sbx-1".to_owned(), &home.join("sandboxes/sbx-1/egress"), policy_rx)?;
//! // The container mounts that directory; its processes use proxy.sock and trust ca-bundle.pem.
//! let _ = policy_tx.send(Arc::new(narrower)); // applies to the next request
//! handle.shutdown(); // stops accepting, ends open tunnels
//! # Ok(()) }
//! ```
//!
//! Behaviour, per connection on the socket (HTTP/1.1, keep-alive):
//!
//! - **Plain HTTP**: absolute-form requests (`GET http://host:port/path`),
//!   decided on the URL's host, port and method; the `Host` header must agree.
//!   The request goes upstream in origin form, without hop-by-hop and
//!   `Proxy-*` headers, with the rule's headers set (replacing any of the same
//!   name), bodies streamed both ways.
//! - **CONNECT host:port**: decided on the authority (method unknown). The
//!   tunnel must carry TLS whose ClientHello names the same host in SNI (an
//!   IP-literal authority may omit SNI). If the rule
//!   [needs termination](airlock_core::network::HostRule::needs_termination)
//!   the proxy terminates TLS with a leaf from the CA and serves HTTP/1.1
//!   inside, deciding every request (method included), setting headers, and
//!   forwarding over verified TLS; otherwise the bytes are tunnelled untouched.
//! - The policy is read from the watch channel for every request (and every
//!   request inside a terminated tunnel). An untouched tunnel is decided once,
//!   when it opens.
//! - The proxy resolves names itself (or uses the rule's `connect_to`) and
//!   refuses loopback, private, link-local, metadata and other internal
//!   addresses unless the rule names the address ([`is_forbidden`]).
//! - Answers: 403 for a denial (naming the host and the policy), 400 for a bad
//!   request, 502 when upstream fails, 504 when it times out, 503 beyond the
//!   per-sandbox connection limit, 431 for oversized headers.
//!
//! [`Egress::send_request`] applies the same policy, header injection and
//! dialling to one request handed in directly (for the isolate tier's
//! outbound HTTP hook), with a typed [`OutboundError`] for refusals.
//!
//! Secret values are never logged, never put in an error or a response.

mod addr;
mod ca;
mod io;
mod outbound;
mod proxy;
mod socket;

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use addr::is_forbidden;
use airlock_core::network::DenyReason;
pub use ca::{CA_CERT_FILE, CA_KEY_FILE, EgressCa, MAX_CACHED_LEAVES};
pub use outbound::{OutboundBody, OutboundError};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
pub use socket::{MAX_PENDING_REFUSALS, ProxyHandle, REFUSAL_LINGER};

/// Where hosts keep their trust bundle (Debian and its kin). Copied into
/// every sandbox's `ca-bundle.pem`, and trusted when the proxy dials HTTPS.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// How long a connection (or tunnel) may move no byte in either direction
/// before the proxy closes it: bounds the sockets an idle sandbox holds.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long resolving and dialling an upstream may take: a sandbox cannot
/// park a connection on a black-holed address for long.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an upstream may take to answer a request's headers (504 after).
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a client may take to send its TLS ClientHello after CONNECT,
/// and to finish the handshake when the proxy terminates TLS.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request head, counted from when the
/// proxy starts waiting for it (so also the longest a kept-alive connection
/// waits for its next request): bounds slow-header (slowloris) clients.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest request head (request line and headers) the proxy reads:
/// bounds the memory one request can make it hold (431 beyond).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// The smallest header limit the configuration may set: a request line and
/// a few headers must fit.
pub const MIN_HEADER_BYTES: usize = 1024;
/// The largest TLS ClientHello the proxy reads to find SNI: real ones are a
/// few KiB; a bigger one is refused rather than buffered.
pub const MAX_CLIENT_HELLO_BYTES: usize = 32 * 1024;
/// Connections one sandbox may hold open through its proxy at once: bounds
/// the sockets and tasks one sandbox can take from the host (503 beyond).
pub const DEFAULT_MAX_CONNECTIONS_PER_SANDBOX: usize = 256;

/// The proxy's configuration. Every limit has a default named above.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EgressConfig {
    /// Extra root certificates (PEM, one or more each) trusted when the proxy
    /// itself dials HTTPS (terminated tunnels), beside the system bundle and
    /// the webpki roots. Tests give a test CA here. Default: none.
    pub extra_upstream_roots_pem: Vec<String>,
    /// The host's trust bundle: copied into sandboxes' `ca-bundle.pem` and
    /// trusted upstream. Default [`SYSTEM_CA_BUNDLE`]; a missing file is skipped.
    pub system_ca_bundle: Option<PathBuf>,
    /// Default [`DEFAULT_IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
    /// Default [`DEFAULT_CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// Default [`DEFAULT_RESPONSE_TIMEOUT`].
    pub response_timeout: Duration,
    /// Default [`DEFAULT_HANDSHAKE_TIMEOUT`].
    pub handshake_timeout: Duration,
    /// Default [`DEFAULT_HEADER_TIMEOUT`].
    pub header_timeout: Duration,
    /// Default [`DEFAULT_MAX_HEADER_BYTES`]; raised to [`MIN_HEADER_BYTES`] if smaller.
    pub max_header_bytes: usize,
    /// Default [`DEFAULT_MAX_CONNECTIONS_PER_SANDBOX`].
    pub max_connections_per_sandbox: usize,
}

impl Default for EgressConfig {
    fn default() -> Self {
        Self {
            extra_upstream_roots_pem: Vec::new(),
            system_ca_bundle: Some(PathBuf::from(SYSTEM_CA_BUNDLE)),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_connections_per_sandbox: DEFAULT_MAX_CONNECTIONS_PER_SANDBOX,
        }
    }
}

/// Where credential values come from, by the secret names rules refer to.
/// Values are never logged and never put in errors or responses.
pub trait SecretSource: Send + Sync {
    /// The value of secret `name`, or `None` if it is not set (the request
    /// is then refused rather than sent without its credential).
    fn secret(&self, name: &str) -> Option<String>;
}

/// Receives every decision the proxy takes. Called on the proxy's tasks:
/// implementations must not block (record, count, or send to a channel).
pub trait DecisionSink: Send + Sync {
    fn record(&self, decision: Decision);
}

/// A sink that drops every decision.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoSink;

impl DecisionSink for NoSink {
    fn record(&self, _decision: Decision) {}
}

/// One request (plain HTTP, or inside a terminated tunnel) or one untouched
/// tunnel. Denials are reported at once; allowed exchanges when they end,
/// with their bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Decision {
    /// The sandbox id given to [`Egress::bind_sandbox`].
    pub sandbox: String,
    /// The host asked for (normalised when it is valid).
    pub host: String,
    pub port: u16,
    /// The request's method; `None` for an untouched tunnel.
    pub method: Option<String>,
    pub verdict: Verdict,
    /// The status the proxy answered (for HTTP requests and refused CONNECTs).
    pub status: Option<u16>,
    /// Bytes sent upstream: request body bytes for HTTP, all bytes for a tunnel.
    pub bytes_up: u64,
    /// Bytes received from upstream: response body bytes for HTTP, all bytes for a tunnel.
    pub bytes_down: u64,
    /// Was TLS terminated by the proxy for this request?
    pub terminated_tls: bool,
}

/// Allowed, or denied and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Denied(Denial),
}

/// Why the proxy refused a request or tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Denial {
    /// The sandbox's network policy says no.
    Policy(DenyReason),
    /// The host resolved only to addresses the proxy refuses (loopback,
    /// private, link-local, metadata...) and no rule names them.
    ForbiddenAddress(IpAddr),
    /// The tunnel's ClientHello carried no SNI.
    MissingSni,
    /// The SNI names another host than the CONNECT.
    SniMismatch,
    /// The tunnel did not start with a TLS ClientHello.
    NotTls,
    /// A header rule's secret is not set (the secret's name, never its value).
    MissingSecret(String),
    /// The request was malformed (its `Host` disagrees with its target...).
    BadRequest,
}

impl Denial {
    /// A short fixed label, for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Policy(DenyReason::Denied) => "policy_denied",
            Self::Policy(DenyReason::Port) => "policy_port",
            Self::Policy(DenyReason::Method) => "policy_method",
            Self::Policy(DenyReason::InvalidHost) => "invalid_host",
            Self::Policy(_) => "policy_not_allowed",
            Self::ForbiddenAddress(_) => "forbidden_address",
            Self::MissingSni => "missing_sni",
            Self::SniMismatch => "sni_mismatch",
            Self::NotTls => "not_tls",
            Self::MissingSecret(_) => "missing_secret",
            Self::BadRequest => "bad_request",
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Policy(reason) => write!(f, "{reason}"),
            Self::ForbiddenAddress(address) => {
                write!(f, "it resolves to {address}, an internal address the sandbox's network policy does not name")
            }
            Self::MissingSni => f.write_str("the TLS ClientHello names no server (SNI)"),
            Self::SniMismatch => f.write_str("the TLS server name (SNI) differs from the CONNECT host"),
            Self::NotTls => f.write_str("a CONNECT tunnel must carry TLS"),
            Self::MissingSecret(name) => {
                write!(f, "the secret {name:?} that the policy's header rule needs is not set")
            }
            Self::BadRequest => f.write_str("bad request"),
        }
    }
}

/// Errors setting up the egress proxy. Never carries a secret value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EgressError {
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("egress CA file {path} is damaged: {reason}; fix or remove it (nothing was replaced)")]
    CaDamaged { path: PathBuf, reason: String },
    #[error("egress CA key {path} has mode {mode:o}; it must be readable by its owner only (0600)")]
    CaKeyPermissions { path: PathBuf, mode: u32 },
    #[error("issuing a certificate: {0}")]
    Certificate(String),
    #[error("tls configuration: {0}")]
    Tls(String),
    #[error("extra upstream root certificate {index}: {reason}")]
    UpstreamRoot { index: usize, reason: String },
    #[error("{path} exists and is {kind}, not a socket or symlink; refusing to replace it")]
    SocketPathOccupied { path: PathBuf, kind: &'static str },
    #[error("{path} is not a directory (a symlink is not followed)")]
    NotADirectory { path: PathBuf },
    #[error("the egress proxy must be bound from within a tokio runtime")]
    NoRuntime,
}

/// The runtime's egress proxy factory. Cheap to clone.
#[derive(Clone)]
pub struct Egress {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: EgressConfig,
    pub(crate) ca: EgressCa,
    pub(crate) secrets: Arc<dyn SecretSource>,
    pub(crate) sink: Arc<dyn DecisionSink>,
    pub(crate) upstream_tls: Arc<rustls::ClientConfig>,
    /// The host's bundle, read once, copied into every sandbox's bundle.
    pub(crate) system_bundle: Option<String>,
}

impl fmt::Debug for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Egress").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

impl Egress {
    /// Builds the proxy factory: reads the system bundle (if present) and
    /// parses the extra upstream roots.
    pub fn new(
        mut config: EgressConfig,
        ca: EgressCa,
        secrets: Arc<dyn SecretSource>,
        sink: Arc<dyn DecisionSink>,
    ) -> Result<Self, EgressError> {
        config.max_header_bytes = config.max_header_bytes.max(MIN_HEADER_BYTES);
        config.max_connections_per_sandbox = config.max_connections_per_sandbox.max(1);
        let system_bundle = match &config.system_ca_bundle {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => Some(text),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
                Err(source) => {
                    return Err(EgressError::Io { what: "reading the system CA bundle", path: path.clone(), source });
                }
            },
            None => None,
        };
        let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        if let Some(bundle) = &system_bundle {
            let certs = CertificateDer::pem_slice_iter(bundle.as_bytes()).filter_map(Result::ok);
            roots.add_parsable_certificates(certs);
        }
        for (index, pem) in config.extra_upstream_roots_pem.iter().enumerate() {
            let root_error = |reason: String| EgressError::UpstreamRoot { index, reason };
            let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| root_error(error.to_string()))?;
            if certs.is_empty() {
                return Err(root_error("no PEM certificate found".to_owned()));
            }
            for cert in certs {
                roots.add(cert).map_err(|error| root_error(error.to_string()))?;
            }
        }
        let mut upstream_tls =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|error| EgressError::Tls(error.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
        upstream_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            inner: Arc::new(Inner { config, ca, secrets, sink, upstream_tls: Arc::new(upstream_tls), system_bundle }),
        })
    }

    /// The runtime's CA.
    pub fn ca(&self) -> &EgressCa {
        &self.inner.ca
    }

    /// The configuration in force (limits raised to their minimums).
    pub fn config(&self) -> &EgressConfig {
        &self.inner.config
    }
}
