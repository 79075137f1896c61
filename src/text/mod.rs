//! Text in and out: the tokenizer and chat template a GGUF file carries.

mod chat;
mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use tokenizer::Tokenizer;
