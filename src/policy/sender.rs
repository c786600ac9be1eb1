//! The sender a text goes from: the school's alphanumeric `sender_id` only where the
//! destination's carriers accept one; elsewhere a number (the school's own, or the
//! provider's), or none at all.

use crate::phone::{Country, SenderId};

/// What a provider sends from when it is given no sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderSender {
    /// A phone number (`TWILIO_FROM=+1...`, Vonage's `from` in digits).
    Number,
    /// An alphanumeric sender (`VONAGE_FROM=DriveCo`).
    Alphanumeric,
    /// A pool that picks a sender per destination itself (a Twilio Messaging Service).
    Pool,
}

/// Whether carriers of `country` refuse alphanumeric senders, by the configured list. A
/// number of no country (`+800`) is not refused: no list can say.
pub fn refuses_alphanumeric(refusing: &[Country], country: Option<Country>) -> bool {
    country.is_some_and(|c| refusing.contains(&c))
}

/// The sender to give the provider: `Some(None)` means the provider's own default;
/// `None` means no sender the destination accepts exists, and the text must not go.
pub fn choose<'a>(
    refuses_alphanumeric: bool,
    sender_id: Option<&'a SenderId>,
    sender_number: Option<&'a SenderId>,
    provider: ProviderSender,
) -> Option<Option<&'a SenderId>> {
    if !refuses_alphanumeric {
        return Some(sender_id);
    }
    if let Some(number) = sender_id.filter(|s| s.is_number()).or(sender_number) {
        return Some(Some(number));
    }
    match provider {
        ProviderSender::Number | ProviderSender::Pool => Some(None),
        ProviderSender::Alphanumeric => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender(raw: &str) -> SenderId {
        SenderId::parse(raw).expect("valid")
    }

    fn list() -> Vec<Country> {
        ["US", "CA"]
            .into_iter()
            .filter_map(Country::parse)
            .collect()
    }

    #[test]
    fn countries_on_the_list_refuse_and_others_accept() {
        let refusing = list();
        for (code, refused) in [("US", true), ("CA", true), ("GB", false), ("DE", false)] {
            let country = Country::parse(code);
            assert_eq!(refuses_alphanumeric(&refusing, country), refused, "{code}");
        }
        assert!(
            !refuses_alphanumeric(&refusing, None),
            "+800 belongs to no country"
        );
    }

    #[test]
    fn an_alphanumeric_sender_goes_where_it_is_accepted() {
        let (alpha, number) = (sender("DriveCo"), sender("+447700900001"));
        for provider in [ProviderSender::Number, ProviderSender::Alphanumeric] {
            assert_eq!(
                choose(false, Some(&alpha), Some(&number), provider),
                Some(Some(&alpha))
            );
            assert_eq!(choose(false, None, Some(&number), provider), Some(None));
        }
    }

    #[test]
    fn where_refused_a_number_is_used_or_nothing_is_sent() {
        let (alpha, number) = (sender("DriveCo"), sender("+15005550006"));
        let choose_us = |id, num, provider| choose(true, id, num, provider);
        // The school's own number first, whatever the provider's.
        assert_eq!(
            choose_us(Some(&alpha), Some(&number), ProviderSender::Alphanumeric),
            Some(Some(&number))
        );
        assert_eq!(
            choose_us(Some(&number), None, ProviderSender::Alphanumeric),
            Some(Some(&number)),
            "a sender_id that is a number is kept"
        );
        // Else the provider's number, or its pool.
        assert_eq!(
            choose_us(Some(&alpha), None, ProviderSender::Number),
            Some(None)
        );
        assert_eq!(
            choose_us(Some(&alpha), None, ProviderSender::Pool),
            Some(None)
        );
        // No number anywhere: no sender.
        assert_eq!(
            choose_us(Some(&alpha), None, ProviderSender::Alphanumeric),
            None
        );
        assert_eq!(choose_us(None, None, ProviderSender::Alphanumeric), None);
    }
}
