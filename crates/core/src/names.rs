//! Sandbox names (chosen by users) and ids (chosen by Airlock).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The longest name a sandbox may have. 63 keeps a name usable as a DNS label,
/// a Docker container name part and a directory name alike.
pub const MAX_NAME_LEN: usize = 63;

/// Why a string is not a valid [`SandboxName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    #[error("sandbox name is empty")]
    Empty,
    #[error("sandbox name is {len} characters long; the limit is {MAX_NAME_LEN}")]
    TooLong { len: usize },
    #[error("sandbox name may not start with '-'")]
    LeadingDash,
    #[error("sandbox name contains {found:?}; only a-z, 0-9 and '-' are allowed")]
    InvalidCharacter { found: char },
}

/// A user-chosen sandbox name: 1–63 characters of `[a-z0-9-]`, not starting with `-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SandboxName(String);

impl SandboxName {
    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        let len = name.chars().count();
        if len > MAX_NAME_LEN {
            return Err(NameError::TooLong { len });
        }
        if let Some(found) = name
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(NameError::InvalidCharacter { found });
        }
        if name.starts_with('-') {
            return Err(NameError::LeadingDash);
        }
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for SandboxName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for SandboxName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<SandboxName> for String {
    fn from(name: SandboxName) -> String {
        name.0
    }
}

impl fmt::Display for SandboxName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A sandbox's stable identity, assigned once when it is created. Names can be
/// reused after a sandbox is destroyed; ids never are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SandboxId(uuid::Uuid);

impl SandboxId {
    /// A fresh random id.
    pub fn new() -> Self {
        Self(uuid::Uuid::new_v4())
    }
}

impl Default for SandboxId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sbx-{}", self.0.simple())
    }
}

impl FromStr for SandboxId {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s.strip_prefix("sbx-").unwrap_or(s);
        uuid::Uuid::try_parse(hex).map(Self).map_err(|_| NameError::InvalidCharacter {
            found: s.chars().find(|c| !c.is_ascii_hexdigit() && *c != '-').unwrap_or('?'),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_names() {
        for name in ["a", "abc-123", "0", "a-", &"x".repeat(63)] {
            assert_eq!(SandboxName::new(name).map(|n| n.to_string()), Ok(name.to_string()));
        }
    }

    #[test]
    fn rejects_invalid_names_with_the_reason() {
        assert_eq!(SandboxName::new(""), Err(NameError::Empty));
        assert_eq!(SandboxName::new("x".repeat(64)), Err(NameError::TooLong { len: 64 }));
        assert_eq!(SandboxName::new("-a"), Err(NameError::LeadingDash));
        assert_eq!(SandboxName::new("Ab"), Err(NameError::InvalidCharacter { found: 'A' }));
        assert_eq!(SandboxName::new("a_b"), Err(NameError::InvalidCharacter { found: '_' }));
        assert_eq!(SandboxName::new("a/b"), Err(NameError::InvalidCharacter { found: '/' }));
        assert_eq!(SandboxName::new("é"), Err(NameError::InvalidCharacter { found: 'é' }));
        let err = SandboxName::new("a b").unwrap_err().to_string();
        assert!(err.contains("only a-z, 0-9 and '-'"), "{err}");
    }

    #[test]
    fn ids_are_unique_and_round_trip() {
        let a = SandboxId::new();
        let b = SandboxId::new();
        assert_ne!(a, b);
        let text = a.to_string();
        assert!(text.starts_with("sbx-") && text.len() == 36, "{text}");
        assert_eq!(text.parse::<SandboxId>(), Ok(a));
        assert!("sbx-nothex".parse::<SandboxId>().is_err());
    }
}
