//! What a sandbox is made of, chosen when it is created and kept in the registry.

use std::time::Duration;

use airlock_container::{ContainerResources, ContainerRuntime};
use airlock_core::Limits;
use airlock_core::limits::format_size;
use serde::{Deserialize, Serialize};

use crate::disk::{DEFAULT_DISK_BYTES, MAX_DISK_BYTES, MIN_DISK_BYTES};

/// How long a sandbox may sit unused before it sleeps (containers stopped,
/// isolate contexts dropped), unless it is kept alive.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// Shortest idle timeout a sandbox may ask for: sleeping and waking cost a
/// container stop and start.
pub const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(1);

/// Interpreter contexts a sandbox may hold at once unless configured
/// otherwise: each keeps an instance and its memory (about 8 MiB for Python)
/// alive on the host until deleted or the sandbox sleeps.
pub const DEFAULT_MAX_CONTEXTS: usize = 16;
/// The most contexts a sandbox may be configured to hold (host memory).
pub const MAX_CONTEXTS_LIMIT: usize = 1024;
/// Background processes a sandbox may have running at once unless configured
/// otherwise: each holds an agent stream, a follower task and an output log on
/// the host.
pub const DEFAULT_MAX_PROCESSES: usize = 32;
/// The most running background processes a sandbox may be configured for.
pub const MAX_PROCESSES_LIMIT: usize = 1024;
/// Terminal sessions a sandbox may have open at once unless configured
/// otherwise: each holds an engine exec and its attached stream on the host.
pub const DEFAULT_MAX_PTYS: usize = 8;
/// The most open terminals a sandbox may be configured for.
pub const MAX_PTYS_LIMIT: usize = 256;

/// Which tier a sandbox's work may run on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TierPreference {
    /// Isolates first, the container when the task needs it (the router decides).
    #[default]
    Auto,
    /// Isolates only: a task that needs a container is refused.
    Isolate,
    /// Everything in the container.
    Container,
}

/// Where a sandbox may connect. Deny-all is the only policy today; the egress
/// work narrows it per host without changing where it lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkPolicy {
    #[default]
    DenyAll,
}

/// A sandbox's policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub network: NetworkPolicy,
}

/// Everything a sandbox is configured with. Every field has a default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    /// Limits of each run that does not bring its own (code evaluations always use these).
    pub limits: Limits,
    /// The container's memory, pids and CPU.
    pub resources: ContainerResources,
    /// A local image; `None` is Airlock's base image.
    pub image: Option<String>,
    pub container_runtime: ContainerRuntime,
    pub tier: TierPreference,
    #[serde(with = "seconds")]
    pub idle_timeout: Duration,
    /// Never sleep.
    pub keep_alive: bool,
    pub policy: Policy,
    /// Disk quota in bytes over the sandbox's directory (its workspace) and,
    /// where the container engine can limit it, the container's writable layer.
    /// Enforced when the runtime's disk quotas are ([`crate::DiskStatus`]).
    pub disk: u64,
    /// Interpreter contexts held at once ([`DEFAULT_MAX_CONTEXTS`]).
    pub max_contexts: usize,
    /// Background processes running at once ([`DEFAULT_MAX_PROCESSES`]);
    /// exited ones do not count.
    pub max_processes: usize,
    /// Terminal sessions open at once ([`DEFAULT_MAX_PTYS`]); a session counts
    /// until its handle is dropped.
    pub max_ptys: usize,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            resources: ContainerResources::default(),
            image: None,
            container_runtime: ContainerRuntime::default(),
            tier: TierPreference::default(),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            keep_alive: false,
            policy: Policy::default(),
            disk: DEFAULT_DISK_BYTES,
            max_contexts: DEFAULT_MAX_CONTEXTS,
            max_processes: DEFAULT_MAX_PROCESSES,
            max_ptys: DEFAULT_MAX_PTYS,
        }
    }
}

impl SandboxConfig {
    /// Checks every value against its range; the error names the limit.
    pub fn validate(&self) -> crate::Result<()> {
        self.limits.validate().map_err(airlock_core::Error::from)?;
        self.resources.validate()?;
        if self.idle_timeout < MIN_IDLE_TIMEOUT {
            return Err(crate::Error::Invalid {
                what: "idle timeout",
                reason: format!("{:?} is under the minimum {MIN_IDLE_TIMEOUT:?}", self.idle_timeout),
            });
        }
        if !(MIN_DISK_BYTES..=MAX_DISK_BYTES).contains(&self.disk) {
            return Err(crate::Error::Invalid {
                what: "disk quota",
                reason: format!(
                    "{} is outside {}..={}",
                    format_size(self.disk),
                    format_size(MIN_DISK_BYTES),
                    format_size(MAX_DISK_BYTES)
                ),
            });
        }
        for (what, value, max) in [
            ("max contexts", self.max_contexts, MAX_CONTEXTS_LIMIT),
            ("max processes", self.max_processes, MAX_PROCESSES_LIMIT),
            ("max ptys", self.max_ptys, MAX_PTYS_LIMIT),
        ] {
            if value == 0 || value > max {
                return Err(crate::Error::Invalid { what, reason: format!("{value} is outside 1..={max}") });
            }
        }
        Ok(())
    }
}

mod seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(value.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let seconds = f64::deserialize(deserializer)?;
        Duration::try_from_secs_f64(seconds).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_sandbox_limits_have_defaults_and_are_validated_by_name() {
        let config = SandboxConfig::default();
        assert_eq!(
            (config.max_contexts, config.max_processes, config.max_ptys),
            (DEFAULT_MAX_CONTEXTS, DEFAULT_MAX_PROCESSES, DEFAULT_MAX_PTYS)
        );
        config.validate().unwrap();
        let cases: [(SandboxConfig, &str); 6] = [
            (SandboxConfig { max_contexts: 0, ..SandboxConfig::default() }, "max contexts"),
            (SandboxConfig { max_contexts: MAX_CONTEXTS_LIMIT + 1, ..SandboxConfig::default() }, "max contexts"),
            (SandboxConfig { max_processes: 0, ..SandboxConfig::default() }, "max processes"),
            (SandboxConfig { max_processes: MAX_PROCESSES_LIMIT + 1, ..SandboxConfig::default() }, "max processes"),
            (SandboxConfig { max_ptys: 0, ..SandboxConfig::default() }, "max ptys"),
            (SandboxConfig { max_ptys: MAX_PTYS_LIMIT + 1, ..SandboxConfig::default() }, "max ptys"),
        ];
        for (config, name) in cases {
            match config.validate() {
                Err(crate::Error::Invalid { what, .. }) => assert_eq!(what, name),
                other => panic!("{name}: expected an invalid-value error, got {other:?}"),
            }
        }
        let edges = SandboxConfig {
            max_contexts: MAX_CONTEXTS_LIMIT,
            max_processes: 1,
            max_ptys: MAX_PTYS_LIMIT,
            ..SandboxConfig::default()
        };
        edges.validate().unwrap();
    }

    #[test]
    fn a_config_stored_before_the_limits_existed_gets_their_defaults() {
        let mut stored = serde_json::to_value(SandboxConfig::default()).unwrap();
        let object = stored.as_object_mut().unwrap();
        for field in ["max_contexts", "max_processes", "max_ptys"] {
            assert!(object.remove(field).is_some(), "{field} is serialised");
        }
        let read: SandboxConfig = serde_json::from_value(stored).unwrap();
        assert_eq!(read, SandboxConfig::default());
    }
}
