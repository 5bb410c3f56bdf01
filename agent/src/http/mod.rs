//! The control channel: the server, its path table and the task runner.

pub mod openapi;
pub mod routes;
pub mod runner;
pub mod server;
pub mod tls;
