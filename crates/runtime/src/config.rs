//! What a sandbox is made of, chosen when it is created and kept in the registry.

use std::time::Duration;

use airlock_container::{ContainerResources, ContainerRuntime};
use airlock_core::Limits;
pub use airlock_core::NetworkPolicy;
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

/// A sandbox's policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Where the sandbox may connect, and with which credentials (secrets by
    /// name). Deny-all by default. Changed on a live sandbox with
    /// [`crate::Runtime::set_network_policy`]; this field is the policy the
    /// sandbox was created with (its record, [`crate::Sandbox::info`], keeps
    /// the current one). A config stored before per-host policies existed
    /// says `"deny-all"` here, and is read as the empty policy.
    #[serde(deserialize_with = "network::deserialize")]
    pub network: NetworkPolicy,
}

/// The policy field, as written now (an object) or before per-host policies
/// (the string `"deny-all"`).
mod network {
    use airlock_core::NetworkPolicy;
    use serde::Deserialize;
    use serde::de::{self, Deserializer, MapAccess, Visitor};

    /// The one value the old one-variant enum was stored as.
    const LEGACY_DENY_ALL: &str = "deny-all";

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<NetworkPolicy, D::Error> {
        deserializer.deserialize_any(Either)
    }

    struct Either;

    impl<'de> Visitor<'de> for Either {
        type Value = NetworkPolicy;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a network policy object (or the legacy string \"deny-all\")")
        }

        fn visit_str<E: de::Error>(self, value: &str) -> Result<NetworkPolicy, E> {
            if value == LEGACY_DENY_ALL {
                Ok(NetworkPolicy::deny_all())
            } else {
                Err(E::invalid_value(de::Unexpected::Str(value), &self))
            }
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<NetworkPolicy, A::Error> {
            NetworkPolicy::deserialize(de::value::MapAccessDeserializer::new(map))
        }
    }
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
        self.policy.network.validate()?;
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

    #[test]
    fn a_config_stored_with_the_legacy_deny_all_string_reads_as_the_empty_policy() {
        let mut stored = serde_json::to_value(SandboxConfig::default()).unwrap();
        stored["policy"] = serde_json::json!({ "network": "deny-all" });
        let read: SandboxConfig = serde_json::from_value(stored.clone()).unwrap();
        assert_eq!(read.policy.network, NetworkPolicy::deny_all());
        // Written back, it is the object form, and reads again the same.
        let written = serde_json::to_value(&read).unwrap();
        assert_eq!(written["policy"]["network"], serde_json::json!({}));
        assert_eq!(serde_json::from_value::<SandboxConfig>(written).unwrap(), read);
        // Any other string, and unknown fields in the object, are refused.
        stored["policy"] = serde_json::json!({ "network": "allow-all" });
        assert!(serde_json::from_value::<SandboxConfig>(stored.clone()).is_err());
        stored["policy"] = serde_json::json!({ "network": { "allow": [], "bogus": 1 } });
        assert!(serde_json::from_value::<SandboxConfig>(stored).is_err());
    }

    #[test]
    fn a_config_with_a_policy_round_trips_and_an_invalid_policy_fails_validation() {
        let policy: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "allow": [{ "host": "*.github.com", "ports": [443], "headers": [{ "name": "Authorization", "secret": "gh", "prefix": "Bearer " }] }],
            "deny": ["evil.github.com"],
        }))
        .unwrap();
        let config = SandboxConfig { policy: Policy { network: policy }, ..SandboxConfig::default() };
        config.validate().unwrap();
        let text = serde_json::to_string(&config).unwrap();
        assert_eq!(serde_json::from_str::<SandboxConfig>(&text).unwrap(), config);
        let mut bad = config.clone();
        bad.policy.network.allow[0].ports = vec![0];
        assert!(matches!(bad.validate(), Err(crate::Error::Policy(airlock_core::PolicyError::Port))));
    }
}
