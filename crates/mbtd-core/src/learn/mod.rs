//! The continual-learning core (pure, no async): turning stored rows into training windows
//! and batches, and the loop's configuration. The trainer actor drives it.

pub mod batch;
pub mod cl_bench;
pub mod config;
pub mod consolidate;
pub mod data_bench;
pub mod eval;
pub mod mix;
pub mod outage_bench;

pub use config::{EvalConfig, TokenizerSection, TrainingConfig};

#[cfg(test)]
pub(crate) mod tests {
    /// The options `T` of an `mbtd bench` subcommand parsed from the words a user types.
    pub(crate) fn bench_args<T: clap::Args>(line: &str) -> T {
        #[derive(clap::Parser)]
        struct Cli<T: clap::Args> {
            #[command(flatten)]
            args: T,
        }
        let words = std::iter::once("bench").chain(line.split_whitespace());
        <Cli<T> as clap::Parser>::parse_from(words).args
    }
}
