//! `kiln data prepare`: text corpus -> tokenized train/val shards.

use std::path::PathBuf;

use anyhow::{Context, Result};
use kiln_data::prepare::DEFAULT_SHARD_TOKENS;
use kiln_data::Tokenizer;

/// Tokenize a text corpus into train/val token shards for pretraining.
///
/// Documents (plain text split at blank lines; one per line of .jsonl files, from --field) are
/// assigned to train or val by a hash of (seed, document index), encoded in parallel, each
/// preceded by <|endoftext|>, and written to OUT/train_000.bin, ..., OUT/val_000.bin, ... plus
/// OUT/meta.json. Earlier shards in OUT are replaced only once everything is written.
#[derive(Debug, clap::Args)]
pub struct PrepareArgs {
    /// The tokenizer.json to encode with (see `kiln tokenizer train`).
    #[arg(long, short)]
    pub tokenizer: PathBuf,
    /// Input text: files or directories (repeatable, or several after one flag).
    #[arg(long, short, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Output directory for the shards and meta.json (created if missing).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Fraction of documents held out for validation, in [0, 1).
    #[arg(long, default_value_t = 0.01)]
    pub val_fraction: f64,
    /// JSON field holding the text, for .jsonl inputs.
    #[arg(long, default_value = "text")]
    pub field: String,
    /// Seed of the train/val split.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Maximum tokens per shard file.
    #[arg(long, default_value_t = DEFAULT_SHARD_TOKENS)]
    pub shard_tokens: usize,
    /// No progress bar or summary. Not a flag of its own (`kiln --quiet` is global): the caller
    /// sets it.
    #[arg(skip)]
    pub quiet: bool,
}

/// Runs `kiln data prepare`.
pub fn run(args: PrepareArgs) -> Result<()> {
    let tok = Tokenizer::load(&args.tokenizer)
        .with_context(|| format!("loading tokenizer {}", args.tokenizer.display()))?;
    kiln_data::prepare(
        &tok,
        &args.input,
        &args.field,
        &args.out,
        args.val_fraction,
        args.seed,
        args.shard_tokens,
        !args.quiet,
    )
    .with_context(|| format!("preparing {}", args.out.display()))?;
    Ok(())
}
