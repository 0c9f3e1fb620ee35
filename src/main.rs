#![forbid(unsafe_code)]

use clap::Parser;
use consentgate::cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run { config } => consentgate::run::run(config.as_deref()),
        Command::Check { config } => consentgate::run::check(config.as_deref()),
    };
    std::process::exit(code);
}
