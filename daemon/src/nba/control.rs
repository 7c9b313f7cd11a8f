//! The control group: a fixed, hashed share of customers who get no
//! offers, so the uplift of offering can be measured against them.
//!
//! Membership is a pure function of (salt, customer id): it needs no
//! state, survives restarts and reloads, and is the same for a customer on
//! every decision, which a random draw per decision would not be (the
//! customer would be treated some of the time and the comparison lost).
//! The salt defaults to the site id, so sites draw independent groups.

use edge_config::NbaPolicy;
use sha2::{Digest, Sha256};

/// Who is held out.
#[derive(Debug, Clone)]
pub struct ControlGroup {
    salt: Vec<u8>,
    /// A customer whose hash position lies below this is in the group.
    threshold: u64,
}

impl ControlGroup {
    /// A group holding `share` of all customers (clamped to 0..=1; the
    /// config allows 0 up to, not including, 1).
    pub fn new(salt: &str, share: f64) -> ControlGroup {
        let share = if share.is_nan() {
            0.0
        } else {
            share.clamp(0.0, 1.0)
        };
        // 2^64 as f64; the cast saturates at u64::MAX for a share of 1.
        let threshold = (share * 18_446_744_073_709_551_616.0) as u64;
        ControlGroup {
            salt: salt.as_bytes().to_vec(),
            threshold,
        }
    }

    /// The site's group: `nba.control_salt`, or the site id when unset.
    pub fn from_policy(policy: &NbaPolicy, site_id: &str) -> ControlGroup {
        let salt = policy.control_salt.as_deref().unwrap_or(site_id);
        ControlGroup::new(salt, policy.control_share)
    }

    /// Whether `customer` is held out.
    pub fn contains(&self, customer: &str) -> bool {
        self.position(customer) < self.threshold
    }

    /// The customer's place on the 64-bit circle: the first 8 bytes of
    /// SHA-256(len(salt) ‖ salt ‖ customer). The length prefix keeps
    /// ("ab", "c") and ("a", "bc") apart.
    fn position(&self, customer: &str) -> u64 {
        let digest = Sha256::new()
            .chain_update((self.salt.len() as u64).to_be_bytes())
            .chain_update(&self.salt)
            .chain_update(customer.as_bytes())
            .finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_be_bytes(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(group: &ControlGroup, n: usize) -> usize {
        (0..n)
            .filter(|i| group.contains(&format!("fan-{i}")))
            .count()
    }

    #[test]
    fn share_is_respected() {
        let n = 100_000;
        let five = members(&ControlGroup::new("arena-01", 0.05), n);
        // 5 % of 100,000 is 5,000; the binomial standard deviation is ~69.
        assert!((4_700..=5_300).contains(&five), "{five}");
        assert_eq!(members(&ControlGroup::new("arena-01", 0.0), n), 0);
        assert_eq!(members(&ControlGroup::new("arena-01", 1.0), 1000), 1000);
        assert_eq!(members(&ControlGroup::new("arena-01", f64::NAN), 1000), 0);
    }

    #[test]
    fn membership_is_stable_and_nested() {
        let a = ControlGroup::new("arena-01", 0.05);
        let b = ControlGroup::new("arena-01", 0.05);
        let wider = ControlGroup::new("arena-01", 0.10);
        for i in 0..10_000 {
            let id = format!("fan-{i}");
            assert_eq!(a.contains(&id), b.contains(&id));
            // Raising the share only adds customers.
            if a.contains(&id) {
                assert!(wider.contains(&id));
            }
        }
        // Pinned so a change of the hash (which would silently reshuffle
        // every site's control group) fails here.
        let pinned: Vec<usize> = (0..400)
            .filter(|i| a.contains(&format!("fan-{i}")))
            .collect();
        assert_eq!(pinned, PINNED);
    }

    #[test]
    fn the_salt_draws_another_group() {
        let a = ControlGroup::new("arena-01", 0.5);
        let b = ControlGroup::new("arena-02", 0.5);
        let same = (0..10_000)
            .filter(|i| {
                let id = format!("fan-{i}");
                a.contains(&id) == b.contains(&id)
            })
            .count();
        // Independent halves agree about half the time.
        assert!((4_700..=5_300).contains(&same), "{same}");
    }

    #[test]
    fn policy_salt_defaults_to_the_site() {
        let mut policy = NbaPolicy {
            control_share: 0.5,
            ..NbaPolicy::default()
        };
        let by_site = ControlGroup::from_policy(&policy, "arena-01");
        let direct = ControlGroup::new("arena-01", 0.5);
        policy.control_salt = Some("season-2025".to_owned());
        let salted = ControlGroup::from_policy(&policy, "arena-01");
        let other = ControlGroup::new("season-2025", 0.5);
        for i in 0..1000 {
            let id = format!("fan-{i}");
            assert_eq!(by_site.contains(&id), direct.contains(&id));
            assert_eq!(salted.contains(&id), other.contains(&id));
        }
    }

    const PINNED: &[usize] = &[
        1, 6, 36, 41, 48, 53, 100, 156, 166, 185, 197, 209, 214, 217, 236, 253, 357, 365, 379,
    ];
}
