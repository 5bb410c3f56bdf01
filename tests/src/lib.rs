//! Harness for host-level tests (filled in below).
