//! Tasks: one per async command, tracked from arrival to delivered result.

pub mod ctx;
pub mod journal;
pub mod registry;

pub use ctx::{ProgressSink, TaskCtx};
