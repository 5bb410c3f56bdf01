//! libvirt's RPC protocol, spoken by the agent itself over the daemon's unix socket (instead of
//! linking libvirt): XDR encoding, the connection with its reply dispatch, and the procedures
//! the agent calls.

pub mod client;
pub mod procedures;
pub mod xdr;

pub use client::Connection;
pub use procedures::{DeviceCall, Domain};
