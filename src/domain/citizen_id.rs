//! Citizen id schemes: how a citizen id as sent becomes the one canonical form that is
//! hashed, so `rssmra80a01h501u` and ` RSSMRA80A01H501U ` are one citizen and
//! `RSSMRA80A01H501U!` is nobody.
//!
//! Pure; imports nothing of the crate outside `domain`.

use crate::domain::field_violation::FieldViolation;
use crate::domain::ids::check_opaque_text;

/// `[citizens] id_scheme`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IdScheme {
    /// Used exactly as sent (printable ASCII, bounded).
    #[default]
    Opaque,
    /// An Italian fiscal code: 16 characters with a valid check character (omocodic
    /// codes included, each a different person), or an 11-digit temporary code with a
    /// valid check digit. Trimmed and uppercased first.
    ItFiscalCode,
}

impl IdScheme {
    /// As `[citizens] id_scheme` names it.
    pub fn name(self) -> &'static str {
        match self {
            IdScheme::Opaque => "opaque",
            IdScheme::ItFiscalCode => "it-fiscal-code",
        }
    }
}

/// How citizen ids are read: the scheme and the longest id accepted as sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CitizenIds {
    pub scheme: IdScheme,
    pub length_max: usize,
}

impl CitizenIds {
    /// The canonical form of `value` (what gets hashed), or why it is not a citizen id.
    pub fn canonical(&self, value: &str) -> Result<String, FieldViolation> {
        const FIELD: &str = "citizen_id";
        match self.scheme {
            IdScheme::Opaque => {
                check_opaque_text(FIELD, value, self.length_max).map(|()| value.to_string())
            }
            IdScheme::ItFiscalCode => {
                let code = value.trim().to_ascii_uppercase();
                match is_personal_code(&code) || is_temporary_code(&code) {
                    true => Ok(code),
                    false => Err(FieldViolation::new(
                        FIELD,
                        "must be an Italian fiscal code: 16 characters with a valid check \
                         character, or 11 digits with a valid check digit",
                    )),
                }
            }
        }
    }
}

/// Digits of the positions where an omocodic code may put a letter instead.
const OMOCODIC_LETTERS: &[u8; 10] = b"LMNPQRSTUV";
const MONTH_LETTERS: &[u8] = b"ABCDEHLMPRST";

/// A 16-character personal code: its shape, its day of birth (1–31, plus 40 for
/// women), then its check character.
fn is_personal_code(code: &str) -> bool {
    let bytes = code.as_bytes();
    if bytes.len() != 16 {
        return false;
    }
    let digit_like = |b: u8| b.is_ascii_digit() || OMOCODIC_LETTERS.contains(&b);
    let shape_ok = bytes.iter().enumerate().all(|(index, &b)| match index {
        0..=5 | 11 | 15 => b.is_ascii_uppercase(),
        8 => MONTH_LETTERS.contains(&b),
        6 | 7 | 9 | 10 | 12..=14 => digit_like(b),
        _ => false,
    });
    shape_ok && is_birth_day(bytes[9], bytes[10]) && check_character(&bytes[..15]) == bytes[15]
}

/// Whether the two day characters (digits, or omocodic letters for digits) read 1–31
/// or 41–71.
fn is_birth_day(tens: u8, units: u8) -> bool {
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        _ => OMOCODIC_LETTERS
            .iter()
            .position(|&l| l == b)
            .map(|p| p as u8),
    };
    match (digit(tens), digit(units)) {
        (Some(tens), Some(units)) => matches!(tens * 10 + units, 1..=31 | 41..=71),
        _ => false,
    }
}

/// The check character of the first 15 characters (Decreto ministeriale 23/12/1976).
fn check_character(first15: &[u8]) -> u8 {
    // Values of the characters in odd (1st, 3rd, …) positions, for 0-9 and A-Z alike.
    const ODD: [u32; 26] = [
        1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 2, 4, 18, 20, 11, 3, 6, 8, 12, 14, 16, 10, 22, 25, 24,
        23,
    ];
    let sum: u32 = first15
        .iter()
        .enumerate()
        .map(|(index, &b)| {
            let value = match b {
                b'0'..=b'9' => u32::from(b - b'0'),
                _ => u32::from(b - b'A'),
            };
            match index % 2 {
                0 => ODD[value as usize],
                _ => value,
            }
        })
        .sum();
    b'A' + (sum % 26) as u8
}

/// An 11-digit temporary code: its last digit checks the first ten (like a VAT number).
fn is_temporary_code(code: &str) -> bool {
    let bytes = code.as_bytes();
    if bytes.len() != 11 || !bytes.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let sum: u32 = bytes[..10]
        .iter()
        .enumerate()
        .map(|(index, &b)| {
            let digit = u32::from(b - b'0');
            match index % 2 {
                0 => digit,
                _ if digit * 2 > 9 => digit * 2 - 9,
                _ => digit * 2,
            }
        })
        .sum();
    (10 - sum % 10) % 10 == u32::from(bytes[10] - b'0')
}

#[cfg(test)]
mod tests {
    use super::*;

    const FISCAL: CitizenIds = CitizenIds {
        scheme: IdScheme::ItFiscalCode,
        length_max: 128,
    };
    const OPAQUE: CitizenIds = CitizenIds {
        scheme: IdScheme::Opaque,
        length_max: 128,
    };

    #[test]
    fn fiscal_codes_are_canonical_and_checked() {
        let cases: &[(&str, Option<&str>)] = &[
            ("RSSMRA80A01H501U", Some("RSSMRA80A01H501U")),
            ("rssmra80a01h501u", Some("RSSMRA80A01H501U")),
            ("  RSSMRA80A01H501U \t", Some("RSSMRA80A01H501U")),
            ("RSSMRA80A01H501U!", None),
            ("RSSMRA80A01H501A", None), // wrong check character
            ("RSSMRA80Z01H501U", None), // Z is no month
            ("RSSMRA80A99H501Y", None), // day 99 (its check character right)
            ("RSSMRA80A00H501V", None), // day 0
            ("BNCLRA90B41F205H", Some("BNCLRA90B41F205H")), // a woman: day 1 + 40
            ("RSSMRA80A01H50", None),
            // Omocodic: the last digit 1 of the municipality became M; a different person.
            ("RSSMRA80A01H50MM", Some("RSSMRA80A01H50MM")),
            ("", None),
            // Temporary codes: 11 digits, Luhn-like check digit.
            ("12345678903", Some("12345678903")),
            ("12345678901", None),
            ("1234567890A", None),
        ];
        for (raw, want) in cases {
            let got = FISCAL.canonical(raw).ok();
            assert_eq!(got.as_deref(), *want, "{raw:?}");
        }
    }

    #[test]
    fn opaque_ids_are_used_as_sent() {
        assert_eq!(OPAQUE.canonical("abc").unwrap(), "abc");
        assert_eq!(OPAQUE.canonical("ABC").unwrap(), "ABC");
        assert!(OPAQUE.canonical("a b").is_err());
        assert!(OPAQUE.canonical("").is_err());
    }

    #[test]
    fn the_check_character_follows_the_ministerial_tables() {
        for (first15, check) in [
            (b"RSSMRA80A01H501", b'U'),
            (b"BNCLRD70B02F205", b'H'),
            (b"RSSMRA80A01H50M", b'M'),
        ] {
            assert_eq!(check_character(first15) as char, check as char);
        }
    }
}
