//! `touchline-central`: the reference receiver as a program.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, ValueEnum};
use touchline_central::{parse_sink, serve, JsonlSink, PostgresSink, SinkSpec};
use tracing::{error, info};

const EX_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "touchline-central",
    version,
    about = "Touchline central reference receiver"
)]
struct Args {
    /// UDP address to listen on.
    #[arg(long, default_value = "127.0.0.1:4433")]
    listen: SocketAddr,
    /// Server certificate (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// Server private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// CA that signs site certificates (PEM).
    #[arg(long)]
    client_ca: PathBuf,
    /// `jsonl:<dir>` or `postgres:<url>`.
    #[arg(long)]
    sink: String,
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Human => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let sink = match parse_sink(&args.sink) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("touchline-central: --sink: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let config = match touchline_central::tls::server_config(&args.cert, &args.key, &args.client_ca)
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("touchline-central: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("touchline-central: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let endpoint = match quinn::Endpoint::server(config, args.listen) {
            Ok(e) => e,
            Err(e) => {
                error!("cannot listen on {}: {e}", args.listen);
                return ExitCode::FAILURE;
            }
        };
        info!(listen = %args.listen, sink = %args.sink, "touchline-central running");
        match sink {
            SinkSpec::Jsonl(dir) => match JsonlSink::open(&dir) {
                Ok(s) => serve(endpoint, Arc::new(s), terminated()).await,
                Err(e) => {
                    error!("cannot use {}: {e}", dir.display());
                    return ExitCode::FAILURE;
                }
            },
            SinkSpec::Postgres(url) => match PostgresSink::connect(&url).await {
                Ok(s) => serve(endpoint, Arc::new(s), terminated()).await,
                Err(e) => {
                    error!("{e}");
                    return ExitCode::FAILURE;
                }
            },
        }
        info!("stopped");
        ExitCode::SUCCESS
    })
}

async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
