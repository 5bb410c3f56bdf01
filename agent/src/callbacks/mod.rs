//! What the agent sends to management nodes on its own: task results to `callbackurl` and
//! progress reports to `sendCommandUrl`. Below the HTTP server: the application state owns the
//! poster, the server and the task runner use it.

pub mod client;
pub mod progress;
