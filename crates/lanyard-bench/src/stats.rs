//! Latency samples, percentiles and rates.

use std::time::Duration;

/// Latency samples in microseconds.
#[derive(Debug, Clone, Default)]
pub(crate) struct Samples {
    micros: Vec<f64>,
}

impl Samples {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn push(&mut self, elapsed: Duration) {
        self.micros.push(elapsed.as_secs_f64() * 1e6);
    }

    pub(crate) fn extend(&mut self, other: Samples) {
        self.micros.extend(other.micros);
    }

    pub(crate) fn len(&self) -> usize {
        self.micros.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.micros.is_empty()
    }

    /// The `p`th percentile (0–100) in microseconds; 0 when there are no samples.
    pub(crate) fn percentile_us(&self, p: f64) -> f64 {
        let mut sorted = self.micros.clone();
        sorted.sort_by(f64::total_cmp);
        percentile(&sorted, p)
    }

    /// The `p`th percentile in milliseconds.
    pub(crate) fn percentile_ms(&self, p: f64) -> f64 {
        self.percentile_us(p) / 1e3
    }
}

/// The `p`th percentile (0–100) of sorted values by the nearest-rank method: the smallest
/// value such that at least `p`% of the values are at most it. 0 for no values.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let p = p.clamp(0.0, 100.0);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil();
    // The rank is a whole number between 1 and len, so nothing is truncated and the index
    // is in range.
    #[allow(clippy::cast_possible_truncation)]
    let index = (rank.max(1.0) as usize).min(sorted.len()) - 1;
    sorted.get(index).copied().unwrap_or(0.0)
}

/// Operations per second.
pub(crate) fn per_second(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    count as f64 / secs
}

/// `value / baseline`, or 0 when the baseline is 0.
pub(crate) fn ratio(value: f64, baseline: f64) -> f64 {
    if baseline == 0.0 {
        0.0
    } else {
        value / baseline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), 50.0);
        assert_eq!(percentile(&values, 99.0), 99.0);
        assert_eq!(percentile(&values, 100.0), 100.0);
        assert_eq!(percentile(&values, 0.0), 1.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        // Four values: p50 is the second, p99 the fourth.
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), 2.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 99.0), 4.0);
    }

    #[test]
    fn samples_sort_before_ranking() {
        let mut samples = Samples::new();
        for ms in [30, 10, 20] {
            samples.push(Duration::from_millis(ms));
        }
        assert_eq!(samples.len(), 3);
        assert!((samples.percentile_ms(50.0) - 20.0).abs() < 1e-9);
        assert!((samples.percentile_ms(99.0) - 30.0).abs() < 1e-9);
    }

    #[test]
    fn rates_and_ratios() {
        assert_eq!(per_second(500, Duration::from_millis(250)), 2000.0);
        assert_eq!(per_second(5, Duration::ZERO), 0.0);
        assert_eq!(ratio(1.0, 4.0), 0.25);
        assert_eq!(ratio(1.0, 0.0), 0.0);
    }
}
