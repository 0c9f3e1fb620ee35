#![forbid(unsafe_code)]

use clap::Parser;
use consentgate::cli::{CaCommand, Cli, Command, DbCommand};

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run { config } => consentgate::run::run(config.as_deref()),
        Command::Check { config } => consentgate::run::check(config.as_deref()),
        Command::Db {
            command: DbCommand::Migrate { config },
        } => consentgate::run::db_migrate(config.as_deref()),
        Command::Ca {
            command: CaCommand::Init { out, force },
        } => match consentgate::tls::init_ca(&out, force) {
            Ok(files) => {
                println!("{}", consentgate::tls::trust_instructions(&files.cert));
                0
            }
            Err(e) => {
                eprintln!("error: {e}");
                1
            }
        },
    };
    std::process::exit(code);
}
