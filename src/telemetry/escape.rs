//! No log line can be forged: every character that could end a line, move a terminal's
//! cursor or restyle it is written as an escape, in the message and in every field of
//! every event and span, in both formats. Values often come from clients (a user agent,
//! a username): written verbatim, a `\r\n` or an ANSI sequence in one would let a client
//! write whole lines of its own. Done where lines are written, not where events are made,
//! so that no call site can forget it.
//!
//! - `pretty`: [`EscapedFields`] writes the fields, `name=value`.
//! - `json`: serde_json escapes ASCII control characters; [`EscapedJson`] escapes the
//!   rest (C1 controls, line separators, bidirectional marks), which JSON allows raw.

use std::fmt::{self, Write};
use std::io;

use tracing::Metadata;
use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::Writer;

/// The field formatter of the `pretty` format.
#[derive(Debug, Clone, Copy, Default)]
pub struct EscapedFields;

impl<'a> MakeVisitor<Writer<'a>> for EscapedFields {
    type Visitor = EscapedVisitor<'a>;

    fn make_visitor(&self, target: Writer<'a>) -> Self::Visitor {
        EscapedVisitor {
            writer: target,
            is_empty: true,
            result: Ok(()),
        }
    }
}

/// Writes one event's or span's fields, space-separated.
#[derive(Debug)]
pub struct EscapedVisitor<'a> {
    writer: Writer<'a>,
    is_empty: bool,
    result: fmt::Result,
}

impl EscapedVisitor<'_> {
    fn write(&mut self, field: &Field, value: Value<'_>) {
        if self.result.is_ok() {
            self.result = self.write_field(field, value);
        }
    }

    fn write_field(&mut self, field: &Field, value: Value<'_>) -> fmt::Result {
        let name = field.name();
        let name = name.strip_prefix("r#").unwrap_or(name);
        if !std::mem::take(&mut self.is_empty) {
            self.writer.write_char(' ')?;
        }
        if name != "message" {
            write!(self.writer, "{name}=")?;
        }
        match value {
            // A string is quoted, as the default formatter does.
            Value::Str(s) => write_quoted(&mut self.writer, s),
            Value::Text(text) if name == "message" => write_escaped(&mut self.writer, &text),
            // Other values are written bare while that is unambiguous (an address, a
            // number, a duration); one with a space, a quote, an `=` or anything escaped
            // is quoted, so it cannot pass for further fields either.
            Value::Text(text) if !text.is_empty() && text.chars().all(bare) => {
                self.writer.write_str(&text)
            }
            Value::Text(text) => write_quoted(&mut self.writer, &text),
        }
    }
}

enum Value<'a> {
    Str(&'a str),
    Text(String),
}

impl Visit for EscapedVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.write(field, Value::Text(value.to_owned()));
        } else {
            self.write(field, Value::Str(value));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        self.write(field, Value::Text(text));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, Value::Text(format!("{value:?}")));
    }
}

impl VisitOutput<fmt::Result> for EscapedVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for EscapedVisitor<'_> {
    fn writer(&mut self) -> &mut dyn Write {
        &mut self.writer
    }
}

/// Wraps the writer of the `json` format: each line, already JSON, has the characters
/// serde_json leaves raw and [`escaped`] names written as `\uXXXX` (they can only stand
/// inside JSON strings, so the line means the same).
#[derive(Debug, Clone)]
pub struct EscapedJson<M>(pub M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for EscapedJson<M> {
    type Writer = EscapedJsonWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        EscapedJsonWriter(self.0.make_writer())
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        EscapedJsonWriter(self.0.make_writer_for(meta))
    }
}

/// See [`EscapedJson`].
#[derive(Debug)]
pub struct EscapedJsonWriter<W>(W);

impl<W: io::Write> io::Write for EscapedJsonWriter<W> {
    /// Takes the whole buffer (the formatter hands over one whole line), so no character
    /// is ever split between two calls.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match std::str::from_utf8(buf) {
            Ok(line) if line.chars().any(|c| !c.is_ascii() && escaped(c)) => {
                let mut out = String::with_capacity(line.len() + 32);
                for c in line.chars() {
                    if !c.is_ascii() && escaped(c) {
                        // Every such character is in the Basic Multilingual Plane.
                        let _ = write!(out, "\\u{:04x}", u32::from(c));
                    } else {
                        out.push(c);
                    }
                }
                self.0.write_all(out.as_bytes())?;
            }
            _ => self.0.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Whether `c` may stand in a bare value.
fn bare(c: char) -> bool {
    !(c.is_whitespace() || c == '"' || c == '=' || c == '\\' || escaped(c))
}

/// Whether `c` is written as an escape: control characters (CR, LF, ESC, C1…), line and
/// paragraph separators, the marks that reorder text on screen (Trojan Source's set,
/// U+061C included), and the zero-width characters that hide text in plain sight.
fn escaped(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'
                | '\u{2066}'..='\u{2069}'
                | '\u{feff}'
        )
}

/// `text` with the characters [`escaped`] names written as escapes (`\u{1b}`, `\n`…),
/// for human output outside the logs (a session's user agent in `authd admin sessions`).
pub fn escape_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // Writing to a String cannot fail.
    let _ = write_escaped(&mut out, text);
    out
}

fn write_escaped(w: &mut impl Write, text: &str) -> fmt::Result {
    for c in text.chars() {
        if escaped(c) {
            write!(w, "{}", c.escape_default())?;
        } else {
            w.write_char(c)?;
        }
    }
    Ok(())
}

/// `"text"`, with `"` and `\` escaped as well.
fn write_quoted(w: &mut impl Write, text: &str) -> fmt::Result {
    w.write_char('"')?;
    for c in text.chars() {
        match c {
            '"' | '\\' => write!(w, "\\{c}")?,
            c if escaped(c) => write!(w, "{}", c.escape_default())?,
            c => w.write_char(c)?,
        }
    }
    w.write_char('"')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quoted(text: &str) -> String {
        let mut out = String::new();
        write_quoted(&mut out, text).unwrap();
        out
    }

    #[test]
    fn nothing_that_moves_the_cursor_or_restyles_is_written_raw() {
        let hostile = "a\r\nERROR authd::audit: x user_id=admin\u{1b}[31m\u{9b}\u{2028}\u{202e}\t\0\u{61c}\u{200b}\u{feff}";
        for out in [quoted(hostile), {
            let mut s = String::new();
            write_escaped(&mut s, hostile).unwrap();
            s
        }] {
            assert!(!out.chars().any(escaped), "{out:?}");
            assert!(out.contains(r"\r\nERROR"), "{out}");
            assert!(out.contains(r"\u{1b}[31m"), "{out}");
        }
        assert_eq!(quoted(r#"say "hi" \o/"#), r#""say \"hi\" \\o/""#);
        assert!(bare('.') && bare(':') && !bare(' ') && !bare('=') && !bare('"'));
    }

    #[test]
    fn json_lines_keep_their_meaning_without_raw_invisible_controls() {
        use std::io::Write as _;
        let value = "a\u{9b}31m\u{2028}b\u{202e}c\u{1b}[0m\r\nd é";
        let line = format!("{}\n", serde_json::json!({ "user_agent": value }));
        let mut out = EscapedJsonWriter(Vec::new());
        assert_eq!(out.write(line.as_bytes()).unwrap(), line.len());
        let written = String::from_utf8(out.0).unwrap();
        assert!(written.ends_with("}\n"));
        let body = written.trim_end_matches('\n');
        assert!(!body.chars().any(escaped), "{body:?}");
        let back: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(back["user_agent"], value);
    }
}
