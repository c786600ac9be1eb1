//! Quiet hours: a nightly window in the school's own time zone during which texts that
//! can wait (reminders, confirmations, announcements) do. Pure: the time is passed in.
//!
//! A window is a pair of wall-clock times (`21:00`–`08:00`), crossing midnight when its
//! end is not after its start. Each night's window is turned into two instants with the
//! school's time zone, so the nights the clocks move are right: a window is as long as
//! the wall clock says, never skipped and never held twice. A wall-clock time that does
//! not exist that night (the clocks went forward over it) is read as if they had not
//! moved yet (`01:30` in a gap from 01:00 to 02:00 is 02:30 summer time); one that
//! happens twice (the clocks went back) is its first occurrence. This is the rule of
//! RFC 5545 and of JavaScript's Temporal (`compatible`).

use jiff::{
    Timestamp,
    civil::{Date, Time},
    tz::TimeZone,
};

/// A school's quiet hours in its time zone.
#[derive(Debug, Clone, PartialEq)]
pub struct QuietHours {
    pub start: Time,
    pub end: Time,
    pub zone: TimeZone,
}

impl QuietHours {
    /// When the quiet window around `now` ends; `None` when `now` is outside every
    /// window (or the window is empty: start and end equal).
    pub fn release(&self, now: Timestamp) -> Option<Timestamp> {
        if self.start == self.end {
            return None;
        }
        let today = now.to_zoned(self.zone.clone()).date();
        // Yesterday's window may still last (it crosses midnight); then today's.
        [today.yesterday().ok(), Some(today)]
            .into_iter()
            .flatten()
            .filter_map(|night| self.window_from(night))
            .find(|(from, until)| *from <= now && now < *until)
            .map(|(_, until)| until)
    }

    /// The window that starts on the local date `night`, as instants.
    fn window_from(&self, night: Date) -> Option<(Timestamp, Timestamp)> {
        let end_day = if self.end <= self.start {
            night.tomorrow().ok()?
        } else {
            night
        };
        let at = |date: Date, time: Time| {
            date.to_datetime(time)
                .to_zoned(self.zone.clone())
                .ok()
                .map(|z| z.timestamp())
        };
        Some((at(night, self.start)?, at(end_day, self.end)?))
    }
}

/// The time zone an IANA name (`Europe/London`) stands for, from the database built into
/// the binary (the container image has no `/usr/share/zoneinfo`).
pub fn zone(name: &str) -> Option<TimeZone> {
    jiff::tz::db().get(name.trim()).ok()
}

#[cfg(test)]
mod tests {
    use jiff::civil::time;

    use super::*;

    fn quiet(start: Time, end: Time, zone_name: &str) -> QuietHours {
        QuietHours {
            start,
            end,
            zone: zone(zone_name).expect("a known zone"),
        }
    }

    fn at(instant: &str) -> Timestamp {
        instant.parse().expect("an RFC 3339 instant")
    }

    fn night_in_london() -> QuietHours {
        quiet(time(21, 0, 0, 0), time(8, 0, 0, 0), "Europe/London")
    }

    #[test]
    fn a_window_across_midnight_holds_until_the_morning() {
        let q = night_in_london();
        // 23:30 in London in winter (UTC+0): held until 08:00 the next morning.
        assert_eq!(
            q.release(at("2026-11-25T23:30:00Z")),
            Some(at("2026-11-26T08:00:00Z"))
        );
        // 03:00: still the window that began yesterday evening.
        assert_eq!(
            q.release(at("2026-11-26T03:00:00Z")),
            Some(at("2026-11-26T08:00:00Z"))
        );
    }

    #[test]
    fn outside_the_window_and_at_its_edges() {
        let q = night_in_london();
        assert_eq!(q.release(at("2026-11-26T12:00:00Z")), None);
        assert_eq!(
            q.release(at("2026-11-26T08:00:00Z")),
            None,
            "the end is free"
        );
        assert_eq!(
            q.release(at("2026-11-26T21:00:00Z")),
            Some(at("2026-11-27T08:00:00Z")),
            "the start is quiet"
        );
        assert_eq!(q.release(at("2026-11-26T20:59:59Z")), None);
    }

    #[test]
    fn a_window_within_one_day() {
        let lunch = quiet(time(12, 0, 0, 0), time(14, 0, 0, 0), "Europe/London");
        assert_eq!(
            lunch.release(at("2026-11-26T13:00:00Z")),
            Some(at("2026-11-26T14:00:00Z"))
        );
        assert_eq!(lunch.release(at("2026-11-26T15:00:00Z")), None);
        assert_eq!(lunch.release(at("2026-11-26T01:00:00Z")), None);
    }

    #[test]
    fn an_empty_window_holds_nothing() {
        let none = quiet(time(8, 0, 0, 0), time(8, 0, 0, 0), "Europe/London");
        assert_eq!(none.release(at("2026-11-26T08:00:00Z")), None);
    }

    #[test]
    fn the_window_follows_the_local_clock_in_summer() {
        // 08:00 British Summer Time is 07:00 UTC.
        assert_eq!(
            night_in_london().release(at("2026-07-01T22:00:00Z")),
            Some(at("2026-07-02T07:00:00Z"))
        );
    }

    #[test]
    fn the_night_the_clocks_go_forward_in_london() {
        // 29 March 2026: 01:00 GMT becomes 02:00 BST. 21:00 GMT to 08:00 BST is ten hours.
        let q = night_in_london();
        assert_eq!(
            q.release(at("2026-03-28T21:30:00Z")),
            Some(at("2026-03-29T07:00:00Z"))
        );
        // A window ending inside the gap ends as if the clocks had not moved: 01:30 GMT.
        let into_the_gap = quiet(time(23, 0, 0, 0), time(1, 30, 0, 0), "Europe/London");
        assert_eq!(
            into_the_gap.release(at("2026-03-29T00:45:00Z")),
            Some(at("2026-03-29T01:30:00Z"))
        );
        assert_eq!(into_the_gap.release(at("2026-03-29T01:30:00Z")), None);
    }

    #[test]
    fn the_night_the_clocks_go_back_in_london() {
        // 25 October 2026: 02:00 BST becomes 01:00 GMT; 01:00 to 02:00 happens twice.
        // 21:00 BST (20:00 UTC) to 08:00 GMT (08:00 UTC) is twelve hours.
        let q = night_in_london();
        assert_eq!(
            q.release(at("2026-10-24T20:00:00Z")),
            Some(at("2026-10-25T08:00:00Z"))
        );
        // A window ending at 01:30 ends at its first 01:30 (BST, 00:30 UTC), and the hour
        // that repeats does not hold anything again.
        let to_half_past_one = quiet(time(23, 0, 0, 0), time(1, 30, 0, 0), "Europe/London");
        assert_eq!(
            to_half_past_one.release(at("2026-10-25T00:00:00Z")),
            Some(at("2026-10-25T00:30:00Z"))
        );
        assert_eq!(to_half_past_one.release(at("2026-10-25T01:15:00Z")), None);
    }

    #[test]
    fn the_southern_hemisphere_moves_its_clocks_the_other_way() {
        // Sydney: AEDT (UTC+11) ends on 5 April 2026 (03:00 becomes 02:00, AEST UTC+10),
        // and starts again on 4 October 2026 (02:00 becomes 03:00).
        let q = quiet(time(21, 0, 0, 0), time(8, 0, 0, 0), "Australia/Sydney");
        // 4 April 21:30 AEDT is 10:30 UTC; 5 April 08:00 AEST is 4 April 22:00 UTC.
        assert_eq!(
            q.release(at("2026-04-04T10:30:00Z")),
            Some(at("2026-04-04T22:00:00Z"))
        );
        // 3 October 21:30 AEST is 11:30 UTC; 4 October 08:00 AEDT is 3 October 21:00 UTC.
        assert_eq!(
            q.release(at("2026-10-03T11:30:00Z")),
            Some(at("2026-10-03T21:00:00Z"))
        );
    }

    #[test]
    fn unknown_zones_are_not_guessed() {
        assert!(zone("Europe/London").is_some());
        assert!(zone("Mars/Olympus_Mons").is_none());
        assert!(zone("").is_none());
    }
}
