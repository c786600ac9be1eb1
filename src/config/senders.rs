//! The countries whose carriers refuse alphanumeric senders: the list in the repository
//! (`data/alphanumeric-sender-refused.txt`), compiled in, or ops' own file named by
//! `SMSGW_SENDER_COUNTRIES_FILE`. A file that cannot be read, or a line that is not an ISO
//! 3166 alpha-2 code, stops the daemon (exit 2) naming the line.

use super::{ConfigError, bad};
use crate::phone::Country;

const VARIABLE: &str = "SMSGW_SENDER_COUNTRIES_FILE";
const BUILT_IN: &str = include_str!("../../data/alphanumeric-sender-refused.txt");

/// The list ops named, else the built-in one.
pub(super) fn refusing_countries(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<Vec<Country>, ConfigError> {
    match get(VARIABLE) {
        None => parse(BUILT_IN).map_err(|problem| bad(VARIABLE, format!("built in: {problem}"))),
        Some(path) => {
            let text = std::fs::read_to_string(path.trim())
                .map_err(|e| bad(VARIABLE, format!("cannot read '{}': {e}", path.trim())))?;
            parse(&text).map_err(|problem| bad(VARIABLE, format!("'{}' {problem}", path.trim())))
        }
    }
}

/// One code a line; blank lines and everything after `#` are ignored.
fn parse(text: &str) -> Result<Vec<Country>, String> {
    let mut countries = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let code = line.split('#').next().unwrap_or_default().trim();
        if code.is_empty() {
            continue;
        }
        let country = Country::parse(code).ok_or_else(|| {
            format!(
                "line {}: '{}' is not an ISO 3166 alpha-2 country code",
                number + 1,
                code.chars().take(20).collect::<String>()
            )
        })?;
        if !countries.contains(&country) {
            countries.push(country);
        }
    }
    Ok(countries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_list_parses_and_holds_north_america() {
        let countries = parse(BUILT_IN).expect("the built-in list parses");
        for code in ["US", "CA"] {
            assert!(countries.contains(&Country::parse(code).expect("a code")));
        }
        assert!(!countries.contains(&Country::parse("GB").expect("a code")));
    }

    #[test]
    fn a_bad_line_is_named() {
        assert_eq!(
            parse("# mine\nUS\n\nca  # lower case is fine\n").map(|c| c.len()),
            Ok(2)
        );
        let error = parse("US\nCanada\n").expect_err("not a code");
        assert!(error.starts_with("line 2: 'Canada'"), "{error}");
    }

    #[test]
    fn an_unreadable_file_stops_the_daemon() {
        let get = |_: &str| Some("/nonexistent/senders.txt".to_owned());
        let error = refusing_countries(&get).expect_err("no such file");
        assert_eq!(error.variable, VARIABLE);
    }
}
