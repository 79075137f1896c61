//! Text from tokens as they are generated.

use super::Tokenizer;
use crate::error::Result;
use std::sync::Arc;

/// Turns tokens into text pieces as they arrive. A character split over several byte-level
/// tokens is held back until it is whole, so every piece is valid text and the pieces join to
/// the decoding of all tokens at once.
pub struct TextStream {
    tokenizer: Arc<Tokenizer>,
    ids: Vec<u32>,
    shown: usize,
}

impl TextStream {
    /// A stream decoding with `tokenizer` (special tokens are skipped).
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        Self { tokenizer, ids: Vec::new(), shown: 0 }
    }

    /// Add a token; the text it completes (empty while a character is unfinished).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, true)?;
        // The byte-level decoder renders an unfinished character as U+FFFD: wait for the rest.
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        Ok(self.take(text))
    }

    /// The text still held back (an unfinished character at the end, as U+FFFD).
    pub fn finish(&mut self) -> Result<String> {
        let text = self.tokenizer.decode(&self.ids, true)?;
        Ok(self.take(text))
    }

    /// Tokens pushed so far.
    pub fn tokens(&self) -> &[u32] {
        &self.ids
    }

    fn take(&mut self, text: String) -> String {
        if text.len() > self.shown && text.is_char_boundary(self.shown) {
            let piece = text[self.shown..].to_string();
            self.shown = text.len();
            piece
        } else {
            String::new()
        }
    }
}
