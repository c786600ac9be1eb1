//! A configured provider as the pipeline calls it: the adapter, its circuit breaker,
//! its pace and its call slots.

use std::sync::Arc;

use tokio::sync::watch;

use super::{
    Provider, ProviderSetupError,
    circuit::Circuit,
    clock::{Rate, SharedClock},
    pace::{Gates, Pace},
};
use crate::{
    config::{ProviderKindSettings, ProviderSettings, Settings, TwilioSender},
    store::Store,
};

/// The clock of `SMSGW_RATE_LIMIT`, which every gateway's calls count against.
const ACCOUNT_CLOCK: &str = "account";

/// A configured provider: its name (as recorded in the log), its adapter and its
/// circuit breaker.
#[derive(Debug)]
pub struct Gateway {
    pub name: &'static str,
    pub provider: Provider,
    pub circuit: Circuit,
    /// How fast this gateway may be called.
    pub pace: Pace,
    /// How many calls may be in flight to it at once: each holds an HTTP/1.1 connection
    /// (about 28 KB of buffers), so this bounds the memory a burst can take.
    pub calls: tokio::sync::Semaphore,
    pub settings: ProviderSettings,
}

/// Every configured gateway, by name.
#[derive(Debug)]
pub struct Gateways {
    pub(super) all: Vec<Arc<Gateway>>,
    pub(super) default: usize,
}

impl Gateways {
    /// The gateways of `settings`, each rate kept by this process alone (tests and
    /// tools).
    pub fn from_settings(settings: &Settings) -> Result<Self, ProviderSetupError> {
        Self::build(settings, None)
    }

    /// The gateways of `settings`, each rate shared with every replica through the
    /// store, once `store` holds one.
    pub fn shared(
        settings: &Settings,
        store: watch::Receiver<Option<Store>>,
    ) -> Result<Self, ProviderSetupError> {
        Self::build(settings, Some(store))
    }

    fn build(
        settings: &Settings,
        store: Option<watch::Receiver<Option<Store>>>,
    ) -> Result<Self, ProviderSetupError> {
        let public_url = settings.http.public_url.as_deref();
        let settings = &settings.delivery;
        let mut all = Vec::new();
        // One process-wide limit, shared by every gateway.
        let global = settings
            .rate_limit
            .map(|rate| Arc::new(Gates::per_second(rate)));
        for provider in &settings.providers {
            // A handful of names, made once at start-up: they label metrics for the
            // process's whole life.
            let name: &'static str = Box::leak(provider.name.clone().into_boxed_str());
            all.push(Arc::new(Gateway {
                name,
                provider: Provider::new(provider, public_url, settings.provider_timeout)?,
                circuit: Circuit::new(
                    name,
                    settings.circuit_threshold,
                    settings.circuit_cooldown,
                    settings.provider_timeout * 2,
                ),
                pace: pace(provider, settings.rate_limit, global.clone(), store.clone()),
                calls: tokio::sync::Semaphore::new(settings.provider_concurrency as usize),
                settings: provider.clone(),
            }));
        }
        let default = all
            .iter()
            .position(|g| g.name == settings.default_provider)
            .ok_or_else(|| ProviderSetupError {
                provider: settings.default_provider.clone(),
                reason: "no such provider is configured".into(),
            })?;
        Ok(Gateways { all, default })
    }

    pub fn default_gateway(&self) -> &Arc<Gateway> {
        &self.all[self.default]
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Gateway>> {
        self.all.iter().find(|g| g.name == name)
    }

    pub fn all(&self) -> &[Arc<Gateway>] {
        &self.all
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.all.iter().map(|g| g.name).collect()
    }

    /// The gateways whose messages a text to our number `to`, through a provider of type
    /// `kind` signed by `signed_by` (empty: not signed), may answer: those of that type,
    /// among the signers, that send from `to`; when none does (a messaging service's
    /// pool, a school's own number), every one of them.
    pub fn answerable(&self, kind: &str, to: &str, signed_by: &[String]) -> Vec<&'static str> {
        let of_kind: Vec<&Arc<Gateway>> = self
            .all
            .iter()
            .filter(|g| g.settings.type_name() == kind)
            .filter(|g| signed_by.is_empty() || signed_by.iter().any(|s| s == g.name))
            .collect();
        let from_to: Vec<&'static str> = of_kind
            .iter()
            .filter(|g| default_sender(&g.settings).is_some_and(|from| same_number(from, to)))
            .map(|g| g.name)
            .collect();
        if from_to.is_empty() {
            of_kind.iter().map(|g| g.name).collect()
        } else {
            from_to
        }
    }
}

/// The number or sender ID a provider sends from when a school names none.
fn default_sender(settings: &ProviderSettings) -> Option<&str> {
    match &settings.kind {
        ProviderKindSettings::Twilio(t) => match &t.sender {
            TwilioSender::From(from) => Some(from),
            TwilioSender::MessagingService(_) => None,
        },
        ProviderKindSettings::Vonage(v) => Some(&v.from),
        ProviderKindSettings::Log | ProviderKindSettings::Inbox => None,
    }
}

/// Whether two ways of writing a number are the same number (`+447700900000`,
/// `447700900000`).
fn same_number(a: &str, b: &str) -> bool {
    let digits = |s: &str| s.chars().filter(char::is_ascii_digit).collect::<String>();
    !digits(a).is_empty() && digits(a) == digits(b)
}

/// A gateway's pace: with a store, every rate it is held to is the account's.
fn pace(
    provider: &ProviderSettings,
    account_rate: Option<u32>,
    global: Option<Arc<Gates>>,
    store: Option<watch::Receiver<Option<Store>>>,
) -> Pace {
    let rates: Vec<Rate> = provider
        .rate
        .map(|rate| Rate {
            clock: format!("provider:{}", provider.name),
            per_second: rate,
        })
        .into_iter()
        .chain(account_rate.map(|rate| Rate {
            clock: ACCOUNT_CLOCK.to_owned(),
            per_second: rate,
        }))
        .collect();
    match store {
        Some(store) if !rates.is_empty() => {
            Pace::shared(provider.rate, global, SharedClock::new(&rates, store))
        }
        _ => Pace::new(provider.rate, global),
    }
}
