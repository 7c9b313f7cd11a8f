//! Touchline, the edge daemon: ingest → store → engine → outbox → uplink.
//!
//! Each stage is a module that owns its state; `app` composes them and
//! `cli` is the binary's edge.
#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub(crate) mod backoff;
pub mod certs;
pub mod cli;
pub mod clock;
mod customer_cli;
pub mod demo;
pub mod engine;
pub mod event;
pub mod fan_api;
pub mod ingest;
pub mod instance;
pub mod nba;
pub mod notify;
pub mod publish;
pub mod reload;
mod reload_client;
pub mod service;
pub mod status;
pub mod store;
pub mod uplink;
