//! Draws from the Beta distribution, for Thompson sampling.
//!
//! The workspace's `rand` has no Beta distribution of its own, and the
//! draw must be reproducible from a seeded generator, so it is built here
//! from the textbook construction: Beta(a, b) = X / (X + Y) with X ~
//! Gamma(a), Y ~ Gamma(b), and Gamma by Marsaglia and Tsang's method ("A
//! simple method for generating gamma variables", 2000).

use rand::Rng;

/// Rejection rounds before giving up on a Gamma draw. Each round is
/// accepted with probability above 0.95, so this is never reached in
/// practice; it only keeps the loop bounded.
const MAX_ROUNDS: usize = 64;

/// One draw from Beta(`a`, `b`); both must be finite and positive (the
/// mean is returned for anything else, and when both Gamma draws
/// underflow to zero, which tiny shapes can do).
pub(crate) fn beta<R: Rng + ?Sized>(rng: &mut R, a: f64, b: f64) -> f64 {
    let mean = a / (a + b);
    if !(a.is_finite() && b.is_finite() && a > 0.0 && b > 0.0) {
        return if mean.is_finite() { mean } else { 0.5 };
    }
    // With a shape of exactly 1 the distribution function inverts in
    // closed form: Beta(1, b) = 1 - U^(1/b), Beta(a, 1) = U^(1/a). Every
    // arm starts at the default uniform prior and keeps one shape at 1
    // until it has seen both an accept and a miss, so most draws of a new
    // offer take this path.
    if a == 1.0 {
        return 1.0 - open_unit(rng).powf(1.0 / b);
    }
    if b == 1.0 {
        return open_unit(rng).powf(1.0 / a);
    }
    let x = gamma(rng, a);
    let y = gamma(rng, b);
    let sum = x + y;
    if sum > 0.0 && sum.is_finite() {
        x / sum
    } else {
        mean
    }
}

/// One draw from Gamma(`shape`, 1), `shape` > 0.
fn gamma<R: Rng + ?Sized>(rng: &mut R, shape: f64) -> f64 {
    if shape < 1.0 {
        // Gamma(k) = Gamma(k + 1) · U^(1/k).
        let u = open_unit(rng);
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    for _ in 0..MAX_ROUNDS {
        let x = standard_normal(rng);
        let v = 1.0 + c * x;
        if v <= 0.0 {
            continue;
        }
        let v = v * v * v;
        let u = open_unit(rng);
        let x2 = x * x;
        if u < 1.0 - 0.0331 * x2 * x2 || u.ln() < 0.5 * x2 + d * (1.0 - v + v.ln()) {
            return d * v;
        }
    }
    shape
}

/// Uniform on (0, 1]: never 0, so logarithms and powers stay finite.
fn open_unit<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    1.0 - rng.random::<f64>()
}

/// One draw from N(0, 1) (Marsaglia's polar method: one logarithm and no
/// cosine per draw, which matters when a fan-out draws millions; the
/// second value is dropped to keep no state between calls).
fn standard_normal<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    for _ in 0..MAX_ROUNDS {
        let u = 2.0 * rng.random::<f64>() - 1.0;
        let v = 2.0 * rng.random::<f64>() - 1.0;
        let s = u * u + v * v;
        // Accepted with probability π/4 per round.
        if s > 0.0 && s < 1.0 {
            return u * (-2.0 * s.ln() / s).sqrt();
        }
    }
    0.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn moments(draws: &[f64]) -> (f64, f64) {
        let n = draws.len() as f64;
        let mean = draws.iter().sum::<f64>() / n;
        let var = draws.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        (mean, var)
    }

    #[test]
    fn beta_has_the_right_mean_and_variance() {
        let mut rng = StdRng::seed_from_u64(7);
        for (a, b) in [
            (1.0, 1.0),
            (1.0, 4.0),
            (6.0, 1.0),
            (2.0, 5.0),
            (31.0, 71.0),
            (0.5, 0.5),
            (0.2, 3.0),
        ] {
            let draws: Vec<f64> = (0..50_000).map(|_| beta(&mut rng, a, b)).collect();
            assert!(draws.iter().all(|x| (0.0..=1.0).contains(x)));
            let (mean, var) = moments(&draws);
            let want_mean = a / (a + b);
            let want_var = a * b / ((a + b) * (a + b) * (a + b + 1.0));
            assert!((mean - want_mean).abs() < 0.01, "Beta({a},{b}) mean {mean}");
            assert!(
                (var - want_var).abs() < 0.1 * want_var + 0.001,
                "Beta({a},{b}) variance {var}, want {want_var}"
            );
        }
    }

    #[test]
    fn gamma_mean_matches_shape() {
        let mut rng = StdRng::seed_from_u64(11);
        for shape in [0.3, 1.0, 4.5, 100.0] {
            let draws: Vec<f64> = (0..50_000).map(|_| gamma(&mut rng, shape)).collect();
            let (mean, _) = moments(&draws);
            assert!(
                (mean - shape).abs() < 0.03 * shape + 0.01,
                "{shape}: {mean}"
            );
        }
    }

    #[test]
    fn normal_has_the_right_moments() {
        let mut rng = StdRng::seed_from_u64(13);
        let draws: Vec<f64> = (0..100_000).map(|_| standard_normal(&mut rng)).collect();
        let (mean, var) = moments(&draws);
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.03, "variance {var}");
        let beyond_two = draws.iter().filter(|x| x.abs() > 2.0).count() as f64 / 100_000.0;
        assert!((beyond_two - 0.0455).abs() < 0.005, "tails {beyond_two}");
    }

    #[test]
    fn degenerate_parameters_give_the_mean() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(beta(&mut rng, 0.0, 1.0), 0.0);
        assert_eq!(beta(&mut rng, f64::NAN, 1.0), 0.5);
        assert_eq!(beta(&mut rng, 1.0, f64::INFINITY), 0.0);
        // Tiny shapes may underflow; the result is still a probability.
        for _ in 0..1000 {
            let x = beta(&mut rng, 1e-300, 1e-300);
            assert!((0.0..=1.0).contains(&x));
        }
    }

    #[test]
    fn the_same_seed_draws_the_same() {
        let a: Vec<f64> = {
            let mut rng = StdRng::seed_from_u64(42);
            (0..100).map(|_| beta(&mut rng, 3.0, 4.0)).collect()
        };
        let b: Vec<f64> = {
            let mut rng = StdRng::seed_from_u64(42);
            (0..100).map(|_| beta(&mut rng, 3.0, 4.0)).collect()
        };
        assert_eq!(a, b);
    }
}
