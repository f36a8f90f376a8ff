//! The limits that bound one run, whatever tier runs it.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default wall-clock deadline of one run. Protects the host from guests that
/// never finish; long tasks raise it per request.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);
/// Longest deadline a request may ask for (24 h); longer work belongs in a
/// background process, which later issues give their own lifetime.
pub const MAX_DEADLINE: Duration = Duration::from_secs(24 * 60 * 60);
/// Default cap on a run's memory (all linear memories of an isolate together).
pub const DEFAULT_MEMORY_BYTES: u64 = 256 * MIB;
/// Largest memory cap a request may ask for: a wasm32 linear memory cannot grow past 4 GiB.
pub const MAX_MEMORY_BYTES: u64 = 4 * GIB;
/// Default cap on captured output, per stream (stdout and stderr each).
/// Protects host memory from output floods.
pub const DEFAULT_OUTPUT_BYTES: u64 = MIB;
/// Largest output cap a request may ask for, per stream: output is held in memory.
pub const MAX_OUTPUT_BYTES: u64 = 256 * MIB;
/// Default cap on the elements of any one table. Interpreters compiled to wasm
/// (CPython, QuickJS) need tens of thousands of function-table slots.
pub const DEFAULT_TABLE_ELEMENTS: u64 = 100_000;
/// Largest table cap a request may ask for; also what the engine's pool reserves per table.
pub const MAX_TABLE_ELEMENTS: u64 = 1_000_000;
/// Default cap on core wasm instances one run may create. A component
/// instantiates a handful of core instances (its modules and adapters).
pub const DEFAULT_INSTANCES: u64 = 50;
/// Largest instance cap a request may ask for; also the engine pool's per-component maximum.
pub const MAX_INSTANCES: u64 = 500;
/// Default cap on the handles one isolate run holds at once: open files and
/// directories, streams, pollables (its WASI resource table's capacity).
/// Open files are host file descriptors, and many isolates share one
/// process's descriptor limit, so one guest opening files in a loop must stop
/// long before the process runs out.
pub const DEFAULT_HANDLES: u64 = 256;
/// Smallest handle cap a request may ask for: stdio and the workspace preopen
/// take a few handles before the guest opens anything.
pub const MIN_HANDLES: u64 = 16;
/// Largest handle cap a request may ask for (Wasmtime's own default table capacity).
pub const MAX_HANDLES: u64 = 1_000_000;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

/// The hard limits of one run. Every field has a default (see the constants in
/// this module) and a maximum; [`Limits::validate`] enforces both ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Wall-clock deadline, from the start of the run to its end.
    #[serde(with = "duration_millis")]
    pub deadline: Duration,
    /// Memory cap in bytes.
    pub memory_bytes: u64,
    /// Captured-output cap in bytes, per stream.
    pub output_bytes: u64,
    /// Cap on the elements of any one table.
    pub table_elements: u64,
    /// Cap on the core instances one run may create.
    pub instances: u64,
    /// Cap on the handles (open files, directories, streams) an isolate run
    /// holds at once. Absent in older serialized limits: the default applies.
    pub handles: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            deadline: DEFAULT_DEADLINE,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            output_bytes: DEFAULT_OUTPUT_BYTES,
            table_elements: DEFAULT_TABLE_ELEMENTS,
            instances: DEFAULT_INSTANCES,
            handles: DEFAULT_HANDLES,
        }
    }
}

/// A limit value that is out of range, or text that does not parse as one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LimitsError {
    #[error("{limit} must be at least {min}, got {got}")]
    TooSmall { limit: Limit, min: String, got: String },
    #[error("{limit} may be at most {max}, got {got}")]
    TooLarge { limit: Limit, max: String, got: String },
    #[error("{0:?} is not a size; use a number with an optional unit, such as 512KiB, 64MiB or 1GiB")]
    InvalidSize(String),
    #[error("{0:?} is not a duration; use a number with a unit, such as 250ms, 10s or 2m")]
    InvalidDuration(String),
}

impl Limits {
    /// Checks every field against its range.
    pub fn validate(&self) -> Result<(), LimitsError> {
        fn range(limit: Limit, value: u64, min: u64, max: u64) -> Result<(), LimitsError> {
            if value < min {
                return Err(LimitsError::TooSmall { limit, min: limit.format(min), got: limit.format(value) });
            }
            if value > max {
                return Err(LimitsError::TooLarge { limit, max: limit.format(max), got: limit.format(value) });
            }
            Ok(())
        }
        let deadline_ms = u64::try_from(self.deadline.as_millis()).unwrap_or(u64::MAX);
        range(Limit::Deadline, deadline_ms, 1, MAX_DEADLINE.as_secs() * 1000)?;
        // One 64 KiB wasm page is the least memory a guest with a memory can have.
        range(Limit::Memory, self.memory_bytes, 64 * KIB, MAX_MEMORY_BYTES)?;
        range(Limit::Output, self.output_bytes, 0, MAX_OUTPUT_BYTES)?;
        range(Limit::TableElements, self.table_elements, 0, MAX_TABLE_ELEMENTS)?;
        range(Limit::Instances, self.instances, 1, MAX_INSTANCES)?;
        range(Limit::Handles, self.handles, MIN_HANDLES, MAX_HANDLES)?;
        Ok(())
    }
}

/// Which limit a run hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Limit {
    /// The wall-clock deadline (value in milliseconds).
    Deadline,
    /// The memory cap (value in bytes).
    Memory,
    /// The captured-output cap per stream (value in bytes).
    Output,
    /// The per-table element cap (value in elements).
    TableElements,
    /// The core-instance cap (value in instances).
    Instances,
    /// The engine's cap on guest call-stack depth (value in bytes of native stack).
    Stack,
    /// The cap on handles held at once (value in handles).
    Handles,
}

impl Limit {
    /// Renders `value` in this limit's unit.
    pub fn format(self, value: u64) -> String {
        match self {
            Limit::Deadline => format_duration(Duration::from_millis(value)),
            Limit::Memory | Limit::Output | Limit::Stack => format_size(value),
            Limit::TableElements => format!("{value} elements"),
            Limit::Instances => format!("{value} instances"),
            Limit::Handles => format!("{value} handles"),
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limit::Deadline => "wall-clock deadline",
            Limit::Memory => "memory limit",
            Limit::Output => "output limit",
            Limit::TableElements => "table size limit",
            Limit::Instances => "instance limit",
            Limit::Stack => "stack limit",
            Limit::Handles => "handle limit",
        })
    }
}

/// A limit a run hit, with the value that was in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{limit} of {} exceeded", limit.format(*value))]
pub struct LimitExceeded {
    pub limit: Limit,
    /// The limit's value, in the unit [`Limit`] documents.
    pub value: u64,
}

/// Parses a byte size: `4096`, `512KiB`, `64MiB`, `1GiB` (also `K`, `M`, `G`, `KB`, `MB`, `GB`,
/// all binary multiples; case-insensitive).
pub fn parse_size(text: &str) -> Result<u64, LimitsError> {
    let invalid = || LimitsError::InvalidSize(text.to_string());
    let trimmed = text.trim();
    let split = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let multiplier = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => KIB,
        "m" | "mb" | "mib" => MIB,
        "g" | "gb" | "gib" => GIB,
        _ => return Err(invalid()),
    };
    number.checked_mul(multiplier).ok_or_else(invalid)
}

/// Parses a duration: `250ms`, `10s`, `2m`, `1h`. A unit is required.
pub fn parse_duration(text: &str) -> Result<Duration, LimitsError> {
    let invalid = || LimitsError::InvalidDuration(text.to_string());
    let trimmed = text.trim();
    let split = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let millis = match unit.trim() {
        "ms" => Some(number),
        "s" => number.checked_mul(1000),
        "m" | "min" => number.checked_mul(60_000),
        "h" => number.checked_mul(3_600_000),
        _ => None,
    };
    millis.map(Duration::from_millis).ok_or_else(invalid)
}

/// `1536` → `1.5 KiB`; whole multiples print without a fraction (`64 MiB`).
pub fn format_size(bytes: u64) -> String {
    for (unit, size) in [("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
        if bytes >= size {
            return if bytes.is_multiple_of(size) {
                format!("{} {unit}", bytes / size)
            } else {
                format!("{:.1} {unit}", bytes as f64 / size as f64)
            };
        }
    }
    format!("{bytes} bytes")
}

/// `1500ms` → `1.5s`; whole seconds print as `2s`, sub-second as `250ms`.
pub fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis < 1000 {
        format!("{millis}ms")
    } else if millis.is_multiple_of(1000) {
        format!("{}s", millis / 1000)
    } else {
        format!("{}s", format!("{:.3}", duration.as_secs_f64()).trim_end_matches('0'))
    }
}

mod duration_millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Limits::default().validate(), Ok(()));
    }

    #[test]
    fn out_of_range_values_name_the_limit() {
        let limits = Limits { memory_bytes: 8 * GIB, ..Limits::default() };
        let err = limits.validate().unwrap_err().to_string();
        assert_eq!(err, "memory limit may be at most 4 GiB, got 8 GiB");
        let limits = Limits { deadline: Duration::ZERO, ..Limits::default() };
        assert_eq!(limits.validate().unwrap_err().to_string(), "wall-clock deadline must be at least 1ms, got 0ms");
        let limits = Limits { instances: 0, ..Limits::default() };
        assert!(limits.validate().unwrap_err().to_string().starts_with("instance limit must be at least"));
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64MiB"), Ok(64 * MIB));
        assert_eq!(parse_size("64m"), Ok(64 * MIB));
        assert_eq!(parse_size("1 GiB"), Ok(GIB));
        assert_eq!(parse_size("512kb"), Ok(512 * KIB));
        assert!(matches!(parse_size("lots"), Err(LimitsError::InvalidSize(_))));
        assert!(matches!(parse_size("12TB"), Err(LimitsError::InvalidSize(_))));
        assert!(matches!(parse_size("99999999999999999999G"), Err(LimitsError::InvalidSize(_))));
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(matches!(parse_duration("10"), Err(LimitsError::InvalidDuration(_))));
        assert!(matches!(parse_duration("soon"), Err(LimitsError::InvalidDuration(_))));
    }

    #[test]
    fn limit_exceeded_reads_well() {
        let hit = LimitExceeded { limit: Limit::Deadline, value: 1500 };
        assert_eq!(hit.to_string(), "wall-clock deadline of 1.5s exceeded");
        let hit = LimitExceeded { limit: Limit::Memory, value: 64 * MIB };
        assert_eq!(hit.to_string(), "memory limit of 64 MiB exceeded");
        let hit = LimitExceeded { limit: Limit::Output, value: 1536 };
        assert_eq!(hit.to_string(), "output limit of 1.5 KiB exceeded");
        let hit = LimitExceeded { limit: Limit::Handles, value: 256 };
        assert_eq!(hit.to_string(), "handle limit of 256 handles exceeded");
    }

    #[test]
    fn the_handle_cap_has_a_floor() {
        let limits = Limits { handles: MIN_HANDLES - 1, ..Limits::default() };
        assert!(limits.validate().unwrap_err().to_string().starts_with("handle limit must be at least"));
    }
}
