//! The failure every handler reports, and how it is put on the wire.
//!
//! Modules keep their own `thiserror` enums with precise messages (a subprocess error keeps its
//! stderr); each converts into [`AgentError`], which only adds the category the management plane
//! sees as `errorCode.code`. The envelope carries both the flat `error` string that ZStack reads
//! and the structured `errorCode` of the management API.

use schemars::JsonSchema;
use serde::Serialize;

/// What kind of failure this is, from the caller's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ErrorKind {
    /// The command is malformed or names something it may not (bad JSON, missing field, a path
    /// outside the storage roots). Nothing was changed.
    InvalidArgument,
    /// Something the command names does not exist (image, volume, domain).
    NotFound,
    /// The resource is in a state that forbids the operation (VM running, file exists, in use).
    Conflict,
    /// The operation was attempted and failed (qemu-img, libvirt, I/O).
    OperationFailed,
    /// The task's deadline passed; its work was stopped and undone.
    Timeout,
    /// `/job/cancel` stopped the task; its work was undone.
    Cancelled,
    /// A bug or an unexpected state of the agent itself.
    Internal,
}

impl ErrorKind {
    /// The management plane's `SysErrors` code for this kind.
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::Internal => "SYS.1000",
            ErrorKind::Timeout => "SYS.1001",
            ErrorKind::NotFound => "SYS.1003",
            ErrorKind::Conflict | ErrorKind::OperationFailed | ErrorKind::Cancelled => "SYS.1006",
            ErrorKind::InvalidArgument => "SYS.1007",
        }
    }
}

/// A failed command: a kind, a one-line description of what failed, and details (the why, the
/// resource, and what to do), with an optional underlying cause.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{description}: {details}")]
pub struct AgentError {
    pub kind: ErrorKind,
    pub description: String,
    pub details: String,
    pub cause: Option<Box<AgentError>>,
    /// Response fields that accompany the failure (e.g. ZStack's `inUse: true` on delete).
    pub fields: serde_json::Map<String, serde_json::Value>,
    /// The task's stop caused this failure (a child killed, a librbd call interrupted): the task
    /// runner reports the stop's reason (deadline, cancel, shutdown) in its place.
    pub stopped: bool,
}

impl AgentError {
    pub fn new(kind: ErrorKind, description: impl Into<String>, details: impl Into<String>) -> Self {
        AgentError {
            kind,
            description: description.into(),
            details: details.into(),
            cause: None,
            fields: Default::default(),
            stopped: false,
        }
    }

    pub fn invalid(details: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, "invalid command", details)
    }

    pub fn not_found(details: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, "resource not found", details)
    }

    pub fn conflict(details: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, "resource is in a conflicting state", details)
    }

    pub fn failed(description: impl Into<String>, details: impl Into<String>) -> Self {
        Self::new(ErrorKind::OperationFailed, description, details)
    }

    pub fn internal(details: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, "internal agent error", details)
    }

    /// Wraps `self` as the cause of a higher-level failure ("step X failed").
    pub fn context(self, description: impl Into<String>) -> Self {
        AgentError {
            kind: self.kind,
            description: description.into(),
            details: self.to_string(),
            fields: self.fields.clone(),
            stopped: self.stopped,
            cause: Some(Box::new(self)),
        }
    }

    /// Marks the failure as caused by the task's stop when `stopped`.
    pub fn stopped_if(mut self, stopped: bool) -> Self {
        self.stopped = stopped;
        self
    }

    /// Adds a response field to the failure envelope.
    pub fn with_field(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.fields.insert(key.to_owned(), value.into());
        self
    }

    /// The structured `errorCode` object of the envelope.
    pub fn error_code(&self) -> ErrorCode {
        ErrorCode {
            code: self.kind.code(),
            description: self.description.clone(),
            details: self.details.clone(),
            elaboration: None,
            opaque: None,
            cause: self.cause.as_ref().map(|c| Box::new(c.error_code())),
        }
    }
}

/// The management API's `ErrorCode` shape.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ErrorCode {
    pub code: &'static str,
    pub description: String,
    pub details: String,
    pub elaboration: Option<String>,
    pub opaque: Option<serde_json::Value>,
    pub cause: Option<Box<ErrorCode>>,
}

pub type AgentResult<T> = Result<T, AgentError>;
