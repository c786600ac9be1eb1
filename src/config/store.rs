//! Where PostgreSQL is (`SMSGW_DATABASE_URL`) and how long smsgw waits on it: every call
//! (`SMSGW_DATABASE_TIMEOUT`), and a migration for a table's lock
//! (`SMSGW_MIGRATE_LOCK_TIMEOUT`).

use std::time::Duration;

use super::{ConfigError, ServiceUrl, parse::bounded_duration};

/// The database and the bounds of waiting on it.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// May hold a password: printed only redacted.
    pub url: ServiceUrl,
    /// Every database call's bound: a statement's time on the server, and what the
    /// daemon waits before it gives up on a connection (see `store::connect::Bounds`).
    pub timeout: Duration,
    /// How long a migration's statement waits for a table's lock before it gives up and
    /// tries again (PostgreSQL's `lock_timeout`).
    pub migrate_lock_timeout: Duration,
}

pub(super) fn store(get: &impl Fn(&str) -> Option<String>) -> Result<StoreSettings, ConfigError> {
    Ok(StoreSettings {
        url: ServiceUrl::new(
            get("SMSGW_DATABASE_URL")
                .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/smsgw".to_owned()),
        ),
        timeout: timeout(get)?,
        migrate_lock_timeout: migrate_lock_timeout(get)?,
    })
}

/// Every database call's bound (`SMSGW_DATABASE_TIMEOUT`).
fn timeout(get: &impl Fn(&str) -> Option<String>) -> Result<Duration, ConfigError> {
    let range = (Duration::from_secs(1), Duration::from_secs(3_600));
    bounded_duration(get, "SMSGW_DATABASE_TIMEOUT", "15s", range)
}

/// A migration's wait for a table's lock (`SMSGW_MIGRATE_LOCK_TIMEOUT`).
fn migrate_lock_timeout(get: &impl Fn(&str) -> Option<String>) -> Result<Duration, ConfigError> {
    let range = (Duration::from_millis(100), Duration::from_secs(3_600));
    bounded_duration(get, "SMSGW_MIGRATE_LOCK_TIMEOUT", "10s", range)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::settings;

    #[test]
    fn the_database_timeout_is_a_duration_within_reason() {
        assert_eq!(
            settings(&[]).expect("defaults").store.timeout,
            Duration::from_secs(15)
        );
        let short = settings(&[("SMSGW_DATABASE_TIMEOUT", "2s")]).expect("2s");
        assert_eq!(short.store.timeout, Duration::from_secs(2));
        for wrong in ["soon", "0s", "500ms", "2h"] {
            let error = settings(&[("SMSGW_DATABASE_TIMEOUT", wrong)]).expect_err(wrong);
            assert_eq!(error.variable, "SMSGW_DATABASE_TIMEOUT");
        }
        let migrate = settings(&[("SMSGW_MIGRATE_LOCK_TIMEOUT", "500ms")]).expect("500ms");
        assert_eq!(
            migrate.store.migrate_lock_timeout,
            Duration::from_millis(500)
        );
        assert_eq!(
            settings(&[]).expect("defaults").store.migrate_lock_timeout,
            Duration::from_secs(10)
        );
        let error = settings(&[("SMSGW_MIGRATE_LOCK_TIMEOUT", "never")]).expect_err("never");
        assert_eq!(error.variable, "SMSGW_MIGRATE_LOCK_TIMEOUT");
    }
}
