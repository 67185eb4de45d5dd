//! Shared test helpers: deterministic random data, tolerance checks with localising messages, and
//! the test-data directory.
#![allow(dead_code)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `len` values uniform in [-1, 1).
pub fn rand_vec(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Asserts |got − expected| ≤ atol + rtol·|expected| elementwise; on failure names the context,
/// the first bad index, both values and the number of bad elements.
pub fn assert_close(ctx: &str, got: &[f32], expected: &[f64], atol: f64, rtol: f64) {
    assert_eq!(
        got.len(),
        expected.len(),
        "{ctx}: length got {} expected {}",
        got.len(),
        expected.len()
    );
    let mut bad = 0usize;
    let mut first = None;
    let mut worst = 0.0f64;
    for (i, (&g, &e)) in got.iter().zip(expected).enumerate() {
        let diff = (f64::from(g) - e).abs();
        let tol = atol + rtol * e.abs();
        #[allow(clippy::neg_cmp_op_on_partial_ord)] // NaN must count as out of tolerance
        if !(diff <= tol) {
            bad += 1;
            if first.is_none() {
                first = Some((i, g, e, diff, tol));
            }
        }
        worst = worst.max(diff);
    }
    if let Some((i, g, e, diff, tol)) = first {
        panic!(
            "{ctx}: {bad} of {} elements out of tolerance; first at index {i}: got {g}, expected {e}, \
             |diff| {diff:.3e} > tol {tol:.3e} (atol {atol:e}, rtol {rtol:e}); worst |diff| {worst:.3e}",
            got.len()
        );
    }
}

/// `$GPTAQ_TEST_DATA`, or `None` (with a note) when unset; under `CI=true` a missing directory fails.
pub fn test_data_dir() -> Option<std::path::PathBuf> {
    match std::env::var_os("GPTAQ_TEST_DATA") {
        Some(d) if std::path::Path::new(&d).is_dir() => Some(d.into()),
        _ => {
            let ci = std::env::var("CI")
                .map(|v| v == "true" || v == "1")
                .unwrap_or(false);
            assert!(!ci, "CI=true but GPTAQ_TEST_DATA is not set to a directory");
            eprintln!("note: GPTAQ_TEST_DATA not set; skipping a test that needs real data");
            None
        }
    }
}
