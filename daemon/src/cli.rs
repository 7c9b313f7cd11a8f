//! The `touchline` command line: the binary's edge.
//!
//! Parses arguments, sets up logging, and maps failures to exit codes an
//! init system and an operator can act on: 64 (EX_USAGE) for a bad config
//! or bad arguments, 1 for runtime failures.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tracing::error;

/// Exit code for invalid configuration or arguments (sysexits EX_USAGE).
pub const EX_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(name = "touchline", version, about = "Touchline edge daemon")]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// How long, on SIGTERM, the uplink may keep draining the outbox.
        #[arg(long, default_value = "5s", value_parser = parse_duration_arg)]
        drain: Duration,
    },
    /// Validate the site config and its rule files; exit 0 or 64.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Write a development CA, a central certificate and site certificates.
    Certs {
        #[arg(long)]
        out: PathBuf,
        /// Site id; repeat for several sites.
        #[arg(long = "site", required = true)]
        sites: Vec<String>,
        /// Names the central certificate is valid for (default: localhost
        /// and 127.0.0.1).
        #[arg(long = "central-name")]
        central_names: Vec<String>,
    },
    /// Show rejected input samples kept in the dead-letter store.
    Dlq {
        #[arg(long)]
        config: PathBuf,
        /// Show at most this many samples, newest last.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Reload the rules of the running daemon. The bundle is validated
    /// here first (exit 64 with its errors when invalid); then the daemon
    /// is asked through its `[admin]` listener, or sent SIGHUP when there
    /// is none.
    Reload {
        #[arg(long)]
        config: PathBuf,
    },
    /// Erase a customer: every trace at the site is deleted and an
    /// erasure record is sent upstream.
    Forget {
        #[arg(long)]
        config: PathBuf,
        /// The customer id (CloudEvents `subject`).
        customer: String,
    },
    /// Customer profiles.
    #[command(subcommand)]
    Profiles(ProfilesCommand),
    /// Summarise a site: asks the running daemon (the `[admin]` listener)
    /// or, when none answers, reads the store on disk.
    Status {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the whole pipeline on this machine with synthetic stadium
    /// traffic and print what happened.
    Demo(crate::demo::DemoArgs),
}

#[derive(Debug, Subcommand)]
pub enum ProfilesCommand {
    /// Import profiles from JSONL: one `{"customer": "...", "profile":
    /// {...}}` per line; each top-level profile key replaces the stored
    /// one. Re-importing the same lines changes nothing.
    Import {
        #[arg(long)]
        config: PathBuf,
        file: PathBuf,
    },
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    edge_config::parse_duration(s)
}

/// Entry point used by `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own summary; its logs would only bury it.
    let default_level = if matches!(cli.command, Command::Demo(_)) {
        "warn"
    } else {
        "info"
    };
    init_logging(cli.log_format, default_level);
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Certs {
            out,
            sites,
            central_names,
        } => match crate::certs::write_dev_certs(&out, &sites, &central_names) {
            Ok(()) => {
                println!("wrote development certificates to {}", out.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("touchline certs: {e}");
                ExitCode::from(EX_USAGE)
            }
        },
        Command::Dlq { config, limit } => dlq(&config, limit),
        Command::Status { config } => crate::status::run(&config),
        Command::Forget { config, customer } => crate::customer_cli::forget(&config, &customer),
        Command::Profiles(ProfilesCommand::Import { config, file }) => {
            crate::customer_cli::import(&config, &file)
        }
        Command::Reload { config } => crate::reload_client::run(&config),
        Command::Run { config, drain } => run(&config, drain),
        Command::Demo(args) => match runtime().and_then(|rt| rt.block_on(crate::demo::run(args))) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("touchline demo failed: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn init_logging(format: LogFormat, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("touchline")
        .build()
        .context("cannot start the async runtime")
}

/// Loads and validates config and rules, printing every problem found.
fn load(config: &Path) -> Result<(edge_config::SiteConfig, edge_config::RuleBundle), ExitCode> {
    let site = edge_config::load_site_config(config).map_err(|errors| {
        eprintln!("{errors}");
        ExitCode::from(EX_USAGE)
    })?;
    let rules = edge_config::load_rules(&site).map_err(|errors| {
        eprintln!("{errors}");
        ExitCode::from(EX_USAGE)
    })?;
    Ok((site, rules))
}

fn check(config: &Path) -> ExitCode {
    match load(config) {
        Ok((site, rules)) => {
            println!(
                "{}: site {} is valid; {} achievement rule(s) and {} offer(s) from {} file(s)",
                config.display(),
                site.site.id,
                rules.achievements.len(),
                rules.offers.len(),
                rules.files.len()
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn dlq(config: &Path, limit: usize) -> ExitCode {
    let site = match edge_config::load_site_config(config) {
        Ok(site) => site,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(EX_USAGE);
        }
    };
    match crate::store::read_dead_letters(&site.site.data_dir, site.store.map_size, limit) {
        Ok(samples) if samples.is_empty() => {
            println!("no rejected input kept");
            ExitCode::SUCCESS
        }
        Ok(samples) => {
            for s in samples {
                println!(
                    "{}  {:<20} {:<24} {}\n    {}",
                    crate::clock::format_ms(s.at_ms),
                    s.reason,
                    s.origin,
                    s.detail,
                    s.sample
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("touchline dlq: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: &Path, drain: Duration) -> ExitCode {
    let (site, rules) = match load(config) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            error!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(crate::service::run(site, rules, drain))
}
