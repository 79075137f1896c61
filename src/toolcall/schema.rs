//! Checking tool arguments against their JSON Schema: the subset tool schemas use (types, enums,
//! required and undeclared keys, nested objects and arrays, bounds, alternatives). Training data
//! and evaluation use it to tell valid calls from invalid ones; the schema constraint makes
//! generated calls valid by construction.

use serde_json::Value;

/// Why a value does not satisfy a schema, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaViolation {
    /// JSON path of the offending value (`$.edits[0].oldText`).
    pub path: String,
    /// What is wrong.
    pub reason: String,
}

impl std::fmt::Display for SchemaViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// Check `value` against `schema`. Keys an object schema does not declare are refused unless
/// `additionalProperties` allows them (tool arguments with unexpected keys are wrong calls).
pub fn validate(value: &Value, schema: &Value) -> Result<(), SchemaViolation> {
    check(value, schema, "$")
}

/// `value` with every object's keys in the order its schema declares them (the order the schema
/// constraint writes them in); keys the schema does not declare keep their place after those.
pub fn canonical(value: &Value, schema: &Value) -> Value {
    let branch =
        ["anyOf", "oneOf"].iter().filter_map(|k| schema.get(*k).and_then(Value::as_array)).flatten().find(|b| validate(value, b).is_ok());
    if let Some(b) = branch {
        return canonical(value, b);
    }
    match value {
        Value::Object(o) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let declared = props.into_iter().flat_map(|p| p.keys()).filter(|k| o.contains_key(*k));
            let rest = o.keys().filter(|k| !props.is_some_and(|p| p.contains_key(*k)));
            let sub = |k: &str| props.and_then(|p| p.get(k)).or_else(|| schema.get("additionalProperties")).unwrap_or(&Value::Bool(true));
            Value::Object(declared.chain(rest).map(|k| (k.clone(), canonical(&o[k], sub(k)))).collect())
        }
        Value::Array(items) => {
            Value::Array(items.iter().map(|x| canonical(x, schema.get("items").unwrap_or(&Value::Bool(true)))).collect())
        }
        other => other.clone(),
    }
}

fn fail(path: &str, reason: String) -> Result<(), SchemaViolation> {
    Err(SchemaViolation { path: path.to_string(), reason })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn has_type(v: &Value, t: &str) -> bool {
    match t {
        // JSON Schema: an integer is any number with a zero fractional part.
        "integer" => v.as_f64().is_some_and(|x| x.fract() == 0.0),
        "number" => v.is_number(),
        other => kind(v) == other,
    }
}

fn check(v: &Value, s: &Value, path: &str) -> Result<(), SchemaViolation> {
    let Some(s) = s.as_object() else {
        // `true` (or an absent schema) allows anything; `false` nothing.
        return if s.as_bool() == Some(false) { fail(path, "no value is allowed here".into()) } else { Ok(()) };
    };
    for key in ["anyOf", "oneOf"] {
        if let Some(alts) = s.get(key).and_then(Value::as_array) {
            if !alts.iter().any(|a| check(v, a, path).is_ok()) {
                return fail(path, format!("matches none of the {} alternatives of {key}", alts.len()));
            }
        }
    }
    if let Some(all) = s.get("allOf").and_then(Value::as_array) {
        for a in all {
            check(v, a, path)?;
        }
    }
    if let Some(c) = s.get("const") {
        if v != c {
            return fail(path, format!("must be {c}"));
        }
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return fail(path, format!("{v} is not one of {}", Value::Array(e.clone())));
        }
    }
    match s.get("type") {
        Some(Value::String(t)) if !has_type(v, t) => return fail(path, format!("expected {t}, got {}", kind(v))),
        Some(Value::Array(ts)) if !ts.iter().filter_map(Value::as_str).any(|t| has_type(v, t)) => {
            return fail(path, format!("expected one of {}, got {}", Value::Array(ts.clone()), kind(v)));
        }
        _ => {}
    }
    let bound = |key: &str| s.get(key).and_then(Value::as_f64);
    match v {
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if bound("minimum").is_some_and(|m| x < m) || bound("exclusiveMinimum").is_some_and(|m| x <= m) {
                return fail(path, format!("{x} is below the minimum"));
            }
            if bound("maximum").is_some_and(|m| x > m) || bound("exclusiveMaximum").is_some_and(|m| x >= m) {
                return fail(path, format!("{x} is above the maximum"));
            }
        }
        Value::String(t) => {
            let n = t.chars().count() as f64;
            if bound("minLength").is_some_and(|m| n < m) || bound("maxLength").is_some_and(|m| n > m) {
                return fail(path, format!("length {n} is outside minLength/maxLength"));
            }
        }
        Value::Array(items) => {
            let n = items.len() as f64;
            if bound("minItems").is_some_and(|m| n < m) || bound("maxItems").is_some_and(|m| n > m) {
                return fail(path, format!("{n} items is outside minItems/maxItems"));
            }
            if let Some(item) = s.get("items") {
                for (i, x) in items.iter().enumerate() {
                    check(x, item, &format!("{path}[{i}]"))?;
                }
            }
        }
        Value::Object(o) => {
            let props = s.get("properties").and_then(Value::as_object);
            if let Some(req) = s.get("required").and_then(Value::as_array) {
                if let Some(missing) = req.iter().filter_map(Value::as_str).find(|k| !o.contains_key(*k)) {
                    return fail(path, format!("the required key \"{missing}\" is missing"));
                }
            }
            for (k, x) in o {
                let at = format!("{path}.{k}");
                match (props.and_then(|p| p.get(k)), s.get("additionalProperties")) {
                    (Some(ps), _) => check(x, ps, &at)?,
                    (None, Some(Value::Bool(true))) => {}
                    (None, Some(extra @ Value::Object(_))) => check(x, extra, &at)?,
                    (None, _) => return fail(&at, "an undeclared key".into()),
                }
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn why(v: Value, s: &Value) -> String {
        validate(&v, s).unwrap_err().to_string()
    }

    #[test]
    fn types_required_enums_and_undeclared_keys() {
        let s = json!({"type": "object", "properties": {
            "path": {"type": "string", "maxLength": 5},
            "n": {"type": "integer", "minimum": 1},
            "x": {"type": "number"},
            "ok": {"type": "boolean"},
            "mode": {"enum": ["r", "w"]},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
            "edits": {"type": "array", "items": {"type": "object", "properties": {"old": {"type": "string"}}, "required": ["old"]}},
            "any": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        }, "required": ["path"]});
        validate(&json!({"path": "a", "n": 2, "x": 1.5, "ok": true, "mode": "r", "tags": ["t"], "edits": [{"old": "o"}], "any": null}), &s)
            .unwrap();
        validate(&json!({"path": "a", "n": 2.0}), &s).unwrap();
        assert_eq!(why(json!({}), &s), "$: the required key \"path\" is missing");
        assert_eq!(why(json!({"path": 3}), &s), "$.path: expected string, got integer");
        assert_eq!(why(json!({"path": "toolong"}), &s), "$.path: length 7 is outside minLength/maxLength");
        assert_eq!(why(json!({"path": "a", "n": 1.5}), &s), "$.n: expected integer, got number");
        assert_eq!(why(json!({"path": "a", "n": 0}), &s), "$.n: 0 is below the minimum");
        assert_eq!(why(json!({"path": "a", "ok": "yes"}), &s), "$.ok: expected boolean, got string");
        assert_eq!(why(json!({"path": "a", "mode": "x"}), &s), "$.mode: \"x\" is not one of [\"r\",\"w\"]");
        assert_eq!(why(json!({"path": "a", "tags": ["a", "b", "c"]}), &s), "$.tags: 3 items is outside minItems/maxItems");
        assert_eq!(why(json!({"path": "a", "tags": [1]}), &s), "$.tags[0]: expected string, got integer");
        assert_eq!(why(json!({"path": "a", "edits": [{}]}), &s), "$.edits[0]: the required key \"old\" is missing");
        assert_eq!(why(json!({"path": "a", "any": 1}), &s), "$.any: matches none of the 2 alternatives of anyOf");
        assert_eq!(why(json!({"path": "a", "extra": 1}), &s), "$.extra: an undeclared key");
        assert_eq!(why(json!([1]), &s), "$: expected object, got array");
        let open = json!({"type": "object", "additionalProperties": {"type": "integer"}});
        validate(&json!({"a": 1}), &open).unwrap();
        assert_eq!(why(json!({"a": "b"}), &open), "$.a: expected integer, got string");
    }

    #[test]
    fn canonical_order_is_the_schemas() {
        let s = json!({"type": "object", "properties": {"path": {"type": "string"}, "edits": {"type": "array", "items": {"type": "object", "properties": {"old": {}, "new": {}}}}, "dry": {}}});
        let v = json!({"dry": true, "edits": [{"new": "b", "old": "a"}], "path": "p"});
        assert_eq!(canonical(&v, &s).to_string(), r#"{"path":"p","edits":[{"old":"a","new":"b"}],"dry":true}"#);
    }
}
