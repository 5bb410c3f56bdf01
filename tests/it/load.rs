//! Load: mixed commands at once across 20 VMs all complete, each with exactly one callback, a
//! success or a conflict (no deadlock, no lost callback), and leave the host consistent. CI
//! sends 200; the `load` benchmark sends 1000.

use std::time::Duration;

use kvmagent_host_tests::images::BaseImage;
use kvmagent_host_tests::{load, Host};

#[tokio::test]
async fn two_hundred_mixed_commands_across_twenty_vms() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 16 << 20).unwrap();
    let vms = load::vms(&h, &base, 20).await.unwrap();
    let stats = load::run(&h, &vms, 200, Duration::from_secs(240)).await.unwrap();
    println!(
        "load: {} commands across {} VMs in {:?}; successes {:?}, conflicts {:?}",
        stats.commands,
        vms.len(),
        stats.elapsed,
        stats.tally.successes,
        stats.tally.conflicts
    );
}
