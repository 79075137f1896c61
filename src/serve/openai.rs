//! The OpenAI chat-completions wire format: a request body validated into what the engine runs
//! (every refusal names the field), and answers and stream chunks in OpenAI's shape.

use crate::decode::SamplerConfig;
use crate::text::ChatMessage;
use crate::toolcall::{read_messages, Catalog, ToolChoice};
use serde_json::{json, Map, Value};

/// A refused or failed request: HTTP status and OpenAI's error object.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// What went wrong, for a person.
    pub message: String,
    /// The request field at fault (`messages[2].role`).
    pub param: Option<String>,
    /// A machine-readable code (`context_length_exceeded`).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self { status: 400, message: message.into(), param: Some(param.into()), code: None }
    }

    /// An error with a status and no field.
    pub fn status(status: u16, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), param: None, code: None }
    }

    /// The response body: `{"error": {message, type, param, code}}`.
    pub fn body(&self) -> Value {
        let kind = match self.status {
            400..=499 => "invalid_request_error",
            503 => "server_busy",
            _ => "server_error",
        };
        json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}})
    }
}

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> Self {
        use crate::Error as E;
        match e {
            E::ContextOverflow { .. } => {
                Self { status: 400, message: e.to_string(), param: Some("messages".into()), code: Some("context_length_exceeded") }
            }
            E::InvalidOption(_) | E::Template(_) | E::Tokenizer(_) | E::BadToken { .. } => Self::status(400, e.to_string()),
            E::ModelOutput(_) => Self { code: Some("model_output_invalid"), ..Self::status(500, e.to_string()) },
            // Nobody reads this answer; 499 is the status proxies log for it.
            E::Cancelled => Self { code: Some("client_closed"), ..Self::status(499, e.to_string()) },
            // A tool server failed: the gateway's upstream.
            E::Mcp(_) => Self::status(502, e.to_string()),
            // The engine's own failures: GPU, engine, files it needs, a model it cannot run.
            _ => Self::status(500, e.to_string()),
        }
    }
}

/// What a request asks the engine for.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    /// Text, with no tools in the prompt.
    Chat,
    /// Text, with the tools listed but none called (`tool_choice: "none"`).
    Answer,
    /// A tool call (or, under `auto`, text when the model chooses `finish`).
    Call(ToolChoice),
    /// A request without `tools` to a server with MCP servers of its own: their tools are called
    /// (the first call restricted by the choice) until the model chooses `finish`, then text.
    Agent(ToolChoice),
}

/// A validated chat-completions request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// The conversation in the layout the tool caller's prompts use.
    pub messages: Vec<ChatMessage>,
    /// The request's tools (empty without `tools`).
    pub catalog: Catalog,
    /// What to produce.
    pub work: Work,
    /// Answer as server-sent events.
    pub stream: bool,
    /// With `stream`, end with a chunk carrying the token usage.
    pub include_usage: bool,
    /// Most text tokens (`max_completion_tokens` or `max_tokens`); `None`: the server's default.
    pub max_tokens: Option<usize>,
    /// Sampling of text (tool choices are scored and arguments greedy regardless).
    pub sampler: SamplerConfig,
}

/// Validate a request body. `max_result_chars` cuts tool results as the agent loop does;
/// `server_tools` are the server's own (MCP) tools, which a request without `tools` gets.
pub fn parse_request(body: &[u8], max_result_chars: usize, server_tools: &Catalog) -> Result<ChatRequest, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError::invalid("body", format!("the body is not JSON: {e}")))?;
    let o = v.as_object().ok_or_else(|| ApiError::invalid("body", "the body must be a JSON object"))?;
    if let Some(m) = o.get("model") {
        if !m.is_string() {
            return Err(ApiError::invalid("model", "model must be a string"));
        }
    }
    refuse_unsupported(o)?;
    let catalog = match o.get("tools") {
        None | Some(Value::Null) => Catalog::default(),
        Some(t) => Catalog::from_openai_tools("request", t)
            .map_err(|e| ApiError::invalid("tools", e.to_string().trim_start_matches("invalid option: ").to_string()))?,
    };
    let work = if catalog.groups.is_empty() && !server_tools.groups.is_empty() {
        match tool_choice(o.get("tool_choice"), server_tools)? {
            Work::Call(choice) => Work::Agent(choice),
            // `"none"`: a plain chat turn, the server's tools left out.
            _ => Work::Chat,
        }
    } else {
        tool_choice(o.get("tool_choice"), &catalog)?
    };
    let messages = read_messages(o.get("messages"), max_result_chars)
        .map_err(|e| ApiError::invalid(e.param, e.message))?
        .into_iter()
        .map(|m| m.chat)
        .collect();
    let stream = opt_bool(o, "stream")?.unwrap_or(false);
    let include_usage = match o.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(so)) => opt_bool(so, "include_usage")
            .map_err(|e| ApiError { param: Some("stream_options.include_usage".into()), ..e })?
            .unwrap_or(false),
        Some(_) => return Err(ApiError::invalid("stream_options", "stream_options must be an object")),
    };
    let max_tokens = match (opt_uint(o, "max_completion_tokens")?, opt_uint(o, "max_tokens")?) {
        (Some(0), _) | (None, Some(0)) => return Err(ApiError::invalid("max_tokens", "max_tokens must be at least 1")),
        (a, b) => a.or(b).map(|n| n as usize),
    };
    let mut sampler = SamplerConfig::default();
    if let Some(t) = opt_number(o, "temperature")? {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::invalid("temperature", format!("temperature must be between 0 and 2, not {t}")));
        }
        sampler.temperature = t as f32;
    }
    if let Some(p) = opt_number(o, "top_p")? {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid("top_p", format!("top_p must be in (0, 1], not {p}")));
        }
        sampler.top_p = p as f32;
    }
    if let Some(s) = opt_uint(o, "seed")? {
        sampler.seed = s;
    }
    Ok(ChatRequest { messages, catalog, work, stream, include_usage, max_tokens, sampler })
}

/// Fields with a meaning this server does not implement are refused rather than ignored.
fn refuse_unsupported(o: &Map<String, Value>) -> Result<(), ApiError> {
    if let Some(n) = o.get("n").filter(|n| !n.is_null()) {
        if n.as_u64() != Some(1) {
            return Err(ApiError::invalid("n", "only n = 1 is supported"));
        }
    }
    if o.get("stop").is_some_and(|s| !s.is_null()) {
        return Err(ApiError::invalid(
            "stop",
            "stop sequences are not supported: text ends at the model's end-of-turn token or max_tokens",
        ));
    }
    if opt_bool(o, "logprobs")? == Some(true) {
        return Err(ApiError::invalid(
            "logprobs",
            "logprobs are not supported (tool calls carry their candidates' probabilities under \"agentflux\")",
        ));
    }
    if o.get("top_logprobs").is_some_and(|t| !t.is_null()) {
        return Err(ApiError::invalid("top_logprobs", "top_logprobs are not supported (nor logprobs)"));
    }
    for key in ["presence_penalty", "frequency_penalty"] {
        if opt_number(o, key)?.is_some_and(|p| p != 0.0) {
            return Err(ApiError::invalid(key, format!("{key} is not implemented; only 0 is accepted")));
        }
    }
    match o.get("logit_bias") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) if m.is_empty() => {}
        Some(Value::Object(_)) => return Err(ApiError::invalid("logit_bias", "logit_bias is not implemented; only {} is accepted")),
        Some(_) => return Err(ApiError::invalid("logit_bias", "logit_bias must be an object")),
    }
    // One tool call per turn either way.
    opt_bool(o, "parallel_tool_calls")?;
    if o.get("user").is_some_and(|u| !u.is_null() && !u.is_string()) {
        return Err(ApiError::invalid("user", "user must be a string"));
    }
    if let Some(f) = o.get("response_format").filter(|f| !f.is_null()) {
        if f.get("type").and_then(Value::as_str) != Some("text") {
            return Err(ApiError::invalid("response_format", "only {\"type\": \"text\"} is supported"));
        }
    }
    Ok(())
}

fn tool_choice(v: Option<&Value>, catalog: &Catalog) -> Result<Work, ApiError> {
    let has_tools = !catalog.groups.is_empty();
    let bad = |m: &str| Err(ApiError::invalid("tool_choice", m));
    match v {
        None | Some(Value::Null) => Ok(if has_tools { Work::Call(ToolChoice::Auto) } else { Work::Chat }),
        Some(Value::String(s)) => match s.as_str() {
            "none" => Ok(if has_tools { Work::Answer } else { Work::Chat }),
            "auto" => Ok(if has_tools { Work::Call(ToolChoice::Auto) } else { Work::Chat }),
            "required" if has_tools => Ok(Work::Call(ToolChoice::Required)),
            "required" => bad("tool_choice \"required\" needs tools"),
            other => bad(&format!("tool_choice must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, not \"{other}\"")),
        },
        Some(Value::Object(c)) => {
            let name = c.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
            match (c.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(n)) if catalog.find(n).is_some() => Ok(Work::Call(ToolChoice::Function(n.to_string()))),
                (Some("function"), Some(n)) => bad(&format!("tool_choice names the function '{n}', which is not among the tools")),
                _ => bad("a tool_choice object must be {\"type\": \"function\", \"function\": {\"name\": ...}}"),
            }
        }
        Some(_) => bad("tool_choice must be a string or an object"),
    }
}

fn opt_bool(o: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::invalid(key, format!("{key} must be true or false"))),
    }
}

fn opt_uint(o: &Map<String, Value>, key: &str) -> Result<Option<u64>, ApiError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| ApiError::invalid(key, format!("{key} must be a non-negative integer"))),
    }
}

fn opt_number(o: &Map<String, Value>, key: &str) -> Result<Option<f64>, ApiError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| ApiError::invalid(key, format!("{key} must be a number"))),
    }
}

/// Token counts of one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Tokens of the prompt.
    pub prompt: usize,
    /// Tokens the model wrote (the tool's name and arguments, or the text).
    pub completion: usize,
    /// Prompt tokens taken from the prefix cache instead of computed.
    pub cached: usize,
}

impl Usage {
    /// OpenAI's usage object.
    pub fn json(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        })
    }
}

/// What identifies one answer: its id, creation time and model.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// `chatcmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The model's name.
    pub model: String,
}

/// A tool call in OpenAI's shape (`arguments` is a JSON string).
pub fn tool_call_json(id: &str, name: &str, arguments: &str) -> Value {
    json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
}

impl Envelope {
    /// A whole answer: text or one tool call, why it ended, usage, and AgentFlux's own details
    /// of a call (confidence, every candidate's probability, stage timings) under `agentflux`.
    pub fn completion(
        &self,
        text: Option<&str>,
        tool_call: Option<Value>,
        finish_reason: &str,
        usage: Usage,
        details: Option<Value>,
    ) -> Value {
        let mut message = json!({"role": "assistant", "content": text});
        if let Some(c) = tool_call {
            message["tool_calls"] = json!([c]);
        }
        let mut v = json!({
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason}],
            "usage": usage.json(),
        });
        if let Some(d) = details {
            v["agentflux"] = d;
        }
        v
    }

    /// One stream chunk with `delta` (and the finish reason on the last).
    pub fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
        })
    }

    /// The chunk after the last, carrying usage (`stream_options.include_usage`).
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "choices": [], "usage": usage.json()})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_statuses_by_kind() {
        use crate::Error as E;
        let status = |e: E| ApiError::from(e).status;
        assert_eq!(status(E::InvalidOption("x".into())), 400);
        assert_eq!(status(E::ContextOverflow { needed: 9, n_ctx: 8 }), 400);
        assert_eq!(status(E::Engine("worker stopped".into())), 500);
        assert_eq!(status(E::Gpu("lost".into())), 500);
        let out = ApiError::from(E::ModelOutput("not JSON".into()));
        assert_eq!((out.status, out.code), (500, Some("model_output_invalid")));
        let mcp = crate::mcp::McpError::Spawn { command: "x".into(), msg: "no such file".into() };
        assert_eq!(status(E::Mcp(mcp)), 502);
    }

    fn parse(v: Value) -> Result<ChatRequest, ApiError> {
        parse_request(v.to_string().as_bytes(), 100, &Catalog::default())
    }

    fn tools() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}])
    }

    #[test]
    fn tool_choice_variants() {
        let user = json!([{"role": "user", "content": "hi"}]);
        let work = |tc: Value| parse(json!({"messages": user, "tools": tools(), "tool_choice": tc})).map(|r| r.work);
        assert_eq!(work(Value::Null), Ok(Work::Call(ToolChoice::Auto)));
        assert_eq!(work(json!("auto")), Ok(Work::Call(ToolChoice::Auto)));
        assert_eq!(work(json!("required")), Ok(Work::Call(ToolChoice::Required)));
        assert_eq!(work(json!("none")), Ok(Work::Answer));
        assert_eq!(
            work(json!({"type": "function", "function": {"name": "get_weather"}})),
            Ok(Work::Call(ToolChoice::Function("get_weather".into())))
        );
        assert_eq!(work(json!({"type": "function", "function": {"name": "nope"}})).unwrap_err().param.as_deref(), Some("tool_choice"));
        assert_eq!(work(json!("sometimes")).unwrap_err().param.as_deref(), Some("tool_choice"));
        assert_eq!(parse(json!({"messages": user})).unwrap().work, Work::Chat);
        assert_eq!(parse(json!({"messages": user, "tool_choice": "required"})).unwrap_err().param.as_deref(), Some("tool_choice"));
    }

    #[test]
    fn a_server_with_tools_of_its_own_runs_requests_without_tools_on_them() {
        let server_tools = Catalog::from_openai_tools("files", &json!([
            {"type": "function", "function": {"name": "read_file", "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}
        ]))
        .unwrap();
        let user = json!([{"role": "user", "content": "hi"}]);
        let work = |v: Value| parse_request(v.to_string().as_bytes(), 100, &server_tools).map(|r| r.work);
        assert_eq!(work(json!({"messages": user})), Ok(Work::Agent(ToolChoice::Auto)));
        assert_eq!(work(json!({"messages": user, "tool_choice": "auto"})), Ok(Work::Agent(ToolChoice::Auto)));
        assert_eq!(work(json!({"messages": user, "tool_choice": "required"})), Ok(Work::Agent(ToolChoice::Required)));
        assert_eq!(
            work(json!({"messages": user, "tool_choice": {"type": "function", "function": {"name": "read_file"}}})),
            Ok(Work::Agent(ToolChoice::Function("read_file".into())))
        );
        assert_eq!(work(json!({"messages": user, "tool_choice": "none"})), Ok(Work::Chat));
        // A request's own tools replace the server's: the client calls them.
        assert_eq!(work(json!({"messages": user, "tools": tools()})), Ok(Work::Call(ToolChoice::Auto)));
        let err = work(json!({"messages": user, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("tool_choice"), "{err:?}");
    }

    #[test]
    fn malformed_requests_name_the_field() {
        let cases = [
            (json!({}), "messages"),
            (json!({"messages": []}), "messages"),
            (json!({"messages": [{"content": "x"}]}), "messages[0].role"),
            (json!({"messages": [{"role": "wizard", "content": "x"}]}), "messages[0].role"),
            (json!({"messages": [{"role": "user"}]}), "messages[0].content"),
            (json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), "messages[0].content[0]"),
            (json!({"messages": [{"role": "tool", "tool_call_id": "c1", "content": "x"}]}), "messages[0].tool_call_id"),
            (
                json!({"messages": [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}),
                "messages[0].tool_calls[0].function.arguments",
            ),
            (json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}), "tools"),
            (json!({"messages": [{"role": "user", "content": "x"}], "temperature": 3}), "temperature"),
            (json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}), "max_tokens"),
            (json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}), "max_tokens"),
            (json!({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}), "stream"),
            (json!({"messages": [{"role": "user", "content": "x"}], "n": 2}), "n"),
            (json!({"messages": [{"role": "user", "content": "x"}], "stop": ["\n"]}), "stop"),
            (json!({"messages": [{"role": "user", "content": "x"}], "model": 7}), "model"),
        ];
        for (body, param) in cases {
            let e = parse(body.clone()).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (400, Some(param)), "{body}: {e:?}");
            assert!(!e.message.is_empty());
        }
        assert_eq!(parse_request(b"{not json", 100, &Catalog::default()).unwrap_err().param.as_deref(), Some("body"));
        assert_eq!(parse_request(b"[1]", 100, &Catalog::default()).unwrap_err().param.as_deref(), Some("body"));
    }

    #[test]
    fn a_tool_conversation_becomes_the_callers_layout() {
        let r = parse(json!({
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Oslo?"}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny, and a very long report that goes on and on and on and on and on and on and on and on and on and on and on"},
            ],
            "tools": tools(), "stream": true, "stream_options": {"include_usage": true}, "max_completion_tokens": 9, "temperature": 0.5, "seed": 3,
        }))
        .unwrap();
        let m: Vec<(&str, &str)> = r.messages.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
        assert_eq!(m[0], ("system", "Be brief."));
        assert_eq!(m[1], ("user", "Weather in Oslo?"));
        assert_eq!(m[2], ("assistant", "call: get_weather\nargs:{\"city\":\"Oslo\"}"));
        assert!(m[3].0 == "user" && m[3].1.starts_with("Result of get_weather:\nsunny") && m[3].1.ends_with("[truncated]"), "{:?}", m[3]);
        assert!(r.stream && r.include_usage);
        assert_eq!(r.max_tokens, Some(9));
        assert_eq!((r.sampler.temperature, r.sampler.seed), (0.5, 3));
    }

    #[test]
    fn engine_errors_map_to_statuses() {
        let e = ApiError::from(crate::Error::ContextOverflow { needed: 10, n_ctx: 5 });
        assert_eq!((e.status, e.code), (400, Some("context_length_exceeded")));
        assert_eq!(ApiError::from(crate::Error::Gpu("lost".into())).status, 500);
        assert_eq!(e.body()["error"]["type"], "invalid_request_error");
    }
}
