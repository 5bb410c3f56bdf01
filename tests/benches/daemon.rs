//! Benchmark: how lean and responsive the idle daemon is. Starts the release agent (at the
//! production log level), waits until it is idle and prints its resident memory, then the
//! latency of `/host/echo` from 500 concurrent keep-alive connections — flat out (each
//! connection sends its next request when the last is answered, as `wrk` does) and paced (each
//! connection sends 5 requests a second, timed from when each was due, so a stall is not hidden)
//! — alone and while an offline flatten of a multi-GiB chain runs. Also the load generator's own
//! CPU share (it shares the cores with the agent) and the agent's.
//!
//! One JSON line per result: `{"name", "figure", "baseline", "ratio"}` with ratio =
//! figure / baseline. The baseline is the goal (15 MiB idle RSS, 5 ms p99), except for CPU shares
//! (the baseline is the agent's share of the same run) and throughput (the run alone).
//!
//! Run: `cargo build --release -p kvmagent && cargo bench -p kvmagent-host-tests --bench daemon`
//! (`KVMAGENT_BENCH_CONNECTIONS`, `KVMAGENT_BENCH_RATE` (paced requests a second per
//! connection), `KVMAGENT_BENCH_SECS` change the load; needs libvirtd like the host tests).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use kvmagent_host_tests::checks::{qemu_img, qemu_io_fill};
use kvmagent_host_tests::Host;
use serde_json::json;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const RSS_GOAL_MIB: f64 = 15.0;
const P99_GOAL_MS: f64 = 5.0;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn emit(name: &str, figure: f64, baseline: f64) {
    let ratio = if baseline > 0.0 { figure / baseline } else { f64::NAN };
    let round = |v: f64| (v * 1000.0).round() / 1000.0;
    println!("{}", json!({"name": name, "figure": round(figure), "baseline": round(baseline), "ratio": round(ratio)}));
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `RssAnon`, ...).
fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    let line = text.lines().find(|l| l.starts_with(&format!("{field}:"))).expect("status field");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("a number of kB")
}

/// User plus system CPU time of a process so far (`/proc/<pid>/stat`, fields 14 and 15).
fn cpu_time(stat: &str) -> Duration {
    let text = std::fs::read_to_string(stat).expect("stat");
    // The command name (field 2) may hold spaces; the fields after it are plain.
    let rest = &text[text.rfind(')').expect("comm") + 2..];
    let f: Vec<u64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0)).collect();
    // SAFETY: sysconf reads a constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Duration::from_secs_f64((f[11] + f[12]) as f64 / ticks)
}

/// The mappings holding most of the agent's resident memory: (KiB, file or `[anon]`), summed
/// per file from `/proc/<pid>/smaps`, largest first.
fn top_mappings(pid: u32, n: usize) -> Vec<(u64, String)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("agent smaps");
    let mut per_file = std::collections::HashMap::<String, u64>::new();
    let mut current = String::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["Rss:", kib, "kB"] => *per_file.entry(current.clone()).or_default() += kib.parse::<u64>().unwrap_or(0),
            // A mapping's header: address range, perms, offset, device, inode, then the path if any.
            [range, _, _, _, _, rest @ ..] if range.contains('-') && !range.ends_with(':') => {
                current = rest.first().map_or("[anon]".to_owned(), |p| p.to_string());
            }
            _ => {}
        }
    }
    let mut top: Vec<(u64, String)> = per_file.into_iter().map(|(file, kib)| (kib, file)).collect();
    top.sort_unstable_by(|a, b| b.cmp(a));
    top.truncate(n);
    top
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0)
}

/// Waits until the agent's RSS and thread count have not changed for 3 s in a row (start-up
/// recovery done, idle blocking threads exited), at most 60 s.
async fn wait_idle(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = (0, 0);
    let mut steady = 0;
    while steady < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = (status_kib(pid, "VmRSS"), threads(pid));
        steady = if now == last { steady + 1 } else { 0 };
        last = now;
    }
}

struct Run {
    latencies_us: Vec<u64>,
    elapsed: Duration,
    generator_cpu: Duration,
    agent_cpu: Duration,
}

impl Run {
    fn percentile_ms(&self, p: f64) -> f64 {
        assert!(!self.latencies_us.is_empty(), "no request was answered inside the window");
        let i = ((self.latencies_us.len() as f64 * p).ceil() as usize).clamp(1, self.latencies_us.len()) - 1;
        self.latencies_us[i] as f64 / 1000.0
    }

    fn cpu_share(&self, cpu: Duration) -> f64 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        cpu.as_secs_f64() * 100.0 / (self.elapsed.as_secs_f64() * cores)
    }
}

/// One keep-alive connection sending `/host/echo` until `done`: back to back (`rate` 0) or
/// `rate` a second; when each request was due, and its latency in µs from then.
async fn connection(port: u16, rate: u64, done: Arc<AtomicBool>) -> Vec<(Instant, u64)> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let mut ticks = (rate > 0).then(|| {
        // Connections start spread over one period, not all at once.
        let period = Duration::from_micros(1_000_000 / rate);
        let first = tokio::time::Instant::now() + period.mul_f64(rand_fraction());
        let mut i = tokio::time::interval_at(first, period);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        i
    });
    let mut out = Vec::new();
    while !done.load(Ordering::Relaxed) {
        let due = match ticks.as_mut() {
            Some(t) => t.tick().await.into_std(),
            None => Instant::now(),
        };
        let req = hyper::Request::post("/host/echo")
            .header("host", "127.0.0.1")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = sender.send_request(req).await.expect("echo");
        assert_eq!(resp.status(), 200, "echo status");
        resp.into_body().collect().await.expect("echo body");
        out.push((due, due.elapsed().as_micros() as u64));
    }
    out
}

fn rand_fraction() -> f64 {
    (uuid::Uuid::new_v4().as_u128() % 1_000_000) as f64 / 1_000_000.0
}

/// Loads the agent with `connections` connections until `until` resolves.
async fn load(h: &Host, connections: u64, rate: u64, until: impl std::future::Future<Output = ()>) -> Run {
    let pid = h.pid().expect("agent running");
    let done = Arc::new(AtomicBool::new(false));
    let conns: Vec<_> = (0..connections).map(|_| tokio::spawn(connection(h.port, rate, done.clone()))).collect();
    // Connections open and warm up before the measured window.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for c in &conns {
        assert!(!c.is_finished(), "a load connection failed");
    }
    let (gen0, agent0, start) = (cpu_time("/proc/self/stat"), cpu_time(&format!("/proc/{pid}/stat")), Instant::now());
    until.await;
    let elapsed = start.elapsed();
    let (gen1, agent1) = (cpu_time("/proc/self/stat"), cpu_time(&format!("/proc/{pid}/stat")));
    done.store(true, Ordering::Relaxed);
    // Only requests due inside the window count, not the warm-up's.
    let mut latencies_us = Vec::new();
    for c in conns {
        let samples = c.await.expect("load connection");
        latencies_us.extend(samples.into_iter().filter(|(due, _)| *due >= start).map(|(_, us)| us));
    }
    latencies_us.sort_unstable();
    Run { latencies_us, elapsed, generator_cpu: gen1 - gen0, agent_cpu: agent1 - agent0 }
}

fn report(label: &str, run: &Run, alone_rps: Option<f64>) -> f64 {
    let rps = run.latencies_us.len() as f64 / run.elapsed.as_secs_f64();
    emit(&format!("echo_p50_ms_{label}"), run.percentile_ms(0.50), P99_GOAL_MS);
    emit(&format!("echo_p99_ms_{label}"), run.percentile_ms(0.99), P99_GOAL_MS);
    emit(&format!("echo_requests_per_s_{label}"), rps, alone_rps.unwrap_or(rps));
    let agent = run.cpu_share(run.agent_cpu);
    emit(&format!("load_generator_cpu_percent_{label}"), run.cpu_share(run.generator_cpu), agent);
    rps
}

/// A chain of three qcow2 layers, 20 GiB virtual with about 1.75 GiB allocated, in `dir`;
/// returns the top layer.
fn chain(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("bench dir");
    let (base, middle, top) = (dir.join("base.qcow2"), dir.join("middle.qcow2"), dir.join("top.qcow2"));
    let s = |p: &Path| p.to_str().expect("utf-8 path").to_owned();
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&base), &(20 * GIB).to_string()]).expect("base");
    for i in 0..8 {
        qemu_io_fill(&base, i * 2 * GIB, 160 * MIB, 0x11).expect("fill base");
    }
    for (layer, below, byte) in [(&middle, &base, 0x22u8), (&top, &middle, 0x33u8)] {
        qemu_img(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &s(below), &s(layer)]).expect("overlay");
        for i in 0..4 {
            qemu_io_fill(layer, i * 4 * GIB + GIB + byte as u64 * MIB, 64 * MIB, byte).expect("fill overlay");
        }
    }
    top
}

/// Runs the load while `/localstorage/snapshot/offlinemerge` (fullRebase) flattens a fresh copy
/// of `top`; the window is the flatten's.
async fn during_flatten(h: &Host, top: &Path, i: usize, connections: u64, rate: u64) -> Run {
    let copy = top.with_file_name(format!("flatten-{i}.qcow2"));
    std::fs::copy(top, &copy).expect("copy of the top layer");
    let flatten = async {
        // Polled once the load is warm: the window starts with the flatten.
        let t = Instant::now();
        let body = json!({"destPath": copy, "fullRebase": true});
        let r = h.call_within("/localstorage/snapshot/offlinemerge", &body, Duration::from_secs(3600)).await;
        assert_eq!(r.expect("flatten")["success"], true, "flatten failed");
        eprintln!("flatten {i} took {:.1?}", t.elapsed());
    };
    let run = load(h, connections, rate, flatten).await;
    std::fs::remove_file(&copy).expect("remove the flattened copy");
    run
}

#[tokio::main]
async fn main() {
    let connections = env_or("KVMAGENT_BENCH_CONNECTIONS", 500);
    let secs = env_or("KVMAGENT_BENCH_SECS", 10);
    let rate = env_or("KVMAGENT_BENCH_RATE", 5);
    let h = Host::start_with_env("", &[("KVMAGENT_LOG", "info")]).await.expect("agent");
    let pid = h.pid().expect("agent running");
    wait_idle(pid).await;
    let rss = status_kib(pid, "VmRSS");
    eprintln!(
        "idle: VmRSS {rss} kB (anon {} kB, file {} kB), {} threads",
        status_kib(pid, "RssAnon"),
        status_kib(pid, "RssFile"),
        threads(pid)
    );
    for (kib, file) in top_mappings(pid, 12) {
        eprintln!("  {kib:>6} kB  {file}");
    }
    // Latency figures mean little on a host busy with other work: say how busy it was.
    eprintln!("load average: {}", std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
    emit("idle_rss_mib", rss as f64 / 1024.0, RSS_GOAL_MIB);
    // The agent's own memory; the rest of VmRSS is pages of the binary and its libraries.
    emit("idle_rss_anon_mib", status_kib(pid, "RssAnon") as f64 / 1024.0, RSS_GOAL_MIB);

    let window = tokio::time::sleep(Duration::from_secs(secs));
    let flat_out = load(&h, connections, 0, window).await;
    let alone_rps = report("flat_out", &flat_out, None);
    let paced = load(&h, connections, rate, tokio::time::sleep(Duration::from_secs(secs))).await;
    report("paced", &paced, None);
    eprintln!("after load: VmRSS {} kB, {} threads", status_kib(pid, "VmRSS"), threads(pid));

    let top = chain(&h.path("bench"));
    let flat_out = during_flatten(&h, &top, 0, connections, 0).await;
    report("flat_out_during_flatten", &flat_out, Some(alone_rps));
    let paced = during_flatten(&h, &top, 1, connections, rate).await;
    report("paced_during_flatten", &paced, None);
}
