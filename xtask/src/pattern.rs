//! Line patterns for log checks and readiness lines: substring match, `*` wildcards, `{name}` captures.
//!
//! A full regex engine would cost a dependency and compile time for very little: every pattern the
//! scenarios and profiles need is "this text appears in a line", sometimes with a gap (`*`) or a
//! number to pick up (`{port}`). Keeping the language this small also keeps scenario files readable.
//!
//! * A pattern matches a line when it matches any part of it (no anchoring).
//! * `*` matches any run of characters, including none.
//! * `{name}` (lowercase letters, digits, `_`) matches one or more ASCII digits and captures them.
//! * `\*`, `\{` and `\\` stand for the literal characters.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{Result, bail};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Literal(String),
    Star,
    Capture(String),
}

/// A compiled line pattern; see the module documentation for the syntax.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    source: String,
    tokens: Vec<Token>,
}

/// The digits captured by `{name}` groups of a successful match.
pub type Captures = BTreeMap<String, String>;

impl Pattern {
    /// Compiles `source`; fails on an empty pattern or a dangling backslash.
    pub fn new(source: &str) -> Result<Self> {
        if source.is_empty() {
            bail!("empty pattern");
        }
        let mut tokens = Vec::new();
        let mut literal = String::new();
        let mut chars = source.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, escaped)) => literal.push(escaped),
                    None => bail!("pattern {source:?} ends with a lone backslash"),
                },
                '*' => {
                    flush(&mut literal, &mut tokens);
                    // Consecutive stars mean the same as one; collapsing them keeps matching linear.
                    if tokens.last() != Some(&Token::Star) {
                        tokens.push(Token::Star);
                    }
                }
                '{' => match capture_name(&source[i + 1..]) {
                    Some(name) => {
                        flush(&mut literal, &mut tokens);
                        tokens.push(Token::Capture(name.to_string()));
                        for _ in 0..=name.len() {
                            chars.next();
                        }
                    }
                    None => literal.push('{'),
                },
                _ => literal.push(c),
            }
        }
        flush(&mut literal, &mut tokens);
        Ok(Pattern {
            source: source.to_string(),
            tokens,
        })
    }

    /// The text the pattern was compiled from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Names of the `{name}` captures, in order.
    pub fn capture_names(&self) -> Vec<&str> {
        self.tokens
            .iter()
            .filter_map(|t| match t {
                Token::Capture(n) => Some(n.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Whether the pattern occurs anywhere in `line`.
    pub fn is_match(&self, line: &str) -> bool {
        self.captures(line).is_some()
    }

    /// Matches the pattern against `line` (anywhere in it) and returns the captures.
    pub fn captures(&self, line: &str) -> Option<Captures> {
        let mut caps = Vec::new();
        for (start, _) in line
            .char_indices()
            .chain(std::iter::once((line.len(), ' ')))
        {
            if match_here(&self.tokens, &line[start..], &mut caps) {
                return Some(caps.into_iter().collect());
            }
            caps.clear();
        }
        None
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn flush(literal: &mut String, tokens: &mut Vec<Token>) {
    if !literal.is_empty() {
        tokens.push(Token::Literal(std::mem::take(literal)));
    }
}

/// The capture name at the start of `rest` if it is `name}`; otherwise `{` is a literal brace.
fn capture_name(rest: &str) -> Option<&str> {
    let end = rest.find('}')?;
    let name = &rest[..end];
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    valid.then_some(name)
}

/// Backtracking matcher anchored at the start of `text`; the end is free (substring semantics).
fn match_here(tokens: &[Token], text: &str, caps: &mut Vec<(String, String)>) -> bool {
    let Some((first, rest)) = tokens.split_first() else {
        return true;
    };
    match first {
        Token::Literal(lit) => text
            .strip_prefix(lit.as_str())
            .is_some_and(|after| match_here(rest, after, caps)),
        Token::Star => {
            if rest.is_empty() {
                return true;
            }
            text.char_indices()
                .map(|(i, _)| i)
                .chain(std::iter::once(text.len()))
                .any(|i| match_here(rest, &text[i..], caps))
        }
        Token::Capture(name) => {
            let digits = text.bytes().take_while(u8::is_ascii_digit).count();
            // Longest first, so `{port}` takes the whole number when nothing follows it.
            for len in (1..=digits).rev() {
                caps.push((name.clone(), text[..len].to_string()));
                if match_here(rest, &text[len..], caps) {
                    return true;
                }
                caps.pop();
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substring_match() {
        let p = Pattern::new("sync:done").unwrap();
        assert!(p.is_match("2026-01-01T00:00:00Z  INFO sync:done (3 files)"));
        assert!(!p.is_match("sync:don"));
    }

    #[test]
    fn wildcard_and_escapes() {
        let p = Pattern::new("Received file: * (* bytes, md5 ok)").unwrap();
        assert!(p.is_match("INFO Received file: a b.txt (12 bytes, md5 ok)"));
        assert!(!p.is_match("INFO Received file: a.txt (12 bytes)"));
        let lit = Pattern::new(r"a\*b\{port}").unwrap();
        assert!(lit.is_match("xa*b{port}y"));
        assert!(!lit.is_match("axb12"));
    }

    #[test]
    fn captures_ports() {
        let p = Pattern::new("listening control=*:{port} data=*:{data_port}").unwrap();
        let caps = p
            .captures("listening control=127.0.0.1:41234 data=127.0.0.1:41235")
            .unwrap();
        assert_eq!(caps["port"], "41234");
        assert_eq!(caps["data_port"], "41235");
        assert_eq!(p.capture_names(), ["port", "data_port"]);
        assert!(
            p.captures("listening control=127.0.0.1: data=x:1")
                .is_none()
        );
    }

    #[test]
    fn braces_that_are_not_captures_are_literal() {
        let p = Pattern::new("{\"k\": 1}").unwrap();
        assert!(p.is_match("x {\"k\": 1} y"));
        assert!(Pattern::new("").is_err());
        assert!(Pattern::new("abc\\").is_err());
    }

    #[test]
    fn non_ascii_lines() {
        let p = Pattern::new("Renaming file: ü*.txt to ✓.txt").unwrap();
        assert!(p.is_match("INFO Renaming file: ünï.txt to ✓.txt"));
    }
}
