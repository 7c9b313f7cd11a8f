//! Site configuration and rule schema for Touchline.
//!
//! This crate owns every decision about what a valid configuration is, so
//! the daemon never sees an unvalidated value. Errors name the file, line
//! and field, because the people reading them are operators and CVM teams
//! editing TOML by hand.
#![forbid(unsafe_code)]

pub mod model;
pub use model::*;
