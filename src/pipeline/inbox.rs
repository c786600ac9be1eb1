//! The development inbox's copy of each message its provider handles, kept whatever the
//! outcome (sent, suppressed, expired, failed), so that a developer sees every text and
//! why it would not go out.

use super::{Abandoned, Message, MessageLog, Pipeline};
use crate::{policy::Decision, provider::Route, school::SchoolSettings, store::InboxCopy};

impl<L: MessageLog> Pipeline<L> {
    /// Keeps the inbox's copy of `message` when its provider is an inbox: the body (the
    /// log drops a login code's once it has an outcome) and the sender that applies. Only
    /// an inbox provider, which production refuses, leads here.
    pub(super) async fn keep_in_inbox(
        &self,
        message: &Message<'_>,
        decision: &Decision<Route>,
        settings: Option<&SchoolSettings>,
    ) -> Result<(), Abandoned> {
        let inbox = self
            .gateways
            .get(message.label)
            .is_some_and(|gateway| gateway.provider.inbox().is_some());
        if !inbox {
            return Ok(());
        }
        let sender = match decision {
            Decision::Send { sender, .. } => sender.as_ref().map(|s| s.as_str()),
            // Not sent: the sender it would have had, as the school's settings give it.
            _ => settings.and_then(|s| s.sender_id.as_deref()).map(str::trim),
        };
        let copy = InboxCopy {
            message_id: message.job.id,
            body: &message.job.body,
            sender,
        };
        self.persist(message.abandon, || self.log.keep_in_inbox(&copy))
            .await
    }
}
