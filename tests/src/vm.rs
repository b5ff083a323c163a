//! Spawning the vmm and watching its console.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How a test VM is started.
#[derive(Debug, Clone)]
pub struct VmBuilder {
    kernel: PathBuf,
    cmdline: String,
    cpus: u32,
    memory: String,
    extra: Vec<OsString>,
}

impl VmBuilder {
    pub fn new(kernel: impl AsRef<Path>) -> Self {
        VmBuilder {
            kernel: kernel.as_ref().to_path_buf(),
            cmdline: String::new(),
            cpus: 1,
            memory: "512M".into(),
            extra: Vec::new(),
        }
    }

    pub fn cmdline(mut self, cmdline: &str) -> Self {
        self.cmdline = cmdline.into();
        self
    }

    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    pub fn memory(mut self, memory: &str) -> Self {
        self.memory = memory.into();
        self
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.extra.push(arg.into());
        self
    }

    /// The full command line (serial on stdout).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(crate::vmm_bin());
        cmd.arg("--kernel")
            .arg(&self.kernel)
            .arg("--cmdline")
            .arg(&self.cmdline)
            .arg("--cpus")
            .arg(self.cpus.to_string())
            .arg("--memory")
            .arg(&self.memory)
            .arg("--serial")
            .arg("stdio")
            .args(&self.extra);
        cmd
    }

    /// Starts the VM with the console on a pipe.
    pub fn spawn(&self) -> RunningVm {
        RunningVm::spawn(self.command())
    }
}

/// What has been read so far, and whether the pipe has closed.
type Captured = Mutex<(Vec<u8>, bool)>;

/// Bytes read from a pipe by a background thread.
#[derive(Clone, Default)]
pub struct Output {
    inner: Arc<(Captured, Condvar)>,
}

impl Output {
    pub fn capture(mut source: impl Read + Send + 'static) -> Self {
        let output = Output::default();
        let inner = output.inner.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = source.read(&mut buf).unwrap_or(0);
                let (lock, cvar) = &*inner;
                let mut state = lock.lock().expect("output lock");
                if n == 0 {
                    state.1 = true;
                    cvar.notify_all();
                    return;
                }
                state.0.extend_from_slice(&buf[..n]);
                cvar.notify_all();
            }
        });
        output
    }

    pub fn text(&self) -> String {
        let state = self.inner.0.lock().expect("output lock");
        String::from_utf8_lossy(&state.0).into_owned()
    }

    /// Waits until a complete line (ended by a newline) contains `pattern`;
    /// returns that line without its line ending.
    pub fn wait_for(&self, pattern: &str, timeout: Duration) -> Result<String, String> {
        self.wait_for_nth(pattern, 1, timeout)
    }

    /// How many complete lines contain `pattern` so far.
    pub fn count(&self, pattern: &str) -> usize {
        let text = self.text();
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        complete.lines().filter(|l| l.contains(pattern)).count()
    }

    /// Waits until `n` complete lines contain `pattern`; returns the `n`th.
    pub fn wait_for_nth(
        &self,
        pattern: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<String, String> {
        self.wait_until(timeout, &format!("line {n} with {pattern:?}"), |lines| {
            lines
                .filter(|l| l.contains(pattern))
                .nth(n.saturating_sub(1))
        })
    }

    /// Waits until a complete line is exactly `line`, among those after
    /// the `n`th line containing `marker` (say, in the second boot's
    /// output: `marker` "testguest: hello", `n` 2).
    pub fn wait_for_line_after(
        &self,
        marker: &str,
        n: usize,
        line: &str,
        timeout: Duration,
    ) -> Result<String, String> {
        let what = format!("{line:?} after line {n} with {marker:?}");
        self.wait_until(timeout, &what, |lines| {
            let mut lines = lines.skip_while({
                let mut seen = 0;
                move |l| {
                    if l.contains(marker) {
                        seen += 1;
                    }
                    seen < n
                }
            });
            lines.next()?;
            lines.find(|l| *l == line)
        })
    }

    /// Waits until `find` finds a line among the complete lines so far
    /// (their line endings cut off); returns it.
    fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        find: impl for<'x> Fn(&mut dyn Iterator<Item = &'x str>) -> Option<&'x str>,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.inner;
        let mut state = lock.lock().expect("output lock");
        loop {
            let text = String::from_utf8_lossy(&state.0);
            let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
            let mut lines = complete.lines().map(|l| l.trim_end_matches('\r'));
            if let Some(line) = find(&mut lines) {
                return Ok(line.to_string());
            }
            let now = Instant::now();
            if state.1 || now >= deadline {
                let why = if state.1 {
                    "output closed"
                } else {
                    "timed out"
                };
                return Err(format!(
                    "{why} waiting for {what}; output so far:\n{}",
                    tail(&text, 60)
                ));
            }
            state = cvar
                .wait_timeout(state, deadline - now)
                .expect("output lock")
                .0;
        }
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A running vmm; killed (SIGKILL) and reaped on drop.
pub struct RunningVm {
    pub child: Child,
    pub console: Output,
    pub stderr: Output,
}

impl RunningVm {
    /// Starts any VMM command (ours, QEMU) with its console on stdout.
    pub fn spawn(mut cmd: Command) -> RunningVm {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let console = Output::capture(child.stdout.take().expect("piped stdout"));
        let stderr = Output::capture(child.stderr.take().expect("piped stderr"));
        RunningVm {
            child,
            console,
            stderr,
        }
    }

    /// Waits for a console line containing `pattern`, panicking with the
    /// console and log tails on timeout.
    pub fn expect_line(&self, pattern: &str, timeout: Duration) -> String {
        match self.console.wait_for(pattern, timeout) {
            Ok(line) => line,
            Err(e) => panic!("{e}\nvmm stderr:\n{}", tail(&self.stderr.text(), 30)),
        }
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "the vmm did not exit within {timeout:?}; console:\n{}\nstderr:\n{}",
                    tail(&self.console.text(), 40),
                    tail(&self.stderr.text(), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, signal: i32) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        unsafe { libc::kill(pid, signal) };
    }

    /// Asserts that no line reports a guest failure.
    pub fn assert_no_guest_failure(&self) {
        let text = self.console.text();
        for line in text.lines() {
            assert!(
                !line.contains("testguest: FAIL") && !line.contains("testguest: PANIC"),
                "the guest reported a failure: {line}\nconsole:\n{text}"
            );
        }
    }
}

impl Drop for RunningVm {
    /// A test that ends early (it failed) leaves nothing behind: SIGTERM
    /// first, so that a launcher script's exit trap stops what it started
    /// (testpmd, OVS, namespaces), then SIGKILL after a while.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Ok(None) = self.child.try_wait() {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
    }
}
