//! Code evaluation in interpreter contexts: languages, results, and the
//! reasons code must move to the container tier.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::LimitExceeded;

/// A language with an interpreter in the isolate tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Python,
    #[serde(rename = "javascript", alias = "js")]
    JavaScript,
}

impl Language {
    pub const ALL: [Language; 2] = [Language::Python, Language::JavaScript];

    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::JavaScript => "javascript",
        }
    }
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Text that names no known language.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown language {0:?}; use python or js")]
pub struct UnknownLanguage(pub String);

impl FromStr for Language {
    type Err = UnknownLanguage;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "python" | "py" | "python3" => Ok(Language::Python),
            "js" | "javascript" | "node" => Ok(Language::JavaScript),
            _ => Err(UnknownLanguage(s.to_string())),
        }
    }
}

/// Why code cannot run in an isolate: the router's cue to escalate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "reason", content = "name")]
#[non_exhaustive]
pub enum EscalationReason {
    /// The code tried to start a process.
    Subprocess,
    /// The code imported a module the interpreter does not have.
    MissingModule(String),
    /// The code tried to open a network connection.
    Network,
    /// The code needs a native extension.
    NativeExtension(String),
}

impl fmt::Display for EscalationReason {
    /// `subprocess`, `missing-module:<name>`, `network`, `native-extension:<name>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EscalationReason::Subprocess => f.write_str("subprocess"),
            EscalationReason::MissingModule(name) => write!(f, "missing-module:{name}"),
            EscalationReason::Network => f.write_str("network"),
            EscalationReason::NativeExtension(name) => write!(f, "native-extension:{name}"),
        }
    }
}

/// An error raised by evaluated code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeError {
    /// The exception type, such as `ZeroDivisionError` or `TypeError`.
    pub kind: String,
    pub message: String,
    /// Formatted traceback, most recent call last.
    pub traceback: String,
    /// 1-based line in the evaluated code, when known.
    pub line: Option<u32>,
}

/// The value of the code's last expression.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalValue {
    /// As text (`repr()` in Python).
    pub text: String,
    /// As JSON, when the value is JSON-serialisable.
    pub json: Option<String>,
}

/// How an evaluation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
#[non_exhaustive]
pub enum EvalResult {
    /// The code ran; the value of its last expression, if any.
    Ok { value: Option<EvalValue> },
    SyntaxError(CodeError),
    RuntimeError(CodeError),
    /// The code needs the container tier.
    NeedsEscalation { reason: EscalationReason },
    /// The code hit a limit; the context was reset (its state is gone).
    LimitExceeded(LimitExceeded),
    /// The interpreter itself crashed; the context was reset.
    Crashed { message: String },
}

/// What one evaluation produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalOutcome {
    pub result: EvalResult,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub wall_time: Duration,
    pub cpu_time: Duration,
}

impl EvalOutcome {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// The value, if evaluation succeeded.
    pub fn value(&self) -> Option<&EvalValue> {
        match &self.result {
            EvalResult::Ok { value } => value.as_ref(),
            _ => None,
        }
    }

    pub fn is_ok(&self) -> bool {
        matches!(self.result, EvalResult::Ok { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn languages_parse_by_common_names() {
        assert_eq!("python".parse(), Ok(Language::Python));
        assert_eq!("py".parse(), Ok(Language::Python));
        assert_eq!("js".parse(), Ok(Language::JavaScript));
        assert_eq!("JavaScript".parse(), Ok(Language::JavaScript));
        assert_eq!("ruby".parse::<Language>().unwrap_err().to_string(), "unknown language \"ruby\"; use python or js");
    }

    #[test]
    fn escalation_reasons_read_as_the_router_expects() {
        assert_eq!(EscalationReason::Subprocess.to_string(), "subprocess");
        assert_eq!(EscalationReason::MissingModule("numpy".into()).to_string(), "missing-module:numpy");
        assert_eq!(EscalationReason::Network.to_string(), "network");
        assert_eq!(EscalationReason::NativeExtension("_ctypes".into()).to_string(), "native-extension:_ctypes");
    }
}
