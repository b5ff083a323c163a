//! Splits the bytes a QMP client sends into JSON values without parsing
//! them: braces and brackets are matched outside strings. A value larger
//! than `MAX_MESSAGE` ends the connection (the stream cannot be resynced);
//! stray text between values is reported once per line (brackets in a
//! string in it start nothing), a value closed by the wrong bracket is
//! reported once and dropped up to where its brackets, counted without
//! regard to kind, close (or the line ends), and a value whose string runs
//! into the end of a line (JSON strings hold no raw newline: a missing
//! quote) is reported and dropped, so the next line is heard. A line of
//! stray text, or the rest of a broken value, longer than `MAX_MESSAGE`
//! ends the connection too: strings in them can hide every value that
//! follows, so a client that sends no newlines cannot keep the server deaf.

/// Largest message accepted from a client.
pub const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// The bytes of one complete JSON object or array.
    Value(Vec<u8>),
    /// Text that is not a JSON object or array (a parse error to report).
    Garbage,
    /// A value closed by the wrong bracket, such as `{"a": 1]`.
    Mismatched,
    /// A value whose string the line ended in, such as `{"a": "b}`.
    Unterminated,
    /// A value exceeded MAX_MESSAGE.
    TooLong,
}

#[derive(Default)]
pub struct Splitter {
    current: Vec<u8>,
    /// The closing bracket each open one expects, innermost last.
    closers: Vec<u8>,
    in_string: bool,
    escaped: bool,
    /// Inside a run of stray text already reported.
    in_garbage: bool,
    /// After a wrong closing bracket: how many brackets of the broken value
    /// are still open. What follows is dropped (objects inside it too)
    /// until they close or the line ends, so a client that sends no
    /// newlines is heard again after the broken value.
    skipping: Option<usize>,
    /// Bytes dropped so far in a line of stray text or a broken value.
    dropped: usize,
}

impl Splitter {
    /// Feeds bytes; returns the pieces they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Piece> {
        let mut out = Vec::new();
        for &b in bytes {
            let dropping = self.skipping.is_some() || (self.closers.is_empty() && self.in_garbage);
            if dropping {
                self.dropped += 1;
                if self.dropped > MAX_MESSAGE {
                    out.push(Piece::TooLong);
                    *self = Splitter::default();
                    return out;
                }
            }
            if let Some(open) = self.skipping {
                self.skip(b, open);
                continue;
            }
            if self.closers.is_empty() {
                if self.in_string {
                    // A string in stray text, up to its end or the line's.
                    if b == b'\n' {
                        *self = Splitter::default();
                    } else {
                        self.string_byte(b);
                    }
                    continue;
                }
                match b {
                    b'{' | b'[' => {
                        self.in_garbage = false;
                        self.dropped = 0;
                        self.current.clear();
                        self.current.push(b);
                        self.closers.push(closer(b));
                    }
                    b'\n' => {
                        self.in_garbage = false;
                        self.dropped = 0;
                    }
                    b' ' | b'\t' | b'\r' => {}
                    _ => {
                        if !self.in_garbage {
                            self.in_garbage = true;
                            out.push(Piece::Garbage);
                        }
                        self.in_string = b == b'"';
                    }
                }
                continue;
            }
            self.current.push(b);
            if self.current.len() > MAX_MESSAGE {
                out.push(Piece::TooLong);
                *self = Splitter::default();
                return out;
            }
            if self.in_string {
                if b == b'\n' {
                    out.push(Piece::Unterminated);
                    *self = Splitter::default();
                } else {
                    self.string_byte(b);
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.closers.push(closer(b)),
                b'}' | b']' if self.closers.last() == Some(&b) => {
                    self.closers.pop();
                    if self.closers.is_empty() {
                        out.push(Piece::Value(std::mem::take(&mut self.current)));
                    }
                }
                b'}' | b']' => {
                    // The brackets left open would swallow what follows:
                    // drop the value up to where it closes, counting
                    // brackets of either kind, or to the end of its line.
                    // What is dropped is not reported again and runs
                    // nothing.
                    out.push(Piece::Mismatched);
                    let open = self.closers.len() - 1;
                    *self = Splitter::default();
                    if open > 0 {
                        self.skipping = Some(open);
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// One byte inside a string: only an unescaped quote ends it.
    fn string_byte(&mut self, b: u8) {
        match (self.escaped, b) {
            (true, _) => self.escaped = false,
            (false, b'\\') => self.escaped = true,
            (false, b'"') => self.in_string = false,
            _ => {}
        }
    }

    /// One byte of a broken value being dropped, `open` brackets deep.
    fn skip(&mut self, b: u8, open: usize) {
        if b == b'\n' {
            // JSON strings hold no raw newline: the line ends here.
            *self = Splitter::default();
            return;
        }
        if self.in_string {
            self.string_byte(b);
            return;
        }
        self.skipping = match b {
            b'"' => {
                self.in_string = true;
                Some(open)
            }
            b'{' | b'[' => Some(open.saturating_add(1)),
            b'}' | b']' if open == 1 => {
                self.dropped = 0;
                None
            }
            b'}' | b']' => Some(open - 1),
            _ => Some(open),
        };
    }
}

fn closer(opener: u8) -> u8 {
    if opener == b'{' {
        b'}'
    } else {
        b']'
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_split_across_reads_and_strings_are_respected() {
        let mut s = Splitter::default();
        assert!(s.push(br#"{"execute": "a}{"#).is_empty());
        let pieces = s.push(br#"b", "x": [1, {"y": "\"}"}]} {"execute":"c"}"#);
        assert_eq!(
            pieces,
            vec![
                Piece::Value(br#"{"execute": "a}{b", "x": [1, {"y": "\"}"}]}"#.to_vec()),
                Piece::Value(br#"{"execute":"c"}"#.to_vec()),
            ]
        );
    }

    /// A missing quote ends with its line: the next command is heard.
    #[test]
    fn a_string_left_open_ends_with_its_line() {
        let mut s = Splitter::default();
        assert_eq!(
            s.push(b"{\"execute\": \"query-status}\n{\"execute\": \"stop\"}\n"),
            vec![
                Piece::Unterminated,
                Piece::Value(br#"{"execute": "stop"}"#.to_vec())
            ]
        );
    }

    /// A command sent as a JSON string is one line of stray text: the
    /// brace inside the string starts no value.
    #[test]
    fn brackets_in_a_string_in_stray_text_start_nothing() {
        let mut s = Splitter::default();
        assert_eq!(
            s.push(b"\"{\\\"execute\\\": \\\"stop\\\"}\"\n{\"execute\": \"cont\"}\n"),
            vec![
                Piece::Garbage,
                Piece::Value(br#"{"execute": "cont"}"#.to_vec())
            ]
        );
        // An unclosed one ends with its line too.
        assert_eq!(
            s.push(b"x \"{ [\n{}\n"),
            vec![Piece::Garbage, Piece::Value(b"{}".to_vec())]
        );
    }

    #[test]
    fn garbage_is_reported_once_per_line_and_long_values_are_cut() {
        let mut s = Splitter::default();
        assert_eq!(
            s.push(b"hello world\nbye\n"),
            vec![Piece::Garbage, Piece::Garbage]
        );
        let mut huge = b"{\"a\": \"".to_vec();
        huge.resize(MAX_MESSAGE + 10, b'x');
        assert_eq!(s.push(&huge), vec![Piece::TooLong]);
    }

    /// Stray text or the rest of a broken value, whose strings hide the
    /// values that follow, is cut at MAX_MESSAGE like a value when no
    /// newline ends it; a newline starts the count again.
    #[test]
    fn text_dropped_without_a_newline_is_cut_at_the_limit() {
        let command = br#"{"execute": "stop"}"#;
        for start in [&b"x\""[..], &b"{\"a\": [}, \""[..]] {
            let mut s = Splitter::default();
            let mut sent = start.to_vec();
            while sent.len() <= MAX_MESSAGE + start.len() {
                sent.extend_from_slice(command);
            }
            let pieces = s.push(&sent);
            assert_eq!(pieces.last(), Some(&Piece::TooLong), "{pieces:?}");
            assert!(!pieces.iter().any(|p| matches!(p, Piece::Value(_))));
        }
        let mut s = Splitter::default();
        let mut sent = Vec::new();
        while sent.len() <= 2 * MAX_MESSAGE {
            sent.extend_from_slice(b"x \"a string\"\n");
        }
        assert!(s.push(&sent).iter().all(|p| *p == Piece::Garbage));
        assert_eq!(s.push(command), vec![Piece::Value(command.to_vec())]);
    }

    #[test]
    fn a_wrong_closing_bracket_drops_the_broken_value_and_what_follows_is_kept() {
        let mut s = Splitter::default();
        // The object inside the broken value does not run; the one after
        // it does, with no newline between them.
        assert_eq!(
            s.push(br#"{"a": [1}, "b": {"execute": "quit", "c": "]}"}}{"execute": "x"}"#),
            vec![
                Piece::Mismatched,
                Piece::Value(br#"{"execute": "x"}"#.to_vec())
            ]
        );
        // A broken value left open ends with its line.
        assert_eq!(
            s.push(b"{\"a\": [[[}, {\"execute\": \"quit\"}"),
            vec![Piece::Mismatched]
        );
        assert_eq!(
            s.push(b"\n{\"execute\": \"x\", \"y\": [{}]}"),
            vec![Piece::Value(br#"{"execute": "x", "y": [{}]}"#.to_vec())]
        );
        // Closed at once: the stray bracket after it is stray text.
        assert_eq!(
            s.push(b"[}]\n]"),
            vec![Piece::Mismatched, Piece::Garbage, Piece::Garbage]
        );
    }
}
