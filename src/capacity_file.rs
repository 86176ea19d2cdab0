//! The capacity file authorities import: CSV, one site + schedule per row.
//!
//! ```text
//! site_id,name,region_id,time_zone,service_id,first_day,last_day,weekdays,opens,closes,slot_minutes,capacity_per_slot
//! rome-termini,Roma Termini,lazio,Europe/Rome,covid19-dose1,2027-03-01,2027-03-31,1-5,09:00,13:00,15,4
//! ```
//!
//! `weekdays` lists ISO weekdays (1 = Monday .. 7 = Sunday) as numbers and ranges
//! separated by `;`, e.g. `1-5` or `1;3;6-7`. Fields may be double-quoted (a name with
//! a comma); a quote inside a quoted field is doubled. This module only checks the
//! file's shape (columns, numbers, lengths); the server validates the values and
//! names each bad one by line and column.
//!
//! Six optional [`RELEASE_COLUMNS`] may follow (all or none): rows sharing a `release_id`
//! make one release over their sites; a row with an empty `release_id` has none.
//!
//! Reading is bounded: a line longer than [`LINE_BYTES_MAX`] or a file with more than
//! `rows_max` rows is refused without reading the rest into memory.

use std::io::BufRead;

use crate::proto;

pub const COLUMNS: [&str; 12] = [
    "site_id",
    "name",
    "region_id",
    "time_zone",
    "service_id",
    "first_day",
    "last_day",
    "weekdays",
    "opens",
    "closes",
    "slot_minutes",
    "capacity_per_slot",
];

/// Optional columns after `COLUMNS` (all six, or none): the release a row's slots open
/// in (PRODUCT.md part B). Rows sharing a `release_id` make one release over their sites.
pub const RELEASE_COLUMNS: [&str; 6] = [
    "release_id",
    "release_at",
    "queue_opens_at",
    "admissions_per_minute",
    "reserved_percent",
    "reserve_released_hours_before_start",
];

/// A row's release columns (a row with an empty `release_id` has none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowRelease {
    /// The row's index among the rows parsed.
    pub row: usize,
    pub release_id: String,
    pub release_at_unix_ms: i64,
    pub queue_opens_at_unix_ms: Option<i64>,
    pub admissions_per_minute: u32,
    /// `phone:30;desk:10` as (channel, percent).
    pub reserved_percent: Vec<(String, u32)>,
    pub reserve_released_hours_before_start: u32,
}

/// Longest line accepted, in bytes (a row is a few hundred bytes at most).
pub const LINE_BYTES_MAX: usize = 4_096;

/// One problem in the file, at a line and (when known) a column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileError {
    pub line: u64,
    pub column: Option<&'static str>,
    pub message: String,
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.column {
            Some(column) => write!(f, "line {}, column {column}: {}", self.line, self.message),
            None => write!(f, "line {}: {}", self.line, self.message),
        }
    }
}

/// The rows of a file, or every error found (up to `errors_max`, plus how many more).
#[derive(Debug)]
pub enum Parsed {
    /// The rows, and the release columns of those that have them.
    Rows(Vec<proto::CapacityRow>, Vec<RowRelease>),
    Errors {
        listed: Vec<FileError>,
        more: usize,
    },
}

/// What a parse has found so far: rows, and errors up to `errors_max` (then counted).
struct Collected {
    rows: Vec<proto::CapacityRow>,
    releases: Vec<RowRelease>,
    /// The header has the release columns.
    with_releases: bool,
    errors: Vec<FileError>,
    more: usize,
    rows_max: usize,
    errors_max: usize,
}

/// Whether to read on after a line.
enum Next {
    Line,
    Stop,
}

impl Collected {
    fn note(&mut self, error: FileError) {
        if self.errors.len() < self.errors_max {
            self.errors.push(error);
        } else {
            self.more += 1;
        }
    }

    /// The header line: exactly the columns, in order (after a UTF-8 byte order mark,
    /// which spreadsheets' "CSV UTF-8" puts first).
    fn header(&mut self, text: &str) -> Next {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let header: Vec<String> = match split_fields(text) {
            Ok(fields) => fields.iter().map(|f| f.trim().to_string()).collect(),
            Err(message) => {
                self.note(line_error(1, message));
                return Next::Stop;
            }
        };
        let with_releases = header.len() == COLUMNS.len() + RELEASE_COLUMNS.len()
            && header[..COLUMNS.len()] == COLUMNS
            && header[COLUMNS.len()..] == RELEASE_COLUMNS;
        if header != COLUMNS && !with_releases {
            self.note(line_error(1, header_problem(&header)));
            return Next::Stop;
        }
        self.with_releases = with_releases;
        Next::Line
    }

    /// One line (without its end) after the header.
    fn row(&mut self, line: u64, text: &str) -> Next {
        if text.trim().is_empty() {
            return Next::Line;
        }
        if self.rows.len() == self.rows_max {
            let message = format!("a file holds at most {} rows; split it", self.rows_max);
            self.note(line_error(line, message));
            return Next::Stop;
        }
        match parse_row(line, text, self.with_releases) {
            Ok((row, release)) => {
                if let Some(release) = release {
                    self.releases.push(RowRelease {
                        row: self.rows.len(),
                        ..release
                    });
                }
                self.rows.push(row);
            }
            Err(found) => found.into_iter().for_each(|e| self.note(e)),
        }
        Next::Line
    }

    /// One raw line, as read (bounded).
    fn line(&mut self, line: u64, bytes: &[u8]) -> Next {
        if bytes.len() > LINE_BYTES_MAX {
            self.note(FileError {
                line,
                column: None,
                message: format!("is longer than {LINE_BYTES_MAX} bytes; is this a capacity file?"),
            });
            return Next::Stop;
        }
        let Ok(text) = std::str::from_utf8(bytes) else {
            self.note(line_error(line, "is not UTF-8 text"));
            return Next::Line;
        };
        let text = text.trim_end_matches(['\n', '\r']);
        match line {
            1 => self.header(text),
            _ => self.row(line, text),
        }
    }
}

/// Reads a capacity file. The first line must be the header, with the columns in order.
pub fn parse(
    mut reader: impl BufRead,
    rows_max: usize,
    errors_max: usize,
) -> std::io::Result<Parsed> {
    let mut collected = Collected {
        rows: Vec::new(),
        releases: Vec::new(),
        with_releases: false,
        errors: Vec::new(),
        more: 0,
        rows_max,
        errors_max,
    };
    let mut line_number = 0u64;
    let mut buffer = Vec::new();
    loop {
        buffer.clear();
        if read_line_bounded(&mut reader, &mut buffer)? == 0 {
            break;
        }
        line_number += 1;
        if let Next::Stop = collected.line(line_number, &buffer) {
            break;
        }
    }
    if line_number == 0 {
        collected.note(line_error(1, "the file is empty"));
    } else if collected.rows.is_empty() && collected.errors.is_empty() {
        collected.note(line_error(line_number, "the file has no rows"));
    }
    let Collected {
        rows,
        releases,
        errors,
        more,
        ..
    } = collected;
    Ok(if errors.is_empty() {
        Parsed::Rows(rows, releases)
    } else {
        Parsed::Errors {
            listed: errors,
            more,
        }
    })
}

/// Reads up to and including the next `\n`, at most `LINE_BYTES_MAX + 1` bytes.
fn read_line_bounded<R: BufRead>(reader: &mut R, buffer: &mut Vec<u8>) -> std::io::Result<usize> {
    std::io::Read::take(reader, LINE_BYTES_MAX as u64 + 1).read_until(b'\n', buffer)
}

/// What is wrong with a header that is not `COLUMNS`: the columns missing, the ones
/// not known, or the order. (The rows are read by position, so nothing after a wrong
/// header can be checked.)
fn header_problem(header: &[String]) -> String {
    let has = |column: &&str| header.iter().any(|h| h == *column);
    let mut missing: Vec<&str> = COLUMNS.iter().filter(|c| !has(c)).copied().collect();
    // Release columns: all or none.
    if RELEASE_COLUMNS.iter().any(has) {
        missing.extend(RELEASE_COLUMNS.iter().filter(|c| !has(c)).copied());
    }
    let unknown: Vec<&str> = header
        .iter()
        .filter(|h| !COLUMNS.contains(&h.as_str()) && !RELEASE_COLUMNS.contains(&h.as_str()))
        .map(String::as_str)
        .collect();
    let mut problem = format!(
        "the header must be: {} (then, optionally, all of {})",
        COLUMNS.join(","),
        RELEASE_COLUMNS.join(",")
    );
    if !missing.is_empty() {
        problem.push_str(&format!("; missing: {}", missing.join(", ")));
    }
    if !unknown.is_empty() {
        problem.push_str(&format!("; not a column: {}", unknown.join(", ")));
    }
    if missing.is_empty() && unknown.is_empty() {
        problem.push_str("; the columns are there, in another order");
    }
    problem
}

fn line_error(line: u64, message: impl Into<String>) -> FileError {
    FileError {
        line,
        column: None,
        message: message.into(),
    }
}

/// Splits one CSV line into fields (RFC 4180 quoting, no line breaks inside fields).
fn split_fields(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    let mut at_start = true;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (false, '"') if at_start => {
                quoted = true;
                at_start = false;
            }
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => {
                quoted = false;
                if !matches!(chars.peek(), None | Some(',')) {
                    return Err("a closing quote must end its field".into());
                }
            }
            (false, ',') => {
                fields.push(std::mem::take(&mut field));
                at_start = true;
            }
            (_, c) => {
                field.push(c);
                at_start = false;
            }
        }
    }
    if quoted {
        return Err("a quoted field is not closed".into());
    }
    fields.push(field);
    Ok(fields)
}

/// Parses `1-5`, `6;7`, `1;3;6-7` into ISO weekday numbers (values checked by the server).
fn parse_weekdays(text: &str) -> Result<Vec<u32>, String> {
    let bad = || format!("{text:?} is not a list of ISO weekdays such as 1-5 or 1;3;6-7");
    let mut days = Vec::new();
    for part in text.split(';').map(str::trim) {
        match part.split_once('-') {
            Some((from, to)) => {
                let from: u32 = from.trim().parse().map_err(|_| bad())?;
                let to: u32 = to.trim().parse().map_err(|_| bad())?;
                if from > to || to > 7 {
                    return Err(bad());
                }
                days.extend(from..=to);
            }
            None => days.push(part.parse().map_err(|_| bad())?),
        }
    }
    Ok(days)
}

fn parse_row(
    line: u64,
    text: &str,
    with_releases: bool,
) -> Result<(proto::CapacityRow, Option<RowRelease>), Vec<FileError>> {
    let fields = split_fields(text).map_err(|message| vec![line_error(line, message)])?;
    check_column_count(line, fields.len(), with_releases)?;
    let release = match with_releases {
        true => parse_release(line, &fields[COLUMNS.len()..]),
        false => Ok(None),
    };
    let mut errors = Vec::new();
    let field = |index: usize| fields[index].trim().to_string();
    let mut number = |index: usize| -> u32 {
        field(index).parse().unwrap_or_else(|_| {
            errors.push(FileError {
                line,
                column: Some(COLUMNS[index]),
                message: format!("{:?} is not a whole number", field(index)),
            });
            0
        })
    };
    let slot_minutes = number(10);
    let capacity_per_slot = number(11);
    let weekdays = parse_weekdays(&field(7)).unwrap_or_else(|message| {
        errors.push(FileError {
            line,
            column: Some("weekdays"),
            message,
        });
        Vec::new()
    });
    let release = release.unwrap_or_else(|found| {
        errors.extend(found);
        None
    });
    if !errors.is_empty() {
        return Err(errors);
    }
    let row = proto::CapacityRow {
        site: Some(proto::Site {
            site_id: field(0),
            name: field(1),
            region_id: field(2),
            time_zone: field(3),
        }),
        service_id: field(4),
        first_day: field(5),
        last_day: field(6),
        weekdays,
        opens: field(8),
        closes: field(9),
        slot_minutes,
        capacity_per_slot,
        line,
    };
    Ok((row, release))
}

/// A row has as many columns as the header: `COLUMNS`, and `RELEASE_COLUMNS` after them
/// when the header has them.
fn check_column_count(line: u64, count: usize, with_releases: bool) -> Result<(), Vec<FileError>> {
    let releases = if with_releases {
        RELEASE_COLUMNS.len()
    } else {
        0
    };
    let expected = COLUMNS.len() + releases;
    if count != expected {
        let message = format!("has {count} columns, expected {expected} (as the header)");
        return Err(vec![line_error(line, message)]);
    }
    Ok(())
}

/// A row's release columns (`RELEASE_COLUMNS`): none when `release_id` is empty (then
/// every other one must be too).
fn parse_release(line: u64, fields: &[String]) -> Result<Option<RowRelease>, Vec<FileError>> {
    let field = |index: usize| fields[index].trim();
    let mut errors = Vec::new();
    let mut error = |index: usize, message: String| {
        errors.push(FileError {
            line,
            column: Some(RELEASE_COLUMNS[index]),
            message,
        })
    };
    if field(0).is_empty() {
        if let Some(index) = (1..fields.len()).find(|i| !field(*i).is_empty()) {
            error(index, "is set on a row without a release_id".into());
            return Err(errors);
        }
        return Ok(None);
    }
    let instant = |index: usize| chrono::DateTime::parse_from_rfc3339(field(index)).ok();
    let release_at = instant(1).map(|at| at.timestamp_millis());
    if release_at.is_none() {
        error(
            1,
            format!(
                "{:?} is not an RFC 3339 instant such as 2027-03-01T00:00:00+01:00",
                field(1)
            ),
        );
    }
    let queue_opens_at = match field(2) {
        "" => None,
        _ => {
            let parsed = instant(2).map(|at| at.timestamp_millis());
            if parsed.is_none() {
                error(2, format!("{:?} is not an RFC 3339 instant", field(2)));
            }
            parsed
        }
    };
    let mut number = |index: usize| match field(index) {
        "" => 0,
        text => text.parse().unwrap_or_else(|_| {
            error(index, format!("{text:?} is not a whole number"));
            0
        }),
    };
    let admissions_per_minute = number(3);
    let hours = number(5);
    let reserved_percent = parse_reserves(field(4)).unwrap_or_else(|message| {
        error(4, message);
        Vec::new()
    });
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Some(RowRelease {
        row: 0,
        release_id: field(0).to_string(),
        release_at_unix_ms: release_at.unwrap_or_default(),
        queue_opens_at_unix_ms: queue_opens_at,
        admissions_per_minute,
        reserved_percent,
        reserve_released_hours_before_start: hours,
    }))
}

/// `phone:30;desk:10` → [("phone", 30), ("desk", 10)]; empty → none.
fn parse_reserves(text: &str) -> Result<Vec<(String, u32)>, String> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let mut reserves: Vec<(String, u32)> = Vec::new();
    for part in text.split(';') {
        let (channel, percent) = part
            .split_once(':')
            .ok_or_else(|| format!("{part:?} is not channel:percent, e.g. phone:30"))?;
        let percent = percent
            .trim()
            .parse()
            .map_err(|_| format!("{percent:?} is not a whole percent"))?;
        let channel = channel.trim().to_string();
        if reserves.iter().any(|(seen, _)| *seen == channel) {
            return Err(format!("channel {channel:?} is named twice"));
        }
        reserves.push((channel, percent));
    }
    Ok(reserves)
}

/// Quotes a field for CSV output when it needs it. A field a spreadsheet would run as
/// a formula (`=`, `+`, `-`, `@`, tab or carriage return first: a closure reason or a
/// site name such as `=HYPERLINK(...)`) gets a leading `'`, so it is shown as text.
pub fn csv_field(value: &str) -> String {
    let value = match value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        true => format!("'{value}"),
        false => value.to_string(),
    };
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "site_id,name,region_id,time_zone,service_id,first_day,last_day,weekdays,opens,closes,slot_minutes,capacity_per_slot\n";

    fn parse_text(text: &str) -> Parsed {
        parse(text.as_bytes(), 1_000, 10).unwrap()
    }

    /// A channel named twice was collapsed to its last share (the map the request sends).
    #[test]
    fn a_reserve_channel_named_twice_is_refused() {
        assert_eq!(
            parse_reserves("phone:30; desk:10"),
            Ok(vec![("phone".into(), 30), ("desk".into(), 10)])
        );
        let twice = parse_reserves("phone:30;phone:20").unwrap_err();
        assert!(twice.contains("\"phone\" is named twice"), "{twice}");
    }

    #[test]
    fn reads_rows_with_quotes_and_weekday_ranges() {
        let text = format!(
            "{HEADER}a,\"Hall \"\"A\"\", north\",r,Europe/Rome,vax,2027-01-04,2027-01-10,1-3;6,09:00,10:00,15,2\n\n"
        );
        let Parsed::Rows(rows, _) = parse_text(&text) else {
            panic!("expected rows");
        };
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].site.as_ref().unwrap().name, "Hall \"A\", north");
        assert_eq!(rows[0].weekdays, [1, 2, 3, 6]);
        assert_eq!(rows[0].line, 2);
        assert_eq!((rows[0].slot_minutes, rows[0].capacity_per_slot), (15, 2));
        // As a spreadsheet saves "CSV UTF-8": a byte order mark first, CRLF line ends.
        let saved = format!("\u{feff}{text}").replace('\n', "\r\n");
        assert!(matches!(parse_text(&saved), Parsed::Rows(rows, _) if rows.len() == 1));
    }

    #[test]
    fn a_wrong_header_names_the_missing_and_unknown_columns() {
        let problem = |header: &str| {
            let Parsed::Errors { listed, .. } = parse_text(&format!("{header}\n")) else {
                panic!("expected errors");
            };
            listed[0].to_string()
        };
        let dropped = HEADER.trim_end().replace(",capacity_per_slot", "");
        assert!(problem(&dropped).ends_with("; missing: capacity_per_slot"));
        let renamed = HEADER.trim_end().replace("opens", "open");
        assert!(problem(&renamed).ends_with("; missing: opens; not a column: open"));
        let swapped = HEADER.trim_end().replace("opens,closes", "closes,opens");
        assert!(problem(&swapped).ends_with("in another order"));
        // Two release columns of six: it said "the columns are there, in another order".
        let partial = problem(&format!("{},release_id,release_at", HEADER.trim_end()));
        assert!(partial.contains("; missing: queue_opens_at"), "{partial}");
    }

    #[test]
    fn reports_every_bad_line_with_its_column() {
        let text = format!(
            "{HEADER}a,A,r,Europe/Rome,vax,2027-01-04,2027-01-10,1-5,09:00,10:00,x,2\n\
             a,A,r\n\
             a,A,r,Europe/Rome,vax,2027-01-04,2027-01-10,9-1,09:00,10:00,15,-1\n"
        );
        let Parsed::Errors { listed, more } = parse_text(&text) else {
            panic!("expected errors");
        };
        let shown: Vec<String> = listed.iter().map(ToString::to_string).collect();
        assert_eq!(more, 0);
        assert_eq!(shown.len(), 4, "{shown:?}");
        assert!(
            shown[0].starts_with("line 2, column slot_minutes"),
            "{shown:?}"
        );
        assert!(shown[1].starts_with("line 3: has 3 columns"), "{shown:?}");
        assert!(
            shown[2].starts_with("line 4, column capacity_per_slot"),
            "{shown:?}"
        );
        assert!(shown[3].starts_with("line 4, column weekdays"), "{shown:?}");
    }

    #[test]
    fn refuses_a_wrong_header_a_huge_line_and_too_many_rows() {
        assert!(matches!(parse_text("a,b\n"), Parsed::Errors { .. }));
        assert!(matches!(parse_text(""), Parsed::Errors { .. }));
        let huge = format!("{HEADER}{}\n", "x".repeat(LINE_BYTES_MAX * 4));
        let Parsed::Errors { listed, .. } = parse_text(&huge) else {
            panic!("expected errors");
        };
        assert!(listed[0].message.contains("longer than"));
        let row = "a,A,r,Europe/Rome,vax,2027-01-04,2027-01-10,1-5,09:00,10:00,15,2\n";
        let text = format!("{HEADER}{row}{row}{row}");
        let Parsed::Errors { listed, .. } = parse(text.as_bytes(), 2, 10).unwrap() else {
            panic!("expected errors");
        };
        assert!(listed[0].message.contains("at most 2 rows"));
    }

    #[test]
    fn output_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        for formula in ["+1", "-1+2", "@SUM(A1)", "\tx", "\rx"] {
            assert!(csv_field(formula).trim_start_matches('"').starts_with('\''));
        }
        assert_eq!(csv_field("a, \"b\""), "\"a, \"\"b\"\"\"");
    }
}
