//! A provider that answers as a unit test scripts it, and remembers who it was asked to
//! text.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use super::{
    Accepted, Gateway, Gateways, InboxProvider, Lookup, OutboundSms, Provider, ProviderError,
    circuit::Circuit, pace::Pace,
};
use crate::config::{ProviderKindSettings, ProviderSettings};

#[derive(Debug, Default)]
struct Script {
    sends: VecDeque<Result<Accepted, ProviderError>>,
    lookups: VecDeque<Lookup>,
    /// Each call's recipient, in order.
    calls: Vec<String>,
}

/// Accepts every text unless told otherwise; offers no lookup unless told otherwise.
#[derive(Debug, Clone, Default)]
pub struct Scripted(Arc<Mutex<Script>>);

impl Scripted {
    fn script(&self) -> MutexGuard<'_, Script> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The answers to the next calls, in order.
    pub fn answer(&self, answers: impl IntoIterator<Item = Result<Accepted, ProviderError>>) {
        self.script().sends.extend(answers);
    }

    /// The answers to the next lookups, in order.
    pub fn look_up(&self, answers: impl IntoIterator<Item = Lookup>) {
        self.script().lookups.extend(answers);
    }

    /// The recipients of the calls made so far.
    pub fn calls(&self) -> Vec<String> {
        self.script().calls.clone()
    }

    pub(super) fn send(&self, sms: &OutboundSms<'_>) -> Result<Accepted, ProviderError> {
        let mut script = self.script();
        script.calls.push(sms.to.as_str().to_owned());
        let n = script.calls.len();
        script.sends.pop_front().unwrap_or_else(|| {
            Ok(Accepted {
                provider_message_id: format!("SM{n:032}"),
                http_status: Some(201),
            })
        })
    }

    pub(super) fn lookup(&self) -> Lookup {
        self.script()
            .lookups
            .pop_front()
            .unwrap_or(Lookup::Unsupported)
    }
}

/// A gateway for unit tests: `provider`, named `name`, recorded as `kind`.
fn test_gateway(
    name: &'static str,
    provider: Provider,
    kind: ProviderKindSettings,
    threshold: u32,
) -> Arc<Gateway> {
    Arc::new(Gateway {
        name,
        provider,
        circuit: Circuit::new(
            name,
            threshold,
            Duration::from_secs(30),
            Duration::from_secs(20),
        ),
        pace: Pace::unlimited(),
        calls: tokio::sync::Semaphore::new(8),
        settings: ProviderSettings {
            name: name.to_owned(),
            kind,
            rate: None,
        },
    })
}

impl Gateways {
    /// One development inbox, `inbox`.
    pub(crate) fn inbox() -> Gateways {
        let inbox = Provider::Inbox(InboxProvider::default());
        Gateways {
            all: vec![test_gateway("inbox", inbox, ProviderKindSettings::Inbox, 5)],
            default: 0,
        }
    }

    /// Gateways of scripted providers, the first the default; each circuit opens after
    /// `threshold` outage-like failures in a row.
    pub(crate) fn scripted(providers: &[(&'static str, &Scripted)], threshold: u32) -> Gateways {
        let all = providers
            .iter()
            .map(|(name, script)| {
                let scripted = Provider::Scripted((*script).clone());
                test_gateway(name, scripted, ProviderKindSettings::Log, threshold)
            })
            .collect();
        Gateways { all, default: 0 }
    }
}
