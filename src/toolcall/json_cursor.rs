//! Where a prefix of JSON text stands: inside a string or a number (and how long that number is),
//! at which field. The argument constraint bounds numbers with it; a call that runs out of tokens
//! names the field it was writing.

/// Most digits of a number's integer part the model may write: JSON Schema has no length bound for
/// numbers, and a model repeating a digit writes one until the context is full. Sixteen digits
/// hold every integer an f64 represents exactly (2^53 has sixteen).
pub const MAX_INTEGER_DIGITS: u8 = 16;
/// Most digits after a number's decimal point.
pub const MAX_FRACTION_DIGITS: u8 = 16;
/// Most digits of a number's exponent: with the integer bound every number the model may write is
/// below 10^116 in magnitude, within f64's range (three digits would allow 1E999, which a JSON
/// reader refuses).
pub const MAX_EXPONENT_DIGITS: u8 = 2;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum NumberPart {
    Integer,
    Fraction,
    Exponent,
}

impl NumberPart {
    fn max_digits(self) -> u8 {
        match self {
            NumberPart::Integer => MAX_INTEGER_DIGITS,
            NumberPart::Fraction => MAX_FRACTION_DIGITS,
            NumberPart::Exponent => MAX_EXPONENT_DIGITS,
        }
    }
}

/// The lexical state after a prefix of JSON text: small and `Copy`, so a token's bytes can be
/// tried from it for every token of the vocabulary.
#[derive(Clone, Copy, Default, Debug)]
pub struct Lexeme {
    in_string: bool,
    escaped: bool,
    /// The number being written: its current part and that part's digits so far.
    number: Option<(NumberPart, u8)>,
}

impl Lexeme {
    /// Advance past `byte`; `false` where a number's part would get more digits than its bound.
    /// The text is assumed valid JSON (the grammar sees to that); this only tracks lengths.
    pub fn push(&mut self, byte: u8) -> bool {
        if self.in_string {
            match (self.escaped, byte) {
                (true, _) => self.escaped = false,
                (false, b'\\') => self.escaped = true,
                (false, b'"') => self.in_string = false,
                _ => {}
            }
            return true;
        }
        self.number = match (byte, self.number) {
            (b'0'..=b'9', Some((part, n))) => {
                let n = n.saturating_add(1);
                if n > part.max_digits() {
                    return false;
                }
                Some((part, n))
            }
            (b'0'..=b'9', None) => Some((NumberPart::Integer, 1)),
            (b'-', None) => Some((NumberPart::Integer, 0)),
            (b'.', Some((NumberPart::Integer, _))) => Some((NumberPart::Fraction, 0)),
            (b'e' | b'E', Some(_)) => Some((NumberPart::Exponent, 0)),
            (b'+' | b'-', Some((NumberPart::Exponent, 0))) => self.number,
            (b'"', _) => {
                self.in_string = true;
                None
            }
            _ => None,
        };
        true
    }

    /// Whether `bytes` can follow without a number passing its bounds.
    pub fn accepts(mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.push(b))
    }
}

#[derive(Debug)]
enum Frame {
    /// An object: the latest key, and whether a key (not a value) comes next.
    Object { key: String, at_key: bool },
    /// An array: the index of the item being written.
    Array { index: usize },
}

/// Follows JSON text byte by byte: its [`Lexeme`] and the path of the field being written.
#[derive(Default, Debug)]
pub struct JsonCursor {
    lexeme: Lexeme,
    stack: Vec<Frame>,
    /// The bytes of an object key being read.
    key: Option<Vec<u8>>,
}

impl JsonCursor {
    /// The lexical state (to try a token's bytes from).
    pub fn lexeme(&self) -> Lexeme {
        self.lexeme
    }

    /// Advance past `bytes`.
    pub fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            let was_in_string = self.lexeme.in_string;
            self.lexeme.push(b);
            match (was_in_string, self.lexeme.in_string) {
                (true, true) => {
                    if let Some(k) = &mut self.key {
                        k.push(b);
                    }
                }
                (true, false) => {
                    if let (Some(k), Some(Frame::Object { key, .. })) = (self.key.take(), self.stack.last_mut()) {
                        *key = String::from_utf8_lossy(&k).into_owned();
                    }
                }
                (false, true) => {
                    if let Some(Frame::Object { at_key: true, .. }) = self.stack.last() {
                        self.key = Some(Vec::new());
                    }
                }
                (false, false) => self.structure(b),
            }
        }
    }

    fn structure(&mut self, b: u8) {
        match (b, self.stack.last_mut()) {
            (b'{', _) => self.stack.push(Frame::Object { key: String::new(), at_key: true }),
            (b'[', _) => self.stack.push(Frame::Array { index: 0 }),
            (b'}' | b']', _) => {
                self.stack.pop();
            }
            (b':', Some(Frame::Object { at_key, .. })) => *at_key = false,
            (b',', Some(Frame::Object { at_key, .. })) => *at_key = true,
            (b',', Some(Frame::Array { index })) => *index += 1,
            _ => {}
        }
    }

    /// The field being written, as `entities[3].observations[0]`; empty at the top level.
    pub fn path(&self) -> String {
        let mut s = String::new();
        for f in &self.stack {
            match f {
                Frame::Object { key, .. } if key.is_empty() => {}
                Frame::Object { key, .. } if s.is_empty() => s.push_str(key),
                Frame::Object { key, .. } => {
                    s.push('.');
                    s.push_str(key);
                }
                Frame::Array { index } => s.push_str(&format!("[{index}]")),
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor(text: &str) -> JsonCursor {
        let mut c = JsonCursor::default();
        c.push(text.as_bytes());
        c
    }

    #[test]
    fn paths_follow_keys_and_indices() {
        assert_eq!(cursor(r#"{"entities":[{"name":"a"},{"observations":["x","y"#).path(), "entities[1].observations[1]");
        assert_eq!(cursor(r#"{"a":{"b":1},"c":"#).path(), "c");
        assert_eq!(cursor(r#"{"a\"b":"#).path(), r#"a\"b"#);
        assert_eq!(cursor(r#"{"a":"{[,:"#).path(), "a", "structure inside a string is text");
        assert_eq!(cursor(r#"[1,2,"#).path(), "[2]");
        assert_eq!(cursor("").path(), "");
    }

    #[test]
    fn numbers_are_bounded_by_part() {
        let sixteen = "1".repeat(16);
        let at = |text: &str| cursor(text).lexeme();
        assert!(at("{\"n\":").accepts(sixteen.as_bytes()));
        assert!(!at("{\"n\":").accepts(format!("{sixteen}1").as_bytes()));
        assert!(!at(&format!("{{\"n\":-{sixteen}")).accepts(b"0"));
        assert!(at(&format!("{{\"n\":{sixteen}")).accepts(format!(".{sixteen}e+99,").as_bytes()));
        assert!(!at(&format!("{{\"n\":1.{sixteen}")).accepts(b"1"));
        assert!(!at("{\"n\":1e-10").accepts(b"0"));
        // A number ends at what is not part of it; the next one starts from nothing.
        assert!(at(&format!("[{sixteen},")).accepts(sixteen.as_bytes()));
        // Digits inside strings, and the e of true, are not numbers.
        assert!(at(&format!("{{\"s\":\"{sixteen}")).accepts(sixteen.as_bytes()));
        assert!(at("[true,").accepts(sixteen.as_bytes()));
        assert!(at(r#"{"s":"\""#).accepts(sixteen.as_bytes()));
    }
}
