//! A sandbox's network policy on a live sandbox: read, replaced, published.
//!
//! A new policy is checked ([`NetworkPolicy::validate`], then that every
//! secret it names is in the secret store), stored in the registry, and sent
//! on the sandbox's watch channel, in that order, under the sandbox's policy
//! lock. A refused policy changes nothing. Whoever holds a receiver (the
//! egress proxy, the isolates' HTTP hook) sees the change on its next
//! request: nothing restarts.
//!
//! The policy in force is the sandbox's own with the runtime's denied hosts
//! ([`crate::RuntimeOptions::network_deny`]) added, so a sandbox's policy can
//! only narrow what the runtime allows. There is no runtime-wide allow
//! ceiling.

use std::sync::Arc;

use airlock_core::NetworkPolicy;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::runtime::{Runtime, lock};
use crate::sandbox::Sandbox;

impl Sandbox {
    /// The sandbox's own network policy (as set; without the runtime's denied hosts).
    pub fn network_policy(&self) -> NetworkPolicy {
        self.inner.record().config.policy.network.clone()
    }

    /// Replaces the sandbox's network policy. Refused, with nothing changed,
    /// when it is invalid ([`Error::Policy`]) or names a secret the store does
    /// not hold ([`Error::NoSuchSecret`]). Applies to the next request.
    pub fn set_network_policy(&self, policy: NetworkPolicy) -> Result<()> {
        policy.validate()?;
        let sender = lock(&self.inner.network);
        let mut config = self.inner.record().config.clone();
        config.policy.network = policy;
        if !self.runtime.inner.store.set_config(self.inner.id, &config)? {
            return Err(Error::NoSuchSandbox(self.inner.name.to_string()));
        }
        let effective = Arc::new(self.runtime.effective_policy(&config.policy.network));
        self.inner.record().config = config;
        sender.send_replace(effective);
        tracing::info!(sandbox = %self.inner.name, "network policy changed");
        Ok(())
    }

    /// The policy in force, now and as it changes: for the egress proxy and
    /// the isolates' HTTP hook, which read it on every request. The channel
    /// lives as long as the sandbox is loaded in this runtime (destroying it
    /// closes the channel).
    pub fn network_policy_watch(&self) -> watch::Receiver<Arc<NetworkPolicy>> {
        lock(&self.inner.network).subscribe()
    }
}

impl Runtime {
    /// The network policy of sandbox `name` (its own, as set).
    pub fn network_policy(&self, name: &str) -> Result<NetworkPolicy> {
        Ok(self.existing(name)?.network_policy())
    }

    /// Replaces the network policy of sandbox `name`; see [`Sandbox::set_network_policy`].
    pub fn set_network_policy(&self, name: &str, policy: NetworkPolicy) -> Result<()> {
        self.existing(name)?.set_network_policy(policy)
    }

    /// The policy in force for sandbox `name`, now and as it changes; see
    /// [`Sandbox::network_policy_watch`].
    pub fn network_policy_watch(&self, name: &str) -> Result<watch::Receiver<Arc<NetworkPolicy>>> {
        Ok(self.existing(name)?.network_policy_watch())
    }

    fn existing(&self, name: &str) -> Result<Sandbox> {
        self.get(name)?.ok_or_else(|| Error::NoSuchSandbox(name.to_string()))
    }

    /// `policy` with the runtime's denied hosts added: the policy in force.
    pub(crate) fn effective_policy(&self, policy: &NetworkPolicy) -> NetworkPolicy {
        let mut effective = policy.clone();
        for pattern in &self.inner.options.network_deny {
            if !effective.deny.contains(pattern) {
                effective.deny.push(pattern.clone());
            }
        }
        effective
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DiskOptions, QuotaMode, RuntimeOptions};

    async fn open(home: &std::path::Path) -> Runtime {
        let mut options = RuntimeOptions::new(home);
        options.disk = DiskOptions { quotas: QuotaMode::Off, ..DiskOptions::default() };
        options.reconcile = false;
        options.network_deny = vec![airlock_core::HostPattern::new("169.254.169.254").unwrap()];
        Runtime::open(options).await.unwrap()
    }

    /// A home whose sandbox was stored as `"network": "deny-all"` (schema 3)
    /// opens: the sandbox has the empty policy; a new one set on it is
    /// stored in the new form and is there after reopening.
    #[tokio::test]
    async fn a_sandbox_stored_with_the_legacy_deny_all_opens_and_takes_a_new_policy() {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(home.path().join("sandboxes")).unwrap();
        crate::store::fixtures::version_3_home_with_legacy_sandbox(&home.path().join("airlock.db"), "legacy");
        let runtime = open(home.path()).await;
        assert_eq!(runtime.network_policy("legacy").unwrap(), NetworkPolicy::deny_all());
        // In force: the runtime's denied host on top of the sandbox's own (empty) policy.
        let watch = runtime.network_policy_watch("legacy").unwrap();
        assert_eq!(watch.borrow().deny.iter().map(|p| p.as_str()).collect::<Vec<_>>(), ["169.254.169.254"]);
        let policy: NetworkPolicy =
            serde_json::from_value(serde_json::json!({ "allow": [{ "host": "pypi.org" }] })).unwrap();
        runtime.set_network_policy("legacy", policy.clone()).unwrap();
        drop((watch, runtime));
        let runtime = open(home.path()).await;
        assert_eq!(runtime.network_policy("legacy").unwrap(), policy);
        assert_eq!(runtime.get("legacy").unwrap().unwrap().info().config.policy.network, policy);
    }
}
