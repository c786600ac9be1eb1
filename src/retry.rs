//! One way to wait and try again, for every reconnect and retry loop: exponential backoff
//! with jitter from `backon`, and a pause that a stop cuts short.

use std::time::Duration;

use backon::ExponentialBuilder;
use tokio_util::sync::CancellationToken;

/// For a write the message depends on: soon at first, never more than 5 s apart, for as
/// long as it takes.
pub fn patiently() -> ExponentialBuilder {
    backoff(Duration::from_millis(50), Duration::from_secs(5))
}

/// For a connection to a service that went away: 200 ms at first, at most 10 s apart, so
/// a restarted service is found again within seconds without being hammered meanwhile.
pub fn reconnecting() -> ExponentialBuilder {
    backoff(Duration::from_millis(200), Duration::from_secs(10))
}

/// Doubling waits from `min` to `max`, with jitter, without a limit on tries.
pub fn backoff(min: Duration, max: Duration) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
}

/// Waits `delay`, or less if `stop` fires; returns whether it fired.
pub async fn pause(delay: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => false,
        () = stop.cancelled() => true,
    }
}

/// Runs `op` until it succeeds, waiting as `backoff` says between tries and telling
/// `notify` of each failure and the wait after it. `None` when `stop` fires first.
pub async fn until_ok<T, E, F, Fut, N>(
    backoff: ExponentialBuilder,
    stop: &CancellationToken,
    op: F,
    notify: N,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    N: FnMut(&E, Duration),
{
    use backon::Retryable;
    let retrying = op.retry(backoff).notify(notify);
    tokio::select! {
        result = retrying => result.ok(),
        () = stop.cancelled() => None,
    }
}
