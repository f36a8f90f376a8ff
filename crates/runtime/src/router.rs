//! The router: which tier runs a request, and why.
//!
//! Isolates first: they start in about a millisecond and hold nothing. The
//! container tier takes what an isolate cannot do ([`Needs::isolate_can`]),
//! and what an isolate answered with needs-escalation (see `sandbox.rs`). A
//! sandbox's [`TierPreference`] can pin either tier.

use airlock_core::{Needs, TierKind};

use crate::config::TierPreference;
use crate::error::{Error, Result};

/// Where a request runs and the reason, as the outcome reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub tier: TierKind,
    pub reason: &'static str,
}

/// Picks the tier for a request with `needs` in a sandbox that prefers `preference`.
pub fn route(needs: &Needs, preference: TierPreference) -> Result<Route> {
    match (preference, needs.container_reason()) {
        (TierPreference::Container, _) => {
            Ok(Route { tier: TierKind::Container, reason: "the sandbox runs everything in its container" })
        }
        (TierPreference::Auto, None) | (TierPreference::Isolate, None) => {
            Ok(Route { tier: TierKind::Isolate, reason: "an isolate can run it" })
        }
        (TierPreference::Auto, Some(reason)) => Ok(Route { tier: TierKind::Container, reason }),
        (TierPreference::Isolate, Some(reason)) => Err(Error::TierNotAllowed {
            what: reason.trim_end_matches(" needs a full Linux").to_string(),
            needed: TierKind::Container,
            allowed: TierKind::Isolate,
        }),
    }
}

#[cfg(test)]
mod tests {
    use airlock_core::{ExecRequest, Language};

    use super::*;

    #[test]
    fn isolates_first_containers_when_needed() {
        let guest = route(&Needs::of_exec(&ExecRequest::new("tool.wasm")), TierPreference::Auto).unwrap();
        assert_eq!(guest.tier, TierKind::Isolate);
        let code = route(&Needs::of_code(Language::Python), TierPreference::Auto).unwrap();
        assert_eq!(code.tier, TierKind::Isolate);
        let git = route(&Needs::of_exec(&ExecRequest::new("git").args(["log"])), TierPreference::Auto).unwrap();
        assert_eq!(git, Route { tier: TierKind::Container, reason: "git needs a full Linux" });
    }

    #[test]
    fn a_preference_pins_the_tier() {
        let pinned = route(&Needs::of_code(Language::Python), TierPreference::Container).unwrap();
        assert_eq!(pinned.tier, TierKind::Container);
        let refused = route(&Needs::of_exec(&ExecRequest::new("bash")), TierPreference::Isolate).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "a shell needs the container tier, and this sandbox is limited to the isolate tier"
        );
    }
}
