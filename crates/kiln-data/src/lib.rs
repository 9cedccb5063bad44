//! kiln-data: the tokenizer and the corpus-preparation layer of Kiln.
//!
//! - [`tokenizer`]: a byte-level BPE tokenizer (GPT-2 style, HF `tokenizers`) with 8 fixed special
//!   tokens at ids 0..=7 ([`tokenizer::special`]).
//! - [`corpus`]: reading training text: plain text files (documents separated by blank lines),
//!   JSONL files (one document per line, taken from a string field), directories walked recursively.
//! - [`shards`]: the binary token-shard format (`KILNTOK\0`, version 1) the trainer memory-maps.
//! - [`prepare`]: corpus -> `train_NNN.bin` / `val_NNN.bin` shards + `meta.json`.
//! - [`bench`]: tokenizer training/encoding throughput benchmark.
//! - [`datasets`], [`template`]: instruction/chat/preference datasets (JSON, JSONL, Parquet via
//!   [`parquet_rows`]) and the chat template.
//!
//! Every error names the file (and, for parse errors, the 1-based line) it is about; every output
//! file is written to a temporary file that is fsynced and renamed into place, so a failure never
//! leaves a half-written output behind.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub mod bench;
pub mod chat_format;
pub mod corpus;
pub mod datasets;
pub mod parquet_rows;
pub mod prepare;
pub mod shards;
pub mod template;
pub mod tokenizer;

pub use bench::{bench_tokenizer, TokenizerBench};
pub use corpus::{expand_inputs, read_documents};
pub use prepare::{prepare, PrepareMeta, PrepareStats};
pub use shards::{write_shard, Shard, ShardSet};
pub use tokenizer::{special, SpecialOverrides, SpecialTokens, TextStream, Tokenizer};

/// Errors of the data layer. Messages name the file (and line, where there is one).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on `path` failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An input path does not exist.
    #[error("input not found: {}", path.display())]
    NotFound { path: PathBuf },
    /// Inputs that hold no usable text (an empty directory, only empty files, ...).
    #[error("no text found in {what}")]
    NoText { what: String },
    /// A line of an input file is not valid UTF-8.
    #[error("{}:{line}: invalid UTF-8 (byte offset {offset} within the line)", path.display())]
    InvalidUtf8 {
        path: PathBuf,
        line: usize,
        offset: usize,
    },
    /// A JSONL line that is not a JSON object, or lacks the requested string field.
    #[error("{}:{line}: {msg}", path.display())]
    Jsonl {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    /// A requested vocabulary size below 256 byte tokens + 8 specials.
    #[error("vocab size {requested} is too small: a byte-level BPE needs at least {min} (256 byte tokens + 8 special tokens)")]
    VocabTooSmall { requested: usize, min: usize },
    /// A tokenizer file that cannot be used (unparsable, wrong specials, not byte-level, ...).
    #[error("{}: invalid tokenizer: {msg}", path.display())]
    InvalidTokenizer { path: PathBuf, msg: String },
    /// An error reported by the HF `tokenizers` library.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A token shard that cannot be used (bad magic, version, truncated, mismatched...).
    #[error("{}: {msg}", path.display())]
    Shard { path: PathBuf, msg: String },
    /// An invalid argument.
    #[error("{0}")]
    Invalid(String),
}

/// Result alias of the data layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> Error {
        Error::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique temporary path beside `path` (same directory, so a rename is atomic), ending in `.tmp`.
pub(crate) fn temp_path_for(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// Writes `path` atomically: creates missing parent directories, writes to a temporary file beside
/// it, fsyncs it and renames it over `path`. On any error the temporary file is removed and `path`
/// is left untouched (the old file, if any, stays as it was).
pub fn atomic_write(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> Result<()> {
    if path.as_os_str().is_empty() {
        return Err(Error::Invalid("empty output path".into()));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| Error::io("create directory", parent, e))?;
    }
    if path.is_dir() {
        return Err(Error::io(
            "write",
            path,
            io::Error::other("it is an existing directory"),
        ));
    }
    let tmp = temp_path_for(path);
    let result = (|| -> Result<()> {
        let file = File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write(&mut w).map_err(|e| Error::io("write", &tmp, e))?;
        w.flush().map_err(|e| Error::io("write", &tmp, e))?;
        let file = w
            .into_inner()
            .map_err(|e| Error::io("write", &tmp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io("sync", &tmp, e))?;
        drop(file);
        fs::rename(&tmp, path).map_err(|e| Error::io("rename into place", path, e))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    } else {
        sync_parent_dir(path);
    }
    result
}

/// Best-effort fsync of the directory holding `path` (makes a rename durable on POSIX systems).
pub(crate) fn sync_parent_dir(path: &Path) {
    #[cfg(unix)]
    if let Some(parent) = path.parent() {
        let dir = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

impl template::TextEncoder for tokenizer::Tokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        tokenizer::Tokenizer::encode(self, text)
    }
}
