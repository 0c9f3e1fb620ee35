//! Command line (SPEC §3).

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "consentgate",
    version,
    about = "Consent-enforcing egress proxy for healthcare organisations"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the proxy.
    Run {
        /// Config file (default: config/consentgate.yaml, else the embedded default).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate the config, consent snapshot and CA; exit 0, or 1 with every error.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Consent database management (`consent.source: postgres`).
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// Interception CA management.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Write ca.pem and ca-key.pem (ECDSA P-256) into DIR.
    Init {
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Replace an existing CA (every app must then trust the new one).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum DbCommand {
    /// Create or upgrade the consent table (idempotent) at consent.postgres.url.
    Migrate {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}
