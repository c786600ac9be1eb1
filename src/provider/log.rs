//! The development provider: nothing is sent. The pipeline's outcome line ("sent via
//! log", with the masked number) is the only trace, so a development daemon shows what it
//! would have sent without ever reaching a phone.

use super::{Accepted, OutboundSms, ProviderError};

#[derive(Debug, Clone, Default)]
pub struct LogProvider;

impl LogProvider {
    pub async fn send(&self, sms: &OutboundSms<'_>) -> Result<Accepted, ProviderError> {
        Ok(Accepted {
            provider_message_id: format!("log-{}", sms.message_id),
            http_status: None,
        })
    }
}
