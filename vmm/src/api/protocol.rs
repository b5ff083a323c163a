//! QMP messages: the greeting, requests, replies, errors and events, as
//! QEMU's QMP specification defines them.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{json, Map, Number, Value};

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
    let UniqueKeys(value) = serde_json::from_slice(bytes)
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

/// A JSON value in which no object names a member twice: serde_json would
/// keep the last one silently, QEMU refuses the input.
struct UniqueKeys(Value);

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(UniqueKeysVisitor)
            .map(UniqueKeys)
    }
}

struct UniqueKeysVisitor;

impl<'de> Visitor<'de> for UniqueKeysVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // JSON has no NaN or infinity, so this is always a number.
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(UniqueKeys(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if members.contains_key(&key) {
                return Err(A::Error::custom(format_args!("duplicate key '{key}'")));
            }
            let UniqueKeys(value) = map.next_value()?;
            members.insert(key, value);
        }
        Ok(Value::Object(members))
    }
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
    fn a_member_named_twice_is_refused_at_any_depth() {
        for input in [
            &br#"{"execute": "stop", "execute": "cont"}"#[..],
            br#"{"execute": "x", "arguments": {"a": [{"b": 1, "b": 2}]}}"#,
        ] {
            let (e, _) = parse_request(input).unwrap_err();
            assert!(
                e.desc.starts_with("JSON parse error, duplicate key '"),
                "{}",
                e.desc
            );
        }
        let ok = parse_request(
            br#"{"execute": "x", "arguments": {"a": [1, -2, 3.5, null, true, "s", {}]}}"#,
        )
        .unwrap();
        assert_eq!(ok.arguments["a"], json!([1, -2, 3.5, null, true, "s", {}]));
    }

    #[test]
    fn events_carry_a_timestamp() {
        let e = event("STOP", None);
        assert_eq!(e["event"], "STOP");
        assert!(e["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
        assert!(e.get("data").is_none());
    }
}
