//! One interpreter context: a component instance kept alive between
//! evaluations, so state persists. A limit hit or a crash resets it.

use std::time::{Duration, Instant};

use airlock_core::{
    CodeError, Error, EscalationReason, EvalOutcome, EvalResult, EvalValue, Language, Limits, OutputStream,
    Termination, Workspace,
};
use wasmtime::Store;

use super::bindings::Interpreter;
use super::bindings::exports::airlock::sandbox::evaluator as wit;
use crate::guest::{Guest, GuestKind};
use crate::host::{ComponentHost, Limiter};
use crate::metering::Metered;
use crate::output::CapturePipe;
use crate::run::{Ended, arm, classify, confined_wasi};
use crate::IsolateEngine;

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
    workspace: Workspace,
    limits: Limits,
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
    pub async fn start(
        engine: &IsolateEngine,
        guest: Guest,
        language: Language,
        workspace: Workspace,
        limits: Limits,
    ) -> Result<Self, Error> {
        limits.validate()?;
        if !guest.is_interpreter() {
            return Err(Error::InterpreterUnavailable {
                language,
                reason: format!("{} is not an interpreter component", guest.name()),
            });
        }
        let mut context =
            Self { engine: engine.clone(), guest, language, workspace, limits, live: None, evaluations: 0, resets: 0 };
        if let Err(ended) = context.instantiate().await {
            return Err(Error::InterpreterUnavailable { language, reason: ended_text(ended) });
        }
        Ok(context)
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
        let mut wasi = confined_wasi(&self.workspace, &stdout, &stderr)
            .map_err(|e| EvalResult::Crashed { message: e.to_string() })?;
        wasi.arg(self.language.as_str());
        let host = ComponentHost { wasi: wasi.build(), table: Default::default(), limiter: Limiter::new(&self.limits) };
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
        let started = Instant::now();
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
        live.store.data_mut().limiter.restart_deadline(&limits);
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
        if matches!(result, EvalResult::LimitExceeded(_) | EvalResult::Crashed { .. }) {
            // A store that trapped cannot be entered again: drop the instance, and its state with it.
            self.live = None;
            self.resets += 1;
        }
        EvalOutcome { result, stdout, stderr, stdout_truncated, stderr_truncated, wall_time: started.elapsed(), cpu_time }
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
    }
}

fn ended_text(result: EvalResult) -> String {
    match result {
        EvalResult::LimitExceeded(hit) => hit.to_string(),
        EvalResult::Crashed { message } => message,
        other => format!("{other:?}"),
    }
}

