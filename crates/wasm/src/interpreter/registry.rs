//! Contexts by id, the interpreters they run, and the one-shot path.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use airlock_core::{Error, EvalOutcome, Language, Limits, OutputSender, Workspace};
use serde::Serialize;

use super::InterpreterContext;
use crate::{Guest, IsolateEngine, Outbound};

/// The file each language's interpreter component is read from, in the interpreter directory.
pub const INTERPRETER_FILES: [(Language, &str); 2] =
    [(Language::Python, "python.wasm"), (Language::JavaScript, "js.wasm")];

/// Where interpreter components are looked for: `$AIRLOCK_INTERPRETERS` if
/// set; else the first `guests/out` holding `python.wasm` found walking up
/// from the running executable (a build tree); else the directory given to
/// [`set_fallback_interpreter_dir`] (the `airlock` binary unpacks the
/// interpreters it carries there); else `./guests/out`.
pub fn default_interpreter_dir() -> PathBuf {
    build_tree_interpreter_dir()
        .or_else(|| FALLBACK_INTERPRETER_DIR.get().cloned())
        .unwrap_or_else(|| PathBuf::from("guests").join("out"))
}

/// The interpreter directory set explicitly or found in a build tree, if any:
/// the first two places [`default_interpreter_dir`] looks.
pub fn build_tree_interpreter_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("AIRLOCK_INTERPRETERS").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .skip(1)
        .map(|ancestor| ancestor.join("guests").join("out"))
        .find(|c| c.join("python.wasm").is_file())
}

static FALLBACK_INTERPRETER_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Sets, once per process, where [`default_interpreter_dir`] looks when there
/// is no build tree; false if it was already set.
pub fn set_fallback_interpreter_dir(dir: PathBuf) -> bool {
    FALLBACK_INTERPRETER_DIR.set(dir).is_ok()
}

/// What a listing says of a context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContextInfo {
    pub id: String,
    pub language: Language,
    pub evaluations: u64,
    pub resets: u64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Most warm contexts [`Interpreters::keep_warm`] keeps per language: each
/// holds an instance (about 8 MiB for Python) and a slot of the engine's pool.
pub const MAX_WARM_CONTEXTS: usize = 32;

/// Contexts made ahead, per language, not yet bound to a workspace: each
/// serves one one-shot run or becomes one new context.
#[derive(Debug, Default)]
struct WarmPool {
    ready: HashMap<Language, Vec<InterpreterContext>>,
    /// Languages a refill task is running for, so there is one at a time.
    refilling: HashSet<Language>,
    /// Contexts to keep ready per language; 0 turns the pool off.
    capacity: usize,
}

/// A language's "refill running" mark, cleared however the refill ends:
/// finished, failed, or dropped before it started (a runtime shutting down
/// does not start the blocking tasks still queued on it).
struct RefillMark {
    warm: Arc<Mutex<WarmPool>>,
    language: Language,
    armed: bool,
}

impl RefillMark {
    /// Clears the mark under a lock the caller already holds.
    fn clear(mut self, pool: &mut WarmPool) {
        pool.refilling.remove(&self.language);
        self.armed = false;
    }
}

impl Drop for RefillMark {
    fn drop(&mut self) {
        if self.armed {
            lock(&self.warm).refilling.remove(&self.language);
        }
    }
}

/// The interpreters of one engine and the contexts created with them.
/// Contexts are isolated from each other: each is its own component instance.
#[derive(Debug)]
pub struct Interpreters {
    engine: IsolateEngine,
    dir: PathBuf,
    /// Held while an interpreter loads, so concurrent first uses compile it once.
    guests: tokio::sync::Mutex<HashMap<Language, Guest>>,
    contexts: Mutex<HashMap<String, Arc<tokio::sync::Mutex<InterpreterContext>>>>,
    next_id: AtomicU64,
    warm: Arc<Mutex<WarmPool>>,
}

impl Interpreters {
    /// Interpreters read from `dir` (see [`INTERPRETER_FILES`]) when first used.
    pub fn new(engine: IsolateEngine, dir: impl Into<PathBuf>) -> Self {
        Self {
            engine,
            dir: dir.into(),
            guests: tokio::sync::Mutex::default(),
            contexts: Mutex::default(),
            next_id: AtomicU64::new(1),
            warm: Arc::default(),
        }
    }

    /// Keeps up to `per_language` (at most [`MAX_WARM_CONTEXTS`]) contexts
    /// of each language made ahead: instantiated and warmed in the background
    /// with no workspace, then bound to the workspace and limits of the
    /// one-shot run or new context that takes one, so that neither waits for
    /// an instance. The pool of a language fills from its first use (or
    /// [`prewarm`](Self::prewarm)) and refills after each take. Off (0) by
    /// default: a process that runs once (the CLI) would make them for nothing.
    pub fn keep_warm(self, per_language: usize) -> Self {
        lock(&self.warm).capacity = per_language.min(MAX_WARM_CONTEXTS);
        self
    }

    /// Warm contexts of `language` ready now.
    pub fn warm_ready(&self, language: Language) -> usize {
        lock(&self.warm).ready.get(&language).map_or(0, Vec::len)
    }

    /// Starts filling `language`'s warm pool now rather than at its first use.
    pub async fn prewarm(&self, language: Language) -> Result<(), Error> {
        let guest = self.guest(language).await?;
        self.refill(language, guest);
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The interpreter component for `language`, loaded (and compiled or taken
    /// from the cache) on first use, off the async workers.
    pub async fn guest(&self, language: Language) -> Result<Guest, Error> {
        let mut guests = self.guests.lock().await;
        if let Some(guest) = guests.get(&language).cloned() {
            return Ok(guest);
        }
        let file = INTERPRETER_FILES.iter().find(|(l, _)| *l == language).map(|(_, f)| *f).unwrap_or_default();
        let path = self.dir.join(file);
        if !path.is_file() {
            return Err(Error::InterpreterUnavailable {
                language,
                reason: format!(
                    "{} not found (build it with scripts/build-guests.sh, or set AIRLOCK_INTERPRETERS)",
                    path.display()
                ),
            });
        }
        let engine = self.engine.clone();
        let guest = tokio::task::spawn_blocking(move || engine.load_file(path))
            .await
            .map_err(|e| Error::Engine(format!("interpreter loading stopped: {e}")))??;
        guests.insert(language, guest.clone());
        Ok(guest)
    }

    /// Creates a context and returns its id. Its outbound HTTP is refused.
    pub async fn create_context(
        &self,
        language: Language,
        workspace: Workspace,
        limits: Limits,
    ) -> Result<String, Error> {
        self.create_context_with_outbound(language, workspace, limits, None).await
    }

    /// [`create_context`](Self::create_context), with the context's
    /// `wasi:http` requests sent through `outbound` (none: refused).
    pub async fn create_context_with_outbound(
        &self,
        language: Language,
        workspace: Workspace,
        limits: Limits,
        outbound: Option<Outbound>,
    ) -> Result<String, Error> {
        let (context, guest) = self.fresh_context(language, workspace, limits, outbound).await?;
        self.refill(language, guest);
        let id = format!("ctx-{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        lock(&self.contexts).insert(id.clone(), Arc::new(tokio::sync::Mutex::new(context)));
        Ok(id)
    }

    /// Evaluates `code` in context `id`. Evaluations in one context run one at a time.
    pub async fn eval(&self, id: &str, code: &str) -> Result<EvalOutcome, Error> {
        self.eval_streaming(id, code, None).await
    }

    /// [`eval`](Self::eval), with the code's stdout and stderr also sent to
    /// `output` as they are written (up to the output cap); the outcome
    /// still carries the whole captured copy.
    pub async fn eval_streaming(
        &self,
        id: &str,
        code: &str,
        output: Option<OutputSender>,
    ) -> Result<EvalOutcome, Error> {
        let context = lock(&self.contexts).get(id).cloned().ok_or_else(|| Error::NoSuchContext(id.to_string()))?;
        let mut context = context.lock().await;
        Ok(context.eval_streaming(code, output).await)
    }

    /// The contexts, sorted by id. A context busy evaluating is listed with the
    /// counts it had before.
    pub fn list(&self) -> Vec<ContextInfo> {
        let contexts = lock(&self.contexts);
        let mut infos: Vec<ContextInfo> = contexts
            .iter()
            .filter_map(|(id, context)| {
                let context = context.try_lock().ok()?;
                Some(ContextInfo {
                    id: id.clone(),
                    language: context.language(),
                    evaluations: context.evaluations(),
                    resets: context.resets(),
                })
            })
            .collect();
        infos.sort_by(|a, b| a.id.cmp(&b.id));
        infos
    }

    /// Deletes a context and frees its instance.
    pub fn delete(&self, id: &str) -> Result<(), Error> {
        lock(&self.contexts).remove(id).map(|_| ()).ok_or_else(|| Error::NoSuchContext(id.to_string()))
    }

    /// One-shot: evaluates `code` in a fresh context that is discarded after.
    /// With [`keep_warm`](Self::keep_warm), the fresh context is one made ahead
    /// when one is ready and fits `limits`. Its outbound HTTP is refused.
    pub async fn run(
        &self,
        language: Language,
        workspace: Workspace,
        code: &str,
        limits: Limits,
    ) -> Result<EvalOutcome, Error> {
        self.run_with_outbound(language, workspace, code, limits, None).await
    }

    /// [`run`](Self::run), with the code's `wasi:http` requests sent through
    /// `outbound` (none: refused).
    pub async fn run_with_outbound(
        &self,
        language: Language,
        workspace: Workspace,
        code: &str,
        limits: Limits,
        outbound: Option<Outbound>,
    ) -> Result<EvalOutcome, Error> {
        self.run_streaming(language, workspace, code, limits, outbound, None).await
    }

    /// [`run_with_outbound`](Self::run_with_outbound), with the code's
    /// stdout and stderr also sent to `output` as they are written (up to
    /// the output cap); the outcome still carries the whole captured copy.
    pub async fn run_streaming(
        &self,
        language: Language,
        workspace: Workspace,
        code: &str,
        limits: Limits,
        outbound: Option<Outbound>,
        output: Option<OutputSender>,
    ) -> Result<EvalOutcome, Error> {
        let (mut context, guest) = self.fresh_context(language, workspace, limits, outbound).await?;
        let outcome = context.eval_streaming(code, output).await;
        // Tearing an instance down (resetting its memory) takes a fraction of a
        // millisecond; do it after answering, off the caller's path.
        tokio::task::spawn_blocking(move || drop(context));
        self.refill(language, guest);
        Ok(outcome)
    }

    /// A context that has evaluated nothing for its caller: a warm one bound to
    /// `workspace` and `limits` if one fits, else one started now; and the
    /// interpreter, for the refill that follows.
    async fn fresh_context(
        &self,
        language: Language,
        workspace: Workspace,
        limits: Limits,
        outbound: Option<Outbound>,
    ) -> Result<(InterpreterContext, Guest), Error> {
        let guest = self.guest(language).await?;
        let context = match self.take_warm(language, &workspace, limits, &outbound) {
            Some(context) => context,
            None => {
                InterpreterContext::start_with_outbound(
                    &self.engine,
                    guest.clone(),
                    language,
                    workspace,
                    limits,
                    outbound,
                )
                .await?
            }
        };
        Ok((context, guest))
    }

    /// A warm context of `language` bound to `workspace` and `limits`, if one
    /// is ready and fits them (one that does not fit stays in the pool).
    fn take_warm(
        &self,
        language: Language,
        workspace: &Workspace,
        limits: Limits,
        outbound: &Option<Outbound>,
    ) -> Option<InterpreterContext> {
        let mut context = lock(&self.warm).ready.get_mut(&language)?.pop()?;
        if context.bind(workspace.clone(), limits, outbound.clone()) {
            return Some(context);
        }
        lock(&self.warm).ready.entry(language).or_default().push(context);
        None
    }

    /// Starts filling `language`'s warm pool up to its capacity in the
    /// background, unless the pool is off, full, or already being filled.
    fn refill(&self, language: Language, guest: Guest) {
        {
            let mut warm = lock(&self.warm);
            let ready = warm.ready.get(&language).map_or(0, Vec::len);
            if warm.capacity == 0 || ready >= warm.capacity || !warm.refilling.insert(language) {
                return;
            }
        }
        let (engine, warm) = (self.engine.clone(), self.warm.clone());
        let mark = RefillMark { warm: warm.clone(), language, armed: true };
        // Making a context is a few milliseconds of CPU with no waiting in it:
        // off the async workers, so callers on them are not held up. It runs
        // on a runtime of its own, so that it never depends on the caller's
        // runtime staying up (a timer on a runtime being shut down panics).
        tokio::task::spawn_blocking(move || {
            // Building it fails only when the process cannot start a timer; the
            // pool then stays as it is, and the mark is cleared as it drops.
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_time().build() else { return };
            runtime.block_on(async {
                loop {
                    let made = InterpreterContext::start_ahead(&engine, guest.clone(), language).await;
                    let mut pool = lock(&warm);
                    let capacity = pool.capacity;
                    let full = match made {
                        Ok(context) => {
                            let ready = pool.ready.entry(language).or_default();
                            ready.push(context);
                            ready.len() >= capacity
                        }
                        // The engine is out of slots or the guest is broken: stop
                        // until the next take tries again.
                        Err(_) => true,
                    };
                    if full {
                        // Under the same lock as the last push, so a take after
                        // it always finds the pool idle and starts a refill.
                        mark.clear(&mut pool);
                        return;
                    }
                }
            });
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refill_mark_is_cleared_however_the_refill_ends() {
        let warm = Arc::new(Mutex::new(WarmPool::default()));
        let marked = |warm: &Arc<Mutex<WarmPool>>| lock(warm).refilling.contains(&Language::Python);
        // A refill dropped before it ran (a runtime shutting down drops the
        // blocking tasks it has not started): its closure owns the mark.
        lock(&warm).refilling.insert(Language::Python);
        let mark = RefillMark { warm: warm.clone(), language: Language::Python, armed: true };
        let never_run = move || drop(mark);
        drop(never_run);
        assert!(!marked(&warm), "a refill that never ran left the pool marked");
        // A refill that ends clears its mark under the lock it holds, and its
        // drop then leaves alone the mark of a refill started after it.
        lock(&warm).refilling.insert(Language::Python);
        let mark = RefillMark { warm: warm.clone(), language: Language::Python, armed: true };
        {
            let mut pool = lock(&warm);
            mark.clear(&mut pool);
            assert!(!pool.refilling.contains(&Language::Python));
            pool.refilling.insert(Language::Python);
        }
        assert!(marked(&warm), "a finished refill cleared the next refill's mark");
    }
}
