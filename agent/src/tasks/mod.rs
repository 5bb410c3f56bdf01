//! Tasks: one per async command, tracked from arrival to delivered result.

pub mod ctx;

pub use ctx::{ProgressSink, TaskCtx};
