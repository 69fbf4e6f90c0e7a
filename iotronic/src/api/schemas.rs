//! JSON Schemas of the request bodies, for `/v1/openapi.json`. Written by hand from the body
//! types (which deny unknown fields, hence `additionalProperties: false`): they say what to
//! send; the handlers still check everything (names, ranges, ids that must exist) and answer
//! 400 or 404 in the one error shape. The tests check that every POST/PUT/PATCH route of the
//! table has a schema or is known to take no body.

use serde_json::{Value, json};

/// A name as `auth::check_name` takes it (the pattern is the ASCII part of what it accepts).
fn name() -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[A-Za-z0-9_. -]+$"})
}

fn string() -> Value {
    json!({"type": "string"})
}

fn object(required: &[&str], properties: Value) -> Value {
    json!({"type": "object", "required": required, "properties": properties, "additionalProperties": false})
}

/// A board action: `{action, parameters, queue}`.
fn action(actions: &[&str]) -> Value {
    object(
        &["action"],
        json!({"action": {"enum": actions}, "parameters": {"type": "object"}, "queue": {"type": "boolean"}}),
    )
}

fn location() -> Value {
    let coordinate = json!({"type": ["number", "string"]});
    json!({"type": "array", "minItems": 1, "maxItems": 1, "items": object(
        &["latitude", "longitude", "altitude"],
        json!({"latitude": coordinate, "longitude": coordinate, "altitude": coordinate}))})
}

fn grants() -> Value {
    json!({"type": "object", "additionalProperties": false, "properties": {
        "gpio": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 64}},
        "i2c": {"type": "array", "items": {"type": "object", "required": ["bus", "address"], "properties": {
            "bus": {"type": "integer", "minimum": 0, "maximum": 255},
            "address": {"type": "integer", "minimum": 0, "maximum": 127}}}}}})
}

/// A lease's end: `duration` (seconds from now) or `until` (Unix seconds), exactly one.
fn lease_end(boards: bool) -> Value {
    let mut props = json!({"duration": {"type": "integer", "minimum": 1, "maximum": 30 * 24 * 3600},
                           "until": {"type": "integer"}});
    if boards {
        props["boards"] = json!({"type": "array", "items": string()});
    }
    let mut s = object(&[], props);
    s["oneOf"] = json!([{"required": ["duration"]}, {"required": ["until"]}]);
    s
}

/// `(schema, required)` of the body of `method path`, if it takes one.
pub fn request_body(method: &str, path: &str) -> Option<(Value, bool)> {
    let plugin_code = json!({"type": "string", "minLength": 1});
    let plugin_kind = json!({"enum": ["wasm", "process", "python"]});
    let extra = json!({"type": "object"});
    let schema = match (method, path) {
        ("post", "/v1/auth/tokens") => object(
            &["username", "password"],
            json!({"username": {"type": "string", "maxLength": super::auth::MAX_NAME_BYTES},
                   "password": {"type": "string", "maxLength": crate::auth::MAX_PASSWORD_BYTES},
                   "project": string(),
                   "ttl": {"type": "integer", "minimum": 1}}),
        ),
        ("post", "/v1/projects") => object(&["name"], json!({"name": name()})),
        ("post", "/v1/users") => object(
            &["name", "password", "project"],
            json!({"name": name(), "password": {"type": "string", "minLength": 8, "maxLength": crate::auth::MAX_PASSWORD_BYTES},
                   "project": string(),
                   "role": {"enum": ["admin", "manager", "user"]}}),
        ),
        ("post", "/v1/boards") => object(
            &["name", "code", "location"],
            json!({"name": name(), "code": {"type": "string", "minLength": 1, "maxLength": 255},
                   "type": string(), "location": location(), "mobile": {"type": "boolean"},
                   "fleet": {"type": ["string", "null"]}, "extra": extra}),
        ),
        ("patch", "/v1/boards/{board}") => object(
            &[],
            json!({"name": name(), "type": string(), "mobile": {"type": "boolean"},
                   "fleet": {"type": ["string", "null"]}, "extra": extra, "location": location()}),
        ),
        ("post", "/v1/boards/{board}/action") => action(super::boards::ACTIONS),
        ("put", "/v1/boards/{board}/gpio/{line}") => {
            object(&["value"], json!({"value": {"enum": [0, 1]}, "direction": {"enum": ["out"]}}))
        }
        ("post", "/v1/boards/{board}/i2c/{bus}/{addr}/read") => object(
            &["length"],
            json!({"register": {"type": "integer", "minimum": 0, "maximum": 255},
                   "length": {"type": "integer", "minimum": 1, "maximum": 4096}}),
        ),
        ("post", "/v1/boards/{board}/i2c/{bus}/{addr}/write") => object(
            &["data"],
            json!({"register": {"type": "integer", "minimum": 0, "maximum": 255},
                   "data": {"type": "array", "minItems": 1, "maxItems": 4096,
                            "items": {"type": "integer", "minimum": 0, "maximum": 255}}}),
        ),
        ("post", "/v1/boards/{board}/services/{service}/action") => object(
            &["action"],
            json!({"action": {"enum": ["ServiceEnable", "ServiceDisable", "ServiceRestore"]},
                   "allow": {"description": "ServiceEnable only: sources that may connect (CIDRs or addresses)",
                             "type": "array", "maxItems": crate::db::MAX_ALLOW, "items": string()}}),
        ),
        ("put", "/v1/boards/{board}/plugins") => object(
            &["plugin"],
            json!({"plugin": string(), "onboot": {"type": ["boolean", "string", "null"]}, "grants": grants()}),
        ),
        ("post", "/v1/boards/{board}/plugins/{plugin}") => action(super::plugins::ACTIONS),
        ("post", "/v1/services") => object(
            &["name", "port"],
            json!({"name": name(), "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                   "protocol": {"enum": ["TCP", "UDP"]}, "extra": extra}),
        ),
        ("patch", "/v1/services/{service}") => object(
            &[],
            json!({"name": name(), "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                   "protocol": {"enum": ["TCP", "UDP"]}, "extra": extra}),
        ),
        ("post", "/v1/fleets") | ("patch", "/v1/fleets/{fleet}") => {
            let required: &[&str] = if method == "post" { &["name"] } else { &[] };
            object(required, json!({"name": name(), "description": string(), "extra": extra}))
        }
        ("post", "/v1/plugins") => object(
            &["name", "code"],
            json!({"name": name(), "code": plugin_code, "kind": plugin_kind, "public": {"type": "boolean"},
                   "callable": {"type": "boolean"}, "parameters": {"type": ["object", "array"]},
                   "extra": extra, "grants": grants()}),
        ),
        ("patch", "/v1/plugins/{plugin}") => object(
            &[],
            json!({"name": name(), "code": plugin_code, "kind": plugin_kind, "public": {"type": "boolean"},
                   "callable": {"type": "boolean"}, "parameters": {"type": ["object", "array"]},
                   "extra": extra, "grants": grants()}),
        ),
        ("post", "/v1/leases") => lease_end(true),
        ("patch", "/v1/leases/{lease}") => lease_end(false),
        ("post", "/v1/vpns") => object(
            &["name", "cidr"],
            json!({"name": name(), "type": {"enum": ["l2", "l3"]},
                   "cidr": {"type": "string", "pattern": "^[0-9]{1,3}(\\.[0-9]{1,3}){3}/[0-9]{1,2}$",
                            "examples": ["10.10.0.0/24"]},
                   "cloud_address": {"type": "boolean"}}),
        ),
        ("post", "/v1/vpns/{vpn}/boards") => {
            object(&["board"], json!({"board": string(), "address": {"type": "string", "format": "ipv4"}}))
        }
        ("post", "/v1/boards/{board}/rotate-secret") => {
            return Some((
                object(&[], json!({"ttl": {"type": "integer", "minimum": 1, "maximum": 30 * 24 * 3600}})),
                false,
            ));
        }
        _ => return None,
    };
    Some((schema, true))
}

/// State-changing routes that take no body.
#[cfg(test)]
const NO_BODY: &[(&str, &str)] = &[("post", "/v1/boards/{board}/revoke")];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_with_a_body_has_a_schema() {
        for (method, path, _, _) in super::super::ROUTES {
            let takes_body = matches!(*method, "post" | "put" | "patch");
            let known = request_body(method, path).is_some();
            if takes_body {
                assert!(known || NO_BODY.contains(&(*method, *path)), "{method} {path} has no request schema");
            } else {
                assert!(!known, "{method} {path} takes no body but has a schema");
            }
        }
    }

    #[test]
    fn schemas_are_closed_objects() {
        for (method, path, _, _) in super::super::ROUTES {
            if let Some((s, _)) = request_body(method, path) {
                assert_eq!(s["type"], "object", "{method} {path}");
                assert_eq!(s["additionalProperties"], false, "{method} {path}: the body types deny unknown fields");
            }
        }
    }
}
