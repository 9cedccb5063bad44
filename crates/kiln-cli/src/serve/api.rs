//! The OpenAI side of `kiln serve`: request bodies checked field by field (unknown fields are
//! ignored, as OpenAI ignores them; a known field of the wrong type or out of range is a 400 that
//! names it), and errors in OpenAI's JSON shape.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use kiln_data::datasets::{Message, Role};
use serde_json::{json, Map, Value};

/// An error answered as `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 about one request field.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
        }
    }

    /// 400 about the request as a whole.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn not_found(message: impl Into<String>, code: &'static str) -> Self {
        ApiError::bad_request(message)
            .with_status(StatusCode::NOT_FOUND)
            .with_code(code)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::bad_request(message)
            .with_status(StatusCode::UNAUTHORIZED)
            .with_code("invalid_api_key")
    }

    pub fn busy(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: message.into(),
            kind: "rate_limit_error",
            param: None,
            code: Some("rate_limit_exceeded"),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some("server_shutting_down"),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = json_response(self.status, &self.body());
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// A JSON response with the given status.
pub fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The JSON type of a value, as error messages name it.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(param: &str, want: &str, got: &Value) -> ApiError {
    ApiError::invalid(
        param,
        format!(
            "Invalid type for '{param}': expected {want}, but got {} instead.",
            type_name(got)
        ),
    )
}

/// The fields of a request object; `null` counts as absent, as in OpenAI's API.
pub struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    /// Parses a request body: JSON, and an object.
    pub fn parse(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
        let v: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!(
                "We could not parse the JSON body of your request: {e}. The body must be a JSON \
                 object, sent with Content-Type: application/json."
            ))
        })?;
        match v {
            Value::Object(m) => Ok(m),
            other => Err(ApiError::bad_request(format!(
                "The request body must be a JSON object, but got {}.",
                type_name(&other)
            ))),
        }
    }

    pub fn new(m: &'a Map<String, Value>) -> Self {
        Fields(m)
    }

    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    pub fn string(&self, name: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(wrong_type(name, "a string", v)),
        }
    }

    pub fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(wrong_type(name, "a boolean", v)),
        }
    }

    /// A number in `[lo, hi]`.
    pub fn number(&self, name: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                if !(lo..=hi).contains(&x) {
                    return Err(ApiError::invalid(
                        name,
                        format!("Invalid '{name}': {x} is outside [{lo}, {hi}]."),
                    ));
                }
                Ok(Some(x))
            }
            Some(v) => Err(wrong_type(name, "a number", v)),
        }
    }

    /// An integer of at least `lo` (a number with no fraction, as JSON writers may send `2.0`).
    pub fn integer(&self, name: &str, lo: i64) -> Result<Option<i64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let x = if let Some(i) = n.as_i64() {
                    i
                } else if n.as_u64().is_some() {
                    i64::MAX
                } else {
                    match n.as_f64() {
                        Some(f) if f.fract() == 0.0 && f.abs() < 9e15 => f as i64,
                        _ => return Err(wrong_type(name, "an integer", &Value::Number(n.clone()))),
                    }
                };
                if x < lo {
                    return Err(ApiError::invalid(
                        name,
                        format!("Invalid '{name}': {x} is less than the minimum of {lo}."),
                    ));
                }
                Ok(Some(x))
            }
            Some(v) => Err(wrong_type(name, "an integer", v)),
        }
    }

    /// An integer in `0..=u64::MAX` (a seed).
    pub fn unsigned(&self, name: &str) -> Result<Option<u64>, ApiError> {
        match self.get(name) {
            Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64()),
            Some(Value::Number(n)) if n.as_i64().is_some() => Err(ApiError::invalid(
                name,
                format!("Invalid '{name}': {n} is less than the minimum of 0."),
            )),
            _ => self.integer(name, 0).map(|x| x.map(|x| x as u64)),
        }
    }

    /// Refuses a feature this server does not have, unless the field is absent, null, false, 0
    /// or empty.
    pub fn unsupported(&self, name: &str, what: &str) -> Result<(), ApiError> {
        let off = match self.get(name) {
            None => true,
            Some(Value::Bool(b)) => !b,
            Some(Value::Number(n)) => n.as_f64() == Some(0.0),
            Some(Value::Array(a)) => a.is_empty(),
            Some(Value::String(s)) => s.is_empty() || (name == "response_format" && s == "text"),
            Some(Value::Object(o)) => {
                name == "response_format" && o.get("type").and_then(Value::as_str) == Some("text")
            }
            Some(Value::Null) => true,
        };
        if off {
            Ok(())
        } else {
            Err(ApiError::invalid(
                name,
                format!("'{name}' is not supported by kiln serve ({what})."),
            ))
        }
    }
}

/// Sampling and length settings common to both generation endpoints (before the server's
/// defaults are applied).
#[derive(Debug, Default)]
pub struct CommonParams {
    pub model: String,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub max_tokens: Option<i64>,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
}

pub fn model_field(f: &Fields) -> Result<String, ApiError> {
    match f.string("model")? {
        Some(m) => Ok(m.to_string()),
        None => Err(ApiError::invalid(
            "model",
            "you must provide a model parameter (GET /v1/models lists the served model)",
        )),
    }
}

pub fn common(f: &Fields) -> Result<CommonParams, ApiError> {
    let model = model_field(f)?;
    let temperature = f.number("temperature", 0.0, 2.0)?.map(|x| x as f32);
    let top_p = f.number("top_p", 0.0, 1.0)?.map(|x| x as f32);
    let top_k = f.integer("top_k", 0)?.map(|x| x as usize);
    let max_tokens = match f.integer("max_completion_tokens", 1)? {
        Some(m) => Some(m),
        None => f.integer("max_tokens", 1)?,
    };
    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            if a.len() > 4 {
                return Err(ApiError::invalid(
                    "stop",
                    format!("Invalid 'stop': at most 4 stop sequences, got {}.", a.len()),
                ));
            }
            a.iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(wrong_type(&format!("stop[{i}]"), "a string", other)),
                })
                .collect::<Result<_, _>>()?
        }
        Some(v) => return Err(wrong_type("stop", "a string or an array of strings", v)),
    };
    if stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::invalid(
            "stop",
            "Invalid 'stop': a stop sequence cannot be empty.",
        ));
    }
    let seed = f.unsigned("seed")?;
    let n = f.integer("n", 1)?.unwrap_or(1) as usize;
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(wrong_type("stream_options.include_usage", "a boolean", v)),
        },
        Some(v) => return Err(wrong_type("stream_options", "an object", v)),
    };
    f.unsupported("logprobs", "no token log-probabilities")?;
    f.unsupported("top_logprobs", "no token log-probabilities")?;
    f.unsupported("tools", "no tool calls")?;
    f.unsupported("functions", "no function calls")?;
    f.unsupported("response_format", "text responses only")?;
    Ok(CommonParams {
        model,
        temperature,
        top_p,
        top_k,
        max_tokens,
        stop,
        seed,
        n,
        stream,
        include_usage,
    })
}

/// `messages` of a chat request: a non-empty array of `{role, content}` with text content (a
/// string, or an array of `{"type": "text", "text"}` parts).
pub fn messages(f: &Fields) -> Result<Vec<Message>, ApiError> {
    let list = match f.get("messages") {
        None => {
            return Err(ApiError::invalid(
                "messages",
                "Missing required parameter: 'messages'.",
            ))
        }
        Some(Value::Array(a)) => a,
        Some(v) => return Err(wrong_type("messages", "an array", v)),
    };
    if list.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "Invalid 'messages': empty array. Expected an array with at least one message.",
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let at = format!("messages[{i}]");
        let Value::Object(obj) = m else {
            return Err(wrong_type(&at, "an object", m));
        };
        let mf = Fields(obj);
        let role = match mf
            .string("role")
            .map_err(|e| rename(e, &format!("{at}.role")))?
        {
            Some(r) => r,
            None => {
                return Err(ApiError::invalid(
                    format!("{at}.role"),
                    format!("Missing required parameter: '{at}.role'."),
                ))
            }
        };
        let role = match role {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(ApiError::invalid(
                    format!("{at}.role"),
                    format!(
                        "Invalid value for '{at}.role': {other:?}. Supported roles: system \
                         (or developer), user, assistant."
                    ),
                ))
            }
        };
        let content =
            match mf.get("content") {
                None if role == Role::Assistant => String::new(),
                None => {
                    return Err(ApiError::invalid(
                        format!("{at}.content"),
                        format!("Missing required parameter: '{at}.content'."),
                    ))
                }
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        let pat = format!("{at}.content[{j}]");
                        let kind = p.get("type").and_then(Value::as_str);
                        match (kind, p.get("text")) {
                            (Some("text"), Some(Value::String(t))) => text.push_str(t),
                            (Some("text"), other) => {
                                return Err(wrong_type(
                                    &format!("{pat}.text"),
                                    "a string",
                                    other.unwrap_or(&Value::Null),
                                ))
                            }
                            _ => return Err(ApiError::invalid(
                                pat,
                                "Only text content parts ({\"type\": \"text\", \"text\": ...}) \
                                 are supported.",
                            )),
                        }
                    }
                    text
                }
                Some(v) => {
                    return Err(wrong_type(
                        &format!("{at}.content"),
                        "a string or an array of text parts",
                        v,
                    ))
                }
            };
        out.push(Message::new(role, content));
    }
    Ok(out)
}

fn rename(mut e: ApiError, param: &str) -> ApiError {
    if let Some(old) = e.param.replace(param.to_string()) {
        e.message = e
            .message
            .replace(&format!("'{old}'"), &format!("'{param}'"));
    }
    e
}

/// `prompt` of a completion request: a string or an array of strings.
pub fn prompts(f: &Fields) -> Result<Vec<String>, ApiError> {
    match f.get("prompt") {
        None => Err(ApiError::invalid(
            "prompt",
            "Missing required parameter: 'prompt'.",
        )),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(wrong_type(
                    &format!("prompt[{i}]"),
                    "a string (token-id prompts are not supported)",
                    other,
                )),
            })
            .collect(),
        Some(Value::Array(_)) => Err(ApiError::invalid(
            "prompt",
            "Invalid 'prompt': empty array.",
        )),
        Some(v) => Err(wrong_type("prompt", "a string or an array of strings", v)),
    }
}

/// `response` of a score request: a string or a non-empty array of strings.
pub fn responses(f: &Fields) -> Result<Vec<String>, ApiError> {
    match f.get("response") {
        None => Err(ApiError::invalid(
            "response",
            "Missing required parameter: 'response'.",
        )),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(wrong_type(&format!("response[{i}]"), "a string", other)),
            })
            .collect(),
        Some(Value::Array(_)) => Err(ApiError::invalid(
            "response",
            "Invalid 'response': empty array.",
        )),
        Some(v) => Err(wrong_type("response", "a string or an array of strings", v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Map<String, Value> {
        Fields::parse(body.as_bytes()).unwrap()
    }

    #[test]
    fn fields_are_typed_and_ranged_and_unknown_ones_ignored() {
        let m = parse(
            r#"{"model":"m","temperature":0.5,"n":2,"max_tokens":3,"stop":"x","whatever":[1]}"#,
        );
        let c = common(&Fields::new(&m)).unwrap();
        assert_eq!(
            (c.temperature, c.n, c.max_tokens, c.stop),
            (Some(0.5), 2, Some(3), vec!["x".to_string()])
        );
        for (body, param, needle) in [
            (
                r#"{"model":"m","temperature":"hot"}"#,
                "temperature",
                "got a string",
            ),
            (
                r#"{"model":"m","temperature":3}"#,
                "temperature",
                "outside [0, 2]",
            ),
            (
                r#"{"model":"m","max_tokens":-5}"#,
                "max_tokens",
                "less than the minimum of 1",
            ),
            (
                r#"{"model":"m","max_tokens":2.5}"#,
                "max_tokens",
                "expected an integer",
            ),
            (r#"{"model":"m","n":"2"}"#, "n", "expected an integer"),
            (
                r#"{"model":"m","stop":[1]}"#,
                "stop[0]",
                "expected a string",
            ),
            (r#"{"model":"m","stop":""}"#, "stop", "cannot be empty"),
            (
                r#"{"model":"m","stream":1}"#,
                "stream",
                "expected a boolean",
            ),
            (
                r#"{"model":"m","logprobs":true}"#,
                "logprobs",
                "not supported",
            ),
            (r#"{"model":7}"#, "model", "expected a string"),
            (r#"{}"#, "model", "provide a model"),
        ] {
            let e = common(&Fields::new(&parse(body))).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
            assert!(e.message.contains(needle), "{body}: {}", e.message);
        }
        let big = r#"{"model":"m","seed":18446744073709551615}"#;
        assert_eq!(
            common(&Fields::new(&parse(big))).unwrap().seed,
            Some(u64::MAX)
        );
        let e = common(&Fields::new(&parse(r#"{"model":"m","seed":-1}"#))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("seed"));
        // null is absent; 2.0 is an integer.
        let c = common(&Fields::new(&parse(
            r#"{"model":"m","temperature":null,"n":2.0,"logprobs":false}"#,
        )))
        .unwrap();
        assert_eq!((c.temperature, c.n), (None, 2));
    }

    #[test]
    fn messages_are_checked() {
        let ok = parse(
            r#"{"messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#,
        );
        let m = messages(&Fields::new(&ok)).unwrap();
        assert_eq!(m, vec![Message::system("s"), Message::user("ab")]);
        for (body, param) in [
            (r#"{"messages":[]}"#, "messages"),
            (r#"{"messages":{}}"#, "messages"),
            (r#"{}"#, "messages"),
            (r#"{"messages":["hi"]}"#, "messages[0]"),
            (r#"{"messages":[{"content":"hi"}]}"#, "messages[0].role"),
            (
                r#"{"messages":[{"role":5,"content":"hi"}]}"#,
                "messages[0].role",
            ),
            (
                r#"{"messages":[{"role":"tool","content":"hi"}]}"#,
                "messages[0].role",
            ),
            (r#"{"messages":[{"role":"user"}]}"#, "messages[0].content"),
            (
                r#"{"messages":[{"role":"user","content":3}]}"#,
                "messages[0].content",
            ),
            (
                r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
                "messages[0].content[0]",
            ),
        ] {
            let e = messages(&Fields::new(&parse(body))).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
    }

    #[test]
    fn bodies_must_be_json_objects() {
        let e = Fields::parse(b"{\"model\": ").unwrap_err();
        assert!(
            e.message.contains("could not parse the JSON body"),
            "{}",
            e.message
        );
        let e = Fields::parse(b"[1]").unwrap_err();
        assert!(e.message.contains("must be a JSON object"), "{}", e.message);
        assert_eq!(
            ApiError::bad_request("x").body(),
            json!({"error": {"message": "x", "type": "invalid_request_error", "param": null, "code": null}})
        );
    }
}
