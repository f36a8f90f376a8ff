//! The runtime's secret store: named credentials that network policies refer
//! to (`HeaderRule::secret`) and that the egress proxy adds to requests on the
//! way out. A sandbox never sees them.
//!
//! **Where they are kept.** In the home's registry (`airlock.db`, table
//! `secrets`), not in a file of their own: the home is private to the
//! runtime's user ([`crate::PRIVATE_DIR_MODE`]) and sits outside every
//! sandbox directory, so neither tier can reach it (isolates see only their
//! workspace preopen, containers only their workspace bind mount); and one
//! SQLite transaction checks a policy's secrets and stores the policy, or
//! checks that no policy names a secret and removes it, so a stored policy
//! never names a missing secret. Removed values are overwritten in the
//! database file (`PRAGMA secure_delete`); the values are not encrypted at
//! rest (the key would have to live beside them).
//!
//! **Never shown.** No API returns a value: listing gives names and times
//! ([`SecretInfo`]); nothing logs one ([`SecretSource`]'s values are only
//! handed to the caller). Only [`Secrets::secret`], the proxy's accessor,
//! reads one back.
//!
//! **Removing one a policy uses is refused** ([`Error::SecretInUse`], naming
//! the sandboxes): otherwise the proxy would meet a rule whose credential is
//! gone and have to send the request without it or fail it at request time;
//! refusing keeps "every stored policy names only existing secrets" true.
//!
//! [`SecretSource`]: Secrets

use std::sync::{Arc, Weak};
use std::time::SystemTime;

use airlock_core::network::validate_secret_name;

use crate::error::{Error, Result};
use crate::runtime::{Runtime, RuntimeInner};

/// The longest secret value, in bytes: it becomes one header value (with its
/// rule's prefix), and upstream servers refuse heads much past 8 KiB.
/// Protects the registry and the proxy's memory.
pub const MAX_SECRET_BYTES: usize = 8 * 1024;
/// The most secrets one runtime holds: bounds the list and what a misbehaving
/// admin client can pile into the registry.
pub const MAX_SECRETS: usize = 1024;

/// A secret as listed: never its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretInfo {
    pub name: String,
    /// When the secret was first stored.
    pub created_at: SystemTime,
    /// When its value last changed.
    pub updated_at: SystemTime,
}

/// The proxy's read access to the secret store: cheap to clone, and it does
/// not keep the runtime alive (a runtime that is gone has no secrets).
#[derive(Debug, Clone)]
pub struct Secrets {
    runtime: Weak<RuntimeInner>,
}

impl Secrets {
    pub(crate) fn from_weak(runtime: Weak<RuntimeInner>) -> Self {
        Self { runtime }
    }

    /// The value of secret `name`, read from the registry on each call (a
    /// changed value applies to the next request). `None` when there is no
    /// such secret, the runtime is gone, or the registry cannot be read (that
    /// error is logged, never the value).
    pub fn secret(&self, name: &str) -> Option<String> {
        let runtime = self.runtime.upgrade()?;
        match runtime.store.secret(name) {
            Ok(value) => value,
            Err(error) => {
                tracing::warn!(%error, secret = name, "reading a secret failed");
                None
            }
        }
    }
}

/// Refuses a value that cannot be one header value: empty, longer than
/// [`MAX_SECRET_BYTES`], or holding a control character (a CR or LF would
/// let it add headers of its own). The message never quotes the value.
fn check_value(value: &str) -> Result<()> {
    let invalid = |reason: String| Error::Invalid { what: "secret value", reason };
    if value.is_empty() {
        return Err(invalid("it is empty".into()));
    }
    if value.len() > MAX_SECRET_BYTES {
        return Err(invalid(format!("{} bytes is over the limit of {MAX_SECRET_BYTES}", value.len())));
    }
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err(invalid("it holds a control character (such as a line break); a header value cannot".into()));
    }
    Ok(())
}

fn check_name(name: &str) -> Result<()> {
    validate_secret_name(name).map_err(|error| Error::Invalid { what: "secret name", reason: error.to_string() })
}

impl Runtime {
    /// Stores `value` as secret `name` (1-64 of `a-z`, `0-9`, `-`, `_`, `.`),
    /// replacing an earlier value: the next request that uses it gets the new
    /// one. The value must fit one header value ([`MAX_SECRET_BYTES`], no
    /// control characters).
    pub fn set_secret(&self, name: &str, value: &str) -> Result<()> {
        check_name(name)?;
        check_value(value)?;
        let store = &self.inner.store;
        if store.secret(name)?.is_none() && store.secrets()?.len() >= MAX_SECRETS {
            return Err(Error::Invalid {
                what: "secret count",
                reason: format!("the store holds {MAX_SECRETS} secrets, its limit"),
            });
        }
        store.set_secret(name, value, SystemTime::now())?;
        tracing::info!(secret = name, "secret stored");
        Ok(())
    }

    /// Removes secret `name`; `Ok(false)` when there was none. Refused with
    /// [`Error::SecretInUse`] while any sandbox's network policy names it.
    pub fn remove_secret(&self, name: &str) -> Result<bool> {
        check_name(name)?;
        let removed = self.inner.store.remove_secret(name)?;
        if removed {
            tracing::info!(secret = name, "secret removed");
        }
        Ok(removed)
    }

    /// The secrets' names, by name.
    pub fn secret_names(&self) -> Result<Vec<String>> {
        Ok(self.inner.store.secrets()?.into_iter().map(|(name, _, _)| name).collect())
    }

    /// The secrets, by name: names and times, never values.
    pub fn list_secrets(&self) -> Result<Vec<SecretInfo>> {
        Ok(self
            .inner
            .store
            .secrets()?
            .into_iter()
            .map(|(name, created_at, updated_at)| SecretInfo { name, created_at, updated_at })
            .collect())
    }

    /// Read access to the secret store for the egress proxy (which adds a
    /// rule's secret to the requests the rule allows).
    pub fn secrets(&self) -> Secrets {
        Secrets { runtime: Arc::downgrade(&self.inner) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_that_cannot_be_a_header_are_refused_without_quoting_them() {
        for bad in ["", "a\r\nX-Injected: 1", "nul\0", &"x".repeat(MAX_SECRET_BYTES + 1)] {
            let error = check_value(bad).unwrap_err().to_string();
            if bad.len() > 3 {
                assert!(!error.contains(bad), "{error}");
            }
        }
        check_value("ghp_abc\tdef 123").unwrap();
        assert!(check_name("Bad/Name").is_err());
        check_name("gh-token.v2").unwrap();
    }
}
