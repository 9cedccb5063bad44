//! Byte-level BPE tokenizer (GPT-2 style) over the HF `tokenizers` crate.
//!
//! Pipeline: no normalizer; `ByteLevel` pre-tokenizer (GPT-2 regex, no prefix space); BPE model
//! whose base vocabulary holds all 256 byte symbols (so no input is ever unknown); `ByteLevel`
//! decoder. Hence `decode(encode(s)) == s` for every string `s`.
//!
//! The 8 special tokens of [`special`] are added first, so they always have ids 0..=7. They are
//! never produced by [`Tokenizer::encode`]: text that happens to contain `<|end|>` is encoded as
//! ordinary bytes (so user text cannot forge a turn boundary). Build sequences with special tokens
//! by pushing the ids of [`special`] yourself, or use [`Tokenizer::encode_with_specials`].

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use rayon::prelude::*;
use sha2::{Digest, Sha256};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::AddedToken;

use crate::corpus::{self, describe_inputs};
use crate::{atomic_write, Error, Result};

/// The fixed special tokens (ids 0..=7).
pub mod special {
    /// `<|endoftext|>`: document separator; every document in the shards starts after one.
    pub const EOT: u32 = 0;
    /// `<|pad|>`: padding.
    pub const PAD: u32 = 1;
    /// `<|system|>`: starts a system turn.
    pub const SYSTEM: u32 = 2;
    /// `<|user|>`: starts a user turn.
    pub const USER: u32 = 3;
    /// `<|assistant|>`: starts an assistant turn.
    pub const ASSISTANT: u32 = 4;
    /// `<|end|>`: end of a turn.
    pub const END: u32 = 5;
    /// `<|mask|>`: mask.
    pub const MASK: u32 = 6;
    /// `<|sep|>`: separator.
    pub const SEP: u32 = 7;
    /// The token strings, indexed by id.
    pub const NAMES: [&str; 8] = [
        "<|endoftext|>",
        "<|pad|>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|end|>",
        "<|mask|>",
        "<|sep|>",
    ];
    /// Number of special tokens (they occupy ids `0..COUNT`).
    pub const COUNT: u32 = 8;

    /// Whether `id` is one of the special tokens.
    pub fn is_special(id: u32) -> bool {
        id < COUNT
    }
}

/// Smallest allowed vocabulary: 256 byte tokens + the 8 specials.
pub const MIN_VOCAB_SIZE: usize = 256 + special::COUNT as usize;

/// Length of [`Tokenizer::fingerprint`] in hex characters.
pub const FINGERPRINT_LEN: usize = 16;

/// Counts of what a training run read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrainStats {
    /// Documents fed to the trainer.
    pub documents: u64,
    /// UTF-8 bytes of those documents.
    pub bytes: u64,
}

/// A tokenizer: Kiln's own byte-level BPE with the fixed [`special`] tokens at ids 0..=7, or any
/// other `tokenizer.json` the `tokenizers` crate loads (see [`Tokenizer::load_dir`]), whose special
/// tokens are known by their roles ([`SpecialTokens`]).
#[derive(Clone)]
pub struct Tokenizer {
    /// Special-token strings in text are encoded as text.
    inner: Arc<tokenizers::Tokenizer>,
    /// Another tokenizer's pipeline that turns special-token strings into their ids (trusted text:
    /// rendered chat templates); `None` for Kiln's own tokenizers.
    foreign: Option<Arc<tokenizers::Tokenizer>>,
    specials: SpecialTokens,
    fingerprint: String,
    vocab_size: usize,
    /// Fast equivalent of the HF encoding pipeline (None: use HF).
    fast: Option<Arc<fast::FastBpe>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

fn untrained() -> tokenizers::Tokenizer {
    let mut tok = tokenizers::Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::new(false, true, true)));
    tok
}

fn check_vocab_size(vocab_size: usize) -> Result<()> {
    if vocab_size < MIN_VOCAB_SIZE {
        return Err(Error::VocabTooSmall {
            requested: vocab_size,
            min: MIN_VOCAB_SIZE,
        });
    }
    if vocab_size > u32::MAX as usize {
        return Err(Error::Invalid(format!(
            "vocab size {vocab_size} is too large"
        )));
    }
    Ok(())
}

/// Iterator over the documents of a list of files, read one file at a time; the first read error
/// ends the iteration and is left in `error`.
struct FileDocs {
    files: std::vec::IntoIter<PathBuf>,
    current: std::vec::IntoIter<String>,
    field: String,
    error: Arc<Mutex<Option<Error>>>,
    stats: Arc<Mutex<TrainStats>>,
}

impl Iterator for FileDocs {
    type Item = String;
    fn next(&mut self) -> Option<String> {
        loop {
            if let Some(doc) = self.current.next() {
                let mut s = self.stats.lock().unwrap();
                s.documents += 1;
                s.bytes += doc.len() as u64;
                return Some(doc);
            }
            let file = self.files.next()?;
            match corpus::read_documents(&file, &self.field) {
                Ok(docs) => self.current = docs.into_iter(),
                Err(e) => {
                    *self.error.lock().unwrap() = Some(e);
                    self.files = Vec::new().into_iter();
                    return None;
                }
            }
        }
    }
}

impl Tokenizer {
    /// Trains a byte-level BPE of (at most) `vocab_size` tokens, specials included, on the
    /// documents of `files` (files or directories, see [`corpus::expand_inputs`]; `field` is the
    /// JSONL text field). Files are read one at a time.
    ///
    /// A corpus too small to learn `vocab_size - 264` merges gives a smaller vocabulary.
    pub fn train(files: &[PathBuf], field: &str, vocab_size: usize) -> Result<Tokenizer> {
        Self::train_with_stats(files, field, vocab_size).map(|(t, _)| t)
    }

    /// [`Tokenizer::train`], also returning how many documents and bytes were read.
    pub fn train_with_stats(
        files: &[PathBuf],
        field: &str,
        vocab_size: usize,
    ) -> Result<(Tokenizer, TrainStats)> {
        check_vocab_size(vocab_size)?;
        let files = corpus::expand_inputs(files)?;
        let error = Arc::new(Mutex::new(None));
        let stats = Arc::new(Mutex::new(TrainStats::default()));
        let docs = FileDocs {
            files: files.clone().into_iter(),
            current: Vec::new().into_iter(),
            field: field.to_string(),
            error: error.clone(),
            stats: stats.clone(),
        };
        let result = Self::train_inner(docs, vocab_size);
        if let Some(e) = error.lock().unwrap().take() {
            return Err(e);
        }
        let stats = *stats.lock().unwrap();
        if stats.documents == 0 {
            return Err(Error::NoText {
                what: describe_inputs(&files),
            });
        }
        Ok((result?, stats))
    }

    /// Trains on in-memory texts (one document each).
    pub fn train_from_texts<I, S>(texts: I, vocab_size: usize) -> Result<Tokenizer>
    where
        I: IntoIterator<Item = S>,
        I::IntoIter: Send,
        S: AsRef<str> + Send,
    {
        check_vocab_size(vocab_size)?;
        let count = std::sync::atomic::AtomicU64::new(0);
        let tok = Self::train_inner(
            texts.into_iter().inspect(|_| {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }),
            vocab_size,
        )?;
        if count.into_inner() == 0 {
            return Err(Error::NoText {
                what: "the training texts (none given)".into(),
            });
        }
        Ok(tok)
    }

    fn train_inner<I, S>(texts: I, vocab_size: usize) -> Result<Tokenizer>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        let specials: Vec<AddedToken> = special::NAMES
            .iter()
            .map(|s| AddedToken::from(*s, true))
            .collect();
        let trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(0)
            .show_progress(false)
            .special_tokens(specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut trainer = TrainerWrapper::from(trainer);
        let mut inner = untrained();
        inner
            .train(&mut trainer, texts)
            .map_err(|e| Error::Tokenizer(format!("training failed: {e}")))?;
        Self::from_inner(inner).map_err(|msg| Error::Tokenizer(format!("after training: {msg}")))
    }

    /// Wraps and validates an HF tokenizer: the 8 specials at ids 0..=7, a BPE model with
    /// ByteLevel pre-tokenizer and decoder, all 256 byte symbols in the vocab, dense ids.
    fn from_inner(mut inner: tokenizers::Tokenizer) -> std::result::Result<Tokenizer, String> {
        if !matches!(inner.get_model(), ModelWrapper::BPE(_)) {
            return Err("the model is not BPE".into());
        }
        if !matches!(
            inner.get_pre_tokenizer(),
            Some(PreTokenizerWrapper::ByteLevel(_))
        ) {
            return Err("the pre-tokenizer is not ByteLevel (not a byte-level BPE)".into());
        }
        if !matches!(inner.get_decoder(), Some(DecoderWrapper::ByteLevel(_))) {
            return Err("the decoder is not ByteLevel (not a byte-level BPE)".into());
        }
        if inner.get_normalizer().is_some() {
            return Err("unexpected normalizer (kiln tokenizers have none)".into());
        }
        let added = inner.get_added_tokens_decoder();
        for (id, name) in special::NAMES.iter().enumerate() {
            let id = id as u32;
            match inner.token_to_id(name) {
                Some(got) if got == id => {}
                Some(got) => {
                    return Err(format!(
                        "special token {name} has id {got}, expected {id} (kiln needs the 8 \
                         specials at ids 0..=7)"
                    ))
                }
                None => return Err(format!("special token {name} (id {id}) is missing")),
            }
            if !added.get(&id).is_some_and(|t| t.special) {
                return Err(format!(
                    "{name} (id {id}) is not registered as a special token"
                ));
            }
        }
        let vocab = inner.get_vocab(true);
        for c in ByteLevel::alphabet() {
            if !vocab.contains_key(&c.to_string()) {
                return Err(format!(
                    "byte symbol {c:?} is missing from the vocab (not a byte-level BPE)"
                ));
            }
        }
        let max_id = vocab.values().copied().max().unwrap_or(0) as usize;
        if max_id + 1 != vocab.len() {
            return Err(format!(
                "token ids are not dense: {} tokens but max id {max_id}",
                vocab.len()
            ));
        }
        inner.set_encode_special_tokens(true);
        let json = inner
            .to_string(false)
            .map_err(|e| format!("cannot serialize: {e}"))?;
        let digest = Sha256::digest(json.as_bytes());
        let fingerprint: String = digest
            .iter()
            .take(FINGERPRINT_LEN / 2)
            .map(|b| format!("{b:02x}"))
            .collect();
        let fast = serde_json::from_str(&json)
            .ok()
            .and_then(|v| fast::FastBpe::from_json(&v))
            .map(Arc::new);
        Ok(Tokenizer {
            inner: Arc::new(inner),
            foreign: None,
            specials: SpecialTokens::kiln(),
            fingerprint,
            vocab_size: vocab.len(),
            fast,
        })
    }

    /// Wraps any tokenizer the `tokenizers` crate loaded, with its special tokens given by role.
    /// Encoding goes through the library's own pipeline. Fails when `specials` names no
    /// end-of-sequence token or an id outside the vocabulary.
    pub fn from_hf(
        inner: tokenizers::Tokenizer,
        specials: SpecialTokens,
    ) -> std::result::Result<Tokenizer, String> {
        let vocab = inner.get_vocab(true);
        let vocab_size = vocab.values().copied().max().map_or(0, |m| m as usize + 1);
        if vocab_size == 0 {
            return Err("the vocabulary is empty".into());
        }
        if specials.eos.is_empty() {
            return Err(
                "no end-of-sequence token: set eos_token in tokenizer_config.json (or \
                 eos_token_id in generation_config.json), or pass --eos-token"
                    .into(),
            );
        }
        for (role, id) in specials.roles() {
            if id as usize >= vocab_size {
                return Err(format!(
                    "the {role} token id {id} is outside the vocabulary ({vocab_size} tokens)"
                ));
            }
        }
        let json = inner
            .to_string(false)
            .map_err(|e| format!("cannot serialize: {e}"))?;
        let digest = Sha256::digest(json.as_bytes());
        let fingerprint: String = digest
            .iter()
            .take(FINGERPRINT_LEN / 2)
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        let mut parsing = inner;
        parsing.set_encode_special_tokens(false);
        Ok(Tokenizer {
            inner: Arc::new(plain),
            foreign: Some(Arc::new(parsing)),
            specials,
            fingerprint,
            vocab_size,
            fast: None,
        })
    }

    /// Loads the tokenizer of a model directory: `tokenizer.json`, as Kiln's own tokenizer when it
    /// is one (fixed special ids, fast encoder), otherwise as any tokenizer the `tokenizers` crate
    /// loads, with its special tokens' roles read from `tokenizer_config.json`,
    /// `generation_config.json` and `config.json` (see [`SpecialTokens::from_hf_dir`]).
    pub fn load_dir(dir: &Path) -> Result<Tokenizer> {
        Self::load_dir_with(dir, &SpecialOverrides::default())
    }

    /// [`Tokenizer::load_dir`] with roles given explicitly (they win over the files).
    pub fn load_dir_with(dir: &Path, overrides: &SpecialOverrides) -> Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        let kiln_err =
            match Self::load(&path) {
                Ok(t) if overrides.is_empty() => return Ok(t),
                Ok(_) => return Err(Error::InvalidTokenizer {
                    path,
                    msg: "a Kiln tokenizer's special tokens have fixed ids; their roles cannot be \
                          changed"
                        .into(),
                }),
                Err(e @ Error::NotFound { .. }) => return Err(e),
                Err(e) => Some(e),
            };
        let invalid = |msg: String| Error::InvalidTokenizer {
            path: path.clone(),
            msg,
        };
        let json =
            std::fs::read_to_string(&path).map_err(|e| Error::io("read tokenizer", &path, e))?;
        let parsed =
            std::panic::catch_unwind(|| tokenizers::Tokenizer::from_str(&json)).map_err(|_| {
                invalid("cannot parse tokenizer JSON (the tokenizers library panicked)".into())
            })?;
        let inner = parsed.map_err(|e| {
            invalid(match &kiln_err {
                Some(k) => format!("cannot parse tokenizer JSON: {e} (as a Kiln tokenizer: {k})"),
                None => format!("cannot parse tokenizer JSON: {e}"),
            })
        })?;
        let mut specials = SpecialTokens::from_hf_dir(dir, &inner).map_err(invalid)?;
        specials.apply(overrides, &inner).map_err(invalid)?;
        Self::from_hf(inner, specials).map_err(invalid)
    }

    /// The special tokens by role.
    pub fn specials(&self) -> &SpecialTokens {
        &self.specials
    }

    /// Whether this is one of Kiln's own tokenizers (the fixed ids of [`special`]).
    pub fn is_kiln(&self) -> bool {
        self.foreign.is_none()
    }

    /// Loads a `tokenizer.json` written by [`Tokenizer::save`] and checks it (see the module docs).
    pub fn load(path: &Path) -> Result<Tokenizer> {
        let json = std::fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound {
                    path: path.to_path_buf(),
                }
            } else {
                Error::io("read tokenizer", path, e)
            }
        })?;
        let invalid = |msg: String| Error::InvalidTokenizer {
            path: path.to_path_buf(),
            msg,
        };
        // The `tokenizers` crate panics on some malformed files (a syntax error inside the
        // decoder, a bad precompiled normalizer): check the JSON and what Kiln rejects anyway
        // first, and turn any remaining panic into an error.
        let value: serde_json::Value =
            serde_json::from_str(&json).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
        if !value.is_object() {
            return Err(invalid("expected a JSON object".into()));
        }
        if !value.get("normalizer").is_none_or(|n| n.is_null()) {
            return Err(invalid(
                "unexpected normalizer (kiln tokenizers have none)".into(),
            ));
        }
        let parsed =
            std::panic::catch_unwind(|| tokenizers::Tokenizer::from_str(&json)).map_err(|_| {
                invalid("cannot parse tokenizer JSON (the tokenizers library panicked)".into())
            })?;
        let inner = parsed.map_err(|e| invalid(format!("cannot parse tokenizer JSON: {e}")))?;
        Self::from_inner(inner).map_err(|msg| Error::InvalidTokenizer {
            path: path.to_path_buf(),
            msg,
        })
    }

    /// Saves as HF `tokenizer.json` (pretty), atomically (temp file + fsync + rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| Error::Tokenizer(format!("cannot serialize: {e}")))?;
        atomic_write(path, |w| std::io::Write::write_all(w, json.as_bytes()))
    }

    /// Number of tokens, specials included (ids are `0..vocab_size`).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Encodes `text` without adding any special token; special-token strings in `text` are
    /// encoded as ordinary text. Never fails (byte-level: nothing is unknown).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match &self.fast {
            Some(fast) => fast.encode(text),
            None => self.encode_hf(text),
        }
    }

    /// Encodes trusted text (a rendered chat template) the way `transformers` does with
    /// `add_special_tokens=False`: the special tokens' strings become their ids, and the
    /// post-processor adds nothing.
    pub fn encode_trusted(&self, text: &str) -> Vec<u32> {
        match &self.foreign {
            Some(t) => match t.encode_fast(text, false) {
                Ok(enc) => enc.get_ids().to_vec(),
                Err(e) => panic!("tokenizer failed to encode (this is a bug): {e}"),
            },
            None => self.encode_with_specials(text),
        }
    }

    /// [`Tokenizer::encode`] through the HF `tokenizers` pipeline (the reference the fast
    /// encoder is tested against).
    pub fn encode_hf(&self, text: &str) -> Vec<u32> {
        match self.inner.encode_fast(text, false) {
            Ok(enc) => enc.get_ids().to_vec(),
            Err(e) => panic!("tokenizer failed to encode (this is a bug): {e}"),
        }
    }

    /// Encodes many texts in parallel (rayon); same results as [`Tokenizer::encode`] on each.
    pub fn encode_batch(&self, texts: &[&str]) -> Vec<Vec<u32>> {
        texts.par_iter().map(|t| self.encode(t)).collect()
    }

    /// Encodes one long text using all threads: it is cut at [`parallel_split_points`] (where
    /// cutting provably does not change the result), the pieces are encoded in parallel and
    /// concatenated. Same result as [`Tokenizer::encode`].
    pub fn encode_parallel(&self, text: &str, piece_bytes: usize) -> Vec<u32> {
        let pieces = split_for_parallel(text, piece_bytes);
        if pieces.len() == 1 {
            return self.encode(text);
        }
        self.encode_batch(&pieces).concat()
    }

    /// Like [`Tokenizer::encode`] but the exact special-token strings (e.g. `<|user|>`) in `text`
    /// become their special ids. Only for trusted text (templates, tests).
    pub fn encode_with_specials(&self, text: &str) -> Vec<u32> {
        if self.foreign.is_some() {
            return self.encode_trusted(text);
        }
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let found = special::NAMES
                .iter()
                .enumerate()
                .filter_map(|(id, name)| rest.find(name).map(|pos| (pos, id as u32, name.len())))
                .min_by_key(|&(pos, _, _)| pos);
            match found {
                Some((pos, id, len)) => {
                    if pos > 0 {
                        out.extend(self.encode(&rest[..pos]));
                    }
                    out.push(id);
                    rest = &rest[pos + len..];
                }
                None => {
                    out.extend(self.encode(rest));
                    break;
                }
            }
        }
        out
    }

    /// Decodes ids to text; special tokens appear as their strings (e.g. `<|end|>`). Ids outside
    /// the vocab are ignored. Byte sequences that are not valid UTF-8 (e.g. a cut multi-byte
    /// character) become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_default()
    }

    /// Decodes ids to text, dropping special tokens.
    pub fn decode_skip_special(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, true).unwrap_or_default()
    }

    /// Id of a token given in the vocab's byte-level spelling (specials by their text).
    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    /// The vocab's byte-level spelling of a token (e.g. `"Ġthe"` for `" the"`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The raw bytes a token stands for (specials: their text). Useful for streaming output,
    /// where a multi-byte character can be split across tokens.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let tok = self.inner.id_to_token(id)?;
        if self.foreign.is_some() {
            return Some(self.inner.decode(&[id], false).ok()?.into_bytes());
        }
        if special::is_special(id) {
            return Some(tok.into_bytes());
        }
        let table = char_to_byte_table();
        tok.chars()
            .map(|c| table.get(c as usize).copied().flatten())
            .collect()
    }

    /// Short hex hash (16 hex digits: the first 8 bytes of a SHA-256 of the tokenizer JSON) that
    /// identifies vocab + merges; stored in shards and checkpoints to detect a mismatched tokenizer.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The wrapped HF tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// A growing list of generated ids decoded as it grows, one piece per id, in time linear in its
/// length (special tokens dropped, as [`Tokenizer::decode_skip_special`] drops them).
///
/// A stream cannot decode each id alone (a character can be cut across byte tokens, a decoder can
/// strip or add a space by position), and decoding the whole list again at every id costs time
/// quadratic in its length. This keeps a short window instead: the ids of the last piece and those
/// since, with the text the last piece's ids decode to; the next piece is what decoding the whole
/// window adds to that text (the method of `tokenizers`' `DecodeStream`, TGI and vLLM). A piece
/// that would end inside a character (U+FFFD) waits for the ids that complete it, or for
/// [`TextStream::finish`]. Should a decoder ever disagree with its own earlier text inside the
/// window, the piece comes from decoding the whole list, so the text stays what
/// `decode_skip_special` of every id gives.
#[derive(Debug, Default, Clone)]
pub struct TextStream {
    /// Every id pushed.
    ids: Vec<u32>,
    /// Where the window starts in `ids`.
    window: usize,
    /// Where, in `ids`, the ids decoded into `context` end.
    context_end: usize,
    /// The window's ids up to `context_end`, decoded.
    context: String,
    /// Everything emitted.
    text: String,
}

impl TextStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one id; returns the text it completes (often empty: a cut character, a special token).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> &str {
        self.ids.push(id);
        self.advance(tok, false)
    }

    /// The rest of the text once no id will follow, a last incomplete character included.
    pub fn finish(&mut self, tok: &Tokenizer) -> &str {
        self.advance(tok, true)
    }

    /// All the text emitted so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    fn advance(&mut self, tok: &Tokenizer, last: bool) -> &str {
        let from = self.text.len();
        let window = tok.decode_skip_special(&self.ids[self.window..]);
        let complete = last || !window.ends_with('\u{fffd}');
        if window.len() > self.context.len() && complete {
            if let Some(piece) = window.strip_prefix(self.context.as_str()) {
                self.text.push_str(piece);
                self.window = self.context_end;
                self.context_end = self.ids.len();
                self.context = tok.decode_skip_special(&self.ids[self.window..]);
            } else {
                self.resync(tok, last);
            }
        }
        &self.text[from..]
    }

    /// Takes the next piece from decoding every id (the window's decode disagreed with its
    /// context), then restarts the window at the end.
    fn resync(&mut self, tok: &Tokenizer, last: bool) {
        let all = tok.decode_skip_special(&self.ids);
        if !last && all.ends_with('\u{fffd}') {
            return;
        }
        if let Some(piece) = all
            .get(self.text.len()..)
            .filter(|_| all.starts_with(&self.text))
        {
            self.text.push_str(piece);
            self.window = self.ids.len().saturating_sub(1);
            self.context_end = self.ids.len();
            self.context = tok.decode_skip_special(&self.ids[self.window..]);
        }
    }
}

/// The special tokens of a tokenizer by role. Kiln's own tokenizers declare their fixed ids
/// ([`SpecialTokens::kiln`]); any other is read from its model directory
/// ([`SpecialTokens::from_hf_dir`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SpecialTokens {
    /// Beginning of sequence (Kiln: `<|endoftext|>`, which every document follows).
    pub bos: Option<u32>,
    /// End of sequence: generation stops at any of them (Llama 3 has several). Never empty.
    pub eos: Vec<u32>,
    /// Padding. Batches never rely on it: padded positions are masked by position (attention
    /// mask, no target), so a pad token equal to an end-of-sequence token never hides the latter
    /// from the loss, and a tokenizer without one pads with a reserved id that is always masked.
    pub pad: Option<u32>,
    /// The token that ends a chat turn (Kiln: `<|end|>`; ChatML: `<|im_end|>`; Llama 3:
    /// `<|eot_id|>`); by default the first end-of-sequence token.
    pub end_of_turn: Option<u32>,
    /// Masked-LM mask.
    pub mask: Option<u32>,
    /// Unknown token.
    pub unk: Option<u32>,
    /// The token strings, by role, as chat templates see them (`bos_token`, `eos_token`, ...).
    pub strings: std::collections::BTreeMap<String, String>,
}

/// Roles given explicitly (token strings), winning over what the model directory says.
#[derive(Debug, Clone, Default)]
pub struct SpecialOverrides {
    pub bos: Option<String>,
    pub eos: Vec<String>,
    pub pad: Option<String>,
    pub end_of_turn: Option<String>,
}

impl SpecialOverrides {
    pub fn is_empty(&self) -> bool {
        self.bos.is_none()
            && self.eos.is_empty()
            && self.pad.is_none()
            && self.end_of_turn.is_none()
    }
}

/// Names of end-of-turn tokens of well-known chat formats.
const END_OF_TURN_NAMES: [&str; 5] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|eot|>",
];

fn token_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn token_ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| x as u32).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => Vec::new(),
    }
}

fn read_json(path: &Path) -> std::result::Result<Option<serde_json::Value>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| format!("{}: not valid JSON: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

impl SpecialTokens {
    /// Kiln's fixed ids: BOS and EOS `<|endoftext|>`, pad `<|pad|>`, end of turn `<|end|>`,
    /// mask `<|mask|>`.
    pub fn kiln() -> SpecialTokens {
        let mut strings = std::collections::BTreeMap::new();
        for (role, id) in [
            ("bos_token", special::EOT),
            ("eos_token", special::EOT),
            ("pad_token", special::PAD),
            ("mask_token", special::MASK),
        ] {
            strings.insert(role.to_string(), special::NAMES[id as usize].to_string());
        }
        SpecialTokens {
            bos: Some(special::EOT),
            eos: vec![special::EOT],
            pad: Some(special::PAD),
            end_of_turn: Some(special::END),
            mask: Some(special::MASK),
            unk: None,
            strings,
        }
    }

    /// Every role that has an id, with it.
    pub fn roles(&self) -> Vec<(&'static str, u32)> {
        let mut out = Vec::new();
        out.extend(self.bos.map(|i| ("bos", i)));
        out.extend(self.eos.iter().map(|&i| ("eos", i)));
        out.extend(self.pad.map(|i| ("pad", i)));
        out.extend(self.end_of_turn.map(|i| ("end_of_turn", i)));
        out.extend(self.mask.map(|i| ("mask", i)));
        out.extend(self.unk.map(|i| ("unk", i)));
        out
    }

    /// The end-of-turn token, or the first end-of-sequence token.
    pub fn turn_end(&self) -> u32 {
        self.end_of_turn.or(self.eos.first().copied()).unwrap_or(0)
    }

    /// Where generation stops: every end-of-sequence token and the end-of-turn token.
    pub fn stop_tokens(&self) -> Vec<u32> {
        let mut stops = self.eos.clone();
        if let Some(e) = self.end_of_turn {
            if !stops.contains(&e) {
                stops.push(e);
            }
        }
        stops
    }

    /// Reads the roles of a Hugging Face model directory's tokenizer: `bos_token`, `eos_token`,
    /// `pad_token`, `unk_token`, `mask_token` of `tokenizer_config.json` (strings or
    /// `{"content": ...}` objects, resolved to ids through the tokenizer) or
    /// `special_tokens_map.json`; `eos_token_id` (an int or a list) of `generation_config.json`
    /// added to them, `config.json`'s only when neither names one; `bos_token_id` and
    /// `pad_token_id` of `generation_config.json`, else `config.json`, for roles not named by
    /// token. A `config.json` that Kiln wrote (`kiln_arch`) is not consulted: its ids are Kiln's. The end of turn is a
    /// well-known end-of-turn token (`<|im_end|>`, `<|eot_id|>`, ...) that the tokenizer has as a
    /// special token and the chat template uses, else the first end-of-sequence token.
    pub fn from_hf_dir(
        dir: &Path,
        tok: &tokenizers::Tokenizer,
    ) -> std::result::Result<SpecialTokens, String> {
        let tc = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        let stm = read_json(&dir.join("special_tokens_map.json"))?.unwrap_or_default();
        let gc = read_json(&dir.join("generation_config.json"))?.unwrap_or_default();
        // Kiln's own config.json carries Kiln's fixed ids, which mean nothing for another
        // tokenizer (the checkpoints Kiln writes for one carry generation_config.json).
        let cfg = read_json(&dir.join("config.json"))?
            .filter(|c| c.get("kiln_arch").is_none())
            .unwrap_or_default();
        let mut s = SpecialTokens::default();
        let mut named = |role: &str| -> std::result::Result<Option<u32>, String> {
            let Some(name) = tc
                .get(role)
                .and_then(token_string)
                .or_else(|| stm.get(role).and_then(token_string))
            else {
                return Ok(None);
            };
            let id = tok.token_to_id(&name).ok_or_else(|| {
                format!("tokenizer_config.json: {role} {name:?} is not a token of tokenizer.json")
            })?;
            s.strings.insert(role.to_string(), name);
            Ok(Some(id))
        };
        let bos = named("bos_token")?;
        let eos = named("eos_token")?;
        let pad = named("pad_token")?;
        let unk = named("unk_token")?;
        let mask = named("mask_token")?;
        let ids = |key: &str| {
            let g = token_ids(gc.get(key));
            if g.is_empty() {
                token_ids(cfg.get(key))
            } else {
                g
            }
        };
        s.bos = bos.or(ids("bos_token_id").first().copied());
        s.eos = eos.into_iter().collect();
        let mut more = token_ids(gc.get("eos_token_id"));
        if s.eos.is_empty() && more.is_empty() {
            more = token_ids(cfg.get("eos_token_id"));
        }
        for id in more {
            if !s.eos.contains(&id) {
                s.eos.push(id);
            }
        }
        s.pad = pad.or(ids("pad_token_id").first().copied());
        s.unk = unk;
        s.mask = mask;
        let template = tc
            .get("chat_template")
            .and_then(|t| t.as_str().map(str::to_string))
            .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok())
            .unwrap_or_default();
        let added = tok.get_added_tokens_decoder();
        s.end_of_turn = END_OF_TURN_NAMES
            .iter()
            .find(|n| {
                template.contains(*n)
                    && tok
                        .token_to_id(n)
                        .is_some_and(|id| added.get(&id).is_some_and(|t| t.special))
            })
            .and_then(|n| tok.token_to_id(n))
            .or(s.eos.first().copied());
        s.fill_strings(tok);
        Ok(s)
    }

    /// Fills in the token strings of roles known only by id.
    fn fill_strings(&mut self, tok: &tokenizers::Tokenizer) {
        for (role, id) in [
            ("bos_token", self.bos),
            ("eos_token", self.eos.first().copied()),
            ("pad_token", self.pad),
            ("unk_token", self.unk),
            ("mask_token", self.mask),
        ] {
            if let Some(id) = id {
                if !self.strings.contains_key(role) {
                    if let Some(t) = tok.id_to_token(id) {
                        self.strings.insert(role.to_string(), t);
                    }
                }
            }
        }
    }

    /// Applies explicit roles (token strings) over what was read.
    pub fn apply(
        &mut self,
        o: &SpecialOverrides,
        tok: &tokenizers::Tokenizer,
    ) -> std::result::Result<(), String> {
        let id = |what: &str, name: &str| {
            tok.token_to_id(name)
                .ok_or_else(|| format!("the {what} token {name:?} is not in the vocabulary"))
        };
        if let Some(b) = &o.bos {
            self.bos = Some(id("bos", b)?);
            self.strings.insert("bos_token".into(), b.clone());
        }
        if !o.eos.is_empty() {
            self.eos = o
                .eos
                .iter()
                .map(|e| id("eos", e))
                .collect::<std::result::Result<_, _>>()?;
            self.strings.insert("eos_token".into(), o.eos[0].clone());
        }
        if let Some(p) = &o.pad {
            self.pad = Some(id("pad", p)?);
            self.strings.insert("pad_token".into(), p.clone());
        }
        if let Some(e) = &o.end_of_turn {
            self.end_of_turn = Some(id("end-of-turn", e)?);
        }
        if self.end_of_turn.is_none() {
            self.end_of_turn = self.eos.first().copied();
        }
        Ok(())
    }
}

/// Maps the GPT-2 byte-level symbols back to bytes (indexed by char code; symbols are < 324).
fn char_to_byte_table() -> &'static [Option<u8>; 324] {
    static TABLE: std::sync::OnceLock<[Option<u8>; 324]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = [None; 324];
        let mut n = 0u32;
        for b in 0..=255u8 {
            let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
            let c = if printable {
                b as u32
            } else {
                n += 1;
                255 + n
            };
            table[c as usize] = Some(b);
        }
        table
    })
}

/// Byte offsets where `text` can be cut without changing its byte-level BPE encoding: right after
/// a `\n` that follows a non-whitespace character and precedes a non-whitespace character. The
/// GPT-2 regex never puts such a `\n` in the same pre-token as a neighbour (whitespace runs stop
/// before a non-space; the letter/number/punctuation rules take at most a leading ' '), and BPE
/// merges never cross pre-tokens.
pub fn parallel_split_points(text: &str) -> impl Iterator<Item = usize> + '_ {
    let bytes = text.as_bytes();
    memchr_newlines(bytes)
        .filter(move |&i| {
            // i: index of '\n'; the cut is at i + 1.
            let prev_ok = i > 0 && !prev_char(text, i).is_whitespace();
            let next_ok = text[i + 1..]
                .chars()
                .next()
                .is_some_and(|c| !c.is_whitespace());
            prev_ok && next_ok
        })
        .map(|i| i + 1)
}

fn memchr_newlines(bytes: &[u8]) -> impl Iterator<Item = usize> + '_ {
    bytes
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'\n')
        .map(|(i, _)| i)
}

fn prev_char(text: &str, end: usize) -> char {
    text[..end].chars().next_back().unwrap_or(' ')
}

/// Cuts `text` into pieces of roughly `piece_bytes` (at least) at [`parallel_split_points`]; the
/// pieces concatenate to `text` and encode (separately, then concatenated) exactly like `text`.
pub fn split_for_parallel(text: &str, piece_bytes: usize) -> Vec<&str> {
    let piece_bytes = piece_bytes.max(1);
    if text.len() <= piece_bytes {
        return vec![text];
    }
    let mut pieces = Vec::new();
    let mut start = 0;
    for cut in parallel_split_points(text) {
        if cut - start >= piece_bytes && cut < text.len() {
            pieces.push(&text[start..cut]);
            start = cut;
        }
    }
    pieces.push(&text[start..]);
    pieces
}

/// A fast encoder equivalent to the HF pipeline for kiln's byte-level BPE (checked against it by
/// property tests): GPT-2 pre-tokenization with the `regex` crate (the `\s+(?!\S)` lookahead is
/// emulated by giving back the last whitespace character of a run that precedes a non-space),
/// then BPE merges by (rank, leftmost position), as `tokenizers`' `Word::merge_all` does.
mod fast {
    use std::collections::HashMap;
    use std::hash::{BuildHasherDefault, Hasher};

    use super::char_to_byte_table;

    /// Multiply-xorshift hasher for the packed `(left, right)` pair keys.
    #[derive(Default)]
    struct PairHasher(u64);
    impl Hasher for PairHasher {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for &b in bytes {
                self.write_u64(b as u64);
            }
        }
        fn write_u64(&mut self, n: u64) {
            let x = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            self.0 = x ^ (x >> 29);
        }
    }
    type PairMap = HashMap<u64, (u32, u32), BuildHasherDefault<PairHasher>>;

    /// GPT-2's pattern minus the `\s+(?!\S)` alternative (emulated in [`FastBpe::pieces`]).
    const PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";
    /// Above this many bytes a piece is merged with a heap (O(n log n)) instead of by rescanning.
    const SCAN_MAX: usize = 48;

    pub(super) struct FastBpe {
        re: regex::Regex,
        byte_ids: [u32; 256],
        /// `(left << 32 | right)` -> `(rank, merged id)`.
        merges: PairMap,
    }

    fn key(a: u32, b: u32) -> u64 {
        ((a as u64) << 32) | b as u64
    }

    impl FastBpe {
        /// Builds from the serialized HF tokenizer; `None` if the model uses any feature this
        /// encoder does not reproduce (the caller then uses the HF pipeline).
        pub(super) fn from_json(json: &serde_json::Value) -> Option<FastBpe> {
            let model = json.get("model")?;
            if model.get("type")?.as_str()? != "BPE" {
                return None;
            }
            for k in [
                "dropout",
                "unk_token",
                "continuing_subword_prefix",
                "end_of_word_suffix",
            ] {
                if !model.get(k).is_none_or(|v| v.is_null()) {
                    return None;
                }
            }
            for k in ["byte_fallback", "ignore_merges"] {
                if model.get(k).and_then(|v| v.as_bool()) == Some(true) {
                    return None;
                }
            }
            let vocab: HashMap<&str, u32> = model
                .get("vocab")?
                .as_object()?
                .iter()
                .map(|(k, v)| Some((k.as_str(), u32::try_from(v.as_u64()?).ok()?)))
                .collect::<Option<_>>()?;
            let table = char_to_byte_table();
            let mut byte_ids = [u32::MAX; 256];
            for (c, b) in table.iter().enumerate() {
                if let Some(b) = b {
                    let s = char::from_u32(c as u32)?.to_string();
                    byte_ids[*b as usize] = *vocab.get(s.as_str())?;
                }
            }
            let mut merges = PairMap::default();
            for (rank, m) in model.get("merges")?.as_array()?.iter().enumerate() {
                let (a, b) = match m {
                    serde_json::Value::Array(ab) if ab.len() == 2 => {
                        (ab[0].as_str()?.to_string(), ab[1].as_str()?.to_string())
                    }
                    serde_json::Value::String(s) => {
                        let (a, b) = s.split_once(' ')?;
                        (a.to_string(), b.to_string())
                    }
                    _ => return None,
                };
                let ia = *vocab.get(a.as_str())?;
                let ib = *vocab.get(b.as_str())?;
                let new = *vocab.get(format!("{a}{b}").as_str())?;
                // HF keeps the first occurrence of a duplicated pair.
                merges.entry(key(ia, ib)).or_insert((rank as u32, new));
            }
            Some(FastBpe {
                re: regex::Regex::new(PATTERN).ok()?,
                byte_ids,
                merges,
            })
        }

        /// Calls `f` on each GPT-2 pre-token of `text`, in order.
        fn pieces<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) {
            let mut pos = 0;
            while pos < text.len() {
                let Some(m) = self.re.find_at(text, pos) else {
                    f(&text[pos..]);
                    break;
                };
                if m.start() > pos {
                    f(&text[pos..m.start()]);
                }
                let mut end = m.end();
                let piece = m.as_str();
                // `\s+(?!\S)`: a whitespace run followed by a non-space gives its last character
                // to the next pre-token (when it has more than one).
                if end < text.len() && piece.starts_with(char::is_whitespace) {
                    if let Some((last, _)) = piece.char_indices().next_back() {
                        if last > 0 && piece.chars().all(char::is_whitespace) {
                            end = m.start() + last;
                        }
                    }
                }
                f(&text[m.start()..end]);
                pos = end;
            }
        }

        fn rank(&self, a: u32, b: u32) -> Option<(u32, u32)> {
            self.merges.get(&key(a, b)).copied()
        }

        /// Appends the BPE tokens of one pre-token.
        fn merge_piece(&self, piece: &[u8], out: &mut Vec<u32>) {
            if piece.len() > SCAN_MAX {
                return self.merge_piece_heap(piece, out);
            }
            let mut ids: Vec<u32> = piece.iter().map(|&b| self.byte_ids[b as usize]).collect();
            let mut ranks: Vec<(u32, u32)> = ids
                .windows(2)
                .map(|w| self.rank(w[0], w[1]).unwrap_or((u32::MAX, 0)))
                .collect();
            loop {
                let mut best = u32::MAX;
                let mut at = 0;
                for (i, &(r, _)) in ranks.iter().enumerate() {
                    if r < best {
                        best = r;
                        at = i;
                    }
                }
                if best == u32::MAX {
                    break;
                }
                ids[at] = ranks[at].1;
                ids.remove(at + 1);
                ranks.remove(at);
                if at > 0 {
                    ranks[at - 1] = self.rank(ids[at - 1], ids[at]).unwrap_or((u32::MAX, 0));
                }
                if at < ranks.len() {
                    ranks[at] = self.rank(ids[at], ids[at + 1]).unwrap_or((u32::MAX, 0));
                }
            }
            out.extend_from_slice(&ids);
        }

        fn merge_piece_heap(&self, piece: &[u8], out: &mut Vec<u32>) {
            use std::cmp::Reverse;
            use std::collections::BinaryHeap;
            let n = piece.len();
            let mut id: Vec<u32> = piece.iter().map(|&b| self.byte_ids[b as usize]).collect();
            let mut next: Vec<usize> = (1..=n).collect(); // n = none
            let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect(); // MAX = none
            let mut alive = vec![true; n];
            let mut heap = BinaryHeap::new();
            for i in 0..n - 1 {
                if let Some((r, _)) = self.rank(id[i], id[i + 1]) {
                    heap.push(Reverse((r, i)));
                }
            }
            while let Some(Reverse((r, i))) = heap.pop() {
                if !alive[i] || next[i] >= n {
                    continue;
                }
                let j = next[i];
                let Some((cur, new)) = self.rank(id[i], id[j]) else {
                    continue;
                };
                if cur != r {
                    continue; // stale
                }
                id[i] = new;
                alive[j] = false;
                next[i] = next[j];
                if next[j] < n {
                    prev[next[j]] = i;
                }
                if prev[i] != usize::MAX {
                    let p = prev[i];
                    if let Some((r, _)) = self.rank(id[p], id[i]) {
                        heap.push(Reverse((r, p)));
                    }
                }
                if next[i] < n {
                    if let Some((r, _)) = self.rank(id[i], id[next[i]]) {
                        heap.push(Reverse((r, i)));
                    }
                }
            }
            let mut i = 0;
            while i < n {
                out.push(id[i]);
                i = next[i];
            }
        }

        /// Encodes `text` (no special tokens).
        pub(super) fn encode(&self, text: &str) -> Vec<u32> {
            let mut out = Vec::with_capacity(text.len() / 3 + 1);
            self.pieces(text, |p| self.merge_piece(p.as_bytes(), &mut out));
            out
        }
    }
}
