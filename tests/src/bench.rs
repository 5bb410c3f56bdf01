//! What every benchmark prints besides its table: one JSON line per result, so that figures can
//! be compared across runs: `{"name", "figure", "baseline", "ratio"}`, `figure` kvmagent's
//! seconds, `baseline` the baseline's seconds, `ratio` = figure / baseline (below 1: faster).

use std::time::Duration;

pub fn result_line(name: &str, figure: Duration, baseline: Duration) {
    let (f, b) = (figure.as_secs_f64(), baseline.as_secs_f64());
    println!("{}", serde_json::json!({"name": name, "figure": f, "baseline": b, "ratio": f / b}));
}
