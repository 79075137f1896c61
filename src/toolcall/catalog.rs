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
        for t in &tools {
            let bad = |why: &str| Err(Error::InvalidOption(format!("server '{server}': tool '{}': {why}", t.name)));
            if t.name.is_empty() || t.name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return bad("a name must be non-empty and have no whitespace");
            }
            if t.name == FINISH {
                return bad("'finish' is reserved for answering without a tool");
            }
            if self.find(&t.name).is_some() || tools.iter().filter(|u| u.name == t.name).count() > 1 {
                return bad("another tool already has this name");
            }
            if t.input_schema.get("type").and_then(Value::as_str) != Some("object") {
                return bad("inputSchema must be a JSON Schema of type \"object\"");
            }
        }
        self.groups.push(ToolGroup { server: server.to_string(), tools });
        Ok(())
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
