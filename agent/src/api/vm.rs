//! Placeholder: filled in by the vm work.
