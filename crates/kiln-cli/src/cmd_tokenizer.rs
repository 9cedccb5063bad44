//! `kiln tokenizer train|encode|decode`.

use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use kiln_data::tokenizer::{special, Tokenizer, MIN_VOCAB_SIZE};

/// Train a byte-level BPE tokenizer, or encode/decode with one.
#[derive(Debug, clap::Subcommand)]
pub enum TokenizerCmd {
    /// Train a byte-level BPE tokenizer (GPT-2 style) and save it as tokenizer.json.
    ///
    /// Every byte is in the base vocabulary, so any text can be encoded; the 8 special tokens
    /// <|endoftext|> <|pad|> <|system|> <|user|> <|assistant|> <|end|> <|mask|> <|sep|> get
    /// ids 0..=7. Plain text files are split into documents at blank lines; .jsonl files give one
    /// document per line (from --field); directories are searched recursively for .txt, .md and
    /// .jsonl files (.gz variants included).
    Train {
        /// Training text: files or directories (repeatable, or several after one flag).
        #[arg(long, short, required = true, num_args = 1..)]
        input: Vec<PathBuf>,
        /// Vocabulary size, special tokens included (at least 264 = 256 bytes + 8 specials).
        #[arg(long, default_value_t = 4096)]
        vocab_size: usize,
        /// Where to write the tokenizer (HF tokenizer.json format).
        #[arg(long, short)]
        out: PathBuf,
        /// JSON field holding the text, for .jsonl inputs.
        #[arg(long, default_value = "text")]
        field: String,
    },
    /// Encode text and print token ids and the token strings.
    ///
    /// Special-token strings in the text (e.g. "<|end|>") are encoded as plain text unless
    /// --allow-special is given.
    Encode {
        /// The tokenizer.json to use.
        #[arg(long, short)]
        tokenizer: PathBuf,
        /// Text to encode; read from stdin (verbatim, trailing newline included) when omitted.
        text: Option<String>,
        /// Print only the ids, space-separated, on one line.
        #[arg(long)]
        ids_only: bool,
        /// Turn exact special-token strings such as "<|user|>" into their special ids.
        #[arg(long)]
        allow_special: bool,
    },
    /// Decode token ids back to text.
    Decode {
        /// The tokenizer.json to use.
        #[arg(long, short)]
        tokenizer: PathBuf,
        /// Token ids, separated by spaces or commas.
        #[arg(required = true, num_args = 1.., value_delimiter = ',')]
        ids: Vec<u32>,
        /// Drop special tokens instead of printing them as "<|end|>" etc.
        #[arg(long)]
        skip_special: bool,
    },
}

/// Runs a `kiln tokenizer` subcommand.
pub fn run(cmd: TokenizerCmd) -> Result<()> {
    match cmd {
        TokenizerCmd::Train {
            input,
            vocab_size,
            out,
            field,
        } => train(&input, vocab_size, &out, &field),
        TokenizerCmd::Encode {
            tokenizer,
            text,
            ids_only,
            allow_special,
        } => encode(&tokenizer, text, ids_only, allow_special),
        TokenizerCmd::Decode {
            tokenizer,
            ids,
            skip_special,
        } => decode(&tokenizer, &ids, skip_special),
    }
}

fn load(path: &std::path::Path) -> Result<Tokenizer> {
    Tokenizer::load(path).with_context(|| format!("loading tokenizer {}", path.display()))
}

fn train(input: &[PathBuf], vocab_size: usize, out: &std::path::Path, field: &str) -> Result<()> {
    if vocab_size < MIN_VOCAB_SIZE {
        bail!(
            "--vocab-size {vocab_size} is too small: at least {MIN_VOCAB_SIZE} (256 bytes + 8 special tokens)"
        );
    }
    let files = kiln_data::expand_inputs(input)?;
    eprintln!(
        "training a {vocab_size}-token byte-level BPE on {} file(s)...",
        files.len()
    );
    let t = Instant::now();
    let (tok, stats) = Tokenizer::train_with_stats(&files, field, vocab_size)?;
    let secs = t.elapsed().as_secs_f64();
    tok.save(out)
        .with_context(|| format!("saving tokenizer to {}", out.display()))?;
    println!(
        "trained on {} documents ({:.2} MB) in {secs:.2} s ({:.2} MB/s)",
        stats.documents,
        stats.bytes as f64 / 1e6,
        stats.bytes as f64 / 1e6 / secs.max(1e-9)
    );
    if tok.vocab_size() < vocab_size {
        println!(
            "note: the corpus only supports {} tokens (asked for {vocab_size})",
            tok.vocab_size()
        );
    }
    println!(
        "vocab size {}, fingerprint {}, saved to {}",
        tok.vocab_size(),
        tok.fingerprint(),
        out.display()
    );
    Ok(())
}

/// How a token is shown: its text when it is valid UTF-8, else its bytes escaped.
fn show_token(tok: &Tokenizer, id: u32) -> String {
    match tok.token_bytes(id) {
        Some(bytes) => match String::from_utf8(bytes) {
            Ok(s) => format!("{s:?}"),
            Err(e) => format!("b\"{}\"", e.as_bytes().escape_ascii()),
        },
        None => "<unknown id>".to_string(),
    }
}

fn encode(
    path: &std::path::Path,
    text: Option<String>,
    ids_only: bool,
    allow_special: bool,
) -> Result<()> {
    let tok = load(path)?;
    let text = match text {
        Some(t) => t,
        None => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading text from stdin")?;
            String::from_utf8(buf).map_err(|e| {
                anyhow::anyhow!(
                    "stdin is not valid UTF-8 (at byte {})",
                    e.utf8_error().valid_up_to()
                )
            })?
        }
    };
    let ids = if allow_special {
        tok.encode_with_specials(&text)
    } else {
        tok.encode(&text)
    };
    let joined = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ");
    if ids_only {
        println!("{joined}");
        return Ok(());
    }
    println!(
        "{} bytes -> {} tokens ({:.2} bytes/token)",
        text.len(),
        ids.len(),
        text.len() as f64 / ids.len().max(1) as f64
    );
    println!("ids: {joined}");
    for id in &ids {
        let kind = if special::is_special(*id) {
            "  (special)"
        } else {
            ""
        };
        println!("{id:>7}  {}{kind}", show_token(&tok, *id));
    }
    Ok(())
}

fn decode(path: &std::path::Path, ids: &[u32], skip_special: bool) -> Result<()> {
    let tok = load(path)?;
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= tok.vocab_size()) {
        bail!(
            "token id {bad} is out of range: the vocabulary has {} tokens (ids 0..{})",
            tok.vocab_size(),
            tok.vocab_size() - 1
        );
    }
    let text = if skip_special {
        tok.decode_skip_special(ids)
    } else {
        tok.decode(ids)
    };
    println!("{text}");
    Ok(())
}
