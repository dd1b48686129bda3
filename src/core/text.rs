//! Text from a peer or from file names, made safe to print on one log line.
//!
//! A file name may hold a newline, an escape sequence or a bidirectional override; printed as
//! it is, it could forge a whole log line (`x\n2026-… WARN …`) or rewrite the terminal. Every
//! path and peer string is printed through [`Escaped`]: control characters become `\n`, `\t`,
//! `\r` or `\u{1b}`, bidi controls `\u{202e}`, and the backslash itself `\\`, so the printed
//! form is unambiguous.

use std::fmt::{self, Write};

/// Displays a string with control characters escaped.
pub struct Escaped<'a>(pub &'a str);

/// Characters that reorder text on screen (Unicode bidi controls): invisible, and able to make
/// a line read differently from what it holds.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if !s
            .chars()
            .any(|c| c == '\\' || c.is_control() || is_bidi_control(c))
        {
            return f.write_str(s);
        }
        for c in s.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c if c.is_control() || is_bidi_control(c) => write!(f, "\\u{{{:x}}}", c as u32)?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_break_a_line() {
        for (raw, shown) in [
            ("plain name.txt", "plain name.txt"),
            ("ünï cödé", "ünï cödé"),
            ("x\n2026 WARN forged", "x\\n2026 WARN forged"),
            ("a\rb\tc", "a\\rb\\tc"),
            ("esc\x1b[31m", "esc\\u{1b}[31m"),
            ("rtl\u{202e}txt.exe", "rtl\\u{202e}txt.exe"),
            ("back\\slash", "back\\\\slash"),
            ("del\x7f", "del\\u{7f}"),
        ] {
            let out = Escaped(raw).to_string();
            assert_eq!(out, shown);
            assert!(!out.contains('\n') && !out.contains('\x1b'));
        }
    }
}
