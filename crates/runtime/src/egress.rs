//! The runtime's side of egress: one [`Egress`] per runtime (its CA kept in
//! the home), a proxy per sandbox bound before its container starts, the
//! secret store as the proxy's credentials, and every decision logged and
//! recorded for `usage` and `/metrics`.
//!
//! A sandbox's proxy lives in `sandboxes/<id>/egress/` (the socket and the
//! trust bundle), outside the workspace, mounted read-only into the container
//! at [`airlock_core::network::EGRESS_GUEST_DIR`]. The container's agent
//! presents the socket as `127.0.0.1:3128`; the sandbox is known by the
//! socket it reached.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, Weak};
use std::time::SystemTime;

use airlock_egress::{Decision, DecisionSink, Egress, EgressCa, EgressConfig, SecretSource, Verdict};

use crate::error::{Error, Result};
use crate::runtime::{RuntimeInner, lock};
use crate::sandbox::Sandbox;
use crate::secrets::Secrets;
use crate::store::EgressRecord;

/// The directory of the runtime's egress CA, in the home (key 0600).
pub const EGRESS_CA_DIR: &str = "egress-ca";
/// A sandbox's egress directory, in its sandbox directory (beside the workspace).
pub const SANDBOX_EGRESS_DIR: &str = "egress";

/// The runtime, reached from the proxy's callbacks once it exists; weak, so
/// the proxy never keeps a closed runtime alive.
#[derive(Debug, Clone, Default)]
pub(crate) struct LateRuntime(Arc<OnceLock<Weak<RuntimeInner>>>);

impl LateRuntime {
    pub fn set(&self, runtime: &Arc<RuntimeInner>) {
        let _ = self.0.set(Arc::downgrade(runtime));
    }

    fn get(&self) -> Option<Arc<RuntimeInner>> {
        self.0.get().and_then(Weak::upgrade)
    }
}

impl SecretSource for LateRuntime {
    fn secret(&self, name: &str) -> Option<String> {
        let runtime = self.0.get()?.clone();
        Secrets::from_weak(runtime).secret(name)
    }
}

impl DecisionSink for LateRuntime {
    fn record(&self, decision: Decision) {
        let verdict = match &decision.verdict {
            Verdict::Allowed => "allowed".to_owned(),
            Verdict::Denied(denial) => denial.label().to_owned(),
        };
        match &decision.verdict {
            Verdict::Allowed => tracing::info!(
                sandbox = %decision.sandbox, host = %decision.host, port = decision.port,
                method = decision.method.as_deref().unwrap_or("CONNECT"), status = decision.status,
                bytes_up = decision.bytes_up, bytes_down = decision.bytes_down,
                terminated_tls = decision.terminated_tls, "egress allowed"
            ),
            Verdict::Denied(denial) => tracing::info!(
                sandbox = %decision.sandbox, host = %decision.host, port = decision.port,
                method = decision.method.as_deref().unwrap_or("CONNECT"), reason = %denial, "egress denied"
            ),
        }
        let Some(runtime) = self.get() else { return };
        let Ok(sandbox_id) = decision.sandbox.parse() else { return };
        let record = EgressRecord {
            sandbox_id,
            at: SystemTime::now(),
            host: decision.host,
            port: decision.port,
            method: decision.method,
            verdict,
            status: decision.status,
            bytes_up: decision.bytes_up,
            bytes_down: decision.bytes_down,
        };
        // A short SQLite insert; off the async workers when called on one.
        let write = move || {
            if let Err(error) = runtime.store.record_egress(&record) {
                tracing::warn!(%error, "recording an egress decision failed");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => drop(handle.spawn_blocking(write)),
            Err(_) => write(),
        }
    }
}

/// Loads (or makes) the runtime's CA in the home and builds its [`Egress`].
pub(crate) fn open(home: &Path, config: EgressConfig, late: &LateRuntime) -> Result<Egress> {
    let egress_error = |error: airlock_egress::EgressError| Error::Egress(error.to_string());
    let ca = EgressCa::load_or_create(&home.join(EGRESS_CA_DIR)).map_err(egress_error)?;
    Egress::new(config, ca, Arc::new(late.clone()), Arc::new(late.clone())).map_err(egress_error)
}

impl Sandbox {
    /// The host directory mounted into the container as its egress directory.
    pub(crate) fn egress_dir(&self) -> PathBuf {
        self.runtime.sandbox_dir(self.inner.id).join(SANDBOX_EGRESS_DIR)
    }

    /// Binds the sandbox's proxy (once per loaded sandbox), reading the
    /// policy in force on every request. Returns the directory to mount.
    pub(crate) fn ensure_proxy(&self) -> Result<PathBuf> {
        let dir = self.egress_dir();
        let mut proxy = lock(&self.inner.proxy);
        if proxy.is_none() {
            let handle = self
                .runtime
                .inner
                .egress
                .bind_sandbox(self.inner.id.to_string(), &dir, self.network_policy_watch())
                .map_err(|error| Error::Egress(error.to_string()))?;
            *proxy = Some(handle);
        }
        Ok(dir)
    }

    /// Stops the sandbox's proxy: open tunnels end, the socket stops answering.
    pub(crate) fn stop_proxy(&self) {
        if let Some(handle) = lock(&self.inner.proxy).take() {
            handle.shutdown();
        }
    }
}
