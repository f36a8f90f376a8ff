//! Contexts by id, the interpreters they run, and the one-shot path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use airlock_core::{Error, EvalOutcome, Language, Limits, Workspace};
use serde::Serialize;

use super::InterpreterContext;
use crate::{Guest, IsolateEngine};

/// The file each language's interpreter component is read from, in the interpreter directory.
pub const INTERPRETER_FILES: [(Language, &str); 2] = [(Language::Python, "python.wasm"), (Language::JavaScript, "js.wasm")];

/// Where interpreter components are looked for: `$AIRLOCK_INTERPRETERS` if
/// set; else the first `guests/out` holding `python.wasm` found walking up
/// from the running executable (a build tree); else `./guests/out`.
pub fn default_interpreter_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("AIRLOCK_INTERPRETERS").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Ok(exe) = std::env::current_exe() {
        for ancestor in exe.ancestors().skip(1) {
            let candidate = ancestor.join("guests").join("out");
            if candidate.join("python.wasm").is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from("guests").join("out")
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

/// Most spare contexts [`Interpreters::keep_spares`] may hold at once, over
/// all keys: each holds an instance (about 8 MiB for Python).
pub const MAX_SPARE_CONTEXTS: usize = 64;
/// The snippet a spare context evaluates when it is made, so that the first
/// evaluation's one-time costs (CPython's copy-on-write faults on its
/// pre-initialised heap) are paid before a caller arrives. It leaves nothing
/// behind a caller could see.
fn warm_up_snippet(language: Language) -> &'static str {
    match language {
        Language::Python => "pass",
        Language::JavaScript => ";",
    }
}

/// What a spare context was made for: a one-shot run takes a spare only if
/// all three match.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SpareKey {
    language: Language,
    workspace: PathBuf,
    limits: Limits,
}

/// Fresh contexts made ahead for one-shot runs. Each serves one run and is
/// dropped; it has evaluated only the warm-up snippet.
#[derive(Debug, Default)]
struct Spares {
    ready: HashMap<SpareKey, InterpreterContext>,
    /// Keys in the order their spares were made, oldest first (for eviction).
    order: std::collections::VecDeque<SpareKey>,
    /// Keys being refilled, so that a burst makes one spare, not many.
    making: std::collections::HashSet<SpareKey>,
    /// Keys one-shot runs used lately, oldest first: a spare is made only for
    /// a key used before, so a workspace that runs code once costs one instance.
    seen: std::collections::VecDeque<SpareKey>,
    capacity: usize,
}

/// How many recently used keys are remembered for deciding on spares.
const REMEMBERED_KEYS: usize = 1024;

impl Spares {
    /// Records a one-shot run for `key`; whether the key was used before.
    fn note_use(&mut self, key: &SpareKey) -> bool {
        let repeat = match self.seen.iter().position(|seen| seen == key) {
            Some(at) => {
                self.seen.remove(at);
                true
            }
            None => false,
        };
        self.seen.push_back(key.clone());
        if self.seen.len() > REMEMBERED_KEYS {
            self.seen.pop_front();
        }
        repeat
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
    spares: Arc<Mutex<Spares>>,
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
            spares: Arc::default(),
        }
    }

    /// Keeps up to `capacity` (at most [`MAX_SPARE_CONTEXTS`]) spare contexts
    /// for one-shot runs: after a one-shot run, a fresh context for the same
    /// language, workspace and limits is made in the background and warmed,
    /// so the next such run only evaluates. Off (0) by default: a process that
    /// runs once (the CLI) would make one for nothing.
    pub fn keep_spares(self, capacity: usize) -> Self {
        lock(&self.spares).capacity = capacity.min(MAX_SPARE_CONTEXTS);
        self
    }

    /// Spare contexts ready now.
    pub fn spares_ready(&self) -> usize {
        lock(&self.spares).ready.len()
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
                reason: format!("{} not found (build it with scripts/build-guests.sh, or set AIRLOCK_INTERPRETERS)", path.display()),
            });
        }
        let engine = self.engine.clone();
        let guest = tokio::task::spawn_blocking(move || engine.load_file(path))
            .await
            .map_err(|e| Error::Engine(format!("interpreter loading stopped: {e}")))??;
        guests.insert(language, guest.clone());
        Ok(guest)
    }

    /// Creates a context and returns its id.
    pub async fn create_context(&self, language: Language, workspace: Workspace, limits: Limits) -> Result<String, Error> {
        let guest = self.guest(language).await?;
        let context = InterpreterContext::start(&self.engine, guest, language, workspace, limits).await?;
        let id = format!("ctx-{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        lock(&self.contexts).insert(id.clone(), Arc::new(tokio::sync::Mutex::new(context)));
        Ok(id)
    }

    /// Evaluates `code` in context `id`. Evaluations in one context run one at a time.
    pub async fn eval(&self, id: &str, code: &str) -> Result<EvalOutcome, Error> {
        let context = lock(&self.contexts).get(id).cloned().ok_or_else(|| Error::NoSuchContext(id.to_string()))?;
        let mut context = context.lock().await;
        Ok(context.eval(code).await)
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
    /// With [`keep_spares`](Self::keep_spares), the fresh context may be a
    /// spare made ahead for the same language, workspace and limits.
    pub async fn run(&self, language: Language, workspace: Workspace, code: &str, limits: Limits) -> Result<EvalOutcome, Error> {
        let guest = self.guest(language).await?;
        let key = SpareKey { language, workspace: workspace.host_path().to_path_buf(), limits };
        let (spare, repeat) = {
            let mut spares = lock(&self.spares);
            let repeat = spares.capacity > 0 && spares.note_use(&key);
            let taken = spares.ready.remove(&key);
            if taken.is_some() {
                spares.order.retain(|k| *k != key);
            }
            (taken, repeat)
        };
        let mut context = match spare {
            Some(context) => context,
            None => InterpreterContext::start(&self.engine, guest.clone(), language, workspace.clone(), limits).await?,
        };
        let outcome = context.eval(code).await;
        // Tearing an instance down (resetting its memory) takes a fraction of a
        // millisecond; do it after answering, off the caller's path.
        tokio::task::spawn_blocking(move || drop(context));
        if repeat {
            self.make_spare(key, guest, workspace);
        }
        Ok(outcome)
    }

    /// Starts making a warmed spare for `key` in the background, unless spares
    /// are off or one is ready or being made.
    fn make_spare(&self, key: SpareKey, guest: Guest, workspace: Workspace) {
        {
            let mut spares = lock(&self.spares);
            if spares.capacity == 0 || spares.ready.contains_key(&key) || !spares.making.insert(key.clone()) {
                return;
            }
        }
        let (engine, spares) = (self.engine.clone(), self.spares.clone());
        tokio::spawn(async move {
            let made = InterpreterContext::start(&engine, guest, key.language, workspace, key.limits).await;
            let spare = match made {
                Ok(mut context) => context.eval(warm_up_snippet(key.language)).await.is_ok().then_some(context),
                Err(_) => None,
            };
            let evicted = {
                let mut spares = lock(&spares);
                spares.making.remove(&key);
                let Some(context) = spare else { return };
                let mut evicted = Vec::new();
                while spares.ready.len() >= spares.capacity.max(1) {
                    let Some(oldest) = spares.order.pop_front() else { break };
                    evicted.extend(spares.ready.remove(&oldest));
                }
                spares.order.push_back(key.clone());
                spares.ready.insert(key, context);
                evicted
            };
            drop(evicted);
        });
    }

    /// Drops the spare contexts made for `workspace` (its sandbox went away or to sleep).
    pub fn drop_spares(&self, workspace: &Workspace) {
        let dropped: Vec<InterpreterContext> = {
            let mut spares = lock(&self.spares);
            let keys: Vec<SpareKey> =
                spares.ready.keys().filter(|key| key.workspace == workspace.host_path()).cloned().collect();
            spares.order.retain(|key| key.workspace != workspace.host_path());
            keys.iter().filter_map(|key| spares.ready.remove(key)).collect()
        };
        drop(dropped);
    }
}
