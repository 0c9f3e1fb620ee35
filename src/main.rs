#![forbid(unsafe_code)]

use clap::Parser;
use consentgate::{AuditCommand, CaCommand, Cli, Command, DbCommand, SyncCommand};

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run { config } => consentgate::run(config.as_deref()),
        Command::Check { config } => consentgate::check(config.as_deref()),
        Command::Explain {
            config,
            request,
            show_body,
        } => consentgate::explain(config.as_deref(), &request, show_body),
        Command::Audit {
            command:
                AuditCommand::Verify {
                    paths,
                    key_file,
                    pseudonym_key_file,
                },
        } => consentgate::audit_verify(&paths, key_file.as_deref(), pseudonym_key_file.as_deref()),
        Command::Audit {
            command:
                AuditCommand::Find {
                    patient,
                    since,
                    config,
                    key_file,
                    paths,
                },
        } => consentgate::audit_find(
            &patient,
            since.as_deref(),
            config.as_deref(),
            key_file.as_deref(),
            &paths,
        ),
        Command::Db {
            command: DbCommand::Migrate { config },
        } => consentgate::db_migrate(config.as_deref()),
        Command::Sync {
            command: SyncCommand::Status { config },
        } => consentgate::sync_status(config.as_deref()),
        Command::Ca {
            command:
                CaCommand::Init {
                    out,
                    force,
                    days,
                    config,
                    permit,
                    no_name_constraints,
                    system_roots,
                },
        } => consentgate::ca_init(&consentgate::CaInit {
            out,
            force,
            days,
            config,
            permit,
            no_name_constraints,
            system_roots,
        }),
        Command::Demo { dir } => consentgate::demo(dir.as_deref()),
    };
    std::process::exit(code);
}
