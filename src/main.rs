//! The `mbtd` binary: CLI edge over the library.

use std::process::ExitCode;

use clap::Parser;
use mbtd::cli::{BenchCommand, Cli, Command, ConfigCommand, InspectCommand};
use mbtd::config::{Config, DEFAULT_TOML};
use mbtd::daemon::Exit;

/// Exit code for a configuration that cannot be used.
const EXIT_CONFIG: u8 = 2;
/// Exit code of a demo stopped by Ctrl-C (128 + SIGINT).
const EXIT_INTERRUPTED: u8 = 130;

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
            let opts = mbtd::daemon::RunOptions {
                accept_checkpoint_model: args.accept_checkpoint_model,
            };
            match rt.block_on(mbtd::daemon::run(cfg, data_dir, opts)) {
                Ok(Exit::Clean) => ExitCode::SUCCESS,
                Ok(Exit::Failed(why)) => {
                    tracing::error!(reason = %why, "mbtd exiting with failure");
                    eprintln!("mbtd: {why}");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "mbtd failed");
                    eprintln!("mbtd: {e:#}");
                    if e.downcast_ref::<mbtd::daemon::StartRefused>().is_some() {
                        ExitCode::from(EXIT_CONFIG)
                    } else {
                        ExitCode::FAILURE
                    }
                }
            }
        }
        Command::Config(ConfigCommand::Default) => {
            print!("{DEFAULT_TOML}");
            ExitCode::SUCCESS
        }
        Command::Config(ConfigCommand::Small { set }) => {
            let pairs: Result<Vec<(&str, &str)>, String> = set
                .iter()
                .map(|kv| {
                    kv.split_once('=')
                        .ok_or_else(|| format!("--set {kv}: expected SECTION.KEY=VALUE"))
                })
                .collect();
            match pairs.map(|p| mbtd::config::preset::small(&p).map_err(|e| e.to_string())) {
                Ok(Ok(text)) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Ok(Err(e)) | Err(e) => {
                    eprintln!("mbtd: configuration error: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
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
        Command::Inspect(cmd) => inspect(cmd),
        Command::Bench(cmd) => bench(cmd),
        Command::Node(args) => match mbtd::cluster::node::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mbtd node: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Demo(args) => match mbtd::demo::run::run(&args) {
            Ok(summary) => {
                print!("{summary}");
                if summary.interrupted {
                    ExitCode::from(EXIT_INTERRUPTED)
                } else if summary.all_ok() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("mbtd demo: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Report(args) => match mbtd::report::run(&args) {
            Ok(report) => {
                print!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mbtd report: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Ctl(args) => match mbtd::ctl::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(msg) => {
                eprintln!("{msg}");
                ExitCode::FAILURE
            }
        },
        Command::Chat(args) => match mbtd::chat::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(msg) => {
                eprintln!("mbtd chat: {msg}");
                ExitCode::FAILURE
            }
        },
    }
}

fn inspect(cmd: InspectCommand) -> ExitCode {
    match cmd {
        InspectCommand::Replay {
            data_dir,
            config,
            json,
        } => {
            let mut cfg = match Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("mbtd: configuration error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            cfg.resolve_paths(&data_dir);
            match mbtd::store::inspect::inspect_replay(&cfg.paths.replay) {
                Ok(report) => {
                    if json {
                        println!("{}", serde_json::to_string(&report).unwrap_or_default());
                    } else {
                        print!("{report}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mbtd: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        InspectCommand::Checkpoint { dir, json } => {
            let report = mbtd::checkpoint::inspect(&dir);
            if json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                print!("{report}");
            }
            if report.valid {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn bench(cmd: BenchCommand) -> ExitCode {
    let result = match &cmd {
        BenchCommand::Train(a) => match &a.data {
            Some(csv) => {
                mbtd::learn::data_bench::bench_train_data(a, csv).map_err(|e| e.to_string())
            }
            None => mbtd::model::bench::bench_train(a).map_err(|e| e.to_string()),
        },
        BenchCommand::Generate(a) => {
            mbtd::model::bench::bench_generate(a).map_err(|e| e.to_string())
        }
        BenchCommand::Products(a) => {
            mbtd::model::products_bench::bench_products(a).map_err(|e| e.to_string())
        }
        BenchCommand::Ingest(a) => mbtd::ingest::bench_ingest(a).map_err(|e| e.to_string()),
        BenchCommand::Continual(a) => {
            mbtd::learn::cl_bench::bench_continual(a).map_err(|e| e.to_string())
        }
        BenchCommand::Cluster(a) => {
            mbtd::cluster::bench::bench_cluster(a).map_err(|e| format!("{e:#}"))
        }
        BenchCommand::Soak(a) => mbtd::soak::bench_soak(a).map_err(|e| e.to_string()),
        BenchCommand::Outage(a) => {
            mbtd::learn::outage_bench::bench_outage(a).map_err(|e| e.to_string())
        }
    };
    match result {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mbtd: benchmark failed: {e}");
            ExitCode::FAILURE
        }
    }
}
