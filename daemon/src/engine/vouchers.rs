//! Vouchers handed out with tiers: codes taken from a prepared pool, or
//! made from a template.
//!
//! A pool is the list of codes in its file, read when the rules load; the
//! number of codes handed out is a counter in the store, committed with
//! the award, so a code is never handed out twice, even across crashes.
//! Codes are taken in file order: appending codes to the file (and
//! reloading) extends the pool, reordering it would hand out codes again.
//! A dry pool is counted and logged; the award still happens, without a
//! voucher.

use std::collections::HashMap;
use std::path::PathBuf;

use super::state::{self, StoredGlobal};
use super::table::StateTable;
use crate::store::keys::KeyBuf;
use edge_config::{Voucher, VoucherPool};

#[derive(Debug, thiserror::Error)]
#[error("{}: voucher pool `{pool}`: {detail}", file.display())]
pub struct PoolError {
    pub pool: String,
    pub file: PathBuf,
    pub detail: String,
}

/// Every pool's codes, by pool id.
#[derive(Debug, Default)]
pub struct Pools {
    codes: HashMap<String, Vec<String>>,
}

/// What handing out a voucher gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handed {
    Code(String),
    /// The pool has no code left.
    Dry,
}

impl Pools {
    /// Reads every pool's codes file: one code per line; blank lines and
    /// lines starting with `#` are skipped.
    pub fn load(pools: &[VoucherPool]) -> Result<Pools, PoolError> {
        let mut codes = HashMap::new();
        for pool in pools {
            let text = std::fs::read_to_string(&pool.codes).map_err(|e| PoolError {
                pool: pool.id.clone(),
                file: pool.codes.clone(),
                detail: e.to_string(),
            })?;
            let list: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect();
            codes.insert(pool.id.clone(), list);
        }
        Ok(Pools { codes })
    }

    /// How many codes each pool holds, by pool id, sorted.
    pub fn sizes(&self) -> Vec<(String, u64)> {
        let mut sizes: Vec<(String, u64)> = self
            .codes
            .iter()
            .map(|(id, codes)| (id.clone(), codes.len() as u64))
            .collect();
        sizes.sort_unstable();
        sizes
    }

    /// Keeps at most `sizes`' count of codes in each pool it names: the
    /// pools as they were when a journal was applied (codes are only
    /// appended, so the first ones are the same).
    pub fn limit(&mut self, sizes: &[(String, u64)]) {
        for (id, size) in sizes {
            if let Some(codes) = self.codes.get_mut(id) {
                codes.truncate(usize::try_from(*size).unwrap_or(usize::MAX));
            }
        }
    }

    /// Hands out one voucher of `voucher` for `customer`'s `tier` (1-based)
    /// of `rule`, inside the award's transaction.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn hand_out(
        &self,
        table: &mut dyn StateTable,
        buf: &mut KeyBuf,
        voucher: &Voucher,
        customer: &str,
        rule: &str,
        version: u32,
        tier: u32,
    ) -> Result<Handed, heed::Error> {
        match voucher {
            Voucher::Pool(id) => {
                let key = state::global_key(buf, &format!("voucher\0{id}")).to_vec();
                let used = counter(table, &key)?;
                let Some(code) = self
                    .codes
                    .get(id)
                    .and_then(|codes| codes.get(usize::try_from(used).unwrap_or(usize::MAX)))
                else {
                    return Ok(Handed::Dry);
                };
                set_counter(table, &key, used + 1)?;
                Ok(Handed::Code(code.clone()))
            }
            Voucher::Template(template) => {
                let key = state::global_key(buf, &format!("template\0{rule}\0{version}\0{tier}"))
                    .to_vec();
                let n = counter(table, &key)? + 1;
                set_counter(table, &key, n)?;
                Ok(Handed::Code(fill(template, customer, rule, tier, n)))
            }
        }
    }
}

/// Replaces `{customer}`, `{rule}`, `{tier}` and `{n}`; `{{` and `}}` are
/// literal braces (the validator refused anything else).
pub fn fill(template: &str, customer: &str, rule: &str, tier: u32, n: u64) -> String {
    let mut out = String::with_capacity(template.len() + customer.len());
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let (text, used): (std::borrow::Cow<'_, str>, usize) = if tail.starts_with("{{") {
            ("{".into(), 2)
        } else if tail.starts_with("}}") {
            ("}".into(), 2)
        } else if tail.starts_with("{customer}") {
            (customer.into(), 10)
        } else if tail.starts_with("{rule}") {
            (rule.into(), 6)
        } else if tail.starts_with("{tier}") {
            (tier.to_string().into(), 6)
        } else if tail.starts_with("{n}") {
            (n.to_string().into(), 3)
        } else {
            (tail[..1].to_string().into(), 1)
        };
        out.push_str(&text);
        rest = &tail[used..];
    }
    out.push_str(rest);
    out
}

fn counter(table: &dyn StateTable, key: &[u8]) -> Result<u64, heed::Error> {
    Ok(match table.get(key)? {
        Some(bytes) => match state::decode_global(bytes) {
            Ok(StoredGlobal::Counter(n)) => n,
            _ => 0,
        },
        None => 0,
    })
}

fn set_counter(table: &mut dyn StateTable, key: &[u8], n: u64) -> Result<(), heed::Error> {
    let bytes = state::encode_global(&StoredGlobal::Counter(n))
        .map_err(|e| heed::Error::Encoding(Box::new(e)))?;
    table.put(key, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_placeholders_and_braces() {
        assert_eq!(
            fill("ROAR-{customer}-{n}", "fan-1", "r", 1, 7),
            "ROAR-fan-1-7"
        );
        assert_eq!(fill("{{{rule}}}#{tier}", "c", "big", 2, 1), "{big}#2");
    }
}
