//! Splits the bytes a QMP client sends into JSON values without parsing
//! them: braces and brackets are matched outside strings. A value larger
//! than `MAX_MESSAGE` ends the connection (the stream cannot be resynced);
//! stray text between values is reported once per line, and a value closed
//! by the wrong bracket is reported once, and the rest of its line dropped.

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
    /// After a wrong closing bracket: everything up to the end of the line
    /// is dropped (it belongs to the broken value, objects inside it too).
    skipping_line: bool,
}

impl Splitter {
    /// Feeds bytes; returns the pieces they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Piece> {
        let mut out = Vec::new();
        for &b in bytes {
            if self.skipping_line {
                self.skipping_line = b != b'\n';
                continue;
            }
            if self.closers.is_empty() {
                match b {
                    b'{' | b'[' => {
                        self.in_garbage = false;
                        self.current.clear();
                        self.current.push(b);
                        self.closers.push(closer(b));
                    }
                    b'\n' => self.in_garbage = false,
                    b' ' | b'\t' | b'\r' => {}
                    _ => {
                        if !self.in_garbage {
                            self.in_garbage = true;
                            out.push(Piece::Garbage);
                        }
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
                match (self.escaped, b) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
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
                    // drop the value and the rest of its line, which is
                    // not reported again and runs nothing.
                    out.push(Piece::Mismatched);
                    *self = Splitter {
                        skipping_line: true,
                        ..Splitter::default()
                    };
                }
                _ => {}
            }
        }
        out
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

    #[test]
    fn a_wrong_closing_bracket_drops_the_rest_of_its_line_and_the_next_is_kept() {
        let mut s = Splitter::default();
        // The object inside the broken value does not run.
        assert_eq!(
            s.push(br#"{"a": [1}, "b": {"execute": "quit"}}"#),
            vec![Piece::Mismatched]
        );
        assert_eq!(
            s.push(b"\n{\"execute\": \"x\", \"y\": [{}]}"),
            vec![Piece::Value(br#"{"execute": "x", "y": [{}]}"#.to_vec())]
        );
        assert_eq!(s.push(b"[}]\n]"), vec![Piece::Mismatched, Piece::Garbage]);
    }
}
