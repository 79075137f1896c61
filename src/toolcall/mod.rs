//! Decoupled tool calling: choose the tool among real names with calibrated probabilities, then
//! write its arguments under its input schema, on one KV cache of the conversation.

mod agent;
mod call;
mod catalog;
mod constraint;
mod conversation;
mod json_cursor;
mod manifest;
pub mod schema;
mod select;

pub use agent::{AgentEvent, AgentOptions, ToolServers, MAX_RESULT_CHARS};
pub use call::{
    AdapterSet, ArgumentCue, CallEvent, CallLayout, CallStats, Strategy, ToolCall, ToolCaller, ToolChoice, ARGS_CUE, CONTENT_FREE_REQUEST,
    DEFAULT_ARG_BUDGET, SCHEMA_CUE, SELECT_CUE, SERVER_CUE,
};
pub use catalog::{short_description, Catalog, ToolGroup, FINISH};
pub use constraint::{ConstraintFactory, JsonConstraint, MAX_ARRAY_ITEMS, MAX_STRING_CHARS, MIN_STRING_CHARS};
pub use conversation::{read_messages, AssistantTurn, FieldError, Message};
pub use json_cursor::{MAX_EXPONENT_DIGITS, MAX_FRACTION_DIGITS, MAX_INTEGER_DIGITS};
pub use manifest::{Manifest, MANIFEST_FILE};
pub use select::{normalise, TokenTrie};
