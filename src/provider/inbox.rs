//! The development inbox: nothing leaves the machine. The pipeline keeps a copy of every
//! message it handles for the inbox page (see `store::inbox`); this adapter answers the
//! calls as a provider would, so that the rest of the pipeline (retries, opt-outs,
//! receipts) runs as it does in production.
//!
//! Outcomes are simulated by recipient, with the magic numbers of Twilio's test
//! credentials, and classified through the Twilio adapter's own rules, so a web app
//! exercises its failure paths exactly as it would against Twilio:
//!
//! | to | outcome |
//! |---|---|
//! | `+15005550001` | refused, 21211 (invalid number) |
//! | `+15005550002` | refused, 21612 (cannot route) |
//! | `+15005550003` | refused, 21408 (no international permission) |
//! | `+15005550004` | refused, 21610 (unsubscribed: the pipeline records the opt-out) |
//! | `+15005550009` | refused, 21614 (not SMS-capable) |
//! | `+15005550500` | a temporary failure on the first two calls, then accepted |
//! | any other | accepted; a `delivered` receipt follows about a second later |
//!
//! The receipts are queued here and posted by the HTTP side through the same path as a
//! provider's webhook (`http::inbox`), so they move the message as a real one would.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::{sync::mpsc, time::Instant};
use uuid::Uuid;

use super::{Accepted, OutboundSms, ProviderError, twilio};

/// How long after acceptance the simulated `delivered` receipt comes.
pub const RECEIPT_DELAY: Duration = Duration::from_secs(1);
/// Receipts waiting to be posted; past this many (thousands a second, for seconds) the
/// newest are dropped and those messages stay `sent`.
const RECEIPT_BACKLOG: usize = 65_536;
/// The number that fails for a while, and how many of its calls fail.
const FAILS_FOR_A_WHILE: &str = "+15005550500";
const FAILED_CALLS: u32 = 2;
/// The numbers Twilio refuses with its test credentials: code and Twilio's words.
const REFUSED: &[(&str, &str, &str)] = &[
    (
        "+15005550001",
        "21211",
        "The 'To' number is not a valid phone number.",
    ),
    (
        "+15005550002",
        "21612",
        "The 'To' phone number is not currently reachable via SMS.",
    ),
    (
        "+15005550003",
        "21408",
        "Permission to send an SMS has not been enabled for the region indicated by the 'To' number.",
    ),
    (
        "+15005550004",
        "21610",
        "Attempt to send to unsubscribed recipient.",
    ),
    (
        "+15005550009",
        "21614",
        "'To' number is not a valid mobile number.",
    ),
];

/// A `delivered` receipt the inbox owes, for the message the provider knows as
/// `provider_message_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueReceipt {
    pub provider_message_id: String,
    pub due: Instant,
}

/// What the inbox does with one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Simulated {
    Accept,
    Fail(ProviderError),
}

/// The outcome of the `call`-th call (counting from 1) for a text to `to`. Pure.
pub fn simulate(to: &str, call: u32) -> Simulated {
    if let Some((_, code, message)) = REFUSED.iter().find(|(number, ..)| *number == to) {
        return Simulated::Fail(twilio::rejected(
            400,
            Some((*code).to_owned()),
            (*message).to_owned(),
        ));
    }
    if to == FAILS_FOR_A_WHILE && call <= FAILED_CALLS {
        return Simulated::Fail(ProviderError::Unavailable {
            http_status: 503,
            code: None,
            message: Some(format!(
                "simulated outage: {FAILS_FOR_A_WHILE} fails its first {FAILED_CALLS} attempts"
            )),
            retry_after: None,
        });
    }
    Simulated::Accept
}

#[derive(Debug)]
struct Shared {
    /// Calls so far for each message to the number that fails for a while; forgotten once
    /// it is accepted. In memory: a restarted daemon starts counting again.
    calls: Mutex<HashMap<Uuid, u32>>,
    receipts: mpsc::Sender<DueReceipt>,
    /// Taken once, by whoever posts the receipts.
    pending: Mutex<Option<mpsc::Receiver<DueReceipt>>>,
}

#[derive(Debug, Clone)]
pub struct InboxProvider(Arc<Shared>);

impl Default for InboxProvider {
    fn default() -> Self {
        let (receipts, pending) = mpsc::channel(RECEIPT_BACKLOG);
        InboxProvider(Arc::new(Shared {
            calls: Mutex::new(HashMap::new()),
            receipts,
            pending: Mutex::new(Some(pending)),
        }))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl InboxProvider {
    pub async fn send(&self, sms: &OutboundSms<'_>) -> Result<Accepted, ProviderError> {
        let to = sms.to.as_str();
        match simulate(to, self.count_call(sms.message_id, to)) {
            Simulated::Fail(error) => Err(error),
            Simulated::Accept => {
                let accepted = Accepted {
                    provider_message_id: format!("inbox-{}", sms.message_id),
                    http_status: None,
                };
                self.owe_receipt(&accepted.provider_message_id);
                Ok(accepted)
            }
        }
    }

    /// The receipts this inbox owes, in the order they fall due; `None` once taken.
    pub fn take_receipts(&self) -> Option<mpsc::Receiver<DueReceipt>> {
        lock(&self.0.pending).take()
    }

    /// This call's number for the message, counted only for the number that needs it.
    fn count_call(&self, id: Uuid, to: &str) -> u32 {
        if to != FAILS_FOR_A_WHILE {
            return 1;
        }
        let mut calls = lock(&self.0.calls);
        let call = calls.entry(id).or_insert(0);
        *call += 1;
        let this = *call;
        if this > FAILED_CALLS {
            calls.remove(&id);
        }
        this
    }

    fn owe_receipt(&self, provider_message_id: &str) {
        let receipt = DueReceipt {
            provider_message_id: provider_message_id.to_owned(),
            due: Instant::now() + RECEIPT_DELAY,
        };
        if self.0.receipts.try_send(receipt).is_err() {
            tracing::warn!("too many inbox receipts waiting; this message stays 'sent'");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phone::PhoneNumber;

    fn refusal(to: &str) -> ProviderError {
        match simulate(to, 1) {
            Simulated::Fail(error) => error,
            Simulated::Accept => panic!("{to} should be refused"),
        }
    }

    #[test]
    fn twilios_magic_numbers_are_refused_for_good_with_their_codes() {
        for (to, code) in [
            ("+15005550001", "21211"),
            ("+15005550002", "21612"),
            ("+15005550003", "21408"),
            ("+15005550004", "21610"),
            ("+15005550009", "21614"),
        ] {
            let error = refusal(to);
            assert!(!error.is_retryable(), "{to}");
            assert_eq!(error.code(), Some(code), "{to}");
        }
        assert!(refusal("+15005550004").recipient_opted_out());
        assert!(!refusal("+15005550001").recipient_opted_out());
    }

    #[test]
    fn the_outage_number_fails_twice_then_is_accepted() {
        let outcomes: Vec<bool> = (1..=4)
            .map(|call| matches!(simulate("+15005550500", call), Simulated::Accept))
            .collect();
        assert_eq!(outcomes, [false, false, true, true]);
        match simulate("+15005550500", 1) {
            Simulated::Fail(error) => assert!(error.is_retryable()),
            Simulated::Accept => panic!("the first call fails"),
        }
        assert_eq!(simulate("+447700900123", 1), Simulated::Accept);
    }

    #[tokio::test]
    async fn an_accepted_text_owes_a_receipt_and_counts_are_per_message() {
        let inbox = InboxProvider::default();
        let mut receipts = inbox.take_receipts().expect("first take");
        assert!(inbox.take_receipts().is_none(), "taken once");
        let to = PhoneNumber::parse("+15005550500", None).expect("valid");
        let sms = |id| OutboundSms {
            message_id: id,
            to: &to,
            sender: None,
            body: "hello",
            validity: None,
        };
        let (one, two) = (Uuid::new_v4(), Uuid::new_v4());
        assert!(inbox.send(&sms(one)).await.is_err());
        assert!(inbox.send(&sms(two)).await.is_err());
        assert!(inbox.send(&sms(one)).await.is_err());
        let accepted = inbox.send(&sms(one)).await.expect("third call");
        assert_eq!(accepted.provider_message_id, format!("inbox-{one}"));
        let owed = receipts.try_recv().expect("a receipt is owed");
        assert_eq!(owed.provider_message_id, accepted.provider_message_id);
        assert!(receipts.try_recv().is_err(), "failed calls owe none");
    }
}
