//! Summary statistics of a set of timings: percentiles by linear
//! interpolation between closest ranks (so min ≤ median ≤ p90 ≤ p99 ≤ max
//! always holds), and two spreads (interquartile range, median absolute
//! deviation).

use serde::Serialize;

/// Percentiles and spread of one result's samples, in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Stats {
    /// How many timings the figures below summarise.
    pub samples: usize,
    pub median_ms: f64,
    pub p90_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// Interquartile range: p75 − p25.
    pub iqr_ms: f64,
    /// Median absolute deviation from the median (not scaled).
    pub mad_ms: f64,
}

/// The value at `fraction` (0..=1) of sorted `values`, interpolated linearly
/// between the two closest ranks.
fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        len => {
            let position = fraction.clamp(0.0, 1.0) * (len - 1) as f64;
            let below = position.floor() as usize;
            let above = (below + 1).min(len - 1);
            let weight = position - below as f64;
            sorted[below] + (sorted[above] - sorted[below]) * weight
        }
    }
}

impl Stats {
    /// Statistics of `samples_ms`; `None` when there are none.
    pub fn of(samples_ms: &[f64]) -> Option<Self> {
        if samples_ms.is_empty() {
            return None;
        }
        let mut sorted = samples_ms.to_vec();
        sorted.sort_by(f64::total_cmp);
        let median = percentile(&sorted, 0.5);
        let mut deviations: Vec<f64> = sorted.iter().map(|v| (v - median).abs()).collect();
        deviations.sort_by(f64::total_cmp);
        Some(Self {
            samples: sorted.len(),
            median_ms: median,
            p90_ms: percentile(&sorted, 0.90),
            p95_ms: percentile(&sorted, 0.95),
            p99_ms: percentile(&sorted, 0.99),
            min_ms: sorted[0],
            max_ms: sorted[sorted.len() - 1],
            mean_ms: sorted.iter().sum::<f64>() / sorted.len() as f64,
            iqr_ms: percentile(&sorted, 0.75) - percentile(&sorted, 0.25),
            mad_ms: percentile(&deviations, 0.5),
        })
    }
}

/// Share of samples ComputeSDK trims from each end before its statistics
/// (its METHODOLOGY.md: "the bottom 5% and top 5% of successful iteration
/// times are trimmed"; min and max still come from the full set).
pub const TTI_TRIM_FRACTION: f64 = 0.05;

/// The sorted samples with `floor(len × TTI_TRIM_FRACTION)` dropped from each
/// end (nothing is dropped below 20 samples).
pub fn trimmed(samples_ms: &[f64]) -> Vec<f64> {
    let mut sorted = samples_ms.to_vec();
    sorted.sort_by(f64::total_cmp);
    let cut = (sorted.len() as f64 * TTI_TRIM_FRACTION).floor() as usize;
    if cut * 2 >= sorted.len() {
        return sorted;
    }
    sorted[cut..sorted.len() - cut].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_ordered_and_interpolated() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let stats = Stats::of(&samples).unwrap();
        assert_eq!(stats.samples, 100);
        assert!((stats.median_ms - 50.5).abs() < 1e-9);
        assert!((stats.p90_ms - 90.1).abs() < 1e-9);
        assert!((stats.p99_ms - 99.01).abs() < 1e-9);
        assert_eq!((stats.min_ms, stats.max_ms), (1.0, 100.0));
        assert!((stats.iqr_ms - 49.5).abs() < 1e-9);
        assert!((stats.mad_ms - 25.0).abs() < 1e-9);
        assert!(Stats::of(&[]).is_none());
        let one = Stats::of(&[7.0]).unwrap();
        assert_eq!((one.median_ms, one.p99_ms, one.iqr_ms), (7.0, 7.0, 0.0));
    }

    #[test]
    fn trimming_drops_five_percent_from_each_end() {
        let samples: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let kept = trimmed(&samples);
        assert_eq!(kept.len(), 90);
        assert_eq!((kept[0], kept[89]), (6.0, 95.0));
        // Under 20 samples nothing is trimmed (5% of them is under one).
        assert_eq!(trimmed(&[3.0, 1.0, 2.0]), vec![1.0, 2.0, 3.0]);
    }
}
