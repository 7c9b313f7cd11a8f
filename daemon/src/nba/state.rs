//! How next-best-action state is stored: postcard in a versioned envelope.
//!
//! Everything the writer thread keeps across restarts (learner arms,
//! contact state, open instances, statistic totals) goes to LMDB as bytes.
//! postcard is not self-describing, so each stored type is wrapped in a
//! top-level enum whose discriminant is the format version (the first
//! byte): a later format is a new variant, and values written by an older
//! daemon still decode.

use serde::{Deserialize, Serialize};

use super::instance::OfferInstance;
use super::learner::Arm;
use super::policy::{CustomerContact, OfferContact};
use super::stats::{Attribution, OfferCounters};

/// What is kept per (customer, offer): the contact limits' memory and the
/// latest decision, for conversion attribution.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferState {
    pub contact: OfferContact,
    pub attribution: Option<Attribution>,
}

/// Why stored state could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot encode next-best-action state: {0}")]
    Encode(postcard::Error),
    #[error("stored next-best-action state does not decode: {0}")]
    Decode(postcard::Error),
}

/// A type that is stored as versioned bytes.
pub trait Persist: Sized {
    fn to_bytes(&self) -> Result<Vec<u8>, StateError>;
    fn from_bytes(bytes: &[u8]) -> Result<Self, StateError>;
}

/// Writes version 1 of any envelope without cloning the value: postcard
/// encodes a variant by its index, so this is byte for byte what the
/// owning `V1` variant would give.
#[derive(Serialize)]
enum AsV1<'a, T> {
    V1(&'a T),
}

macro_rules! envelope {
    ($(#[$doc:meta])* $stored:ident($ty:ty)) => {
        $(#[$doc])*
        #[derive(Debug, Serialize, Deserialize)]
        pub enum $stored {
            V1($ty),
        }

        impl Persist for $ty {
            fn to_bytes(&self) -> Result<Vec<u8>, StateError> {
                postcard::to_allocvec(&AsV1::V1(self)).map_err(StateError::Encode)
            }

            fn from_bytes(bytes: &[u8]) -> Result<$ty, StateError> {
                match postcard::from_bytes::<$stored>(bytes).map_err(StateError::Decode)? {
                    $stored::V1(value) => Ok(value),
                }
            }
        }
    };
}

envelope!(
    /// A learner arm, per (offer, version, segment).
    StoredArm(Arm)
);
envelope!(
    /// A customer's site-wide contact state.
    StoredCustomerContact(CustomerContact)
);
/// Per (customer, offer) state. Version 2 added the decision's instance
/// id to the attribution; version 1 values decode with an empty one.
#[derive(Debug, Deserialize)]
enum StoredOfferState {
    V1(OfferStateV1),
    V2(OfferState),
}

/// [`OfferState`] as version 1 stored it.
#[derive(Debug, Deserialize)]
struct OfferStateV1 {
    contact: OfferContact,
    attribution: Option<AttributionV1>,
}

#[derive(Debug, Deserialize)]
struct AttributionV1 {
    decided_ms: i64,
    group: super::stats::Group,
    converted: bool,
}

/// The version byte [`OfferState`] is written with: postcard encodes the
/// envelope's variant index as a varint, one byte below 128.
const OFFER_STATE_V2: u8 = 1;

impl Persist for OfferState {
    fn to_bytes(&self) -> Result<Vec<u8>, StateError> {
        postcard::to_extend(self, vec![OFFER_STATE_V2]).map_err(StateError::Encode)
    }

    fn from_bytes(bytes: &[u8]) -> Result<OfferState, StateError> {
        match postcard::from_bytes::<StoredOfferState>(bytes).map_err(StateError::Decode)? {
            StoredOfferState::V1(old) => Ok(OfferState {
                contact: old.contact,
                attribution: old.attribution.map(|a| Attribution {
                    decided_ms: a.decided_ms,
                    group: a.group,
                    converted: a.converted,
                    instance: String::new(),
                }),
            }),
            StoredOfferState::V2(state) => Ok(state),
        }
    }
}
envelope!(
    /// An offer instance, open or closed, until its expiry.
    StoredInstance(OfferInstance)
);
envelope!(
    /// An offer version's statistic totals.
    StoredCounters(OfferCounters)
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nba::instance::Closed;
    use crate::nba::stats::Group;
    use crate::nba::Outcome;

    #[track_caller]
    fn round_trip<T: Persist + PartialEq + std::fmt::Debug>(value: T) {
        round_trip_version(value, 0);
    }

    #[track_caller]
    fn round_trip_version<T: Persist + PartialEq + std::fmt::Debug>(value: T, version: u8) {
        let bytes = value.to_bytes().unwrap_or_default();
        assert_eq!(bytes.first(), Some(&version), "version byte first");
        match T::from_bytes(&bytes) {
            Ok(back) => assert_eq!(back, value),
            Err(e) => panic!("{e}"),
        }
    }

    /// Offer state written before attributions named their decision
    /// still decodes: the same contact and attribution, no instance.
    #[test]
    fn version_1_offer_state_decodes_without_an_instance() {
        let contact = OfferContact {
            shown_ms: vec![5, 9],
            open_until_ms: None,
            closed_ms: Some(12),
            ignores_in_row: 1,
        };
        // Variant 0, then the fields in order; the attribution is an
        // option of (decided_ms, group, converted).
        let v1 = postcard::to_allocvec(&(0u8, &contact, Some((5i64, Group::Treated, true))))
            .unwrap_or_default();
        match OfferState::from_bytes(&v1) {
            Ok(state) => assert_eq!(
                state,
                OfferState {
                    contact,
                    attribution: Some(Attribution {
                        decided_ms: 5,
                        group: Group::Treated,
                        converted: true,
                        instance: String::new(),
                    }),
                }
            ),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn every_stored_type_round_trips_with_a_version_byte() {
        round_trip(Arm {
            successes: 3,
            failures: 70,
        });
        round_trip(CustomerContact {
            shown_ms: vec![1, 2, 3],
            last_accept_ms: Some(9),
        });
        round_trip_version(
            OfferState {
                contact: OfferContact {
                    shown_ms: vec![5],
                    open_until_ms: Some(300_005),
                    closed_ms: None,
                    ignores_in_row: 2,
                },
                attribution: Some(Attribution::new(5, Group::Control, "arena-01.7".into())),
            },
            OFFER_STATE_V2,
        );
        round_trip(OfferInstance {
            id: "arena-01.1".to_owned(),
            customer: "fan-1".to_owned(),
            offer: "team-a-jersey".to_owned(),
            version: 1,
            segment: "all".to_owned(),
            trigger: "match.chance_missed".to_owned(),
            score: 3.75,
            decided_ms: 1,
            expires_ms: 300_001,
            payload: r#"{"discount":10}"#.to_owned(),
            escalations: 1,
            shared_with: vec!["friend".to_owned()],
            closed: Some(Closed {
                outcome: Outcome::Accepted,
                at_ms: 2,
            }),
        });
        let mut counters = OfferCounters::default();
        counters.record_decision(Group::Treated);
        round_trip(counters);
    }

    #[test]
    fn the_borrowed_writer_matches_the_owning_envelope() {
        let arm = Arm {
            successes: 1,
            failures: 2,
        };
        let owned = postcard::to_allocvec(&StoredArm::V1(arm)).unwrap_or_default();
        assert_eq!(arm.to_bytes().unwrap_or_default(), owned);
    }

    #[test]
    fn damaged_bytes_are_an_error() {
        assert!(matches!(Arm::from_bytes(&[]), Err(StateError::Decode(_))));
        assert!(matches!(
            Arm::from_bytes(&[7, 1, 1]),
            Err(StateError::Decode(_))
        ));
        assert!(OfferInstance::from_bytes(&[0, 200]).is_err());
    }
}
