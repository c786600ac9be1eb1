//! Which gateways a school's messages go through.

use std::sync::Arc;

use super::{Gateway, Gateways};
use crate::school::SchoolSettings;

/// The gateway to call first, and the one to fail over to.
#[derive(Debug, Clone)]
pub struct Route {
    pub primary: Arc<Gateway>,
    /// Used when the primary refuses for a reason it may not share, or its circuit is
    /// open. Never the primary itself.
    pub fallback: Option<Arc<Gateway>>,
}

impl PartialEq for Route {
    fn eq(&self, other: &Self) -> bool {
        let name = |g: &Option<Arc<Gateway>>| g.as_ref().map(|g| g.name);
        self.primary.name == other.primary.name && name(&self.fallback) == name(&other.fallback)
    }
}

/// The gateways a school's settings name (the default when none). `Err` names a provider
/// that is not configured: its messages are refused rather than sent through another.
pub fn route(settings: Option<&SchoolSettings>, gateways: &Gateways) -> Result<Route, String> {
    let named = |name: Option<&str>| -> Result<Option<Arc<Gateway>>, String> {
        match name.map(str::trim).filter(|n| !n.is_empty()) {
            None => Ok(None),
            Some(name) => gateways
                .get(name)
                .cloned()
                .map(Some)
                .ok_or_else(|| name.to_owned()),
        }
    };
    let primary = named(settings.and_then(|s| s.provider.as_deref()))?
        .unwrap_or_else(|| gateways.default_gateway().clone());
    let fallback = named(settings.and_then(|s| s.fallback_provider.as_deref()))?
        .filter(|f| !Arc::ptr_eq(f, &primary));
    Ok(Route { primary, fallback })
}
