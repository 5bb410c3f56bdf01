//! The task journal: one JSON file per task under `<state_dir>/tasks/`, rewritten atomically at
//! each state change, so that duplicate requests and `GET /task` survive a restart and the next
//! start knows which tasks were interrupted.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::atomic_file;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRecord {
    pub task_id: String,
    pub path: String,
    pub callback_url: Option<String>,
    /// The request body as received (kept verbatim, even when it is not valid JSON).
    pub command: String,
    pub state: TaskState,
    /// The response envelope, once finished: kept as its JSON text, which holds it in the
    /// fewest bytes (replays and status requests, the only readers, are rare).
    pub result: Option<Box<RawValue>>,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    /// The result reached the callback URL (or there was none to reach).
    pub delivered: bool,
}

impl TaskRecord {
    /// The stored result as a value (it was one when stored).
    pub fn result_value(&self) -> Option<Value> {
        self.result.as_ref().map(|raw| serde_json::from_str(raw.get()).unwrap_or(Value::Null))
    }

    /// The bytes the record holds: its strings and its result as JSON.
    pub fn bytes(&self) -> usize {
        let result = self.result.as_ref().map_or(0, |v| v.get().len());
        self.task_id.len()
            + self.path.len()
            + self.callback_url.as_ref().map_or(0, String::len)
            + self.command.len()
            + result
    }
}

#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    pub fn open(state_dir: &Path) -> std::io::Result<Journal> {
        let dir = state_dir.join("tasks");
        std::fs::create_dir_all(&dir)?;
        Ok(Journal { dir })
    }

    fn file(&self, task_id: &str) -> PathBuf {
        // task ids are validated as 32 hex characters before they reach the journal.
        self.dir.join(format!("{task_id}.json"))
    }

    pub fn save(&self, record: &TaskRecord) -> std::io::Result<()> {
        atomic_file::write_json(&self.file(&record.task_id), record)
    }

    pub fn remove(&self, task_id: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.file(task_id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every readable record. A record that cannot be parsed is logged and skipped rather than
    /// stopping the agent from starting.
    pub fn load_all(&self) -> std::io::Result<Vec<TaskRecord>> {
        let mut records = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match atomic_file::read_json::<TaskRecord>(&path) {
                Ok(Some(r)) => records.push(r),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "skipping unreadable task record")
                }
            }
        }
        Ok(records)
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
