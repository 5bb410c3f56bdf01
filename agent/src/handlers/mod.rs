//! Command handlers, one module per family of paths. Each is an async fn taking the back end it
//! needs, the task context and the typed command, and returning the typed response.

pub mod host;
