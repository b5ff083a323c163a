//! Validated configuration of the backend (pure; unit-tested).

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use crate::cli::Args;

pub const MAX_QUEUES: u16 = 16;
pub const SERIAL_LEN: usize = 20;
pub const MAX_POLL_US: u64 = 1000;
/// `--poll-us` when not given, with `--direct` (without it, 0).
pub const DEFAULT_POLL_US: u64 = MAX_POLL_US;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub socket: PathBuf,
    pub image: PathBuf,
    pub readonly: bool,
    pub direct: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: [u8; SERIAL_LEN],
    /// The longest a queue waiting for its disk watches for work
    /// (`--poll-us`; see `watch`).
    pub poll: Duration,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--num-queues {0:?}: expected 1 to {MAX_QUEUES}")]
    NumQueues(String),
    #[error("--queue-size {0:?}: expected a power of two from 4 to 32768")]
    QueueSize(String),
    #[error("--serial {0:?}: longer than {SERIAL_LEN} bytes")]
    Serial(String),
    #[error("--socket: the path is empty")]
    Socket,
    #[error("--poll-us {0:?}: expected 0 to {MAX_POLL_US} microseconds")]
    Poll(String),
    #[error("--poll-us {0}: only with --direct (without it a queue watches its ring for 50 us after each batch)")]
    PollWithoutDirect(u64),
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, ConfigError> {
        let num_queues = args
            .num_queues
            .parse::<u16>()
            .ok()
            .filter(|n| (1..=MAX_QUEUES).contains(n))
            .ok_or_else(|| ConfigError::NumQueues(args.num_queues.clone()))?;
        let queue_size = args
            .queue_size
            .parse::<u16>()
            .ok()
            // Room for a request's header and status around a data segment.
            .filter(|n| n.is_power_of_two() && *n >= 4)
            .ok_or_else(|| ConfigError::QueueSize(args.queue_size.clone()))?;
        let poll = match &args.poll_us {
            Some(us) => us
                .parse::<u64>()
                .ok()
                .filter(|us| *us <= MAX_POLL_US)
                .map(Duration::from_micros)
                .ok_or_else(|| ConfigError::Poll(us.clone()))?,
            None if args.direct => Duration::from_micros(DEFAULT_POLL_US),
            None => Duration::ZERO,
        };
        if !poll.is_zero() && !args.direct {
            return Err(ConfigError::PollWithoutDirect(poll.as_micros() as u64));
        }
        if args.socket.as_os_str().is_empty() {
            return Err(ConfigError::Socket);
        }
        let serial_text = match args.serial {
            Some(s) if s.len() > SERIAL_LEN => return Err(ConfigError::Serial(s)),
            Some(s) => s,
            None => args
                .image
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        let mut serial = [0u8; SERIAL_LEN];
        let bytes = serial_text.as_bytes();
        let n = bytes.len().min(SERIAL_LEN);
        serial[..n].copy_from_slice(&bytes[..n]);
        Ok(Config {
            socket: args.socket,
            image: args.image,
            readonly: args.readonly,
            direct: args.direct,
            num_queues,
            queue_size,
            serial,
            poll,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(queues: &str, size: &str, serial: Option<&str>) -> Args {
        Args {
            socket: "/tmp/s".into(),
            image: "/images/a-rather-long-image-name.img".into(),
            readonly: false,
            direct: false,
            num_queues: queues.into(),
            queue_size: size.into(),
            serial: serial.map(String::from),
            poll_us: None,
        }
    }

    #[test]
    fn defaults_and_serial() {
        let c = Config::try_from(args("2", "256", None)).unwrap();
        assert_eq!((c.num_queues, c.queue_size), (2, 256));
        // Watching is for queues whose transfers wait for a device.
        assert_eq!(c.poll, Duration::ZERO);
        let direct = Config::try_from(Args {
            direct: true,
            ..args("1", "8", None)
        })
        .unwrap();
        assert_eq!(direct.poll, Duration::from_micros(DEFAULT_POLL_US));
        assert_eq!(&c.serial, b"a-rather-long-image-");
        let c = Config::try_from(args("1", "128", Some("disk0"))).unwrap();
        assert_eq!(&c.serial[..6], b"disk0\0");
    }

    #[test]
    fn bad_values_are_named() {
        for (q, s) in [("0", "256"), ("17", "256"), ("x", "256")] {
            let err = Config::try_from(args(q, s, None)).unwrap_err();
            assert!(err.to_string().starts_with("--num-queues"), "{err}");
        }
        for s in ["0", "2", "100", "65536", "-1"] {
            let err = Config::try_from(args("1", s, None)).unwrap_err();
            assert!(err.to_string().starts_with("--queue-size"), "{err}");
        }
        let err = Config::try_from(args("1", "8", Some("012345678901234567890"))).unwrap_err();
        assert!(err.to_string().starts_with("--serial"));
        for us in ["1001", "-1", "x", ""] {
            let err = Config::try_from(Args {
                poll_us: Some(us.into()),
                ..args("1", "8", None)
            })
            .unwrap_err();
            assert_eq!(err, ConfigError::Poll(us.into()));
        }
        let err = Config::try_from(Args {
            poll_us: Some("30".into()),
            ..args("1", "8", None)
        })
        .unwrap_err();
        assert_eq!(err, ConfigError::PollWithoutDirect(30));
        let c = Config::try_from(Args {
            poll_us: Some("1000".into()),
            direct: true,
            ..args("1", "8", None)
        })
        .unwrap();
        assert_eq!(c.poll, Duration::from_millis(1));
        let c = Config::try_from(Args {
            poll_us: Some("0".into()),
            direct: true,
            ..args("1", "8", None)
        })
        .unwrap();
        assert_eq!(c.poll, Duration::ZERO);
    }
}
