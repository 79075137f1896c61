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
        // Llama 3.x templates date the system turn with it, as transformers and llama.cpp render.
        env.add_function("strftime_now", |format: String| strftime(&format, unix_now()));
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

/// Seconds since 1970 (UTC).
fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// `secs` (UTC) formatted as C's `strftime` does for `%d %e %m %Y %y %b %B %a %A %H %M %S %j
/// %%`; other directives are kept as written.
fn strftime(format: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] =
        ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    const DAYS: [&str; 7] = ["Thursday", "Friday", "Saturday", "Sunday", "Monday", "Tuesday", "Wednesday"];
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // The civil date of a day count (proleptic Gregorian calendar, eras of 400 years).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let day_of_year = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334][(month - 1) as usize] + day + (leap && month > 2) as i64;
    let (month_name, weekday) = (MONTHS[(month - 1) as usize], DAYS[days.rem_euclid(7) as usize]);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('H') => out.push_str(&format!("{:02}", rest / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rest % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rest % 60)),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
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
    fn strftime_formats_dates_as_c_does() {
        // 2024-07-26 13:05:09 UTC (Friday), 2000-03-01 (Wednesday, after a leap day), 1970-01-01.
        assert_eq!(strftime("%d %b %Y", 1_722_000_000 - 1_722_000_000 % 86_400 + 47_109), "26 Jul 2024");
        assert_eq!(
            strftime("%A %e %B %y, %H:%M:%S, day %j, 100%%", 1_722_000_000 - 1_722_000_000 % 86_400 + 47_109),
            "Friday 26 July 24, 13:05:09, day 208, 100%"
        );
        assert_eq!(strftime("%Y-%m-%d %a %j", 951_868_800), "2000-03-01 Wed 061");
        assert_eq!(strftime("%Y-%m-%d %a %Q", 0), "1970-01-01 Thu %Q");
    }

    /// A template in Llama 3's turn format using what its official templates use: the BOS
    /// string, today's date from `strftime_now`, the system message taken out of the list,
    /// `trim`, `tojson(indent=4)` of the tools, a mapping test.
    #[test]
    fn llama3_style_templates_render() {
        let src = r#"{{- bos_token }}{%- set date_string = strftime_now("%d %b %Y") %}
{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content']|trim %}{%- set messages = messages[1:] %}{%- else %}{%- set system = "" %}{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>

Today Date: " + date_string + "

" + system + "<|eot_id|>" }}
{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>

' + m['content'] | trim + '<|eot_id|>' }}{%- endfor %}
{%- if tools is defined and tools is not none %}{{- tools | tojson(indent=4) }}{%- endif %}
{%- if {} is mapping and add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>

' }}{%- endif %}"#;
        let t = ChatTemplate::new(src, "<|begin_of_text|>", "<|eot_id|>").unwrap();
        let out = t
            .render(
                &[
                    ChatMessage::new("system", " Be brief. "),
                    ChatMessage::new(
                        "user", "Hi
",
                    ),
                ],
                true,
            )
            .unwrap();
        let today = strftime("%d %b %Y", unix_now());
        let want = format!(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nToday Date: {today}\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        assert_eq!(out, want);
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
