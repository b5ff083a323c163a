//! Validated configuration of the backend (pure; unit-tested).

use std::path::PathBuf;

use thiserror::Error;

use crate::cli::Args;

/// Virtqueues at most: 16 queue pairs.
pub const MAX_QUEUES: u16 = 32;
/// An interface name's longest length (IFNAMSIZ less the NUL).
pub const IFNAME_MAX: usize = 15;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub socket: PathBuf,
    pub tap: String,
    pub num_queues: u16,
    pub queue_size: u16,
}

impl Config {
    /// Queue pairs (rx, tx), one tap queue each.
    pub fn pairs(&self) -> usize {
        usize::from(self.num_queues / 2)
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "--num-queues {0:?}: expected an even number from 2 to {MAX_QUEUES} (rx and tx per pair)"
    )]
    NumQueues(String),
    #[error("--queue-size {0:?}: expected a power of two from 1 to 32768")]
    QueueSize(String),
    #[error("--tap {0:?}: {1}")]
    Tap(String, &'static str),
    #[error("--socket: the path is empty")]
    Socket,
}

/// Why `name` cannot be an interface name (the kernel's `dev_valid_name`,
/// without `%d` templates: every queue must open the same interface).
fn tap_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("the name is empty")
    } else if name.len() > IFNAME_MAX {
        Some("longer than 15 bytes, the limit of an interface name")
    } else if name == "." || name == ".." {
        Some("not an interface name")
    } else if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == b'%' || b == 0 || b.is_ascii_whitespace())
    {
        Some("an interface name cannot hold '/', ':', '%', NUL or white space")
    } else {
        None
    }
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, ConfigError> {
        let num_queues = args
            .num_queues
            .parse::<u16>()
            .ok()
            .filter(|n| (2..=MAX_QUEUES).contains(n) && n % 2 == 0)
            .ok_or_else(|| ConfigError::NumQueues(args.num_queues.clone()))?;
        let queue_size = args
            .queue_size
            .parse::<u16>()
            .ok()
            .filter(|n| n.is_power_of_two())
            .ok_or_else(|| ConfigError::QueueSize(args.queue_size.clone()))?;
        if let Some(problem) = tap_name_problem(&args.tap) {
            return Err(ConfigError::Tap(args.tap, problem));
        }
        if args.socket.as_os_str().is_empty() {
            return Err(ConfigError::Socket);
        }
        Ok(Config {
            socket: args.socket,
            tap: args.tap,
            num_queues,
            queue_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(tap: &str, queues: &str, size: &str) -> Args {
        Args {
            socket: "/tmp/s".into(),
            tap: tap.into(),
            num_queues: queues.into(),
            queue_size: size.into(),
        }
    }

    #[test]
    fn defaults_and_pairs() {
        let c = Config::try_from(args("tap0", "2", "256")).unwrap();
        assert_eq!((c.num_queues, c.queue_size, c.pairs()), (2, 256, 1));
        let c = Config::try_from(args("a-15-byte-name.", "32", "32768")).unwrap();
        assert_eq!((c.pairs(), c.tap.len()), (16, 15));
    }

    #[test]
    fn bad_values_are_named() {
        for q in ["0", "1", "3", "34", "x", "-2"] {
            let err = Config::try_from(args("tap0", q, "256")).unwrap_err();
            assert!(err.to_string().starts_with("--num-queues"), "{err}");
        }
        for s in ["0", "100", "65536", "-1"] {
            let err = Config::try_from(args("tap0", "2", s)).unwrap_err();
            assert!(err.to_string().starts_with("--queue-size"), "{err}");
        }
        for t in [
            "",
            "a-16-byte-name.x",
            ".",
            "..",
            "a/b",
            "a:1",
            "tap%d",
            "a b",
        ] {
            let err = Config::try_from(args(t, "2", "256")).unwrap_err();
            assert!(err.to_string().starts_with("--tap"), "{err}");
        }
        let mut a = args("tap0", "2", "256");
        a.socket = "".into();
        assert_eq!(Config::try_from(a), Err(ConfigError::Socket));
    }
}
