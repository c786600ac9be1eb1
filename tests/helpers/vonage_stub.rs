//! A local Vonage SMS API that checks every request against Vonage's own OpenAPI
//! description (`tests/fixtures/providers/vonage-sms.openapi.yml`) and answers in its format:
//! HTTP 200 with a per-message `status`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use regex::Regex;
use serde_json::json;
use yaml_rust2::{Yaml, YamlLoader};

pub const API_KEY: &str = "abcd1234";
pub const API_SECRET: &str = "vonagesecret3f9a";
pub const SIGNATURE_SECRET: &str = "vonage-signature-secret";

/// Vonage's own OpenAPI description, kept as a fixture (`tests/fixtures/providers/`).
fn spec_path() -> String {
    format!(
        "{}/tests/fixtures/providers/vonage-sms.openapi.yml",
        env!("CARGO_MANIFEST_DIR")
    )
}

struct Spec {
    properties: Yaml,
    required: Vec<String>,
}

impl Spec {
    fn load() -> Spec {
        let path = spec_path();
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read Vonage's OpenAPI description at {path} ({e})"));
        let doc = YamlLoader::load_from_str(&text)
            .expect("the description is YAML")
            .remove(0);
        let schema = doc["components"]["schemas"]["NewMessage"].clone();
        Spec {
            required: schema["required"]
                .as_vec()
                .map(|r| {
                    r.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            properties: schema["properties"].clone(),
        }
    }

    fn check(&self, name: &str, value: &str) -> Option<String> {
        let schema = &self.properties[name];
        if schema.is_badvalue() {
            return Some(format!("{name} is not a send-an-sms parameter"));
        }
        match schema["type"].as_str() {
            Some("integer") => match value.parse::<i64>() {
                Err(_) => return Some(format!("{name} must be an integer")),
                Ok(n) => {
                    if schema["minimum"].as_i64().is_some_and(|min| n < min)
                        || schema["maximum"].as_i64().is_some_and(|max| n > max)
                    {
                        return Some(format!("{name} is out of range"));
                    }
                }
            },
            Some("boolean") if value != "true" && value != "false" => {
                return Some(format!("{name} must be true or false"));
            }
            _ => {}
        }
        if let Some(pattern) = schema["pattern"].as_str()
            && !Regex::new(&format!("^(?:{pattern})$")).is_ok_and(|r| r.is_match(value))
        {
            return Some(format!("{name} does not match {pattern}"));
        }
        let chars = value.chars().count() as i64;
        if schema["minLength"].as_i64().is_some_and(|min| chars < min)
            || schema["maxLength"].as_i64().is_some_and(|max| chars > max)
        {
            return Some(format!("{name} has the wrong length"));
        }
        if let Some(allowed) = schema["enum"].as_vec()
            && !allowed.iter().any(|v| {
                v.as_str() == Some(value)
                    || v.as_i64().map(|n| n.to_string()).as_deref() == Some(value)
            })
        {
            return Some(format!("{name} is not one of its values"));
        }
        None
    }
}

#[derive(Debug, Clone)]
pub struct VonageRequest {
    pub form: Vec<(String, String)>,
}

impl VonageRequest {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

struct StubState {
    spec: Spec,
    requests: Mutex<Vec<VonageRequest>>,
    violations: Mutex<Vec<String>>,
    /// Status codes to answer per `to` (default "0").
    statuses: Mutex<HashMap<String, String>>,
    next_id: Mutex<u64>,
}

#[derive(Clone)]
pub struct VonageStub {
    pub url: String,
    state: Arc<StubState>,
}

impl VonageStub {
    pub async fn start() -> VonageStub {
        let state = Arc::new(StubState {
            spec: Spec::load(),
            requests: Mutex::default(),
            violations: Mutex::default(),
            statuses: Mutex::default(),
            next_id: Mutex::new(0x0A00_0000_0000_0000),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the stub");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let app = Router::new().fallback(handle).with_state(state.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        VonageStub { url, state }
    }

    /// Answers messages to `to` (digits, no plus) with this status code.
    pub fn status_for(&self, to: &str, code: &str) {
        self.state
            .statuses
            .lock()
            .expect("lock")
            .insert(to.to_owned(), code.to_owned());
    }

    pub fn requests(&self) -> Vec<VonageRequest> {
        self.state.requests.lock().expect("lock").clone()
    }

    pub fn assert_no_violations(&self) {
        let violations = self.state.violations.lock().expect("lock").clone();
        assert!(
            violations.is_empty(),
            "requests broke Vonage's OpenAPI description: {violations:#?}"
        );
    }
}

async fn handle(
    State(state): State<Arc<StubState>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let mut problems = Vec::new();
    if method != Method::POST || uri.path() != "/sms/json" {
        problems.push(format!("{method} {} is not send-an-sms", uri.path()));
    }
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    for required in &state.spec.required {
        if !form.iter().any(|(k, _)| k == required) {
            problems.push(format!("required parameter {required} is missing"));
        }
    }
    for (name, value) in &form {
        if let Some(problem) = state.spec.check(name, value) {
            problems.push(problem);
        }
    }
    let request = VonageRequest { form };
    if request.get("api_secret") != Some(API_SECRET) || request.get("api_key") != Some(API_KEY) {
        return json_answer(
            json!({"message-count": "1", "messages": [{"status": "4", "error-text": "Bad Credentials"}]}),
        );
    }
    if request.get("text").is_none() {
        problems.push("no text".into());
    }
    if !problems.is_empty() {
        state
            .violations
            .lock()
            .expect("lock")
            .extend(problems.iter().cloned());
        return json_answer(
            json!({"message-count": "1", "messages": [{"status": "3", "error-text": problems.join("; ")}]}),
        );
    }
    let to = request.get("to").unwrap_or_default().to_owned();
    state.requests.lock().expect("lock").push(request);
    let code = state
        .statuses
        .lock()
        .expect("lock")
        .get(&to)
        .cloned()
        .unwrap_or_else(|| "0".into());
    if code != "0" {
        return json_answer(
            json!({"message-count": "1", "messages": [{"status": code, "error-text": format!("status {code}")}]}),
        );
    }
    let id = {
        let mut next = state.next_id.lock().expect("lock");
        *next += 1;
        format!("{:X}", *next)
    };
    json_answer(json!({
        "message-count": "1",
        "messages": [{
            "to": to,
            "message-id": id,
            "status": "0",
            "remaining-balance": "3.14159265",
            "message-price": "0.03330000",
            "network": "12345"
        }]
    }))
}

fn json_answer(value: serde_json::Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// The fields Vonage's description says every inbound SMS webhook carries
/// (`InboundMessage`'s `required`), so a test's inbound text is shaped as Vonage's are.
pub fn inbound_required_fields() -> Vec<String> {
    let text = std::fs::read_to_string(spec_path()).expect("Vonage's OpenAPI description");
    let doc = YamlLoader::load_from_str(&text)
        .expect("the description is YAML")
        .remove(0);
    doc["components"]["schemas"]["InboundMessage"]["required"]
        .as_vec()
        .map(|r| {
            r.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Posts `params` to smsgw's Vonage webhook at `path`, signed with `secret` as Vonage signs
/// with `method` (`sig` added), as JSON or as a form.
pub async fn post_signed(
    http_url: &str,
    path: &str,
    params: &[(&str, String)],
    secret: &str,
    method: smsgw::config::SignatureMethod,
    as_json: bool,
) -> reqwest::Response {
    let mut map: std::collections::BTreeMap<String, String> = params
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    let sig = smsgw::provider::vonage::callbacks::signature(secret, method, &map);
    map.insert("sig".into(), sig);
    let request = reqwest::Client::new().post(format!("{http_url}{path}"));
    let request = if as_json {
        request.json(&map)
    } else {
        request.form(&map)
    };
    request.send().await.expect("post a Vonage webhook")
}
