//! Code evaluation in interpreter contexts: languages, results, and the
//! reasons code must move to the container tier.

use std::collections::BTreeMap;
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

/// One rich output, in Jupyter's MIME-bundle convention: the same object in
/// one or more representations, keyed by MIME type (`text/plain`,
/// `text/html`, `image/png`, `image/svg+xml`, `application/json`,
/// `text/markdown`). Text types are kept as text; binary types (`image/png`,
/// `image/jpeg`) are base64-encoded, as Jupyter keeps them, so a bundle is
/// JSON as it stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisplayOutput {
    pub data: BTreeMap<String, String>,
}

/// Most display outputs one evaluation keeps; past it, later ones are dropped
/// and the outcome says so (`displays_truncated`). Protects the caller's memory
/// from a loop that draws.
pub const MAX_DISPLAYS_PER_EVALUATION: usize = 64;
/// Most bytes of display data (all bundles together, as encoded) one
/// evaluation keeps; a bundle that would pass it is dropped.
pub const MAX_DISPLAY_BYTES_PER_EVALUATION: usize = 32 * 1024 * 1024;

impl DisplayOutput {
    /// The representation for `mime`, as stored (base64 for binary types).
    pub fn get(&self, mime: &str) -> Option<&str> {
        self.data.get(mime).map(String::as_str)
    }

    /// Whether `mime` is kept base64-encoded rather than as text.
    pub fn is_binary(mime: &str) -> bool {
        mime.starts_with("image/") && mime != "image/svg+xml"
    }

    /// Bytes kept for this bundle, as encoded.
    pub fn size(&self) -> usize {
        self.data.iter().map(|(mime, value)| mime.len() + value.len()).sum()
    }
}

/// Something an evaluation did that outlives it and that running the same
/// code again would do twice: the cue not to re-run a half-run snippet in the
/// container, and what replaying a context repeats.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
#[non_exhaustive]
pub enum SideEffect {
    /// A change to a file or directory: `operation` is what was done
    /// (`write`, `remove`, `rename`, `mkdir`, ...), `path` as the code named it.
    File { operation: String, path: String },
    /// An outbound HTTP request.
    Request { method: String, url: String },
}

impl fmt::Display for SideEffect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SideEffect::File { operation, path } => write!(f, "{operation} {path}"),
            SideEffect::Request { method, url } => write!(f, "{method} {url}"),
        }
    }
}

/// Most side effects one evaluation records (the rest are counted in the
/// last entry's stead by `side_effects_truncated`).
pub const MAX_SIDE_EFFECTS_PER_EVALUATION: usize = 64;

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
    /// Rich outputs, in the order they were made: `display()` calls, figures
    /// shown, and a rich last value (a DataFrame, a figure).
    #[serde(default)]
    pub displays: Vec<DisplayOutput>,
    /// Whether displays past [`MAX_DISPLAYS_PER_EVALUATION`] or
    /// [`MAX_DISPLAY_BYTES_PER_EVALUATION`] were dropped.
    #[serde(default)]
    pub displays_truncated: bool,
    /// What the evaluation did that outlives it (files changed, requests
    /// sent), as far as the interpreter could see; at most
    /// [`MAX_SIDE_EFFECTS_PER_EVALUATION`].
    #[serde(default)]
    pub side_effects: Vec<SideEffect>,
    #[serde(default)]
    pub side_effects_truncated: bool,
}

impl EvalOutcome {
    /// Keeps `display` unless a per-evaluation cap
    /// ([`MAX_DISPLAYS_PER_EVALUATION`], [`MAX_DISPLAY_BYTES_PER_EVALUATION`])
    /// is reached, in which case it is dropped and `displays_truncated` set.
    /// Returns whether it was kept.
    pub fn push_display(&mut self, display: DisplayOutput) -> bool {
        let held: usize = self.displays.iter().map(DisplayOutput::size).sum();
        if self.displays.len() >= MAX_DISPLAYS_PER_EVALUATION
            || held.saturating_add(display.size()) > MAX_DISPLAY_BYTES_PER_EVALUATION
        {
            self.displays_truncated = true;
            return false;
        }
        self.displays.push(display);
        true
    }

    /// Records `effect` unless [`MAX_SIDE_EFFECTS_PER_EVALUATION`] are held
    /// (then `side_effects_truncated` is set).
    pub fn push_side_effect(&mut self, effect: SideEffect) {
        if self.side_effects.len() >= MAX_SIDE_EFFECTS_PER_EVALUATION {
            self.side_effects_truncated = true;
        } else if !self.side_effects.contains(&effect) {
            self.side_effects.push(effect);
        }
    }

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

    fn empty_outcome() -> EvalOutcome {
        EvalOutcome {
            result: EvalResult::Ok { value: None },
            stdout: Vec::new(),
            stderr: Vec::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            wall_time: Duration::ZERO,
            cpu_time: Duration::ZERO,
            displays: Vec::new(),
            displays_truncated: false,
            side_effects: Vec::new(),
            side_effects_truncated: false,
        }
    }

    #[test]
    fn displays_past_the_count_cap_are_dropped_and_flagged() {
        let mut outcome = empty_outcome();
        let bundle = DisplayOutput { data: [("text/plain".to_string(), "x".to_string())].into() };
        for _ in 0..MAX_DISPLAYS_PER_EVALUATION {
            assert!(outcome.push_display(bundle.clone()));
        }
        assert!(!outcome.displays_truncated);
        assert!(!outcome.push_display(bundle));
        assert!(outcome.displays_truncated);
        assert_eq!(outcome.displays.len(), MAX_DISPLAYS_PER_EVALUATION);
    }

    #[test]
    fn a_display_past_the_byte_cap_is_dropped() {
        let mut outcome = empty_outcome();
        let huge = "A".repeat(MAX_DISPLAY_BYTES_PER_EVALUATION);
        assert!(!outcome.push_display(DisplayOutput { data: [("image/png".to_string(), huge)].into() }));
        assert!(outcome.displays_truncated && outcome.displays.is_empty());
    }

    #[test]
    fn side_effects_are_kept_once_and_capped() {
        let mut outcome = empty_outcome();
        let write = SideEffect::File { operation: "write".into(), path: "a".into() };
        outcome.push_side_effect(write.clone());
        outcome.push_side_effect(write);
        assert_eq!(outcome.side_effects.len(), 1);
        for n in 0..MAX_SIDE_EFFECTS_PER_EVALUATION {
            outcome.push_side_effect(SideEffect::Request { method: "GET".into(), url: format!("http://h/{n}") });
        }
        assert!(outcome.side_effects_truncated);
        assert_eq!(outcome.side_effects.len(), MAX_SIDE_EFFECTS_PER_EVALUATION);
    }

    #[test]
    fn binary_mime_types_are_the_images_but_svg() {
        assert!(DisplayOutput::is_binary("image/png"));
        assert!(!DisplayOutput::is_binary("image/svg+xml"));
        assert!(!DisplayOutput::is_binary("text/html"));
    }
}
