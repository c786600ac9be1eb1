//! A local Twilio that speaks Twilio's wire format and checks every request against
//! Twilio's own OpenAPI description of Create Message (`tests/fixtures/providers/`).
//!
//! A request that breaks the description is answered 400 and recorded as a violation;
//! tests assert that there are none.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use base64::Engine;
use regex::Regex;
use serde_json::{Value, json};

pub const ACCOUNT_SID: &str = "AC0123456789abcdef0123456789abcdef";
pub const AUTH_TOKEN: &str = "test-auth-token-5f8e2a";
pub const DEFAULT_FROM: &str = "+15005550006";

/// Twilio's own OpenAPI description, kept as a fixture (`tests/fixtures/providers/`).
fn spec_path() -> String {
    format!(
        "{}/tests/fixtures/providers/twilio-create-message.openapi.json",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// The parts of the description the stub checks.
struct Spec {
    create_path: Regex,
    /// Query parameters of List Messages.
    list_parameters: Vec<String>,
    properties: serde_json::Map<String, Value>,
    required: Vec<String>,
    schemas: serde_json::Map<String, Value>,
    example: Value,
}

impl Spec {
    fn load() -> Spec {
        let path = spec_path();
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read Twilio's OpenAPI description at {path} ({e})"));
        let doc: Value = serde_json::from_str(&text).expect("the OpenAPI description is JSON");
        let post = &doc["paths"]["/2010-04-01/Accounts/{AccountSid}/Messages.json"]["post"];
        let sid_pattern = post["parameters"][0]["schema"]["pattern"]
            .as_str()
            .expect("AccountSid has a pattern")
            .trim_start_matches('^')
            .trim_end_matches('$')
            .to_owned();
        let schema = &post["requestBody"]["content"]["application/x-www-form-urlencoded"]["schema"];
        let list = &doc["paths"]["/2010-04-01/Accounts/{AccountSid}/Messages.json"]["get"];
        let list_parameters = list["parameters"]
            .as_array()
            .expect("List Messages parameters")
            .iter()
            .filter(|p| p["in"] == "query")
            .filter_map(|p| p["name"].as_str().map(str::to_owned))
            .collect();
        Spec {
            list_parameters,
            create_path: Regex::new(&format!(
                "^/2010-04-01/Accounts/({sid_pattern})/Messages.json$"
            ))
            .expect("valid regex"),
            properties: schema["properties"]
                .as_object()
                .expect("properties")
                .clone(),
            required: schema["required"]
                .as_array()
                .map(|r| {
                    r.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            schemas: doc["components"]["schemas"]
                .as_object()
                .expect("schemas")
                .clone(),
            example: post["responses"]["201"]["content"]["application/json"]["examples"]["create"]
                ["value"]
                .clone(),
        }
    }

    fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(reference) => {
                let name = reference.rsplit('/').next().unwrap_or_default();
                self.schemas.get(name).unwrap_or(schema)
            }
            None => schema,
        }
    }

    /// Checks one form field against its schema; returns what is wrong.
    fn check_field(&self, name: &str, value: &str) -> Option<String> {
        let Some(schema) = self.properties.get(name) else {
            return Some(format!("{name} is not a Create Message parameter"));
        };
        let schema = self.resolve(schema);
        let schema = if schema["type"] == "array" {
            self.resolve(&schema["items"])
        } else {
            schema
        };
        match schema["type"].as_str() {
            Some("integer") if value.parse::<i64>().is_err() => {
                return Some(format!("{name} must be an integer"));
            }
            Some("number") if value.parse::<f64>().is_err() => {
                return Some(format!("{name} must be a number"));
            }
            Some("boolean") if value != "true" && value != "false" => {
                return Some(format!("{name} must be true or false"));
            }
            _ => {}
        }
        if let Some(pattern) = schema["pattern"].as_str()
            && !Regex::new(pattern).is_ok_and(|r| r.is_match(value))
        {
            return Some(format!("{name} does not match {pattern}"));
        }
        let chars = value.chars().count() as u64;
        if schema["minLength"].as_u64().is_some_and(|min| chars < min) {
            return Some(format!("{name} is shorter than its minLength"));
        }
        if schema["maxLength"].as_u64().is_some_and(|max| chars > max) {
            return Some(format!("{name} is longer than its maxLength"));
        }
        if let Some(allowed) = schema["enum"].as_array()
            && !allowed.iter().any(|v| v.as_str() == Some(value))
        {
            return Some(format!("{name} is not one of its enum values"));
        }
        if schema["format"] == "uri" && reqwest::Url::parse(value).is_err() {
            return Some(format!("{name} is not a URI"));
        }
        None
    }
}

/// One request the stub received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub form: Vec<(String, String)>,
    pub at: Instant,
}

impl Recorded {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// How the stub answers a request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 201 with a Message resource and a fresh sid.
    Created,
    /// Any status with a Twilio error body (`code`, `message`), optionally `Retry-After`.
    Error {
        status: u16,
        code: u32,
        message: String,
        retry_after: Option<String>,
    },
    /// Any status with a raw body (HTML, truncated JSON, ...).
    Raw { status: u16, body: String },
    /// Never answers within the client's timeout.
    Hang(Duration),
    /// Answers `Created`, but only after this long.
    Slow(Duration),
    /// Per request, at random: `error_percent`% 503, `hang_percent`% hangs for `hang`,
    /// the rest Created.
    Flaky {
        error_percent: u32,
        hang_percent: u32,
        hang: Duration,
    },
    /// For benchmarks: `error_percent`% 503, the rest Created, each after `latency`.
    Bench {
        error_percent: u32,
        latency: Duration,
    },
    /// Takes the message (List Messages will show it), then never answers in time: the
    /// window where a sender cannot know whether it was sent.
    TakeThenHang(Duration),
}

impl Reply {
    pub fn error(status: u16, code: u32, message: &str) -> Reply {
        Reply::Error {
            status,
            code,
            message: message.to_owned(),
            retry_after: None,
        }
    }
}

#[derive(Default)]
struct Behaviour {
    /// Answers for the next requests, in order.
    script: VecDeque<Reply>,
    /// Answers for every request to one `To` number (after the script).
    by_recipient: HashMap<String, Reply>,
    /// Answer when nothing else applies (default: Created).
    default: Option<Reply>,
}

/// A message the stub took, as List Messages shows it.
#[derive(Debug, Clone)]
struct Taken {
    sid: String,
    to: String,
    from: Option<String>,
    body: String,
    created: time::OffsetDateTime,
}

struct StubState {
    /// Benchmarks: skip the description checks and keep only counts and arrival times.
    lean: bool,
    arrivals: Mutex<HashMap<String, (u32, Instant)>>,
    spec: Spec,
    taken: Mutex<Vec<Taken>>,
    list_reply: Mutex<Option<Reply>>,
    lookups: Mutex<usize>,
    requests: Mutex<Vec<Recorded>>,
    violations: Mutex<Vec<String>>,
    behaviour: Mutex<Behaviour>,
    next_sid: Mutex<u128>,
    /// Requests being answered now, and the most there ever were at once.
    open: Mutex<(usize, usize)>,
}

/// Counts a request as open until it has been answered (or dropped).
struct Open<'a>(&'a StubState);

impl<'a> Open<'a> {
    fn new(state: &'a StubState) -> Self {
        let mut open = state.open.lock().expect("lock");
        open.0 += 1;
        open.1 = open.1.max(open.0);
        Open(state)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.open.lock().expect("lock").0 -= 1;
    }
}

#[derive(Clone)]
pub struct TwilioStub {
    pub url: String,
    state: Arc<StubState>,
}

impl TwilioStub {
    pub async fn start() -> TwilioStub {
        Self::start_with(false).await
    }

    /// A stub for benchmarks: Twilio's answers, without the per-request checks and logs.
    pub async fn start_lean() -> TwilioStub {
        Self::start_with(true).await
    }

    /// For a lean stub: per recipient, how many messages it took and when the first came.
    pub fn arrivals(&self) -> HashMap<String, (u32, Instant)> {
        self.state.arrivals.lock().expect("lock").clone()
    }

    async fn start_with(lean: bool) -> TwilioStub {
        let state = Arc::new(StubState {
            lean,
            arrivals: Mutex::default(),
            spec: Spec::load(),
            taken: Mutex::default(),
            list_reply: Mutex::default(),
            lookups: Mutex::default(),
            requests: Mutex::default(),
            violations: Mutex::default(),
            behaviour: Mutex::default(),
            next_sid: Mutex::new(1),
            open: Mutex::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the stub");
        let url = format!("http://{}", listener.local_addr().expect("stub address"));
        let app = Router::new().fallback(handle).with_state(state.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TwilioStub { url, state }
    }

    /// Answers the next requests with these replies, in order, then as before.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state
            .behaviour
            .lock()
            .expect("lock")
            .script
            .extend(replies);
    }

    /// Answers every request to `to` with `reply`.
    pub fn reply_for(&self, to: &str, reply: Reply) {
        self.state
            .behaviour
            .lock()
            .expect("lock")
            .by_recipient
            .insert(to.to_owned(), reply);
    }

    pub fn reply_always(&self, reply: Reply) {
        self.state.behaviour.lock().expect("lock").default = Some(reply);
    }

    /// Answers List Messages with `reply` (e.g. an error) instead of the list.
    pub fn list_reply(&self, reply: Option<Reply>) {
        *self.state.list_reply.lock().expect("lock") = reply;
    }

    /// How many List Messages requests came.
    pub fn lookups(&self) -> usize {
        *self.state.lookups.lock().expect("lock")
    }

    /// Every message the stub took (created), in order.
    /// How many times each number was texted, for numbers texted more than once.
    pub fn texted_twice(&self) -> Vec<(String, usize)> {
        let mut counts = std::collections::HashMap::new();
        for taken in self.state.taken.lock().expect("lock").iter() {
            *counts.entry(taken.to.clone()).or_insert(0) += 1;
        }
        let mut twice: Vec<_> = counts.into_iter().filter(|(_, n)| *n > 1).collect();
        twice.sort();
        twice
    }

    /// The sid of the latest message taken.
    pub fn last_sid(&self) -> Option<String> {
        self.state
            .taken
            .lock()
            .expect("lock")
            .last()
            .map(|t| t.sid.clone())
    }

    /// How many messages the stub took in all.
    pub fn taken(&self) -> usize {
        self.state.taken.lock().expect("lock").len()
    }

    /// The most Create Message requests the stub was answering at once.
    pub fn most_open(&self) -> usize {
        self.state.open.lock().expect("lock").1
    }

    /// How many recipients the lean stub took a message for (cheap: no copy).
    pub fn arrived(&self) -> usize {
        self.state.arrivals.lock().expect("lock").len()
    }

    pub fn taken_to(&self, to: &str) -> usize {
        self.state
            .taken
            .lock()
            .expect("lock")
            .iter()
            .filter(|t| t.to == to)
            .count()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().expect("lock").clone()
    }

    pub fn requests_to(&self, to: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.get("To") == Some(to))
            .collect()
    }

    pub fn violations(&self) -> Vec<String> {
        self.state.violations.lock().expect("lock").clone()
    }

    /// Fails the test if any request broke Twilio's description.
    pub fn assert_no_violations(&self) {
        let violations = self.violations();
        assert!(
            violations.is_empty(),
            "requests broke Twilio's OpenAPI description: {violations:#?}"
        );
    }
}

fn twilio_error(status: StatusCode, code: u32, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json!({
            "code": code,
            "message": message,
            "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
            "status": status.as_u16(),
        })
        .to_string(),
    )
        .into_response()
}

async fn handle(
    State(state): State<Arc<StubState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if method == Method::GET {
        return list_messages(&state, &uri, &headers);
    }
    let _open = Open::new(&state);
    if state.lean {
        return lean_answer(&state, &body).await;
    }
    let mut problems = Vec::new();
    if method != Method::POST {
        problems.push(format!("{method} {} is not Create Message", uri.path()));
    }
    match state.spec.create_path.captures(uri.path()) {
        Some(captures) if &captures[1] == super::twilio_stub::ACCOUNT_SID => {}
        Some(_) => problems.push("the path names another account".to_owned()),
        None => problems.push(format!(
            "{} does not match the Create Message path",
            uri.path()
        )),
    }
    let authorised = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .is_some_and(|decoded| decoded == format!("{ACCOUNT_SID}:{AUTH_TOKEN}").as_bytes());
    if !authorised {
        return twilio_error(StatusCode::UNAUTHORIZED, 20003, "Authenticate");
    }
    let form_encoded = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form_encoded {
        problems.push("the body is not application/x-www-form-urlencoded".to_owned());
    }
    let form: Vec<(String, String)> = serde_urlencoded_pairs(&body);
    for required in &state.spec.required {
        if !form.iter().any(|(k, _)| k == required) {
            problems.push(format!("required parameter {required} is missing"));
        }
    }
    for (name, value) in &form {
        if let Some(problem) = state.spec.check_field(name, value) {
            problems.push(problem);
        }
    }
    let has = |key: &str| form.iter().any(|(k, _)| k == key);
    if !has("From") && !has("MessagingServiceSid") {
        problems.push("neither From nor MessagingServiceSid is given".to_owned());
    }
    if !has("Body") {
        problems.push("no Body".to_owned());
    }
    if !problems.is_empty() {
        state
            .violations
            .lock()
            .expect("lock")
            .extend(problems.iter().cloned());
        return twilio_error(StatusCode::BAD_REQUEST, 21000, &problems.join("; "));
    }

    let recorded = Recorded {
        form: form.clone(),
        at: Instant::now(),
    };
    let to = recorded.get("To").unwrap_or_default().to_owned();
    state.requests.lock().expect("lock").push(recorded.clone());
    let reply = {
        let mut behaviour = state.behaviour.lock().expect("lock");
        behaviour
            .script
            .pop_front()
            .or_else(|| behaviour.by_recipient.get(&to).cloned())
            .or_else(|| behaviour.default.clone())
            .unwrap_or(Reply::Created)
    };
    let reply = match reply {
        Reply::Bench { latency, .. } => Reply::Slow(latency),
        Reply::Flaky {
            error_percent,
            hang_percent,
            hang,
        } => {
            let roll = {
                let mut next = state.next_sid.lock().expect("lock");
                // xorshift over the sid counter: varied enough, and no extra dependency.
                let mut x = (*next as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *next += 1;
                (x % 100) as u32
            };
            if roll < error_percent {
                Reply::error(503, 20503, "Service Unavailable")
            } else if roll < error_percent + hang_percent {
                Reply::Hang(hang)
            } else {
                Reply::Created
            }
        }
        other => other,
    };
    let reply = match reply {
        Reply::Slow(delay) => {
            // Taken first (List Messages and `last_sid` show it), answered later.
            let sid = take(&state, &recorded);
            tokio::time::sleep(delay).await;
            return created(&state, &recorded, &sid);
        }
        Reply::TakeThenHang(delay) => {
            take(&state, &recorded);
            tokio::time::sleep(delay).await;
            return twilio_error(StatusCode::GATEWAY_TIMEOUT, 20500, "too late");
        }
        other => other,
    };
    match reply {
        // Flaky was resolved above into one of the others.
        Reply::Slow(_)
        | Reply::TakeThenHang(_)
        | Reply::Flaky { .. }
        | Reply::Bench { .. }
        | Reply::Created => {
            let sid = take(&state, &recorded);
            created(&state, &recorded, &sid)
        }
        Reply::Error {
            status,
            code,
            message,
            retry_after,
        } => {
            let status = StatusCode::from_u16(status).expect("valid status");
            let mut response = twilio_error(status, code, &message);
            if let Some(value) = retry_after {
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    value.parse().expect("valid header value"),
                );
            }
            response
        }
        Reply::Raw { status, body } => (
            StatusCode::from_u16(status).expect("valid status"),
            [(header::CONTENT_TYPE, "text/html")],
            body,
        )
            .into_response(),
        Reply::Hang(duration) => {
            tokio::time::sleep(duration).await;
            twilio_error(StatusCode::GATEWAY_TIMEOUT, 20500, "too late")
        }
    }
}

/// A benchmark's answer: Twilio's format, no checks, no request log.
async fn lean_answer(state: &StubState, body: &[u8]) -> Response {
    let form = serde_urlencoded_pairs(body);
    let to = form
        .iter()
        .find(|(k, _)| k == "To")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let reply = {
        let behaviour = state.behaviour.lock().expect("lock");
        behaviour.default.clone().unwrap_or(Reply::Created)
    };
    let (error_percent, latency) = match reply {
        Reply::Bench {
            error_percent,
            latency,
        } => (error_percent, latency),
        _ => (0, Duration::ZERO),
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let sid = {
        let mut next = state.next_sid.lock().expect("lock");
        *next += 1;
        *next
    };
    let roll = (sid.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 7) % 100;
    if (roll as u32) < error_percent {
        return twilio_error(
            StatusCode::SERVICE_UNAVAILABLE,
            20503,
            "Service Unavailable",
        );
    }
    {
        let mut arrivals = state.arrivals.lock().expect("lock");
        let entry = arrivals.entry(to.clone()).or_insert((0, Instant::now()));
        entry.0 += 1;
    }
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/json")],
        format!(
            r#"{{"sid":"SM{sid:032x}","status":"queued","to":"{to}","account_sid":"{ACCOUNT_SID}","api_version":"2010-04-01","direction":"outbound-api"}}"#
        ),
    )
        .into_response()
}

/// The 201 answer for a taken message.
fn created(state: &StubState, recorded: &Recorded, sid: &str) -> Response {
    let mut message = state.spec.example.clone();
    message["sid"] = json!(sid);
    message["to"] = json!(recorded.get("To"));
    message["from"] = json!(recorded.get("From"));
    message["body"] = json!(recorded.get("Body"));
    message["messaging_service_sid"] = json!(recorded.get("MessagingServiceSid"));
    message["status"] = json!("queued");
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/json")],
        message.to_string(),
    )
        .into_response()
}

/// Records a message as taken and returns its new sid.
fn take(state: &StubState, request: &Recorded) -> String {
    let sid = {
        let mut next = state.next_sid.lock().expect("lock");
        *next += 1;
        format!("SM{:032x}", *next)
    };
    state.taken.lock().expect("lock").push(Taken {
        sid: sid.clone(),
        to: request.get("To").unwrap_or_default().to_owned(),
        from: request.get("From").map(str::to_owned),
        body: request.get("Body").unwrap_or_default().to_owned(),
        created: time::OffsetDateTime::now_utc(),
    });
    sid
}

/// Twilio's List Messages: the taken messages to `To`, newest first.
fn list_messages(state: &StubState, uri: &Uri, headers: &HeaderMap) -> Response {
    *state.lookups.lock().expect("lock") += 1;
    let mut problems = Vec::new();
    if !state.spec.create_path.is_match(uri.path()) {
        problems.push(format!("{} is not the List Messages path", uri.path()));
    }
    let query = serde_urlencoded_pairs(uri.query().unwrap_or_default().as_bytes());
    for (name, _) in &query {
        if !state.spec.list_parameters.contains(name) {
            problems.push(format!("{name} is not a List Messages parameter"));
        }
    }
    let authorised = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .is_some_and(|decoded| decoded == format!("{ACCOUNT_SID}:{AUTH_TOKEN}").as_bytes());
    if !authorised {
        return twilio_error(StatusCode::UNAUTHORIZED, 20003, "Authenticate");
    }
    if !problems.is_empty() {
        state
            .violations
            .lock()
            .expect("lock")
            .extend(problems.iter().cloned());
        return twilio_error(StatusCode::BAD_REQUEST, 21000, &problems.join("; "));
    }
    if let Some(Reply::Error {
        status,
        code,
        message,
        ..
    }) = state.list_reply.lock().expect("lock").clone()
    {
        return twilio_error(
            StatusCode::from_u16(status).expect("status"),
            code,
            &message,
        );
    }
    let to = query
        .iter()
        .find(|(k, _)| k == "To")
        .map(|(_, v)| v.clone());
    let taken = state.taken.lock().expect("lock").clone();
    let messages: Vec<Value> = taken
        .iter()
        .rev()
        .filter(|t| to.as_deref().is_none_or(|to| t.to == to))
        .take(50)
        .map(|t| {
            let mut message = state.spec.example.clone();
            let created = t
                .created
                .format(&time::format_description::well_known::Rfc2822)
                .expect("format");
            message["sid"] = json!(t.sid);
            message["to"] = json!(t.to);
            message["from"] = json!(t.from);
            message["body"] = json!(t.body);
            message["status"] = json!("sent");
            message["direction"] = json!("outbound-api");
            message["date_created"] = json!(created);
            message["date_updated"] = json!(created);
            message
        })
        .collect();
    let count = messages.len();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        json!({
            "messages": messages,
            "page": 0,
            "page_size": 50,
            "start": 0,
            "end": count.saturating_sub(1),
            "uri": uri.to_string(),
            "first_page_uri": uri.to_string(),
            "next_page_uri": null,
            "previous_page_uri": null,
        })
        .to_string(),
    )
        .into_response()
}

fn serde_urlencoded_pairs(body: &[u8]) -> Vec<(String, String)> {
    reqwest::Url::parse(&format!("http://x/?{}", String::from_utf8_lossy(body)))
        .map(|url| {
            url.query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default()
}
