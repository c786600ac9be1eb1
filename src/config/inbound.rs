//! What an inbound text means: an opt-out or opt-in keyword (`SMSGW_OPT_OUT_KEYWORDS`,
//! `SMSGW_OPT_IN_KEYWORDS`), or else a reply, attributed to a message sent within
//! `SMSGW_REPLY_WINDOW`.

use std::time::Duration;

use super::{ConfigError, bad, parse::duration};

const OPT_OUT: &str = "SMSGW_OPT_OUT_KEYWORDS";
const OPT_IN: &str = "SMSGW_OPT_IN_KEYWORDS";

/// What inbound texts mean.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundSettings {
    /// What inbound texts are opt-out or opt-in keywords; any other text is a reply.
    pub keywords: Keywords,
    /// How far back a reply looks for the message it answers.
    pub reply_window: Duration,
}

pub(super) fn inbound(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<InboundSettings, ConfigError> {
    Ok(InboundSettings {
        keywords: Keywords::parse(get(OPT_OUT).as_deref(), get(OPT_IN).as_deref())?,
        reply_window: duration(get, "SMSGW_REPLY_WINDOW", "7d")?,
    })
}

/// Twilio's own lists, so that ours matches what the provider itself enforces; with
/// REVOKE and OPTOUT, the words of a consent revoked that Twilio also honours and smsgw
/// always did (a Vonage number has no block of its own: smsgw's list is the only one).
const DEFAULT_OPT_OUT: &str = "STOP,STOPALL,UNSUBSCRIBE,CANCEL,END,QUIT,REVOKE,OPTOUT";
const DEFAULT_OPT_IN: &str = "START,UNSTOP,YES";

/// What a keyword asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyword {
    OptOut,
    OptIn,
}

/// The opt-out and opt-in keywords, upper case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keywords {
    opt_out: Vec<String>,
    opt_in: Vec<String>,
}

impl Default for Keywords {
    fn default() -> Self {
        Keywords::parse(None, None)
            .unwrap_or_else(|_| unreachable!("the default keyword lists are valid"))
    }
}

impl Keywords {
    /// The lists as configured (comma-separated words); `None` takes the default. An empty
    /// word, a word of more than one word, or a word in both lists is refused.
    pub fn parse(opt_out: Option<&str>, opt_in: Option<&str>) -> Result<Keywords, ConfigError> {
        let opt_out = words(OPT_OUT, opt_out.unwrap_or(DEFAULT_OPT_OUT))?;
        let opt_in = words(OPT_IN, opt_in.unwrap_or(DEFAULT_OPT_IN))?;
        if let Some(both) = opt_out.iter().find(|w| opt_in.contains(w)) {
            return Err(bad(
                OPT_IN,
                format!("'{both}' is also an opt-out keyword ({OPT_OUT})"),
            ));
        }
        Ok(Keywords { opt_out, opt_in })
    }

    /// The keyword a text is: the whole text, trimmed, in any case (one word, as Twilio
    /// counts them: "STOP PLEASE" is a reply).
    pub fn classify(&self, text: &str) -> Option<Keyword> {
        let word = text.trim().to_uppercase();
        if self.opt_out.contains(&word) {
            Some(Keyword::OptOut)
        } else if self.opt_in.contains(&word) {
            Some(Keyword::OptIn)
        } else {
            None
        }
    }
}

fn words(variable: &'static str, raw: &str) -> Result<Vec<String>, ConfigError> {
    let mut words = Vec::new();
    for word in raw.split(',').map(str::trim) {
        if word.is_empty() {
            return Err(bad(
                variable,
                "an empty keyword (two commas, or one at an end)",
            ));
        }
        if word.chars().any(char::is_whitespace) {
            return Err(bad(
                variable,
                format!("'{word}' is more than one word; a keyword is one word"),
            ));
        }
        let word = word.to_uppercase();
        if !words.contains(&word) {
            words.push(word);
        }
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_twilios_lists() {
        let k = Keywords::default();
        let opt_out = [
            "STOP",
            "STOPALL",
            "UNSUBSCRIBE",
            "CANCEL",
            "END",
            "QUIT",
            "REVOKE",
            "OPTOUT",
        ];
        for word in opt_out {
            assert_eq!(k.classify(word), Some(Keyword::OptOut), "{word}");
        }
        for word in ["START", "UNSTOP", "YES"] {
            assert_eq!(k.classify(word), Some(Keyword::OptIn), "{word}");
        }
        assert_eq!(k.classify("HELP"), None);
    }

    #[test]
    fn a_keyword_is_the_whole_text_in_any_case() {
        let k = Keywords::default();
        assert_eq!(k.classify("  stop \n"), Some(Keyword::OptOut));
        assert_eq!(k.classify("Cancel"), Some(Keyword::OptOut));
        assert_eq!(k.classify("yes"), Some(Keyword::OptIn));
        assert_eq!(k.classify("stop please"), None);
        assert_eq!(k.classify("stopping"), None);
        assert_eq!(k.classify("Running 10 min late"), None);
    }

    #[test]
    fn other_languages_by_configuration() {
        let k = Keywords::parse(Some("stop, stopp,arret"), Some("start,starta")).expect("valid");
        assert_eq!(k.classify("Stopp"), Some(Keyword::OptOut));
        assert_eq!(k.classify("ARRET"), Some(Keyword::OptOut));
        assert_eq!(k.classify("starta"), Some(Keyword::OptIn));
        assert_eq!(
            k.classify("quit"),
            None,
            "a configured list replaces the default"
        );
    }

    #[test]
    fn bad_lists_are_refused() {
        for (out, inn) in [
            (Some("STOP,,QUIT"), None),
            (Some("STOP,"), None),
            (None, Some("START, ")),
            (Some("STOP ALL"), None),
            (Some("STOP,YES"), None),
            (None, Some("start,stop")),
        ] {
            assert!(Keywords::parse(out, inn).is_err(), "{out:?} {inn:?}");
        }
    }
}
