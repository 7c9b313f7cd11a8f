//! Site configuration and rule schema for Touchline.
//!
//! This crate owns every decision about what a valid configuration is, so
//! the daemon never sees an unvalidated value. Errors name the file, line
//! and field, because the people reading them are operators and CVM teams
//! editing TOML by hand.
//!
//! - [`load_site_config`] / [`parse_site_config`]: the site config file.
//! - [`load_rules`]: the rule files the site config names, as one bundle.
//! - [`parse_rules`]: one rule file.
//! - [`parse_offers`]: one offer file.
//! - [`parse_size`] / [`parse_duration`]: the unit syntax both use, for
//!   command-line options that should read the same way.
#![forbid(unsafe_code)]

mod cel_check;
pub mod defaults;
mod diagnostic;
pub mod model;
mod offers;
mod paths;
mod reader;
mod rule_files;
mod rules;
mod site;
mod timezone;
mod units;

pub use diagnostic::{ConfigErrors, Diagnostic};
pub use model::*;
pub use offers::defaults as nba_defaults;
pub use offers::parse_offers;
pub use rule_files::{load_rules, rules_from_sources};
pub use rules::parse_rules;
pub use site::{load_site_config, parse_site_config};
pub use units::{parse_duration, parse_size};
