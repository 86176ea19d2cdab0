//! Turns a weekly schedule of local opening hours into slot start instants.
//!
//! The local-time rules of PRODUCT.md live here and nowhere else:
//! - opening hours are wall-clock times in the site's zone;
//! - a local start that does not exist (spring-forward gap) produces no slot;
//! - an ambiguous local start (fall-back) uses the earlier instant, and the repeated
//!   hour produces no second slot (wall-clock times are visited once each);
//! - a slot ends `slot_minutes` of real time after it starts.

use chrono::{Datelike, Duration, LocalResult, NaiveDate, NaiveTime, TimeZone, Timelike, Weekday};
use chrono_tz::Tz;

use crate::domain::error::{DomainError, Violations};
use crate::domain::field_violation::FieldViolation;

/// One weekday's opening interval, in local wall-clock time: minutes after the day's
/// local midnight, `opens` 0..=1439 and `closes` after it, up to 1440 ("24:00": the slot
/// ending at midnight).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpeningHours {
    pub weekday: Weekday,
    pub opens: u32,
    pub closes: u32,
}

/// Minutes in a day: `closes` "24:00".
const MINUTES_PER_DAY: u32 = 1_440;

/// A validated weekly schedule over an inclusive range of local days.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub first_day: NaiveDate,
    pub last_day: NaiveDate,
    pub opening_hours: Vec<OpeningHours>,
    pub slot_minutes: u32,
    pub capacity_per_slot: u32,
}

impl Schedule {
    /// Refuses a schedule reaching past `last_day_max` (`schedule_days_ahead_max` from
    /// today): slots in the year 9000 are a typo or an attack, never a plan.
    pub fn check_horizon(&self, last_day_max: NaiveDate) -> Result<(), FieldViolation> {
        if self.last_day <= last_day_max {
            return Ok(());
        }
        Err(FieldViolation::new(
            "last_day",
            format!("must be at most {last_day_max} (schedule_days_ahead_max from today)"),
        ))
    }
}

/// The schedule as it arrives from a client, before validation.
#[derive(Clone, Debug, Default)]
pub struct ScheduleInput<'a> {
    pub first_day: &'a str,
    pub last_day: &'a str,
    /// (ISO weekday 1..=7, "HH:MM", "HH:MM")
    pub opening_hours: Vec<(u32, &'a str, &'a str)>,
    pub slot_minutes: u32,
    pub capacity_per_slot: u32,
}

/// One slot the schedule describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedSlot {
    pub start_unix_s: i64,
    pub end_unix_s: i64,
    pub capacity: u32,
}

/// A local day `YYYY-MM-DD`; one of that shape the calendar lacks (2027-02-29) is
/// told so, not asked for the shape it has.
pub fn local_day(field: &str, text: &str) -> Result<NaiveDate, FieldViolation> {
    let shaped = text.len() == 10
        && text.bytes().enumerate().all(|(at, byte)| match at {
            4 | 7 => byte == b'-',
            _ => byte.is_ascii_digit(),
        });
    match NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        Ok(day) if shaped => Ok(day),
        _ if shaped => Err(FieldViolation::new(
            field,
            format!("is not a day of the calendar ({text} does not exist)"),
        )),
        _ => Err(FieldViolation::new(field, "must be a date YYYY-MM-DD")),
    }
}

fn parse_day(violations: &mut Violations, field: &str, text: &str) -> Option<NaiveDate> {
    local_day(field, text)
        .map_err(|violation| violations.push(field, violation.description))
        .ok()
}

/// A local time `HH:MM` as minutes after midnight; "24:00" (1440) only where
/// `midnight_after` (a closing time).
fn parse_clock(
    violations: &mut Violations,
    field: &str,
    text: &str,
    midnight_after: bool,
) -> Option<u32> {
    let parsed = match text {
        "24:00" if midnight_after => Some(MINUTES_PER_DAY),
        _ => (text.len() == 5)
            .then(|| NaiveTime::parse_from_str(text, "%H:%M").ok())
            .flatten()
            .map(|time| time.hour() * 60 + time.minute()),
    };
    if parsed.is_none() {
        let range = match midnight_after {
            true => "00:01 to 24:00",
            false => "00:00 to 23:59",
        };
        violations.push(field, format!("must be a local time HH:MM ({range})"));
    }
    parsed
}

/// The bounds a schedule must keep (from `Limits`; the domain knows no config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScheduleBounds {
    pub days_max: u32,
    pub slot_minutes_max: u32,
    pub capacity_per_slot_max: u32,
    pub opening_hours_max: usize,
}

fn check_span(violations: &mut Violations, first: NaiveDate, last: NaiveDate, days_max: u32) {
    let days = (last - first).num_days() + 1;
    if days < 1 {
        violations.push("last_day", "must not be before first_day");
    } else if days > i64::from(days_max) {
        violations.push(
            "last_day",
            format!("a schedule spans at most {days_max} days"),
        );
    }
}

fn check_sizes(violations: &mut Violations, input: &ScheduleInput<'_>, bounds: &ScheduleBounds) {
    if input.slot_minutes == 0 || input.slot_minutes > bounds.slot_minutes_max {
        violations.push(
            "slot_minutes",
            format!("must be between 1 and {}", bounds.slot_minutes_max),
        );
    }
    if input.capacity_per_slot == 0 || input.capacity_per_slot > bounds.capacity_per_slot_max {
        violations.push(
            "capacity_per_slot",
            format!("must be between 1 and {}", bounds.capacity_per_slot_max),
        );
    }
    if input.opening_hours.is_empty() {
        violations.push("opening_hours", "must list at least one interval");
    }
    if input.opening_hours.len() > bounds.opening_hours_max {
        violations.push(
            "opening_hours",
            format!("at most {} intervals", bounds.opening_hours_max),
        );
    }
}

/// One opening interval, or `None` (with its violations recorded).
fn parse_hours(
    violations: &mut Violations,
    index: usize,
    (weekday, opens, closes): (u32, &str, &str),
) -> Option<OpeningHours> {
    let weekday = match weekday {
        1..=7 => Weekday::try_from((weekday - 1) as u8).ok(),
        _ => None,
    };
    if weekday.is_none() {
        violations.push(
            format!("opening_hours[{index}].weekday"),
            "must be an ISO weekday 1 (Monday) to 7 (Sunday)",
        );
    }
    let opens = parse_clock(
        violations,
        &format!("opening_hours[{index}].opens"),
        opens,
        false,
    );
    let closes = parse_clock(
        violations,
        &format!("opening_hours[{index}].closes"),
        closes,
        true,
    );
    if let (Some(opens), Some(closes)) = (opens, closes) {
        if closes <= opens {
            violations.push(
                format!("opening_hours[{index}].closes"),
                "must be after opens",
            );
        }
    }
    Some(OpeningHours {
        weekday: weekday?,
        opens: opens?,
        closes: closes?,
    })
}

fn check_overlaps(violations: &mut Violations, opening_hours: &[OpeningHours]) {
    for (index, hours) in opening_hours.iter().enumerate() {
        let overlaps = opening_hours[..index].iter().any(|other| {
            other.weekday == hours.weekday
                && other.opens < hours.closes
                && hours.opens < other.closes
        });
        if overlaps {
            violations.push(
                format!("opening_hours[{index}]"),
                "overlaps another interval of the same weekday",
            );
        }
    }
}

impl Schedule {
    /// Validates every field and reports all violations at once.
    pub fn parse(
        input: &ScheduleInput<'_>,
        bounds: &ScheduleBounds,
    ) -> Result<Self, Vec<FieldViolation>> {
        let mut violations = Violations::default();
        let first_day = parse_day(&mut violations, "first_day", input.first_day);
        let last_day = parse_day(&mut violations, "last_day", input.last_day);
        if let (Some(first), Some(last)) = (first_day, last_day) {
            check_span(&mut violations, first, last, bounds.days_max);
        }
        check_sizes(&mut violations, input, bounds);
        let opening_hours: Vec<OpeningHours> = input
            .opening_hours
            .iter()
            .enumerate()
            .filter_map(|(index, &hours)| parse_hours(&mut violations, index, hours))
            .collect();
        check_overlaps(&mut violations, &opening_hours);
        match (first_day, last_day, violations.into_vec()) {
            (Some(first_day), Some(last_day), found) if found.is_empty() => Ok(Self {
                first_day,
                last_day,
                opening_hours,
                slot_minutes: input.slot_minutes,
                capacity_per_slot: input.capacity_per_slot,
            }),
            // A day that did not parse has its violation among them.
            (_, _, found) => Err(found),
        }
    }

    /// The slots of this schedule in `zone`, in start order, at most `slots_max`.
    pub fn plan(&self, zone: Tz, slots_max: usize) -> Result<Vec<PlannedSlot>, DomainError> {
        let step = Duration::minutes(i64::from(self.slot_minutes));
        let mut slots = Vec::new();
        let mut day = self.first_day;
        while day <= self.last_day {
            let mut intervals: Vec<&OpeningHours> = self
                .opening_hours
                .iter()
                .filter(|h| h.weekday == day.weekday())
                .collect();
            intervals.sort_by_key(|h| h.opens);
            for hours in intervals {
                // `parse` keeps these; a schedule built by hand must too.
                debug_assert!(hours.opens < hours.closes && hours.closes <= MINUTES_PER_DAY);
                let midnight = day.and_time(NaiveTime::MIN);
                let mut wall = midnight + Duration::minutes(i64::from(hours.opens));
                let closes = midnight + Duration::minutes(i64::from(hours.closes));
                while wall + step <= closes {
                    let start = match zone.from_local_datetime(&wall) {
                        LocalResult::Single(instant) => Some(instant),
                        LocalResult::Ambiguous(earlier, _later) => Some(earlier),
                        LocalResult::None => None,
                    };
                    if let Some(start) = start {
                        if slots.len() == slots_max {
                            return Err(DomainError::invalid(
                                "last_day",
                                format!("the schedule describes more than {slots_max} slots; publish it in parts"),
                            ));
                        }
                        let start_unix_s = start.timestamp();
                        slots.push(PlannedSlot {
                            start_unix_s,
                            end_unix_s: start_unix_s + step.num_seconds(),
                            capacity: self.capacity_per_slot,
                        });
                    }
                    wall += step;
                }
            }
            day = match day.succ_opt() {
                Some(next) => next,
                None => break,
            };
        }
        // Intervals are disjoint per weekday, but a fall-back fold can map two wall
        // times onto nearby instants; keep start order and unique starts.
        slots.sort_by_key(|s| s.start_unix_s);
        slots.dedup_by_key(|s| s.start_unix_s);
        // A spring-forward gap runs a slot into the next (01:30 + 45 minutes is 03:15,
        // past the 03:00 slot): it ends where the next begins, as the desk's hour does.
        for at in 1..slots.len() {
            let next_start = slots[at].start_unix_s;
            let before = &mut slots[at - 1];
            before.end_unix_s = before.end_unix_s.min(next_start);
        }
        Ok(slots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    /// The default limits' bounds (`config::schedule_bounds(&DEFAULT_LIMITS)`).
    const BOUNDS: ScheduleBounds = ScheduleBounds {
        days_max: 366,
        slot_minutes_max: 1_440,
        capacity_per_slot_max: 10_000,
        opening_hours_max: 64,
    };
    use chrono::{SecondsFormat, Utc};

    fn rome_schedule(day: &str, opens: &str, closes: &str, weekday: u32) -> Schedule {
        Schedule::parse(
            &ScheduleInput {
                first_day: day,
                last_day: day,
                opening_hours: vec![(weekday, opens, closes)],
                slot_minutes: 30,
                capacity_per_slot: 2,
            },
            &BOUNDS,
        )
        .unwrap()
    }

    fn local_starts(schedule: &Schedule) -> Vec<String> {
        schedule
            .plan(chrono_tz::Europe::Rome, 1_000)
            .unwrap()
            .iter()
            .map(|s| {
                Utc.timestamp_opt(s.start_unix_s, 0)
                    .unwrap()
                    .with_timezone(&chrono_tz::Europe::Rome)
                    .to_rfc3339_opts(SecondsFormat::Secs, false)
            })
            .collect()
    }

    #[test]
    fn spring_forward_gap_produces_no_slot() {
        // 2027-03-28 is a Sunday: 02:00 jumps to 03:00 in Rome.
        let starts = local_starts(&rome_schedule("2027-03-28", "01:00", "04:00", 7));
        assert_eq!(
            starts,
            [
                "2027-03-28T01:00:00+01:00",
                "2027-03-28T01:30:00+01:00",
                "2027-03-28T03:00:00+02:00",
                "2027-03-28T03:30:00+02:00",
            ]
        );
    }

    /// 45-minute slots across the gap: the 01:30 slot would run to 03:15 and overlap
    /// the 03:00 one (twice the desks for a quarter of an hour, and a closed 03:00 slot
    /// could never be reopened beside it); it ends at 03:00 instead.
    #[test]
    fn a_slot_cut_by_the_spring_forward_gap_ends_where_the_next_begins() {
        let mut schedule = rome_schedule("2027-03-28", "00:00", "06:00", 7);
        schedule.slot_minutes = 45;
        let plan = schedule.plan(chrono_tz::Europe::Rome, 100).unwrap();
        for pair in plan.windows(2) {
            assert!(pair[0].end_unix_s <= pair[1].start_unix_s, "{pair:?}");
        }
        let cut: Vec<i64> = plan
            .iter()
            .map(|s| (s.end_unix_s - s.start_unix_s) / 60)
            .filter(|&minutes| minutes != 45)
            .collect();
        assert_eq!(cut, [30], "01:30 to 03:00 is half an hour of real time");
    }

    #[test]
    fn fall_back_fold_uses_earlier_instant_once() {
        // 2027-10-31 is a Sunday: 03:00 falls back to 02:00 in Rome.
        let starts = local_starts(&rome_schedule("2027-10-31", "01:00", "04:00", 7));
        assert_eq!(
            starts,
            [
                "2027-10-31T01:00:00+02:00",
                "2027-10-31T01:30:00+02:00",
                "2027-10-31T02:00:00+02:00",
                "2027-10-31T02:30:00+02:00",
                "2027-10-31T03:00:00+01:00",
                "2027-10-31T03:30:00+01:00",
            ]
        );
    }

    /// `closes` "24:00": the last slot ends at the next day's midnight (a day's last
    /// hour could not be opened before), and a day ending at 24:00 does not overlap the
    /// next day's interval from 00:00.
    #[test]
    fn a_day_can_close_at_midnight() {
        let starts = local_starts(&rome_schedule("2027-03-01", "23:00", "24:00", 1));
        assert_eq!(
            starts,
            ["2027-03-01T23:00:00+01:00", "2027-03-01T23:30:00+01:00"]
        );
        let schedule = Schedule::parse(
            &ScheduleInput {
                first_day: "2027-03-01",
                last_day: "2027-03-02",
                opening_hours: vec![(1, "22:00", "24:00"), (2, "00:00", "01:00")],
                slot_minutes: 60,
                capacity_per_slot: 1,
            },
            &BOUNDS,
        )
        .expect("disjoint");
        let plan = schedule.plan(chrono_tz::Europe::Rome, 10).unwrap();
        let lengths: Vec<i64> = plan.iter().map(|s| s.end_unix_s - s.start_unix_s).collect();
        assert_eq!(lengths, [3_600; 3]);
        assert_eq!(plan[1].end_unix_s, plan[2].start_unix_s, "midnight");
    }

    #[test]
    fn slot_end_is_real_time_after_start() {
        let plan = rome_schedule("2027-10-31", "02:30", "03:00", 7)
            .plan(chrono_tz::Europe::Rome, 10)
            .unwrap();
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].end_unix_s - plan[0].start_unix_s, 30 * 60);
    }

    /// A day of the right shape that the calendar lacks is told so; others are asked
    /// for the shape.
    #[test]
    fn a_day_that_does_not_exist_is_told_so() {
        let refused = |text: &str| local_day("first_day", text).unwrap_err().description;
        assert_eq!(
            refused("2027-02-29"),
            "is not a day of the calendar (2027-02-29 does not exist)"
        );
        assert!(refused("2027-13-01").starts_with("is not a day of the calendar"));
        for bad in [
            "2027-2-28",
            "27-02-28",
            "2027/02/28",
            "+2027-02-1",
            "２０２７-02-28",
            "",
        ] {
            assert_eq!(refused(bad), "must be a date YYYY-MM-DD", "{bad}");
        }
        assert_eq!(
            local_day("first_day", "2028-02-29").map(|d| d.to_string()),
            Ok("2028-02-29".to_string())
        );
    }

    /// A table of bad schedules, one case per field: each changes one thing of a good one.
    #[test]
    fn bad_schedules_name_their_fields() {
        let good = || ScheduleInput {
            first_day: "2027-03-01",
            last_day: "2027-03-01",
            opening_hours: vec![(1, "09:00", "12:00")],
            slot_minutes: 15,
            capacity_per_slot: 1,
        };
        let hours = |hours: &[(u32, &'static str, &'static str)]| ScheduleInput {
            opening_hours: hours.to_vec(),
            ..good()
        };
        let cases: &[(ScheduleInput<'_>, &str)] = &[
            (
                ScheduleInput {
                    first_day: "2027-02-30",
                    ..good()
                },
                "first_day",
            ),
            (
                ScheduleInput {
                    first_day: "2027-03-02",
                    ..good()
                },
                "last_day",
            ),
            (hours(&[(1, "12:00", "09:00")]), "opening_hours[0].closes"),
            (hours(&[(8, "09:00", "12:00")]), "opening_hours[0].weekday"),
            (hours(&[(1, "9:00", "12:00")]), "opening_hours[0].opens"),
            (hours(&[(1, "24:00", "24:00")]), "opening_hours[0].opens"),
            (hours(&[(1, "23:00", "24:01")]), "opening_hours[0].closes"),
            (hours(&[(1, "23:00", "00:00")]), "opening_hours[0].closes"),
            (
                ScheduleInput {
                    slot_minutes: 0,
                    ..good()
                },
                "slot_minutes",
            ),
            (
                ScheduleInput {
                    capacity_per_slot: 0,
                    ..good()
                },
                "capacity_per_slot",
            ),
            (
                ScheduleInput {
                    first_day: "2027-01-01",
                    last_day: "2127-01-01",
                    ..good()
                },
                "last_day",
            ),
            (
                hours(&[(1, "09:00", "12:00"), (1, "11:00", "13:00")]),
                "opening_hours[1]",
            ),
        ];
        for (input, field) in cases {
            match Schedule::parse(input, &BOUNDS) {
                Err(violations) => assert!(
                    violations.iter().any(|v| v.field == *field),
                    "{field}: {violations:?}"
                ),
                other => panic!("{field}: expected a violation, got {other:?}"),
            }
        }
    }

    #[test]
    fn plan_is_bounded() {
        let schedule = Schedule::parse(
            &ScheduleInput {
                first_day: "2027-01-01",
                last_day: "2027-12-31",
                opening_hours: (1..=7).map(|d| (d, "00:00", "23:59")).collect(),
                slot_minutes: 1,
                capacity_per_slot: 1,
            },
            &BOUNDS,
        )
        .unwrap();
        assert!(matches!(
            schedule.plan(chrono_tz::Europe::Rome, 10_000),
            Err(DomainError::Invalid(_))
        ));
    }
}
