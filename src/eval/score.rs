//! Argument comparison after normalisation: paths resolved lexically, numbers by value, keys the
//! schema gives a default may be left out when the other side holds that default.

use serde_json::Value;

/// A path with `.`, `..`, repeated and trailing slashes resolved (lexically: the file system is
/// not consulted). Text that does not look like a path is returned as it is.
pub fn normalize_path(s: &str) -> String {
    if !(s.starts_with('/') || s.starts_with("./") || s.starts_with("../") || s.contains('/')) {
        return s.to_string();
    }
    let absolute = s.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for p in s.split('/') {
        match p {
            "" | "." => {}
            ".." if parts.last().is_some_and(|l| *l != "..") => {
                parts.pop();
            }
            ".." if absolute => {}
            p => parts.push(p),
        }
    }
    let joined = parts.join("/");
    match (absolute, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_string(),
        (false, false) => joined,
    }
}

/// Whether `got` equals `want` for a value of `schema`.
pub fn arguments_match(want: &Value, got: &Value, schema: &Value) -> bool {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            let props = schema.get("properties");
            let keys: std::collections::BTreeSet<&String> = w.keys().chain(g.keys()).collect();
            keys.into_iter().all(|k| {
                let sub = props.and_then(|p| p.get(k)).unwrap_or(&Value::Null);
                let default = sub.get("default");
                match (w.get(k), g.get(k)) {
                    (Some(a), Some(b)) => arguments_match(a, b, sub),
                    (Some(v), None) | (None, Some(v)) => default.is_some_and(|d| arguments_match(d, v, sub)),
                    (None, None) => true,
                }
            })
        }
        (Value::Array(w), Value::Array(g)) => {
            let items = schema.get("items").unwrap_or(&Value::Null);
            w.len() == g.len() && w.iter().zip(g).all(|(a, b)| arguments_match(a, b, items))
        }
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::String(a), Value::String(b)) => a == b || normalize_path(a) == normalize_path(b),
        (a, b) => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_resolve_lexically() {
        assert_eq!(normalize_path("/w/./a//b/"), "/w/a/b");
        assert_eq!(normalize_path("/w/x/../a"), "/w/a");
        assert_eq!(normalize_path("/.."), "/");
        assert_eq!(normalize_path("./a/../../b"), "../b");
        assert_eq!(normalize_path("a/.."), ".");
        assert_eq!(normalize_path("hello world"), "hello world");
    }

    #[test]
    fn arguments_compare_after_normalisation() {
        let schema = json!({"type": "object", "properties": {"path": {"type": "string"}, "n": {"type": "number"},
            "sortBy": {"enum": ["name", "size"], "default": "name"}, "paths": {"type": "array", "items": {"type": "string"}},
            "edits": {"type": "array", "items": {"type": "object", "properties": {"dryRun": {"type": "boolean", "default": false}}}}}});
        let yes = [
            (json!({"path": "/w/a"}), json!({"path": "/w/./a/"})),
            (json!({"n": 2}), json!({"n": 2.0})),
            (json!({"path": "/w"}), json!({"path": "/w", "sortBy": "name"})),
            (json!({"path": "/w", "sortBy": "name"}), json!({"path": "/w"})),
            (json!({"paths": ["/a", "/b/c"]}), json!({"paths": ["/a/", "/b/x/../c"]})),
            (json!({"edits": [{"dryRun": false}]}), json!({"edits": [{}]})),
        ];
        for (w, g) in &yes {
            assert!(arguments_match(w, g, &schema), "{w} vs {g}");
        }
        let no = [
            (json!({"path": "/w/a"}), json!({"path": "/w/b"})),
            (json!({"n": 2}), json!({"n": 3})),
            (json!({"path": "/w"}), json!({"path": "/w", "sortBy": "size"})),
            (json!({"path": "/w"}), json!({"path": "/w", "n": 1})),
            (json!({"paths": ["/a", "/b"]}), json!({"paths": ["/b", "/a"]})),
            (json!({"paths": ["/a"]}), json!({"paths": ["/a", "/a"]})),
            (json!({"n": 1}), json!({"n": "1"})),
        ];
        for (w, g) in &no {
            assert!(!arguments_match(w, g, &schema), "{w} vs {g}");
        }
    }
}
