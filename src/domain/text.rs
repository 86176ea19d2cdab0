//! Text a person reads (a site's name, a closure's reason): the one rule, for requests
//! and for records read back from the store or a backup.

use crate::domain::field_violation::FieldViolation;

/// Characters refused in text shown to citizens (site names, closure reasons): control
/// characters, and the bidirectional overrides and isolates that can make text read
/// differently from what it holds ("Trojan Source").
pub fn unsafe_in_display_text(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Display text: trimmed, non-empty (else `empty`), at most `length_max` characters, no
/// control or text-direction characters.
pub fn display_text(
    field: &str,
    value: &str,
    empty: &str,
    length_max: usize,
) -> Result<String, FieldViolation> {
    let text = value.trim();
    if text.is_empty() {
        Err(FieldViolation::new(field, empty))
    } else if text.chars().count() > length_max {
        Err(FieldViolation::new(
            field,
            format!("must be at most {length_max} characters"),
        ))
    } else if text.chars().any(unsafe_in_display_text) {
        Err(FieldViolation::new(
            field,
            "must not contain control or text-direction characters",
        ))
    } else {
        Ok(text.to_string())
    }
}

/// `unix_s` as an RFC 3339 UTC time to the second ("2027-03-29T08:00:00Z"), for audit
/// lines a person reads (raw Unix seconds told them nothing).
pub fn utc_text(unix_s: i64) -> String {
    use chrono::{SecondsFormat, TimeZone, Utc};
    match Utc.timestamp_opt(unix_s, 0).single() {
        Some(time) => time.to_rfc3339_opts(SecondsFormat::Secs, true),
        None => format!("{unix_s} (Unix seconds)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_times_read_as_utc_dates() {
        assert_eq!(utc_text(1_806_307_200), "2027-03-29T08:00:00Z");
        assert_eq!(utc_text(i64::MAX), format!("{} (Unix seconds)", i64::MAX));
    }
}
