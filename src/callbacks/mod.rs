//! What the providers' callbacks do to the log, whichever provider sent them: a delivery
//! receipt moves its message forward (never back) and records the opt-out it may carry;
//! an inbound STOP or START changes the sender's opt-out, once per inbound message. The
//! adapters read and verify the requests (`provider::*::callbacks`); `http` only carries
//! them here; the development inbox posts its simulated receipts through the same path.

mod inbox;

pub use inbox::post_inbox_receipts;

use std::sync::Arc;

use tokio::sync::watch;

use crate::{
    metrics::{Metrics, ReceiptLabels},
    phone::PhoneNumber,
    provider::{Gateways, InboundText, ReceiptReport},
    store::{OptOutChange, Receipt, ReceiptApplied, Store, StoreError},
};

/// What the callbacks share.
#[derive(Clone)]
pub struct Callbacks {
    pub gateways: Arc<Gateways>,
    /// `None` until the database is first reached.
    pub store: watch::Receiver<Option<Store>>,
    pub metrics: Arc<Metrics>,
}

/// Why a callback could not be applied; whoever sent it should try again, except for
/// [`CallbackError::MissingId`].
#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    #[error("the database has not been reached yet")]
    NotReady,
    #[error("could not record the callback: {0}")]
    Store(#[from] StoreError),
    #[error("could not record the opt-out of a receipt: {0}")]
    OptOut(StoreError),
    /// An inbound keyword without the provider's message id cannot be applied once only.
    #[error("the inbound message has no id")]
    MissingId,
}

const STOP_WORDS: &[&str] = &[
    "STOP",
    "STOPALL",
    "UNSUBSCRIBE",
    "CANCEL",
    "END",
    "QUIT",
    "REVOKE",
    "OPTOUT",
];
const START_WORDS: &[&str] = &["START", "YES", "UNSTOP"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyword {
    Stop,
    Start,
}

/// A STOP or START keyword: the whole message, any case, surrounding spaces ignored.
pub fn keyword(body: &str) -> Option<Keyword> {
    let word = body.trim().to_ascii_uppercase();
    if STOP_WORDS.contains(&word.as_str()) {
        Some(Keyword::Stop)
    } else if START_WORDS.contains(&word.as_str()) {
        Some(Keyword::Start)
    } else {
        None
    }
}

impl Callbacks {
    fn store(&self) -> Result<Store, CallbackError> {
        self.store.borrow().clone().ok_or(CallbackError::NotReady)
    }

    /// Applies a provider's receipt once: one with a replay key already applied changes
    /// nothing.
    pub async fn receive_receipt(&self, report: &ReceiptReport) -> Result<(), CallbackError> {
        if let Some(key) = &report.replay_key
            && self.seen_before(report.provider, key).await?
        {
            return Ok(());
        }
        let receipt = report.receipt();
        match self.apply_receipt(&receipt).await? {
            Some(applied) => tracing::debug!(
                job_id = %applied.id,
                provider_status = receipt.provider_status,
                "receipt applied"
            ),
            None => tracing::info!(
                provider = receipt.provider,
                provider_message_id = receipt.provider_message_id,
                "receipt for a message not (yet) known; kept"
            ),
        }
        if let Some(key) = &report.replay_key {
            self.remember(report.provider, key).await;
        }
        Ok(())
    }

    /// Counts a receipt, keeps it, moves its message forward and records the opt-out it
    /// may carry: the one path of every receipt, a provider's webhook or the development
    /// inbox's simulated one. `None` when no sent message has its id yet (it is applied
    /// when the send's record lands).
    pub async fn apply_receipt(
        &self,
        receipt: &Receipt<'_>,
    ) -> Result<Option<ReceiptApplied>, CallbackError> {
        let store = self.store()?;
        self.metrics
            .receipts
            .get_or_create(&ReceiptLabels {
                provider: receipt.provider.to_owned(),
                status: receipt.provider_status.chars().take(30).collect(),
            })
            .inc();
        let Some(applied) = store.apply_receipt(receipt).await? else {
            return Ok(None);
        };
        self.metrics.observe_receipt_delay(receipt, &applied);
        if receipt.opted_out
            && let Ok(number) = PhoneNumber::parse(&applied.recipient, None)
        {
            store
                .add_opt_out(Some(applied.school_id), &number, "provider")
                .await
                .map_err(CallbackError::OptOut)?;
            tracing::info!(to = %number.masked(), "receipt says the recipient unsubscribed; opt-out recorded");
        }
        Ok(Some(applied))
    }

    /// Applies an inbound STOP or START from a number we can read, once per inbound
    /// message: a provider's signature may carry no time, so a captured request stays
    /// valid for ever, and a replayed START must not undo a STOP sent after it. Any other
    /// text changes nothing.
    pub async fn receive_inbound(&self, text: &InboundText) -> Result<(), CallbackError> {
        let (Some(from), Some(word)) = (&text.from, text.body.as_deref().and_then(keyword)) else {
            return Ok(());
        };
        let id = text
            .provider_message_id
            .as_deref()
            .ok_or(CallbackError::MissingId)?;
        let change = match word {
            Keyword::Stop => OptOutChange::Stop,
            Keyword::Start => OptOutChange::Start,
        };
        let store = self.store()?;
        if store
            .apply_inbound_keyword(text.provider, id, from, change)
            .await?
        {
            tracing::info!(from = %from.masked(), keyword = ?word, "inbound keyword recorded");
        } else {
            tracing::warn!(
                from = %from.masked(),
                keyword = ?word,
                "an inbound keyword already applied came again (a replay?); changed nothing"
            );
        }
        Ok(())
    }

    /// Whether a webhook was applied before (a replay: nothing is changed).
    async fn seen_before(&self, provider: &str, webhook_id: &str) -> Result<bool, CallbackError> {
        let seen = self.store()?.webhook_seen(provider, webhook_id).await?;
        if seen {
            tracing::warn!(
                provider,
                "a webhook already applied came again (a replay?); changed nothing"
            );
        }
        Ok(seen)
    }

    /// Records an applied webhook. Failing here loses only the replay check of a receipt,
    /// which never moves a message backwards anyway.
    async fn remember(&self, provider: &str, webhook_id: &str) {
        if let Ok(store) = self.store()
            && let Err(e) = store.record_webhook(provider, webhook_id).await
        {
            tracing::warn!(error = %e, "could not record an applied webhook");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_are_whole_words_in_any_case() {
        assert_eq!(keyword("stop"), Some(Keyword::Stop));
        assert_eq!(keyword("  Unsubscribe \n"), Some(Keyword::Stop));
        assert_eq!(keyword("OPTOUT"), Some(Keyword::Stop));
        assert_eq!(keyword("start"), Some(Keyword::Start));
        assert_eq!(keyword("Yes"), Some(Keyword::Start));
        assert_eq!(keyword("please stop"), None);
        assert_eq!(keyword("stopping"), None);
    }
}
