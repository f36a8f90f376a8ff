//! A user's own workload: `airlock bench --workload FILE` times the snippets
//! and commands a TOML file names, on the tiers it names, through the same
//! library calls the built-in cases use, and checks each answer.
//!
//! ```toml
//! [defaults]                 # optional; per-task fields override them
//! warmup = 2
//! repetitions = 20
//!
//! [[task]]
//! name = "squares"           # unique; letters, digits, '-', '_', '.'
//! language = "python"        # python | javascript (or js)
//! code = "print(sum(i * i for i in range(10_000)))"
//! expect = "333283335000"    # optional: stdout, trimmed, must equal it
//! tiers = ["isolate", "container"]   # default: both
//!
//! [[task]]
//! name = "count-lines"
//! command = ["bash", "-c", "seq 1000 | wc -l"]   # a command: containers only
//! expect = "1000"
//! ```
//!
//! Code runs through `Sandbox::code` in a sandbox of the chosen tier (an
//! isolate's fresh context, or the container's one-shot kernel); a command
//! through `Sandbox::exec` in a running container (runc). Every result is
//! checked: it ran on the tier asked for, it succeeded, it printed `expect`.
//! A snippet the isolate cannot run (it needs the container) is a skipped
//! result with the isolate's reason, never a failure.

use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

use airlock::container::ContainerRuntime;
use airlock::runtime::{SandboxConfig, TierPreference};
use airlock::{CodeOutcome, EvalResult, ExecRequest, Language, TierKind};
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::report::CaseResult;
use super::suite::{Case, Suite, container_config, finish, measure, skipped};

/// Largest workload file read (a file is a list of snippets, not data).
pub const MAX_WORKLOAD_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// Most tasks one file may hold.
pub const MAX_WORKLOAD_TASKS: usize = 200;
/// Most timed (or warm-up) repetitions one task may ask for.
pub const MAX_WORKLOAD_REPETITIONS: usize = 10_000;
/// Longest task name.
const MAX_TASK_NAME: usize = 64;

/// The case every user task's results are filed under.
pub const WORKLOAD_FILE_CASE: Case = Case {
    name: "workload-file",
    group: "user",
    quick: false,
    peer: false,
    about: "a task from the --workload file",
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileShape {
    #[serde(default)]
    defaults: Defaults,
    #[serde(default, rename = "task")]
    tasks: Vec<TaskShape>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Defaults {
    warmup: Option<usize>,
    repetitions: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskShape {
    name: String,
    language: Option<String>,
    code: Option<String>,
    command: Option<Vec<String>>,
    expect: Option<String>,
    tiers: Option<Vec<String>>,
    warmup: Option<usize>,
    repetitions: Option<usize>,
}

/// What a task runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    Code { language: Language, code: String },
    Command { argv: Vec<String> },
}

/// Where a task runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Isolate,
    Container,
}

impl Tier {
    fn label(self) -> &'static str {
        match self {
            Tier::Isolate => "isolate",
            Tier::Container => "container",
        }
    }
}

/// One checked task of a workload file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub name: String,
    pub work: Work,
    pub expect: Option<String>,
    pub tiers: Vec<Tier>,
    /// Warm-up and timed repetitions, when the file sets them (else the plan's).
    pub warmup: Option<usize>,
    pub repetitions: Option<usize>,
}

/// Reads and checks a workload file; every problem names the task and field.
pub fn load(path: &Path) -> Result<Vec<Task>> {
    let size = std::fs::metadata(path).with_context(|| format!("reading the workload file {}", path.display()))?.len();
    if size > MAX_WORKLOAD_FILE_BYTES {
        bail!(
            "the workload file {} is {size} bytes, over the limit MAX_WORKLOAD_FILE_BYTES ({MAX_WORKLOAD_FILE_BYTES})",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the workload file {}", path.display()))?;
    parse(&text).with_context(|| format!("in the workload file {}", path.display()))
}

/// Parses a workload file's text.
pub fn parse(text: &str) -> Result<Vec<Task>> {
    let shape: FileShape = toml::from_str(text).map_err(|e| anyhow::anyhow!("not a valid workload file: {e}"))?;
    if shape.tasks.is_empty() {
        bail!("no tasks: add at least one [[task]] table");
    }
    if shape.tasks.len() > MAX_WORKLOAD_TASKS {
        bail!("{} tasks, over the limit MAX_WORKLOAD_TASKS ({MAX_WORKLOAD_TASKS})", shape.tasks.len());
    }
    let check_count = |what: &str, task: &str, value: Option<usize>| -> Result<Option<usize>> {
        match value {
            Some(n) if n > MAX_WORKLOAD_REPETITIONS => bail!(
                "task {task:?}: {what} = {n} is over the limit MAX_WORKLOAD_REPETITIONS ({MAX_WORKLOAD_REPETITIONS})"
            ),
            Some(0) if what == "repetitions" => bail!("task {task:?}: repetitions must be at least 1"),
            other => Ok(other),
        }
    };
    let defaults_warmup = check_count("warmup", "[defaults]", shape.defaults.warmup)?;
    let defaults_repetitions = check_count("repetitions", "[defaults]", shape.defaults.repetitions)?;
    let mut seen = HashSet::new();
    let mut tasks = Vec::with_capacity(shape.tasks.len());
    for raw in shape.tasks {
        let name = raw.name.clone();
        if name.is_empty()
            || name.len() > MAX_TASK_NAME
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            bail!("task name {name:?}: 1 to {MAX_TASK_NAME} letters, digits, '-', '_' or '.'");
        }
        if !seen.insert(name.clone()) {
            bail!("task {name:?} is named twice");
        }
        let work = match (raw.code, raw.command, raw.language) {
            (Some(code), None, Some(language)) => {
                let language = match language.as_str() {
                    "python" => Language::Python,
                    "javascript" | "js" => Language::JavaScript,
                    other => bail!("task {name:?}: language {other:?} is not one of python, javascript"),
                };
                Work::Code { language, code }
            }
            (Some(_), None, None) => bail!("task {name:?}: code needs a language (python or javascript)"),
            (None, Some(argv), None) => {
                if argv.is_empty() || argv[0].is_empty() {
                    bail!("task {name:?}: command is empty");
                }
                Work::Command { argv }
            }
            (None, Some(_), Some(_)) => bail!("task {name:?}: a command takes no language"),
            (Some(_), Some(_), _) => bail!("task {name:?}: give code or command, not both"),
            (None, None, _) => bail!("task {name:?}: give code (with a language) or command"),
        };
        let tiers = match raw.tiers {
            None if matches!(work, Work::Command { .. }) => vec![Tier::Container],
            None => vec![Tier::Isolate, Tier::Container],
            Some(list) => {
                if list.is_empty() {
                    bail!("task {name:?}: tiers is empty");
                }
                let mut tiers = Vec::new();
                for tier in list {
                    let tier = match tier.as_str() {
                        "isolate" => Tier::Isolate,
                        "container" => Tier::Container,
                        other => bail!("task {name:?}: tier {other:?} is not one of isolate, container"),
                    };
                    if tiers.contains(&tier) {
                        bail!("task {name:?}: tier {} is named twice", tier.label());
                    }
                    tiers.push(tier);
                }
                tiers
            }
        };
        if matches!(work, Work::Command { .. }) && tiers.contains(&Tier::Isolate) {
            bail!("task {name:?}: a command runs in a container only; use code for the isolate");
        }
        tasks.push(Task {
            warmup: check_count("warmup", &name, raw.warmup)?.or(defaults_warmup),
            repetitions: check_count("repetitions", &name, raw.repetitions)?.or(defaults_repetitions),
            name,
            work,
            expect: raw.expect,
            tiers,
        });
    }
    Ok(tasks)
}

/// Checks a code answer: on `tier`, succeeded, printed `expect` (when given).
fn check_code(answer: &CodeOutcome, tier: TierKind, expect: Option<&str>) -> Result<()> {
    if answer.placement.tier != tier {
        bail!("ran on the {:?} tier, not {tier:?}", answer.placement.tier);
    }
    match &answer.outcome.result {
        EvalResult::Ok { .. } => {}
        other => bail!("the evaluation did not succeed: {other:?} {}", answer.outcome.stderr_text().trim()),
    }
    if let Some(expect) = expect {
        let stdout = answer.outcome.stdout_text();
        if stdout.trim() != expect.trim() {
            bail!("printed {:?}, expected {:?}", stdout.trim(), expect.trim());
        }
    }
    Ok(())
}

impl Suite {
    /// Runs every task of a workload file on each of its tiers.
    pub(super) async fn workload_file(&mut self, tasks: &[Task]) -> Vec<CaseResult> {
        let mut results = Vec::new();
        for task in tasks {
            for &tier in &task.tiers {
                let result = self.workload_task(task, tier).await;
                let summary = match (&result.stats, &result.reason) {
                    (Some(stats), _) => format!(": median {:.3} ms", stats.median_ms),
                    (None, Some(reason)) => format!(": {reason}"),
                    (None, None) => String::new(),
                };
                eprintln!("airlock bench:     {} {:?}{summary}", result.name, result.status);
                if let Some(stats) = &result.stats {
                    self.medians.push((result.name.clone(), stats.median_ms));
                }
                results.push(result);
            }
        }
        results
    }

    async fn workload_task(&mut self, task: &Task, tier: Tier) -> CaseResult {
        // The command line's --warmup/--repetitions win, then the file's, then the suite's.
        let (plan_warmup, plan_repetitions) = self.plan.counts(super::suite::Kind::Workload);
        let counts = (
            self.plan.warmup.or(task.warmup).unwrap_or(plan_warmup),
            self.plan.repetitions.or(task.repetitions).unwrap_or(plan_repetitions).max(1),
        );
        let mut meta = Self::meta(&WORKLOAD_FILE_CASE, if tier == Tier::Isolate { "isolate" } else { "container/runc" }, "library");
        meta.name = format!("{}-{}", task.name, tier.label());
        let mut extra = Map::new();
        extra.insert("task".into(), Value::String(task.name.clone()));
        let config = match tier {
            Tier::Isolate => SandboxConfig { tier: TierPreference::Isolate, ..SandboxConfig::default() },
            Tier::Container => container_config(ContainerRuntime::Runc),
        };
        let tier_kind = if tier == Tier::Isolate { TierKind::Isolate } else { TierKind::Container };
        let sandbox = match self.new_sandbox(config).await {
            Ok(sandbox) => sandbox,
            Err(e) => return finish(meta, counts, Err(e), extra),
        };
        let expect = task.expect.as_deref();
        let result = match &task.work {
            Work::Code { language, code } => {
                meta.what = format!("{language:?} code, one-shot (`Sandbox::code`) in the {}", tier.label());
                // The isolate may say the code needs the container: a skip with its reason.
                match sandbox.code(*language, code).await {
                    Ok(answer) if tier == Tier::Isolate && matches!(answer.outcome.result, EvalResult::NeedsEscalation { .. }) => {
                        let EvalResult::NeedsEscalation { reason } = &answer.outcome.result else { unreachable!() };
                        skipped(meta, counts, format!("the isolate cannot run it ({reason}); it runs in the container"))
                    }
                    Ok(answer) => match check_code(&answer, tier_kind, expect) {
                        Err(e) => finish(meta, counts, Err(e), extra),
                        Ok(()) => {
                            let samples = measure(counts.0, counts.1, || async {
                                let started = Instant::now();
                                let answer = sandbox.code(*language, code).await?;
                                let elapsed = started.elapsed();
                                check_code(&answer, tier_kind, expect)?;
                                Ok(elapsed)
                            })
                            .await;
                            finish(meta, counts, samples, extra)
                        }
                    },
                    Err(e) => finish(meta, counts, Err(e.into()), extra),
                }
            }
            Work::Command { argv } => {
                meta.what = format!("`{}` (`Sandbox::exec`) in a running container", argv.join(" "));
                let request = || ExecRequest::new(argv[0].clone()).args(argv[1..].iter().cloned());
                let samples = measure(counts.0, counts.1, || async {
                    let started = Instant::now();
                    let answer = sandbox.exec(request()).await?;
                    let elapsed = started.elapsed();
                    if answer.placement.tier != TierKind::Container {
                        bail!("ran on the {:?} tier, not in the container", answer.placement.tier);
                    }
                    if answer.outcome.exit_code() != Some(0) {
                        bail!(
                            "exited {:?}: {}",
                            answer.outcome.exit_code(),
                            answer.outcome.stderr_text().trim()
                        );
                    }
                    if let Some(expect) = expect
                        && answer.outcome.stdout_text().trim() != expect.trim()
                    {
                        bail!("printed {:?}, expected {:?}", answer.outcome.stdout_text().trim(), expect.trim());
                    }
                    Ok(elapsed)
                })
                .await;
                finish(meta, counts, samples, extra)
            }
        };
        self.destroy(&sandbox).await;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_with_code_and_commands_parses_with_its_defaults() {
        let tasks = parse(
            r#"
[defaults]
repetitions = 7

[[task]]
name = "squares"
language = "python"
code = "print(1)"
expect = "1"

[[task]]
name = "lines"
command = ["bash", "-c", "seq 3 | wc -l"]
warmup = 0
"#,
        )
        .unwrap();
        assert_eq!(tasks.len(), 2);
        assert_eq!(tasks[0].work, Work::Code { language: Language::Python, code: "print(1)".into() });
        assert_eq!(tasks[0].tiers, vec![Tier::Isolate, Tier::Container]);
        assert_eq!((tasks[0].warmup, tasks[0].repetitions), (None, Some(7)));
        assert_eq!(tasks[1].tiers, vec![Tier::Container], "a command runs in the container");
        assert_eq!((tasks[1].warmup, tasks[1].repetitions), (Some(0), Some(7)));
    }

    #[test]
    fn bad_files_are_refused_naming_the_task_and_the_problem() {
        let cases = [
            ("", "no tasks"),
            ("[[task]]\nname = \"a\"\ncode = \"1\"", "needs a language"),
            ("[[task]]\nname = \"a\"\nlanguage = \"ruby\"\ncode = \"1\"", "\"ruby\" is not one of"),
            ("[[task]]\nname = \"a\"\ncommand = []", "command is empty"),
            ("[[task]]\nname = \"a\"\ncommand = [\"true\"]\ntiers = [\"isolate\"]", "in a container only"),
            ("[[task]]\nname = \"a\"\ncommand = [\"true\"]\n[[task]]\nname = \"a\"\ncommand = [\"true\"]", "named twice"),
            ("[[task]]\nname = \"../x\"\ncommand = [\"true\"]", "letters, digits"),
            ("[[task]]\nname = \"a\"\ncommand = [\"true\"]\nrepetitions = 0", "at least 1"),
            ("[[task]]\nname = \"a\"\ncommand = [\"true\"]\nrepetitions = 10001", "MAX_WORKLOAD_REPETITIONS"),
            ("[[task]]\nname = \"a\"\ncommand = [\"true\"]\ntiers = [\"gpu\"]", "\"gpu\" is not one of"),
            ("[[task]]\nname = \"a\"\ncommand = [\"true\"]\nrepeat = 3", "unknown field"),
            ("[[task]]\nname = \"a\"\ncode = \"1\"\ncommand = [\"true\"]", "not both"),
        ];
        for (text, expected) in cases {
            let error = format!("{:#}", parse(text).unwrap_err());
            assert!(error.contains(expected), "{text:?}: {error}");
        }
        let many: String = (0..=MAX_WORKLOAD_TASKS).map(|i| format!("[[task]]\nname = \"t{i}\"\ncommand = [\"true\"]\n")).collect();
        assert!(format!("{:#}", parse(&many).unwrap_err()).contains("MAX_WORKLOAD_TASKS"));
    }

    #[test]
    fn an_oversized_file_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.toml");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(MAX_WORKLOAD_FILE_BYTES + 1).unwrap();
        assert!(format!("{:#}", load(&path).unwrap_err()).contains("MAX_WORKLOAD_FILE_BYTES"));
        assert!(format!("{:#}", load(&dir.path().join("missing.toml")).unwrap_err()).contains("missing.toml"));
    }
}
