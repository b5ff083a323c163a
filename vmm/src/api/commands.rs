//! The QMP commands and what they do to the VM, through `VmControl` (the
//! running VM in the vmm, a mock in tests). One `Session` per client
//! connection: commands other than `qmp_capabilities` are refused until
//! the client has negotiated capabilities.

use serde_json::{json, Map, Value};

use super::protocol::{QmpError, Request};

/// QMP run states this VMM reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    Shutdown,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Shutdown => "shutdown",
        }
    }
}

/// A vCPU as `query-cpus-fast` lists it.
pub struct CpuInfo {
    pub index: u32,
    pub thread_id: i64,
}

/// A vhost-user device as `query-block` and `query-vhost-user` list it.
pub struct DeviceInfo {
    pub name: String,
    /// "virtio-blk" or "virtio-net".
    pub kind: &'static str,
    pub socket: String,
    pub backend_features: u64,
    pub acked_features: u64,
    pub queues: usize,
    pub connected: bool,
}

/// What the commands need from the VM.
pub trait VmControl: Send + Sync {
    fn state(&self) -> RunState;
    /// Pauses every vCPU; returns once none runs.
    fn stop(&self) -> Result<(), String>;
    fn cont(&self) -> Result<(), String>;
    /// Ends the VMM (QMP `quit`).
    fn quit(&self);
    /// Reboots the VM in place (or ends it with --no-reboot).
    fn reset(&self);
    /// Presses the ACPI power button.
    fn powerdown(&self) -> Result<(), String>;
    fn cpus(&self) -> Vec<CpuInfo>;
    fn name(&self) -> Option<String>;
    fn devices(&self) -> Vec<DeviceInfo>;
    /// Sends an event to the connected client (STOP, RESUME, ...).
    fn emit(&self, event: &str, data: Option<Value>);
}

/// Every command, in the order `query-commands` lists them.
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-status",
    "stop",
    "cont",
    "quit",
    "system_powerdown",
    "system_reset",
    "query-cpus-fast",
    "query-version",
    "query-commands",
    "query-block",
    "query-name",
    "query-vhost-user",
];

#[derive(Default)]
pub struct Session {
    negotiated: bool,
}

/// What the connection does after a reply.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    Continue,
    /// `quit`: the caller queues the reply, then ends the VMM
    /// (`VmControl::quit`), so the reply comes before the SHUTDOWN event.
    Quit,
    /// `system_reset`: the caller queues the reply, then resets the VM
    /// (`VmControl::reset`), so the reply comes before the RESET event, as
    /// in QEMU.
    Reset,
    /// The caller queues the reply, then sends this event (POWERDOWN
    /// follows `system_powerdown`'s reply, as in QEMU).
    Emit(&'static str),
}

impl Session {
    /// Runs one request; returns the reply's value or error.
    pub fn execute(
        &mut self,
        request: &Request,
        vm: &dyn VmControl,
    ) -> (Result<Value, QmpError>, After) {
        let name = request.execute.as_str();
        if !self.negotiated {
            if name != "qmp_capabilities" {
                return (
                    Err(QmpError::not_found(
                        "Expecting capabilities negotiation with 'qmp_capabilities'",
                    )),
                    After::Continue,
                );
            }
            return match check_capabilities(&request.arguments) {
                Ok(()) => {
                    self.negotiated = true;
                    (Ok(json!({})), After::Continue)
                }
                Err(e) => (Err(e), After::Continue),
            };
        }
        if name == "qmp_capabilities" {
            return (
                Err(QmpError::not_found(
                    "Capabilities negotiation is already complete, command ignored",
                )),
                After::Continue,
            );
        }
        if !COMMANDS.contains(&name) {
            return (
                Err(QmpError::not_found(format!(
                    "The command {name} has not been found"
                ))),
                After::Continue,
            );
        }
        if let Some(key) = request.arguments.keys().next() {
            return (
                Err(QmpError::generic(format!(
                    "Parameter '{key}' is unexpected"
                ))),
                After::Continue,
            );
        }
        match name {
            // The caller ends the VMM once the reply is on its way.
            "quit" => (Ok(json!({})), After::Quit),
            "system_reset" => match vm.state() {
                RunState::Shutdown => (
                    Err(QmpError::generic("The VM has shut down")),
                    After::Continue,
                ),
                // The caller resets the VM once the reply is on its way.
                _ => (Ok(json!({})), After::Reset),
            },
            "system_powerdown" => match vm.state() {
                RunState::Shutdown => (
                    Err(QmpError::generic("The VM has shut down")),
                    After::Continue,
                ),
                _ => match vm.powerdown() {
                    Ok(()) => (Ok(json!({})), After::Emit("POWERDOWN")),
                    Err(e) => (Err(QmpError::generic(e)), After::Continue),
                },
            },
            _ => (run(name, vm), After::Continue),
        }
    }
}

/// `qmp_capabilities` takes an optional `enable` list; no capability is
/// offered, so the list must be empty.
fn check_capabilities(arguments: &Map<String, Value>) -> Result<(), QmpError> {
    for (key, value) in arguments {
        let list = match (key.as_str(), value) {
            ("enable", Value::Array(list)) => list,
            ("enable", _) => {
                return Err(QmpError::generic(
                    "Invalid parameter type for 'enable', expected: array",
                ))
            }
            _ => {
                return Err(QmpError::generic(format!(
                    "Parameter '{key}' is unexpected"
                )))
            }
        };
        // QEMU knows one capability, `oob`, and this VMM offers none: the
        // first item is refused, for its type, its name, or as unavailable.
        if let Some(item) = list.first() {
            return Err(QmpError::generic(match item {
                Value::String(name) if name == "oob" => {
                    format!("Capability '{name}' not available")
                }
                Value::String(name) => {
                    format!("Parameter 'enable[0]' does not accept value '{name}'")
                }
                _ => "Invalid parameter type for 'enable[0]', expected: string".to_owned(),
            }));
        }
    }
    Ok(())
}

fn run(name: &str, vm: &dyn VmControl) -> Result<Value, QmpError> {
    match name {
        "query-status" => {
            let state = vm.state();
            Ok(json!({
                "status": state.as_str(),
                "running": state == RunState::Running,
                "singlestep": false,
            }))
        }
        "stop" => {
            if vm.state() == RunState::Running {
                vm.stop().map_err(QmpError::generic)?;
                vm.emit("STOP", None);
            }
            Ok(json!({}))
        }
        "cont" => match vm.state() {
            RunState::Shutdown => Err(QmpError::generic("The VM has shut down")),
            RunState::Running => Ok(json!({})),
            RunState::Paused => {
                vm.cont().map_err(QmpError::generic)?;
                vm.emit("RESUME", None);
                Ok(json!({}))
            }
        },
        "query-cpus-fast" => Ok(Value::Array(
            vm.cpus()
                .iter()
                .map(|cpu| {
                    json!({
                        "cpu-index": cpu.index,
                        "qom-path": format!("/machine/unattached/device[{}]", cpu.index),
                        "thread-id": cpu.thread_id,
                        "target": "x86_64",
                        "props": {"core-id": cpu.index, "thread-id": 0, "socket-id": 0},
                    })
                })
                .collect(),
        )),
        "query-version" => Ok(version()),
        "query-commands" => Ok(Value::Array(
            COMMANDS.iter().map(|c| json!({ "name": c })).collect(),
        )),
        "query-block" => Ok(Value::Array(
            vm.devices()
                .iter()
                .filter(|d| d.kind == "virtio-blk")
                .map(|d| {
                    json!({
                        "device": d.name,
                        "qdev": d.name,
                        "type": "vhost-user-blk",
                        "removable": false,
                        "locked": false,
                        "socket": d.socket,
                        "connected": d.connected,
                    })
                })
                .collect(),
        )),
        "query-name" => Ok(match vm.name() {
            Some(name) => json!({ "name": name }),
            None => json!({}),
        }),
        "query-vhost-user" => Ok(Value::Array(
            vm.devices()
                .iter()
                .map(|d| {
                    json!({
                        "device": d.name,
                        "type": d.kind,
                        "socket": d.socket,
                        "connected": d.connected,
                        "queues": d.queues,
                        "backend-features": format!("{:#x}", d.backend_features),
                        "acked-features": format!("{:#x}", d.acked_features),
                    })
                })
                .collect(),
        )),
        _ => Err(QmpError::not_found(format!(
            "The command {name} has not been found"
        ))),
    }
}

/// This VMM's version in QMP's shape.
pub fn version() -> Value {
    let number = |s: &str| s.parse::<u64>().unwrap_or(0);
    json!({
        "qemu": {
            "major": number(env!("CARGO_PKG_VERSION_MAJOR")),
            "minor": number(env!("CARGO_PKG_VERSION_MINOR")),
            "micro": number(env!("CARGO_PKG_VERSION_PATCH")),
        },
        "package": concat!("vmm ", env!("CARGO_PKG_VERSION")),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::api::protocol::parse_request;

    #[derive(Default)]
    struct MockVm {
        paused: Mutex<bool>,
        events: Mutex<Vec<String>>,
        quit: Mutex<bool>,
    }

    impl VmControl for MockVm {
        fn state(&self) -> RunState {
            if *self.paused.lock().unwrap() {
                RunState::Paused
            } else {
                RunState::Running
            }
        }
        fn stop(&self) -> Result<(), String> {
            *self.paused.lock().unwrap() = true;
            Ok(())
        }
        fn cont(&self) -> Result<(), String> {
            *self.paused.lock().unwrap() = false;
            Ok(())
        }
        fn quit(&self) {
            *self.quit.lock().unwrap() = true;
        }
        fn powerdown(&self) -> Result<(), String> {
            Ok(())
        }
        fn reset(&self) {}
        fn cpus(&self) -> Vec<CpuInfo> {
            vec![CpuInfo {
                index: 0,
                thread_id: 42,
            }]
        }
        fn name(&self) -> Option<String> {
            None
        }
        fn devices(&self) -> Vec<DeviceInfo> {
            vec![DeviceInfo {
                name: "disk0".into(),
                kind: "virtio-blk",
                socket: "/run/d.sock".into(),
                backend_features: 0x1_0000_0000,
                acked_features: 0x1_0000_0000,
                queues: 1,
                connected: true,
            }]
        }
        fn emit(&self, event: &str, _data: Option<Value>) {
            self.events.lock().unwrap().push(event.into());
        }
    }

    fn exec(session: &mut Session, vm: &MockVm, text: &str) -> Result<Value, QmpError> {
        session
            .execute(&parse_request(text.as_bytes()).unwrap(), vm)
            .0
    }

    #[test]
    fn negotiation_comes_first_and_happens_once() {
        let (mut s, vm) = (Session::default(), MockVm::default());
        let e = exec(&mut s, &vm, r#"{"execute": "query-status"}"#).unwrap_err();
        assert_eq!(e.class, "CommandNotFound");
        exec(&mut s, &vm, r#"{"execute": "qmp_capabilities"}"#).unwrap();
        let e = exec(&mut s, &vm, r#"{"execute": "qmp_capabilities"}"#).unwrap_err();
        assert_eq!(e.class, "CommandNotFound");
    }

    #[test]
    fn stop_and_cont_change_the_status_and_emit_events() {
        let (mut s, vm) = (Session::default(), MockVm::default());
        exec(&mut s, &vm, r#"{"execute": "qmp_capabilities"}"#).unwrap();
        exec(&mut s, &vm, r#"{"execute": "stop"}"#).unwrap();
        let status = exec(&mut s, &vm, r#"{"execute": "query-status"}"#).unwrap();
        assert_eq!(status["status"], "paused");
        assert_eq!(status["running"], false);
        exec(&mut s, &vm, r#"{"execute": "cont"}"#).unwrap();
        assert_eq!(*vm.events.lock().unwrap(), ["STOP", "RESUME"]);
        let blocks = exec(&mut s, &vm, r#"{"execute": "query-block"}"#).unwrap();
        assert_eq!(blocks[0]["socket"], "/run/d.sock");
    }

    #[test]
    fn unknown_commands_and_arguments_are_errors() {
        let (mut s, vm) = (Session::default(), MockVm::default());
        exec(&mut s, &vm, r#"{"execute": "qmp_capabilities"}"#).unwrap();
        let e = exec(&mut s, &vm, r#"{"execute": "frobnicate"}"#).unwrap_err();
        assert_eq!(e.class, "CommandNotFound");
        let e = exec(&mut s, &vm, r#"{"execute": "stop", "arguments": {"x": 1}}"#).unwrap_err();
        assert_eq!(e.desc, "Parameter 'x' is unexpected");
        let (result, after) = s.execute(&parse_request(br#"{"execute": "quit"}"#).unwrap(), &vm);
        assert!(result.is_ok());
        assert_eq!(after, After::Quit);
        // Not yet: the VMM ends after the reply is queued, not before.
        assert!(!*vm.quit.lock().unwrap());
        // Nor does a reset or the power button's event come first.
        let (result, after) = s.execute(
            &parse_request(br#"{"execute": "system_reset"}"#).unwrap(),
            &vm,
        );
        assert!(result.is_ok());
        assert_eq!(after, After::Reset);
        let (result, after) = s.execute(
            &parse_request(br#"{"execute": "system_powerdown"}"#).unwrap(),
            &vm,
        );
        assert!(result.is_ok());
        assert_eq!(after, After::Emit("POWERDOWN"));
        assert!(vm.events.lock().unwrap().is_empty());
    }

    #[test]
    fn capabilities_are_refused_for_their_type_their_name_or_as_unavailable() {
        let (mut s, vm) = (Session::default(), MockVm::default());
        for (enable, desc) in [
            ("5", "Invalid parameter type for 'enable', expected: array"),
            (
                "[1]",
                "Invalid parameter type for 'enable[0]', expected: string",
            ),
            (
                r#"["frob"]"#,
                "Parameter 'enable[0]' does not accept value 'frob'",
            ),
            (r#"["oob"]"#, "Capability 'oob' not available"),
        ] {
            let request = format!(
                r#"{{"execute": "qmp_capabilities", "arguments": {{"enable": {enable}}}}}"#
            );
            assert_eq!(exec(&mut s, &vm, &request).unwrap_err().desc, desc);
        }
        exec(
            &mut s,
            &vm,
            r#"{"execute": "qmp_capabilities", "arguments": {"enable": []}}"#,
        )
        .unwrap();
    }
}
