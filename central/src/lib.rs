//! The reference receiver for Touchline's central platform.
//!
//! Sites connect over QUIC with mutual TLS; each one's id comes from its
//! client certificate. Records are written to a [`Sink`] idempotently by
//! (site, seq) and acknowledged only once durable, which is what makes the
//! delivery exactly-once end to end. The platform can embed this crate and
//! bring its own sink.
#![forbid(unsafe_code)]

pub mod jsonl;
pub mod postgres;
pub mod server;
pub mod sink;
pub mod tls;

pub use jsonl::JsonlSink;
pub use postgres::PostgresSink;
pub use server::{serve, serve_with_stats, CentralStats};
pub use sink::{Sink, SinkError};

/// A sink named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkSpec {
    /// `jsonl:<dir>`
    Jsonl(std::path::PathBuf),
    /// `postgres:<url>` (a tokio-postgres connection string or URL)
    Postgres(String),
}

/// Parses `jsonl:<dir>` or `postgres:<url>`.
pub fn parse_sink(spec: &str) -> Result<SinkSpec, String> {
    if let Some(dir) = spec.strip_prefix("jsonl:") {
        if dir.is_empty() {
            return Err("jsonl: needs a folder, e.g. jsonl:/var/lib/touchline-central".into());
        }
        Ok(SinkSpec::Jsonl(dir.into()))
    } else if let Some(url) = spec.strip_prefix("postgres:") {
        if url.is_empty() {
            return Err("postgres: needs a connection string".into());
        }
        // Accept both `postgres:postgres://…` and `postgres://…`.
        let url = if url.starts_with("//") {
            format!("postgres:{url}")
        } else {
            url.to_string()
        };
        Ok(SinkSpec::Postgres(url))
    } else {
        Err(format!(
            "unknown sink `{spec}`: use jsonl:<dir> or postgres:<url>"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_specs() {
        assert_eq!(parse_sink("jsonl:/x"), Ok(SinkSpec::Jsonl("/x".into())));
        assert_eq!(
            parse_sink("postgres://u@h/db"),
            Ok(SinkSpec::Postgres("postgres://u@h/db".into()))
        );
        assert_eq!(
            parse_sink("postgres:host=h user=u"),
            Ok(SinkSpec::Postgres("host=h user=u".into()))
        );
        assert!(parse_sink("kafka:x").is_err());
        assert!(parse_sink("jsonl:").is_err());
    }
}
