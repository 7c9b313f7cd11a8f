//! Finding and loading a site's rule files into one [`RuleBundle`].
//!
//! `site.rules` holds glob patterns relative to the config file's folder.
//! Each pattern must match at least one file, so a typo in a path is an
//! error rather than a site silently running without its rules. Files load
//! in sorted order and a file matched by two patterns loads once, so the
//! bundle does not depend on directory listing order.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use glob::MatchOptions;
use toml::de::{DeTable, DeValue};

use crate::diagnostic::{ConfigErrors, Diagnostic, Source};
use crate::model::{RuleBundle, SiteConfig};
use crate::offers::{parse_offers_located, LocatedOffer};
use crate::paths;
use crate::rules::{parse_rules_located, LocatedPool, PoolRef};
use crate::timezone::TimeZone;

/// Loads every rule file `site.rules` names and checks that rule ids are
/// unique across them.
pub fn load_rules(site: &SiteConfig) -> Result<RuleBundle, ConfigErrors> {
    let base = paths::base_of(&site.source);
    let mut errors = Vec::new();
    let mut files: Vec<PathBuf> = Vec::new();
    for (index, pattern) in site.site.rules.iter().enumerate() {
        match expand(&base, pattern) {
            Ok(matched) if matched.is_empty() => errors.push(pattern_error(
                site,
                index,
                format!(
                    "`{pattern}` matches no file (patterns are relative to {})",
                    base.display()
                ),
            )),
            Ok(matched) => {
                for file in matched {
                    if !files.contains(&file) {
                        files.push(file);
                    }
                }
            }
            Err(message) => errors.push(pattern_error(site, index, message)),
        }
    }

    let mut sources = Vec::with_capacity(files.len());
    for file in files {
        match paths::read_text(&file) {
            Ok(text) => sources.push((file, text)),
            Err(e) => errors.extend(e.0),
        }
    }
    let built = build(sources, site.site.timezone, CodesFiles::Check);
    match built {
        Ok(bundle) if errors.is_empty() => Ok(bundle),
        Ok(_) => Err(ConfigErrors(errors)),
        Err(e) => {
            errors.extend(e.0);
            Err(ConfigErrors(errors))
        }
    }
}

/// Builds the bundle `load_rules` would from rule files with these texts,
/// in this order, without touching the disk: codes files are not read
/// (their codes are the engine's to load). A store uses it to rebuild
/// the rules it recorded.
pub fn rules_from_sources(
    sources: Vec<(PathBuf, String)>,
    timezone: TimeZone,
) -> Result<RuleBundle, ConfigErrors> {
    build(sources, timezone, CodesFiles::Skip)
}

/// Whether building a bundle checks that each pool's codes file serves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CodesFiles {
    Check,
    Skip,
}

fn build(
    sources: Vec<(PathBuf, String)>,
    timezone: TimeZone,
    codes: CodesFiles,
) -> Result<RuleBundle, ConfigErrors> {
    let mut errors = Vec::new();
    let mut bundle = RuleBundle::default();
    // Rule id → where it was first defined.
    let mut seen: HashMap<String, (PathBuf, usize)> = HashMap::new();
    // Offer id → where it was first defined.
    let mut seen_offers: HashMap<String, (PathBuf, usize)> = HashMap::new();
    // Voucher pool id → where it was first defined.
    let mut seen_pools: HashMap<String, (PathBuf, usize)> = HashMap::new();
    let mut pool_refs: Vec<(PathBuf, PoolRef)> = Vec::new();
    for (file, text) in &sources {
        if let Some(kind) = offer_file(text, file) {
            match kind.and_then(|()| parse_offers_located(text, file)) {
                Ok(offers) => add_offers(&mut bundle, &mut seen_offers, &mut errors, file, offers),
                Err(e) => errors.extend(e.0),
            }
            continue;
        }
        match parse_rules_located(text, file) {
            Ok(parsed) => {
                add_pools(
                    &mut bundle,
                    &mut seen_pools,
                    &mut errors,
                    file,
                    parsed.pools,
                    codes,
                );
                for located in parsed.rules {
                    let rule = located.rule;
                    if let Some((first_file, first_line)) = seen.get(&rule.id) {
                        errors.push(Diagnostic {
                            file: paths::shown(file),
                            line: located.id_line,
                            column: located.id_column,
                            field: format!("achievement[{}].id", located.index),
                            message: format!(
                                "duplicate id `{}`: already defined at {}:{first_line}",
                                rule.id,
                                paths::shown(first_file).display()
                            ),
                        });
                        continue;
                    }
                    seen.insert(rule.id.clone(), (file.clone(), rule.line));
                    pool_refs.extend(located.pool_refs.into_iter().map(|r| (file.clone(), r)));
                    bundle.achievements.push(rule);
                }
            }
            Err(e) => errors.extend(e.0),
        }
    }
    // Pools may be defined in any file of the bundle, so references are
    // checked once every file is read.
    for (file, r) in pool_refs {
        if !seen_pools.contains_key(&r.pool) {
            errors.push(Diagnostic {
                file: paths::shown(&file),
                line: r.line,
                column: r.column,
                field: r.field,
                message: format!(
                    "no [[voucher_pool]] with id `{}` in the rule files of this site",
                    r.pool
                ),
            });
        }
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    (bundle.files, bundle.sources) = sources.into_iter().unzip();
    bundle.timezone = timezone;
    Ok(bundle)
}

/// `Some` when `text` holds offers, which the offer reader takes; an error
/// when it holds achievements too (each reader refuses the other's key).
/// `None` for every other file, syntax errors included, which the
/// achievement reader reports as before.
fn offer_file(text: &str, file: &Path) -> Option<Result<(), ConfigErrors>> {
    let (doc, _) = DeTable::parse_recoverable(text);
    let offer = doc.get_ref().get_key_value("offer")?.0;
    if !doc.get_ref().contains_key("achievement") {
        return Some(Ok(()));
    }
    let (line, column) = Source::new(file, text).position(offer.span().start);
    Some(Err(ConfigErrors(vec![Diagnostic {
        file: paths::shown(file),
        line,
        column,
        field: "offer".to_owned(),
        message: "a rule file holds either [[achievement]] or [[offer]] tables; move the offers to a file of their own".to_owned(),
    }])))
}

/// Adds one file's offers, refusing ids another file already used.
fn add_offers(
    bundle: &mut RuleBundle,
    seen: &mut HashMap<String, (PathBuf, usize)>,
    errors: &mut Vec<Diagnostic>,
    file: &Path,
    offers: Vec<LocatedOffer>,
) {
    for located in offers {
        let offer = located.offer;
        if let Some((first_file, first_line)) = seen.get(&offer.id) {
            errors.push(Diagnostic {
                file: paths::shown(file),
                line: located.id_line,
                column: located.id_column,
                field: format!("offer[{}].id", located.index),
                message: format!(
                    "duplicate offer id `{}`: already defined at {}:{first_line}",
                    offer.id,
                    paths::shown(first_file).display()
                ),
            });
            continue;
        }
        seen.insert(offer.id.clone(), (file.to_path_buf(), offer.line));
        bundle.offers.push(offer);
    }
}

/// Adds one file's voucher pools, refusing ids another file already used
/// and codes files that cannot serve a single code.
fn add_pools(
    bundle: &mut RuleBundle,
    seen: &mut HashMap<String, (PathBuf, usize)>,
    errors: &mut Vec<Diagnostic>,
    file: &Path,
    pools: Vec<LocatedPool>,
    codes: CodesFiles,
) {
    for located in pools {
        let pool = located.pool;
        if let Some((first_file, first_line)) = seen.get(&pool.id) {
            errors.push(Diagnostic {
                file: paths::shown(file),
                line: located.id_line,
                column: located.id_column,
                field: format!("voucher_pool[{}].id", located.index),
                message: format!(
                    "duplicate voucher pool id `{}`: already defined at {}:{first_line}",
                    pool.id,
                    paths::shown(first_file).display()
                ),
            });
            continue;
        }
        let checked = match codes {
            CodesFiles::Check => check_codes(&pool.codes),
            CodesFiles::Skip => Ok(()),
        };
        if let Err(message) = checked {
            errors.push(Diagnostic {
                file: paths::shown(file),
                line: located.codes_line,
                column: located.codes_column,
                field: format!("voucher_pool[{}].codes", located.index),
                message,
            });
        }
        seen.insert(pool.id.clone(), (file.to_path_buf(), pool.line));
        bundle.voucher_pools.push(pool);
    }
}

/// A codes file must be readable text with at least one code, so a typo
/// in its path shows at `touchline check`, not as a pool that is dry from
/// the first award.
fn check_codes(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the codes file {}: {e}", path.display()))?;
    let has_code = text
        .lines()
        .map(str::trim)
        .any(|l| !l.is_empty() && !l.starts_with('#'));
    if !has_code {
        return Err(format!(
            "the codes file {} holds no code (one per line; blank lines and `#` comments are skipped)",
            path.display()
        ));
    }
    Ok(())
}

/// The files `pattern` matches, sorted. `*` does not cross `/` and does
/// not match a leading `.` (editor backup and lock files).
fn expand(base: &Path, pattern: &str) -> Result<Vec<PathBuf>, String> {
    let full = if Path::new(pattern).is_absolute() {
        pattern.to_owned()
    } else {
        let Some(base) = base.to_str() else {
            return Err(format!(
                "the config folder {} is not valid UTF-8, so relative patterns cannot be used; give an absolute pattern",
                base.display()
            ));
        };
        format!("{}/{pattern}", glob::Pattern::escape(base))
    };
    let options = MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: true,
    };
    let entries =
        glob::glob_with(&full, options).map_err(|e| format!("invalid glob pattern: {}", e.msg))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| {
            format!(
                "cannot read {} while matching `{pattern}`: {}",
                e.path().display(),
                e.error()
            )
        })?;
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// A problem with `site.rules[index]`, placed at the pattern in the config
/// file when the file can still be read (the model keeps no positions).
fn pattern_error(site: &SiteConfig, index: usize, message: String) -> Diagnostic {
    let field = format!("site.rules[{index}]");
    let (line, column) = std::fs::read_to_string(&site.source)
        .ok()
        .and_then(|text| {
            let (doc, _) = DeTable::parse_recoverable(&text);
            let rules = doc.get_ref().get("site")?.get_ref().get("rules")?;
            let DeValue::Array(items) = rules.get_ref() else {
                return None;
            };
            let offset = items.get(index)?.span().start;
            Some(Source::new(&site.source, &text).position(offset))
        })
        .unwrap_or((1, 1));
    Diagnostic {
        file: paths::shown(&site.source),
        line,
        column,
        field,
        message,
    }
}
