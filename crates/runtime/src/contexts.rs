//! A sandbox's interpreter contexts: where each lives (an isolate, or a
//! kernel in the container after it escalated), the history kept to replay it
//! there, and what a move reports.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use airlock_container::Kernel;
use airlock_core::{EvalOutcome, EvalResult, Language, SideEffect, TierKind};
use serde::{Deserialize, Serialize};

use crate::runtime::lock;

/// Most earlier evaluations a context keeps to replay when it moves to the
/// container; past it the oldest are dropped and the move says the state may
/// be partial.
pub const MAX_REPLAY_EVALUATIONS: usize = 1_000;
/// Most bytes of code a context keeps to replay (all kept evaluations
/// together); protects the host's memory from a context fed megabytes of code.
pub const MAX_REPLAY_BYTES: usize = 4 * 1024 * 1024;

/// How a context behaves, chosen when it is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContextOptions {
    /// When an evaluation needs the container, replay the context's earlier
    /// successful evaluations in the new kernel first, so its variables and
    /// imports come along. Replaying repeats their side effects (see
    /// [`ContextMove`]); with `false` the context starts fresh in the
    /// container, and the answer says so.
    pub replay_on_escalation: bool,
}

impl Default for ContextOptions {
    fn default() -> Self {
        Self { replay_on_escalation: true }
    }
}

/// What happened to a context that moved from its isolate to a kernel in the
/// container, in the answer of the evaluation that moved it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ContextMove {
    /// Whether earlier evaluations were replayed; `false` when the context was
    /// made with `replay_on_escalation: false`: it started fresh, its earlier
    /// variables are gone.
    pub replayed: bool,
    /// How many earlier evaluations ran again in the container.
    pub replayed_evaluations: usize,
    /// What those evaluations had done in the isolate and so did again:
    /// files written, requests sent. Their output was not shown again.
    /// Replay also runs again anything that depends on time, randomness or
    /// the workspace's current contents, and may give other values.
    pub repeated_side_effects: Vec<SideEffect>,
    /// Earlier evaluations beyond [`MAX_REPLAY_EVALUATIONS`] or
    /// [`MAX_REPLAY_BYTES`] were not kept: the replayed state may be partial.
    pub history_truncated: bool,
    /// Replayed evaluations that did not succeed in the container, each as
    /// `#N: what it said`: the context's state may differ from the isolate's.
    pub replay_failures: Vec<String>,
}

/// One context as the sandbox lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContextInfo {
    pub id: String,
    pub language: Language,
    /// Where it lives now: `isolate`, or `container` once it escalated.
    pub tier: TierKind,
    pub evaluations: u64,
    /// How many times it lost its state to a limit or a crash.
    pub resets: u64,
    pub options: ContextOptions,
}

/// A successful earlier evaluation, kept to replay.
#[derive(Debug, Clone)]
pub(crate) struct Replayable {
    pub code: String,
    pub side_effects: Vec<SideEffect>,
}

/// The code a context ran successfully, oldest first, within the caps.
#[derive(Debug, Default)]
pub(crate) struct History {
    entries: VecDeque<Replayable>,
    bytes: usize,
    pub truncated: bool,
}

impl History {
    /// Keeps `code` if it succeeded; a limit or a crash reset the context, so
    /// the history goes with its state.
    pub fn note(&mut self, code: &str, outcome: &EvalOutcome) {
        match outcome.result {
            EvalResult::Ok { .. } => {}
            EvalResult::LimitExceeded(_) | EvalResult::Crashed { .. } => {
                self.clear();
                return;
            }
            _ => return,
        }
        if code.trim().is_empty() {
            return;
        }
        self.entries.push_back(Replayable { code: code.to_string(), side_effects: outcome.side_effects.clone() });
        self.bytes += code.len();
        while self.entries.len() > MAX_REPLAY_EVALUATIONS || self.bytes > MAX_REPLAY_BYTES {
            match self.entries.pop_front() {
                Some(dropped) => self.bytes -= dropped.code.len(),
                None => break,
            }
            self.truncated = true;
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
        self.truncated = false;
    }

    pub fn entries(&self) -> impl Iterator<Item = &Replayable> {
        self.entries.iter()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Where a context's state lives.
pub(crate) enum Home {
    /// In the isolate interpreters' registry, under the context's id.
    Isolate,
    /// In a kernel inside the sandbox's container.
    Container(Box<Kernel>),
}

/// What [`ContextInfo`] reports, readable without waiting for an evaluation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counts {
    pub tier: TierKind,
    /// Counted while in the container (the isolate registry counts its own).
    pub evaluations: u64,
    pub resets: u64,
}

/// A context of the sandbox. Its home is locked for a whole evaluation (and
/// a move), so evaluations on one context run one at a time.
pub(crate) struct ContextHandle {
    pub language: Language,
    pub options: ContextOptions,
    /// Kept while the context lives in an isolate.
    pub history: Mutex<History>,
    pub counts: Mutex<Counts>,
    pub home: tokio::sync::Mutex<Home>,
}

impl std::fmt::Debug for ContextHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextHandle")
            .field("language", &self.language)
            .field("options", &self.options)
            .field("counts", &*lock(&self.counts))
            .finish_non_exhaustive()
    }
}

impl ContextHandle {
    pub fn new(language: Language, options: ContextOptions, tier: TierKind, home: Home) -> Arc<Self> {
        Arc::new(Self {
            language,
            options,
            history: Mutex::default(),
            counts: Mutex::new(Counts { tier, evaluations: 0, resets: 0 }),
            home: tokio::sync::Mutex::new(home),
        })
    }

    /// Counts an evaluation done by a kernel that has restarted `restarts` times.
    pub fn count_container_evaluation(&self, restarts: u64) {
        let mut counts = lock(&self.counts);
        counts.tier = TierKind::Container;
        counts.evaluations += 1;
        counts.resets = restarts;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use airlock_core::{CodeError, Limit, LimitExceeded};

    use super::*;

    fn outcome(result: EvalResult) -> EvalOutcome {
        EvalOutcome {
            result,
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
    fn history_keeps_successes_only_and_forgets_on_a_reset() {
        let mut history = History::default();
        history.note("x = 1", &outcome(EvalResult::Ok { value: None }));
        let error = CodeError { kind: "NameError".into(), message: "y".into(), traceback: String::new(), line: None };
        history.note("y", &outcome(EvalResult::RuntimeError(error)));
        history.note("", &outcome(EvalResult::Ok { value: None }));
        assert_eq!(history.entries().map(|e| e.code.as_str()).collect::<Vec<_>>(), ["x = 1"]);
        let hit = LimitExceeded { limit: Limit::Deadline, value: 1 };
        history.note("while True: pass", &outcome(EvalResult::LimitExceeded(hit)));
        assert_eq!(history.len(), 0);
    }

    #[test]
    fn history_drops_the_oldest_past_its_caps_and_says_so() {
        let mut history = History::default();
        for n in 0..=MAX_REPLAY_EVALUATIONS {
            history.note(&format!("x = {n}"), &outcome(EvalResult::Ok { value: None }));
        }
        assert_eq!(history.len(), MAX_REPLAY_EVALUATIONS);
        assert!(history.truncated);
        assert_eq!(history.entries().next().map(|e| e.code.as_str()), Some("x = 1"));
        let mut history = History::default();
        let big = "#".repeat(MAX_REPLAY_BYTES / 2 + 1);
        history.note(&big, &outcome(EvalResult::Ok { value: None }));
        history.note(&big, &outcome(EvalResult::Ok { value: None }));
        assert_eq!(history.len(), 1);
        assert!(history.truncated);
    }
}
