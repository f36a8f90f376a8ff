//! Forking a live interpreter context (`Sandbox::fork_context`), per
//! language, in an isolate: a context holding a few variables, a function and
//! an imported module is forked, and the fork is checked (it answers with the
//! source's state) untimed; each fork is removed before the next. Paired in
//! the same run with what the fork saves a caller from: making a fresh context
//! and running the same evaluations again by hand.
//!
//! A fork is made by replaying the source's history in a fresh instance
//! (docs/API.md), so its cost grows with the history; these contexts hold
//! three evaluations.

use std::time::Instant;

use airlock::runtime::{SandboxConfig, TierPreference};
use airlock::{CodeOutcome, Language, Sandbox};
use anyhow::{Result, bail};
use serde_json::Map;

use super::report::CaseResult;
use super::suite::{Case, Kind, Suite, finish, measure};

/// The evaluations each source context holds, per language, and what the
/// check asks of a fork with the value it must give.
fn state(language: Language) -> (&'static [&'static str], &'static str, &'static str) {
    match language {
        Language::Python => (
            &["import math", "x = 41", "def f():\n    return x + 1"],
            "(f(), math.floor(math.pi))",
            "[42,3]",
        ),
        _ => (&["const m = Math", "var x = 41", "function f() { return x + 1 }"], "[f(), m.floor(m.PI)]", "[42,3]"),
    }
}

fn value_of(answer: &CodeOutcome) -> Result<String> {
    match answer.outcome.value() {
        Some(value) => Ok(value.json.clone().unwrap_or_else(|| value.text.clone()).replace(' ', "")),
        None => bail!("no value: {:?} {}", answer.outcome.result, answer.outcome.stderr_text()),
    }
}

async fn check(sandbox: &Sandbox, context: &str, language: Language) -> Result<()> {
    let (_, probe, expected) = state(language);
    let got = value_of(&sandbox.code_in(context, probe).await?)?;
    if got != expected.replace(' ', "") {
        bail!("the {language:?} context answered {got:?}, expected {expected:?}");
    }
    Ok(())
}

impl Suite {
    pub(super) async fn context_fork(&mut self, case: &Case) -> Vec<CaseResult> {
        let counts = self.plan.counts(Kind::IsolateWarm);
        let mut results = Vec::new();
        for (language, label) in [(Language::Python, "python"), (Language::JavaScript, "js")] {
            let mut fork_meta = Self::meta(case, "isolate", "library");
            fork_meta.name = format!("context-fork-{label}");
            fork_meta.what = format!("`Sandbox::fork_context` of a {label} context holding 3 evaluations (replayed into a fresh instance)");
            let mut fresh_meta = Self::meta(case, "isolate", "library");
            fresh_meta.name = format!("context-fresh-replayed-{label}");
            fresh_meta.what = format!("a fresh {label} context and the same 3 evaluations sent again, one call each");
            let config = SandboxConfig { tier: TierPreference::Isolate, ..SandboxConfig::default() };
            let sandbox = match self.new_sandbox(config).await {
                Ok(sandbox) => sandbox,
                Err(e) => {
                    results.push(finish(fork_meta, counts, Err(anyhow::anyhow!("{e:#}")), Map::new()));
                    results.push(finish(fresh_meta, counts, Err(e), Map::new()));
                    continue;
                }
            };
            let (evaluations, _, _) = state(language);
            let measured = async {
                let source = sandbox.create_context(language).await?;
                for code in evaluations {
                    sandbox.code_in(&source, code).await?;
                }
                check(&sandbox, &source, language).await?;
                let forks = measure(counts.0, counts.1, || async {
                    let started = Instant::now();
                    let fork = sandbox.fork_context(&source).await?;
                    let elapsed = started.elapsed();
                    check(&sandbox, &fork.id, language).await?;
                    sandbox.delete_context(&fork.id)?;
                    Ok(elapsed)
                })
                .await;
                let fresh = measure(counts.0, counts.1, || async {
                    let started = Instant::now();
                    let context = sandbox.create_context(language).await?;
                    for code in evaluations {
                        sandbox.code_in(&context, code).await?;
                    }
                    let elapsed = started.elapsed();
                    check(&sandbox, &context, language).await?;
                    sandbox.delete_context(&context)?;
                    Ok(elapsed)
                })
                .await;
                Ok::<_, anyhow::Error>((forks, fresh))
            }
            .await;
            self.destroy(&sandbox).await;
            match measured {
                Ok((forks, fresh)) => {
                    results.push(finish(fork_meta, counts, forks, Map::new()));
                    results.push(finish(fresh_meta, counts, fresh, Map::new()));
                }
                Err(e) => {
                    results.push(finish(fork_meta, counts, Err(anyhow::anyhow!("{e:#}")), Map::new()));
                    results.push(finish(fresh_meta, counts, Err(e), Map::new()));
                }
            }
        }
        results
    }
}
