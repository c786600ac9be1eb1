//! A real browser for the tests of pages: Debian's `chromium`, headless, driven through
//! the DevTools protocol (one WebSocket to the page; `Runtime.evaluate` reads what a person
//! would see). `.ci/run` installs chromium; a machine without it skips these tests.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::TcpStream,
    process::{Child, Command},
};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

use super::PATIENCE;

/// The `chromium` on `PATH`, if any.
pub fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("chromium"))
        .find(|candidate| candidate.is_file())
}

/// Says, past the test harness's capture of `print!`, that `test` did not run.
pub fn skipped(test: &str) {
    skipped_without(
        test,
        "chromium is not installed (apt-get install -y chromium; .ci/run does)",
    );
}

/// Says, past the test harness's capture, that `test` did not run, and why.
pub fn skipped_without(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// A headless chromium showing one page, killed (with its profile removed) when dropped.
pub struct Browser {
    process: Child,
    profile: PathBuf,
    page: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.process.start_kill();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Browser {
    /// Opens `url` in a new headless chromium at `binary`.
    pub async fn open(binary: &PathBuf, url: &str) -> Browser {
        let profile = std::env::temp_dir().join(format!("smsgw-chromium-{}", uuid::Uuid::new_v4()));
        let mut process = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromium");
        let stderr = process.stderr.take().expect("chromium's stderr");
        let port = devtools_port(stderr).await;
        let page = page_socket(port, url).await;
        Browser {
            process,
            profile,
            page,
            next_id: 0,
        }
    }

    /// The value of a JavaScript expression in the page.
    pub async fn eval(&mut self, expression: &str) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let call = json!({
            "id": id,
            "method": "Runtime.evaluate",
            "params": {"expression": expression, "returnByValue": true},
        });
        self.page
            .send(Message::text(call.to_string()))
            .await
            .expect("send to chromium");
        loop {
            let message = tokio::time::timeout(PATIENCE, self.page.next())
                .await
                .expect("chromium answers")
                .expect("the page is open")
                .expect("a readable message");
            let Message::Text(text) = message else {
                continue;
            };
            let answer: Value = serde_json::from_str(text.as_str()).expect("JSON from chromium");
            if answer["id"] == id {
                return answer["result"]["result"]["value"].clone();
            }
        }
    }

    /// The page's visible text.
    pub async fn text(&mut self) -> String {
        let text = self
            .eval("document.body ? document.body.innerText : ''")
            .await;
        text.as_str().unwrap_or_default().to_owned()
    }

    /// Waits until the page's visible text holds `wanted`; returns that text.
    pub async fn wait_for_text(&mut self, wanted: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let text = self.text().await;
            if text.contains(wanted) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "the page never showed {wanted:?}; it shows:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The DevTools port chromium prints ("DevTools listening on ws://127.0.0.1:PORT/...").
async fn devtools_port(stderr: tokio::process::ChildStderr) -> u16 {
    let mut lines = BufReader::new(stderr).lines();
    let find = async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.split("ws://127.0.0.1:").nth(1) {
                return rest.split('/').next().and_then(|p| p.parse().ok());
            }
        }
        None
    };
    let port = tokio::time::timeout(PATIENCE, find)
        .await
        .expect("chromium starts its DevTools in time")
        .expect("chromium says where its DevTools listen");
    // Keep reading, so that chromium never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    port
}

/// A WebSocket to the page chromium opened at `url`.
async fn page_socket(port: u16, url: &str) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
    let deadline = Instant::now() + PATIENCE;
    let socket_url = loop {
        let targets: Value = reqwest::get(format!("http://127.0.0.1:{port}/json/list"))
            .await
            .expect("the DevTools answer")
            .json()
            .await
            .expect("a list of targets");
        let page =
            targets.as_array().into_iter().flatten().find(|t| {
                t["type"] == "page" && t["url"].as_str().is_some_and(|u| u.starts_with(url))
            });
        if let Some(socket) = page.and_then(|p| p["webSocketDebuggerUrl"].as_str()) {
            break socket.to_owned();
        }
        assert!(Instant::now() < deadline, "chromium never opened {url}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio_tungstenite::connect_async(socket_url.as_str())
        .await
        .expect("connect to the page")
        .0
}
