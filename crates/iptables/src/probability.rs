//! `-m statistic --mode random --probability P`: rule i of N endpoints carries P(N - i) =
//! 1/(N - i), written as upstream writes it (`%0.10f`), so the last rule needs none and the
//! choice is uniform.

/// `1/n` with ten decimals, rounded as Go's `%0.10f` rounds.
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probabilities_are_written_as_upstream_writes_them() {
        assert_eq!(probability(2), "0.5000000000");
        assert_eq!(probability(3), "0.3333333333");
        assert_eq!(probability(10), "0.1000000000");
        assert_eq!(probability(1000), "0.0010000000");
        assert_eq!(probability(100001), "0.0000099999");
        // Strictly decreasing far beyond any real Service.
        let mut last = probability(1);
        for n in 2..200_000 {
            let p = probability(n);
            assert!(
                p < last || p == last && n > 100_000,
                "{n}: {p} after {last}"
            );
            last = p;
        }
    }
}
