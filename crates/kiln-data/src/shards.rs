//! Token shards: the binary format the trainer memory-maps.
//!
//! A shard is one file: a 64-byte header, then `count` tokens. All integers are little endian.
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0  | 8  | magic `b"KILNTOK\0"` |
//! | 8  | 4  | format version, `u32` = 1 |
//! | 12 | 4  | token width in bytes, `u32`: 2 (`u16` tokens, when vocab_size <= 65536) or 4 (`u32`) |
//! | 16 | 4  | vocab_size, `u32` (every token is `< vocab_size`) |
//! | 20 | 8  | token count, `u64` |
//! | 28 | 16 | tokenizer fingerprint: ASCII hex, zero-padded |
//! | 44 | 20 | reserved, zero |
//! | 64 | count * width | tokens |
//!
//! The file size must be exactly `64 + count * width`. A split (`train`, `val`) is stored as
//! `{split}_000.bin`, `{split}_001.bin`, ... in one directory and read as one stream by
//! [`ShardSet`] (each document there starts after an `<|endoftext|>` token).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::{atomic_write, Error, Result};

/// Shard magic bytes.
pub const MAGIC: [u8; 8] = *b"KILNTOK\0";
/// Shard format version written and read by this build.
pub const VERSION: u32 = 1;
/// Header size in bytes.
pub const HEADER_LEN: usize = 64;
/// Size of the fingerprint field.
pub const FINGERPRINT_FIELD: usize = 16;

/// Token width (bytes) used for a vocabulary size: 2 when every id fits a `u16`, else 4.
pub fn token_width(vocab_size: usize) -> usize {
    if vocab_size <= 1 << 16 {
        2
    } else {
        4
    }
}

/// The shard header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardHeader {
    pub version: u32,
    pub token_width: u32,
    pub vocab_size: u32,
    pub count: u64,
    pub fingerprint: String,
}

impl ShardHeader {
    fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&self.version.to_le_bytes());
        h[12..16].copy_from_slice(&self.token_width.to_le_bytes());
        h[16..20].copy_from_slice(&self.vocab_size.to_le_bytes());
        h[20..28].copy_from_slice(&self.count.to_le_bytes());
        let fp = self.fingerprint.as_bytes();
        h[28..28 + fp.len()].copy_from_slice(fp);
        h
    }

    fn parse(h: &[u8], path: &Path) -> Result<ShardHeader> {
        let err = |msg: String| Error::Shard {
            path: path.to_path_buf(),
            msg,
        };
        if h[0..8] != MAGIC {
            return Err(err(format!(
                "not a kiln token shard (bad magic {:?}, expected {:?})",
                String::from_utf8_lossy(&h[0..8]),
                String::from_utf8_lossy(&MAGIC)
            )));
        }
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
        let version = u32_at(8);
        if version != VERSION {
            return Err(err(format!(
                "unsupported shard format version {version} (this build reads version {VERSION})"
            )));
        }
        let token_width = u32_at(12);
        if token_width != 2 && token_width != 4 {
            return Err(err(format!(
                "invalid token width {token_width} (must be 2 or 4)"
            )));
        }
        let vocab_size = u32_at(16);
        if vocab_size == 0 {
            return Err(err("invalid vocab size 0".into()));
        }
        if token_width == 2 && vocab_size as usize > 1 << 16 {
            return Err(err(format!(
                "vocab size {vocab_size} does not fit 2-byte tokens"
            )));
        }
        let count = u64::from_le_bytes(h[20..28].try_into().unwrap());
        let fp_field = &h[28..28 + FINGERPRINT_FIELD];
        let fp_len = fp_field
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(FINGERPRINT_FIELD);
        if fp_field[fp_len..].iter().any(|&b| b != 0) || !fp_field[..fp_len].is_ascii() {
            return Err(err("corrupt fingerprint field".into()));
        }
        let fingerprint = String::from_utf8(fp_field[..fp_len].to_vec()).unwrap();
        Ok(ShardHeader {
            version,
            token_width,
            vocab_size,
            count,
            fingerprint,
        })
    }
}

/// Writes a shard atomically (temp file + fsync + rename). Every token must be `< vocab_size`;
/// `fingerprint` is ASCII of at most 16 bytes (normally [`crate::Tokenizer::fingerprint`]).
pub fn write_shard(
    path: &Path,
    tokens: &[u32],
    vocab_size: usize,
    fingerprint: &str,
) -> Result<()> {
    let err = |msg: String| Error::Shard {
        path: path.to_path_buf(),
        msg,
    };
    if vocab_size == 0 || vocab_size > u32::MAX as usize {
        return Err(err(format!("invalid vocab size {vocab_size}")));
    }
    if fingerprint.len() > FINGERPRINT_FIELD
        || !fingerprint.is_ascii()
        || fingerprint.contains('\0')
    {
        return Err(err(format!(
            "invalid fingerprint {fingerprint:?} (ASCII, at most {FINGERPRINT_FIELD} bytes)"
        )));
    }
    if let Some((i, &t)) = tokens
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab_size)
    {
        return Err(err(format!(
            "token {t} at index {i} is out of range for vocab size {vocab_size}"
        )));
    }
    let width = token_width(vocab_size);
    let header = ShardHeader {
        version: VERSION,
        token_width: width as u32,
        vocab_size: vocab_size as u32,
        count: tokens.len() as u64,
        fingerprint: fingerprint.to_string(),
    };
    atomic_write(path, |w| {
        w.write_all(&header.to_bytes())?;
        let mut buf = Vec::with_capacity(1 << 16);
        for chunk in tokens.chunks(1 << 15) {
            buf.clear();
            if width == 2 {
                for &t in chunk {
                    buf.extend_from_slice(&(t as u16).to_le_bytes());
                }
            } else {
                for &t in chunk {
                    buf.extend_from_slice(&t.to_le_bytes());
                }
            }
            w.write_all(&buf)?;
        }
        Ok(())
    })
}

/// One memory-mapped shard.
pub struct Shard {
    path: PathBuf,
    mmap: Mmap,
    header: ShardHeader,
    width: usize,
    len: usize,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("path", &self.path)
            .field("header", &self.header)
            .finish()
    }
}

impl Shard {
    /// Opens and validates a shard (magic, version, width, exact file size).
    pub fn open(path: &Path) -> Result<Shard> {
        let err = |msg: String| Error::Shard {
            path: path.to_path_buf(),
            msg,
        };
        let file = File::open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound {
                    path: path.to_path_buf(),
                }
            } else {
                Error::io("open shard", path, e)
            }
        })?;
        let size = file
            .metadata()
            .map_err(|e| Error::io("read shard", path, e))?
            .len();
        if size < HEADER_LEN as u64 {
            return Err(err(format!(
                "truncated: the file is {size} bytes, smaller than the {HEADER_LEN}-byte header"
            )));
        }
        // SAFETY: the file is opened read-only; shards are written once (temp + rename) and never
        // modified in place, so the mapping is not mutated while in use.
        let mmap =
            unsafe { Mmap::map(&file) }.map_err(|e| Error::io("memory-map shard", path, e))?;
        let header = ShardHeader::parse(&mmap[..HEADER_LEN], path)?;
        let width = header.token_width as usize;
        let expected = header
            .count
            .checked_mul(width as u64)
            .and_then(|b| b.checked_add(HEADER_LEN as u64));
        if expected != Some(size) {
            return Err(err(format!(
                "truncated or corrupt: the header says {} tokens of {width} bytes ({} bytes in \
                 all) but the file is {size} bytes",
                header.count,
                expected.map_or("too many".to_string(), |e| e.to_string())
            )));
        }
        let len = usize::try_from(header.count).map_err(|_| err("too many tokens".into()))?;
        // A damaged token (a flipped bit) would index past the embedding table; one pass over the
        // data (memory bandwidth, far less than one training epoch) finds it now, with its place.
        let vocab = header.vocab_size;
        let data = &mmap[HEADER_LEN..];
        let bad = if width == 2 {
            data.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
                .position(|t| t >= vocab)
        } else {
            data.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .position(|t| t >= vocab)
        };
        if let Some(i) = bad {
            let o = HEADER_LEN + i * width;
            let t = if width == 2 {
                u16::from_le_bytes([mmap[o], mmap[o + 1]]) as u32
            } else {
                u32::from_le_bytes([mmap[o], mmap[o + 1], mmap[o + 2], mmap[o + 3]])
            };
            return Err(err(format!(
                "corrupt: token {t} at index {i} (byte offset {o}) is out of range for the \
                 vocab size {vocab} in the header"
            )));
        }
        Ok(Shard {
            path: path.to_path_buf(),
            mmap,
            header,
            width,
            len,
        })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the shard holds no token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Token `i`. Panics if `i >= len()`.
    pub fn get(&self, i: usize) -> u32 {
        assert!(
            i < self.len,
            "token index {i} out of range for shard {} of {} tokens",
            self.path.display(),
            self.len
        );
        let o = HEADER_LEN + i * self.width;
        let b = &self.mmap[o..o + self.width];
        if self.width == 2 {
            u16::from_le_bytes([b[0], b[1]]) as u32
        } else {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }
    }

    /// Copies tokens `start..start + out.len()` into `out`. Panics if the range is out of bounds.
    pub fn read(&self, start: usize, out: &mut [u32]) {
        let end = start.checked_add(out.len()).filter(|&e| e <= self.len);
        assert!(
            end.is_some(),
            "token range {start}..{}+{} out of range for shard {} of {} tokens",
            start,
            out.len(),
            self.path.display(),
            self.len
        );
        let a = HEADER_LEN + start * self.width;
        let bytes = &self.mmap[a..a + out.len() * self.width];
        if self.width == 2 {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = u16::from_le_bytes([c[0], c[1]]) as u32;
            }
        } else {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }

    /// All tokens, copied out.
    pub fn to_vec(&self) -> Vec<u32> {
        let mut v = vec![0; self.len];
        self.read(0, &mut v);
        v
    }

    /// Vocabulary size recorded in the header.
    pub fn vocab_size(&self) -> usize {
        self.header.vocab_size as usize
    }

    /// Tokenizer fingerprint recorded in the header.
    pub fn fingerprint(&self) -> &str {
        &self.header.fingerprint
    }

    /// Token width in bytes (2 or 4).
    pub fn token_width(&self) -> usize {
        self.width
    }

    /// The header.
    pub fn header(&self) -> &ShardHeader {
        &self.header
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Parses `{split}_{digits}.bin` file names, giving the shard index.
pub fn shard_index(file_name: &str, split: &str) -> Option<usize> {
    let digits = file_name
        .strip_prefix(split)?
        .strip_prefix('_')?
        .strip_suffix(".bin")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// File name of shard `index` of `split`: `train_000.bin`, ...
pub fn shard_file_name(split: &str, index: usize) -> String {
    format!("{split}_{index:03}.bin")
}

/// All shards of one split, read as one token stream.
#[derive(Debug)]
pub struct ShardSet {
    shards: Vec<Shard>,
    /// `starts[i]`: stream offset of shard `i`; `starts[n]` = total length.
    starts: Vec<usize>,
}

impl ShardSet {
    /// Opens `dir/{split}_000.bin`, `dir/{split}_001.bin`, ... (numbered contiguously from 0).
    /// All shards must agree on vocab size and fingerprint.
    pub fn open_dir(dir: &Path, split: &str) -> Result<ShardSet> {
        if split.is_empty() || split.contains(['/', '\\']) {
            return Err(Error::Invalid(format!("invalid split name {split:?}")));
        }
        let rd = std::fs::read_dir(dir).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound {
                    path: dir.to_path_buf(),
                }
            } else {
                Error::io("read directory", dir, e)
            }
        })?;
        let mut found: Vec<(usize, PathBuf)> = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| Error::io("read directory", dir, e))?;
            if let Some(i) = entry
                .file_name()
                .to_str()
                .and_then(|n| shard_index(n, split))
            {
                found.push((i, entry.path()));
            }
        }
        if found.is_empty() {
            return Err(Error::Shard {
                path: dir.to_path_buf(),
                msg: format!("no {split} shards ({split}_000.bin, ...) in this directory"),
            });
        }
        found.sort();
        for (expect, (i, _)) in found.iter().enumerate() {
            if *i != expect {
                return Err(Error::Shard {
                    path: dir.to_path_buf(),
                    msg: format!(
                        "{split} shards are not numbered contiguously: {} is missing",
                        shard_file_name(split, expect)
                    ),
                });
            }
        }
        let shards = found
            .iter()
            .map(|(_, p)| Shard::open(p))
            .collect::<Result<Vec<_>>>()?;
        Self::from_shards(shards)
    }

    /// A set from already-opened shards (in stream order). They must agree on vocab size and
    /// fingerprint; at least one shard is required.
    pub fn from_shards(shards: Vec<Shard>) -> Result<ShardSet> {
        let Some(first) = shards.first() else {
            return Err(Error::Invalid(
                "a shard set needs at least one shard".into(),
            ));
        };
        for s in &shards[1..] {
            if s.vocab_size() != first.vocab_size() || s.fingerprint() != first.fingerprint() {
                return Err(Error::Shard {
                    path: s.path.clone(),
                    msg: format!(
                        "vocab size {} / tokenizer fingerprint {:?} differ from {} ({} / {:?})",
                        s.vocab_size(),
                        s.fingerprint(),
                        first.path.display(),
                        first.vocab_size(),
                        first.fingerprint()
                    ),
                });
            }
        }
        let mut starts = Vec::with_capacity(shards.len() + 1);
        let mut total = 0usize;
        for s in &shards {
            starts.push(total);
            total += s.len();
        }
        starts.push(total);
        Ok(ShardSet { shards, starts })
    }

    /// Total number of tokens.
    pub fn len(&self) -> usize {
        *self.starts.last().unwrap()
    }

    /// Whether the split holds no token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Vocabulary size (shared by all shards).
    pub fn vocab_size(&self) -> usize {
        self.shards[0].vocab_size()
    }

    /// Tokenizer fingerprint (shared by all shards).
    pub fn fingerprint(&self) -> &str {
        self.shards[0].fingerprint()
    }

    /// Errors unless the shards were written with the tokenizer of fingerprint `fingerprint`.
    pub fn check_fingerprint(&self, fingerprint: &str) -> Result<()> {
        if self.fingerprint() != fingerprint {
            return Err(Error::Shard {
                path: self.shards[0].path.clone(),
                msg: format!(
                    "written with tokenizer {:?}, but the tokenizer in use is {fingerprint:?}: \
                     re-run data preparation with this tokenizer",
                    self.fingerprint()
                ),
            });
        }
        Ok(())
    }

    /// The shards, in stream order.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// Token `i` of the stream. Panics if out of range.
    pub fn get(&self, i: usize) -> u32 {
        assert!(
            i < self.len(),
            "token index {i} out of range ({} tokens)",
            self.len()
        );
        let s = self.starts.partition_point(|&st| st <= i) - 1;
        self.shards[s].get(i - self.starts[s])
    }

    /// Copies stream tokens `start..start + out.len()` into `out`, across shard boundaries.
    /// Panics if the range is out of bounds.
    pub fn read(&self, start: usize, out: &mut [u32]) {
        let end = start.checked_add(out.len()).filter(|&e| e <= self.len());
        assert!(
            end.is_some(),
            "token range {start}+{} out of range ({} tokens)",
            out.len(),
            self.len()
        );
        if out.is_empty() {
            return;
        }
        let mut s = self.starts.partition_point(|&st| st <= start) - 1;
        let mut pos = start;
        let mut done = 0;
        while done < out.len() {
            // Skip empty shards.
            while self.starts[s + 1] <= pos {
                s += 1;
            }
            let local = pos - self.starts[s];
            let n = (self.shards[s].len() - local).min(out.len() - done);
            self.shards[s].read(local, &mut out[done..done + n]);
            done += n;
            pos += n;
        }
    }
}
