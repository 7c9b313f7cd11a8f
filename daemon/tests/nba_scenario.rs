//! The stadium scenario's decisions, from the offer files to the
//! statistics, through the pure next-best-action core: a missed chance
//! offers the Team A jersey, a goal escalates it, expiry and dismissals
//! count as ignores until the offer stops and the next best one is shown,
//! an accept brings quiet time, and a control-group fan is only recorded.
//! Audience and consent are the caller's checks (they need the profile);
//! here they are plain conditions.

use std::collections::HashMap;
use std::path::Path;

use edge_config::{parse_offers, parse_site_config, NbaPolicy, Offer};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::json;
use touchline::nba::arbiter::{self, Candidate};
use touchline::nba::control::ControlGroup;
use touchline::nba::escalation::escalate;
use touchline::nba::instance::{instance_id, payload_text, OfferInstance};
use touchline::nba::learner::{Arm, ArmRef, Learner, Lesson};
use touchline::nba::policy::{
    self, CustomerContact, OfferContact, OfferLimits, SiteLimits, Suppression,
};
use touchline::nba::stats::{Group, StatsBook};
use touchline::nba::Outcome;

const OFFERS: &str = r#"
[[offer]]
id = "team-a-jersey"
version = 1
on = ["match.chance_missed"]
audience = "profile.team == data.team"
consent = "marketing"
value = 25.0
weight = "data.minute > 80 ? 1.5 : 1.0"
channel = "app"
expires_after = "5m"
payload = { title = "Team A jersey -10%", discount = 10 }
escalate = { on = ["match.goal"], when = "data.team == profile.team", add = { discount = 5 }, max = { discount = 25 } }
contact = { max = "1/10m", cooldown = "15m", stop_after_ignores = 3 }

[[offer]]
id = "team-a-scarf"
on = ["match.chance_missed"]
consent = "marketing"
value = 10
expires_after = "5m"
payload = { title = "Team A scarf" }
"#;

const SITE: &str = r#"
[site]
id = "arena-01"
data_dir = "data"

[nba]
max_per_customer = "3/1h"
quiet_after_accept = "10m"
top_k = 1
control_share = 0.05
"#;

const MIN: i64 = 60_000;
const T0: i64 = 1_750_000_000_000;

/// What the writer thread will own, reduced to what a decision needs.
struct Core {
    offers: Vec<Offer>,
    policy: NbaPolicy,
    site: SiteLimits,
    limits: Vec<OfferLimits>,
    control: ControlGroup,
    learner: Learner,
    rng: StdRng,
    customers: HashMap<String, CustomerContact>,
    contacts: HashMap<(String, usize), OfferContact>,
    open: HashMap<String, OfferInstance>,
    stats: StatsBook,
    counter: u64,
}

/// What one trigger did for one customer.
#[derive(Debug, PartialEq)]
enum Decided {
    Shown(String),
    Control(String),
    Nothing,
}

impl Core {
    fn new() -> Core {
        let offers = parse_offers(OFFERS, Path::new("/srv/rules/offers.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        let site = parse_site_config(SITE, Path::new("/etc/touchline/site.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        let policy = site.nba.clone();
        // Exploration off, so the scenario is about scores and policy.
        let mut learner = Learner::new(policy.prior, 0.0);
        // Earlier matches taught the learner: the jersey sells better.
        for (offer, (successes, failures)) in
            [("team-a-jersey", (30, 70)), ("team-a-scarf", (10, 90))]
        {
            learner.insert(
                ArmRef {
                    offer,
                    version: 1,
                    segment: "all",
                },
                Arm {
                    successes,
                    failures,
                },
            );
        }
        Core {
            limits: offers
                .iter()
                .map(|o| OfferLimits::from_contact(&o.contact))
                .collect(),
            site: SiteLimits::from_policy(&policy),
            control: ControlGroup::from_policy(&policy, &site.site.id),
            learner,
            policy,
            offers,
            rng: StdRng::seed_from_u64(1),
            customers: HashMap::new(),
            contacts: HashMap::new(),
            open: HashMap::new(),
            stats: StatsBook::new(T0),
            counter: 0,
        }
    }

    /// `trigger` at `now` for `fan`; `team_a` stands in for the audience
    /// expression and `consent` for the consent lookup.
    fn decide(
        &mut self,
        fan: &str,
        team_a: bool,
        consent: bool,
        trigger: &str,
        now: i64,
    ) -> Decided {
        if !consent || !team_a {
            return Decided::Nothing;
        }
        let eligible: Vec<usize> = (0..self.offers.len())
            .filter(|&i| self.offers[i].on.iter().any(|t| t == trigger))
            .collect();
        let candidates: Vec<Candidate> = eligible
            .iter()
            .map(|&i| Candidate {
                propensity: self.learner.sample(key(&self.offers, i), &mut self.rng),
                value: self.offers[i].value,
                weight: 1.0,
            })
            .collect();
        let group = if self.control.contains(fan) {
            Group::Control
        } else {
            Group::Treated
        };
        let customer = self.customers.entry(fan.to_owned()).or_default();
        let (contacts, site, limits, offers) =
            (&mut self.contacts, &self.site, &self.limits, &self.offers);
        let result = arbiter::arbitrate(&candidates, self.policy.top_k as usize, |c| {
            let i = eligible[c];
            let offer = contacts.entry((fan.to_owned(), i)).or_default();
            policy::check(site, customer, &limits[i], offer, now)?;
            let expires = now + offers[i].expires_after.as_millis() as i64;
            customer.record_shown(site, now);
            offer.record_shown(&limits[i], now, expires);
            Ok(())
        });
        for &(c, reason) in &result.suppressed {
            let o = &self.offers[eligible[c]];
            self.stats
                .update(&o.id, o.version, |s| s.record_suppressed(reason));
        }
        let Some(winner) = result.winners.first() else {
            return Decided::Nothing;
        };
        let i = eligible[winner.index];
        let offer = &self.offers[i];
        self.stats
            .update(&offer.id, offer.version, |s| s.record_decision(group));
        if group == Group::Control {
            return Decided::Control(offer.id.clone());
        }
        self.counter += 1;
        let instance = OfferInstance::open(
            offer,
            payload_text(offer),
            instance_id("arena-01", self.counter),
            fan,
            "all",
            trigger,
            winner.score,
            now,
        );
        let id = instance.id.clone();
        self.open.insert(id.clone(), instance);
        Decided::Shown(id)
    }

    /// A goal for Team A: escalates the open instances whose offer says so.
    fn goal(&mut self, now: i64) -> Vec<(String, serde_json::Value)> {
        let mut updates = Vec::new();
        for instance in self.open.values_mut() {
            let Some(offer) = self.offers.iter().find(|o| o.id == instance.offer) else {
                continue;
            };
            let Some(step) = offer.escalate.as_ref() else {
                continue;
            };
            if !instance.is_open(now) || !step.on.iter().any(|t| t == "match.goal") {
                continue;
            }
            let mut payload = instance.payload().unwrap_or_else(|e| panic!("{e}"));
            let changes = escalate(&mut payload, step).unwrap_or_else(|e| panic!("{e}"));
            if !changes.is_empty() {
                instance.set_payload(&payload);
                updates.push((instance.id.clone(), serde_json::Value::Object(payload)));
            }
        }
        updates
    }

    /// The customer answered, or the timer fired (`Outcome::Expired`).
    fn answer(&mut self, id: &str, outcome: Outcome, now: i64) {
        let Some(instance) = self.open.get_mut(id) else {
            panic!("no instance {id}");
        };
        let closed = if outcome == Outcome::Expired {
            instance.expire_if_due(now)
        } else {
            instance.close(outcome, now)
        };
        assert!(closed, "{id} closes once");
        let at = instance.closed.map_or(now, |c| c.at_ms);
        let i = self
            .offers
            .iter()
            .position(|o| o.id == instance.offer)
            .unwrap_or_else(|| panic!("offer of {id}"));
        let fan = instance.customer.clone();
        if let Some(contact) = self.contacts.get_mut(&(fan.clone(), i)) {
            contact.record_outcome(outcome, at);
        }
        if outcome == Outcome::Accepted {
            if let Some(customer) = self.customers.get_mut(&fan) {
                customer.record_accept(at);
            }
        }
        if let Some(lesson) = Lesson::from_outcome(outcome, self.policy.on_expiry) {
            self.learner.learn(key(&self.offers, i), lesson);
        }
        let offer = &self.offers[i];
        self.stats
            .update(&offer.id, offer.version, |s| s.record_outcome(outcome));
    }

    fn offer_of(&self, decided: &Decided) -> String {
        match decided {
            Decided::Shown(id) => self.open[id].offer.clone(),
            other => panic!("expected a shown offer, got {other:?}"),
        }
    }
}

/// The learner arm of offer `i`; every fan is in segment `all` here.
fn key(offers: &[Offer], i: usize) -> ArmRef<'_> {
    ArmRef {
        offer: &offers[i].id,
        version: offers[i].version,
        segment: "all",
    }
}

/// A fan on each side of the control split.
fn fans(core: &Core) -> (String, String) {
    let mut treated = None;
    let mut control = None;
    for n in 0.. {
        let fan = format!("fan-{n}");
        if core.control.contains(&fan) {
            control.get_or_insert(fan);
        } else {
            treated.get_or_insert(fan);
        }
        if let (Some(t), Some(c)) = (&treated, &control) {
            return (t.clone(), c.clone());
        }
        assert!(n < 10_000, "a 5 % control group has members");
    }
    unreachable!()
}

#[test]
fn the_match_as_the_decision_core_sees_it() {
    let mut core = Core::new();
    let (fan, held_out) = fans(&core);
    let chance = "match.chance_missed";

    // A missed chance: the Team A fan gets the jersey; others get nothing.
    let first = core.decide(&fan, true, true, chance, T0);
    assert_eq!(core.offer_of(&first), "team-a-jersey");
    assert_eq!(
        core.decide("fan-b", false, true, chance, T0),
        Decided::Nothing
    );
    assert_eq!(
        core.decide("fan-c", true, false, chance, T0),
        Decided::Nothing
    );

    // A goal while it is open raises the discount, and only while open.
    let updates = core.goal(T0 + MIN);
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].1["discount"], json!(15));
    assert_eq!(updates[0].1["title"], json!("Team A jersey -10%"));

    // Nobody answers: it expires (an ignore); two dismissals follow.
    let Decided::Shown(id) = first else {
        unreachable!()
    };
    core.answer(&id, Outcome::Expired, T0 + 6 * MIN);
    assert!(core.goal(T0 + 7 * MIN).is_empty());
    for at in [21, 41] {
        let shown = core.decide(&fan, true, true, chance, T0 + at * MIN);
        assert_eq!(core.offer_of(&shown), "team-a-jersey", "at minute {at}");
        let Decided::Shown(id) = shown else {
            unreachable!()
        };
        core.answer(&id, Outcome::Dismissed, T0 + (at + 1) * MIN);
    }

    // Three ignores: the jersey stops and the next best offer is shown.
    let next = core.decide(&fan, true, true, chance, T0 + 61 * MIN);
    assert_eq!(core.offer_of(&next), "team-a-scarf");
    let Decided::Shown(id) = next else {
        unreachable!()
    };
    core.answer(&id, Outcome::Accepted, T0 + 62 * MIN);

    // After an accept the fan gets quiet time.
    assert_eq!(
        core.decide(&fan, true, true, chance, T0 + 65 * MIN),
        Decided::Nothing
    );

    // A control-group fan is decided for but shown nothing.
    let control = core.decide(&held_out, true, true, chance, T0 + 65 * MIN);
    assert_eq!(control, Decided::Control("team-a-jersey".to_owned()));

    let records = core.stats.close_interval(T0 + 90 * MIN);
    let jersey = records
        .iter()
        .find(|r| r.offer == "team-a-jersey")
        .unwrap_or_else(|| panic!("jersey stats in {records:?}"));
    assert_eq!((jersey.decided, jersey.shown, jersey.control), (4, 3, 1));
    assert_eq!(
        (jersey.expired, jersey.dismissed, jersey.accepted),
        (1, 2, 0)
    );
    let reasons: HashMap<&str, u64> = jersey
        .suppressed
        .iter()
        .map(|(r, n)| (r.as_str(), *n))
        .collect();
    assert_eq!(
        reasons.get(Suppression::StoppedAfterIgnores.name()),
        Some(&1)
    );
    assert_eq!(reasons.get(Suppression::QuietAfterAccept.name()), Some(&1));
    let scarf = records
        .iter()
        .find(|r| r.offer == "team-a-scarf")
        .unwrap_or_else(|| panic!("scarf stats in {records:?}"));
    assert_eq!((scarf.shown, scarf.accepted), (1, 1));

    // The learner heard it all: three failures for the jersey, one
    // success for the scarf.
    let jersey_arm = core.learner.arm(ArmRef {
        offer: "team-a-jersey",
        version: 1,
        segment: "all",
    });
    assert_eq!(
        jersey_arm,
        Arm {
            successes: 30,
            failures: 73
        }
    );
}
