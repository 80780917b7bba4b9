//! The `mbtd` binary: CLI edge over the library.

use std::process::ExitCode;

use clap::Parser;
use mbtd::cli::{Cli, Command, ConfigCommand};
use mbtd::config::{Config, DEFAULT_TOML};
use mbtd::daemon::Exit;

/// Exit code for a configuration that cannot be used.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let mut cfg = match Config::load(args.config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("mbtd: configuration error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let data_dir = match std::path::absolute(&args.data_dir) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("mbtd: bad --data-dir {}: {e}", args.data_dir.display());
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            cfg.resolve_paths(&data_dir);
            mbtd::telemetry::logging::init(&cfg.logging);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("mbtd-io")
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("mbtd: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(mbtd::daemon::run(cfg, data_dir)) {
                Ok(Exit::Clean) => ExitCode::SUCCESS,
                Ok(Exit::Failed(why)) => {
                    tracing::error!(reason = %why, "mbtd exiting with failure");
                    eprintln!("mbtd: {why}");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "mbtd failed");
                    eprintln!("mbtd: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Config(ConfigCommand::Default) => {
            print!("{DEFAULT_TOML}");
            ExitCode::SUCCESS
        }
        Command::Config(ConfigCommand::Check { file, data_dir }) => {
            match Config::load(Some(&file)) {
                Ok(mut cfg) => {
                    cfg.resolve_paths(&data_dir);
                    println!("# {} is valid; effective configuration:", file.display());
                    print!("{}", cfg.to_toml());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mbtd: configuration error: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
        Command::Ctl(args) => match mbtd::ctl::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(msg) => {
                eprintln!("{msg}");
                ExitCode::FAILURE
            }
        },
    }
}
