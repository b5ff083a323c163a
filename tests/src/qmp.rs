//! A minimal raw QMP client for tests: line-oriented JSON over a Unix
//! socket, keeping the events it reads past.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

pub struct RawQmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events read past and not taken by `wait_event` yet (whole lines).
    pub events: Vec<String>,
}

impl RawQmp {
    /// Connects (retrying until the socket exists) and reads the greeting.
    pub fn connect(path: &Path) -> (RawQmp, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    panic!("cannot connect to {}: {e}", path.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut qmp = RawQmp {
            reader: BufReader::new(stream.try_clone().expect("clone")),
            writer: stream,
            events: Vec::new(),
        };
        let greeting = qmp.read_line().expect("greeting");
        (qmp, greeting)
    }

    /// The next line, or None at end of stream.
    pub fn read_line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim_end().to_string()),
        }
    }

    /// Another handle on the connection, for writing from another thread.
    pub fn writer(&self) -> UnixStream {
        self.writer.try_clone().expect("clone the QMP connection")
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("send");
    }

    /// Sends what the peer accepts; it may close the connection midway.
    pub fn send_until_closed(&mut self, bytes: &[u8]) {
        let _ = self.writer.write_all(bytes);
    }

    /// Sends `text` and returns the next reply line (events are kept).
    pub fn request(&mut self, text: &str) -> String {
        self.send_raw(text.as_bytes());
        self.send_raw(b"\n");
        self.reply()
    }

    /// The next non-event line.
    pub fn reply(&mut self) -> String {
        loop {
            let line = self.read_line().expect("the connection closed");
            if line.starts_with("{\"event\"") || line.contains("\"event\":") {
                self.events.push(line);
                continue;
            }
            return line;
        }
    }

    /// Waits for the next event called `name` and takes it: the oldest one
    /// read past and not taken yet, else the next to come. Each event is
    /// returned once, so waiting twice needs two events.
    pub fn wait_event(&mut self, name: &str) -> String {
        let pattern = format!("\"event\":\"{name}\"");
        if let Some(at) = self.events.iter().position(|e| e.contains(&pattern)) {
            return self.events.remove(at);
        }
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => panic!("the VMM closed QMP before the {name} event"),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("no {name} event within the 30 s read timeout")
                }
                Err(e) => panic!("reading QMP before the {name} event: {e}"),
                Ok(_) => {}
            }
            let line = line.trim_end().to_string();
            if line.contains(&pattern) {
                return line;
            }
            self.events.push(line);
        }
    }

    /// Waits for the DEVICE_BACKEND event, checks that it reports the
    /// backend `connected` or not, and forgets the events read so far.
    pub fn expect_backend(&mut self, connected: bool) -> String {
        let event = self.wait_event("DEVICE_BACKEND");
        let expected = format!("\"connected\":{connected}");
        assert!(event.contains(&expected), "{event}");
        self.events.clear();
        event
    }

    /// Negotiates capabilities.
    pub fn negotiate(&mut self) {
        let reply = self.request(r#"{"execute": "qmp_capabilities"}"#);
        assert_eq!(reply, r#"{"return":{}}"#);
    }
}
