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
    /// Run the whole pipeline on a raw HTTP/1.1 request without forwarding;
    /// print the decision trace as JSON.
    Explain {
        #[arg(long)]
        config: Option<PathBuf>,
        /// File holding the raw request (request line, headers, blank line, body).
        #[arg(long)]
        request: PathBuf,
        /// Also print the rewritten body (it may hold hashed identifiers).
        #[arg(long)]
        show_body: bool,
    },
    /// The audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Consent database management (`consent.source: postgres`).
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// The sync outbox (SPEC §13).
    Sync {
        #[command(subcommand)]
        command: SyncCommand,
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
pub enum AuditCommand {
    /// Verify the hash chain; exit 1 naming the first bad record.
    Verify {
        /// Audit files or directories, in chain order.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// AES-256-GCM key file, when the audit is encrypted at rest.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// The pseudonym key file (`audit.pseudonym_key_file`): checkpoints are
        /// signed with a key derived from it; needed to verify a capped trail.
        #[arg(long)]
        pseudonym_key_file: Option<PathBuf>,
    },
    /// List one patient's records (matched by pseudonym).
    Find {
        #[arg(long)]
        patient: String,
        /// Only records at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Config naming audit.path and the pseudonym key.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Audit files or directories (default: audit.path).
        paths: Vec<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum SyncCommand {
    /// Per target: entries waiting, parked, the oldest one's age, the next
    /// attempt and the last error (JSON). Reads the outbox of the configured
    /// consent source; safe next to a running proxy.
    Status {
        #[arg(long)]
        config: Option<PathBuf>,
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
