//! Corpus preparation: text files -> tokenized train/val shards.
//!
//! [`prepare`] reads the documents of the inputs (see [`crate::corpus`]), assigns each to train or
//! val by a deterministic hash of `(seed, document index)` (see [`Split`]), encodes them in
//! parallel, prefixes every document with `<|endoftext|>` (as GPT-2: each document starts after an
//! EOT) and writes, into the output directory:
//! - `train_000.bin`, `train_001.bin`, ... and `val_000.bin`, ... ([`crate::shards`] format; each
//!   split has at least one shard, possibly empty; shards hold at most `shard_tokens` tokens and a
//!   document may continue into the next shard),
//! - `meta.json` ([`PrepareMeta`]).
//!
//! Everything is written into a staging directory inside the output directory first; only when
//! all of it is written are old `train_*.bin` / `val_*.bin` / `meta.json` removed and the new files
//! moved in. A failure leaves the output directory as it was.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::corpus::{self, describe_inputs};
use crate::shards::{self, shard_file_name, write_shard};
use crate::tokenizer::{special, Tokenizer};
use crate::{atomic_write, Error, Result};

/// Default maximum tokens per shard.
pub const DEFAULT_SHARD_TOKENS: usize = 50_000_000;
/// Name of the metadata file.
pub const META_FILE: &str = "meta.json";
/// Documents longer than this are cut (where it cannot change the tokens) and encoded in parallel.
const PIECE_BYTES: usize = 256 * 1024;
/// Text gathered before a parallel encoding round.
const BATCH_BYTES: usize = 8 << 20;

/// What [`prepare`] did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PrepareStats {
    /// Documents read (train + val).
    pub documents: u64,
    pub train_documents: u64,
    pub val_documents: u64,
    /// Tokens written, EOT separators included.
    pub train_tokens: u64,
    pub val_tokens: u64,
    /// UTF-8 bytes of all documents.
    pub bytes: u64,
    /// Number of shard files written per split.
    pub train_shards: usize,
    pub val_shards: usize,
    /// Wall-clock seconds of the whole run.
    pub seconds: f64,
}

impl PrepareStats {
    /// All tokens written.
    pub fn tokens(&self) -> u64 {
        self.train_tokens + self.val_tokens
    }
    /// Throughput in MB/s (10^6 bytes of text per second).
    pub fn mb_per_sec(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.seconds.max(1e-9)
    }
    /// Throughput in tokens per second.
    pub fn tokens_per_sec(&self) -> f64 {
        self.tokens() as f64 / self.seconds.max(1e-9)
    }
}

impl fmt::Display for PrepareStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "documents: {} ({} train, {} val)",
            self.documents, self.train_documents, self.val_documents
        )?;
        writeln!(
            f,
            "tokens:    {} ({} train in {} shard(s), {} val in {} shard(s))",
            self.tokens(),
            self.train_tokens,
            self.train_shards,
            self.val_tokens,
            self.val_shards
        )?;
        writeln!(
            f,
            "bytes:     {} ({:.2} bytes/token)",
            self.bytes,
            self.bytes as f64 / self.tokens().max(1) as f64
        )?;
        write!(
            f,
            "time:      {:.2} s ({:.2} MB/s, {:.0} tokens/s)",
            self.seconds,
            self.mb_per_sec(),
            self.tokens_per_sec()
        )
    }
}

/// `meta.json` of a prepared directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepareMeta {
    /// Always `"kiln-tokens"`.
    pub format: String,
    /// Shard format version ([`shards::VERSION`]).
    pub shard_version: u32,
    pub tokenizer_fingerprint: String,
    pub vocab_size: usize,
    /// Bytes per token in the shards (2 or 4).
    pub token_width: usize,
    /// Id of the document separator that precedes every document.
    pub eot_id: u32,
    pub documents: u64,
    pub train_documents: u64,
    pub val_documents: u64,
    pub train_tokens: u64,
    pub val_tokens: u64,
    pub bytes: u64,
    /// Shard file names, in stream order.
    pub train_shards: Vec<String>,
    pub val_shards: Vec<String>,
    pub shard_tokens: usize,
    pub seed: u64,
    pub val_fraction: f64,
    pub field: String,
    /// The input files, as expanded.
    pub inputs: Vec<String>,
}

impl PrepareMeta {
    /// Reads `dir/meta.json`.
    pub fn load(dir: &Path) -> Result<PrepareMeta> {
        let path = dir.join(META_FILE);
        let text = fs::read_to_string(&path).map_err(|e| Error::io("read", &path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Shard {
            path,
            msg: format!("invalid meta.json: {e}"),
        })
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The split hash of document `index` under `seed`: uniform in [0, 1).
/// (`splitmix64(splitmix64(seed) ^ index)`, top 53 bits.)
pub fn split_hash(seed: u64, index: u64) -> f64 {
    (splitmix64(splitmix64(seed) ^ index) >> 11) as f64 / (1u64 << 53) as f64
}

/// The deterministic train/val assignment of `n` documents.
///
/// Document `i` is val iff `split_hash(seed, i) < fraction`, with two corrections: when
/// `fraction > 0`, `n >= 2` and no document is val, the one with the smallest hash is; and when
/// every document would be val (`n >= 2`), the one with the largest hash stays in train.
#[derive(Debug, Clone, Copy)]
pub struct Split {
    seed: u64,
    fraction: f64,
    forced_val: Option<u64>,
    forced_train: Option<u64>,
}

impl Split {
    /// The assignment for `n` documents; `fraction` must be in [0, 1).
    pub fn new(seed: u64, n: u64, fraction: f64) -> Result<Split> {
        if !(0.0..1.0).contains(&fraction) {
            return Err(Error::Invalid(format!(
                "val fraction must be in [0, 1), got {fraction}"
            )));
        }
        let mut split = Split {
            seed,
            fraction,
            forced_val: None,
            forced_train: None,
        };
        if fraction > 0.0 && n >= 2 {
            let mut any_val = false;
            let mut any_train = false;
            let (mut min_i, mut min_h, mut max_i, mut max_h) = (0, f64::INFINITY, 0, -1.0);
            for i in 0..n {
                let h = split_hash(seed, i);
                if h < fraction {
                    any_val = true;
                } else {
                    any_train = true;
                }
                if h < min_h {
                    (min_i, min_h) = (i, h);
                }
                if h > max_h {
                    (max_i, max_h) = (i, h);
                }
            }
            if !any_val {
                split.forced_val = Some(min_i);
            }
            if !any_train {
                split.forced_train = Some(max_i);
            }
        }
        Ok(split)
    }

    /// Whether document `index` goes to the val split.
    pub fn is_val(&self, index: u64) -> bool {
        if self.forced_train == Some(index) {
            return false;
        }
        self.forced_val == Some(index) || split_hash(self.seed, index) < self.fraction
    }
}

/// Accumulates one split's token stream and writes it as shards.
struct SplitWriter<'a> {
    name: &'static str,
    dir: &'a Path,
    shard_tokens: usize,
    vocab_size: usize,
    fingerprint: &'a str,
    buf: Vec<u32>,
    files: Vec<String>,
    tokens: u64,
    documents: u64,
}

impl SplitWriter<'_> {
    fn push_document(&mut self, ids: &[u32]) -> Result<()> {
        self.documents += 1;
        self.push(&[special::EOT])?;
        self.push(ids)
    }

    fn push(&mut self, mut ids: &[u32]) -> Result<()> {
        while !ids.is_empty() {
            let room = self.shard_tokens - self.buf.len();
            let n = room.min(ids.len());
            self.buf.extend_from_slice(&ids[..n]);
            self.tokens += n as u64;
            ids = &ids[n..];
            if self.buf.len() == self.shard_tokens {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let name = shard_file_name(self.name, self.files.len());
        write_shard(
            &self.dir.join(&name),
            &self.buf,
            self.vocab_size,
            self.fingerprint,
        )?;
        self.files.push(name);
        self.buf.clear();
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        if !self.buf.is_empty() || self.files.is_empty() {
            self.flush()?;
        }
        Ok(())
    }
}

/// Removes the staging directory (with whatever is left in it) when dropped.
struct Staging {
    dir: PathBuf,
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Tokenizes `inputs` into train/val shards in `out_dir` (see the module docs).
///
/// `val_fraction` in [0, 1); `shard_tokens` > 0 ([`DEFAULT_SHARD_TOKENS`] is a good default);
/// `progress` shows a progress bar and prints a summary to stderr at the end.
#[allow(clippy::too_many_arguments)]
pub fn prepare(
    tokenizer: &Tokenizer,
    inputs: &[PathBuf],
    field: &str,
    out_dir: &Path,
    val_fraction: f64,
    seed: u64,
    shard_tokens: usize,
    progress: bool,
) -> Result<PrepareStats> {
    let t0 = Instant::now();
    if shard_tokens == 0 {
        return Err(Error::Invalid("shard_tokens must be > 0".into()));
    }
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(Error::Invalid(format!(
            "val fraction must be in [0, 1), got {val_fraction}"
        )));
    }
    let files = corpus::expand_inputs(inputs)?;

    // Pass 1: count documents and bytes (cheap next to encoding), to fix the split and progress.
    let mut n_docs = 0u64;
    let mut n_bytes = 0u64;
    for file in &files {
        corpus::for_each_document(file, field, |d| {
            n_docs += 1;
            n_bytes += d.len() as u64;
            Ok(())
        })?;
    }
    if n_docs == 0 {
        return Err(Error::NoText {
            what: describe_inputs(&files),
        });
    }
    let split = Split::new(seed, n_docs, val_fraction)?;

    fs::create_dir_all(out_dir).map_err(|e| Error::io("create output directory", out_dir, e))?;
    let staging_dir = out_dir.join(format!(".kiln-prepare-{}.tmp", std::process::id()));
    if staging_dir.exists() {
        fs::remove_dir_all(&staging_dir)
            .map_err(|e| Error::io("remove stale staging directory", &staging_dir, e))?;
    }
    fs::create_dir(&staging_dir)
        .map_err(|e| Error::io("create staging directory", &staging_dir, e))?;
    let staging = Staging {
        dir: staging_dir.clone(),
    };

    let bar = if progress {
        let bar = ProgressBar::new(n_bytes);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} \
                 {bytes_per_sec} ETA {eta}",
            )
            .expect("valid progress template"),
        );
        bar
    } else {
        ProgressBar::hidden()
    };

    let vocab_size = tokenizer.vocab_size();
    let fingerprint = tokenizer.fingerprint();
    let mk = |name| SplitWriter {
        name,
        dir: &staging_dir,
        shard_tokens,
        vocab_size,
        fingerprint,
        buf: Vec::new(),
        files: Vec::new(),
        tokens: 0,
        documents: 0,
    };
    // [train, val]
    let mut writers = [mk("train"), mk("val")];

    // Pass 2: encode in parallel batches, in document order.
    let mut index = 0u64;
    let mut batch: Vec<String> = Vec::new();
    let mut batch_bytes = 0usize;
    let process =
        |batch: &mut Vec<String>, index: &mut u64, writers: &mut [SplitWriter; 2]| -> Result<()> {
            // Cut long documents so a batch of few huge documents still uses every thread.
            let pieces: Vec<(usize, &str)> = batch
                .iter()
                .enumerate()
                .flat_map(|(d, text)| {
                    crate::tokenizer::split_for_parallel(text, PIECE_BYTES)
                        .into_iter()
                        .map(move |p| (d, p))
                })
                .collect();
            let encoded: Vec<Vec<u32>> = pieces
                .par_iter()
                .map(|(_, p)| tokenizer.encode(p))
                .collect();
            let mut doc_ids: Vec<Vec<u32>> = vec![Vec::new(); batch.len()];
            for ((d, _), ids) in pieces.iter().zip(encoded) {
                if doc_ids[*d].is_empty() {
                    doc_ids[*d] = ids;
                } else {
                    doc_ids[*d].extend_from_slice(&ids);
                }
            }
            for (ids, text) in doc_ids.iter().zip(batch.iter()) {
                if *index >= n_docs {
                    return Err(Error::Invalid(format!(
                        "the inputs changed during preparation (more than the {n_docs} documents \
                     counted): {}",
                        describe_inputs(&files)
                    )));
                }
                writers[split.is_val(*index) as usize].push_document(ids)?;
                *index += 1;
                bar.inc(text.len() as u64);
            }
            batch.clear();
            Ok(())
        };
    for file in &files {
        corpus::for_each_document(file, field, |doc| {
            batch_bytes += doc.len();
            batch.push(doc);
            if batch_bytes >= BATCH_BYTES {
                process(&mut batch, &mut index, &mut writers)?;
                batch_bytes = 0;
            }
            Ok(())
        })?;
    }
    process(&mut batch, &mut index, &mut writers)?;
    if index != n_docs {
        return Err(Error::Invalid(format!(
            "the inputs changed during preparation ({index} documents read, {n_docs} counted): {}",
            describe_inputs(&files)
        )));
    }
    for w in &mut writers {
        w.finish()?;
    }
    let [train, val] = writers;
    bar.finish_and_clear();

    let stats = PrepareStats {
        documents: n_docs,
        train_documents: train.documents,
        val_documents: val.documents,
        train_tokens: train.tokens,
        val_tokens: val.tokens,
        bytes: n_bytes,
        train_shards: train.files.len(),
        val_shards: val.files.len(),
        seconds: 0.0,
    };
    let meta = PrepareMeta {
        format: "kiln-tokens".into(),
        shard_version: shards::VERSION,
        tokenizer_fingerprint: fingerprint.to_string(),
        vocab_size,
        token_width: shards::token_width(vocab_size),
        eot_id: special::EOT,
        documents: stats.documents,
        train_documents: stats.train_documents,
        val_documents: stats.val_documents,
        train_tokens: stats.train_tokens,
        val_tokens: stats.val_tokens,
        bytes: stats.bytes,
        train_shards: train.files.clone(),
        val_shards: val.files.clone(),
        shard_tokens,
        seed,
        val_fraction,
        field: field.to_string(),
        inputs: files.iter().map(|p| p.display().to_string()).collect(),
    };
    let meta_json = serde_json::to_string_pretty(&meta).expect("meta serializes");
    atomic_write(&staging_dir.join(META_FILE), |w| {
        std::io::Write::write_all(w, meta_json.as_bytes())
    })?;

    commit(out_dir, &staging_dir, &train.files, &val.files)?;
    drop(staging); // removes the (now empty) staging directory

    let stats = PrepareStats {
        seconds: t0.elapsed().as_secs_f64(),
        ..stats
    };
    if progress {
        eprintln!(
            "prepared {} -> {}",
            describe_inputs(&files),
            out_dir.display()
        );
        eprintln!("{stats}");
    }
    Ok(stats)
}

/// Replaces the previous outputs of `out_dir` by the staged ones.
fn commit(out_dir: &Path, staging: &Path, train: &[String], val: &[String]) -> Result<()> {
    // meta.json goes first, so an interrupted commit never leaves a meta.json describing a mix of
    // old and new shards.
    let meta = out_dir.join(META_FILE);
    if meta.is_file() {
        fs::remove_file(&meta).map_err(|e| Error::io("remove old output", &meta, e))?;
    }
    let rd = fs::read_dir(out_dir).map_err(|e| Error::io("read directory", out_dir, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| Error::io("read directory", out_dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let old_shard = shards::shard_index(name, "train").is_some()
            || shards::shard_index(name, "val").is_some();
        if old_shard && entry.path().is_file() {
            let p = entry.path();
            fs::remove_file(&p).map_err(|e| Error::io("remove old output", &p, e))?;
        }
    }
    for name in train.iter().chain(val) {
        let (from, to) = (staging.join(name), out_dir.join(name));
        fs::rename(&from, &to).map_err(|e| Error::io("move into place", &to, e))?;
    }
    let (from, to) = (staging.join(META_FILE), out_dir.join(META_FILE));
    fs::rename(&from, &to).map_err(|e| Error::io("move into place", &to, e))?;
    crate::sync_parent_dir(&to);
    Ok(())
}
