//! Exposed ports: the registry side of preview URLs.
//!
//! Exposing a port of a sandbox makes a preview token: [`PREVIEW_TOKEN_BYTES`]
//! bytes from the OS's random source, shown once to the caller; the registry
//! keeps only its SHA-256, with the port, so an exposure survives a restart
//! and the sandbox's sleep. Exposing a port again replaces its token;
//! unexposing it, or destroying the sandbox, ends it at once. The traffic
//! itself goes through [`Sandbox::connect_port`].

use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::sandbox::Sandbox;
use crate::store::random_hex;

/// Random bytes in a preview token (128 bits): what makes it unguessable.
pub const PREVIEW_TOKEN_BYTES: usize = 16;

/// A port just exposed: the only time its token exists outside its holder.
#[derive(Clone)]
pub struct NewExposure {
    pub port: u16,
    /// The preview token (lower-case hex).
    pub token: String,
    pub created_at: SystemTime,
}

impl std::fmt::Debug for NewExposure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewExposure")
            .field("port", &self.port)
            .field("token", &"<redacted>")
            .field("created_at", &self.created_at)
            .finish()
    }
}

/// An exposed port, as the registry keeps it (no token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExposedPort {
    pub port: u16,
    pub created_at: SystemTime,
}

impl Sandbox {
    /// Exposes `port` (1 to 65535) with a fresh preview token; a port exposed
    /// before gets a new token and its old one stops working.
    pub fn expose_port(&self, port: u16) -> Result<NewExposure> {
        if port == 0 {
            return Err(Error::Invalid { what: "port", reason: "it must be 1 to 65535".into() });
        }
        let token = random_hex(PREVIEW_TOKEN_BYTES)?;
        let hash = Sha256::digest(token.as_bytes());
        let created_at = SystemTime::now();
        self.runtime.inner.store.expose(self.inner.id, port, &hash, created_at)?;
        Ok(NewExposure { port, token, created_at })
    }

    /// The sandbox's exposed ports, by port.
    pub fn exposed_ports(&self) -> Result<Vec<ExposedPort>> {
        let rows = self.runtime.inner.store.exposed(self.inner.id)?;
        Ok(rows.into_iter().map(|(port, created_at)| ExposedPort { port, created_at }).collect())
    }

    /// Ends the exposure of `port`; `Ok(false)` when it was not exposed.
    pub fn unexpose_port(&self, port: u16) -> Result<bool> {
        self.runtime.inner.store.unexpose(self.inner.id, port)
    }

    /// Whether `token` is the live preview token of `port` (compared in
    /// constant time; a port not exposed allows nothing).
    pub fn preview_allows(&self, port: u16, token: &str) -> Result<bool> {
        let hash = Sha256::digest(token.as_bytes());
        self.runtime.inner.store.preview_allows(self.inner.id, port, &hash)
    }
}
