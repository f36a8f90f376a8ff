//! The per-runtime certificate authority the proxy uses to terminate TLS for
//! hosts whose rule injects credentials (or checks methods), and the leaf
//! certificates it issues per host.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration as StdDuration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData,
};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

use crate::EgressError;

/// The CA certificate's file (PEM) in the CA directory.
pub const CA_CERT_FILE: &str = "egress-ca.pem";
/// The CA private key's file (PKCS#8 PEM, mode 0600) in the CA directory.
pub const CA_KEY_FILE: &str = "egress-ca.key";
/// The CA's common name: fixed, so the issuer rebuilt from the stored key
/// names the same subject as the stored certificate.
const CA_COMMON_NAME: &str = "Airlock egress CA";
const CA_ORGANIZATION: &str = "Airlock";
/// How long a new CA certificate is valid: ten years, so sandboxes' trust
/// bundles stay valid for the life of a runtime home.
const CA_VALIDITY_DAYS: i64 = 3650;
/// How long a leaf certificate is valid. Short: leaves are cheap and reissued.
const LEAF_VALIDITY_DAYS: i64 = 7;
/// Clock skew tolerated between the host and a sandbox: certificates start
/// this far in the past.
const BACKDATE: Duration = Duration::days(1);
/// A cached leaf is reissued after this age, well before it expires.
const LEAF_REISSUE_AFTER: StdDuration = StdDuration::from_secs(24 * 3600);
/// Hosts whose leaf certificate (and TLS server configuration) is cached: bounds
/// the memory a sandbox can make the proxy hold by naming many hosts. The
/// oldest entry is evicted first.
pub const MAX_CACHED_LEAVES: usize = 1024;

/// The runtime's egress CA: its certificate (installed in sandboxes' trust
/// bundles) and key (never leaves the host), plus a bounded cache of leaf
/// certificates issued from it.
pub struct EgressCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    leaves: Mutex<LeafCache>,
}

impl std::fmt::Debug for EgressCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressCa").field("key", &"[elided]").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct LeafCache {
    configs: HashMap<String, (Instant, Arc<ServerConfig>)>,
    order: VecDeque<String>,
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_COMMON_NAME);
    name.push(DnType::OrganizationName, CA_ORGANIZATION);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

fn cert_error(error: rcgen::Error) -> EgressError {
    EgressError::Certificate(error.to_string())
}

impl EgressCa {
    /// Loads the CA from `dir` ([`CA_CERT_FILE`], [`CA_KEY_FILE`]), or creates
    /// one there if neither exists. The directory is created (0700) if
    /// missing. Files are written through a temporary file and a rename, the
    /// key with mode 0600. A file that cannot be parsed, a certificate without
    /// its key, a certificate not matching the key, or a key readable by
    /// group or others is an error: nothing is replaced silently. A key
    /// without its certificate (a crash between the two writes) gets its
    /// certificate reissued.
    pub fn load_or_create(dir: &Path) -> Result<Self, EgressError> {
        let io_error = |what: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| EgressError::Io { what, path, source }
        };
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(io_error("creating the egress CA directory", dir))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(io_error("restricting the egress CA directory", dir))?;
        }
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        let key_text = read_optional(&key_path)?;
        let cert_text = read_optional(&cert_path)?;
        let damaged =
            |path: &Path, reason: &str| EgressError::CaDamaged { path: path.to_owned(), reason: reason.to_owned() };

        let key = match &key_text {
            Some(text) => {
                let mode = fs::metadata(&key_path)
                    .map_err(io_error("reading the egress CA key", &key_path))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(EgressError::CaKeyPermissions { path: key_path, mode: mode & 0o777 });
                }
                KeyPair::from_pem(text).map_err(|_| damaged(&key_path, "not a PEM private key"))?
            }
            None if cert_text.is_some() => {
                return Err(damaged(&key_path, "the certificate exists but its key is missing"));
            }
            None => {
                let key = KeyPair::generate().map_err(cert_error)?;
                write_atomically(dir, &key_path, key.serialize_pem().as_bytes(), 0o600)?;
                key
            }
        };

        let params = ca_params();
        let cert_pem = match cert_text {
            Some(text) => {
                let der = CertificateDer::from_pem_slice(text.as_bytes())
                    .map_err(|_| damaged(&cert_path, "not a PEM certificate"))?;
                let spki = key.subject_public_key_info();
                if !der.as_ref().windows(spki.len()).any(|window| window == spki.as_slice()) {
                    return Err(damaged(&cert_path, "the certificate is not for the key beside it"));
                }
                text
            }
            None => {
                let mut params = params.clone();
                let now = OffsetDateTime::now_utc();
                params.not_before = now - BACKDATE;
                params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
                let cert = params.self_signed(&key).map_err(cert_error)?;
                let pem = cert.pem();
                write_atomically(dir, &cert_path, pem.as_bytes(), 0o644)?;
                pem
            }
        };
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| damaged(&cert_path, "not a PEM certificate"))?;
        Ok(Self { cert_pem, cert_der, issuer: Issuer::new(params, key), leaves: Mutex::new(LeafCache::default()) })
    }

    /// The CA certificate (PEM): what sandboxes trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// A TLS server configuration presenting a leaf certificate for `host`
    /// (a normalised DNS name or IP address), issued on first use and cached
    /// (at most [`MAX_CACHED_LEAVES`] hosts). Offers HTTP/1.1 only.
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, EgressError> {
        if let Ok(cache) = self.leaves.lock()
            && let Some((issued, config)) = cache.configs.get(host)
            && issued.elapsed() < LEAF_REISSUE_AFTER
        {
            return Ok(config.clone());
        }
        let config = Arc::new(self.issue(host)?);
        if let Ok(mut cache) = self.leaves.lock() {
            if cache.configs.insert(host.to_owned(), (Instant::now(), config.clone())).is_none() {
                cache.order.push_back(host.to_owned());
            }
            while cache.order.len() > MAX_CACHED_LEAVES {
                if let Some(oldest) = cache.order.pop_front() {
                    cache.configs.remove(&oldest);
                }
            }
        }
        Ok(config)
    }

    fn issue(&self, host: &str) -> Result<ServerConfig, EgressError> {
        let key = KeyPair::generate().map_err(cert_error)?;
        let mut params = CertificateParams::new(vec![host.to_owned()]).map_err(cert_error)?;
        params.distinguished_name.push(DnType::CommonName, host);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::days(LEAF_VALIDITY_DAYS);
        let cert = params.signed_by(&key, &self.issuer).map_err(cert_error)?;
        let chain = vec![cert.der().clone(), self.cert_der.clone()];
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|error| EgressError::Tls(error.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .map_err(|error| EgressError::Tls(error.to_string()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

fn read_optional(path: &Path) -> Result<Option<String>, EgressError> {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| EgressError::CaDamaged { path: path.to_owned(), reason: "not UTF-8 PEM text".to_owned() }),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(EgressError::Io { what: "reading", path: path.to_owned(), source }),
    }
}

/// Writes `contents` to `path` through a temporary file in `dir` with `mode`,
/// renamed into place: a reader sees the old file or the new, never half.
pub(crate) fn write_atomically(dir: &Path, path: &Path, contents: &[u8], mode: u32) -> Result<(), EgressError> {
    let io_error = |what: &'static str| {
        let path: PathBuf = path.to_owned();
        move |source| EgressError::Io { what, path, source }
    };
    // tempfile creates the file 0600; the mode is set before any content is written.
    let mut file = tempfile::NamedTempFile::new_in(dir).map_err(io_error("creating a temporary file for"))?;
    file.as_file().set_permissions(fs::Permissions::from_mode(mode)).map_err(io_error("setting the mode of"))?;
    file.write_all(contents).map_err(io_error("writing"))?;
    file.as_file().sync_all().map_err(io_error("syncing"))?;
    file.persist(path).map_err(|error| EgressError::Io {
        what: "renaming into place",
        path: path.to_owned(),
        source: error.error,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_ca_is_loaded_again_with_a_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("ca");
        let first = EgressCa::load_or_create(&home).unwrap();
        let mode = fs::metadata(home.join(CA_KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = EgressCa::load_or_create(&home).unwrap();
        assert_eq!(first.cert_pem(), second.cert_pem());
        // Leaves from the reloaded CA chain to the stored certificate.
        assert!(second.server_config("api.example.test").is_ok());
        assert!(second.server_config("127.0.0.1").is_ok());
    }

    #[test]
    fn damaged_files_are_errors_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        EgressCa::load_or_create(dir.path()).unwrap();
        let cert = fs::read(dir.path().join(CA_CERT_FILE)).unwrap();

        fs::write(dir.path().join(CA_CERT_FILE), b"garbage").unwrap();
        assert!(matches!(EgressCa::load_or_create(dir.path()), Err(EgressError::CaDamaged { .. })));
        assert_eq!(fs::read(dir.path().join(CA_CERT_FILE)).unwrap(), b"garbage");

        // A certificate of another key.
        let other = tempfile::tempdir().unwrap();
        EgressCa::load_or_create(other.path()).unwrap();
        fs::copy(other.path().join(CA_CERT_FILE), dir.path().join(CA_CERT_FILE)).unwrap();
        assert!(matches!(EgressCa::load_or_create(dir.path()), Err(EgressError::CaDamaged { .. })));

        fs::write(dir.path().join(CA_CERT_FILE), &cert).unwrap();
        fs::set_permissions(dir.path().join(CA_KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(EgressCa::load_or_create(dir.path()), Err(EgressError::CaKeyPermissions { .. })));
        fs::set_permissions(dir.path().join(CA_KEY_FILE), fs::Permissions::from_mode(0o600)).unwrap();
        EgressCa::load_or_create(dir.path()).unwrap();

        fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
        assert!(matches!(EgressCa::load_or_create(dir.path()), Err(EgressError::CaDamaged { .. })));
    }

    #[test]
    fn a_key_without_its_certificate_gets_one() {
        let dir = tempfile::tempdir().unwrap();
        EgressCa::load_or_create(dir.path()).unwrap();
        let key = fs::read(dir.path().join(CA_KEY_FILE)).unwrap();
        fs::remove_file(dir.path().join(CA_CERT_FILE)).unwrap();
        EgressCa::load_or_create(dir.path()).unwrap();
        assert_eq!(fs::read(dir.path().join(CA_KEY_FILE)).unwrap(), key);
        assert!(dir.path().join(CA_CERT_FILE).exists());
    }

    #[test]
    fn the_leaf_cache_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let ca = EgressCa::load_or_create(dir.path()).unwrap();
        let first = ca.server_config("h0.test").unwrap();
        assert!(Arc::ptr_eq(&first, &ca.server_config("h0.test").unwrap()));
        for index in 1..=MAX_CACHED_LEAVES {
            ca.server_config(&format!("h{index}.test")).unwrap();
        }
        let cache = ca.leaves.lock().unwrap();
        assert_eq!(cache.configs.len(), MAX_CACHED_LEAVES);
        assert!(!cache.configs.contains_key("h0.test"));
    }
}
