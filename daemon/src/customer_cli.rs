//! `touchline forget` and `touchline profiles import`: operator actions
//! on customers from the command line.
//!
//! A running daemon owns its store, so these go through its `[admin]`
//! listener; when no daemon runs on the data directory, the command takes
//! the instance lock and applies the events to the store itself (the
//! erasure record then leaves with the daemon's next uplink session).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use edge_config::SiteConfig;

use crate::admin::customers::{import_text, ImportReport, ERASE_PATH, IMPORT_PATH};
use crate::cli::EX_USAGE;
use crate::instance::{running_pid, InstanceLock};
use crate::status::{connect_addr, describe};
use crate::store::{customers, Store, StoreHandle};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// `touchline forget --config <file> <customer>`
pub fn forget(config: &Path, customer: &str) -> ExitCode {
    let Some(site) = load(config) else {
        return ExitCode::from(EX_USAGE);
    };
    if let Err(e) = customers::erase_event(customer, 0) {
        eprintln!("touchline forget: {e}");
        return ExitCode::from(EX_USAGE);
    }
    let path = ERASE_PATH.replace("{id}", &url_segment(customer));
    let result = deliver(&site, &path, String::new(), |store| {
        let customer = customer.to_string();
        Box::pin(async move {
            let event = customers::erase_event(&customer, crate::clock::now_ms())?;
            store
                .submit(vec![event])
                .await
                .map(|_| String::new())
                .map_err(|e| e.to_string())
        })
    });
    match result {
        Ok(_) => {
            println!("customer {customer} erased at site {}", site.site.id);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("touchline forget: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `touchline profiles import --config <file> <file.jsonl>`
pub fn import(config: &Path, file: &Path) -> ExitCode {
    let Some(site) = load(config) else {
        return ExitCode::from(EX_USAGE);
    };
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "touchline profiles import: cannot read {}: {e}",
                file.display()
            );
            return ExitCode::from(EX_USAGE);
        }
    };
    let result = deliver(&site, IMPORT_PATH, text.clone(), |store| {
        Box::pin(async move {
            let report = import_text(&store, &text).await?;
            serde_json::to_string(&report).map_err(|e| e.to_string())
        })
    });
    let report: ImportReport = match result
        .and_then(|body| serde_json::from_str(&body).map_err(|e| format!("unexpected answer: {e}")))
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("touchline profiles import: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "{}: {} profile update(s) imported, {} already imported",
        file.display(),
        report.imported,
        report.duplicates
    );
    for bad in &report.invalid {
        eprintln!("{}:{}: {}", file.display(), bad.line, bad.error);
    }
    if report.invalid.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EX_USAGE)
    }
}

fn load(config: &Path) -> Option<SiteConfig> {
    match edge_config::load_site_config(config) {
        Ok(site) => Some(site),
        Err(errors) => {
            eprintln!("{errors}");
            None
        }
    }
}

/// Posts `body` to `path` on the running daemon's admin listener, or runs
/// `offline` against the store when no daemon runs. Returns the answer's
/// body.
fn deliver(
    site: &SiteConfig,
    path: &str,
    body: String,
    offline: impl FnOnce(
        StoreHandle,
    )
        -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>>>>,
) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    match running_pid(&site.site.data_dir) {
        Some(pid) => {
            let Some(admin) = &site.admin else {
                return Err(format!(
                    "a daemon (pid {pid}) runs on {} without an [admin] listener; configure one, or stop the daemon",
                    site.site.data_dir.display()
                ));
            };
            let url = format!("http://{}{path}", connect_addr(admin.listen));
            rt.block_on(async {
                let client = reqwest::Client::builder()
                    .timeout(REQUEST_TIMEOUT)
                    .build()
                    .map_err(|e| e.to_string())?;
                let response = client
                    .post(&url)
                    .body(body)
                    .send()
                    .await
                    .map_err(describe)?;
                let status = response.status();
                let text = response.text().await.map_err(describe)?;
                if status.is_success() {
                    Ok(text)
                } else {
                    Err(format!("{url} answered {status}: {text}"))
                }
            })
        }
        None => {
            let _lock = InstanceLock::acquire(&site.site.data_dir).map_err(|e| e.to_string())?;
            let rules = edge_config::load_rules(site).map_err(|e| e.to_string())?;
            let (store, writer) = Store::open(site, &rules).map_err(|e| e.to_string())?;
            let result = rt.block_on(async {
                let result = offline(store.clone()).await;
                store.shutdown().await;
                result
            });
            drop(store);
            if writer.join().is_err() {
                return Err("the store writer failed".into());
            }
            result
        }
    }
}

/// Percent-encodes a customer id for use as one URL path segment.
fn url_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn customer_ids_are_one_path_segment() {
        assert_eq!(super::url_segment("fan-1"), "fan-1");
        assert_eq!(super::url_segment("a/b c"), "a%2Fb%20c");
    }
}
