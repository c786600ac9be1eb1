//! Phone numbers and sender IDs: parsed once into validated newtypes, masked in every log.

use std::fmt;

/// A recipient in E.164 (`+447700900123`), checked against the numbering plan, with the
/// country it belongs to.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PhoneNumber {
    e164: String,
    /// `None` for the numbers of no country (`+800`, `+881`, `+882`, `+883`, ...).
    country: Option<Country>,
}

/// An ISO 3166 alpha-2 code that the numbering plans know (`GB`, `US`, `JE`): a school's
/// `country`, an allowed destination, the country a number belongs to.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Country([u8; 2]);

impl Country {
    /// `GB`, `gb` or ` GB `; `None` for a code the numbering plans do not know.
    pub fn parse(code: &str) -> Option<Country> {
        let code = code.trim().to_ascii_uppercase();
        code.parse::<phonenumber::country::Id>().ok()?;
        let letters: [u8; 2] = code.as_bytes().try_into().ok()?;
        Some(Country(letters))
    }

    pub fn as_str(&self) -> &str {
        // Built only from two ASCII letters.
        std::str::from_utf8(&self.0).unwrap_or("??")
    }
}

impl fmt::Display for Country {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Country {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not a phone number. Carries no part of the input, so it is safe to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhoneError {
    #[error("not a phone number")]
    Unparsable,
    #[error("not a possible phone number (wrong length or unknown country code)")]
    Impossible,
    #[error("a national number needs the school's country, and none is set")]
    NoCountry,
    #[error("the school's country '{0}' is not an ISO 3166 alpha-2 code")]
    UnknownCountry(String),
}

/// Loads the numbering plans now (about a quarter of a second of CPU), instead of in the
/// first parse.
pub fn load_metadata() {
    let _ = &*phonenumber::metadata::DATABASE;
}

impl PhoneNumber {
    /// Parses `raw`, reading a national number (no leading `+`) with `country`.
    pub fn parse(raw: &str, country: Option<&str>) -> Result<Self, PhoneError> {
        let raw = raw.trim();
        if raw.is_empty() || raw.len() > 40 {
            return Err(PhoneError::Unparsable);
        }
        let international = raw.starts_with('+') || raw.starts_with("00");
        let country = match country {
            Some(code) => Some(
                code.trim()
                    .to_ascii_uppercase()
                    .parse::<phonenumber::country::Id>()
                    .map_err(|_| PhoneError::UnknownCountry(code.chars().take(8).collect()))?,
            ),
            None if international => None,
            None => return Err(PhoneError::NoCountry),
        };
        let parsed = phonenumber::parse(country, raw).map_err(|_| PhoneError::Unparsable)?;
        // "Possible", as libphonenumber means it: a known country code and a national
        // number of a length that country uses. Stricter validity checks against number
        // ranges would refuse numbers allocated after this build's metadata; the provider
        // is the judge of those.
        let national = parsed.national().to_string();
        let national_digits = national.len();
        let possible = phonenumber::metadata::DATABASE
            .by_code(&parsed.code().value())
            .unwrap_or_default()
            .iter()
            .any(|meta| possible_lengths(meta).any(|len| usize::from(len) == national_digits));
        if !possible {
            return Err(PhoneError::Impossible);
        }
        // E.164 is the country code and the national number (leading zeros included), as
        // the crate's formatter writes it; written here directly, because the formatter
        // first matches the number against the country's display formats, which E.164
        // does not use (a tenth of the worker's time per message).
        Ok(PhoneNumber {
            e164: format!("+{}{national}", parsed.code().value()),
            country: country_of(&parsed),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.e164
    }

    /// The country the number belongs to; `None` for a number of no country (the
    /// international networks and services: `+800`, `+808`, `+870`, `+881` to `+883`).
    pub fn country(&self) -> Option<Country> {
        self.country
    }

    /// The number as logs show it: `+44*******123`.
    pub fn masked(&self) -> String {
        mask(&self.e164)
    }
}

/// The country a number belongs to, as the numbering plans say. Where several countries
/// share a calling code (`+1`, `+44`, `+7`): one whose plan names the number's leading
/// digits (`+1 876` is Jamaica, `+7 7` Kazakhstan), else one whose number ranges hold it
/// (`+1 613` is Canada, `+44 1534` Jersey) unless the main country's hold it too (`+1
/// 800`, shared by all of North America, is the United States'), else the code's main
/// country: the plans do not list every number a country has allocated (the UK's drama
/// numbers, say).
///
/// The main country's ranges, the largest, are looked at only when another country's
/// hold the number: the regular expressions of a country's number types cost
/// microseconds, and this runs for every message.
fn country_of(parsed: &phonenumber::PhoneNumber) -> Option<Country> {
    let database = &*phonenumber::metadata::DATABASE;
    let regions = database.region(&parsed.code().value())?;
    let (main, others) = regions.split_first()?;
    let national = if others.is_empty() {
        String::new()
    } else {
        parsed.national().to_string()
    };
    for id in others {
        let Some(meta) = database.by_id(*id) else {
            continue;
        };
        let here = match meta.leading_digits() {
            Some(leading) => leading.find(&national).is_some_and(|m| m.start() == 0),
            None => {
                holds(meta, &national)
                    && !database.by_id(*main).is_some_and(|m| holds(m, &national))
            }
        };
        if here {
            return Country::parse(id);
        }
    }
    Country::parse(main)
}

/// Whether one of a region's number types holds `national`.
fn holds(meta: &phonenumber::Metadata, national: &str) -> bool {
    number_types(meta).any(|descriptor| descriptor.is_match(national))
}

/// The national number lengths a region uses, over all its number types (the metadata
/// leaves the general descriptor's lengths empty).
fn possible_lengths(meta: &phonenumber::Metadata) -> impl Iterator<Item = u16> + '_ {
    number_types(meta).flat_map(|descriptor| descriptor.possible_length().iter().copied())
}

/// A region's descriptors of each number type it has.
fn number_types(
    meta: &phonenumber::Metadata,
) -> impl Iterator<Item = &phonenumber::metadata::Descriptor> + '_ {
    let d = meta.descriptors();
    [
        d.fixed_line(),
        d.mobile(),
        d.toll_free(),
        d.premium_rate(),
        d.shared_cost(),
        d.personal_number(),
        d.voip(),
        d.pager(),
        d.uan(),
        d.voicemail(),
    ]
    .into_iter()
    .flatten()
}

/// Debug never shows the full number, so a stray `{:?}` cannot leak one into a log.
impl fmt::Debug for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PhoneNumber({})", self.masked())
    }
}

/// Masks all but the first three and last three characters: `+44*******123`.
pub fn mask(number: &str) -> String {
    let chars: Vec<char> = number.chars().collect();
    if chars.len() < 8 {
        return "*".repeat(chars.len());
    }
    let hidden = chars.len() - 6;
    let mut out: String = chars[..3].iter().collect();
    out.extend(std::iter::repeat_n('*', hidden));
    out.extend(&chars[chars.len() - 3..]);
    out
}

/// Masks every run that looks like a phone number (six digits or more, with an optional
/// `+` and spaces, dashes, dots, slashes or brackets inside) in free text such as a
/// provider's error message.
pub fn redact_numbers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let mut digits = 0;
    for c in text.chars() {
        let continues = c.is_ascii_digit()
            || (c == '+' && run.is_empty())
            || (!run.is_empty() && matches!(c, ' ' | '-' | '.' | '/' | '(' | ')'));
        if continues {
            digits += usize::from(c.is_ascii_digit());
            run.push(c);
        } else {
            flush_run(&mut run, digits, &mut out);
            digits = 0;
            out.push(c);
        }
    }
    flush_run(&mut run, digits, &mut out);
    out
}

/// Writes a run of number-like characters, masked when it holds six digits or more. What
/// follows its last digit (a full stop, a space) is kept as it was.
fn flush_run(run: &mut String, digits: usize, out: &mut String) {
    if digits >= 6 {
        let end = run.rfind(|c: char| c.is_ascii_digit()).map_or(0, |i| i + 1);
        let number: String = run[..end].chars().filter(|c| !c.is_whitespace()).collect();
        out.push_str(&mask(&number));
        out.push_str(&run[end..]);
    } else {
        out.push_str(run);
    }
    run.clear();
}

/// A school's own sender: alphanumeric, 1 to 11 characters, or an E.164 number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sender_id must be 1 to 11 letters and digits, or a number in E.164")]
pub struct SenderIdError;

impl SenderId {
    pub fn parse(raw: &str) -> Result<Self, SenderIdError> {
        let raw = raw.trim();
        let alphanumeric =
            (1..=11).contains(&raw.len()) && raw.chars().all(|c| c.is_ascii_alphanumeric());
        let e164 = raw.len() >= 8
            && raw.len() <= 16
            && raw.starts_with('+')
            && raw[1..].chars().all(|c| c.is_ascii_digit())
            && !raw[1..].starts_with('0');
        if alphanumeric || e164 {
            Ok(SenderId(raw.to_owned()))
        } else {
            Err(SenderIdError)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A number (E.164), not an alphanumeric name.
    pub fn is_number(&self) -> bool {
        self.0.starts_with('+')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e164_numbers_pass_through() {
        let n = PhoneNumber::parse("+447700900123", None).expect("valid UK mobile");
        assert_eq!(n.as_str(), "+447700900123");
    }

    #[test]
    fn national_numbers_are_read_with_the_country() {
        let n = PhoneNumber::parse("07700 900123", Some("GB")).expect("valid national");
        assert_eq!(n.as_str(), "+447700900123");
        let n = PhoneNumber::parse("(201) 555-0123", Some("us")).expect("valid US number");
        assert_eq!(n.as_str(), "+12015550123");
        assert_eq!(
            PhoneNumber::parse("07700 900123", None),
            Err(PhoneError::NoCountry)
        );
        assert!(matches!(
            PhoneNumber::parse("07700 900123", Some("XX")),
            Err(PhoneError::UnknownCountry(_))
        ));
    }

    #[test]
    fn e164_is_written_as_the_crates_formatter_writes_it() {
        // Italian numbers keep their leading zero; the others cover a few number plans.
        for (raw, country) in [
            ("06 1234 5678", Some("IT")),
            ("+390612345678", None),
            ("+393123456789", None),
            ("07700 900123", Some("GB")),
            ("(201) 555-0123", Some("US")),
            ("+4915123456789", None),
            ("0612345678", Some("FR")),
            ("+61412345678", None),
        ] {
            let ours = PhoneNumber::parse(raw, country).expect(raw);
            let id = country.map(|c| c.parse::<phonenumber::country::Id>().expect("country"));
            let theirs = phonenumber::parse(id, raw)
                .expect(raw)
                .format()
                .mode(phonenumber::Mode::E164)
                .to_string();
            assert_eq!(ours.as_str(), theirs, "{raw}");
        }
    }

    #[test]
    fn a_number_knows_its_country_where_a_calling_code_is_shared() {
        let country = |raw: &str| {
            PhoneNumber::parse(raw, None)
                .expect(raw)
                .country()
                .map(|c| c.to_string())
        };
        for (raw, expected) in [
            ("+447700900123", "GB"),
            ("+441534123456", "JE"),
            ("+12015550123", "US"),
            ("+15005550006", "US"),
            ("+16135550123", "CA"),
            ("+18765551234", "JM"),
            ("+33612345678", "FR"),
            ("+79123456789", "RU"),
            ("+77012345678", "KZ"),
        ] {
            assert_eq!(country(raw).as_deref(), Some(expected), "{raw}");
        }
        assert_eq!(
            country("+881612345678"),
            None,
            "a satellite network's number"
        );
        assert_eq!(
            country("+80012345678"),
            None,
            "an international freephone number"
        );
    }

    #[test]
    fn countries_are_iso_codes_the_numbering_plans_know() {
        assert_eq!(
            Country::parse(" gb ").map(|c| c.to_string()),
            Some("GB".into())
        );
        assert_eq!(Country::parse("UK"), None);
        assert_eq!(Country::parse("GBR"), None);
        assert_eq!(Country::parse("001"), None);
        assert_eq!(Country::parse(""), None);
    }

    #[test]
    fn impossible_numbers_are_refused() {
        assert!(PhoneNumber::parse("+44123", None).is_err());
        assert!(PhoneNumber::parse("hello", Some("GB")).is_err());
        assert!(PhoneNumber::parse("", Some("GB")).is_err());
        assert!(PhoneNumber::parse("+999999999999", None).is_err());
    }

    #[test]
    fn masks_keep_only_the_edges() {
        assert_eq!(mask("+447700900123"), "+44*******123");
        assert_eq!(mask("12345"), "*****");
        let n = PhoneNumber::parse("+447700900123", None).expect("valid");
        assert_eq!(format!("{n:?}"), "PhoneNumber(+44*******123)");
    }

    #[test]
    fn numbers_inside_text_are_redacted() {
        let text = "The 'To' number +447700900123 is not valid; code 21211.";
        let red = redact_numbers(text);
        assert!(!red.contains("7700900123"), "{red}");
        assert!(red.contains("+44*******123"), "{red}");
        assert!(red.contains("21211"), "short codes stay readable: {red}");
        assert_eq!(
            redact_numbers("call 0770 090 0123 now"),
            "call 077*****123 now"
        );
    }

    #[test]
    fn numbers_split_by_dots_or_slashes_are_redacted_too() {
        for text in [
            "call 0770.090.0123.",
            "call 0770/090/0123.",
            "to +447700900123.",
        ] {
            let red = redact_numbers(text);
            assert!(!red.contains("090"), "{red}");
            assert!(
                red.ends_with("123."),
                "the full stop stays after the number: {red}"
            );
        }
    }

    #[test]
    fn sender_ids_are_alphanumeric_or_e164() {
        assert!(SenderId::parse("DriveSafe").is_ok());
        assert!(SenderId::parse("+447700900123").is_ok());
        assert!(SenderId::parse("TooLongSenderName").is_err());
        assert!(SenderId::parse("Drive Safe").is_err());
        assert!(SenderId::parse("").is_err());
        assert!(SenderId::parse("Café").is_err());
    }
}
