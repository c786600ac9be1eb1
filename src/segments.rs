//! How a text travels as SMS: GSM-7 when every character is in the GSM 03.38 alphabet
//! (its extension table costs two septets a character), else UCS-2; and into how many
//! segments it splits (160/153 septets, 70/67 UTF-16 units; a two-septet character or a
//! surrogate pair is never split across segments).
//!
//! - [`lookalikes`]: smart encoding, the GSM-7 look-alikes of curly quotes, dashes and
//!   odd spaces.

pub mod lookalikes;

/// The GSM 03.38 basic alphabet (without the escape character).
const GSM_BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?\
¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
/// The extension table: each costs an escape plus itself.
const GSM_EXTENSION: &str = "\u{000C}^{}\\[~]|€";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Gsm7,
    Ucs2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segmentation {
    pub encoding: Encoding,
    pub segments: u32,
}

/// The cost of each ASCII character (0: not in either table), read off the two tables
/// above at compile time: most texts are ASCII, and a lookup is much cheaper than a search.
const ASCII_COST: [u8; 128] = {
    let mut costs = [0u8; 128];
    let (basic, extension) = (GSM_BASIC.as_bytes(), GSM_EXTENSION.as_bytes());
    let mut i = 0;
    while i < basic.len() {
        if basic[i] < 128 {
            costs[basic[i] as usize] = 1;
        }
        i += 1;
    }
    let mut i = 0;
    while i < extension.len() {
        if extension[i] < 128 {
            costs[extension[i] as usize] = 2;
        }
        i += 1;
    }
    costs
};

fn gsm_cost(c: char) -> Option<usize> {
    if c.is_ascii() {
        return match ASCII_COST[c as usize] {
            0 => None,
            cost => Some(cost as usize),
        };
    }
    if GSM_BASIC.contains(c) {
        Some(1)
    } else if GSM_EXTENSION.contains(c) {
        Some(2)
    } else {
        None
    }
}

/// Packs units into segments of `per` (or one of `single` when all fit), never splitting
/// a multi-unit character.
fn pack(costs: impl Iterator<Item = usize> + Clone, single: usize, per: usize) -> u32 {
    let total: usize = costs.clone().sum();
    if total <= single {
        return 1;
    }
    let mut segments = 1;
    let mut used = 0;
    for cost in costs {
        if used + cost > per {
            segments += 1;
            used = 0;
        }
        used += cost;
    }
    segments
}

pub fn segment(text: &str) -> Segmentation {
    if text.chars().all(|c| gsm_cost(c).is_some()) {
        Segmentation {
            encoding: Encoding::Gsm7,
            segments: pack(text.chars().filter_map(gsm_cost), 160, 153),
        }
    } else {
        Segmentation {
            encoding: Encoding::Ucs2,
            segments: pack(text.chars().map(char::len_utf16), 70, 67),
        }
    }
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Gsm7 => "GSM-7",
            Encoding::Ucs2 => "UCS-2",
        }
    }
}

/// A text that goes as UCS-2, costing more segments than it would as GSM-7, because of a
/// few characters outside the GSM alphabet (an emoji, a curly quote, a dash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ucs2Cost {
    /// The characters outside the alphabet, each once, in order of appearance.
    pub characters: Vec<char>,
    pub segments: u32,
    /// The segments the text would take without them.
    pub gsm7_segments: u32,
}

/// What UCS-2 costs `text`, when it costs a segment or more; `None` for GSM-7 texts and
/// for texts that are UCS-2 at no extra cost.
pub fn ucs2_cost(text: &str) -> Option<Ucs2Cost> {
    let segmentation = segment(text);
    if segmentation.encoding != Encoding::Ucs2 {
        return None;
    }
    let mut characters: Vec<char> = Vec::new();
    for c in text.chars().filter(|c| gsm_cost(*c).is_none()) {
        if !characters.contains(&c) {
            characters.push(c);
        }
    }
    let gsm7_segments = pack(text.chars().filter_map(gsm_cost), 160, 153);
    (gsm7_segments < segmentation.segments).then_some(Ucs2Cost {
        characters,
        segments: segmentation.segments,
        gsm7_segments,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_emoji_that_adds_segments_is_named() {
        let text = format!("{} 👍", "a".repeat(100));
        let cost = ucs2_cost(&text).expect("UCS-2 costs a segment");
        assert_eq!(cost.characters, ['👍']);
        assert_eq!((cost.segments, cost.gsm7_segments), (2, 1));
        assert_eq!(ucs2_cost("See you 👍"), None, "still one segment");
        assert_eq!(ucs2_cost(&"a".repeat(100)), None, "GSM-7");
    }

    #[test]
    fn the_ascii_table_agrees_with_the_alphabet() {
        for c in (0u8..128).map(char::from) {
            let searched = if GSM_BASIC.contains(c) {
                Some(1)
            } else if GSM_EXTENSION.contains(c) {
                Some(2)
            } else {
                None
            };
            assert_eq!(gsm_cost(c), searched, "{c:?}");
        }
        assert_eq!(gsm_cost('`'), None);
        assert_eq!(gsm_cost('['), Some(2));
        assert_eq!(gsm_cost('a'), Some(1));
    }

    fn gsm(text: &str) -> u32 {
        let s = segment(text);
        assert_eq!(s.encoding, Encoding::Gsm7, "{text:?}");
        s.segments
    }

    fn ucs2(text: &str) -> u32 {
        let s = segment(text);
        assert_eq!(s.encoding, Encoding::Ucs2, "{text:?}");
        s.segments
    }

    #[test]
    fn gsm7_fits_160_then_153_per_segment() {
        assert_eq!(gsm("Your code is 4711"), 1);
        assert_eq!(gsm(&"a".repeat(160)), 1);
        assert_eq!(gsm(&"a".repeat(161)), 2);
        assert_eq!(gsm(&"a".repeat(306)), 2);
        assert_eq!(gsm(&"a".repeat(307)), 3);
        // One character outside the alphabet (an em dash) makes the whole text UCS-2.
        assert_eq!(ucs2("Lesson at 10:00 with Sam, £25 — see you"), 1);
    }

    #[test]
    fn extension_characters_cost_two_and_stay_whole() {
        assert_eq!(gsm(&"€".repeat(80)), 1, "80 x 2 = 160 septets");
        assert_eq!(gsm(&"€".repeat(81)), 2);
        // 306 septets would fill two segments exactly, but the escape pair at 153/154
        // moves whole into the second one, and the last character spills into a third.
        let text = format!("{}[{}", "a".repeat(152), "a".repeat(152));
        assert_eq!(gsm(&text), 3);
        assert_eq!(gsm("Prices: {10} [20] ~ ^ | \\ €"), 1);
    }

    #[test]
    fn anything_else_is_ucs2_at_70_then_67() {
        assert_eq!(ucs2("Привет"), 1);
        assert_eq!(ucs2(&"ж".repeat(70)), 1);
        assert_eq!(ucs2(&"ж".repeat(71)), 2);
        assert_eq!(ucs2(&"ж".repeat(134)), 2);
        assert_eq!(ucs2(&"ж".repeat(135)), 3);
    }

    #[test]
    fn emoji_take_two_units_and_are_not_split() {
        assert_eq!(ucs2("See you 👍"), 1);
        assert_eq!(ucs2(&"👍".repeat(35)), 1, "35 x 2 = 70 units");
        assert_eq!(ucs2(&"👍".repeat(36)), 2);
        // 66 units, then a pair that does not fit the 67th: it starts segment two.
        assert_eq!(ucs2(&format!("{}👍{}", "ж".repeat(66), "ж".repeat(66))), 3);
    }
}
