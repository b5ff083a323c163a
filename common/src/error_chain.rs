//! One-line rendering of an error and all of its sources.

use std::error::Error;
use std::fmt::Write;

/// Joins an error and its `source()` chain with `": "`, the form `main`
/// prints before exiting: `error: cannot load kernel "x": No such file`.
pub fn render(error: &dyn Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // Some libraries repeat their source in their own message; skip the echo.
        if !line.ends_with(&text) {
            // Writing to a String cannot fail.
            let _ = write!(line, ": {text}");
        }
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::render;
    use std::fmt;

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "cannot open \"disk.img\"")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn renders_whole_chain_on_one_line() {
        let err = Outer(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "not found",
        ));
        assert_eq!(render(&err), "cannot open \"disk.img\": not found");
    }
}
