//! `airlock bench compare A.json B.json`: two runs' results side by side
//! (two Airlock versions, or two configurations), matched by result name,
//! with the ratio of medians and a significance check on the raw samples.
//!
//! The check is the Mann–Whitney U test (two-sided, normal approximation
//! with tie and continuity corrections): it asks whether one run's timings
//! tend to be larger than the other's without assuming they are normally
//! distributed (timings on a shared machine are not). A result is called
//! faster or slower only when the test's p-value is below `--alpha` *and* the
//! medians differ by more than `--threshold`; otherwise "no difference". With
//! fewer than [`MIN_SAMPLES`] samples on a side the test is not run ("too few
//! samples"): with so few the approximation says little.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Fewest samples on each side for the significance check.
pub const MIN_SAMPLES: usize = 5;
/// Largest report file read.
const MAX_REPORT_BYTES: u64 = 256 * 1024 * 1024;

#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// The baseline run's JSON (`airlock bench --json A.json`).
    pub baseline: PathBuf,
    /// The run compared with it.
    pub candidate: PathBuf,
    /// Significance level of the Mann–Whitney U test.
    #[arg(long, default_value_t = 0.05)]
    pub alpha: f64,
    /// Smallest change of the median that counts, in percent.
    #[arg(long, default_value_t = 5.0)]
    pub threshold: f64,
    /// Exit with status 1 when any result is significantly slower in the candidate.
    #[arg(long)]
    pub fail_on_regression: bool,
}

/// One result's samples and median, from a report.
#[derive(Debug, Clone)]
struct Measured {
    median_ms: f64,
    samples_ms: Vec<f64>,
}

/// What the comparison says of one result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Faster,
    Slower,
    NoDifference,
    TooFewSamples,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Faster => "faster",
            Verdict::Slower => "SLOWER",
            Verdict::NoDifference => "no difference",
            Verdict::TooFewSamples => "too few samples",
        }
    }
}

fn read_report(path: &Path) -> Result<BTreeMap<String, Measured>> {
    let size = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    if size > MAX_REPORT_BYTES {
        bail!("{} is {size} bytes, over the limit of {MAX_REPORT_BYTES} for a report", path.display());
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let report: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not an airlock bench JSON report", path.display()))?;
    match report.get("schema_version").and_then(Value::as_u64) {
        Some(1) => {}
        Some(other) => bail!("{}: schema version {other}; this airlock reads version 1", path.display()),
        None => bail!("{} has no schema_version: not an airlock bench JSON report", path.display()),
    }
    let results = report
        .get("results")
        .and_then(Value::as_array)
        .with_context(|| format!("{} has no results list", path.display()))?;
    let mut measured = BTreeMap::new();
    for result in results {
        let (Some(name), Some(median)) = (
            result.get("name").and_then(Value::as_str),
            result.pointer("/stats/median_ms").and_then(Value::as_f64),
        ) else {
            continue; // Skipped or failed: nothing to compare.
        };
        let samples_ms = result
            .get("samples_ms")
            .and_then(Value::as_array)
            .map(|values| values.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        measured.insert(name.to_string(), Measured { median_ms: median, samples_ms });
    }
    Ok(measured)
}

/// Average ranks (1-based) of `values`, ties sharing the mean of their ranks,
/// and the tie term Σ(t³ − t) over groups of ties.
fn ranks(values: &[f64]) -> (Vec<f64>, f64) {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut ties = 0.0;
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && values[order[end]] == values[order[start]] {
            end += 1;
        }
        let average = (start + end + 1) as f64 / 2.0; // mean of ranks start+1 ..= end
        for &index in &order[start..end] {
            ranks[index] = average;
        }
        let t = (end - start) as f64;
        ties += t * t * t - t;
        start = end;
    }
    (ranks, ties)
}

/// The complementary error function, by the Chebyshev fit of Numerical
/// Recipes' `erfcc` (fractional error under 1.2e-7 everywhere).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let value = t * poly.exp();
    if x >= 0.0 { value } else { 2.0 - value }
}

/// The two-sided p-value of the Mann–Whitney U test of `a` against `b`.
pub fn mann_whitney_p(a: &[f64], b: &[f64]) -> f64 {
    let (n1, n2) = (a.len() as f64, b.len() as f64);
    let n = n1 + n2;
    let combined: Vec<f64> = a.iter().chain(b).copied().collect();
    let (ranks, ties) = ranks(&combined);
    let rank_sum_a: f64 = ranks[..a.len()].iter().sum();
    let u = rank_sum_a - n1 * (n1 + 1.0) / 2.0;
    let mean = n1 * n2 / 2.0;
    let variance = n1 * n2 / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    if variance <= 0.0 {
        return 1.0; // Every value equal: no evidence of a difference.
    }
    let z = ((u - mean).abs() - 0.5).max(0.0) / variance.sqrt();
    erfc(z / std::f64::consts::SQRT_2).min(1.0)
}

/// One row of the comparison.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub baseline_ms: f64,
    pub candidate_ms: f64,
    pub p_value: Option<f64>,
    pub verdict: Verdict,
}

fn judge(baseline: &Measured, candidate: &Measured, alpha: f64, threshold_percent: f64) -> (Option<f64>, Verdict) {
    if baseline.samples_ms.len() < MIN_SAMPLES || candidate.samples_ms.len() < MIN_SAMPLES {
        return (None, Verdict::TooFewSamples);
    }
    let p = mann_whitney_p(&baseline.samples_ms, &candidate.samples_ms);
    let change = (candidate.median_ms - baseline.median_ms) / baseline.median_ms.max(f64::MIN_POSITIVE) * 100.0;
    let verdict = if p >= alpha || change.abs() <= threshold_percent {
        Verdict::NoDifference
    } else if change < 0.0 {
        Verdict::Faster
    } else {
        Verdict::Slower
    };
    (Some(p), verdict)
}

/// The rows for the results both runs measured, and the names only one did.
fn rows(
    baseline: &BTreeMap<String, Measured>,
    candidate: &BTreeMap<String, Measured>,
    alpha: f64,
    threshold_percent: f64,
) -> (Vec<Row>, Vec<String>) {
    let mut rows = Vec::new();
    let mut unmatched = Vec::new();
    for (name, a) in baseline {
        match candidate.get(name) {
            Some(b) => {
                let (p_value, verdict) = judge(a, b, alpha, threshold_percent);
                rows.push(Row { name: name.clone(), baseline_ms: a.median_ms, candidate_ms: b.median_ms, p_value, verdict });
            }
            None => unmatched.push(format!("{name} (baseline only)")),
        }
    }
    unmatched.extend(candidate.keys().filter(|name| !baseline.contains_key(*name)).map(|name| format!("{name} (candidate only)")));
    (rows, unmatched)
}

/// Runs `airlock bench compare`.
pub fn compare(args: &CompareArgs) -> Result<ExitCode> {
    if !(args.alpha > 0.0 && args.alpha < 1.0) {
        bail!("--alpha must be between 0 and 1 (exclusive), not {}", args.alpha);
    }
    if !(args.threshold >= 0.0 && args.threshold.is_finite()) {
        bail!("--threshold must be a percentage of 0 or more, not {}", args.threshold);
    }
    let baseline = read_report(&args.baseline)?;
    let candidate = read_report(&args.candidate)?;
    let (rows, unmatched) = rows(&baseline, &candidate, args.alpha, args.threshold);
    if rows.is_empty() {
        bail!(
            "the two reports have no measured result in common ({} and {} results)",
            baseline.len(),
            candidate.len()
        );
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<36} {:>12} {:>12} {:>8} {:>9}  verdict (Mann-Whitney U, alpha {}, threshold {}%)",
        "result", "baseline ms", "candidate ms", "ratio", "p", args.alpha, args.threshold
    );
    for row in &rows {
        let p = row.p_value.map_or_else(|| "-".to_string(), |p| format!("{p:.4}"));
        let _ = writeln!(
            out,
            "{:<36} {:>12.3} {:>12.3} {:>8.3} {:>9}  {}",
            row.name,
            row.baseline_ms,
            row.candidate_ms,
            row.candidate_ms / row.baseline_ms.max(f64::MIN_POSITIVE),
            p,
            row.verdict.label()
        );
    }
    for name in &unmatched {
        let _ = writeln!(out, "{name:<36} not compared: measured in one run only");
    }
    print!("{out}");
    let slower: Vec<&str> = rows.iter().filter(|r| r.verdict == Verdict::Slower).map(|r| r.name.as_str()).collect();
    if args.fail_on_regression && !slower.is_empty() {
        eprintln!("airlock bench compare: significantly slower: {}", slower.join(", "));
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erfc_matches_known_values() {
        for (x, expected) in [(0.0, 1.0), (0.5, 0.479_500_122), (1.0, 0.157_299_207), (2.0, 0.004_677_735), (-1.0, 1.842_700_793)] {
            assert!((erfc(x) - expected).abs() < 1e-6, "erfc({x}) = {}", erfc(x));
        }
    }

    #[test]
    fn ties_share_their_average_rank() {
        let (ranks, ties) = ranks(&[3.0, 1.0, 3.0, 2.0]);
        assert_eq!(ranks, vec![3.5, 1.0, 3.5, 2.0]);
        assert_eq!(ties, 6.0); // one pair: 2³ − 2
    }

    #[test]
    fn separated_samples_differ_and_shuffled_ones_do_not() {
        // Fully separated groups of 10: U = 0; the exact two-sided p is 1.08e-5, the
        // normal approximation with continuity correction about 1.8e-4.
        let fast: Vec<f64> = (0..10).map(|i| 10.0 + f64::from(i)).collect();
        let slow: Vec<f64> = (0..10).map(|i| 30.0 + f64::from(i)).collect();
        let p = mann_whitney_p(&fast, &slow);
        assert!(p < 1e-3 && p > 1e-5, "{p}");
        assert!((mann_whitney_p(&slow, &fast) - p).abs() < 1e-12, "two-sided: symmetric");
        // Interleaved: no evidence.
        let odd: Vec<f64> = (0..10).map(|i| f64::from(2 * i + 1)).collect();
        let even: Vec<f64> = (0..10).map(|i| f64::from(2 * i)).collect();
        assert!(mann_whitney_p(&odd, &even) > 0.5);
        assert_eq!(mann_whitney_p(&[1.0; 6], &[1.0; 6]), 1.0);
    }

    fn measured(samples: &[f64]) -> Measured {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        Measured { median_ms: sorted[sorted.len() / 2], samples_ms: samples.to_vec() }
    }

    #[test]
    fn verdicts_need_both_significance_and_a_large_enough_change() {
        let base = measured(&[10.0, 10.1, 10.2, 10.3, 10.4, 10.5, 10.6, 10.7]);
        let slower = measured(&[20.0, 20.1, 20.2, 20.3, 20.4, 20.5, 20.6, 20.7]);
        assert_eq!(judge(&base, &slower, 0.05, 5.0).1, Verdict::Slower);
        assert_eq!(judge(&slower, &base, 0.05, 5.0).1, Verdict::Faster);
        // Significant but tiny: 2% with a 5% threshold.
        let tiny = measured(&[10.2, 10.3, 10.4, 10.5, 10.6, 10.7, 10.8, 10.9]);
        assert_eq!(judge(&base, &tiny, 0.05, 5.0).1, Verdict::NoDifference);
        assert_eq!(judge(&base, &measured(&[20.0, 21.0]), 0.05, 5.0).1, Verdict::TooFewSamples);
    }

    #[test]
    fn reports_are_matched_by_name_and_bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, value: Value| {
            let path = dir.path().join(name);
            std::fs::write(&path, value.to_string()).unwrap();
            path
        };
        let result = |name: &str, samples: &[f64]| {
            let median = measured(samples).median_ms;
            serde_json::json!({ "name": name, "status": "ok", "stats": { "median_ms": median }, "samples_ms": samples })
        };
        let a = write(
            "a.json",
            serde_json::json!({ "schema_version": 1, "results": [
                result("x", &[1.0, 1.1, 1.2, 1.3, 1.4, 1.5]),
                result("only-a", &[1.0]),
                { "name": "failed", "status": "failed" },
            ] }),
        );
        let b = write(
            "b.json",
            serde_json::json!({ "schema_version": 1, "results": [ result("x", &[3.0, 3.1, 3.2, 3.3, 3.4, 3.5]), result("only-b", &[1.0]) ] }),
        );
        let (baseline, candidate) = (read_report(&a).unwrap(), read_report(&b).unwrap());
        let (rows, unmatched) = rows(&baseline, &candidate, 0.05, 5.0);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].verdict, Verdict::Slower);
        assert_eq!(unmatched, vec!["only-a (baseline only)".to_string(), "only-b (candidate only)".to_string()]);
        let args = |baseline: PathBuf, candidate: PathBuf| CompareArgs {
            baseline,
            candidate,
            alpha: 0.05,
            threshold: 5.0,
            fail_on_regression: true,
        };
        assert_eq!(compare(&args(a.clone(), b.clone())).unwrap(), ExitCode::FAILURE, "a regression fails on request");
        assert_eq!(compare(&args(b.clone(), a.clone())).unwrap(), ExitCode::SUCCESS);
        let wrong = write("wrong.json", serde_json::json!({ "schema_version": 2, "results": [] }));
        assert!(format!("{:#}", compare(&args(a.clone(), wrong)).unwrap_err()).contains("schema version 2"));
        let garbage = write("garbage.json", Value::String("x".into()));
        assert!(format!("{:#}", compare(&args(a.clone(), garbage)).unwrap_err()).contains("no schema_version"));
        let disjoint = write("disjoint.json", serde_json::json!({ "schema_version": 1, "results": [ result("y", &[1.0]) ] }));
        assert!(format!("{:#}", compare(&args(a, disjoint)).unwrap_err()).contains("no measured result in common"));
    }
}
