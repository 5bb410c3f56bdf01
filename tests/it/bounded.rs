//! Hostile load keeps within bounds: a thousand commands carrying 1 MiB strings leave the
//! agent's memory within 50 MiB of what it used before them, and its state directory small
//! (a finished task keeps its result, cut to size, not its command).

use std::time::Duration;

use kvmagent_host_tests::checks::{rss, tree_size};
use kvmagent_host_tests::Host;
use serde_json::json;

const MIB: u64 = 1 << 20;

#[tokio::test]
async fn a_thousand_commands_with_megabyte_strings_leave_memory_and_journal_bounded() {
    let h = Host::start().await.unwrap();
    let pid = h.pid().unwrap();
    let big = format!("{}/{}", h.root.display(), "a".repeat(MIB as usize));
    // A few first, so that the allocator's pools exist before the baseline is taken.
    for _ in 0..5 {
        h.call("/localstorage/checkbits", &json!({"path": big})).await.unwrap();
    }
    let idle = rss(pid);
    for i in 0..1000 {
        let r = h.call_within("/localstorage/checkbits", &json!({"path": big}), Duration::from_secs(30)).await;
        let r = r.unwrap_or_else(|e| panic!("command {i}: {e}"));
        assert!(r.to_string().len() < 64 * 1024, "command {i}: an answer of {} bytes", r.to_string().len());
    }
    let after = rss(pid);
    let journal = tree_size(&h.state_dir);
    println!(
        "RSS {} MiB before, {} MiB after 1000 commands of 1 MiB; state dir {} KiB",
        idle / MIB,
        after / MIB,
        journal / 1024
    );
    assert!(after < idle + 50 * MIB, "RSS grew from {idle} to {after} bytes");
    assert!(journal < 16 * MIB, "the state directory holds {journal} bytes");
    assert_eq!(h.post("/host/echo", &[], "").await.unwrap().0, 200, "the agent is up");
}
