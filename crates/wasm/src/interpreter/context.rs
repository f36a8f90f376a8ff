//! One interpreter context: a component instance kept alive between
//! evaluations, so state persists. A limit hit or a crash resets it.
//!
//! A context can also be made ahead of its caller, without a workspace, and
//! warmed ([`InterpreterContext::start_ahead`]); [`InterpreterContext::bind`]
//! then gives it the caller's workspace and limits. Until then it has no file
//! system at all, and evaluates nothing but the empty warm-up snippet.

use std::time::{Duration, Instant};

use airlock_core::{
    CodeError, Error, EscalationReason, EvalOutcome, EvalResult, EvalValue, Language, Limits, OutputSender,
    OutputStream, Termination, Workspace,
};
use wasmtime::Store;

use super::bindings::Interpreter;
use super::bindings::exports::airlock::sandbox::evaluator as wit;
use crate::IsolateEngine;
use crate::guest::{Guest, GuestKind};
use crate::host::{ComponentHost, set_handle_cap};
use crate::metering::Metered;
use crate::outbound::{IsolateHttp, Outbound};
use crate::output::CapturePipe;
use crate::run::{Ended, arm, classify, confined_wasi, unbound_wasi};

struct Live {
    store: Store<ComponentHost>,
    bindings: Interpreter,
    stdout: CapturePipe,
    stderr: CapturePipe,
}

/// A persistent evaluation context in one language, bound to one workspace.
/// Not shared between tasks: wrap it in a mutex to share (as [`super::Interpreters`] does).
pub struct InterpreterContext {
    engine: IsolateEngine,
    guest: Guest,
    language: Language,
    /// `None` for a context made ahead and not yet bound to a caller.
    workspace: Option<Workspace>,
    limits: Limits,
    /// Where the guest's outbound HTTP goes; kept across resets.
    outbound: Option<Outbound>,
    live: Option<Live>,
    evaluations: u64,
    resets: u64,
}

impl std::fmt::Debug for InterpreterContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterpreterContext")
            .field("language", &self.language)
            .field("evaluations", &self.evaluations)
            .field("live", &self.live.is_some())
            .finish_non_exhaustive()
    }
}

/// What a context made ahead evaluates to warm up: the interpreters treat the
/// empty snippet as "run your evaluation path once, touching no files and
/// writing no output".
pub(crate) const WARM_UP_SNIPPET: &str = "";

fn code_error(error: wit::CodeError) -> CodeError {
    CodeError { kind: error.kind, message: error.message, traceback: error.traceback, line: error.line }
}

fn escalation(reason: wit::Escalation) -> EscalationReason {
    match reason {
        wit::Escalation::Subprocess => EscalationReason::Subprocess,
        wit::Escalation::MissingModule(name) => EscalationReason::MissingModule(name),
        wit::Escalation::Network => EscalationReason::Network,
        wit::Escalation::NativeExtension(name) => EscalationReason::NativeExtension(name),
    }
}

impl InterpreterContext {
    /// Starts a context: instantiates the interpreter now, so a broken guest or
    /// workspace is reported here rather than at the first evaluation.
    /// Its outbound HTTP is refused (see [`start_with_outbound`](Self::start_with_outbound)).
    pub async fn start(
        engine: &IsolateEngine,
        guest: Guest,
        language: Language,
        workspace: Workspace,
        limits: Limits,
    ) -> Result<Self, Error> {
        Self::start_with_outbound(engine, guest, language, workspace, limits, None).await
    }

    /// [`start`](Self::start), with the guest's `wasi:http` requests sent
    /// through `outbound` (none: every request is refused).
    pub async fn start_with_outbound(
        engine: &IsolateEngine,
        guest: Guest,
        language: Language,
        workspace: Workspace,
        limits: Limits,
        outbound: Option<Outbound>,
    ) -> Result<Self, Error> {
        limits.validate()?;
        Self::instantiated(engine, guest, language, Some(workspace), limits, outbound).await
    }

    /// Makes a context ahead of its caller: instantiated under the default
    /// limits with no workspace, then warmed with the empty snippet (which the
    /// interpreters run without touching files or output), so that after
    /// [`bind`](Self::bind) the caller's first evaluation pays neither
    /// instantiation nor first-use costs.
    pub(crate) async fn start_ahead(engine: &IsolateEngine, guest: Guest, language: Language) -> Result<Self, Error> {
        let mut context = Self::instantiated(engine, guest, language, None, Limits::default(), None).await?;
        let warmed = context.eval(WARM_UP_SNIPPET).await;
        if !warmed.is_ok() || context.live.is_none() {
            return Err(Error::InterpreterUnavailable {
                language,
                reason: format!("warming up failed: {:?}", warmed.result),
            });
        }
        Ok(context)
    }

    /// A context with a live instance, for `workspace` (`None`: no file system yet).
    async fn instantiated(
        engine: &IsolateEngine,
        guest: Guest,
        language: Language,
        workspace: Option<Workspace>,
        limits: Limits,
        outbound: Option<Outbound>,
    ) -> Result<Self, Error> {
        if !guest.is_interpreter() {
            return Err(Error::InterpreterUnavailable {
                language,
                reason: format!("{} is not an interpreter component", guest.name()),
            });
        }
        let mut context = Self {
            engine: engine.clone(),
            guest,
            language,
            workspace,
            limits,
            outbound,
            live: None,
            evaluations: 0,
            resets: 0,
        };
        if let Err(ended) = context.instantiate().await {
            return Err(Error::InterpreterUnavailable { language, reason: ended_text(ended) });
        }
        Ok(context)
    }

    /// Gives a context made ahead its caller's workspace and limits, as if it
    /// had been started with them. Returns false, leaving the context as it
    /// was, if it is already bound, `limits` are invalid, the workspace cannot
    /// be opened, or the instance already uses more than `limits` allow.
    /// Its outbound HTTP goes through `outbound` from then on.
    pub(crate) fn bind(&mut self, workspace: Workspace, limits: Limits, outbound: Option<Outbound>) -> bool {
        if self.workspace.is_some() || limits.validate().is_err() {
            return false;
        }
        let Some(live) = self.live.as_mut() else { return false };
        let Some(limiter) = live.store.data().limiter.rebound(&limits) else { return false };
        let Ok(mut wasi) = confined_wasi(&workspace, &live.stdout, &live.stderr) else { return false };
        wasi.arg(self.language.as_str());
        // The guest has used no file system yet (the warm-up snippet touches
        // none), so the new context's preopen is the first it will see.
        let host = live.store.data_mut();
        host.wasi = wasi.build();
        host.limiter = limiter;
        set_handle_cap(&mut host.table, &limits);
        host.outbound = IsolateHttp::new(outbound.clone(), host.record.effects.clone());
        for pipe in [&live.stdout, &live.stderr] {
            pipe.set_cap(limits.output_bytes);
            let _ = pipe.take();
        }
        self.workspace = Some(workspace);
        self.limits = limits;
        self.outbound = outbound;
        self.evaluations = 0;
        self.resets = 0;
        true
    }

    pub fn language(&self) -> Language {
        self.language
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Evaluations so far, including failed ones.
    pub fn evaluations(&self) -> u64 {
        self.evaluations
    }

    /// Times the context lost its state to a limit or a crash.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    async fn instantiate(&mut self) -> Result<(), EvalResult> {
        let GuestKind::Interpreter(pre) = self.guest.kind() else {
            return Err(EvalResult::Crashed { message: "not an interpreter".into() });
        };
        let stdout = CapturePipe::new(OutputStream::Stdout, self.limits.output_bytes, None);
        let stderr = CapturePipe::new(OutputStream::Stderr, self.limits.output_bytes, None);
        let mut wasi = match &self.workspace {
            Some(workspace) => confined_wasi(workspace, &stdout, &stderr)
                .map_err(|e| EvalResult::Crashed { message: e.to_string() })?,
            None => unbound_wasi(&stdout, &stderr),
        };
        wasi.arg(self.language.as_str());
        let host = ComponentHost::new(wasi.build(), &self.limits, self.outbound.clone());
        let mut store = arm(Store::new(&self.engine.inner.engine, host));
        let deadline = Instant::now() + self.limits.deadline;
        let instantiating = Metered::new(pre.instantiate_async(&mut store));
        let instantiated = tokio::time::timeout_at(deadline.into(), instantiating).await;
        let hit = store.data().limiter.hit;
        let ended = match instantiated {
            Ok((Ok(bindings), _)) => {
                self.live = Some(Live { store, bindings, stdout, stderr });
                return Ok(());
            }
            Ok((Err(e), _)) => Ended::NotStarted(e),
            Err(_) => Ended::DeadlinePassed,
        };
        Err(match classify(ended, hit, &self.limits) {
            Ok(Termination::LimitExceeded(hit)) => EvalResult::LimitExceeded(hit),
            Ok(other) => EvalResult::Crashed { message: other.to_string() },
            Err(e) => EvalResult::Crashed { message: e.to_string() },
        })
    }

    /// Evaluates `code`, with the context's limits applying to this evaluation
    /// (deadline and output per evaluation; memory across the context's life).
    /// A limit hit or a crash resets the context: the next evaluation starts fresh.
    pub async fn eval(&mut self, code: &str) -> EvalOutcome {
        self.eval_streaming(code, None).await
    }

    /// [`eval`](Self::eval), with the code's stdout and stderr also sent to
    /// `output` as the guest writes them (up to the output cap), while the
    /// outcome still carries the whole captured copy.
    pub async fn eval_streaming(&mut self, code: &str, output: Option<OutputSender>) -> EvalOutcome {
        let started = Instant::now();
        if self.workspace.is_none() && code != WARM_UP_SNIPPET {
            // It would find no workspace, and could not find one after binding either.
            return without_output(EvalResult::Crashed { message: "context has no workspace yet".into() }, started);
        }
        self.evaluations += 1;
        if self.live.is_none()
            && let Err(result) = self.instantiate().await
        {
            return without_output(result, started);
        }
        let limits = self.limits;
        let Some(live) = self.live.as_mut() else {
            return without_output(EvalResult::Crashed { message: "context is not running".into() }, started);
        };
        // Streams to this caller until the evaluation ends or is dropped.
        let _streaming = output.map(|sender| StreamingTo::new([&live.stdout, &live.stderr], sender));
        live.store.data_mut().limiter.restart_deadline(&limits);
        live.store.data_mut().record.clear();
        // The epoch has moved on since the last evaluation: without this the
        // guest's first epoch check would find its tick long passed and yield
        // to the executor once before doing any work.
        live.store.set_epoch_deadline(1);
        let deadline = Instant::now() + limits.deadline;
        let evaluator = live.bindings.airlock_sandbox_evaluator();
        let mut evaluating = Metered::new(evaluator.call_eval(&mut live.store, code));
        let finished = tokio::time::timeout_at(deadline.into(), &mut evaluating).await;
        let (call, cpu_time) = match finished {
            Ok((call, cpu)) => (Some(call), cpu),
            Err(_) => (None, evaluating.cpu()),
        };
        drop(evaluating);
        let result = match call {
            Some(Ok(Ok(value))) => EvalResult::Ok { value: value.map(|v| EvalValue { text: v.text, json: v.json }) },
            Some(Ok(Err(wit::EvalError::Syntax(error)))) => EvalResult::SyntaxError(code_error(error)),
            Some(Ok(Err(wit::EvalError::Runtime(error)))) => EvalResult::RuntimeError(code_error(error)),
            Some(Ok(Err(wit::EvalError::NeedsEscalation(reason)))) => {
                EvalResult::NeedsEscalation { reason: escalation(reason) }
            }
            Some(Err(trap)) => {
                let hit = live.store.data().limiter.hit;
                match classify(Ended::Finished(Err(trap)), hit, &limits) {
                    Ok(Termination::LimitExceeded(hit)) => EvalResult::LimitExceeded(hit),
                    Ok(other) => EvalResult::Crashed { message: other.to_string() },
                    Err(e) => EvalResult::Crashed { message: e.to_string() },
                }
            }
            None => match classify(Ended::DeadlinePassed, None, &limits) {
                Ok(Termination::LimitExceeded(hit)) => EvalResult::LimitExceeded(hit),
                _ => EvalResult::Crashed { message: "deadline passed".into() },
            },
        };
        let (stdout, stdout_truncated) = live.stdout.take();
        let (stderr, stderr_truncated) = live.stderr.take();
        let mut outcome = EvalOutcome {
            result,
            stdout,
            stderr,
            stdout_truncated,
            stderr_truncated,
            wall_time: started.elapsed(),
            cpu_time,
            displays: Vec::new(),
            displays_truncated: false,
            side_effects: Vec::new(),
            side_effects_truncated: false,
        };
        // Whatever ended the evaluation, what it displayed and changed until then is reported.
        live.store.data_mut().record.drain_into(&mut outcome);
        if matches!(outcome.result, EvalResult::LimitExceeded(_) | EvalResult::Crashed { .. }) {
            // A store that trapped cannot be entered again: drop the instance, and its state with it.
            self.live = None;
            self.resets += 1;
        }
        outcome
    }
}

/// A context's output pipes streaming to one evaluation's caller; they stop
/// when this is dropped (the evaluation ended, or its future was dropped), so
/// a later evaluation never streams to an earlier caller.
struct StreamingTo {
    pipes: [CapturePipe; 2],
}

impl StreamingTo {
    fn new(pipes: [&CapturePipe; 2], sender: OutputSender) -> Self {
        for pipe in pipes {
            pipe.set_sender(Some(sender.clone()));
        }
        Self { pipes: pipes.map(CapturePipe::clone) }
    }
}

impl Drop for StreamingTo {
    fn drop(&mut self) {
        for pipe in &self.pipes {
            pipe.set_sender(None);
        }
    }
}

/// An evaluation that ended before the code ran.
fn without_output(result: EvalResult, started: Instant) -> EvalOutcome {
    EvalOutcome {
        result,
        stdout: Vec::new(),
        stderr: Vec::new(),
        stdout_truncated: false,
        stderr_truncated: false,
        wall_time: started.elapsed(),
        cpu_time: Duration::ZERO,
        displays: Vec::new(),
        displays_truncated: false,
        side_effects: Vec::new(),
        side_effects_truncated: false,
    }
}

fn ended_text(result: EvalResult) -> String {
    match result {
        EvalResult::LimitExceeded(hit) => hit.to_string(),
        EvalResult::Crashed { message } => message,
        other => format!("{other:?}"),
    }
}
