//! Placeholder: filled in by the native work.
