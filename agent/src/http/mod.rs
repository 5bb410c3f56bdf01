//! The HTTP side: the server, its routes, the task runner, and outbound posts.

pub mod client;
pub mod progress;
pub mod routes;
pub mod runner;
pub mod server;
pub mod tls;
