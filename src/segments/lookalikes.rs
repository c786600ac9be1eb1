//! Smart encoding: characters outside the GSM 03.38 alphabet that have a GSM-7
//! look-alike, and the text with them replaced when that makes the whole text GSM-7.
//!
//! The table is the part of Twilio's published Smart Encoding list ("List of characters
//! replaced by Smart Encoding") and GOV.UK Notify's `SanitiseSMS` replacements that are
//! punctuation, spaces or invisible marks. Left out on purpose: modifier letters (ʻ ʼ ʹ
//! ˈ, letters in Hawaiian, Ukrainian and others), fullwidth forms, and bullets (• has
//! no GSM-7 form that reads as a bullet; `-` or `*` would change what the author wrote).
//! Letters without a GSM-7 form (`ł`, `ç`, `ŵ`) and emoji are not in it, and a text that
//! keeps one of them is sent exactly as written.

use std::borrow::Cow;

use super::gsm_cost;

/// Each look-alike and what replaces it, in code point order (a test holds it so).
pub const LOOKALIKES: &[(char, &str)] = &[
    ('`', "'"),          // grave accent
    ('\u{00A0}', " "),   // no-break space
    ('\u{00AB}', "\""),  // «
    ('\u{00AD}', ""),    // soft hyphen: invisible
    ('\u{00B4}', "'"),   // acute accent
    ('\u{00BB}', "\""),  // »
    ('\u{2000}', " "),   // en quad
    ('\u{2001}', " "),   // em quad
    ('\u{2002}', " "),   // en space
    ('\u{2003}', " "),   // em space
    ('\u{2004}', " "),   // three-per-em space
    ('\u{2005}', " "),   // four-per-em space
    ('\u{2006}', " "),   // six-per-em space
    ('\u{2007}', " "),   // figure space
    ('\u{2008}', " "),   // punctuation space
    ('\u{2009}', " "),   // thin space
    ('\u{200A}', " "),   // hair space
    ('\u{200B}', ""),    // zero-width space
    ('\u{200C}', ""),    // zero-width non-joiner
    ('\u{200D}', ""),    // zero-width joiner
    ('\u{2010}', "-"),   // hyphen
    ('\u{2011}', "-"),   // non-breaking hyphen
    ('\u{2012}', "-"),   // figure dash
    ('\u{2013}', "-"),   // en dash
    ('\u{2014}', "-"),   // em dash
    ('\u{2015}', "-"),   // horizontal bar
    ('\u{2018}', "'"),   // ‘
    ('\u{2019}', "'"),   // ’
    ('\u{201A}', "'"),   // ‚
    ('\u{201B}', "'"),   // ‛
    ('\u{201C}', "\""),  // “
    ('\u{201D}', "\""),  // ”
    ('\u{201E}', "\""),  // „
    ('\u{201F}', "\""),  // ‟
    ('\u{2026}', "..."), // horizontal ellipsis
    ('\u{2028}', " "),   // line separator
    ('\u{2029}', " "),   // paragraph separator
    ('\u{202F}', " "),   // narrow no-break space
    ('\u{2032}', "'"),   // prime
    ('\u{2033}', "\""),  // double prime
    ('\u{2039}', "'"),   // ‹
    ('\u{203A}', "'"),   // ›
    ('\u{205F}', " "),   // medium mathematical space
    ('\u{2060}', ""),    // word joiner
    ('\u{2212}', "-"),   // minus sign
    ('\u{275B}', "'"),   // ❛
    ('\u{275C}', "'"),   // ❜
    ('\u{275D}', "\""),  // ❝
    ('\u{275E}', "\""),  // ❞
    ('\u{3000}', " "),   // ideographic space
    ('\u{301D}', "\""),  // 〝
    ('\u{301E}', "\""),  // 〞
    ('\u{FEFF}', ""),    // zero-width no-break space (byte order mark)
];

/// What replaces `c`, if it is a look-alike.
pub fn lookalike(c: char) -> Option<&'static str> {
    LOOKALIKES
        .binary_search_by_key(&c, |(from, _)| *from)
        .ok()
        .map(|i| LOOKALIKES[i].1)
}

/// `text` with its look-alikes replaced, when it has some and every other character is in
/// the GSM-7 alphabet; otherwise `text` as it is (borrowed: nothing is copied).
pub fn smart_encode(text: &str) -> Cow<'_, str> {
    // Most texts are ASCII: only the grave accent among them has a look-alike. Both
    // scans are vectorised, unlike one loop testing each byte for both.
    if text.is_ascii() && !text.as_bytes().contains(&b'`') {
        return Cow::Borrowed(text);
    }
    let mut found = false;
    for c in text.chars() {
        if gsm_cost(c).is_some() {
            continue;
        }
        if lookalike(c).is_none() {
            return Cow::Borrowed(text);
        }
        found = true;
    }
    if !found {
        return Cow::Borrowed(text);
    }
    let mut replaced = String::with_capacity(text.len());
    for c in text.chars() {
        match lookalike(c) {
            Some(with) if gsm_cost(c).is_none() => replaced.push_str(with),
            _ => replaced.push(c),
        }
    }
    Cow::Owned(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segments::{Encoding, segment};

    #[test]
    fn the_table_is_sorted_and_replaces_outside_the_alphabet_only() {
        assert!(
            LOOKALIKES.windows(2).all(|w| w[0].0 < w[1].0),
            "sorted, no repeats"
        );
        for (from, to) in LOOKALIKES {
            assert_eq!(gsm_cost(*from), None, "{from:?} is already GSM-7");
            assert!(to.chars().all(|c| gsm_cost(c) == Some(1)), "{to:?}");
            assert!(!from.is_alphabetic(), "{from:?} is a letter");
        }
    }

    #[test]
    fn each_entry_is_replaced_in_a_text() {
        for (from, to) in LOOKALIKES {
            let text = format!("See you{from}at 10");
            let sent = smart_encode(&text);
            assert_eq!(sent, format!("See you{to}at 10"), "{from:?}");
            assert_eq!(segment(&sent).encoding, Encoding::Gsm7, "{from:?}");
        }
    }

    #[test]
    fn characters_outside_the_table_are_never_changed() {
        let ranges = [0u32..0x3000, 0x1F300..0x1FAFF];
        for c in ranges.into_iter().flatten().filter_map(char::from_u32) {
            if lookalike(c).is_some() {
                continue;
            }
            let text = format!("It’s {c} here");
            let sent = smart_encode(&text);
            if gsm_cost(c).is_some() {
                assert_eq!(sent, format!("It's {c} here"), "{c:?}");
            } else {
                assert_eq!(sent, text, "{c:?} must keep the text as written");
            }
        }
    }

    #[test]
    fn letters_without_a_gsm_form_and_emoji_keep_the_text_as_written() {
        for text in [
            "Cześć — łódź",
            "ça va – merci",
            "Bore da ŵyr",
            "See you 👍 – Sam",
        ] {
            assert!(matches!(smart_encode(text), Cow::Borrowed(_)), "{text}");
        }
        assert!(matches!(smart_encode("Plain ASCII"), Cow::Borrowed(_)));
        assert!(
            matches!(smart_encode("Café à 10h"), Cow::Borrowed(_)),
            "GSM-7 already"
        );
    }

    #[test]
    fn a_curly_apostrophe_no_longer_costs_segments() {
        let text = format!("you’re booked {}", "a".repeat(136));
        assert_eq!(text.chars().count(), 150);
        let before = segment(&text);
        assert_eq!((before.encoding, before.segments), (Encoding::Ucs2, 3));
        let after = segment(&smart_encode(&text));
        assert_eq!((after.encoding, after.segments), (Encoding::Gsm7, 1));
        let dots = segment(&smart_encode(&format!("{}…", "a".repeat(157))));
        assert_eq!(
            (dots.encoding, dots.segments),
            (Encoding::Gsm7, 1),
            "160 septets"
        );
        let over = segment(&smart_encode(&format!("{}…", "a".repeat(158))));
        assert_eq!(over.segments, 2, "the ellipsis grows to three septets");
    }
}
