//! The egress cases: what a request from a container gains by going through
//! the sandbox's egress proxy. A loopback upstream run by the bench
//! ([`super::upstream`]) is reached two ways in the same run: directly by the
//! host, and from inside a running container through its proxy (the policy
//! names the upstream with `connect_to`). Nothing leaves the host's loopback.
//!
//! - `egress-latency`: the same python3 loop (urllib, a new connection per
//!   request, timed with `perf_counter` inside one process so process start
//!   stays out) on the host and in the container, in alternating blocks.
//! - `egress-download`: a 100 MiB `GET` by curl, timed by curl itself
//!   (`time_total`), on the host and in the container.

use std::collections::HashMap;

use airlock::container::ContainerRuntime;
use airlock::runtime::NetworkPolicy;
use airlock::{ExecRequest, Sandbox, TierKind};
use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};

use super::report::{CaseResult, Comparison};
use super::stats::Stats;
use super::suite::{Case, Kind, Suite, container_config, finish, run_command, skipped};
use super::upstream::{BLOB_BYTES, HELLO, Upstream};

/// The name the container's policy gives the upstream (resolved by the proxy
/// through `connect_to`, never by DNS).
pub const UPSTREAM_HOST: &str = "bench-upstream.test";
/// Requests each python3 process times in the latency case (blocks alternate
/// host, container, host, ... so drift on a shared machine touches both alike).
const LATENCY_BLOCK: usize = 25;
/// Untimed requests each python3 process makes first (its imports, its first
/// connection's set-up), on both sides alike.
const LATENCY_PROCESS_WARMUP: usize = 2;
/// How long one curl download may take before it counts as failed.
const DOWNLOAD_TIMEOUT_S: u32 = 120;

/// The python3 loop: `URL WARMUP N DIRECT`; prints the N timings in ms, one a line.
/// DIRECT=1 ignores any proxy variables (the host's side).
const LATENCY_SCRIPT: &str = r#"
import sys, time, urllib.request
url, warm, n, direct = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
handlers = [urllib.request.ProxyHandler({})] if direct else []
opener = urllib.request.build_opener(*handlers)
out = []
for i in range(warm + n):
    t = time.perf_counter()
    with opener.open(url, timeout=30) as r:
        body = r.read()
    d = time.perf_counter() - t
    if body != b"hello\n":
        sys.exit("unexpected body %r" % body[:80])
    if i >= warm:
        out.append(d * 1000.0)
print("\n".join("%.6f" % v for v in out))
"#;

/// A policy allowing only `host` on `port`, reached at 127.0.0.1:`port`.
pub fn loopback_policy(host: &str, port: u16) -> Result<NetworkPolicy> {
    serde_json::from_value(json!({
        "allow": [{ "host": host, "ports": [port], "connect_to": format!("127.0.0.1:{port}") }]
    }))
    .context("building the bench's network policy")
}

fn parse_timings(text: &str, expected: usize) -> Result<Vec<f64>> {
    let values: Vec<f64> =
        text.lines().filter(|l| !l.trim().is_empty()).map(|l| l.trim().parse::<f64>()).collect::<Result<_, _>>()?;
    if values.len() != expected {
        bail!("the loop printed {} timings, expected {expected}", values.len());
    }
    Ok(values)
}

/// Runs `command` in the container; its stdout, or an error with its stderr.
async fn container_output(sandbox: &Sandbox, request: ExecRequest) -> Result<String> {
    let answer = sandbox.exec(request).await?;
    if answer.placement.tier != TierKind::Container {
        bail!("ran on the {:?} tier, not in the container", answer.placement.tier);
    }
    if answer.outcome.exit_code() != Some(0) {
        bail!("exited {:?}: {}", answer.outcome.exit_code(), answer.outcome.stderr_text().trim());
    }
    Ok(answer.outcome.stdout_text())
}

/// Both sides' results and their comparison (b = through the proxy over a = direct).
fn paired(
    suite: &mut Suite,
    metas: (super::suite::Meta<'_>, super::suite::Meta<'_>),
    counts: (usize, usize),
    samples: Result<(Vec<f64>, Vec<f64>)>,
    extras: (Map<String, Value>, Map<String, Value>),
    what: &str,
) -> Vec<CaseResult> {
    match samples {
        Ok((direct, proxied)) => {
            if let (Some(a), Some(b)) = (Stats::of(&direct), Stats::of(&proxied)) {
                suite.comparisons.push(Comparison {
                    what: what.into(),
                    a: metas.0.name.clone(),
                    b: metas.1.name.clone(),
                    ratio_median: b.median_ms / a.median_ms,
                    difference_median_ms: b.median_ms - a.median_ms,
                });
            }
            vec![finish(metas.0, counts, Ok(direct), extras.0), finish(metas.1, counts, Ok(proxied), extras.1)]
        }
        Err(e) => {
            let text = format!("{e:#}");
            vec![
                finish(metas.0, counts, Err(anyhow::anyhow!(text.clone())), Map::new()),
                finish(metas.1, counts, Err(anyhow::anyhow!(text)), Map::new()),
            ]
        }
    }
}

impl Suite {
    /// A running container sandbox (runc) whose policy reaches `upstream` as [`UPSTREAM_HOST`].
    async fn egress_sandbox(&mut self, upstream: &Upstream) -> Result<Sandbox> {
        let sandbox = self.new_sandbox(container_config(ContainerRuntime::Runc)).await?;
        let ready = async {
            sandbox.set_network_policy(loopback_policy(UPSTREAM_HOST, upstream.port())?)?;
            container_output(&sandbox, ExecRequest::new("true")).await.context("starting the container")?;
            anyhow::Ok(())
        }
        .await;
        match ready {
            Ok(()) => Ok(sandbox),
            Err(e) => {
                self.destroy(&sandbox).await;
                Err(e)
            }
        }
    }

    pub(super) async fn egress(&mut self, case: &Case) -> Vec<CaseResult> {
        if case.name == "egress-download" { self.egress_download(case).await } else { self.egress_latency(case).await }
    }

    async fn egress_latency(&mut self, case: &Case) -> Vec<CaseResult> {
        let counts = self.plan.counts(Kind::Http);
        let mut direct = Self::meta(case, "host", "direct");
        direct.name = "egress-latency-direct".into();
        direct.what = "`GET /hello` from the host straight to the loopback upstream (python3 urllib, a connection each, timed in the process)".into();
        let mut proxied = Self::meta(case, "container/runc", "egress-proxy");
        proxied.name = "egress-latency-proxy".into();
        proxied.what =
            "the same loop in a running container, through its egress proxy (policy: connect_to the same upstream)"
                .into();
        if run_command("python3", vec!["-c".into(), "pass".into()]).await.is_err() {
            let reason = "no python3 on the host for the direct side".to_string();
            return vec![skipped(direct, counts, reason.clone()), skipped(proxied, counts, reason)];
        }
        let samples = async {
            let upstream = Upstream::start(HashMap::new()).await?;
            let sandbox = self.egress_sandbox(&upstream).await?;
            let port = upstream.port();
            let result = async {
                let host_url = format!("http://127.0.0.1:{port}/hello");
                let container_url = format!("http://{UPSTREAM_HOST}:{port}/hello");
                let on_host = |n: usize| {
                    let args = vec![
                        "-c".to_string(),
                        LATENCY_SCRIPT.to_string(),
                        host_url.clone(),
                        LATENCY_PROCESS_WARMUP.to_string(),
                        n.to_string(),
                        "1".to_string(),
                    ];
                    async move { parse_timings(&run_command("python3", args).await?, n) }
                };
                let in_container = |n: usize| {
                    let request = ExecRequest::new("python3").args([
                        "-c".to_string(),
                        LATENCY_SCRIPT.to_string(),
                        container_url.clone(),
                        LATENCY_PROCESS_WARMUP.to_string(),
                        n.to_string(),
                        "0".to_string(),
                    ]);
                    let sandbox = &sandbox;
                    async move { parse_timings(&container_output(sandbox, request).await?, n) }
                };
                // The plan's warm-up: one untimed block each side.
                if counts.0 > 0 {
                    on_host(counts.0).await.context("the host's warm-up")?;
                    in_container(counts.0).await.context("the container's warm-up")?;
                }
                let (mut host, mut container) = (Vec::new(), Vec::new());
                while host.len() < counts.1 {
                    let block = LATENCY_BLOCK.min(counts.1 - host.len());
                    host.extend(on_host(block).await.context("on the host")?);
                    container.extend(in_container(block).await.context("in the container")?);
                }
                anyhow::Ok((host, container))
            }
            .await;
            self.destroy(&sandbox).await;
            result
        }
        .await;
        let mut extra = Map::new();
        extra.insert("requests_per_process".into(), json!(LATENCY_BLOCK));
        extra.insert("untimed_requests_per_process".into(), json!(LATENCY_PROCESS_WARMUP));
        extra.insert("body_bytes".into(), json!(HELLO.len()));
        if let Ok((host, container)) = &samples
            && let (Some(a), Some(b)) = (Stats::of(host), Stats::of(container))
        {
            extra
                .insert("note".into(), json!(format!("+{:.2} ms median through the proxy", b.median_ms - a.median_ms)));
        }
        paired(
            self,
            (direct, proxied),
            counts,
            samples,
            (Map::new(), extra),
            "a request through the container's egress proxy over the host's direct request (loopback upstream)",
        )
    }

    async fn egress_download(&mut self, case: &Case) -> Vec<CaseResult> {
        let counts = self.plan.counts(Kind::Download);
        let mib = BLOB_BYTES as f64 / (1024.0 * 1024.0);
        let mut direct = Self::meta(case, "host", "direct");
        direct.name = "egress-download-direct".into();
        direct.what =
            format!("a {mib:.0} MiB `GET` by curl on the host straight from the loopback upstream (curl's time_total)");
        let mut proxied = Self::meta(case, "container/runc", "egress-proxy");
        proxied.name = "egress-download-proxy".into();
        proxied.what = format!("the same {mib:.0} MiB `GET` by curl in a running container, through its egress proxy");
        let curl_args = |url: String, direct: bool| {
            let mut args: Vec<String> = vec!["-sS".into(), "-f".into(), "-m".into(), DOWNLOAD_TIMEOUT_S.to_string()];
            if direct {
                args.extend(["--noproxy".into(), "*".into()]);
            }
            args.extend(["-o".into(), "/dev/null".into(), "-w".into(), "%{time_total} %{size_download}".into(), url]);
            args
        };
        let parse = |text: &str| -> Result<f64> {
            let mut parts = text.split_whitespace();
            let seconds: f64 = parts.next().context("no time from curl")?.parse()?;
            let size: u64 = parts.next().context("no size from curl")?.parse::<f64>()? as u64;
            if size != BLOB_BYTES {
                bail!("curl downloaded {size} bytes, expected {BLOB_BYTES}");
            }
            Ok(seconds * 1000.0)
        };
        if run_command("curl", vec!["--version".into()]).await.is_err() {
            let reason = "no curl on the host for the direct side".to_string();
            return vec![skipped(direct, counts, reason.clone()), skipped(proxied, counts, reason)];
        }
        let samples = async {
            let upstream = Upstream::start(HashMap::new()).await?;
            let sandbox = self.egress_sandbox(&upstream).await?;
            let port = upstream.port();
            let result = async {
                let host_args = curl_args(format!("http://127.0.0.1:{port}/blob"), true);
                let container_args = curl_args(format!("http://{UPSTREAM_HOST}:{port}/blob"), false);
                let (mut host, mut container) = (Vec::new(), Vec::new());
                for round in 0..counts.0 + counts.1 {
                    let a = parse(&run_command("curl", host_args.clone()).await.context("curl on the host")?)?;
                    let b = parse(
                        &container_output(&sandbox, ExecRequest::new("curl").args(container_args.clone()))
                            .await
                            .context("curl in the container")?,
                    )?;
                    if round >= counts.0 {
                        host.push(a);
                        container.push(b);
                    }
                }
                anyhow::Ok((host, container))
            }
            .await;
            self.destroy(&sandbox).await;
            result
        }
        .await;
        let rate = |samples: &[f64]| Stats::of(samples).map(|s| mib / (s.median_ms / 1000.0));
        let mut extras = (Map::new(), Map::new());
        if let Ok((host, container)) = &samples {
            for (extra, side) in [(&mut extras.0, host), (&mut extras.1, container)] {
                extra.insert("bytes".into(), json!(BLOB_BYTES));
                if let Some(rate) = rate(side) {
                    extra.insert("mib_per_second_at_median".into(), json!(rate));
                    extra.insert("note".into(), json!(format!("{rate:.0} MiB/s")));
                }
            }
        }
        paired(
            self,
            (direct, proxied),
            counts,
            samples,
            extras,
            "a 100 MiB download through the container's egress proxy over the host's direct download",
        )
    }
}
