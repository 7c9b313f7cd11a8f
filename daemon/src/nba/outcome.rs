//! What a customer did with a shown offer, or what became of it.
//!
//! One enum serves the event types the app sends, the learner, the
//! contact policy and the statistics, so they can never disagree about
//! what, say, an expiry is. The names are the ones `offer_outcome`
//! records carry.

use serde::{Deserialize, Serialize};

/// How an offer instance ended, or something that happened to it while
/// open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// `offer.accepted`: the customer took the offer. Closes the instance.
    Accepted,
    /// `offer.dismissed`: the customer said no. Closes the instance.
    Dismissed,
    /// `offer.clicked`: the customer looked closer; the instance stays open.
    Clicked,
    /// `offer.shared`: the customer passed it to a friend; stays open.
    Shared,
    /// Nobody answered before `expires_after`. Closes the instance.
    Expired,
    /// A configured conversion event followed the decision in its window.
    Converted,
}

impl Outcome {
    /// The name in records and statistics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Dismissed => "dismissed",
            Outcome::Clicked => "clicked",
            Outcome::Shared => "shared",
            Outcome::Expired => "expired",
            Outcome::Converted => "converted",
        }
    }

    /// The outcome an app event type reports; `None` for other types.
    /// Expiry and conversion are never sent by the app: the site decides
    /// them.
    pub fn from_event_type(kind: &str) -> Option<Outcome> {
        match kind {
            "offer.accepted" => Some(Outcome::Accepted),
            "offer.dismissed" => Some(Outcome::Dismissed),
            "offer.clicked" => Some(Outcome::Clicked),
            "offer.shared" => Some(Outcome::Shared),
            _ => None,
        }
    }

    /// Whether the instance is over after this.
    pub const fn closes(self) -> bool {
        matches!(
            self,
            Outcome::Accepted | Outcome::Dismissed | Outcome::Expired
        )
    }

    /// Whether this counts as the customer ignoring the offer (for
    /// `stop_after_ignores`).
    pub const fn is_ignore(self) -> bool {
        matches!(self, Outcome::Dismissed | Outcome::Expired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_events_map_and_site_outcomes_do_not() {
        for o in [
            Outcome::Accepted,
            Outcome::Dismissed,
            Outcome::Clicked,
            Outcome::Shared,
        ] {
            let kind = format!("offer.{}", o.as_str());
            assert_eq!(Outcome::from_event_type(&kind), Some(o));
        }
        assert_eq!(Outcome::from_event_type("offer.expired"), None);
        assert_eq!(Outcome::from_event_type("offer.converted"), None);
        assert_eq!(Outcome::from_event_type("fan.cheer"), None);
    }

    #[test]
    fn closing_and_ignoring() {
        assert!(Outcome::Accepted.closes() && !Outcome::Accepted.is_ignore());
        assert!(Outcome::Dismissed.closes() && Outcome::Dismissed.is_ignore());
        assert!(Outcome::Expired.closes() && Outcome::Expired.is_ignore());
        assert!(!Outcome::Clicked.closes() && !Outcome::Shared.closes());
        assert!(!Outcome::Converted.closes());
    }
}
