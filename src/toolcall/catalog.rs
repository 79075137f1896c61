//! The tools a model may call, grouped by the server that provides them.

use crate::error::{Error, Result};
use crate::mcp::Tool;
use serde_json::Value;

/// The pseudo-tool that means "no tool: answer now".
pub const FINISH: &str = "finish";

/// The tools of one server (or one tools file).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolGroup {
    /// Server name.
    pub server: String,
    /// Its tools.
    pub tools: Vec<Tool>,
}

/// Every callable tool, grouped by server; names are unique across the catalog.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Catalog {
    /// The groups, in the order they were added.
    pub groups: Vec<ToolGroup>,
}

impl Catalog {
    /// Add a server's tools, checking names and schemas.
    pub fn add(&mut self, server: &str, tools: Vec<Tool>) -> Result<()> {
        if let Some(why) = tools.iter().find_map(|t| self.refusal(&tools, t)) {
            return Err(Error::InvalidOption(format!("server '{server}': {why}")));
        }
        self.groups.push(ToolGroup { server: server.to_string(), tools });
        Ok(())
    }

    /// [`add`](Self::add) the tools that can be called, leaving out the others: a server's
    /// tool list is its author's, and one malformed tool should not take the rest away.
    /// Returns why each one left out was (`tool 'x': ...`).
    pub fn add_callable(&mut self, server: &str, tools: Vec<Tool>) -> Vec<String> {
        let (mut kept, mut left_out) = (Vec::new(), Vec::new());
        for t in &tools {
            match self.refusal(&kept, t).or_else(|| self.refusal(&tools, t)) {
                Some(why) => left_out.push(why),
                None => kept.push(t.clone()),
            }
        }
        if !kept.is_empty() {
            self.groups.push(ToolGroup { server: server.to_string(), tools: kept });
        }
        left_out
    }

    /// Why `t` (one of `group`'s tools) cannot join the catalog, if it cannot.
    fn refusal(&self, group: &[Tool], t: &Tool) -> Option<String> {
        let why = if t.name.is_empty() || t.name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            "a name must be non-empty and have no whitespace"
        } else if t.name == FINISH {
            "'finish' is reserved for answering without a tool"
        } else if self.find(&t.name).is_some() || group.iter().filter(|u| u.name == t.name).count() > 1 {
            "another tool already has this name"
        } else if t.input_schema.get("type").and_then(Value::as_str) != Some("object") {
            "inputSchema must be a JSON Schema of type \"object\""
        } else {
            return None;
        };
        Some(format!("tool '{}': {why}", t.name.escape_debug()))
    }

    /// Read an OpenAI `tools` array (`[{"type":"function","function":{name, description,
    /// parameters}}]`) as one group named `server`.
    pub fn from_openai_tools(server: &str, v: &Value) -> Result<Self> {
        let list = v
            .as_array()
            .ok_or_else(|| Error::InvalidOption("tools: expected a JSON array of {\"type\":\"function\",\"function\":{..}}".into()))?;
        let mut tools = Vec::new();
        for (i, item) in list.iter().enumerate() {
            let f = item.get("function").ok_or_else(|| Error::InvalidOption(format!("tools[{i}]: no \"function\" object")))?;
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| Error::InvalidOption(format!("tools[{i}].function: no \"name\" string")))?;
            tools.push(Tool {
                name: name.to_string(),
                description: f.get("description").and_then(Value::as_str).unwrap_or("").to_string(),
                input_schema: f.get("parameters").cloned().unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}})),
            });
        }
        let mut c = Self::default();
        c.add(server, tools)?;
        Ok(c)
    }

    /// A tool by name, with its server.
    pub fn find(&self, name: &str) -> Option<(&ToolGroup, &Tool)> {
        self.groups.iter().find_map(|g| g.tools.iter().find(|t| t.name == name).map(|t| (g, t)))
    }

    /// Every tool name, in catalog order.
    pub fn names(&self) -> Vec<&str> {
        self.groups.iter().flat_map(|g| g.tools.iter().map(|t| t.name.as_str())).collect()
    }
}

/// The first sentence of a description, at most `max` characters: what a small model's prompt
/// has room for.
pub fn short_description(d: &str, max: usize) -> String {
    let first = d.split_inclusive(". ").next().unwrap_or(d).lines().next().unwrap_or("").trim();
    if first.chars().count() <= max {
        first.to_string()
    } else {
        let cut: String = first.chars().take(max.saturating_sub(1)).collect();
        format!("{}…", cut.trim_end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tool(name: &str) -> Tool {
        Tool { name: name.into(), description: "Does it. More text.".into(), input_schema: json!({"type": "object", "properties": {}}) }
    }

    #[test]
    fn names_are_checked_and_unique() {
        let mut c = Catalog::default();
        c.add("fs", vec![tool("read"), tool("write")]).unwrap();
        assert!(c.add("other", vec![tool("read")]).unwrap_err().to_string().contains("already"));
        assert!(c.add("x", vec![tool("finish")]).unwrap_err().to_string().contains("reserved"));
        assert!(c.add("x", vec![tool("two words")]).unwrap_err().to_string().contains("whitespace"));
        let mut bad = tool("b");
        bad.input_schema = json!({"type": "string"});
        assert!(c.add("x", vec![bad]).unwrap_err().to_string().contains("object"));
        assert_eq!(c.names(), ["read", "write"]);
        assert_eq!(c.find("write").unwrap().0.server, "fs");
    }

    /// A server's malformed tools are left out, each with its reason; the rest are kept.
    #[test]
    fn a_server_keeps_its_callable_tools() {
        let mut c = Catalog::default();
        c.add("fs", vec![tool("read")]).unwrap();
        let mut bad = tool("shout");
        bad.input_schema = json!("not a schema");
        let why = c.add_callable("mixed", vec![tool("write"), bad, tool("read"), tool("\u{1b}[2J"), tool("list"), tool("list")]);
        assert_eq!(c.names(), ["read", "write"]);
        assert_eq!(why.len(), 5, "{why:?}");
        for (w, needle) in
            why.iter().zip(["'shout': inputSchema", "'read': another", "'\\u{1b}[2J': a name", "'list': another", "'list': another"])
        {
            assert!(w.contains(needle), "{w} should say {needle}");
        }
        assert!(
            c.add_callable("empty", vec![tool("finish")]).len() == 1 && c.groups.len() == 2,
            "a server with no callable tool adds no group"
        );
    }

    #[test]
    fn openai_tools_file() {
        let v = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather.", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
        let c = Catalog::from_openai_tools("tools.json", &v).unwrap();
        assert_eq!(c.find("get_weather").unwrap().1.input_schema["required"], json!(["city"]));
        assert!(Catalog::from_openai_tools("t", &json!([{"type": "function"}])).unwrap_err().to_string().contains("tools[0]"));
    }

    #[test]
    fn descriptions_are_shortened() {
        assert_eq!(short_description("Read a file. Handles encodings.", 80), "Read a file.");
        assert_eq!(short_description("abcdefghij", 5), "abcd…");
        assert_eq!(short_description("line one\nline two", 80), "line one");
    }
}
