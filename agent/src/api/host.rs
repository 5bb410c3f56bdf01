//! Placeholder: filled in by the host work.
