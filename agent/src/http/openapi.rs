//! The OpenAPI 3.1 document of the native API, generated from the wire types so that it cannot
//! drift from what the agent decodes and answers: served at `GET /api`, printed by
//! `kvmagent openapi`, checked in as `agent/openapi.json` (a unit test compares).

use std::borrow::Cow;

use schemars::generate::SchemaSettings;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde_json::{json, Map, Value};

use crate::error::ErrorCode;
use crate::tasks::registry::TaskStatus;
use crate::wire::inventory::VmInstanceInventory;
use crate::wire::native::*;
use crate::wire::CommonFields;

/// Where a task's result can be read when no callback took it.
pub const TASK_STATUS_PATH: &str = "/task/{taskuuid}";

/// One native path: the schema of its command and of its result (the success envelope's own
/// fields).
struct Operation {
    path: &'static str,
    command: fn(&mut SchemaGenerator) -> Schema,
    command_name: fn() -> Cow<'static, str>,
    result: fn(&mut SchemaGenerator) -> Schema,
}

fn op<Cmd: JsonSchema, Rsp: JsonSchema>(path: &'static str) -> Operation {
    Operation {
        path,
        command: |g| g.subschema_for::<Cmd>(),
        command_name: Cmd::schema_name,
        result: |g| g.subschema_for::<Rsp>(),
    }
}

/// The native paths, as `routes::NATIVE_ROUTES` serves them (a test keeps the two equal).
fn operations() -> Vec<Operation> {
    vec![
        op::<CreateVmCmd, VmInstanceInventory>("/vm/create"),
        op::<ChangeImageCmd, VmInstanceInventory>("/vm/changeimage"),
        op::<CloneVmCmd, CloneVmRsp>("/vm/clone"),
        Operation {
            path: "/vm/flatten",
            command: |g| g.subschema_for::<FlattenVmCmd>(),
            command_name: FlattenVmCmd::schema_name,
            result: |g| {
                let (estimate, inventory) =
                    (g.subschema_for::<FlattenEstimateRsp>(), g.subschema_for::<VmInstanceInventory>());
                json_schema!({
                    "description": "With `dryRun`, what the flatten would add; otherwise the VM's inventory.",
                    "oneOf": [estimate, inventory],
                })
            },
        },
        op::<TakeSnapshotGroupCmd, SnapshotGroup>("/vm/snapshotgroup/take"),
        op::<SnapshotGroupRef, SnapshotGroup>("/vm/snapshotgroup/get"),
        op::<CreateFromSnapshotCmd, VmInstanceInventory>("/vm/createfromsnapshot"),
        op::<BackupVmCmd, BackupVmRsp>("/vm/backup"),
        op::<CreateFromBackupCmd, VmInstanceInventory>("/vm/createfrombackup"),
        op::<CacheImageCmd, CacheImageRsp>("/image/cache"),
    ]
}

/// The body posted to `callbackurl` (and kept as a task's `result`): the result's fields with
/// `success: true`, or a failure.
fn envelope(result: Schema) -> Value {
    json!({"oneOf": [
        {"allOf": [result, {
            "type": "object",
            "properties": {"success": {"const": true}, "error": {"type": "null"}},
            "required": ["success", "error"],
        }]},
        {"$ref": "#/components/schemas/Failure"},
    ]})
}

fn failure(g: &mut SchemaGenerator) -> Value {
    json!({
        "description": "A failed command: `error` says what failed and what to do; `errorCode` is the management plane's ErrorCode.",
        "type": "object",
        "properties": {
            "success": {"const": false},
            "error": {"type": "string"},
            "errorCode": g.subschema_for::<ErrorCode>(),
        },
        // A task the journal could not record is refused without an `errorCode`.
        "required": ["success", "error"],
    })
}

fn path_item(op: &Operation, g: &mut SchemaGenerator) -> Value {
    let command = (op.command)(g);
    let result = envelope((op.result)(g));
    let name = op.path.trim_start_matches('/').replace('/', "_");
    json!({"post": {
        "operationId": name,
        "description": "Asynchronous: answered at once with an empty 200; the result is posted to `callbackurl` and kept at `GET /task/{taskuuid}`. The command's fields are below; see the README for what they do.",
        "parameters": [
            {"$ref": "#/components/parameters/taskuuid"},
            {"$ref": "#/components/parameters/callbackurl"},
        ],
        "requestBody": {"required": true, "content": {"application/json": {"schema": command}}},
        "responses": {
            "200": {"description": "Taken (an empty body): the task runs, or ran already under this taskuuid."},
            "default": {
                "description": "Refused before it ran (bad headers, body too large, agent busy or shutting down).",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Failure"}}},
            },
        },
        "callbacks": {"result": {"{$request.header.callbackurl}": {"post": {
            "description": "The task's result, with the `taskuuid` header of the command.",
            "requestBody": {"required": true, "content": {"application/json": {"schema": result}}},
            "responses": {"200": {"description": "Delivered; the agent retries until it is."}},
        }}}},
    }})
}

fn task_status_item(g: &mut SchemaGenerator) -> Value {
    json!({"get": {
        "operationId": "task_status",
        "description": "A task's state (`running`, `succeeded`, `failed`, `cancelled`), progress and, once it ended, `result`: the body posted to its callback.",
        "parameters": [{"$ref": "#/components/parameters/taskuuid_path"}],
        "responses": {
            "200": {"description": "The task.", "content": {"application/json": {"schema": g.subschema_for::<TaskStatus>()}}},
            "404": {
                "description": "No such task is known (results are kept for a day).",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Failure"}}},
            },
        },
    }})
}

fn parameters() -> Value {
    let task_id = json!({"type": "string", "pattern": "^[0-9a-fA-F]{32}$"});
    json!({
        "taskuuid": {"name": "taskuuid", "in": "header", "required": true, "schema": task_id,
                     "description": "The task's id; a command sent again with the same id is not run twice."},
        "callbackurl": {"name": "callbackurl", "in": "header", "required": false, "schema": {"type": "string", "format": "uri"},
                        "description": "Where the result is POSTed; without it, poll `GET /task/{taskuuid}`."},
        "taskuuid_path": {"name": "taskuuid", "in": "path", "required": true, "schema": task_id},
    })
}

/// The document.
pub fn document() -> Value {
    let mut g = SchemaSettings::draft2020_12()
        .with(|s| {
            s.definitions_path = "/components/schemas".into();
            s.meta_schema = None;
        })
        .into_generator();
    let mut paths = Map::new();
    for op in operations() {
        paths.insert(op.path.into(), path_item(&op, &mut g));
    }
    paths.insert(TASK_STATUS_PATH.into(), task_status_item(&mut g));
    let failure = failure(&mut g);
    let mut schemas = g.take_definitions(true);
    schemas.insert("Failure".into(), failure);
    // The fields any command may carry besides its own, which the native decoder sets aside
    // before it refuses unknown fields.
    let common = g.root_schema_for::<CommonFields>();
    let common = common.get("properties").and_then(Value::as_object).cloned().unwrap_or_default();
    for op in operations() {
        let properties = schemas.get_mut(&*(op.command_name)()).and_then(|s| s.get_mut("properties"));
        if let Some(Value::Object(properties)) = properties {
            properties.extend(common.clone());
        }
    }
    json!({
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {
            "title": "kvmagent native API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The agent's own one-call operations (README, \"Talking to it\"). Every path is POSTed a JSON command with the headers `taskuuid` and `callbackurl`; unknown fields are refused by name. The agent also serves ZStack's paths (not described here), `GET /metrics`, `GET /recovery` and this document at `GET /api`.",
        },
        "paths": paths,
        "components": {"schemas": schemas, "parameters": parameters()},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::decode_native;
    use crate::wire::native::NativeCommand;

    #[test]
    fn the_checked_in_document_is_current() {
        let checked_in: Value =
            serde_json::from_str(include_str!("../../openapi.json")).expect("agent/openapi.json is JSON");
        assert!(
            checked_in == document(),
            "agent/openapi.json is not the document the types make: run `cargo run -p kvmagent -- openapi > agent/openapi.json`"
        );
    }

    #[test]
    fn the_paths_are_the_native_routes() {
        let doc = document();
        let documented: Vec<&str> =
            doc["paths"].as_object().unwrap().keys().map(String::as_str).filter(|p| *p != TASK_STATUS_PATH).collect();
        let mut served: Vec<&str> = super::super::routes::NATIVE_ROUTES.iter().map(|r| r.path).collect();
        served.sort_unstable();
        assert_eq!(documented, served);
    }

    #[test]
    fn every_reference_resolves() {
        fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
            match v {
                Value::Object(m) => {
                    out.extend(m.get("$ref").and_then(Value::as_str));
                    m.values().for_each(|v| refs(v, out));
                }
                Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let doc = document();
        let mut found = Vec::new();
        refs(&doc, &mut found);
        for r in found {
            let pointer = r.strip_prefix('#').unwrap_or_else(|| panic!("{r} is not local"));
            assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
        }
    }

    /// Whether `v` fits `schema`, for the keywords the generated schemas use (no validator
    /// crate: this covers what the decoder checks — types, enums, required and unknown fields).
    fn fits(doc: &Value, schema: &Value, v: &Value) -> bool {
        let Some(s) = schema.as_object() else { return schema != &Value::Bool(false) };
        if let Some(r) = s.get("$ref").and_then(Value::as_str) {
            if !fits(doc, doc.pointer(&r[1..]).expect("a resolvable $ref"), v) {
                return false;
            }
        }
        let of = |key: &str| s.get(key).and_then(Value::as_array).cloned().unwrap_or_default();
        let type_ok = |t: &Value| match t.as_str() {
            Some("object") => v.is_object(),
            Some("array") => v.is_array(),
            Some("string") => v.is_string(),
            Some("boolean") => v.is_boolean(),
            Some("integer") => v.is_i64() || v.is_u64(),
            Some("number") => v.is_number(),
            Some("null") => v.is_null(),
            _ => true,
        };
        let types_ok = match s.get("type") {
            Some(Value::Array(ts)) => ts.iter().any(type_ok),
            Some(t) => type_ok(t),
            None => true,
        };
        let minimum_ok = s.get("minimum").and_then(Value::as_f64).map_or(true, |m| v.as_f64().map_or(true, |x| x >= m));
        let enum_ok = s.get("enum").and_then(Value::as_array).map_or(true, |e| e.contains(v));
        let const_ok = s.get("const").map_or(true, |c| c == v);
        let object_ok = v.as_object().map_or(true, |o| {
            let props = s.get("properties").and_then(Value::as_object).cloned().unwrap_or_default();
            of("required").iter().all(|r| o.contains_key(r.as_str().unwrap_or_default()))
                && o.iter().all(|(k, x)| match props.get(k) {
                    Some(p) => fits(doc, p, x),
                    None => s.get("additionalProperties").map_or(true, |a| fits(doc, a, x)),
                })
        });
        let items_ok =
            v.as_array().map_or(true, |a| s.get("items").map_or(true, |i| a.iter().all(|x| fits(doc, i, x))));
        types_ok
            && minimum_ok
            && enum_ok
            && const_ok
            && object_ok
            && items_ok
            && of("allOf").iter().all(|b| fits(doc, b, v))
            && (of("anyOf").is_empty() || of("anyOf").iter().any(|b| fits(doc, b, v)))
            && (of("oneOf").is_empty() || of("oneOf").iter().filter(|b| fits(doc, b, v)).count() == 1)
    }

    /// The document's request schema of `path` takes `body` exactly when the decoder does.
    fn agree<T: NativeCommand + std::fmt::Debug>(path: &str, body: Value) {
        let doc = document();
        let schema = &doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"];
        let decoded = decode_native::<T>(&body);
        assert_eq!(fits(&doc, schema, &body), decoded.is_ok(), "{path} {body}: the decoder says {decoded:?}");
    }

    /// The native command bodies of README's `curl` examples (`localhost:7070/<path>` ... `-d
    /// '<json>'`), the shell's `'$R'` (the storage root) filled in.
    fn readme_examples() -> Vec<(String, Value)> {
        let readme = include_str!("../../../README.md");
        let mut out = Vec::new();
        for block in readme.split("```sh").skip(1).filter_map(|b| b.split("```").next()) {
            for part in block.split("localhost:7070").skip(1) {
                let path: String = part.chars().take_while(|c| !c.is_whitespace()).collect();
                let Some((_, body)) = part.split_once("-d '") else { continue };
                let body = body.split("\ncurl ").next().unwrap_or(body).trim_end();
                let body = body.replace("'$R'", "/var/lib/kvmagent/local");
                let body = body.strip_suffix('\'').unwrap_or(&body);
                let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("README's {path} example: {e}"));
                out.push((path, json));
            }
        }
        out
    }

    #[test]
    fn the_readmes_examples_of_native_commands_fit_the_schema() {
        let doc = document();
        let native: Vec<(String, Value)> =
            readme_examples().into_iter().filter(|(p, _)| doc["paths"].get(p.as_str()).is_some()).collect();
        assert!(native.iter().any(|(p, _)| p == "/vm/create") && native.len() >= 2, "{native:?}");
        for (path, body) in native {
            let schema = &doc["paths"][&path]["post"]["requestBody"]["content"]["application/json"]["schema"];
            assert!(fits(&doc, schema, &body), "README's {path} example does not fit the schema: {body}");
            let mut typo = body.clone();
            typo["strateggy"] = json!("InstantStart");
            assert!(!fits(&doc, schema, &typo), "{path}: the schema refuses an unknown field");
        }
    }

    #[test]
    fn the_schemas_take_and_refuse_what_the_decoder_does() {
        let common =
            json!({"threadContext": {"api": "x"}, "taskContext": {"__messagetimeout__": 5}, "kvmHostAddons": {}});
        let root = json!({"volumeUuid": "a", "installPath": "/r/a", "size": 1});
        let with_common = |mut body: Value| {
            body.as_object_mut().unwrap().extend(common.as_object().unwrap().clone());
            body
        };
        for body in [
            json!({"vm": {"vmName": null, "bootDev": "hd", "anyStartVmField": 1}, "rootVolume": root}),
            with_common(json!({"vm": {}, "rootVolume": root, "strategy": "JustCreate", "firmware": "uefi-secure"})),
            json!({"vm": {}, "rootVolume": root, "dataVolumes": [{"volumeUuid": "d", "installPath": "/r/d", "bus": "scsi", "iotune": {"readBytesSec": 7}}]}),
            json!({"vm": {}, "rootVolume": root, "imageUrl": "/i"}),
            json!({"vm": {}, "rootVolume": {"volumeUuid": "a", "installPath": "/r/a", "bus": "usb"}}),
            json!({"vm": {}, "rootVolume": {"volumeUuid": "a", "installPath": "/r/a", "iothread": -1}}),
            json!({"vm": {}, "rootVolume": {"volumeUuid": "a", "installPath": "/r/a", "iotune": {"total_bytes_sec": 1}}}),
            json!({"vm": {}, "rootVolume": root, "cpuMode": "max"}),
            json!({"vm": {}}),
            json!({"rootVolume": root}),
        ] {
            agree::<CreateVmCmd>("/vm/create", body);
        }
        for body in [
            json!({"vmUuid": "v", "names": ["a"], "quiesce": "required", "cloudInit": {"sshKeys": ["k"]}}),
            json!({"vmUuid": "v", "names": ["a"], "linked": true}),
            json!({"vmUuid": "v", "clones": [{"rootUuid": "x"}]}),
            json!({"vmUuid": "v", "cloudInit": {"hostnme": "a"}}),
            json!({"vmUuid": "v", "quiesce": true}),
        ] {
            agree::<CloneVmCmd>("/vm/clone", body);
        }
        agree::<FlattenVmCmd>("/vm/flatten", with_common(json!({"vmUuid": "v", "dryRun": true})));
        agree::<FlattenVmCmd>("/vm/flatten", json!({"vmUuid": "v", "dryrun": true}));
        for body in [
            with_common(
                json!({"groupUuid": "g", "provisioning": "thick", "vm": {"cpuNum": 2}, "rootVolume": {"installPath": "/r/n"}}),
            ),
            json!({"groupUuid": "g", "provisioning": "thin", "bootloader": "uefi"}),
            json!({"groupUuid": "g", "rootVolume": {"size": 1}}),
            json!({"groupUuid": "g", "cloudInit": {"network": [{"mac": "x", "ip": 1}]}}),
        ] {
            agree::<CreateFromSnapshotCmd>("/vm/createfromsnapshot", body);
        }
        agree::<CreateFromBackupCmd>(
            "/vm/createfrombackup",
            json!({"groupUuid": "g", "point": 1, "strategy": "CreateStopped"}),
        );
        agree::<CreateFromBackupCmd>(
            "/vm/createfrombackup",
            json!({"groupUuid": "g", "point": 0, "provisioning": "thin"}),
        );
        agree::<BackupVmCmd>("/vm/backup", json!({"vmUuid": "v", "mode": "incremental", "groupUuid": "g"}));
        agree::<BackupVmCmd>("/vm/backup", json!({"vmUuid": "v", "mode": "full", "compress": true}));
        agree::<CacheImageCmd>("/image/cache", json!({"url": "http://h/i", "sha256": "00", "installPath": "/r/i"}));
        agree::<CacheImageCmd>(
            "/image/cache",
            json!({"url": "http://h/i", "sha256": "00", "installPath": "/r/i", "md5sum": "x"}),
        );
        agree::<SnapshotGroupRef>("/vm/snapshotgroup/get", json!({}));
    }
}
