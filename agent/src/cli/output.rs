//! How `kvmagent call` and the `vm` shorthands print a result.

use std::process::ExitCode;

use serde_json::Value;

/// Prints `result` (pretty JSON with `json`, else a table for inventories and JSON for the
/// rest) and answers the exit code: 0 success, 1 a failed command (its error on stderr).
pub fn print_result(result: &Value, json: bool) -> ExitCode {
    let failed = result["success"] == Value::Bool(false);
    if json {
        println!("{}", serde_json::to_string_pretty(result).unwrap_or_default());
    } else if failed {
        eprintln!("failed: {}", result["error"].as_str().unwrap_or("(no error text)"));
    } else if let Some(rows) = inventory_rows(result) {
        print!("{}", table(&rows));
    } else {
        println!("{}", serde_json::to_string_pretty(result).unwrap_or_default());
    }
    if failed {
        let code = &result["errorCode"];
        eprintln!(
            "error code: {} {}",
            code["code"].as_str().unwrap_or("-"),
            code["description"].as_str().or(code["details"].as_str()).unwrap_or("")
        );
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

const HEADER: [&str; 4] = ["UUID", "NAME", "STATE", "ROOT VOLUME"];

/// One row per VM inventory: a `VmInstanceInventory` answer, or the `inventories` of a clone
/// (`{inventory}` or `{uuid, name, error, message}` for a clone that failed).
pub fn inventory_rows(result: &Value) -> Option<Vec<[String; 4]>> {
    let row = |inv: &Value| -> [String; 4] {
        let inv = inv.get("inventory").unwrap_or(inv);
        let text = |k: &str| inv[k].as_str().unwrap_or("-").to_owned();
        let state = match inv["error"].as_str().or(inv["message"].as_str()) {
            Some(_) => format!("FAILED: {}", inv["message"].as_str().or(inv["error"].as_str()).unwrap_or_default()),
            None => text("state"),
        };
        let root = (inv["allVolumes"].as_array().into_iter().flatten())
            .find(|v| v["type"] == "Root")
            .and_then(|v| v["installPath"].as_str())
            .unwrap_or("-")
            .to_owned();
        [text("uuid"), text("name"), state, root]
    };
    if let Some(list) = result["inventories"].as_array() {
        return Some(list.iter().map(row).collect());
    }
    (result.get("uuid").is_some() && result.get("allVolumes").is_some()).then(|| vec![row(result)])
}

/// Left-aligned columns, two spaces apart.
pub fn table(rows: &[[String; 4]]) -> String {
    let mut widths = HEADER.map(str::len);
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 4]| {
        let padded: Vec<String> = cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(HEADER);
    for r in rows {
        out.push_str(&line([&r[0], &r[1], &r[2], &r[3]]));
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn clone_inventories_become_rows_with_failed_clones_named() {
        let result = json!({"success": true, "inventories": [
            {"inventory": {"uuid": "a", "name": "web-1", "state": "Running",
                           "allVolumes": [{"type": "Data", "installPath": "/d"}, {"type": "Root", "installPath": "/r"}]}},
            {"uuid": "b", "name": "web-2", "error": "x", "message": "no space"}]});
        let rows = inventory_rows(&result).unwrap();
        assert_eq!(rows[0], ["a", "web-1", "Running", "/r"].map(String::from));
        assert_eq!(rows[1], ["b", "web-2", "FAILED: no space", "-"].map(String::from));
        let text = table(&rows);
        assert!(text.starts_with("UUID  NAME   STATE"), "{text}");
        assert_eq!(text.lines().count(), 3);
    }

    #[test]
    fn other_answers_are_not_tables() {
        assert!(inventory_rows(&json!({"success": true, "totalBytesToAdd": 5})).is_none());
    }
}
