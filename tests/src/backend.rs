//! Backend processes for device tests: our `vhost-blk` and
//! qemu-storage-daemon, each killed on drop, with a wait for its socket.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::vm::Output;

/// A backend process serving a vhost-user socket.
pub struct Backend {
    pub child: Child,
    pub socket: PathBuf,
    pub log: Output,
}

impl Backend {
    /// Starts `cmd` and waits until `socket` accepts connections.
    pub fn spawn(mut cmd: Command, socket: &Path) -> Backend {
        let _ = std::fs::remove_file(socket);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let log = Output::capture(child.stderr.take().expect("piped stderr"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{cmd:?} exited with {status}: {}", log.text());
            }
            assert!(
                Instant::now() < deadline,
                "{} did not appear; backend log:\n{}",
                socket.display(),
                log.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Backend {
            child,
            socket: socket.to_path_buf(),
            log,
        }
    }

    /// Our vhost-blk serving `image` with extra arguments.
    pub fn vhost_blk(socket: &Path, image: &Path, extra: &[&str]) -> Backend {
        let mut cmd = Command::new(vhost_blk_bin());
        cmd.arg("--socket")
            .arg(socket)
            .arg("--image")
            .arg(image)
            .args(extra);
        Backend::spawn(cmd, socket)
    }

    /// qemu-storage-daemon exporting `image` as vhost-user-blk.
    pub fn qemu_storage_daemon(
        socket: &Path,
        image: &Path,
        num_queues: u32,
        writable: bool,
    ) -> Backend {
        let cmd = qemu_storage_daemon_command(socket, image, num_queues, writable);
        Backend::spawn(cmd, socket)
    }

    /// After round `round` of a frontend that shrank its memory under the
    /// backend: the backend said it dropped that frontend, and still runs.
    pub fn dropped_a_frontend_whose_memory_shrank(&mut self, round: usize) {
        self.log
            .wait_for_nth(
                "went away under the backend",
                round,
                Duration::from_secs(10),
            )
            .unwrap_or_else(|e| panic!("round {round}: {e}; log:\n{}", self.log.text()));
        assert!(
            self.child.try_wait().expect("try_wait").is_none(),
            "round {round}: the backend exited; log:\n{}",
            self.log.text()
        );
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The qemu-storage-daemon command line that exports `image` as
/// vhost-user-blk on `socket`.
pub fn qemu_storage_daemon_command(
    socket: &Path,
    image: &Path,
    num_queues: u32,
    writable: bool,
) -> Command {
    let (writable, read_only) = if writable {
        ("on", "off")
    } else {
        ("off", "on")
    };
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={},read-only={read_only}",
            image.display()
        ))
        .arg("--blockdev")
        .arg(format!(
            "driver=raw,node-name=disk0,file=file0,read-only={read_only}"
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable={writable},num-queues={num_queues}",
            socket.display()
        ));
    cmd
}

/// The `vhost-blk` binary: `VHOST_BLK_BIN`, or the workspace's debug build.
pub fn vhost_blk_bin() -> PathBuf {
    workspace_bin("vhost-blk", "VHOST_BLK_BIN")
}

/// A binary of the workspace: `$env_var`, or the debug build.
pub fn workspace_bin(name: &str, env_var: &str) -> PathBuf {
    let path = std::env::var_os(env_var)
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join("target/debug").join(name));
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build -p {name}` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Fails clearly when qemu-storage-daemon is not installed.
pub fn require_qemu_storage_daemon() {
    let found = Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "qemu-storage-daemon is not installed (apt-get install qemu-system-common; .ci/run does)"
    );
}
