//! Why and when a task must stop: `/job/cancel`, its deadline, or agent shutdown.
//!
//! Long work (a `qemu-img` child, a block job poll loop) selects on [`Stop::stopped`] and, once
//! fired, undoes what it made before returning [`Stop::error`].

use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;

use crate::error::{AgentError, ErrorKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Cancelled,
    DeadlineExceeded,
    ShuttingDown,
}

/// An error that a stop can cause: a task then reports why it stopped rather than the error.
pub trait Stoppable: Into<AgentError> {
    fn was_stopped(&self) -> bool;
}

/// A cloneable stop signal; the first reason given wins.
#[derive(Debug, Clone, Default)]
pub struct Stop {
    token: CancellationToken,
    reason: Arc<OnceLock<StopReason>>,
}

impl Stop {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn fire(&self, reason: StopReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    pub fn reason(&self) -> Option<StopReason> {
        self.reason.get().copied()
    }

    pub fn is_stopped(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once the signal fires.
    pub async fn stopped(&self) {
        self.token.cancelled().await
    }

    /// Fails with the stop's error if it has fired: a cheap check between steps.
    pub fn check(&self, what: &str) -> Result<(), AgentError> {
        match self.reason() {
            None => Ok(()),
            Some(r) => Err(Self::error_for(r, what)),
        }
    }

    /// The error a task reports when it was stopped while doing `what`.
    pub fn error(&self, what: &str) -> AgentError {
        Self::error_for(self.reason().unwrap_or(StopReason::Cancelled), what)
    }

    /// `e` as the task reports it: the stop's error if the stop caused `e`, else `e` itself.
    pub fn or_error<E: Stoppable>(&self, e: E, what: &str) -> AgentError {
        if e.was_stopped() {
            self.error(what)
        } else {
            e.into()
        }
    }

    fn error_for(reason: StopReason, what: &str) -> AgentError {
        match reason {
            StopReason::Cancelled => AgentError::new(
                ErrorKind::Cancelled,
                "task cancelled",
                format!("{what} was cancelled by /job/cancel; its partial results were removed"),
            ),
            StopReason::DeadlineExceeded => AgentError::new(
                ErrorKind::Timeout,
                "task deadline exceeded",
                format!("{what} did not finish before the deadline in taskContext; its partial results were removed"),
            ),
            StopReason::ShuttingDown => AgentError::new(
                ErrorKind::Cancelled,
                "agent shutting down",
                format!("{what} was stopped because the agent is shutting down; retry after it restarts"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ceph::rbd::RbdError;

    #[test]
    fn an_error_the_stop_caused_reports_the_stop_and_any_other_error_itself() {
        let stop = Stop::new();
        stop.fire(StopReason::DeadlineExceeded);
        stop.fire(StopReason::Cancelled);
        let e = stop.or_error(RbdError::Stopped { what: "info rbd/a".into() }, "flattening the image");
        assert_eq!(e.kind, ErrorKind::Timeout, "the first reason wins: {e:?}");
        assert!(e.to_string().contains("deadline"), "{e}");
        let other = RbdError::Refused { what: "info rbd/a".into(), reason: "no cluster".into() };
        let e = stop.or_error(other, "flattening the image");
        assert!(e.to_string().contains("no cluster") && e.kind != ErrorKind::Timeout, "{e}");
    }
}
