//! Code in a sandbox: one-shot snippets and contexts, isolates first. A
//! snippet the isolate answers needs-escalation for runs in a kernel in the
//! container instead, and a context moves there with its state (replayed),
//! unless the isolate already did something a second run would do again.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use airlock_core::{EscalationReason, EvalOutcome, EvalResult, Language, Needs, OutputSender, TierKind};

use crate::config::TierPreference;
use crate::contexts::{
    ContextFork, ContextHandle, ContextInfo, ContextMove, ContextOptions, ContextReplay, History, Home, Noted,
    Replayable,
};
use crate::error::Result;
use crate::router::route;
use crate::runtime::lock;
use crate::sandbox::{CodeOutcome, ContextSlot, Placement, Sandbox};
use crate::store::{ExecutionKind, StoredContext};

/// Why a context's evaluation ran in the container without asking the isolate.
const LIVES_IN_CONTAINER: &str = "the context lives in the container since it escalated";

impl Sandbox {
    /// Evaluates code once in a fresh context (isolates first). Code the
    /// interpreter answers needs-escalation for runs again in a fresh kernel
    /// in the container, with the same workspace, unless the isolate already
    /// changed files or sent requests before it stopped: then it is not run
    /// twice, and the answer (needs-escalation) lists what it did.
    pub async fn code(&self, language: Language, code: &str) -> Result<CodeOutcome> {
        self.one_shot(language, code, None).await
    }

    /// As [`code`](Self::code), with stdout and stderr sent to `output` as
    /// they are written, in either tier. After an escalation the container's
    /// output follows what the isolate wrote before it stopped.
    pub async fn code_streaming(&self, language: Language, code: &str, output: OutputSender) -> Result<CodeOutcome> {
        self.one_shot(language, code, Some(output)).await
    }

    /// Evaluates code in a context made by [`create_context`](Self::create_context);
    /// state is kept between calls. When the isolate answers needs-escalation,
    /// the context moves to a kernel in the container: its earlier successful
    /// evaluations are replayed there (unless made with
    /// `replay_on_escalation: false`), then the code runs, and it lives there
    /// from then on ([`Placement::context_moved`] says what moved).
    pub async fn code_in(&self, context: &str, code: &str) -> Result<CodeOutcome> {
        self.in_context(context, code, None).await
    }

    /// As [`code_in`](Self::code_in), with output sent to `output` as it is written.
    pub async fn code_in_streaming(&self, context: &str, code: &str, output: OutputSender) -> Result<CodeOutcome> {
        self.in_context(context, code, Some(output)).await
    }

    async fn one_shot(&self, language: Language, code: &str, output: Option<OutputSender>) -> Result<CodeOutcome> {
        let _active = self.begin().await?;
        let route = route(&Needs::of_code(language), self.inner.config.tier)?;
        let started_at = SystemTime::now();
        if route.tier == TierKind::Container {
            let outcome = self.in_fresh_kernel(language, code, output.as_ref()).await?;
            self.record(ExecutionKind::Code, TierKind::Container, started_at, outcome.wall_time, outcome.cpu_time)?;
            return Ok(CodeOutcome { outcome, placement: Placement::new(TierKind::Container, route.reason) });
        }
        self.inner.isolate_wrote.store(true, Ordering::SeqCst);
        let (workspace, limits) = (self.inner.workspace.clone(), self.inner.config.limits);
        let outcome = self
            .runtime
            .inner
            .interpreters
            .run_streaming(language, workspace, code, limits, Some(self.outbound()), output.clone())
            .await?;
        self.record(ExecutionKind::Code, TierKind::Isolate, started_at, outcome.wall_time, outcome.cpu_time)?;
        let Some(reason) = self.should_escalate(&outcome) else {
            return Ok(CodeOutcome { outcome, placement: Placement::new(TierKind::Isolate, route.reason) });
        };
        if !outcome.side_effects.is_empty() {
            return Ok(not_run_twice(outcome, &reason));
        }
        let started_at = SystemTime::now();
        let escalated = self.in_fresh_kernel(language, code, output.as_ref()).await?;
        self.note_escalation(&format!("the {language} interpreter answered needs-escalation: {reason}"))?;
        self.record(ExecutionKind::Code, TierKind::Container, started_at, escalated.wall_time, escalated.cpu_time)?;
        let mut placement =
            Placement::new(TierKind::Container, &format!("the isolate answered needs-escalation ({reason})"));
        placement.escalated = Some(reason);
        Ok(CodeOutcome { outcome: escalated, placement })
    }

    /// The reason to escalate an isolate's answer, unless the sandbox is
    /// pinned to isolates (then the answer stands, for the caller to see).
    fn should_escalate(&self, outcome: &EvalOutcome) -> Option<EscalationReason> {
        match &outcome.result {
            EvalResult::NeedsEscalation { reason } if self.inner.config.tier != TierPreference::Isolate => {
                Some(reason.clone())
            }
            _ => None,
        }
    }

    /// Runs `code` in a kernel of its own, dropped (and its processes
    /// killed) when it answers.
    async fn in_fresh_kernel(
        &self,
        language: Language,
        code: &str,
        output: Option<&OutputSender>,
    ) -> Result<EvalOutcome> {
        let container = self.container().await?;
        let mut kernel = container.start_kernel(language).await?;
        let outcome = kernel.eval(&container, code, &self.inner.config.limits, output).await;
        // Ended before answering: a process that exits right after (a CLI
        // command) would otherwise leave the kernel running in the container.
        kernel.stop().await;
        Ok(outcome?)
    }

    async fn in_context(&self, id: &str, code: &str, output: Option<OutputSender>) -> Result<CodeOutcome> {
        // From this sandbox's own table: a context of another sandbox is not
        // found, and asking for one that is gone does not wake the sandbox.
        let handle = lock(&self.inner.contexts).get(id).cloned();
        let Some(handle) = handle else {
            return Err(airlock_core::Error::NoSuchContext(id.to_string()).into());
        };
        let _active = self.begin().await?;
        // One evaluation at a time per context: the next waits here.
        let mut home = handle.home.lock().await;
        // Dormant since its sandbox slept or the runtime was reopened: rebuilt
        // first, by replaying its history where it lived.
        let restored = if matches!(*home, Home::Dormant) {
            let tier = lock(&handle.counts).tier;
            let (numbered, truncated) = self.kept_history(id, &handle, &home)?;
            let entries: Vec<Replayable> = numbered.iter().map(|(_, entry)| entry.clone()).collect();
            let replay = handle.options.replay_on_escalation;
            let (live, isolate, report) = self.replay_into(handle.language, tier, &entries, truncated, replay).await?;
            *lock(&handle.history) = if replay {
                History::restored(numbered, truncated)
            } else {
                // It came back empty: its history no longer describes it.
                self.runtime.inner.store.clear_context_history(self.inner.id, id)?;
                History::default()
            };
            *lock(&handle.isolate) = isolate;
            *home = live;
            Some(report)
        } else {
            None
        };
        let answer = self.evaluate(id, &handle, &mut home, code, output).await;
        drop(home);
        // Deleted while this ran: what a restore or a move made goes too.
        let still_ours = lock(&self.inner.contexts).get(id).is_some_and(|ours| Arc::ptr_eq(ours, &handle));
        if !still_ours && let Some(isolate) = lock(&handle.isolate).take() {
            let _ = self.runtime.inner.interpreters.delete(&isolate);
        }
        let mut answer = answer?;
        answer.placement.context_restored = restored;
        Ok(answer)
    }

    /// One evaluation in a live context (`home` is locked, never dormant).
    async fn evaluate(
        &self,
        id: &str,
        handle: &ContextHandle,
        home: &mut Home,
        code: &str,
        output: Option<OutputSender>,
    ) -> Result<CodeOutcome> {
        let started_at = SystemTime::now();
        let limits = self.inner.config.limits;
        if let Home::Container(kernel) = home {
            let container = self.container().await?;
            let outcome = kernel.eval(&container, code, &limits, output.as_ref()).await?;
            handle.count_container_evaluation(kernel.restarts());
            self.note_history(id, handle, code, &outcome)?;
            self.record(ExecutionKind::Code, TierKind::Container, started_at, outcome.wall_time, outcome.cpu_time)?;
            return Ok(CodeOutcome { outcome, placement: Placement::new(TierKind::Container, LIVES_IN_CONTAINER) });
        }
        let Some(isolate) = lock(&handle.isolate).clone() else {
            return Err(airlock_core::Error::NoSuchContext(id.to_string()).into());
        };
        let route = route(&Needs::of_code(handle.language), self.inner.config.tier)?;
        self.inner.isolate_wrote.store(true, Ordering::SeqCst);
        let interpreters = &self.runtime.inner.interpreters;
        let outcome = interpreters.eval_streaming(&isolate, code, output.clone()).await?;
        self.record(ExecutionKind::Code, TierKind::Isolate, started_at, outcome.wall_time, outcome.cpu_time)?;
        let Some(reason) = self.should_escalate(&outcome) else {
            self.note_history(id, handle, code, &outcome)?;
            return Ok(CodeOutcome { outcome, placement: Placement::new(TierKind::Isolate, route.reason) });
        };
        if !outcome.side_effects.is_empty() {
            return Ok(not_run_twice(outcome, &reason));
        }

        // The move: a kernel in the container, the history replayed in it,
        // then the code that needed it.
        let started_at = SystemTime::now();
        let container = self.container().await?;
        let mut kernel = container.start_kernel(handle.language).await?;
        let mut moved = ContextMove { replayed: handle.options.replay_on_escalation, ..ContextMove::default() };
        if handle.options.replay_on_escalation {
            let history: Vec<_> = lock(&handle.history).entries().cloned().collect();
            moved.history_truncated = lock(&handle.history).truncated;
            for (n, earlier) in history.iter().enumerate() {
                let replayed = kernel.eval(&container, &earlier.code, &limits, None).await?;
                moved.replayed_evaluations += 1;
                for effect in &earlier.side_effects {
                    if !moved.repeated_side_effects.contains(effect) {
                        moved.repeated_side_effects.push(effect.clone());
                    }
                }
                if !replayed.is_ok() {
                    moved.replay_failures.push(format!("#{}: {}", n + 1, describe(&replayed.result)));
                }
            }
        }
        let escalated = kernel.eval(&container, code, &limits, output.as_ref()).await?;
        // The history goes on in the container (what a later restore or fork
        // replays there): the replayed entries, then this one. Without replay
        // the kernel started empty, and so does its history.
        let store = &self.runtime.inner.store;
        if !handle.options.replay_on_escalation {
            lock(&handle.history).clear();
            store.clear_context_history(self.inner.id, id)?;
        }
        store.set_context_tier(self.inner.id, id, TierKind::Container)?;
        handle.count_container_evaluation(kernel.restarts());
        self.note_history(id, handle, code, &escalated)?;
        *home = Home::Container(Box::new(kernel));
        // The isolate's instance is no longer this context's state.
        if let Some(isolate) = lock(&handle.isolate).take() {
            let _ = interpreters.delete(&isolate);
        }
        self.note_escalation(&format!("the {} interpreter answered needs-escalation: {reason}", handle.language))?;
        self.record(ExecutionKind::Code, TierKind::Container, started_at, escalated.wall_time, escalated.cpu_time)?;
        let mut placement = Placement::new(
            TierKind::Container,
            &format!("the isolate answered needs-escalation ({reason}); the context moved to the container"),
        );
        placement.escalated = Some(reason);
        placement.context_moved = Some(moved);
        Ok(CodeOutcome { outcome: escalated, placement })
    }

    /// A context's history, numbered, and whether it was cut: from memory
    /// while it is live, from the registry while it is dormant.
    fn kept_history(&self, id: &str, handle: &ContextHandle, home: &Home) -> Result<(Vec<(u64, Replayable)>, bool)> {
        if matches!(home, Home::Dormant) {
            return self.runtime.inner.store.context_history(self.inner.id, id);
        }
        let history = lock(&handle.history);
        Ok((history.numbered().cloned().collect(), history.truncated))
    }

    /// Keeps a successful evaluation in the context's history, and in the
    /// registry (or forgets the history, when the context lost its state).
    fn note_history(&self, id: &str, handle: &ContextHandle, code: &str, outcome: &EvalOutcome) -> Result<()> {
        let noted = lock(&handle.history).note(code, outcome);
        let store = &self.runtime.inner.store;
        match noted {
            Noted::Nothing => Ok(()),
            Noted::Cleared => store.clear_context_history(self.inner.id, id),
            Noted::Added { seq, keep_from, truncated } => {
                let entry = Replayable { code: code.to_string(), side_effects: outcome.side_effects.clone() };
                store.add_context_history(self.inner.id, id, seq, &entry, keep_from, truncated)
            }
        }
    }

    /// A live context of `language` in `tier` (a new isolate instance, or a
    /// new kernel in the container) with `entries` replayed in it, in order,
    /// unless `replay` is off; with the new isolate instance's id, and what
    /// the replay did. The replay's CPU is billed as one execution.
    async fn replay_into(
        &self,
        language: Language,
        tier: TierKind,
        entries: &[Replayable],
        truncated: bool,
        replay: bool,
    ) -> Result<(Home, Option<String>, ContextReplay)> {
        let started_at = SystemTime::now();
        let limits = self.inner.config.limits;
        let mut report = ContextReplay::new(tier, replay, replay && truncated);
        let entries = if replay { entries } else { &[] };
        let (mut wall, mut cpu) = (Duration::ZERO, Duration::ZERO);
        if tier == TierKind::Container {
            let container = self.container().await?;
            let mut kernel = container.start_kernel(language).await?;
            for (n, earlier) in entries.iter().enumerate() {
                let replayed = kernel.eval(&container, &earlier.code, &limits, None).await?;
                (wall, cpu) = (wall + replayed.wall_time, cpu + replayed.cpu_time);
                report.count(n + 1, earlier, &replayed.result);
            }
            if !entries.is_empty() {
                self.record(ExecutionKind::Code, TierKind::Container, started_at, wall, cpu)?;
            }
            return Ok((Home::Container(Box::new(kernel)), None, report));
        }
        self.inner.isolate_wrote.store(true, Ordering::SeqCst);
        let interpreters = &self.runtime.inner.interpreters;
        let isolate = interpreters
            .create_context_with_outbound(language, self.inner.workspace.clone(), limits, Some(self.outbound()))
            .await?;
        for (n, earlier) in entries.iter().enumerate() {
            let replayed = match interpreters.eval(&isolate, &earlier.code).await {
                Ok(replayed) => replayed,
                Err(error) => {
                    let _ = interpreters.delete(&isolate);
                    return Err(error.into());
                }
            };
            (wall, cpu) = (wall + replayed.wall_time, cpu + replayed.cpu_time);
            report.count(n + 1, earlier, &replayed.result);
        }
        if !entries.is_empty()
            && let Err(error) = self.record(ExecutionKind::Code, TierKind::Isolate, started_at, wall, cpu)
        {
            let _ = interpreters.delete(&isolate);
            return Err(error);
        }
        Ok((Home::Isolate, Some(isolate), report))
    }

    /// Makes an interpreter context in this sandbox; its id is for [`code_in`](Self::code_in).
    /// At most `max_contexts` at once: past it, [`Error::SandboxLimit`].
    /// The context is kept in the registry: it outlives a sleep of the
    /// sandbox and a restart of the runtime (rebuilt by replay, see
    /// [`Placement::context_restored`]) until it is deleted.
    pub async fn create_context(&self, language: Language) -> Result<String> {
        self.create_context_with(language, ContextOptions::default()).await
    }

    /// As [`create_context`](Self::create_context), with options. In a sandbox
    /// pinned to containers the context is a kernel in the container from the start.
    pub async fn create_context_with(&self, language: Language, options: ContextOptions) -> Result<String> {
        let _active = self.begin().await?;
        let slot = ContextSlot::take(&self.inner)?;
        let route = route(&Needs::of_code(language), self.inner.config.tier)?;
        let (home, isolate) = if route.tier == TierKind::Container {
            let container = self.container().await?;
            let kernel = container.start_kernel(language).await?;
            (Home::Container(Box::new(kernel)), None)
        } else {
            let isolate = self
                .runtime
                .inner
                .interpreters
                .create_context_with_outbound(
                    language,
                    self.inner.workspace.clone(),
                    self.inner.config.limits,
                    Some(self.outbound()),
                )
                .await?;
            (Home::Isolate, Some(isolate))
        };
        // Its own id, not its instance's: it outlives instances (and runtimes).
        let id = uuid::Uuid::new_v4().simple().to_string();
        let tier = route.tier;
        let stored = StoredContext { id: id.clone(), language, options, tier, truncated: false, history: Vec::new() };
        self.store_new_context(&stored, isolate.as_deref())?;
        slot.fill(id.clone(), ContextHandle::new(language, options, tier, home, isolate, History::default()));
        Ok(id)
    }

    /// Records a new context; on failure its isolate instance goes.
    fn store_new_context(&self, stored: &StoredContext, isolate: Option<&str>) -> Result<()> {
        let inserted = self.runtime.inner.store.insert_context(self.inner.id, stored);
        if inserted.is_err()
            && let Some(isolate) = isolate
        {
            let _ = self.runtime.inner.interpreters.delete(isolate);
        }
        inserted
    }

    /// Forks context `id`: a new context in this sandbox, in the same tier
    /// and with the same options, holding the same variables, functions and
    /// imports, made by replaying the source's kept history into a fresh
    /// isolate instance (or a fresh kernel, for a context that lives in the
    /// container). The source is not touched (an evaluation running on it
    /// is waited for, then its history copied) and the two diverge from
    /// then on. A snapshot *by replay*: the fork's code ran again, so side
    /// effects repeat and time, randomness and the workspace's current
    /// contents may give other values ([`ContextReplay`]); the fork replays
    /// even a context made with `replay_on_escalation: false`. Counts
    /// against `max_contexts`.
    pub async fn fork_context(&self, id: &str) -> Result<ContextFork> {
        let handle = lock(&self.inner.contexts).get(id).cloned();
        let Some(handle) = handle else {
            return Err(airlock_core::Error::NoSuchContext(id.to_string()).into());
        };
        let _active = self.begin().await?;
        let slot = ContextSlot::take(&self.inner)?;
        // Between two evaluations of the source.
        let (numbered, truncated, tier) = {
            let home = handle.home.lock().await;
            let (numbered, truncated) = self.kept_history(id, &handle, &home)?;
            (numbered, truncated, lock(&handle.counts).tier)
        };
        let entries: Vec<Replayable> = numbered.iter().map(|(_, entry)| entry.clone()).collect();
        let (home, isolate, replay) = self.replay_into(handle.language, tier, &entries, truncated, true).await?;
        let fork = uuid::Uuid::new_v4().simple().to_string();
        let stored = StoredContext {
            id: fork.clone(),
            language: handle.language,
            options: handle.options,
            tier,
            truncated,
            history: numbered.clone(),
        };
        self.store_new_context(&stored, isolate.as_deref())?;
        let history = History::restored(numbered, truncated);
        slot.fill(fork.clone(), ContextHandle::new(handle.language, handle.options, tier, home, isolate, history));
        Ok(ContextFork { id: fork, source: id.to_string(), language: handle.language, replay })
    }

    /// This sandbox's contexts (dormant ones included: they are rebuilt on
    /// their next evaluation).
    pub fn contexts(&self) -> Vec<ContextInfo> {
        let ours: Vec<(String, std::sync::Arc<ContextHandle>)> =
            lock(&self.inner.contexts).iter().map(|(id, handle)| (id.clone(), handle.clone())).collect();
        let isolates = self.runtime.inner.interpreters.list();
        ours.into_iter()
            .map(|(id, handle)| {
                let counts = *lock(&handle.counts);
                let isolate = lock(&handle.isolate).clone();
                let (evaluations, resets) = match isolates.iter().find(|info| Some(&info.id) == isolate.as_ref()) {
                    Some(isolate) if counts.tier == TierKind::Isolate => (isolate.evaluations, isolate.resets),
                    _ => (counts.evaluations, counts.resets),
                };
                ContextInfo {
                    id,
                    language: handle.language,
                    tier: counts.tier,
                    evaluations,
                    resets,
                    options: handle.options,
                }
            })
            .collect()
    }

    /// Deletes a context: its isolate instance, or its kernel (killed once an
    /// evaluation running on it ends), and what the registry kept of it.
    pub fn delete_context(&self, id: &str) -> Result<()> {
        let Some(handle) = lock(&self.inner.contexts).remove(id) else {
            return Err(airlock_core::Error::NoSuchContext(id.to_string()).into());
        };
        if let Some(isolate) = lock(&handle.isolate).take() {
            let _ = self.runtime.inner.interpreters.delete(&isolate);
        }
        self.runtime.inner.store.delete_context(self.inner.id, id)
    }
}

/// The isolate's answer to a snippet that needs the container but already
/// changed files or sent requests: running it again would do those twice.
fn not_run_twice(outcome: EvalOutcome, reason: &EscalationReason) -> CodeOutcome {
    let did: Vec<String> = outcome.side_effects.iter().map(ToString::to_string).collect();
    let reason = format!(
        "the isolate answered needs-escalation ({reason}) after it had already done what a second run would do again ({}{}); \
         not run again in the container: run it in a sandbox pinned to containers, or split it so the part that needs the container comes first",
        did.join(", "),
        if outcome.side_effects_truncated { ", ..." } else { "" },
    );
    CodeOutcome { outcome, placement: Placement::new(TierKind::Isolate, &reason) }
}

/// One line for a result that was not a success.
pub(crate) fn describe(result: &EvalResult) -> String {
    match result {
        EvalResult::Ok { .. } => "ok".into(),
        EvalResult::SyntaxError(error) | EvalResult::RuntimeError(error) => format!("{}: {}", error.kind, error.message),
        EvalResult::NeedsEscalation { reason } => format!("needs-escalation ({reason})"),
        EvalResult::LimitExceeded(hit) => hit.to_string(),
        EvalResult::Crashed { message } => format!("crashed: {message}"),
        _ => format!("{result:?}"),
    }
}
