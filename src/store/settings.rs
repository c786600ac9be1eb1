//! The web app's tables smsgw reads: the schools' settings and the opt-outs (which the
//! webhooks also write, for STOP and START).

use std::sync::LazyLock;

use tokio_postgres::Row;

use super::{Store, StoreError, vocabulary::storable};
use crate::{
    phone::PhoneNumber,
    school::{Budget, Destinations, Quiet, SchoolSettings, zone},
};

const SETTINGS_SELECT: &str =
    "SELECT school_id, sms_enabled, country, sender_id, sender_number, provider,
        fallback_provider, allow_confirmations, allow_reminders, allow_changes,
        allow_announcements, allow_login_codes, timezone, quiet_hours_start, quiet_hours_end,
        allowed_countries, monthly_segment_budget
   FROM sms_school_settings";

fn settings_of(row: &Row) -> Result<SchoolSettings, StoreError> {
    // A NULL flag (written by hand) reads as "no": never send on a guess.
    let flag = |name: &str| -> Result<bool, StoreError> {
        Ok(row.try_get::<_, Option<bool>>(name)?.unwrap_or(false))
    };
    Ok(SchoolSettings {
        school_id: row.try_get("school_id")?,
        sms_enabled: flag("sms_enabled")?,
        country: row.try_get("country")?,
        sender_id: row.try_get("sender_id")?,
        sender_number: row.try_get("sender_number")?,
        provider: row.try_get("provider")?,
        fallback_provider: row.try_get("fallback_provider")?,
        allow_confirmations: flag("allow_confirmations")?,
        allow_reminders: flag("allow_reminders")?,
        allow_changes: flag("allow_changes")?,
        allow_announcements: flag("allow_announcements")?,
        allow_login_codes: flag("allow_login_codes")?,
        quiet: quiet_of(row)?,
        destinations: destinations_of(row)?,
        budget: budget_of(row)?,
    })
}

/// Where the school may text. A code that is not a country refuses its messages, and is
/// logged each time the school's settings are read.
fn destinations_of(row: &Row) -> Result<Destinations, StoreError> {
    let column: Option<Vec<Option<String>>> = row.try_get("allowed_countries")?;
    let destinations = Destinations::of(column.as_deref());
    if let Destinations::Invalid(code) = &destinations {
        let school_id: i64 = row.try_get("school_id")?;
        tracing::warn!(school_id, code = %code,
            "the school's allowed_countries holds a code that is not a country: its messages are refused");
    }
    Ok(destinations)
}

/// The school's monthly budget. A negative one refuses its messages, and is logged each
/// time the school's settings are read.
fn budget_of(row: &Row) -> Result<Budget, StoreError> {
    let budget = Budget::of(row.try_get("monthly_segment_budget")?);
    if let Budget::Invalid(value) = budget {
        let school_id: i64 = row.try_get("school_id")?;
        tracing::warn!(
            school_id,
            monthly_segment_budget = value,
            "the school's monthly_segment_budget is negative: its messages are refused"
        );
    }
    Ok(budget)
}

/// The school's quiet hours. An unknown time zone holds nothing back, and is logged each
/// time the school's settings are read (at start-up and when they change).
fn quiet_of(row: &Row) -> Result<Quiet, StoreError> {
    let timezone: Option<String> = row.try_get("timezone")?;
    let quiet = Quiet::of(
        timezone.as_deref(),
        row.try_get("quiet_hours_start")?,
        row.try_get("quiet_hours_end")?,
    );
    if let Quiet::UnknownZone(zone) = &quiet {
        let school_id: i64 = row.try_get("school_id")?;
        tracing::warn!(school_id, timezone = %zone,
            "the school's timezone is not a known IANA name: its quiet hours are ignored");
    }
    Ok(quiet)
}

impl Store {
    /// Every provider name the schools' settings use (as provider or fallback), with the
    /// schools (up to a few) that use it.
    pub async fn school_provider_names(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = self
            .rows(
                "SELECT name, string_agg(school_id::text, ', ' ORDER BY school_id)
                   FROM (SELECT trim(provider) AS name, school_id FROM sms_school_settings
                          WHERE provider IS NOT NULL AND trim(provider) <> ''
                         UNION
                         SELECT trim(fallback_provider), school_id FROM sms_school_settings
                          WHERE fallback_provider IS NOT NULL AND trim(fallback_provider) <> '') n
                  GROUP BY name",
                &[],
            )
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect()
    }

    pub async fn school_settings(
        &self,
        school_id: i64,
    ) -> Result<Option<SchoolSettings>, StoreError> {
        static SQL: LazyLock<String> =
            LazyLock::new(|| format!("{SETTINGS_SELECT} WHERE school_id = $1"));
        let row = self.row(&SQL, &[&school_id]).await?;
        row.as_ref().map(settings_of).transpose()
    }

    /// The schools whose `timezone` is not a known IANA name (or missing while quiet hours
    /// are set), with the name as written: their quiet hours hold nothing back.
    pub async fn schools_with_unknown_timezone(&self) -> Result<Vec<(i64, String)>, StoreError> {
        let rows = self
            .rows(
                "SELECT school_id, COALESCE(timezone, '') FROM sms_school_settings
                  WHERE timezone IS NOT NULL
                     OR (quiet_hours_start IS NOT NULL AND quiet_hours_end IS NOT NULL)
                  ORDER BY school_id",
                &[],
            )
            .await?;
        let mut unknown = Vec::new();
        for row in &rows {
            let name: String = row.try_get(1)?;
            if zone(&name).is_none() {
                unknown.push((row.try_get(0)?, name));
            }
        }
        Ok(unknown)
    }

    /// Every school's settings, for the in-memory cache.
    pub async fn all_school_settings(&self) -> Result<Vec<SchoolSettings>, StoreError> {
        let rows = self.rows(SETTINGS_SELECT, &[]).await?;
        rows.iter().map(settings_of).collect()
    }

    /// Records an opt-out; a second one for the same number and school changes nothing.
    pub async fn add_opt_out(
        &self,
        school_id: Option<i64>,
        phone: &PhoneNumber,
        source: &str,
    ) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO sms_opt_outs (school_id, phone, source) VALUES ($1, $2, $3)
             ON CONFLICT (phone, (COALESCE(school_id, -1))) DO NOTHING",
            &[&school_id, &phone.as_str(), &source],
        )
        .await?;
        Ok(())
    }

    /// Applies an inbound STOP or START once per provider message id (`provider`,
    /// `message_id`): the id is recorded in the statement that changes the opt-outs, so a
    /// replayed request changes nothing. `false` when the id was applied before.
    ///
    /// STOP records an opt-out from every school. START removes the opt-outs a carrier or
    /// an inbound STOP made for `phone`, not the ones the web app wrote: those are the
    /// user's settings there.
    pub async fn apply_inbound_keyword(
        &self,
        provider: &str,
        message_id: &str,
        phone: &PhoneNumber,
        change: OptOutChange,
    ) -> Result<bool, StoreError> {
        let sql = match change {
            OptOutChange::Stop => INBOUND_STOP,
            OptOutChange::Start => INBOUND_START,
        };
        let message_id = storable(message_id);
        let row = self
            .row(sql, &[&provider, &message_id, &phone.as_str()])
            .await?
            .ok_or_else(|| StoreError::Corrupt("no answer".into()))?;
        Ok(row.try_get::<_, i64>(0)? == 1)
    }
}

/// What an inbound keyword does to the sender's opt-outs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptOutChange {
    Stop,
    Start,
}

/// `$1` provider, `$2` its message id, `$3` the sender. A data-modifying `WITH` runs to
/// completion whatever the outer query reads, so the change happens only with the first
/// record of the id. The answer: 1 when applied, 0 for a replay.
const INBOUND_STOP: &str = "
    WITH first AS (
        INSERT INTO sms_webhooks_seen (provider, webhook_id) VALUES ($1, $2)
        ON CONFLICT DO NOTHING RETURNING 1
    ), applied AS (
        INSERT INTO sms_opt_outs (school_id, phone, source)
        SELECT NULL::bigint, $3, 'inbound' FROM first
        ON CONFLICT (phone, (COALESCE(school_id, -1))) DO NOTHING
    )
    SELECT count(*) FROM first";

/// As [`INBOUND_STOP`], removing the opt-outs a carrier or an inbound STOP made.
const INBOUND_START: &str = "
    WITH first AS (
        INSERT INTO sms_webhooks_seen (provider, webhook_id) VALUES ($1, $2)
        ON CONFLICT DO NOTHING RETURNING 1
    ), applied AS (
        DELETE FROM sms_opt_outs
         WHERE phone = $3 AND source IN ('inbound', 'provider') AND EXISTS (SELECT 1 FROM first)
    )
    SELECT count(*) FROM first";
