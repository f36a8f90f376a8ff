//! A sandbox's interpreter contexts: where each lives (an isolate, or a
//! kernel in the container after it escalated), the history kept to replay it
//! there, and what a move reports.
//!
//! The history is also what makes a context outlive its instance: it is kept
//! in the registry as evaluations succeed (`store.rs`, within the caps below),
//! so a context whose sandbox slept, or whose runtime was reopened on the same
//! home, is rebuilt on its next evaluation by replaying it
//! ([`ContextReplay`]), and [`fork_context`](crate::Sandbox::fork_context)
//! makes a copy the same way. These are snapshots *by replay*: the code runs
//! again; no memory image of an instance or a kernel is taken.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use airlock_container::Kernel;
use airlock_core::{EvalOutcome, EvalResult, Language, SideEffect, TierKind};
use serde::{Deserialize, Serialize};

use crate::runtime::lock;

/// Most earlier evaluations a context keeps to replay (when it moves to the
/// container, is restored after a sleep or a restart, or is forked); past it
/// the oldest are dropped and the replay says the state may be partial. The
/// same cap bounds the rows a context holds in the registry.
pub const MAX_REPLAY_EVALUATIONS: usize = 1_000;
/// Most bytes a context keeps to replay: its kept evaluations' code and the
/// side effects recorded with them (paths, URLs), all together; protects the
/// host's memory, and the registry on disk, from a context fed megabytes of
/// code or naming long paths.
pub const MAX_REPLAY_BYTES: usize = 4 * 1024 * 1024;

/// How a context behaves, chosen when it is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContextOptions {
    /// When an evaluation needs the container, replay the context's earlier
    /// successful evaluations in the new kernel first, so its variables and
    /// imports come along. Replaying repeats their side effects (see
    /// [`ContextMove`]); with `false` the context starts fresh in the
    /// container, and the answer says so. `false` also means the context is
    /// never replayed on its own: after its sandbox slept or its runtime was
    /// reopened it comes back empty ([`ContextReplay::replayed`] is `false`).
    /// An explicit [`fork_context`](crate::Sandbox::fork_context) replays it
    /// whatever this says.
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

/// What a replay of a context's history did: on the first evaluation after
/// its sandbox slept or its runtime was reopened ([`crate::Placement::context_restored`]),
/// or when it was forked ([`ContextFork`]).
///
/// Replay runs the kept code again, in order, in a fresh instance (or kernel):
/// it repeats the side effects listed here (files written, requests sent),
/// and anything that depends on time, randomness, the environment or the
/// workspace's current contents may come out different. Objects that are
/// not made by code (open files, sockets, threads, a running generator's
/// position) are whatever the replayed code makes them again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContextReplay {
    /// Where the context was rebuilt: `isolate`, or `container` for one that
    /// had moved there (a new kernel).
    pub tier: TierKind,
    /// Whether the history was replayed; `false` for a context made with
    /// `replay_on_escalation: false`, which came back empty.
    pub replayed: bool,
    /// How many earlier evaluations ran again.
    pub replayed_evaluations: usize,
    /// What those evaluations had done the first time, and so did again.
    /// Their output was not shown again.
    pub repeated_side_effects: Vec<SideEffect>,
    /// Earlier evaluations beyond [`MAX_REPLAY_EVALUATIONS`] or
    /// [`MAX_REPLAY_BYTES`] were not kept: the state may be partial.
    pub history_truncated: bool,
    /// Replayed evaluations that did not succeed this time, each as
    /// `#N: what it said`: the state may differ from what it was.
    pub replay_failures: Vec<String>,
}

impl ContextReplay {
    pub(crate) fn new(tier: TierKind, replayed: bool, history_truncated: bool) -> Self {
        Self {
            tier,
            replayed,
            replayed_evaluations: 0,
            repeated_side_effects: Vec::new(),
            history_truncated,
            replay_failures: Vec::new(),
        }
    }

    /// Counts one replayed evaluation, `n` from 1, and how it went.
    pub(crate) fn count(&mut self, n: usize, earlier: &Replayable, result: &EvalResult) {
        self.replayed_evaluations += 1;
        for effect in &earlier.side_effects {
            if !self.repeated_side_effects.contains(effect) {
                self.repeated_side_effects.push(effect.clone());
            }
        }
        if !matches!(result, EvalResult::Ok { .. }) {
            self.replay_failures.push(format!("#{n}: {}", crate::code::describe(result)));
        }
    }
}

/// A context made by [`fork_context`](crate::Sandbox::fork_context): its id,
/// and what replaying the source's history into it did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContextFork {
    /// The new context's id.
    pub id: String,
    /// The context it was forked from (unchanged by the fork).
    pub source: String,
    pub language: Language,
    #[serde(flatten)]
    pub replay: ContextReplay,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Replayable {
    pub code: String,
    pub side_effects: Vec<SideEffect>,
}

impl Replayable {
    /// What it counts against [`MAX_REPLAY_BYTES`]: its code and the text of
    /// its side effects.
    fn weight(&self) -> usize {
        let effects: usize = self
            .side_effects
            .iter()
            .map(|effect| match effect {
                SideEffect::File { operation, path } => operation.len() + path.len(),
                SideEffect::Request { method, url } => method.len() + url.len(),
                _ => 0,
            })
            .sum();
        self.code.len() + effects
    }
}

/// The code a context ran successfully, oldest first, within the caps. Each
/// entry has a sequence number, its key in the registry.
#[derive(Debug, Default)]
pub(crate) struct History {
    entries: VecDeque<(u64, Replayable)>,
    bytes: usize,
    next_seq: u64,
    pub truncated: bool,
}

/// What [`History::note`] changed, for the registry to do the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Noted {
    Nothing,
    /// The history was emptied (the context lost its state).
    Cleared,
    /// The evaluation was kept as entry `seq`; entries before `keep_from`
    /// were dropped (the caps).
    Added {
        seq: u64,
        keep_from: u64,
        truncated: bool,
    },
}

impl History {
    /// A history as the registry kept it.
    pub fn restored(entries: Vec<(u64, Replayable)>, truncated: bool) -> Self {
        let bytes = entries.iter().map(|(_, entry)| entry.weight()).sum();
        let next_seq = entries.last().map_or(0, |(seq, _)| seq + 1);
        Self { entries: entries.into(), bytes, next_seq, truncated }
    }

    /// Keeps `code` if it succeeded; a limit or a crash reset the context, so
    /// the history goes with its state.
    pub fn note(&mut self, code: &str, outcome: &EvalOutcome) -> Noted {
        match outcome.result {
            EvalResult::Ok { .. } => {}
            EvalResult::LimitExceeded(_) | EvalResult::Crashed { .. } => {
                let had = !self.entries.is_empty() || self.truncated;
                self.clear();
                return if had { Noted::Cleared } else { Noted::Nothing };
            }
            _ => return Noted::Nothing,
        }
        if code.trim().is_empty() {
            return Noted::Nothing;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let entry = Replayable { code: code.to_string(), side_effects: outcome.side_effects.clone() };
        self.bytes += entry.weight();
        self.entries.push_back((seq, entry));
        while self.entries.len() > MAX_REPLAY_EVALUATIONS || self.bytes > MAX_REPLAY_BYTES {
            match self.entries.pop_front() {
                Some((_, dropped)) => self.bytes -= dropped.weight(),
                None => break,
            }
            self.truncated = true;
        }
        let keep_from = self.entries.front().map_or(seq + 1, |(first, _)| *first);
        Noted::Added { seq, keep_from, truncated: self.truncated }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
        self.truncated = false;
    }

    pub fn entries(&self) -> impl Iterator<Item = &Replayable> {
        self.entries.iter().map(|(_, entry)| entry)
    }

    /// The entries with their sequence numbers, oldest first.
    pub fn numbered(&self) -> impl Iterator<Item = &(u64, Replayable)> {
        self.entries.iter()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Where a context's state lives.
pub(crate) enum Home {
    /// In the isolate interpreters' registry, under the id in
    /// [`ContextHandle::isolate`].
    Isolate,
    /// In a kernel inside the sandbox's container.
    Container(Box<Kernel>),
    /// Nowhere live: its sandbox slept, or the runtime was reopened. The next
    /// evaluation rebuilds it in [`Counts::tier`] by replaying its history.
    Dormant,
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
/// a move or a restore), so evaluations on one context run one at a time.
pub(crate) struct ContextHandle {
    pub language: Language,
    pub options: ContextOptions,
    /// What it ran successfully, in either tier (mirrored in the registry).
    pub history: Mutex<History>,
    /// Its instance's id in the isolate interpreters' registry, while it has
    /// one (not the context's own id: that one outlives instances).
    pub isolate: Mutex<Option<String>>,
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
    pub fn new(
        language: Language,
        options: ContextOptions,
        tier: TierKind,
        home: Home,
        isolate: Option<String>,
        history: History,
    ) -> Arc<Self> {
        Arc::new(Self {
            language,
            options,
            history: Mutex::new(history),
            isolate: Mutex::new(isolate),
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
    fn history_numbers_its_entries_and_says_what_the_registry_must_drop() {
        let mut history = History::default();
        let ok = outcome(EvalResult::Ok { value: None });
        assert_eq!(history.note("a = 1", &ok), Noted::Added { seq: 0, keep_from: 0, truncated: false });
        assert_eq!(history.note("   ", &ok), Noted::Nothing);
        let big = "#".repeat(MAX_REPLAY_BYTES - 2);
        assert_eq!(history.note(&big, &ok), Noted::Added { seq: 1, keep_from: 1, truncated: true });
        let restored = History::restored(history.numbered().cloned().collect(), history.truncated);
        assert_eq!(restored.bytes, history.bytes);
        assert_eq!(restored.next_seq, 2);
        let hit = LimitExceeded { limit: Limit::Deadline, value: 1 };
        assert_eq!(history.note("loop", &outcome(EvalResult::LimitExceeded(hit))), Noted::Cleared);
        assert_eq!(history.note("loop", &outcome(EvalResult::LimitExceeded(hit))), Noted::Nothing);
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
        // Side effects count too: short code naming long paths is capped alike.
        let mut history = History::default();
        let mut naming = outcome(EvalResult::Ok { value: None });
        let path = "p".repeat(64 * 1024);
        naming.side_effects =
            (0..64).map(|_| SideEffect::File { operation: "write".into(), path: path.clone() }).collect();
        for _ in 0..4 {
            history.note("w()", &naming);
        }
        assert!(history.bytes <= MAX_REPLAY_BYTES, "{} bytes kept", history.bytes);
        assert!(history.truncated);
    }
}
