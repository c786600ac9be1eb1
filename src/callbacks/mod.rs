//! What the providers' callbacks do to the log, whichever provider sent them: a delivery
//! receipt moves its message forward (never back) and records the opt-out it may carry;
//! an inbound opt-out or opt-in keyword changes the sender's opt-out, and any other
//! inbound text is kept as a reply and published; each once per inbound message. The
//! adapters read and verify the requests (`provider::*::callbacks`); `http` only carries
//! them here; the development inbox posts its simulated receipts through the same path.

mod inbox;

pub use inbox::post_inbox_receipts;

use std::sync::Arc;

use tokio::sync::watch;
use uuid::Uuid;

use crate::{
    config::{InboundSettings, Keyword},
    metrics::{Metrics, ReceiptLabels},
    phone::PhoneNumber,
    provider::{Gateways, InboundText, ReceiptReport},
    store::{NewReply, OptOutChange, Receipt, ReceiptApplied, Store, StoreError},
};

/// What the callbacks share.
#[derive(Clone)]
pub struct Callbacks {
    pub gateways: Arc<Gateways>,
    /// `None` until the database is first reached.
    pub store: watch::Receiver<Option<Store>>,
    pub metrics: Arc<Metrics>,
    /// Which inbound texts are keywords, and how far back a reply looks for the message
    /// it answers.
    pub inbound: InboundSettings,
}

/// Why a callback could not be applied. Whoever sent it should try again, except after
/// [`CallbackError::Invalid`], which the same request will always get.
#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    #[error("the database has not been reached yet")]
    NotReady,
    #[error("could not record the callback: {0}")]
    Store(#[from] StoreError),
    #[error("could not record the opt-out of a receipt: {0}")]
    OptOut(StoreError),
    /// The text cannot be kept as it stands.
    #[error("{0}")]
    Invalid(&'static str),
}

/// The longest inbound text kept, in characters: as long as the longest we send.
pub const MAX_INBOUND_CHARS: usize = 1_600;

/// What an inbound text turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    /// An opt-out or opt-in, applied (or applied before: a replay).
    Keyword(Keyword),
    /// A reply, kept (`None`: kept before, a replay).
    Reply(Option<Uuid>),
}

impl Callbacks {
    fn store(&self) -> Result<Store, CallbackError> {
        self.store.borrow().clone().ok_or(CallbackError::NotReady)
    }

    /// Applies a provider's receipt once: one with a replay key already claimed changes
    /// nothing. The key is claimed before the receipt is applied, and given back if it
    /// could not be, so that the provider's retry goes through.
    pub async fn receive_receipt(&self, report: &ReceiptReport) -> Result<(), CallbackError> {
        if let Some(key) = &report.replay_key
            && !self.claim(report.provider, key).await?
        {
            return Ok(());
        }
        let receipt = report.receipt();
        let applied = match self.apply_receipt(&receipt).await {
            Ok(applied) => applied,
            Err(e) => {
                if let Some(key) = &report.replay_key {
                    self.release(report.provider, key).await;
                }
                return Err(e);
            }
        };
        match applied {
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

    /// An inbound text, from a provider's webhook or the development inbox: an opt-out or
    /// opt-in keyword changes the sender's opt-out; any other text is kept as a reply and
    /// published. Each is applied once per provider message id: a provider's signature
    /// may carry no time, so a captured request stays valid for ever, and a replayed
    /// START must not undo a STOP sent after it.
    pub async fn receive_inbound(&self, text: &InboundText) -> Result<Inbound, CallbackError> {
        let chars = text.body.trim().chars().count();
        if chars == 0 {
            return Err(CallbackError::Invalid("the text is empty\n"));
        }
        if text.body.chars().count() > MAX_INBOUND_CHARS {
            return Err(CallbackError::Invalid(
                "the text is longer than 1,600 characters\n",
            ));
        }
        match self.inbound.keywords.classify(&text.body) {
            Some(word) => {
                self.apply_keyword(text, word).await?;
                Ok(Inbound::Keyword(word))
            }
            None => self.keep_reply(text).await.map(Inbound::Reply),
        }
    }

    async fn apply_keyword(&self, text: &InboundText, word: Keyword) -> Result<(), CallbackError> {
        let change = match word {
            Keyword::OptOut => OptOutChange::Stop,
            Keyword::OptIn => OptOutChange::Start,
        };
        let from = &text.from;
        let applied = self
            .store()?
            .apply_inbound_keyword(text.provider, &text.provider_message_id, from, change)
            .await?;
        if applied {
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

    /// Keeps a reply, attributed to the newest message sent to its sender from the number
    /// it went to, and writes its event; `None` when it was kept before.
    async fn keep_reply(&self, text: &InboundText) -> Result<Option<Uuid>, CallbackError> {
        let gateways = self
            .gateways
            .answerable(text.provider, &text.to, &text.signed_by);
        let recorded = self
            .store()?
            .record_reply(&NewReply {
                from: &text.from,
                to: &text.to,
                body: &text.body,
                provider: text.provider,
                provider_message_id: &text.provider_message_id,
                gateways: &gateways,
                window: self.inbound.reply_window,
            })
            .await?;
        let Some(recorded) = recorded else {
            tracing::warn!(
                from = %text.from.masked(),
                provider = text.provider,
                "a reply already kept came again (a replay?); changed nothing"
            );
            return Ok(None);
        };
        let attributed = recorded.in_reply_to.is_some();
        self.metrics.count_reply(text.provider, attributed);
        tracing::info!(
            from = %text.from.masked(),
            reply_id = %recorded.id,
            school_id = ?recorded.school_id,
            in_reply_to = ?recorded.in_reply_to,
            "reply kept"
        );
        Ok(Some(recorded.id))
    }

    /// Claims a webhook for applying; `false` when it was applied before (a replay:
    /// nothing is changed).
    async fn claim(&self, provider: &str, webhook_id: &str) -> Result<bool, CallbackError> {
        let claimed = self.store()?.claim_webhook(provider, webhook_id).await?;
        if !claimed {
            tracing::warn!(
                provider,
                "a webhook already applied came again (a replay?); changed nothing"
            );
        }
        Ok(claimed)
    }

    /// Gives back the claim of a webhook that failed. Failing here makes the provider's
    /// retry of that receipt change nothing, which the log shows.
    async fn release(&self, provider: &str, webhook_id: &str) {
        if let Ok(store) = self.store()
            && let Err(e) = store.release_webhook(provider, webhook_id).await
        {
            tracing::warn!(error = %e, provider, "could not release the claim of a failed webhook");
        }
    }
}
