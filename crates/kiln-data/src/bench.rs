//! Tokenizer benchmark: training time and encoding throughput.

use std::fmt;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Results of [`bench_tokenizer`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizerBench {
    /// Documents and UTF-8 bytes of the corpus.
    pub documents: usize,
    pub bytes: usize,
    /// Requested and obtained vocabulary size.
    pub requested_vocab: usize,
    pub vocab_size: usize,
    /// Seconds to train the tokenizer on the corpus.
    pub train_secs: f64,
    /// Tokens of the encoded corpus.
    pub tokens: usize,
    /// Encoding the corpus document by document on one thread.
    pub single_thread_secs: f64,
    pub single_thread_mb_s: f64,
    pub single_thread_tokens_s: f64,
    /// Encoding the corpus with [`Tokenizer::encode_batch`] on all rayon threads.
    pub parallel_secs: f64,
    pub parallel_mb_s: f64,
    pub parallel_tokens_s: f64,
    pub threads: usize,
    /// Encoding on one thread through the HF `tokenizers` pipeline (the reference the fast
    /// encoder must match).
    pub hf_single_thread_mb_s: f64,
    /// Whether `decode(encode(doc)) == doc` held for every document.
    pub round_trip_ok: bool,
}

impl TokenizerBench {
    /// Average bytes of text per token.
    pub fn bytes_per_token(&self) -> f64 {
        self.bytes as f64 / self.tokens.max(1) as f64
    }
}

impl fmt::Display for TokenizerBench {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "corpus:          {} documents, {:.2} MB",
            self.documents,
            self.bytes as f64 / 1e6
        )?;
        writeln!(
            f,
            "train:           {:.2} s (vocab {} of {} requested)",
            self.train_secs, self.vocab_size, self.requested_vocab
        )?;
        writeln!(
            f,
            "tokens:          {} ({:.2} bytes/token), round trip {}",
            self.tokens,
            self.bytes_per_token(),
            if self.round_trip_ok { "ok" } else { "FAILED" }
        )?;
        writeln!(
            f,
            "encode 1 thread: {:.2} MB/s, {:.0} tokens/s",
            self.single_thread_mb_s, self.single_thread_tokens_s
        )?;
        writeln!(
            f,
            "encode {} threads: {:.2} MB/s, {:.0} tokens/s",
            self.threads, self.parallel_mb_s, self.parallel_tokens_s
        )?;
        write!(
            f,
            "HF encode 1 thread (reference): {:.2} MB/s",
            self.hf_single_thread_mb_s
        )
    }
}

/// Runs `f` repeatedly for at least [`MIN_TIMING_SECS`] (at least once); returns its result and the
/// mean seconds per run.
fn timed<T>(mut f: impl FnMut() -> T) -> (T, f64) {
    let t = Instant::now();
    let mut out = f();
    let mut runs = 1u32;
    while t.elapsed().as_secs_f64() < MIN_TIMING_SECS {
        out = f();
        runs += 1;
    }
    (out, (t.elapsed().as_secs_f64() / runs as f64).max(1e-9))
}

/// Minimum wall time of each timed encoding measurement.
pub const MIN_TIMING_SECS: f64 = 0.5;

/// Trains a `vocab`-token tokenizer on `corpus` (one document per string), then times encoding
/// the corpus on one thread, in parallel, and on one thread through the HF pipeline, and checks
/// that all three agree and round-trip.
pub fn bench_tokenizer(corpus: &[String], vocab: usize) -> Result<TokenizerBench> {
    if corpus.iter().all(|d| d.is_empty()) {
        return Err(Error::NoText {
            what: "the benchmark corpus".into(),
        });
    }
    let bytes: usize = corpus.iter().map(|d| d.len()).sum();
    let t = Instant::now();
    let tok = Tokenizer::train_from_texts(corpus.iter(), vocab)?;
    let train_secs = t.elapsed().as_secs_f64();

    let (single, single_thread_secs) =
        timed(|| corpus.iter().map(|d| tok.encode(d)).collect::<Vec<_>>());
    let tokens: usize = single.iter().map(Vec::len).sum();

    let refs: Vec<&str> = corpus.iter().map(String::as_str).collect();
    let (parallel, parallel_secs) = timed(|| tok.encode_batch(&refs));
    let (hf, hf_secs) = timed(|| corpus.iter().map(|d| tok.encode_hf(d)).collect::<Vec<_>>());

    let round_trip_ok = parallel == single
        && hf == single
        && single
            .iter()
            .zip(corpus)
            .all(|(ids, d)| tok.decode(ids) == *d);

    Ok(TokenizerBench {
        documents: corpus.len(),
        bytes,
        requested_vocab: vocab,
        vocab_size: tok.vocab_size(),
        train_secs,
        tokens,
        single_thread_secs,
        single_thread_mb_s: bytes as f64 / 1e6 / single_thread_secs,
        single_thread_tokens_s: tokens as f64 / single_thread_secs,
        parallel_secs,
        parallel_mb_s: bytes as f64 / 1e6 / parallel_secs,
        parallel_tokens_s: tokens as f64 / parallel_secs,
        threads: rayon::current_num_threads(),
        hf_single_thread_mb_s: bytes as f64 / 1e6 / hf_secs,
        round_trip_ok,
    })
}
