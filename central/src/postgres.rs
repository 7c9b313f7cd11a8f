//! The PostgreSQL sink: records in `touchline_records`, keyed by
//! (site, seq), with each site's durable mark in `touchline_sites`.
//!
//! A batch is one transaction: the site's row is locked, new records are
//! inserted with `ON CONFLICT DO NOTHING`, the mark advances, and only the
//! commit makes the acknowledgement true. A `customer_erased` record
//! deletes the site's earlier rows of that customer in the same
//! transaction. A lost connection makes the sink unavailable (the site
//! retries) until it reconnects.
//!
//! PostgreSQL's `text` and `jsonb` cannot hold U+0000, which a record may
//! carry in a string that came from event data (a profile value used as
//! an offer's segment). Refusing the record would fail the batch the same
//! way on every retry and stall the site behind it, so such characters
//! are stored as U+FFFD and each altered record is logged.

use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};
use touchline_proto::{Record, RecordBody};
use tracing::{info, warn};

use crate::sink::{check_site, plan, Sink, SinkError};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS touchline_records (
    site     text        NOT NULL,
    seq      bigint      NOT NULL,
    kind     text        NOT NULL,
    at       timestamptz NOT NULL,
    customer text,
    record   jsonb       NOT NULL,
    PRIMARY KEY (site, seq)
);
CREATE TABLE IF NOT EXISTS touchline_sites (
    site         text   PRIMARY KEY,
    last_durable bigint NOT NULL
);";

/// A PostgreSQL sink on one connection (writes of all sites serialise on
/// it, which also serialises writes per site).
pub struct PostgresSink {
    url: String,
    client: Mutex<Option<Client>>,
}

impl PostgresSink {
    /// Connects and creates the tables when missing.
    pub async fn connect(url: &str) -> Result<PostgresSink, SinkError> {
        let client = open(url).await?;
        Ok(PostgresSink {
            url: url.to_string(),
            client: Mutex::new(Some(client)),
        })
    }
}

async fn open(url: &str) -> Result<Client, SinkError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| SinkError::Unavailable(format!("cannot connect to PostgreSQL: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            warn!(error = %e, "PostgreSQL connection ended");
        }
    });
    client
        .batch_execute(SCHEMA)
        .await
        .map_err(|e| SinkError::Unavailable(format!("cannot create tables: {e}")))?;
    Ok(client)
}

fn unavailable(e: tokio_postgres::Error) -> SinkError {
    // The database's own message says what was wrong; the error's
    // display alone is only "db error".
    match e.as_db_error() {
        Some(db) => SinkError::Unavailable(format!(
            "PostgreSQL: {} ({}){}",
            db.message(),
            db.code().code(),
            db.detail().map(|d| format!(": {d}")).unwrap_or_default()
        )),
        None => SinkError::Unavailable(e.to_string()),
    }
}

/// Replaces U+0000, which PostgreSQL cannot store, in every string and key
/// of `value` with U+FFFD; returns whether anything changed.
fn storable(value: &mut serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::String(s) => storable_text(s),
        Value::Array(items) => items.iter_mut().fold(false, |c, v| storable(v) | c),
        Value::Object(map) => {
            let mut changed = false;
            if map.keys().any(|k| k.contains('\0')) {
                let entries = std::mem::take(map);
                for (mut k, v) in entries {
                    storable_text(&mut k);
                    map.insert(k, v);
                }
                changed = true;
            }
            map.values_mut().fold(changed, |c, v| storable(v) | c)
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

fn storable_text(s: &mut String) -> bool {
    if s.contains('\0') {
        *s = s.replace('\0', "\u{FFFD}");
        true
    } else {
        false
    }
}

impl PostgresSink {
    /// The connection, reconnecting first when the last one died.
    async fn live(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>, SinkError> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = Some(open(&self.url).await?);
            info!("connected to PostgreSQL");
        }
        Ok(guard)
    }
}

async fn read_mark(c: &Client, site: &str) -> Result<u64, tokio_postgres::Error> {
    let row = c
        .query_opt(
            "SELECT last_durable FROM touchline_sites WHERE site = $1",
            &[&site],
        )
        .await?;
    Ok(row.map(|r| r.get::<_, i64>(0)).unwrap_or(0).max(0) as u64)
}

async fn write_batch(
    c: &mut Client,
    site: &str,
    dropped_through: u64,
    records: &[Record],
) -> Result<u64, tokio_postgres::Error> {
    let tx = c.transaction().await?;
    tx.execute(
        "INSERT INTO touchline_sites (site, last_durable) VALUES ($1, 0) ON CONFLICT DO NOTHING",
        &[&site],
    )
    .await?;
    let last: i64 = tx
        .query_one(
            "SELECT last_durable FROM touchline_sites WHERE site = $1 FOR UPDATE",
            &[&site],
        )
        .await?
        .get(0);
    let (keep, next) = plan(last.max(0) as u64, dropped_through, records);
    if !keep.is_empty() {
        let mut seqs = Vec::with_capacity(keep.len());
        let mut kinds = Vec::with_capacity(keep.len());
        let mut ats = Vec::with_capacity(keep.len());
        let mut customers = Vec::with_capacity(keep.len());
        let mut bodies = Vec::with_capacity(keep.len());
        for i in keep {
            let r = &records[i];
            seqs.push(r.seq as i64);
            kinds.push(r.body.kind().to_string());
            ats.push(r.at_rfc3339());
            let mut customer = r.body.customer().map(str::to_string);
            let mut body = r.to_json();
            let altered = customer.as_mut().is_some_and(storable_text) | storable(&mut body);
            if altered {
                warn!(
                    site,
                    seq = r.seq,
                    "record holds U+0000, which PostgreSQL cannot store: stored as U+FFFD"
                );
            }
            customers.push(customer);
            bodies.push(body);
        }
        tx.execute(
            "INSERT INTO touchline_records (site, seq, kind, at, customer, record)
             SELECT $1, s, k, a::timestamptz, c, r
             FROM UNNEST($2::bigint[], $3::text[], $4::text[], $5::text[], $6::jsonb[])
                  AS t(s, k, a, c, r)
             ON CONFLICT (site, seq) DO NOTHING",
            &[&site, &seqs, &kinds, &ats, &customers, &bodies],
        )
        .await?;
        // An erasure removes what the site sent earlier about the
        // customer; the erasure record itself stays as the proof.
        let (erased, erased_at): (Vec<String>, Vec<i64>) = records
            .iter()
            .filter_map(|r| match &r.body {
                RecordBody::CustomerErased(e) => {
                    // Matched against the column as it was stored.
                    let mut customer = e.customer.clone();
                    storable_text(&mut customer);
                    Some((customer, r.seq as i64))
                }
                _ => None,
            })
            .unzip();
        if !erased.is_empty() {
            tx.execute(
                "DELETE FROM touchline_records r
                 USING UNNEST($2::text[], $3::bigint[]) AS e(c, s)
                 WHERE r.site = $1 AND r.customer = e.c AND r.seq < e.s
                   AND r.kind <> 'customer_erased'",
                &[&site, &erased, &erased_at],
            )
            .await?;
        }
    }
    tx.execute(
        "UPDATE touchline_sites SET last_durable = $2 WHERE site = $1",
        &[&site, &(next as i64)],
    )
    .await?;
    tx.commit().await?;
    Ok(next)
}

impl Sink for PostgresSink {
    async fn last_durable(&self, site: &str) -> Result<u64, SinkError> {
        let mut guard = self.live().await?;
        let Some(c) = guard.as_mut() else {
            return Err(SinkError::Unavailable("no connection".into()));
        };
        let result = read_mark(c, site).await;
        if result.is_err() && c.is_closed() {
            *guard = None;
        }
        result.map_err(unavailable)
    }

    async fn write(
        &self,
        site: &str,
        dropped_through: u64,
        records: &[Record],
    ) -> Result<u64, SinkError> {
        check_site(site, records)?;
        let mut guard = self.live().await?;
        let Some(c) = guard.as_mut() else {
            return Err(SinkError::Unavailable("no connection".into()));
        };
        let result = write_batch(c, site, dropped_through, records).await;
        if result.is_err() && c.is_closed() {
            *guard = None;
        }
        result.map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nul_characters_become_replacement_characters_everywhere() {
        let mut v = json!({"segment": "a\0b", "points": {"x\0": 1}, "badges": ["ok", "\0"]});
        assert!(storable(&mut v));
        assert_eq!(
            v,
            json!({"segment": "a\u{FFFD}b", "points": {"x\u{FFFD}": 1}, "badges": ["ok", "\u{FFFD}"]})
        );
        let mut clean = json!({"segment": "ab", "n": 1.5});
        assert!(!storable(&mut clean));
    }
}
