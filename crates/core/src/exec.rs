//! Exec requests and their outcomes, shared by every tier.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{LimitExceeded, Limits, TierKind};

/// What a run reads on its standard input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StdinSource {
    /// End of file at once (the default: nothing is shared unless asked).
    #[default]
    Empty,
    /// These bytes, then end of file.
    Bytes(Vec<u8>),
    /// The host process's own standard input (for the CLI).
    Inherit,
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputStream {
    Stdout,
    Stderr,
}

impl fmt::Display for OutputStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        })
    }
}

/// A piece of output, as the guest wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    pub stream: OutputStream,
    pub bytes: Vec<u8>,
}

/// Receives output while a run goes on, in the order it was written, up to the
/// output cap. Called from the thread running the guest: keep it quick
/// (forward into a channel).
pub type OutputSender = Arc<dyn Fn(OutputChunk) + Send + Sync>;

/// One program to run, with everything it may see passed explicitly.
#[derive(Clone, Default)]
pub struct ExecRequest {
    /// What to run. For the isolate tier, the path of a `.wasm` (or `.wat`)
    /// file on the host; for the container tier, a command.
    pub program: String,
    /// Arguments after the program name (`argv[1..]`).
    pub args: Vec<String>,
    /// Environment variables; nothing is inherited from the host.
    pub env: Vec<(String, String)>,
    pub stdin: StdinSource,
    /// Working directory inside the sandbox. `None` is `/workspace`. The
    /// isolate tier has no working directory of its own and accepts only
    /// `/workspace`; the container tier accepts any absolute path.
    pub cwd: Option<String>,
    pub limits: Limits,
    /// Where to stream output as it is written, beside the captured copy.
    pub output: Option<OutputSender>,
}

impl fmt::Debug for ExecRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecRequest")
            .field("program", &self.program)
            .field("args", &self.args)
            .field("env", &self.env)
            .field("stdin", &self.stdin)
            .field("cwd", &self.cwd)
            .field("limits", &self.limits)
            .field("output", &self.output.as_ref().map(|_| "<sender>"))
            .finish()
    }
}

impl ExecRequest {
    pub fn new(program: impl Into<String>) -> Self {
        Self { program: program.into(), ..Self::default() }
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args = args.into_iter().map(Into::into).collect();
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn stdin(mut self, stdin: StdinSource) -> Self {
        self.stdin = stdin;
        self
    }

    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    pub fn output(mut self, sender: OutputSender) -> Self {
        self.output = Some(sender);
        self
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
#[non_exhaustive]
pub enum Termination {
    /// The program finished with this exit code.
    Exited { code: i32 },
    /// Airlock stopped the program because it hit a limit.
    LimitExceeded(LimitExceeded),
    /// The program crashed (a wasm trap such as `unreachable` or an
    /// out-of-bounds access, or a fatal signal in a container).
    Crashed { message: String },
}

impl fmt::Display for Termination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Termination::Exited { code } => write!(f, "exited with status {code}"),
            Termination::LimitExceeded(hit) => write!(f, "{hit}"),
            Termination::Crashed { message } => write!(f, "crashed: {message}"),
        }
    }
}

/// What a run produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutcome {
    pub termination: Termination,
    /// Captured standard output, at most the output cap.
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Whether output past the cap was dropped.
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// Wall-clock time from start to end, including instantiation.
    pub wall_time: Duration,
    /// CPU time the run actually used.
    pub cpu_time: Duration,
    pub tier: TierKind,
}

impl ExecOutcome {
    /// The exit code, if the program exited by itself.
    pub fn exit_code(&self) -> Option<i32> {
        match self.termination {
            Termination::Exited { code } => Some(code),
            _ => None,
        }
    }

    /// Exited with status 0.
    pub fn success(&self) -> bool {
        self.exit_code() == Some(0)
    }

    /// The limit that stopped the run, if one did.
    pub fn limit_exceeded(&self) -> Option<LimitExceeded> {
        match self.termination {
            Termination::LimitExceeded(hit) => Some(hit),
            _ => None,
        }
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}
