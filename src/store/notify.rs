//! `LISTEN`: a connection of its own that hears PostgreSQL's notifications.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_postgres::{AsyncMessage, Client};

use super::{StoreError, connect::RawConnection, connect::quote_identifier};

/// How long the listening connection may take to answer a check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Notifications of one channel. Dropping it closes the connection.
#[derive(Debug)]
pub(crate) struct Listener {
    client: Client,
    payloads: mpsc::UnboundedReceiver<Result<String, tokio_postgres::Error>>,
    driver: JoinHandle<()>,
}

impl Listener {
    pub(crate) async fn start(
        (client, connection): (Client, RawConnection),
        channel: &str,
    ) -> Result<Self, StoreError> {
        let (tx, payloads) = mpsc::unbounded_channel();
        let driver = tokio::spawn(drive(connection, tx));
        let listener = Listener {
            client,
            payloads,
            driver,
        };
        listener
            .client
            .batch_execute(&format!("LISTEN {}", quote_identifier(channel)))
            .await?;
        Ok(listener)
    }

    /// The next notification's payload. An error when the connection is gone: whatever
    /// was announced from then on is lost.
    pub(crate) async fn recv(&mut self) -> Result<String, StoreError> {
        match self.payloads.recv().await {
            Some(Ok(payload)) => Ok(payload),
            Some(Err(e)) => Err(e.into()),
            None => Err(StoreError::Corrupt(
                "the listening connection closed".into(),
            )),
        }
    }

    /// Whether the connection still answers: one that went silent (no error, no reset)
    /// would otherwise wait for notifications for ever.
    pub(crate) async fn check(&self) -> Result<(), StoreError> {
        tokio::time::timeout(CHECK_TIMEOUT, self.client.batch_execute("SELECT 1"))
            .await
            .map_err(|_| StoreError::Timeout(CHECK_TIMEOUT))??;
        Ok(())
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Polls the connection (which also carries the client's statements) and passes the
/// notifications on; ends with the connection, its error passed on last.
async fn drive(
    mut connection: RawConnection,
    tx: mpsc::UnboundedSender<Result<String, tokio_postgres::Error>>,
) {
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(message) = messages.next().await {
        match message {
            Ok(AsyncMessage::Notification(n)) => {
                if tx.send(Ok(n.payload().to_owned())).is_err() {
                    return;
                }
            }
            Ok(AsyncMessage::Notice(notice)) => {
                tracing::debug!(notice = %notice, "database notice on the listening connection");
            }
            Ok(_) => {}
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        }
    }
}
