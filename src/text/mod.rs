//! Text in and out: the tokenizer and chat template a GGUF file carries.

mod chat;
mod stream;
mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use stream::TextStream;
pub use tokenizer::Tokenizer;
