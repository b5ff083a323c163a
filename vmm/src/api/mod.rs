//! The control API: a QMP server (QEMU's JSON protocol) on a Unix socket
//! and/or a TCP address, so that the tools people already drive QEMU with
//! drive this VMM too. `framing` cuts the byte stream into messages,
//! `protocol` knows QMP's message shapes, `commands` runs commands against
//! `VmControl`, `server` owns the sockets, and `VmApi` (here) is the
//! `VmControl` of the running VM.

pub mod commands;
pub mod framing;
pub mod protocol;
pub mod server;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::devices::ged::{GedEvents, EVENT_POWER_BUTTON};
use crate::exit::{ExitNotifier, VmExit};
use crate::vhost_user::frontend::DeviceStatus;
use crate::vstate::run_control::RunControl;
use commands::{CpuInfo, DeviceInfo, RunState, VmControl};
use server::EventSink;

pub struct VmApi {
    pub run: Arc<RunControl>,
    pub ged: Arc<GedEvents>,
    pub exit: Arc<ExitNotifier>,
    pub sink: Arc<EventSink>,
    pub name: Option<String>,
    pub devices: Vec<Arc<DeviceStatus>>,
    /// A reset ends the VM rather than rebooting it (`--no-reboot`).
    pub no_reboot: bool,
    /// How long `stop` waits for every vCPU to leave the guest: as long
    /// as a vCPU may be held in an exit by a vhost-user backend.
    pub pause_timeout: Duration,
}

impl VmApi {
    /// Sends a DEVICE_BACKEND event whenever a backend hangs up or a new
    /// one takes the device over.
    pub fn watch_devices(&self) {
        for device in &self.devices {
            let sink = self.sink.clone();
            device.on_change(Box::new(move |status| {
                sink.emit(
                    "DEVICE_BACKEND",
                    Some(json!({
                        "device": status.name,
                        "socket": status.socket.display().to_string(),
                        "connected": status.connected(),
                    })),
                );
            }));
        }
    }
}

impl VmControl for VmApi {
    fn state(&self) -> RunState {
        // A reset under way reboots in place: the VM runs on (as in QEMU,
        // where a reset never shows as a shutdown), paused if it was. One
        // reading of the reason (set with the stopping flag, under one
        // lock), so a reset between two readings cannot show as a shutdown.
        let shutting_down = self
            .exit
            .reason()
            .is_some_and(|reason| self.no_reboot || !reason.is_reset());
        if shutting_down {
            RunState::Shutdown
        } else if self.run.is_paused() {
            RunState::Paused
        } else {
            RunState::Running
        }
    }

    fn stop(&self) -> Result<(), String> {
        self.run
            .pause(crate::vstate::vcpu::kick_signal(), self.pause_timeout)
            .map_err(|e| {
                // Do not leave the VM half paused.
                self.run.resume();
                e.to_string()
            })
    }

    fn cont(&self) -> Result<(), String> {
        self.run.resume();
        Ok(())
    }

    fn quit(&self) {
        self.exit.notify(VmExit::Quit);
    }

    fn reset(&self) {
        self.exit.notify(VmExit::ResetRequested);
    }

    fn powerdown(&self) -> Result<(), String> {
        self.ged
            .raise(EVENT_POWER_BUTTON)
            .map_err(|e| format!("cannot raise the ACPI event: {e}"))
    }

    fn cpus(&self) -> Vec<CpuInfo> {
        self.run
            .tids()
            .into_iter()
            .map(|(index, thread_id)| CpuInfo {
                index: u32::from(index),
                thread_id,
            })
            .collect()
    }

    fn name(&self) -> Option<String> {
        self.name.clone()
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        self.devices
            .iter()
            .map(|d| DeviceInfo {
                name: d.name.clone(),
                kind: if d.device_type == 1 {
                    "virtio-net"
                } else {
                    "virtio-blk"
                },
                socket: d.socket.display().to_string(),
                backend_features: d
                    .backend_features
                    .load(std::sync::atomic::Ordering::Relaxed),
                acked_features: d.acked_features.load(std::sync::atomic::Ordering::Relaxed),
                queues: d.queues,
                connected: d.connected(),
            })
            .collect()
    }

    fn emit(&self, event: &str, data: Option<Value>) {
        self.sink.emit(event, data);
    }
}

/// The RESET event's data.
pub fn reset_data(guest: bool) -> Value {
    let why = if guest {
        "guest-reset"
    } else {
        "host-qmp-system-reset"
    };
    json!({ "guest": guest, "reason": why })
}

/// The SHUTDOWN event's data for an exit reason, as QEMU words it.
pub fn shutdown_data(reason: VmExit) -> Value {
    let (guest, why) = match reason {
        VmExit::PowerOff => (true, "guest-shutdown"),
        VmExit::Reset => (true, "guest-reset"),
        VmExit::TripleFault | VmExit::KvmError => (true, "guest-panic"),
        VmExit::Interrupted | VmExit::Terminated => (false, "host-signal"),
        VmExit::Quit => (false, "host-qmp-quit"),
        VmExit::ResetRequested => (false, "host-qmp-system-reset"),
    };
    json!({ "guest": guest, "reason": why })
}
