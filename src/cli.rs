//! Command line (SPEC §3). Every flag has its help text here (doc comments).

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
    /// Validate the config, consent snapshot, CA, tokens and TLS files; exit 0,
    /// or 1 with every error found.
    Check {
        /// Config file (default: config/consentgate.yaml, else the embedded default).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run the whole pipeline on a raw HTTP/1.1 request without forwarding;
    /// print the decision trace as JSON.
    Explain {
        /// Config file (default: config/consentgate.yaml, else the embedded default).
        #[arg(long)]
        config: Option<PathBuf>,
        /// File holding the raw request (request line, headers, blank line, body).
        #[arg(long)]
        request: PathBuf,
        /// Also print the rewritten body (it may hold hashed identifiers).
        #[arg(long)]
        show_body: bool,
    },
    /// A guided first run, no network needed: starts the proxy with a local
    /// fake vendor, sends an allowed, a modified and a blocked request through
    /// it as an app would (HTTPS_PROXY and the interception CA), then runs
    /// `explain` and `audit verify` on what happened.
    Demo {
        /// Working directory for the demo's CA, config, journal and audit trail
        /// (default: a new directory under the system's temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
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
    /// Write ca.pem and ca-key.pem (ECDSA P-256) into DIR, with ca-bundle.pem
    /// (system roots + CA) and truststore.p12 (PKCS#12, for JVMs) beside them.
    Init {
        /// Output directory.
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Replace an existing CA (every app must then trust the new one: see
        /// the CA rotation procedure in docs/RUNBOOK.md).
        #[arg(long)]
        force: bool,
        /// Validity of the CA in days (1 to 3650).
        #[arg(long, default_value_t = crate::tls::CA_DEFAULT_DAYS)]
        days: u32,
        /// Config whose destinations' hosts the CA may also sign for (default:
        /// config/consentgate.yaml when present). The built-in destinations'
        /// hosts are always permitted.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Also permit this host and the names below it (repeatable), e.g. a
        /// destination you are about to configure.
        #[arg(long = "permit", value_name = "HOST")]
        permit: Vec<String>,
        /// Make a CA without name constraints, able to sign for any host. Apps
        /// trusting it can then be intercepted for every TLS connection: only
        /// for a proxy whose destinations cannot be listed in advance.
        #[arg(long)]
        no_name_constraints: bool,
        /// The system root bundle to copy into ca-bundle.pem (default: the
        /// first of /etc/ssl/certs/ca-certificates.crt and the other usual places).
        #[arg(long, value_name = "FILE")]
        system_roots: Option<PathBuf>,
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
        /// The patient id to look for (turned into its pseudonym; never printed).
        #[arg(long)]
        patient: String,
        /// Only records at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Config naming audit.path and the pseudonym key.
        #[arg(long)]
        config: Option<PathBuf>,
        /// AES-256-GCM key file, when the audit is encrypted at rest (default:
        /// audit.encryption_key_file of the config).
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
        /// The config whose `sync:` targets and outbox to read (default:
        /// config/consentgate.yaml, else the embedded default).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum DbCommand {
    /// Create or upgrade the consent table (idempotent) at consent.postgres.url.
    Migrate {
        /// Config naming consent.postgres (default: config/consentgate.yaml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every flag and argument of every subcommand says what it is for.
    #[test]
    fn every_flag_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} --{id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (no about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "consentgate", &mut missing);
        assert!(missing.is_empty(), "without help text: {missing:#?}");
        Cli::command().debug_assert();
    }
}
