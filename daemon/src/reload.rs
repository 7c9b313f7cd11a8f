//! Live reload: new rules without a restart.
//!
//! SIGHUP, `touchline reload` and `POST /v1/reload` all end here. The site
//! config is read again (it names the rule files), every rule file is
//! loaded and validated, and only a bundle that is valid as a whole
//! replaces the active one, between two commits. Anything invalid is
//! refused with its file/line errors and the old rules stay. Settings
//! other than the rules (listeners, store, uplink) shape resources that
//! are already open; a change to them is reported as needing a restart
//! rather than half applied.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use edge_config::{ConfigErrors, RuleBundle, SiteConfig};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::store::{StoreError, StoreHandle};

/// Why a reload was refused. The old rules stay active in every case.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Invalid(ConfigErrors),
    #[error("the config now names site `{found}`, but this daemon runs `{running}`; a site id change needs a restart")]
    SiteChanged { running: String, found: String },
    #[error("cannot activate the rules: {0}")]
    Store(#[from] StoreError),
}

/// What a successful reload changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// Every active rule as `id@version`, in load order.
    pub rules: Vec<String>,
    /// Rules whose id is new.
    pub added: Vec<String>,
    /// Rules no longer present.
    pub removed: Vec<String>,
    /// Rules whose version changed: their progress starts fresh.
    pub new_versions: Vec<String>,
    /// Rules whose definition changed without a version bump: their
    /// progress carries over under the same version.
    pub changed_in_place: Vec<String>,
    /// Config sections that differ from the running ones and take effect
    /// only after a restart.
    pub restart_needed: Vec<String>,
    /// Every active offer as `id@version`. What an unchanged offer version
    /// learned carries over; a new version starts from the prior.
    #[serde(default)]
    pub offers: Vec<String>,
}

/// Owns the config path and the active rules; one reload at a time.
pub struct Reloader {
    config_path: PathBuf,
    store: StoreHandle,
    /// The config and rules in effect. Held across the swap, which also
    /// serialises concurrent reloads.
    current: tokio::sync::Mutex<(SiteConfig, RuleBundle)>,
    last: Mutex<Option<String>>,
}

impl Reloader {
    pub fn new(config: SiteConfig, rules: RuleBundle, store: StoreHandle) -> Reloader {
        Reloader {
            config_path: config.source.clone(),
            store,
            current: tokio::sync::Mutex::new((config, rules)),
            last: Mutex::new(None),
        }
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// One line on the last reload, for status displays.
    pub fn last_outcome(&self) -> Option<String> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the config and rules again and activates them when valid.
    /// Logs the outcome either way.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let mut current = self.current.lock().await;
        let result = self.try_reload(&current.0, &current.1).await;
        let line = match &result {
            Ok((report, site, rules)) => {
                info!(
                    rules = report.rules.len(),
                    added = ?report.added,
                    removed = ?report.removed,
                    new_versions = ?report.new_versions,
                    "rules reloaded"
                );
                if !report.restart_needed.is_empty() {
                    warn!(
                        sections = ?report.restart_needed,
                        "config changes outside the rules take effect only after a restart"
                    );
                }
                *current = (site.clone(), rules.clone());
                format!("ok: {} rule(s) active", report.rules.len())
            }
            Err(e) => {
                error!("reload refused, previous rules stay active:\n{e}");
                format!("refused: {}", first_line(&e.to_string()))
            }
        };
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(line);
        result.map(|(report, _, _)| report)
    }

    async fn try_reload(
        &self,
        running: &SiteConfig,
        old: &RuleBundle,
    ) -> Result<(ReloadReport, SiteConfig, RuleBundle), ReloadError> {
        let path = self.config_path.clone();
        // File reads and CEL compilation: off the async workers.
        let loaded = tokio::task::spawn_blocking(move || {
            let site = edge_config::load_site_config(&path)?;
            let rules = edge_config::load_rules(&site)?;
            Ok::<_, ConfigErrors>((site, rules))
        })
        .await
        .map_err(|e| StoreError::Read(format!("reload aborted: {e}")))?;
        let (site, rules) = loaded.map_err(ReloadError::Invalid)?;
        if site.site.id != running.site.id {
            return Err(ReloadError::SiteChanged {
                running: running.site.id.clone(),
                found: site.site.id,
            });
        }
        self.store.replace_rules(&rules).await?;
        let report = compare(running, old, &site, &rules);
        Ok((report, site, rules))
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// What changed between the running config/rules and the new ones.
pub fn compare(
    running: &SiteConfig,
    old: &RuleBundle,
    site: &SiteConfig,
    rules: &RuleBundle,
) -> ReloadReport {
    let find = |bundle: &RuleBundle, id: &str| {
        bundle
            .achievements
            .iter()
            .find(|r| r.id == id)
            .map(|r| (r.version, strip_location(r)))
    };
    let mut report = ReloadReport {
        rules: rules
            .achievements
            .iter()
            .map(|r| format!("{}@{}", r.id, r.version))
            .collect(),
        added: Vec::new(),
        removed: Vec::new(),
        new_versions: Vec::new(),
        changed_in_place: Vec::new(),
        restart_needed: Vec::new(),
        offers: rules
            .offers
            .iter()
            .map(|o| format!("{}@{}", o.id, o.version))
            .collect(),
    };
    for rule in &rules.achievements {
        match find(old, &rule.id) {
            None => report.added.push(rule.id.clone()),
            Some((version, _)) if version != rule.version => report
                .new_versions
                .push(format!("{}@{}→{}", rule.id, version, rule.version)),
            Some((_, before)) if before != strip_location(rule) => {
                report.changed_in_place.push(rule.id.clone())
            }
            Some(_) => {}
        }
    }
    for rule in &old.achievements {
        if find(rules, &rule.id).is_none() {
            report.removed.push(rule.id.clone());
        }
    }
    let sections: [(&'static str, bool); 6] = [
        ("site", running.site.data_dir != site.site.data_dir),
        ("ingest", running.ingest != site.ingest),
        ("store", running.store != site.store),
        (
            "uplink/outbox",
            running.uplink != site.uplink || running.outbox != site.outbox,
        ),
        ("admin", running.admin != site.admin),
        ("nba", running.nba != site.nba),
    ];
    report.restart_needed = sections
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(name, _)| name.to_string())
        .collect();
    report
}

/// A rule without where it was written, so moving it within a file is not
/// a change.
fn strip_location(rule: &edge_config::AchievementRule) -> edge_config::AchievementRule {
    let mut r = rule.clone();
    r.file = PathBuf::new();
    r.line = 0;
    r
}
