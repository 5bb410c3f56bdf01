//! Placeholder: filled in by the localstorage work.
