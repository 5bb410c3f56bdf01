//! Prometheus metrics, served as text at `GET /metrics`.

use std::sync::LazyLock;
use std::time::Instant;

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

struct Metrics {
    registry: Registry,
    tasks: IntCounterVec,
    task_seconds: HistogramVec,
    in_flight: IntGauge,
    qemu_img_seconds: HistogramVec,
    libvirt_seconds: HistogramVec,
    callbacks: IntCounterVec,
    recovered: IntCounterVec,
}

const TASK_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0, 7200.0];
const CALL_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0];

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let registry = Registry::new();
    let tasks = IntCounterVec::new(
        Opts::new("kvmagent_tasks_total", "Finished tasks by command path and outcome"),
        &["path", "outcome"],
    )
    .expect("metric definition");
    let task_seconds = HistogramVec::new(
        HistogramOpts::new("kvmagent_task_duration_seconds", "Task run time by command path")
            .buckets(TASK_BUCKETS.to_vec()),
        &["path"],
    )
    .expect("metric definition");
    let in_flight = IntGauge::new("kvmagent_tasks_in_flight", "Tasks currently running").expect("metric definition");
    let qemu_img_seconds = HistogramVec::new(
        HistogramOpts::new("kvmagent_qemu_img_duration_seconds", "qemu-img run time by subcommand")
            .buckets(CALL_BUCKETS.to_vec()),
        &["subcommand"],
    )
    .expect("metric definition");
    let libvirt_seconds = HistogramVec::new(
        HistogramOpts::new("kvmagent_libvirt_call_duration_seconds", "libvirt call time by call")
            .buckets(CALL_BUCKETS.to_vec()),
        &["call"],
    )
    .expect("metric definition");
    let callbacks = IntCounterVec::new(
        Opts::new("kvmagent_callbacks_total", "Task results posted to their callback, by outcome (delivered, failed)"),
        &["outcome"],
    )
    .expect("metric definition");
    let recovered = IntCounterVec::new(
        Opts::new(
            "kvmagent_recovered_tasks_total",
            "Tasks a crash recovery found interrupted, by what it did (resumed, rolled_back)",
        ),
        &["action"],
    )
    .expect("metric definition");
    for c in [
        Box::new(tasks.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(task_seconds.clone()),
        Box::new(in_flight.clone()),
        Box::new(qemu_img_seconds.clone()),
        Box::new(libvirt_seconds.clone()),
        Box::new(callbacks.clone()),
        Box::new(recovered.clone()),
    ] {
        registry.register(c).expect("metric registered once");
    }
    // Every label a dashboard or alert reads exists from the start (at 0), so rates and
    // increases are defined before the first event.
    for outcome in ["delivered", "failed"] {
        callbacks.with_label_values(&[outcome]);
    }
    for action in ["resumed", "rolled_back"] {
        recovered.with_label_values(&[action]);
    }
    Metrics { registry, tasks, task_seconds, in_flight, qemu_img_seconds, libvirt_seconds, callbacks, recovered }
});

/// A task started; the returned guard records its outcome and duration when finished.
pub fn task_started(path: &str) -> TaskTimer {
    METRICS.in_flight.inc();
    TaskTimer { path: path.to_owned(), start: Instant::now(), done: false }
}

pub struct TaskTimer {
    path: String,
    start: Instant,
    done: bool,
}

impl TaskTimer {
    /// `outcome` is `succeeded`, `failed` or `cancelled`.
    pub fn finish(mut self, outcome: &str) {
        self.record(outcome);
    }

    fn record(&mut self, outcome: &str) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        METRICS.in_flight.dec();
        METRICS.tasks.with_label_values(&[&self.path, outcome]).inc();
        METRICS.task_seconds.with_label_values(&[&self.path]).observe(self.start.elapsed().as_secs_f64());
    }
}

impl Drop for TaskTimer {
    fn drop(&mut self) {
        // A task dropped without finish() (panic, shutdown) still leaves the in-flight gauge right.
        self.record("aborted");
    }
}

pub fn observe_qemu_img(subcommand: &str, start: Instant) {
    METRICS.qemu_img_seconds.with_label_values(&[subcommand]).observe(start.elapsed().as_secs_f64());
}

pub fn observe_libvirt(call: &str, start: Instant) {
    METRICS.libvirt_seconds.with_label_values(&[call]).observe(start.elapsed().as_secs_f64());
}

/// A task result reached its callback (`delivered: true`) or was given up on.
pub fn callback(delivered: bool) {
    METRICS.callbacks.with_label_values(&[if delivered { "delivered" } else { "failed" }]).inc();
}

/// What a crash recovery did with the interrupted tasks.
pub fn recovered(resumed: usize, rolled_back: usize) {
    METRICS.recovered.with_label_values(&["resumed"]).inc_by(resumed as u64);
    METRICS.recovered.with_label_values(&["rolled_back"]).inc_by(rolled_back as u64);
}

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    let mut buf = Vec::new();
    TextEncoder::new().encode(&METRICS.registry.gather(), &mut buf).expect("text encoding to a Vec");
    String::from_utf8(buf).expect("prometheus text is UTF-8")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use prometheus::core::Collector;

    use super::METRICS;

    /// The names of every metric the agent exports.
    fn exported() -> BTreeSet<String> {
        let m = &*METRICS;
        let collectors: [&dyn Collector; 7] = [
            &m.tasks,
            &m.task_seconds,
            &m.in_flight,
            &m.qemu_img_seconds,
            &m.libvirt_seconds,
            &m.callbacks,
            &m.recovered,
        ];
        collectors.iter().flat_map(|c| c.desc()).map(|d| d.fq_name.clone()).collect()
    }

    /// Every `kvmagent_*` metric a text names, histogram series (`_bucket`, `_sum`, `_count`) by
    /// their histogram's name.
    fn named_in(text: &str) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for (i, _) in text.match_indices("kvmagent_") {
            let name: String =
                text[i..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit()).collect();
            let name =
                ["_bucket", "_sum", "_count"].iter().fold(name, |n, s| n.strip_suffix(s).map_or(n.clone(), Into::into));
            names.insert(name);
        }
        names
    }

    #[test]
    fn the_dashboard_and_alerts_name_only_metrics_the_agent_exports() {
        let exported = exported();
        let dashboard = include_str!("../monitoring/grafana-dashboard.json");
        serde_json::from_str::<serde_json::Value>(dashboard).expect("the dashboard is JSON");
        for (file, text) in
            [("grafana-dashboard.json", dashboard), ("alerts.yml", include_str!("../monitoring/alerts.yml"))]
        {
            let named = named_in(text);
            assert!(!named.is_empty(), "{file} names no metric");
            let unknown: Vec<_> = named.difference(&exported).collect();
            assert!(
                unknown.is_empty(),
                "{file} names metrics the agent does not export: {unknown:?} (exported: {exported:?})"
            );
        }
        for alert in [
            "kvmagent_tasks_total{outcome=\"failed\"}",
            "kvmagent_callbacks_total{outcome=\"failed\"}",
            "kvmagent_recovered_tasks_total{action=\"rolled_back\"}",
        ] {
            assert!(include_str!("../monitoring/alerts.yml").contains(alert), "an alert on {alert}");
        }
    }

    #[test]
    fn callback_and_recovery_counters_are_rendered_from_the_start() {
        super::recovered(0, 1);
        let text = super::render();
        for series in [
            "kvmagent_callbacks_total{outcome=\"delivered\"}",
            "kvmagent_callbacks_total{outcome=\"failed\"}",
            "kvmagent_recovered_tasks_total{action=\"resumed\"}",
            "kvmagent_recovered_tasks_total{action=\"rolled_back\"}",
        ] {
            assert!(text.contains(series), "{series} in:\n{text}");
        }
    }
}
