//! OpenAI chat messages in the tool caller's prompt layout: assistant tool calls written as the
//! caller writes them, tool results as the user turns the agent loop feeds back. The server reads
//! requests with it and the trainer reads trajectories with it, so both see what inference sees.

use super::ToolCaller;
use crate::text::ChatMessage;
use serde_json::Value;
use std::collections::HashMap;

/// A field of the messages that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Where (`messages[2].tool_call_id`).
    pub param: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.param, self.message)
    }
}

/// What an assistant message did.
#[derive(Debug, Clone, PartialEq)]
pub enum AssistantTurn {
    /// Called `name` with `arguments`.
    Call {
        /// The tool.
        name: String,
        /// Its arguments.
        arguments: Value,
    },
    /// Answered in text (the `finish` choice).
    Text,
}

/// One message in the caller's layout, and what it did when it is the assistant's.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The message as the prompt shows it.
    pub chat: ChatMessage,
    /// The assistant's action (one per tool call; an assistant message with several calls
    /// becomes several messages).
    pub turn: Option<AssistantTurn>,
    /// Whether training learns this action: false for an assistant message with `"weight": 0`
    /// (OpenAI's fine-tuning format), a step shown in the conversation but not to be imitated —
    /// a call that failed, kept so the next turn learns to recover from it.
    pub learn: bool,
}

/// Read an OpenAI `messages` array. Tool results are cut to `max_result_chars`.
pub fn read_messages(v: Option<&Value>, max_result_chars: usize) -> Result<Vec<Message>, FieldError> {
    let err = |param: String, message: String| FieldError { param, message };
    let list = match v {
        Some(Value::Array(l)) if !l.is_empty() => l,
        Some(Value::Array(_)) => return Err(err("messages".into(), "messages must not be empty".into())),
        None => return Err(err("messages".into(), "messages is required".into())),
        Some(_) => return Err(err("messages".into(), "messages must be an array".into())),
    };
    let mut out = Vec::with_capacity(list.len());
    // Tool-call id → tool name, to label the results that answer them.
    let mut calls: HashMap<String, String> = HashMap::new();
    for (i, m) in list.iter().enumerate() {
        let at = |field: &str| format!("messages[{i}]{field}");
        let m = m.as_object().ok_or_else(|| err(at(""), "a message must be an object".into()))?;
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| err(at(".role"), "role is required".into()))?;
        let content = text_content(m.get("content"), &at(".content"))?;
        let plain = |role: &str, text: &str| Message { chat: ChatMessage::new(role, text), turn: None, learn: false };
        match role {
            "system" | "developer" | "user" => {
                let text = content.ok_or_else(|| err(at(".content"), format!("a {role} message needs content")))?;
                out.push(plain(if role == "user" { "user" } else { "system" }, &text));
            }
            "assistant" => {
                let learn = match m.get("weight") {
                    None | Some(Value::Null) => true,
                    Some(w) if w.as_f64() == Some(1.0) => true,
                    Some(w) if w.as_f64() == Some(0.0) => false,
                    Some(_) => return Err(err(at(".weight"), "weight must be 0 (shown, not learned) or 1".into())),
                };
                let tool_calls = match m.get("tool_calls") {
                    None | Some(Value::Null) => &[][..],
                    Some(Value::Array(a)) => a.as_slice(),
                    Some(_) => return Err(err(at(".tool_calls"), "tool_calls must be an array".into())),
                };
                if tool_calls.is_empty() {
                    let text = content.ok_or_else(|| err(at(".content"), "an assistant message needs content or tool_calls".into()))?;
                    out.push(Message { chat: ChatMessage::new("assistant", &text), turn: Some(AssistantTurn::Text), learn });
                }
                for (j, c) in tool_calls.iter().enumerate() {
                    let at = |field: &str| format!("messages[{i}].tool_calls[{j}]{field}");
                    let name = c
                        .pointer("/function/name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| err(at(".function.name"), "a tool call needs function.name".into()))?;
                    let arguments: Value = match c.pointer("/function/arguments") {
                        None | Some(Value::Null) => Value::Object(Default::default()),
                        Some(Value::String(s)) => serde_json::from_str(s)
                            .map_err(|e| err(at(".function.arguments"), format!("arguments must be a JSON string: {e}")))?,
                        Some(_) => return Err(err(at(".function.arguments"), "arguments must be a string of JSON".into())),
                    };
                    if let Some(id) = c.get("id").and_then(Value::as_str) {
                        calls.insert(id.to_string(), name.to_string());
                    }
                    out.push(Message {
                        chat: ToolCaller::call_message_for(name, &arguments),
                        turn: Some(AssistantTurn::Call { name: name.to_string(), arguments }),
                        learn,
                    });
                }
            }
            "tool" => {
                let id = m
                    .get("tool_call_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| err(at(".tool_call_id"), "a tool message needs tool_call_id".into()))?;
                let name = calls.get(id).ok_or_else(|| err(at(".tool_call_id"), format!("'{id}' answers no earlier tool call")))?;
                out.push(Message {
                    chat: ToolCaller::result_message(name, &content.unwrap_or_default(), max_result_chars),
                    turn: None,
                    learn: false,
                });
            }
            other => return Err(err(at(".role"), format!("unknown role '{other}' (system, developer, user, assistant or tool)"))),
        }
    }
    Ok(out)
}

/// A message's text: a string, null, or an array of `{"type": "text", "text": ...}` parts.
fn text_content(v: Option<&Value>, param: &str) -> Result<Option<String>, FieldError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (k, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (kind, _) => {
                        return Err(FieldError {
                            param: format!("{param}[{k}]"),
                            message: format!("only text parts are supported, not {}", kind.unwrap_or("an untyped part")),
                        })
                    }
                }
            }
            Ok(Some(text))
        }
        Some(_) => Err(FieldError { param: param.to_string(), message: "content must be a string, null or an array of text parts".into() }),
    }
}
