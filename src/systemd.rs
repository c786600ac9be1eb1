//! systemd's notify protocol (`Type=notify`): READY once the consumers are active,
//! STOPPING at shutdown, STATUS lines, and watchdog pings. Without `NOTIFY_SOCKET` (not
//! under systemd) every call does nothing.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

static READY_SENT: AtomicBool = AtomicBool::new(false);

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "could not notify systemd");
    }
}

/// Tells systemd the service is up (the first time only) and what it is doing.
pub fn ready(status: &str) {
    if READY_SENT.swap(true, Ordering::SeqCst) {
        send(&[NotifyState::Status(status)]);
    } else {
        send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Pings the watchdog at half its interval until `stop` fires, when systemd asked for
/// one (`WatchdogSec=`). The pings come from the async runtime, so a wedged runtime
/// misses them and systemd restarts the service.
pub async fn watchdog(stop: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (interval / 2).max(Duration::from_millis(100));
    loop {
        send(&[NotifyState::Watchdog]);
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
    }
}
