//! The code interpreter's container side: an evaluation in a context that
//! lives in a container kernel against `python3 -c` per evaluation, a
//! context's move with 10 earlier evaluations replayed against a move with
//! replay off, and a pandas groupby on a 100,000-row CSV in a kernel against
//! the same code under plain `docker exec`. Each pair runs in one sandbox,
//! one after the other, in the same run.

use std::time::{Duration, Instant};

use airlock::container::ContainerRuntime;
use airlock::runtime::ContextOptions;
use airlock::{CodeOutcome, ExecRequest, Language, TierKind};
use anyhow::{Result, anyhow, bail};
use serde_json::Map;

use super::report::CaseResult;
use super::suite::{Case, Kind, Suite, container_config, finish, measure, run_command};

/// Earlier evaluations a context has when it moves (the case).
const REPLAYED: usize = 10;
/// Rows of the CSV the groupby reads.
const CSV_ROWS: usize = 100_000;

fn value_of(answer: &CodeOutcome) -> Result<String> {
    match answer.outcome.value() {
        Some(value) => Ok(value.text.clone()),
        None => bail!("no value: {:?} {}", answer.outcome.result, answer.outcome.stderr_text()),
    }
}

/// Writes the groupby's CSV into the workspace (`k,v`, k cycling 0..9).
fn groupby_csv() -> Vec<u8> {
    let mut csv = String::from("k,v\n");
    for i in 0..CSV_ROWS {
        csv.push_str(&format!("{},{i}\n", i % 10));
    }
    csv.into_bytes()
}

const GROUPBY: &str = "import pandas as pd\nprint(int(pd.read_csv('/workspace/data.csv').groupby('k')['v'].mean()[3]))";
/// The mean of v for k = 3: 3, 13, ..., 99993.
const GROUPBY_ANSWER: &str = "49998";

impl Suite {
    pub(super) async fn kernel_eval(&mut self, case: &Case) -> Vec<CaseResult> {
        let counts = self.plan.counts(Kind::ContainerWarm);
        let mut kernel_meta = Self::meta(case, "container/runc", "library");
        kernel_meta.what = "`x + 1` in a Python context living in a container kernel (`Sandbox::code_in`)".into();
        let mut process_meta = Self::meta(case, "container/runc", "library");
        process_meta.name = "kernel-eval-python3-c".into();
        process_meta.what = "the same through `python3 -c 'x = 41; print(x + 1)'`, a process per evaluation".into();
        let measured = async {
            let sandbox = self.new_sandbox(container_config(ContainerRuntime::Runc)).await?;
            let result = async {
                let context = sandbox.create_context(Language::Python).await?;
                sandbox.code_in(&context, "x = 41").await?;
                let kernel = measure(counts.0, counts.1, || async {
                    let started = Instant::now();
                    let answer = sandbox.code_in(&context, "x + 1").await?;
                    let elapsed = started.elapsed();
                    if answer.placement.tier != TierKind::Container || value_of(&answer)? != "42" {
                        bail!("wrong answer: {:?} {:?}", answer.placement.tier, answer.outcome.result);
                    }
                    Ok(elapsed)
                })
                .await;
                let process = measure(counts.0, counts.1, || async {
                    let started = Instant::now();
                    let answer = sandbox.exec(ExecRequest::new("python3").args(["-c", "x = 41; print(x + 1)"])).await?;
                    let elapsed = started.elapsed();
                    if answer.outcome.stdout_text().trim() != "42" {
                        bail!("printed {:?}", answer.outcome.stdout_text());
                    }
                    Ok(elapsed)
                })
                .await;
                Ok::<_, anyhow::Error>((kernel, process))
            }
            .await;
            self.destroy(&sandbox).await;
            result
        }
        .await;
        let (kernel, process) = split(measured);
        self.pair(
            vec![finish(kernel_meta, counts, kernel, Map::new()), finish(process_meta, counts, process, Map::new())],
            "python3 -c per evaluation over an evaluation in a container kernel",
            "kernel-eval",
            "kernel-eval-python3-c",
        )
    }

    pub(super) async fn kernel_escalation(&mut self, case: &Case) -> Vec<CaseResult> {
        let counts = self.plan.counts(Kind::ContainerCold);
        let mut replay_meta = Self::meta(case, "isolate→container/runc", "library");
        replay_meta.what = format!(
            "a Python context with {REPLAYED} earlier evaluations in its isolate runs `import pandas`: the kernel started, the {REPLAYED} replayed, then the import (container already running)"
        );
        let mut fresh_meta = Self::meta(case, "isolate→container/runc", "library");
        fresh_meta.name = "kernel-escalation-no-replay".into();
        fresh_meta.what =
            "the same move with `replay_on_escalation: false`: the kernel started, then the import".into();
        let measured = async {
            let config = airlock::runtime::SandboxConfig {
                container_runtime: ContainerRuntime::Runc,
                ..airlock::runtime::SandboxConfig::default()
            };
            let sandbox = self.new_sandbox(config).await?;
            let result = async {
                // The container is started first (untimed): this times the move, not a cold start.
                sandbox.exec(ExecRequest::new("true")).await?;
                let move_once = |replay: bool| {
                    let sandbox = sandbox.clone();
                    async move {
                        let options = ContextOptions { replay_on_escalation: replay };
                        let context = sandbox.create_context_with(Language::Python, options).await?;
                        for n in 0..REPLAYED {
                            sandbox.code_in(&context, &format!("v{n} = {n} * 2")).await?;
                        }
                        let started = Instant::now();
                        let answer = sandbox.code_in(&context, "import pandas\n1 + 1").await?;
                        let elapsed = started.elapsed();
                        sandbox.delete_context(&context)?;
                        let moved = answer.placement.context_moved.clone().ok_or_else(|| anyhow!("did not move"))?;
                        let expected = if replay { REPLAYED } else { 0 };
                        if moved.replayed_evaluations != expected || value_of(&answer)? != "2" {
                            bail!("replayed {} (expected {expected}): {:?}", moved.replayed_evaluations, answer.outcome.result);
                        }
                        Ok::<Duration, anyhow::Error>(elapsed)
                    }
                };
                let replayed = measure(counts.0, counts.1, || move_once(true)).await;
                let fresh = measure(counts.0, counts.1, || move_once(false)).await;
                Ok::<_, anyhow::Error>((replayed, fresh))
            }
            .await;
            self.destroy(&sandbox).await;
            result
        }
        .await;
        let (replayed, fresh) = split(measured);
        self.pair(
            vec![finish(replay_meta, counts, replayed, Map::new()), finish(fresh_meta, counts, fresh, Map::new())],
            "a move replaying 10 evaluations over a move without replay",
            "kernel-escalation-no-replay",
            "kernel-escalation-replay",
        )
    }

    pub(super) async fn kernel_pandas(&mut self, case: &Case) -> Vec<CaseResult> {
        let counts = self.plan.counts(Kind::Workload);
        let mut kernel_meta = Self::meta(case, "container/runc", "library");
        kernel_meta.what = format!(
            "read a {CSV_ROWS}-row CSV and a groupby mean with pandas, in a Python context living in a container kernel (pandas imported by the first, untimed)"
        );
        let mut docker_meta = Self::meta(case, "container/runc", "cli");
        docker_meta.name = "kernel-pandas-docker-exec".into();
        docker_meta.what = "the same code as `docker exec CONTAINER python3 -c` into the same sandbox's container".into();
        let measured = async {
            let sandbox = self.new_sandbox(container_config(ContainerRuntime::Runc)).await?;
            let result = async {
                sandbox.write_file("data.csv", &groupby_csv()).await?;
                let context = sandbox.create_context(Language::Python).await?;
                let in_kernel = measure(counts.0, counts.1, || async {
                    let started = Instant::now();
                    let answer = sandbox.code_in(&context, GROUPBY).await?;
                    let elapsed = started.elapsed();
                    if answer.outcome.stdout_text().trim() != GROUPBY_ANSWER {
                        bail!("printed {:?}: {:?}", answer.outcome.stdout_text(), answer.outcome.result);
                    }
                    Ok(elapsed)
                })
                .await;
                let container = sandbox.info().container_id.ok_or_else(|| anyhow!("the sandbox has no container"))?;
                let args: Vec<String> =
                    ["exec", "-u", "1000", container.as_str(), "python3", "-c", GROUPBY].map(String::from).to_vec();
                let docker_exec = measure(counts.0, counts.1, || async {
                    let started = Instant::now();
                    let out = run_command("docker", args.clone()).await?;
                    let elapsed = started.elapsed();
                    if out.trim() != GROUPBY_ANSWER {
                        bail!("printed {out:?}");
                    }
                    Ok(elapsed)
                })
                .await;
                Ok::<_, anyhow::Error>((in_kernel, docker_exec))
            }
            .await;
            self.destroy(&sandbox).await;
            result
        }
        .await;
        let (in_kernel, docker_exec) = split(measured);
        self.pair(
            vec![
                finish(kernel_meta, counts, in_kernel, Map::new()),
                finish(docker_meta, counts, docker_exec, Map::new()),
            ],
            "plain docker exec over the container kernel (pandas groupby)",
            "kernel-pandas",
            "kernel-pandas-docker-exec",
        )
    }

    /// Keeps the pair's medians and adds "b over a".
    fn pair(&mut self, results: Vec<CaseResult>, what: &str, a: &str, b: &str) -> Vec<CaseResult> {
        for result in &results {
            if let Some(stats) = &result.stats {
                self.medians.push((result.name.clone(), stats.median_ms));
            }
        }
        self.compare(what, a, b);
        results
    }
}

type Samples = Result<Vec<f64>>;

/// A pair of sample sets, or one set-up error given to both.
fn split(measured: Result<(Samples, Samples)>) -> (Samples, Samples) {
    match measured {
        Ok(pair) => pair,
        Err(e) => {
            let text = format!("{e:#}");
            (Err(anyhow!(text.clone())), Err(anyhow!(text)))
        }
    }
}
