//! Benchmark: 1000 mixed commands at once across 20 VMs (see `kvmagent_host_tests::load`),
//! against a baseline of the same commands sent one after another, each awaited; prints both
//! wall times and the ratio. Fails if any command is lost, deadlocks or fails other than by a
//! conflict, or if the host is left inconsistent.
//!
//! Run: `cargo build --release -p kvmagent && cargo bench -p kvmagent-host-tests --bench load`
//! (`KVMAGENT_BENCH_COMMANDS=N` to change N; needs libvirtd like the host tests).

use std::time::Duration;

use kvmagent_host_tests::bench::result_line;
use kvmagent_host_tests::images::BaseImage;
use kvmagent_host_tests::{load, Host};

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("KVMAGENT_BENCH_COMMANDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let h = Host::start().await.expect("agent");
    let base = BaseImage::create(&h, 16 << 20).expect("base image");
    let vms = load::vms(&h, &base, 20).await.expect("VMs");
    let limit = Duration::from_secs(1800);
    let concurrent = load::run(&h, &vms, n, limit).await.expect("concurrent run");
    let per = |d: Duration| d.as_secs_f64() * 1000.0 / n as f64;
    println!(
        "concurrent: {n} commands across {} VMs in {:.2?} ({:.2} ms/command); conflicts {:?}",
        vms.len(),
        concurrent.elapsed,
        per(concurrent.elapsed),
        concurrent.tally.conflicts
    );
    let mut sequential = Duration::ZERO;
    for i in 0..n {
        sequential += load::run_one(&h, &vms, i, limit).await.expect("sequential command");
    }
    println!("sequential baseline: {sequential:.2?} ({:.2} ms/command)", per(sequential));
    println!("ratio: {:.2}x", sequential.as_secs_f64() / concurrent.elapsed.as_secs_f64());
    result_line(&format!("load-{n}-commands"), concurrent.elapsed, sequential);
}
