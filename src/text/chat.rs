//! Chat templates: the Jinja template in `tokenizer.chat_template`, rendered with minijinja
//! (with Python string-method compatibility, which Hugging Face templates use).

use super::Tokenizer;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// One chat message.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A model's chat template.
#[derive(Clone)]
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

fn template_err(e: minijinja::Error) -> Error {
    Error::Template(format!("{e:#}"))
}

impl ChatTemplate {
    /// The template of a GGUF file, if it has one.
    pub fn from_gguf(f: &GgufFile, tok: &super::Tokenizer) -> Result<Option<Self>> {
        let Ok(src) = f.str("tokenizer.chat_template") else { return Ok(None) };
        let name = |id: Option<u32>| id.and_then(|i| tok.token_str(i)).unwrap_or("").to_string();
        Self::new(src, &name(tok.bos), &name(tok.eos)).map(Some)
    }

    /// A template from its Jinja source, with the BOS/EOS strings it may refer to.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string()).map_err(template_err)?;
        Ok(Self { env, bos: bos.into(), eos: eos.into() })
    }

    /// Render `messages`; with `add_generation_prompt` the text ends where the assistant's reply begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template("chat").map_err(template_err)?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(template_err)
    }
}

impl ChatTemplate {
    /// The tokens of `messages` rendered: the template's own text as markup (its turn markers
    /// become control tokens), every message's content as plain text, so a message — a user's,
    /// or a tool result — cannot forge turn markers. Where no content holds control-token text
    /// this is the tokenization of the whole rendered string. A BOS starts it where the model
    /// wants one, unless the template wrote it.
    pub fn tokens(&self, tok: &Tokenizer, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<Vec<u32>> {
        let text = self.render(messages, add_generation_prompt)?;
        // A template that writes the BOS itself gets no second one.
        let add_bos = self.bos.is_empty() || !text.starts_with(&self.bos);
        if !messages.iter().any(|m| tok.has_control_text(&m.content)) {
            return tok.encode(&text, add_bos);
        }
        // Each content where the template put it, in order (trimmed, where the template trims).
        let mut ids = Vec::new();
        let mut at = 0;
        for (i, m) in messages.iter().enumerate() {
            let found = [m.content.as_str(), m.content.trim()]
                .into_iter()
                .filter(|c| !c.is_empty())
                .find_map(|c| text[at..].find(c).map(|p| (at + p, c.len())));
            match found {
                Some((start, len)) => {
                    ids.extend(tok.encode(&text[at..start], at == 0 && add_bos)?);
                    ids.extend(tok.encode_text(&text[start..start + len])?);
                    at = start + len;
                }
                None if tok.has_control_text(&m.content) => {
                    return Err(Error::Template(format!(
                        "messages[{i}] holds control-token text and the chat template rewrites it, so it cannot be kept plain"
                    )))
                }
                None => {}
            }
        }
        ids.extend(tok.encode(&text[at..], at == 0 && add_bos)?);
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected text written from the template's definition (ChatML as SmolLM2 ships it).
    #[test]
    fn chatml_renders_with_default_system_prompt() {
        let src = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let t = ChatTemplate::new(src, "<|im_start|>", "<|im_end|>").unwrap();
        let out = t.render(&[ChatMessage::new("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}", "", "").unwrap();
        let e = t.render(&[], false).unwrap_err().to_string();
        assert!(e.contains("no system role"), "{e}");
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new("{{ messages[0].content.strip() }}", "", "").unwrap();
        assert_eq!(t.render(&[ChatMessage::new("user", "  x  ")], false).unwrap(), "x");
    }
}
