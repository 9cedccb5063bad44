//! Reading training text.
//!
//! Input formats, chosen by file name:
//! - `*.jsonl` (and `*.jsonl.gz`): one JSON object per line; the document is the string in `field`
//!   (default `"text"`). Blank lines are skipped; a line that is not a JSON object, or lacks the
//!   field, or whose field is not a string, is an error naming the file and line. Empty strings are
//!   skipped.
//! - `*.json`: rejected (a JSON document is not a text corpus; see [`crate::datasets`] for
//!   instruction/chat data).
//! - anything else (`*.txt`, `*.md`, any explicitly named file; `*.gz` is decompressed): plain
//!   UTF-8 text, split into documents at blank lines (lines that are empty or only whitespace).
//!   Inside a document, lines are joined with `\n` (a `\r\n` line ending counts as `\n`); a leading
//!   UTF-8 byte-order mark is dropped.
//!
//! Invalid UTF-8 is an error naming the file and the 1-based line.
//! Directories are walked recursively (sorted, hidden entries skipped, symlinked directories not
//! followed) for `.txt`, `.md`, `.jsonl` files and their `.gz` variants.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use crate::{Error, Result};

/// File extensions picked up when a directory is walked (each also with a `.gz` suffix).
pub const DIR_EXTENSIONS: [&str; 3] = ["txt", "md", "jsonl"];

/// How a file's contents are split into documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    /// Plain text; documents separated by blank lines.
    Text,
    /// JSON lines; one document per line, from a string field.
    Jsonl,
}

/// The format of `path` (from its name) and whether it is gzip-compressed.
pub fn input_format(path: &Path) -> (InputFormat, bool) {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let (stem, gz) = match name.strip_suffix(".gz") {
        Some(stem) => (stem.to_string(), true),
        None => (name, false),
    };
    let format = if stem.ends_with(".jsonl") {
        InputFormat::Jsonl
    } else {
        InputFormat::Text
    };
    (format, gz)
}

fn is_json_document(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    name.ends_with(".json") || name.ends_with(".json.gz")
}

fn is_corpus_file_name(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let stem = name.strip_suffix(".gz").unwrap_or(&name);
    DIR_EXTENSIONS
        .iter()
        .any(|ext| stem.len() > ext.len() + 1 && stem.ends_with(&format!(".{ext}")))
}

/// Expands files and directories into the list of files to read.
///
/// Files are kept as given (any name; the format follows [`input_format`]); directories are walked
/// recursively for [`DIR_EXTENSIONS`] files, in sorted order. Duplicates are dropped (first one
/// wins). Errors: no inputs, a missing path, a directory without any such file.
pub fn expand_inputs(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    if paths.is_empty() {
        return Err(Error::Invalid("no input files given".into()));
    }
    let mut out: Vec<PathBuf> = Vec::new();
    for path in paths {
        let meta = fs::metadata(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound { path: path.clone() }
            } else {
                Error::io("read", path, e)
            }
        })?;
        if meta.is_dir() {
            let before = out.len();
            walk_dir(path, &mut out)?;
            if out.len() == before {
                return Err(Error::NoText {
                    what: format!(
                        "directory {}: it contains no .txt, .md or .jsonl files (searched recursively)",
                        path.display()
                    ),
                });
            }
        } else {
            out.push(path.clone());
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(fs::canonicalize(p).unwrap_or_else(|_| p.clone())));
    Ok(out)
}

fn walk_dir(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let rd = fs::read_dir(dir).map_err(|e| Error::io("read directory", dir, e))?;
    let mut entries = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io("read directory", dir, e))?;
        entries.push(entry);
    }
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let ft = entry
            .file_type()
            .map_err(|e| Error::io("read directory", dir, e))?;
        if ft.is_dir() {
            walk_dir(&path, out)?;
        } else if (ft.is_file() || (ft.is_symlink() && path.is_file()))
            && is_corpus_file_name(&path)
        {
            out.push(path);
        }
    }
    Ok(())
}

fn open_reader(path: &Path) -> Result<Box<dyn BufRead>> {
    let file = File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            Error::io("open", path, e)
        }
    })?;
    let (_, gz) = input_format(path);
    let reader: Box<dyn Read> = if gz {
        Box::new(MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    Ok(Box::new(BufReader::with_capacity(1 << 20, reader)))
}

/// Calls `f` on every document of `path`, in file order (see the module docs for the formats).
/// Streams the file: memory is bounded by the largest document.
pub fn for_each_document(
    path: &Path,
    field: &str,
    mut f: impl FnMut(String) -> Result<()>,
) -> Result<()> {
    let (format, _) = input_format(path);
    if is_json_document(path) {
        return Err(Error::Invalid(format!(
            "{}: a .json file is not a text corpus; use .jsonl (one JSON object per line) or \
             plain text",
            path.display()
        )));
    }
    let mut reader = open_reader(path)?;
    let mut buf: Vec<u8> = Vec::new();
    let mut doc = String::new();
    let mut line_no = 0usize;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| Error::io("read", path, e))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if buf.last() == Some(&b'\n') {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
        }
        let mut bytes = &buf[..];
        if line_no == 1 {
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        }
        let line = std::str::from_utf8(bytes).map_err(|e| Error::InvalidUtf8 {
            path: path.to_path_buf(),
            line: line_no,
            offset: e.valid_up_to(),
        })?;
        match format {
            InputFormat::Text => {
                if line.trim().is_empty() {
                    if !doc.is_empty() {
                        f(std::mem::take(&mut doc))?;
                    }
                } else {
                    if !doc.is_empty() {
                        doc.push('\n');
                    }
                    doc.push_str(line);
                }
            }
            InputFormat::Jsonl => {
                if line.trim().is_empty() {
                    continue;
                }
                if let Some(text) = jsonl_field(path, line_no, line, field)? {
                    if !text.is_empty() {
                        f(text)?;
                    }
                }
            }
        }
    }
    if !doc.is_empty() {
        f(doc)?;
    }
    Ok(())
}

fn jsonl_field(path: &Path, line_no: usize, line: &str, field: &str) -> Result<Option<String>> {
    let err = |msg: String| Error::Jsonl {
        path: path.to_path_buf(),
        line: line_no,
        msg,
    };
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| err(format!("malformed JSON: {e}")))?;
    let serde_json::Value::Object(mut map) = value else {
        return Err(err("expected a JSON object".into()));
    };
    match map.remove(field) {
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(serde_json::Value::Null) | None => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            Err(err(format!(
                "missing string field \"{field}\" (keys present: {keys:?})"
            )))
        }
        Some(other) => Err(err(format!(
            "field \"{field}\" is not a string (found {})",
            json_kind(&other)
        ))),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// All documents of one file (see the module docs for the formats). An empty file gives an empty
/// list; callers decide whether that is an error.
pub fn read_documents(path: &Path, field: &str) -> Result<Vec<String>> {
    let mut docs = Vec::new();
    for_each_document(path, field, |d| {
        docs.push(d);
        Ok(())
    })?;
    Ok(docs)
}

/// Short description of a list of inputs for error messages.
pub(crate) fn describe_inputs(paths: &[PathBuf]) -> String {
    let shown: Vec<String> = paths
        .iter()
        .take(5)
        .map(|p| p.display().to_string())
        .collect();
    let more = paths.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} (and {more} more)", shown.join(", "))
    } else {
        shown.join(", ")
    }
}
