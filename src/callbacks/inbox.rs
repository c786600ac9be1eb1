//! The development inbox's simulated `delivered` receipts, posted when they fall due
//! through the same path as a provider's webhook ([`Callbacks::apply_receipt`]): kept in
//! `sms_receipts`, never moving a message backwards, applied later if the send's record
//! is not in yet.

use tokio_util::sync::CancellationToken;

use super::{CallbackError, Callbacks};
use crate::{
    provider::inbox::DueReceipt,
    store::{Receipt, Status},
};

/// Posts the receipts of every inbox gateway until `stop` fires.
pub async fn post_inbox_receipts(hooks: Callbacks, stop: CancellationToken) {
    let mut each = Vec::new();
    for gateway in hooks.gateways.all() {
        let owed = gateway
            .provider
            .inbox()
            .and_then(|inbox| inbox.take_receipts());
        if let Some(owed) = owed {
            each.push(post_owed(hooks.clone(), gateway.name, owed, stop.clone()));
        }
    }
    futures_util::future::join_all(each).await;
}

/// Posts each receipt `gateway` owes, in order, once it is due.
async fn post_owed(
    hooks: Callbacks,
    gateway: &'static str,
    mut owed: tokio::sync::mpsc::Receiver<DueReceipt>,
    stop: CancellationToken,
) {
    let signed_by = [gateway.to_owned()];
    loop {
        let next = tokio::select! {
            next = owed.recv() => next,
            () = stop.cancelled() => return,
        };
        let Some(due) = next else { return };
        tokio::select! {
            () = tokio::time::sleep_until(due.due) => {}
            () = stop.cancelled() => return,
        }
        let receipt = Receipt {
            provider: "inbox",
            provider_message_id: &due.provider_message_id,
            provider_status: "delivered",
            status: Some(Status::Delivered),
            error_code: None,
            opted_out: false,
            signed_by: &signed_by,
        };
        // As a provider does with a webhook that failed: try again, later.
        let posted = crate::retry::until_ok(
            crate::retry::reconnecting(),
            &stop,
            || hooks.apply_receipt(&receipt),
            |e: &CallbackError, wait| {
                tracing::warn!(error = %e, retry_in = ?wait, "cannot post an inbox receipt; retrying");
            },
        )
        .await;
        if posted.is_none() {
            return;
        }
    }
}
