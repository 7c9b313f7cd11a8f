//! The loaded offers, compiled and indexed for the writer thread.
//!
//! A reload swaps the whole catalog between two commits, so one event is
//! decided entirely with the old offers or entirely with the new. Events
//! meet only the offers that name their type (as a trigger, an escalation
//! or a conversion), and every CEL expression is compiled here, once, on
//! a thread with a deep stack, never on the hot path.

use std::collections::HashMap;

use edge_config::{nba_defaults, NbaPolicy, Offer, OnExpiry};

use super::control::ControlGroup;
use super::expr::{self, Expr};
use super::policy::{OfferLimits, SiteLimits};

/// Stack for compiling expressions: the CEL parser recurses per level.
const COMPILE_STACK: usize = 64 * 1024 * 1024;

/// One offer with its compiled expressions and limits.
#[derive(Debug)]
pub struct CompiledOffer {
    pub offer: Offer,
    /// The payload new instances show, as JSON text.
    pub payload: String,
    pub limits: OfferLimits,
    pub audience: Option<Expr>,
    pub weight: Option<Expr>,
    /// The offer's `segment`, else the site's `nba.segment`.
    pub segment: Option<Expr>,
    pub escalate_when: Option<Expr>,
    pub conversion_when: Option<Expr>,
}

/// Every offer of the site plus the site-wide policy.
pub struct Catalog {
    pub offers: Vec<CompiledOffer>,
    by_trigger: HashMap<String, Vec<usize>>,
    /// Per trigger type, the profile fields that decide which of its
    /// offers a customer gets and with what segment and weight (always
    /// including `consent`), or `None` when an expression reads more.
    deciding_fields: HashMap<String, Option<Vec<String>>>,
    by_escalation: HashMap<String, Vec<usize>>,
    by_conversion: HashMap<String, Vec<usize>>,
    by_id: HashMap<String, usize>,
    /// Whether any offer expression reads `progress`.
    reads_progress: bool,
    pub site: SiteLimits,
    pub control: ControlGroup,
    pub top_k: usize,
    pub on_expiry: OnExpiry,
    /// The root CEL context every evaluation scope derives from.
    pub root: cel::Context<'static, 'static>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog")
            .field("offers", &self.offers.len())
            .finish()
    }
}

/// An offer expression that does not compile (the config reader should
/// have refused it already).
#[derive(Debug, thiserror::Error)]
#[error("{}:{line}: offer `{offer}`: `{field}` does not compile: {message}", file.display())]
pub struct CompileError {
    pub offer: String,
    pub file: std::path::PathBuf,
    pub line: usize,
    pub field: &'static str,
    pub message: String,
}

impl Catalog {
    /// Compiles `offers` under `policy` for site `site_id`.
    pub fn new(
        offers: &[Offer],
        policy: &NbaPolicy,
        site_id: &str,
    ) -> Result<Catalog, CompileError> {
        let compiled = compile_all(offers, policy)?;
        let mut by_trigger: HashMap<String, Vec<usize>> = HashMap::new();
        let mut by_escalation: HashMap<String, Vec<usize>> = HashMap::new();
        let mut by_conversion: HashMap<String, Vec<usize>> = HashMap::new();
        let mut by_id = HashMap::new();
        for (i, c) in compiled.iter().enumerate() {
            by_id.insert(c.offer.id.clone(), i);
            for kind in &c.offer.on {
                by_trigger.entry(kind.clone()).or_default().push(i);
            }
            if let Some(e) = &c.offer.escalate {
                for kind in &e.on {
                    by_escalation.entry(kind.clone()).or_default().push(i);
                }
            }
            if let Some(conv) = &c.offer.conversion {
                for kind in &conv.on {
                    by_conversion.entry(kind.clone()).or_default().push(i);
                }
            }
        }
        let deciding_fields = by_trigger
            .iter()
            .map(|(kind, offers)| {
                let mut fields = std::collections::BTreeSet::from(["consent".to_owned()]);
                let all_known = offers.iter().all(|&i| {
                    let c = &compiled[i];
                    [&c.audience, &c.weight, &c.segment]
                        .into_iter()
                        .flatten()
                        .all(|e| match e.profile_fields() {
                            Some(f) => {
                                fields.extend(f.iter().cloned());
                                true
                            }
                            None => false,
                        })
                });
                (
                    kind.clone(),
                    all_known.then(|| fields.into_iter().collect()),
                )
            })
            .collect();
        let reads_progress = compiled.iter().any(|c| {
            [
                &c.audience,
                &c.weight,
                &c.segment,
                &c.escalate_when,
                &c.conversion_when,
            ]
            .into_iter()
            .flatten()
            .any(Expr::reads_progress)
        });
        Ok(Catalog {
            reads_progress,
            offers: compiled,
            by_trigger,
            deciding_fields,
            by_escalation,
            by_conversion,
            by_id,
            site: SiteLimits::from_policy(policy),
            control: ControlGroup::from_policy(policy, site_id),
            top_k: usize::try_from(policy.top_k.max(1)).unwrap_or(1),
            on_expiry: policy.on_expiry,
            root: expr::root(),
        })
    }

    /// An empty catalog: no offers, nothing decided.
    pub fn empty(site_id: &str) -> Catalog {
        // No expressions to compile, so this cannot fail.
        match Catalog::new(&[], &NbaPolicy::default(), site_id) {
            Ok(c) => c,
            Err(_) => unreachable!("an empty catalog compiles nothing"),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.offers.is_empty()
    }

    /// Whether any offer expression reads the customer's `progress`.
    pub fn reads_progress(&self) -> bool {
        self.reads_progress
    }

    /// Offers triggered by an event type.
    pub fn triggered_by(&self, kind: &str) -> &[usize] {
        self.by_trigger.get(kind).map_or(&[], Vec::as_slice)
    }

    /// The profile fields that decide eligibility, segment and weight for
    /// a trigger type's offers, if that is all the offers read of a
    /// customer.
    pub fn deciding_fields(&self, kind: &str) -> Option<&[String]> {
        self.deciding_fields.get(kind)?.as_deref()
    }

    /// Offers whose open instances an event type escalates.
    pub fn escalated_by(&self, kind: &str) -> &[usize] {
        self.by_escalation.get(kind).map_or(&[], Vec::as_slice)
    }

    /// Offers for which an event type is a conversion.
    pub fn converted_by(&self, kind: &str) -> &[usize] {
        self.by_conversion.get(kind).map_or(&[], Vec::as_slice)
    }

    pub fn index_of(&self, offer: &str) -> Option<usize> {
        self.by_id.get(offer).copied()
    }

    /// Whether any offer cares about this event type.
    pub fn concerns(&self, kind: &str) -> bool {
        self.by_trigger.contains_key(kind)
            || self.by_escalation.contains_key(kind)
            || self.by_conversion.contains_key(kind)
    }
}

/// The default learner segment.
pub const DEFAULT_SEGMENT: &str = nba_defaults::SEGMENT;

fn compile_all(offers: &[Offer], policy: &NbaPolicy) -> Result<Vec<CompiledOffer>, CompileError> {
    let compile = || -> Result<Vec<CompiledOffer>, CompileError> {
        offers
            .iter()
            .map(|o| {
                let one = |field: &'static str, src: Option<&str>| {
                    src.map(|s| {
                        Expr::compile(s).map_err(|message| CompileError {
                            offer: o.id.clone(),
                            file: o.file.clone(),
                            line: o.line,
                            field,
                            message,
                        })
                    })
                    .transpose()
                };
                Ok(CompiledOffer {
                    limits: OfferLimits::from_contact(&o.contact),
                    audience: one("audience", o.audience.as_deref())?,
                    weight: one("weight", o.weight.as_deref())?,
                    segment: one(
                        "segment",
                        o.segment.as_deref().or(policy.segment.as_deref()),
                    )?,
                    escalate_when: one(
                        "escalate.when",
                        o.escalate.as_ref().and_then(|e| e.when.as_deref()),
                    )?,
                    conversion_when: one(
                        "conversion.when",
                        o.conversion.as_ref().and_then(|c| c.when.as_deref()),
                    )?,
                    payload: super::instance::payload_text(o),
                    offer: o.clone(),
                })
            })
            .collect()
    };
    let any = offers.iter().any(|o| {
        o.audience.is_some()
            || o.weight.is_some()
            || o.segment.is_some()
            || policy.segment.is_some()
            || o.escalate.as_ref().is_some_and(|e| e.when.is_some())
            || o.conversion.as_ref().is_some_and(|c| c.when.is_some())
    });
    if !any {
        return compile();
    }
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("offer-compiler".into())
            .stack_size(COMPILE_STACK)
            .spawn_scoped(s, compile);
        match handle {
            Ok(h) => h.join().unwrap_or_else(|_| {
                Err(CompileError {
                    offer: String::new(),
                    file: Default::default(),
                    line: 0,
                    field: "",
                    message: "the compiler thread panicked".into(),
                })
            }),
            // No thread: compile here, with the caller's stack.
            Err(_) => compile(),
        }
    })
}
