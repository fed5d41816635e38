//! `kubectl sluice`: the kubectl plugin for Sluice.
//!
//! Installed on PATH as `kubectl-sluice`, kubectl runs it for `kubectl sluice ...`.

use clap::{Parser, Subcommand};

/// Watch and steer Sluice rollouts, error budgets and pipelines.
///
/// Commands that change something (promote, abort, approve, ...) record a request in the
/// object's status, never in its spec, so GitOps tools such as ArgoCD never revert them.
#[derive(Parser, Debug)]
#[command(
    name = "kubectl sluice",
    bin_name = "kubectl sluice",
    version,
    max_term_width = 100
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the plugin version.
    Version,
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => println!("kubectl-sluice {}", env!("CARGO_PKG_VERSION")),
    }
}
