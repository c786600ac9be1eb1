//! The daemon as a separate process, for tests that signal or kill it.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use uuid::Uuid;

use super::smsgw_command as smsgw;

/// A daemon process whose stderr (the logs) is collected line by line.
pub struct Daemon {
    pub child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    pub fn spawn(vars: &[(String, String)]) -> Daemon {
        let mut child = smsgw(vars, &["run"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start smsgw run");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().expect("lock").push(line);
            }
        });
        Daemon { child, logs }
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("lock").clone()
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit; returns its code and how long it took.
    pub fn wait_exit(&mut self, limit: Duration) -> (Option<i32>, Duration) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return (status.code(), started.elapsed());
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                panic!(
                    "smsgw did not exit within {limit:?}; logs: {:#?}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn wait_ready(port: u16, daemon: &mut Daemon) {
    let deadline = Instant::now() + super::PATIENCE;
    let url = format!("http://127.0.0.1:{port}/readyz");
    loop {
        if let Ok(r) = reqwest::get(&url).await
            && r.status().is_success()
        {
            return;
        }
        if let Some(status) = daemon.child.try_wait().expect("try_wait") {
            panic!(
                "smsgw exited ({status}) before it was ready: {:#?}",
                daemon.logs()
            );
        }
        assert!(
            Instant::now() < deadline,
            "never ready: {:#?}",
            daemon.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn wait_status(db: &super::Db, id: Uuid, status: &str) {
    let deadline = Instant::now() + super::PATIENCE;
    loop {
        let now: Option<String> = db
            .optional("SELECT status FROM sms_messages WHERE id = $1", &[&id])
            .await;
        if now.as_deref() == Some(status) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never reached {status}: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
