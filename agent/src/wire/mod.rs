//! The wire API: typed command and response structs, one module per family of paths, and the
//! decoding rules every command shares (unknown keys ignored, missing optional keys defaulted, a
//! missing required key or a wrong type reported with its JSON path).

pub mod ceph;
pub mod cloud_init;
pub mod host;
pub mod inventory;
pub mod localstorage;
pub mod native;
pub mod network;
pub mod vm;
pub mod vm_devices;
pub mod vm_model;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::AgentError;

/// Fields any command may carry next to its own (ZStack adds them to every body).
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct CommonFields {
    pub thread_context: Map<String, Value>,
    pub task_context: Map<String, Value>,
    pub kvm_host_addons: Map<String, Value>,
}

impl CommonFields {
    /// `threadContext.api`: the id `/job/cancel` names.
    pub fn api_id(&self) -> Option<&str> {
        self.thread_context.get("api").and_then(Value::as_str).filter(|s| !s.is_empty())
    }

    /// Milliseconds from `taskContext` (`__messagetimeout__`, `__messagedeadline__`), which the
    /// management plane sends as numbers or as decimal strings.
    pub fn task_context_ms(&self, key: &str) -> Option<u64> {
        match self.task_context.get(key)? {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }
}

/// Parses a request body into a JSON object. An empty body counts as `{}` (ZStack sends empty
/// bodies to some paths).
pub fn parse_body(body: &[u8]) -> Result<Value, AgentError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| AgentError::invalid(format!("the request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(AgentError::invalid("the request body must be a JSON object"));
    }
    Ok(v)
}

/// Decodes a command, naming the offending field's path on error.
pub fn decode<T: DeserializeOwned>(body: &Value) -> Result<T, AgentError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            AgentError::invalid(format!("bad command: {inner}"))
        } else {
            AgentError::invalid(format!("bad field `{path}`: {inner}"))
        }
    })
}

/// Decodes a native command strictly: the fields every command may carry ([`CommonFields`])
/// are set aside, and any other key the command does not name is refused, by its path.
pub fn decode_native<T: native::NativeCommand>(body: &Value) -> Result<T, AgentError> {
    let mut own = body.clone();
    if let Value::Object(m) = &mut own {
        for common in ["threadContext", "taskContext", "kvmHostAddons"] {
            m.remove(common);
        }
    }
    let cmd: T = decode(&own)?;
    match cmd.unknown_keys().first() {
        Some(key) => Err(AgentError::invalid(format!(
            "bad field `{key}`: this command has no such field; see the README for its fields"
        ))),
        None => Ok(cmd),
    }
}

/// The response envelope: `{"success": true, "error": null, ...fields}` or
/// `{"success": false, "error": "...", "errorCode": {...}}`.
pub fn envelope(result: &Result<Value, AgentError>) -> Value {
    match result {
        Ok(fields) => {
            let mut m = match fields {
                Value::Object(m) => m.clone(),
                Value::Null => Map::new(),
                other => {
                    let mut m = Map::new();
                    m.insert("result".into(), other.clone());
                    m
                }
            };
            m.insert("success".into(), Value::Bool(true));
            m.insert("error".into(), Value::Null);
            Value::Object(m)
        }
        Err(e) => {
            let mut m = e.fields.clone();
            m.insert("success".into(), Value::Bool(false));
            m.insert("error".into(), Value::String(e.to_string()));
            m.insert("errorCode".into(), serde_json::to_value(e.error_code()).unwrap_or(Value::Null));
            let mut v = Value::Object(m);
            bound_text(&mut v);
            v
        }
    }
}

/// The most an error's text keeps of any one string (it may echo what the command sent; the
/// journal keeps results for a day).
pub const MAX_ERROR_TEXT: usize = 4096;

/// Cuts every string in `v` to [`MAX_ERROR_TEXT`] bytes (on a character boundary), saying so.
fn bound_text(v: &mut Value) {
    match v {
        Value::String(s) if s.len() > MAX_ERROR_TEXT => {
            let mut end = MAX_ERROR_TEXT;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            let cut = s.len() - end;
            s.truncate(end);
            s.push_str(&format!("... ({cut} bytes not shown)"));
        }
        Value::Array(a) => a.iter_mut().for_each(bound_text),
        Value::Object(m) => m.values_mut().for_each(bound_text),
        _ => {}
    }
}

/// An empty command or successful response body.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Empty {}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)]
    struct Cmd {
        install_url: String,
        #[serde(default)]
        size: u64,
    }

    #[test]
    fn missing_field_is_named() {
        let e = decode::<Cmd>(&serde_json::json!({"size": 1})).unwrap_err();
        assert!(e.to_string().contains("installUrl"), "{e}");
    }

    #[test]
    fn wrong_type_names_path() {
        let e = decode::<Cmd>(&serde_json::json!({"installUrl": "/x", "size": "big"})).unwrap_err();
        assert!(e.to_string().contains("`size`"), "{e}");
    }

    #[test]
    fn an_error_echoing_a_huge_value_is_cut() {
        let huge = "é".repeat(1 << 20);
        let v = envelope(&Err(AgentError::invalid(format!("path {huge} is outside"))));
        let text = v.to_string();
        assert!(text.len() < 4 * MAX_ERROR_TEXT, "{} bytes", text.len());
        assert!(v["error"].as_str().unwrap().ends_with("bytes not shown)"));
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let c: Cmd = decode(&serde_json::json!({"installUrl": "/x", "whatever": [1]})).unwrap();
        assert_eq!(c.size, 0);
    }

    #[test]
    fn bodies_that_are_not_objects_are_refused() {
        assert!(parse_body(b"[1,2]").is_err());
        assert!(parse_body(b"{bad").is_err());
        assert!(parse_body(b"").unwrap().is_object());
    }

    #[test]
    fn task_context_accepts_strings_and_numbers() {
        let c: CommonFields = serde_json::from_value(serde_json::json!({
            "taskContext": {"__messagetimeout__": "5000", "__messagedeadline__": 17}
        }))
        .unwrap();
        assert_eq!(c.task_context_ms("__messagetimeout__"), Some(5000));
        assert_eq!(c.task_context_ms("__messagedeadline__"), Some(17));
    }

    #[test]
    fn failure_envelope_has_error_code() {
        let v = envelope(&Err(AgentError::invalid("x")));
        assert_eq!(v["success"], false);
        assert_eq!(v["errorCode"]["code"], "SYS.1007");
    }
}
