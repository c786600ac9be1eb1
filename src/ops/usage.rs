//! `smsgw usage`: messages and segments per school and status over a range, the figures
//! a school is billed on, counted from the log.
//!
//! A message is one row of `sms_messages`, whatever happened to it: retried (one row,
//! several attempts), sent through a second provider (one row), one recipient of an
//! announcement (a row each; the announcement itself has none). Segments are the row's,
//! as smsgw counted them from the text (GSM-7 or UCS-2).
//!
//! Below the figures, each school with a monthly budget: its budget and what it used in
//! each month of the range, as the guard counts it (the segments of every message it
//! admitted that month, a failure after admission included).

use std::{collections::BTreeMap, process::ExitCode};

use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{EXIT_FAILED, print_table};
use crate::{
    config::Settings,
    policy::guards::Month,
    store::{BudgetUse, Status, Store, UsageCount},
};

/// The messages created from `from` (inclusive) to `to` (exclusive), by `created_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageRange {
    from: OffsetDateTime,
    to: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--from must be before --to (the range is from inclusive, to exclusive)")]
pub struct UsageRangeError;

impl UsageRange {
    pub fn new(from: OffsetDateTime, to: OffsetDateTime) -> Result<Self, UsageRangeError> {
        if from < to {
            Ok(UsageRange { from, to })
        } else {
            Err(UsageRangeError)
        }
    }

    /// The first days of the first and the last month the range touches.
    fn months(&self) -> (time::Date, time::Date) {
        let last = self.to - time::Duration::nanoseconds(1);
        (
            Month::of(self.from).first_day(),
            Month::of(last.max(self.from)).first_day(),
        )
    }

    fn describe(&self) -> String {
        let utc = |at: OffsetDateTime| {
            at.to_offset(time::UtcOffset::UTC)
                .format(&Rfc3339)
                .unwrap_or_default()
        };
        format!(
            "messages created from {} (inclusive) to {} (exclusive)",
            utc(self.from),
            utc(self.to)
        )
    }
}

/// A column of the figures: a final status, or every status still in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Column {
    Sent,
    Delivered,
    Undelivered,
    Failed,
    Suppressed,
    Expired,
    Cancelled,
    InProgress,
}

const COLUMNS: [Column; 8] = [
    Column::Sent,
    Column::Delivered,
    Column::Undelivered,
    Column::Failed,
    Column::Suppressed,
    Column::Expired,
    Column::Cancelled,
    Column::InProgress,
];

impl Column {
    /// Every status has its column: a new status must be placed here (no wildcard).
    fn of(status: Status) -> Column {
        match status {
            Status::Sent => Column::Sent,
            Status::Delivered => Column::Delivered,
            Status::Undelivered => Column::Undelivered,
            Status::Failed => Column::Failed,
            Status::Suppressed => Column::Suppressed,
            Status::Expired => Column::Expired,
            Status::Cancelled => Column::Cancelled,
            Status::Queued | Status::Sending | Status::Retrying => Column::InProgress,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Column::Sent => "sent",
            Column::Delivered => "delivered",
            Column::Undelivered => "undelivered",
            Column::Failed => "failed",
            Column::Suppressed => "suppressed",
            Column::Expired => "expired",
            Column::Cancelled => "cancelled",
            Column::InProgress => "in_progress",
        }
    }

    /// A provider accepted the message: what providers charge for, delivered or not.
    /// Failed, suppressed, expired and cancelled messages never reached a carrier; one in progress
    /// has not yet.
    fn billable(self) -> bool {
        match self {
            Column::Sent | Column::Delivered | Column::Undelivered => true,
            Column::Failed
            | Column::Suppressed
            | Column::Expired
            | Column::Cancelled
            | Column::InProgress => false,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Count {
    messages: i64,
    segments: i64,
}

impl Count {
    fn add(&mut self, other: Count) {
        self.messages += other.messages;
        self.segments += other.segments;
    }
}

/// One school's figures (or, with no school, the sum of several).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct SchoolUsage {
    school_id: Option<i64>,
    all: Count,
    /// In the order of [`COLUMNS`].
    columns: [Count; COLUMNS.len()],
    billable: Count,
}

impl SchoolUsage {
    fn add(&mut self, column: Column, count: Count) {
        self.all.add(count);
        if let Some(i) = COLUMNS.iter().position(|c| *c == column) {
            self.columns[i].add(count);
        }
        if column.billable() {
            self.billable.add(count);
        }
    }

    fn in_progress(&self) -> i64 {
        self.columns[COLUMNS.len() - 1].messages
    }
}

/// The log's counts by school and status, as one row per school, by school id.
fn tally(counts: &[UsageCount]) -> Vec<SchoolUsage> {
    let mut schools: BTreeMap<i64, SchoolUsage> = BTreeMap::new();
    for count in counts {
        let school = schools
            .entry(count.school_id)
            .or_insert_with(|| SchoolUsage {
                school_id: Some(count.school_id),
                ..SchoolUsage::default()
            });
        let figures = Count {
            messages: count.messages,
            segments: count.segments,
        };
        school.add(Column::of(count.status), figures);
    }
    schools.into_values().collect()
}

fn total(schools: &[SchoolUsage]) -> SchoolUsage {
    let mut total = SchoolUsage::default();
    for school in schools {
        total.all.add(school.all);
        total.billable.add(school.billable);
        for (sum, count) in total.columns.iter_mut().zip(school.columns) {
            sum.add(count);
        }
    }
    total
}

/// One line per school under a header, for the billing job: no total line, which it
/// would count twice.
fn csv(schools: &[SchoolUsage]) -> String {
    let mut header = vec!["school_id".to_owned(), "messages".into(), "segments".into()];
    for name in COLUMNS.map(Column::name).into_iter().chain(["billable"]) {
        header.push(format!("{name}_messages"));
        header.push(format!("{name}_segments"));
    }
    let mut out = header.join(",") + "\n";
    for school in schools {
        let counts = [school.all]
            .into_iter()
            .chain(school.columns)
            .chain([school.billable]);
        let mut cells = vec![school.school_id.map_or(String::new(), |id| id.to_string())];
        for count in counts {
            cells.push(count.messages.to_string());
            cells.push(count.segments.to_string());
        }
        out += &(cells.join(",") + "\n");
    }
    out
}

/// Two lines per school, messages and segments; a total when there are several schools.
fn print_figures(range: &UsageRange, schools: &[SchoolUsage]) {
    println!("{}, UTC", range.describe());
    if schools.is_empty() {
        println!("no messages");
        return;
    }
    let mut header = vec!["SCHOOL", "COUNT", "ALL"];
    header.extend([
        "SENT",
        "DELIVERED",
        "UNDELIVERED",
        "FAILED",
        "SUPPRESSED",
        "EXPIRED",
        "CANCELLED",
        "IN PROGRESS",
        "BILLABLE",
    ]);
    let mut rows = Vec::new();
    let total = (schools.len() > 1).then(|| total(schools));
    for school in schools.iter().chain(total.as_ref()) {
        let label = school.school_id.map_or("all".into(), |id| id.to_string());
        let figures = |pick: fn(&Count) -> i64, what: &str, label: String| {
            let mut row = vec![label, what.to_owned(), pick(&school.all).to_string()];
            row.extend(school.columns.iter().map(|c| pick(c).to_string()));
            row.push(pick(&school.billable).to_string());
            row
        };
        rows.push(figures(|c| c.messages, "messages", label));
        rows.push(figures(|c| c.segments, "segments", String::new()));
    }
    print_table(&header, &rows);
}

/// Each school's monthly budget and its use, a line per school and month (not in the
/// CSV, whose lines the billing job reads).
fn print_budgets(budgets: &[BudgetUse]) {
    if budgets.is_empty() {
        return;
    }
    println!();
    println!("monthly segment budgets, UTC: segments admitted (sent, or failed after admission)");
    let rows: Vec<Vec<String>> = budgets
        .iter()
        .map(|b| {
            vec![
                b.school_id.to_string(),
                Month::of(b.month.midnight().assume_utc()).to_string(),
                b.budget.to_string(),
                b.used.to_string(),
                format!("{}%", percent(b.used, b.budget)),
            ]
        })
        .collect();
    print_table(&["SCHOOL", "MONTH", "BUDGET", "USED", "USE"], &rows);
}

/// `used` as a share of `budget`, in whole percent (rounded down); a budget of 0 is all
/// used by its first segment.
pub(super) fn percent(used: i64, budget: i32) -> i64 {
    match i64::from(budget) {
        0 if used > 0 => 100,
        0 => 0,
        budget => used.saturating_mul(100) / budget,
    }
}

/// `smsgw usage`: the figures as a table, or as CSV for the billing job. What may make
/// them incomplete or not yet final goes to stderr.
pub async fn print_usage(
    settings: &Settings,
    range: UsageRange,
    school: Option<i64>,
    as_csv: bool,
) -> ExitCode {
    let counted = async {
        let store = Store::connect(settings.store.url.expose(), 1).await?;
        let (first, last) = range.months();
        let counts = store.usage(range.from, range.to, school).await;
        let budgets = store.budget_use(first, last, school).await;
        store.close().await;
        Ok::<_, crate::store::StoreError>((counts?, budgets?))
    }
    .await;
    let (schools, budgets) = match counted {
        Ok((counts, budgets)) => (tally(&counts), budgets),
        Err(e) => {
            eprintln!("smsgw: message log unavailable: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    if as_csv {
        print!("{}", csv(&schools));
    } else {
        print_figures(&range, &schools);
        print_budgets(&budgets);
    }
    warn_if_not_final(settings, &range, &schools, OffsetDateTime::now_utc());
    ExitCode::SUCCESS
}

/// Says on stderr when the figures may still change, or miss what retention deleted.
fn warn_if_not_final(
    settings: &Settings,
    range: &UsageRange,
    schools: &[SchoolUsage],
    now: OffsetDateTime,
) {
    let kept_since = time::Duration::try_from(settings.retention.log_retention)
        .ok()
        .and_then(|kept| now.checked_sub(kept));
    if kept_since.is_some_and(|since| range.from < since) {
        eprintln!(
            "smsgw: warning: finished messages older than SMSGW_LOG_RETENTION ({}) have \
             been deleted; figures before then are incomplete",
            humantime::format_duration(settings.retention.log_retention)
        );
    }
    if range.to > now {
        eprintln!("smsgw: warning: the range has not ended yet; its figures will grow");
    }
    let in_progress: i64 = schools.iter().map(SchoolUsage::in_progress).sum();
    if in_progress > 0 {
        eprintln!(
            "smsgw: warning: {in_progress} messages are still in progress; their final \
             status will change these figures"
        );
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    fn count(school_id: i64, status: Status, messages: i64, segments: i64) -> UsageCount {
        UsageCount {
            school_id,
            status,
            messages,
            segments,
        }
    }

    #[test]
    fn a_range_must_end_after_it_begins() {
        let day = datetime!(2026-11-01 0:00 UTC);
        assert!(UsageRange::new(day, datetime!(2026-12-01 0:00 UTC)).is_ok());
        assert_eq!(UsageRange::new(day, day), Err(UsageRangeError));
        assert_eq!(
            UsageRange::new(datetime!(2026-12-01 0:00 UTC), day),
            Err(UsageRangeError)
        );
    }

    #[test]
    fn statuses_in_progress_share_a_column_and_only_accepted_ones_are_billable() {
        use Status::*;
        let schools = tally(&[
            count(7, Delivered, 3, 4),
            count(7, Sent, 1, 1),
            count(7, Undelivered, 1, 2),
            count(7, Failed, 2, 2),
            count(7, Suppressed, 1, 1),
            count(7, Expired, 1, 1),
            count(7, Cancelled, 2, 2),
            count(7, Queued, 1, 1),
            count(7, Sending, 1, 3),
            count(7, Retrying, 1, 1),
            count(3, Delivered, 5, 5),
        ]);
        assert_eq!(schools.len(), 2);
        assert_eq!(schools[0].school_id, Some(3), "by school id");
        let seven = &schools[1];
        assert_eq!(
            seven.all,
            Count {
                messages: 14,
                segments: 18
            }
        );
        assert_eq!(
            seven.billable,
            Count {
                messages: 5,
                segments: 7
            },
            "sent, delivered and undelivered"
        );
        assert_eq!(seven.in_progress(), 3);
        assert_eq!(
            seven.columns[7].segments, 5,
            "queued, sending and retrying together"
        );
    }

    #[test]
    fn the_csv_has_a_header_and_a_line_per_school_without_a_total() {
        use Status::*;
        let text = csv(&tally(&[
            count(42, Delivered, 2, 3),
            count(42, Failed, 1, 1),
            count(7, Suppressed, 1, 2),
        ]));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "school_id,messages,segments,sent_messages,sent_segments,\
                 delivered_messages,delivered_segments,undelivered_messages,\
                 undelivered_segments,failed_messages,failed_segments,\
                 suppressed_messages,suppressed_segments,expired_messages,expired_segments,\
                 cancelled_messages,cancelled_segments,\
                 in_progress_messages,in_progress_segments,billable_messages,billable_segments",
                "7,1,2,0,0,0,0,0,0,0,0,1,2,0,0,0,0,0,0,0,0",
                "42,3,4,0,0,2,3,0,0,1,1,0,0,0,0,0,0,0,0,2,3",
            ]
        );
        assert_eq!(csv(&[]).lines().count(), 1, "the header alone");
    }

    #[test]
    fn a_range_covers_the_months_it_touches() {
        let range = |from, to| UsageRange::new(from, to).expect("a range");
        let (first, last) = range(
            datetime!(2026-11-15 0:00 UTC),
            datetime!(2027-01-01 0:00 UTC),
        )
        .months();
        assert_eq!(
            (first.to_string(), last.to_string()),
            ("2026-11-01".into(), "2026-12-01".into())
        );
        let one = range(
            datetime!(2026-12-01 0:00 UTC),
            datetime!(2026-12-01 0:00:01 UTC),
        );
        assert_eq!(one.months().0, one.months().1);
    }

    #[test]
    fn use_is_a_share_of_the_budget() {
        assert_eq!(percent(4, 5), 80);
        assert_eq!(percent(79, 100), 79);
        assert_eq!(percent(120, 100), 120);
        assert_eq!(percent(0, 0), 0);
        assert_eq!(percent(1, 0), 100);
    }

    #[test]
    fn the_total_adds_up_every_school() {
        use Status::*;
        let schools = tally(&[count(1, Delivered, 2, 2), count(2, Delivered, 3, 6)]);
        let sum = total(&schools);
        assert_eq!(sum.school_id, None);
        assert_eq!(
            sum.billable,
            Count {
                messages: 5,
                segments: 8
            }
        );
        assert_eq!(sum.columns[1], sum.billable);
    }
}
