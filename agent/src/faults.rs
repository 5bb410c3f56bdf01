//! The faults the fakes of external systems inject, shared so that one count runs over every
//! call the agent makes to them (the hypervisor and qemu-img): a named call can be made to fail,
//! and the agent can be "killed" at the n-th call: that call never returns and
//! [`Faults::killed`] fires, so the test drops the operation mid-way, as SIGKILL would leave it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;

pub struct Faults {
    calls: AtomicUsize,
    kill_at: AtomicUsize,
    killed: Notify,
    failing: Mutex<HashSet<&'static str>>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            calls: AtomicUsize::new(0),
            kill_at: AtomicUsize::new(usize::MAX),
            killed: Notify::new(),
            failing: Mutex::default(),
        }
    }
}

impl Faults {
    /// Makes every later `call` fail.
    pub fn fail(&self, call: &'static str) {
        self.failing.lock().unwrap().insert(call);
    }

    /// Lets `call` succeed again.
    pub fn heal(&self, call: &'static str) {
        self.failing.lock().unwrap().remove(call);
    }

    /// The agent dies at the `n`-th call from now (1 = the next one).
    pub fn kill_at(&self, n: usize) {
        self.kill_at.store(self.calls.load(Ordering::SeqCst) + n, Ordering::SeqCst);
    }

    /// Never kills again (a restarted agent).
    pub fn revive(&self) {
        self.kill_at.store(usize::MAX, Ordering::SeqCst);
    }

    /// Resolves once the agent was killed.
    pub async fn killed(&self) {
        self.killed.notified().await
    }

    /// Counts one call: never returns if the agent dies here; `true` if the call must fail.
    pub async fn enter(&self, call: &'static str) -> bool {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.kill_at.load(Ordering::SeqCst) {
            self.killed.notify_one();
            std::future::pending::<()>().await;
        }
        self.failing.lock().unwrap().contains(call)
    }
}
