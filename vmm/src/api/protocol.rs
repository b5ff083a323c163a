//! QMP messages: the greeting, requests, replies, errors and events, as
//! QEMU's QMP specification defines them.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

/// A command the client asked for.
#[derive(Debug, PartialEq)]
pub struct Request {
    pub execute: String,
    pub arguments: Map<String, Value>,
    pub id: Option<Value>,
}

/// A QMP error class and its description.
#[derive(Debug, PartialEq)]
pub struct QmpError {
    pub class: &'static str,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: "GenericError",
            desc: desc.into(),
        }
    }

    pub fn not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: "CommandNotFound",
            desc: desc.into(),
        }
    }
}

/// Parses one JSON value from the client into a request. On error, the id
/// is returned too when the input had one, so the reply can carry it.
pub fn parse_request(bytes: &[u8]) -> Result<Request, (QmpError, Option<Value>)> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| (QmpError::generic(format!("JSON parse error, {e}")), None))?;
    let Value::Object(mut object) = value else {
        return Err((QmpError::generic("QMP input must be a JSON object"), None));
    };
    let id = object.remove("id");
    let fail = |desc: String| Err((QmpError::generic(desc), id.clone()));
    let execute = match object.remove("execute") {
        Some(Value::String(name)) => name,
        Some(_) => return fail("QMP input member 'execute' must be a string".into()),
        None => return fail("QMP input lacks member 'execute'".into()),
    };
    let arguments = match object.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(args)) => args,
        Some(_) => return fail("QMP input member 'arguments' must be an object".into()),
    };
    if let Some(key) = object.keys().next() {
        return fail(format!("QMP input member '{key}' is unexpected"));
    }
    Ok(Request {
        execute,
        arguments,
        id,
    })
}

pub fn greeting(major: u64, minor: u64, micro: u64) -> Value {
    json!({
        "QMP": {
            "version": {
                "qemu": {"major": major, "minor": minor, "micro": micro},
                "package": concat!("vmm ", env!("CARGO_PKG_VERSION")),
            },
            "capabilities": [],
        }
    })
}

pub fn reply(value: Value, id: Option<Value>) -> Value {
    let mut out = json!({ "return": value });
    if let Some(id) = id {
        out["id"] = id;
    }
    out
}

pub fn error(e: &QmpError, id: Option<Value>) -> Value {
    let mut out = json!({ "error": { "class": e.class, "desc": e.desc } });
    if let Some(id) = id {
        out["id"] = id;
    }
    out
}

pub fn event(name: &str, data: Option<Value>) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut out = json!({
        "event": name,
        "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
    });
    if let Some(data) = data {
        out["data"] = data;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_like_qemu_does() {
        let ok = parse_request(br#"{"execute": "stop", "id": 7}"#).unwrap();
        assert_eq!(ok.execute, "stop");
        assert_eq!(ok.id, Some(json!(7)));
        for (input, desc) in [
            (&b"[1]"[..], "QMP input must be a JSON object"),
            (br#"{"id": 1}"#, "QMP input lacks member 'execute'"),
            (
                br#"{"execute": 3}"#,
                "QMP input member 'execute' must be a string",
            ),
            (
                br#"{"execute": "x", "arguments": []}"#,
                "QMP input member 'arguments' must be an object",
            ),
            (
                br#"{"execute": "x", "foo": 1}"#,
                "QMP input member 'foo' is unexpected",
            ),
        ] {
            let (e, _) = parse_request(input).unwrap_err();
            assert_eq!(e.desc, desc);
        }
        let (e, id) = parse_request(br#"{"execute": 3, "id": "a"}"#).unwrap_err();
        assert_eq!(e.class, "GenericError");
        assert_eq!(id, Some(json!("a")));
        assert!(parse_request(b"{oops}")
            .unwrap_err()
            .0
            .desc
            .starts_with("JSON parse error"));
    }

    #[test]
    fn events_carry_a_timestamp() {
        let e = event("STOP", None);
        assert_eq!(e["event"], "STOP");
        assert!(e["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
        assert!(e.get("data").is_none());
    }
}
