//! Readers for every supervised dataset format Kiln trains on.
//!
//! All loaders accept a JSON array of records or JSONL (one record per line), told apart by the
//! first non-space character (`[` or `{`); files ending in `.gz` (or starting with the gzip magic
//! bytes) are decompressed first. Parquet files (the format of Hugging Face datasets: `.parquet`,
//! or starting with the `PAR1` magic bytes) are read row by row, each row becoming the record its
//! columns spell (strings, numbers, lists such as a `messages` column of `{role, content}`
//! structs), so both go through the same parsers. The record format is detected per record from
//! its fields; [`FieldMap`] (`--field output=answer`) renames a dataset's own columns to the
//! fields Kiln looks for.
//!
//! * [`load_sft`]: supervised fine-tuning conversations (Alpaca, chat `messages`, ShareGPT).
//! * [`load_preferences`]: ranked / pairwise / HH-RLHF / Stack-Exchange / scored preferences.
//! * [`load_prompts`]: prompts for generation (PPO rollouts, evaluation).
//!
//! Errors name the file, the record (`file:LINE` for JSONL, 1-based line number; `file: record I`
//! for a JSON array, 0-based index; `file: row R (row group G)` for Parquet, 0-based) and the field
//! (a Parquet file's column), e.g. `data.jsonl:17: field "output": missing`.
//! With [`LoadOptions::skip_bad`] a bad record is skipped and counted instead of failing the load.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Who speaks a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// `"system"`, `"user"` or `"assistant"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    /// Parses a role name as found in chat (`role`) and ShareGPT (`from`) records:
    /// `system`; `user` / `human`; `assistant` / `gpt` (case-insensitive).
    pub fn parse(name: &str) -> Option<Role> {
        match name.trim().to_ascii_lowercase().as_str() {
            "system" => Some(Role::System),
            "user" | "human" => Some(Role::User),
            "assistant" | "gpt" => Some(Role::Assistant),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
}

/// One SFT example. Loaded conversations always end with a non-empty assistant turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    pub messages: Vec<Message>,
}

/// A prompt with K >= 2 responses ranked by preference (rank 1 is best, ties allowed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankedPrompt {
    /// The conversation before the response (ends with a user turn).
    pub prompt: Vec<Message>,
    /// `(response text, rank)`.
    pub choices: Vec<(String, u32)>,
}

impl RankedPrompt {
    /// The `(better, worse)` choice index pairs, see [`expand_pairs`].
    pub fn pairs(&self) -> Vec<(usize, usize)> {
        let ranks: Vec<u32> = self.choices.iter().map(|c| c.1).collect();
        expand_pairs(&ranks)
    }
}

/// One preference record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PrefRecord {
    Ranked(RankedPrompt),
    Scored {
        prompt: Vec<Message>,
        response: String,
        score: f32,
    },
}

/// A prompt to generate from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptRecord {
    /// The conversation so far; ends with a user turn.
    pub prompt: Vec<Message>,
    /// The prompt as plain text: the `prompt` string, the Alpaca prompt text, or the content of
    /// the last user turn of a chat record.
    pub raw: String,
}

/// How loaders read records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Skip (and count) bad records instead of failing on the first one.
    pub skip_bad: bool,
    /// The dataset's own names for the fields Kiln reads.
    pub fields: FieldMap,
}

impl LoadOptions {
    /// Fail on the first bad record; fields under Kiln's names.
    pub const STRICT: LoadOptions = LoadOptions {
        skip_bad: false,
        fields: FieldMap::NONE,
    };
    /// Skip bad records; fields under Kiln's names.
    pub const SKIP_BAD: LoadOptions = LoadOptions {
        skip_bad: true,
        fields: FieldMap::NONE,
    };
}

/// The fields every record format is read from (what a [`FieldMap`] can map a column to).
pub const KNOWN_FIELDS: [&str; 15] = [
    "instruction",
    "input",
    "output",
    "system",
    "messages",
    "conversations",
    "prompt",
    "chosen",
    "rejected",
    "choices",
    "question",
    "response_j",
    "response_k",
    "score",
    "text",
];

/// A dataset's column (or JSON key) names for the fields Kiln reads: Kiln's field name → the
/// dataset's (`--field output=answer` reads `answer` as `output`). Applied to every record before
/// its format is detected, so it works the same for JSON, JSONL and Parquet and for every loader;
/// errors name the dataset's column (`field "answer": missing (--field output=answer)`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FieldMap(pub BTreeMap<String, String>);

impl FieldMap {
    /// No renaming.
    pub const NONE: FieldMap = FieldMap(BTreeMap::new());

    /// Parses `KILN=COLUMN` specs (`--field output=answer`).
    pub fn parse<S: AsRef<str>>(specs: &[S]) -> Result<FieldMap, String> {
        let mut map = BTreeMap::new();
        for spec in specs {
            let spec = spec.as_ref();
            let Some((kiln, column)) = spec.split_once('=') else {
                return Err(format!(
                    "--field {spec}: expected KILN_FIELD=COLUMN (for example output=answer)"
                ));
            };
            map.insert(kiln.trim().to_string(), column.trim().to_string());
        }
        let m = FieldMap(map);
        m.validate()?;
        Ok(m)
    }

    /// Checks that every mapped field is one Kiln reads and no column is read twice.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = BTreeMap::new();
        for (kiln, column) in &self.0 {
            if !KNOWN_FIELDS.contains(&kiln.as_str()) {
                return Err(format!(
                    "--field {kiln}={column}: {kiln:?} is not a field Kiln reads (the left side                      is Kiln's name, one of {}; the right side the dataset's column)",
                    KNOWN_FIELDS.join(", ")
                ));
            }
            if column.is_empty() {
                return Err(format!("--field {kiln}=: no column name"));
            }
            if let Some(other) = seen.insert(column.as_str(), kiln.as_str()) {
                return Err(format!(
                    "--field: column {column:?} is mapped to both {other:?} and {kiln:?}"
                ));
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Renames the record's columns to Kiln's fields. A mapped field is only ever read from its
    /// column: a record without the column lacks the field (and says so under the column's name).
    fn apply(&self, obj: &mut Obj) {
        let moved: Vec<(&String, Option<Value>)> = self
            .0
            .iter()
            .map(|(kiln, column)| (kiln, obj.remove(column)))
            .collect();
        for (kiln, value) in moved {
            obj.remove(kiln);
            if let Some(v) = value {
                obj.insert(kiln.clone(), v);
            }
        }
    }

    /// An error's field path in the dataset's names (`output[0]` → `answer[0]`), and the
    /// mapping that renamed it, to add to the message.
    fn dataset_path(&self, path: &str) -> (String, Option<String>) {
        let end = path.find(['.', '[']).unwrap_or(path.len());
        match self.0.get(&path[..end]) {
            Some(column) => (
                format!("{column}{}", &path[end..]),
                Some(format!("--field {}={column}", &path[..end])),
            ),
            None => (path.to_string(), None),
        }
    }
}

/// The result of a load.
#[derive(Debug, Clone)]
pub struct Loaded<T> {
    pub records: Vec<T>,
    /// Where each of `records` is in its file (same order), for errors found after loading.
    pub locations: Vec<RecordLoc>,
    /// Number of bad records skipped (always 0 without `skip_bad`).
    pub skipped: usize,
    /// The message of the first skipped record's error.
    pub first_error: Option<String>,
}

/// Where in the file a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordLoc {
    /// JSONL: 1-based line number.
    Line(usize),
    /// JSON array: 0-based index.
    Index(usize),
    /// Parquet: 0-based row of the file, and the row group that holds it.
    Row { group: usize, row: usize },
}

/// A dataset error naming the file, the record and the field.
///
/// Displays as `FILE:LINE: field "F": MESSAGE` (JSONL), `FILE: record I: field "F": MESSAGE`
/// (JSON array), `FILE: row R (row group G): column "F": MESSAGE` (Parquet) or `FILE: MESSAGE`
/// (whole-file errors).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct DataError {
    pub file: PathBuf,
    pub record: Option<RecordLoc>,
    /// The field, with a path into nested values, e.g. `messages[2].role`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        match self.record {
            Some(RecordLoc::Line(n)) => write!(f, ":{n}")?,
            Some(RecordLoc::Index(i)) => write!(f, ": record {i}")?,
            Some(RecordLoc::Row { group, row }) => write!(f, ": row {row} (row group {group})")?,
            None => {}
        }
        f.write_str(": ")?;
        if let Some(field) = &self.field {
            let what = if matches!(self.record, Some(RecordLoc::Row { .. })) {
                "column"
            } else {
                "field"
            };
            write!(f, "{what} \"{field}\": ")?;
        }
        f.write_str(&self.message)
    }
}

impl DataError {
    fn file(path: &Path, message: impl Into<String>) -> Self {
        DataError {
            file: path.to_path_buf(),
            record: None,
            field: None,
            message: message.into(),
        }
    }
}

/// A record-level error before the file and location are attached.
#[derive(Debug)]
struct RecErr {
    field: Option<String>,
    message: String,
}

impl RecErr {
    fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        RecErr {
            field: Some(field.into()),
            message: message.into(),
        }
    }
    fn record(message: impl Into<String>) -> Self {
        RecErr {
            field: None,
            message: message.into(),
        }
    }
}

/// A JSON record.
pub type Obj = Map<String, Value>;

// ---------------------------------------------------------------------------------------------
// Reading files
// ---------------------------------------------------------------------------------------------

/// A dataset file as text (gzip decompressed, BOM removed).
pub fn read_text(path: &Path) -> Result<String, DataError> {
    utf8_text(path, read_bytes(path)?)
}

/// The file's bytes, gunzipped when it is gzip.
fn read_bytes(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes =
        std::fs::read(path).map_err(|e| DataError::file(path, format!("cannot read: {e}")))?;
    let gz = path.extension().is_some_and(|e| e == "gz") || bytes.starts_with(&[0x1f, 0x8b]);
    if !gz {
        return Ok(bytes);
    }
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(&bytes[..])
        .read_to_end(&mut out)
        .map_err(|e| DataError::file(path, format!("cannot decompress gzip: {e}")))?;
    Ok(out)
}

fn utf8_text(path: &Path, bytes: Vec<u8>) -> Result<String, DataError> {
    let mut text = String::from_utf8(bytes)
        .map_err(|e| DataError::file(path, format!("not valid UTF-8: {e}")))?;
    if text.starts_with('\u{feff}') {
        text.drain(..3);
    }
    Ok(text)
}

/// The raw records of a file, and its columns when it is Parquet.
struct RawRecords {
    records: Vec<(RecordLoc, Result<Value, String>)>,
    columns: Option<Vec<crate::parquet_rows::Column>>,
}

fn read_raw(path: &Path) -> Result<RawRecords, DataError> {
    let mut head = [0u8; 4];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| DataError::file(path, format!("cannot read: {e}")))?;
    if crate::parquet_rows::is_parquet(path, &head[..n]) {
        let p = crate::parquet_rows::read_rows(path)?;
        if p.rows.is_empty() {
            return Err(DataError::file(
                path,
                "empty dataset (a Parquet file of 0 rows)",
            ));
        }
        return Ok(RawRecords {
            records: p.rows.into_iter().map(|(l, v)| (l, Ok(v))).collect(),
            columns: Some(p.columns),
        });
    }
    let text = utf8_text(path, read_bytes(path)?)?;
    let trimmed = text.trim_start();
    let records = match trimmed.chars().next() {
        None => return Err(DataError::file(path, "empty dataset")),
        Some('[') => {
            let values: Vec<Value> = serde_json::from_str(&text)
                .map_err(|e| DataError::file(path, format!("invalid JSON: {e}")))?;
            values
                .into_iter()
                .enumerate()
                .map(|(i, v)| (RecordLoc::Index(i), Ok(v)))
                .collect()
        }
        Some('{') => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                let v = serde_json::from_str::<Value>(l).map_err(|e| format!("invalid JSON: {e}"));
                (RecordLoc::Line(i + 1), v)
            })
            .collect(),
        Some(c) => {
            return Err(DataError::file(
                path,
                format!(
                    "not JSON, JSONL or Parquet: expected '[' (JSON array), '{{' (JSONL) or \
                     PAR1 (Parquet) first, found {c:?}"
                ),
            ))
        }
    };
    Ok(RawRecords {
        records,
        columns: None,
    })
}

/// Says more about a record error in a Parquet file: a missing field that is no column of the
/// file lists the columns there are; a value of the wrong type names the column's type.
fn explain_columns(
    columns: &[crate::parquet_rows::Column],
    field: Option<&str>,
    message: String,
) -> String {
    let list = || {
        columns
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some(field) = field else {
        return format!("{message} (the file's columns: {})", list());
    };
    let top = &field[..field.find(['.', '[']).unwrap_or(field.len())];
    match columns.iter().find(|c| c.name == top) {
        None if message.starts_with("missing") => format!(
            "{message}: the file has no column {top:?} (its columns: {}; map one with --field)",
            list()
        ),
        Some(c) if message.starts_with("expected") && top == field => {
            format!("{message} (the Parquet column is {})", c.type_name)
        }
        _ => message,
    }
}

/// Reads the file and applies `parse` to every record, collecting or skipping errors.
fn load_records<T>(
    path: &Path,
    opts: &LoadOptions,
    parse: impl Fn(&Obj) -> Result<T, RecErr>,
) -> Result<Loaded<T>, DataError> {
    let RawRecords {
        records: raw,
        columns,
    } = read_raw(path)?;
    if raw.is_empty() {
        return Err(DataError::file(path, "empty dataset"));
    }
    let total = raw.len();
    let mut records = Vec::with_capacity(total);
    let mut locations = Vec::with_capacity(total);
    let mut skipped = 0;
    let mut first_error = None;
    for (loc, value) in raw {
        let result = match value {
            Err(msg) => Err(RecErr::record(msg)),
            Ok(Value::Object(mut obj)) => {
                opts.fields.apply(&mut obj);
                parse(&obj)
            }
            Ok(other) => Err(RecErr::record(format!(
                "not a JSON object (found {})",
                kind(&other)
            ))),
        };
        match result {
            Ok(r) => {
                records.push(r);
                locations.push(loc);
            }
            Err(e) => {
                let mut message = e.message;
                let field = e.field.map(|f| {
                    let (path, mapping) = opts.fields.dataset_path(&f);
                    if let Some(m) = mapping {
                        message = format!("{message} ({m})");
                    }
                    path
                });
                if let Some(cols) = &columns {
                    message = explain_columns(cols, field.as_deref(), message);
                }
                let err = DataError {
                    file: path.to_path_buf(),
                    record: Some(loc),
                    field,
                    message,
                };
                if !opts.skip_bad {
                    return Err(err);
                }
                skipped += 1;
                first_error.get_or_insert_with(|| err.to_string());
            }
        }
    }
    if records.is_empty() {
        return Err(DataError::file(
            path,
            format!(
                "no usable records: all {total} were bad; first error: {}",
                first_error.unwrap_or_default()
            ),
        ));
    }
    Ok(Loaded {
        records,
        locations,
        skipped,
        first_error,
    })
}

// ---------------------------------------------------------------------------------------------
// Field helpers
// ---------------------------------------------------------------------------------------------

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A required string field.
fn req_str<'a>(obj: &'a Obj, key: &str, path: &str) -> Result<&'a str, RecErr> {
    match obj.get(key) {
        None | Some(Value::Null) => Err(RecErr::field(path, "missing")),
        Some(Value::String(s)) => Ok(s),
        Some(v) => Err(RecErr::field(
            path,
            format!("expected a string, found {}", kind(v)),
        )),
    }
}

/// An optional string field (missing or null gives "").
fn opt_str<'a>(obj: &'a Obj, key: &str) -> Result<&'a str, RecErr> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(""),
        Some(Value::String(s)) => Ok(s),
        Some(v) => Err(RecErr::field(
            key,
            format!("expected a string, found {}", kind(v)),
        )),
    }
}

/// A required non-empty response string.
fn req_response(obj: &Obj, key: &str) -> Result<String, RecErr> {
    let s = req_str(obj, key, key)?;
    if s.trim().is_empty() {
        return Err(RecErr::field(key, "empty response"));
    }
    Ok(s.to_string())
}

fn req_array<'a>(obj: &'a Obj, key: &str) -> Result<&'a Vec<Value>, RecErr> {
    match obj.get(key) {
        None | Some(Value::Null) => Err(RecErr::field(key, "missing")),
        Some(Value::Array(a)) => Ok(a),
        Some(v) => Err(RecErr::field(
            key,
            format!("expected an array, found {}", kind(v)),
        )),
    }
}

/// The Alpaca prompt text: instruction, then `"\n\n" + input` when input is non-empty.
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.trim().is_empty() {
        instruction.to_string()
    } else {
        format!("{instruction}\n\n{input}")
    }
}

/// Parses a list of messages. `role_key`/`content_key` are `role`/`content` (chat) or
/// `from`/`value` (ShareGPT). `field` is the array's field name, used in error paths.
fn parse_messages(
    items: &[Value],
    field: &str,
    role_key: &str,
    content_key: &str,
) -> Result<Vec<Message>, RecErr> {
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::Object(m) = item else {
            return Err(RecErr::field(
                format!("{field}[{i}]"),
                format!("expected an object, found {}", kind(item)),
            ));
        };
        let role_path = format!("{field}[{i}].{role_key}");
        let role_name = req_str(m, role_key, &role_path)?;
        let role = Role::parse(role_name).ok_or_else(|| {
            RecErr::field(
                &role_path,
                format!(
                    "unknown role {role_name:?} (expected system, user/human or assistant/gpt)"
                ),
            )
        })?;
        let content_path = format!("{field}[{i}].{content_key}");
        let content = req_str(m, content_key, &content_path)?;
        if role == Role::Assistant && content.trim().is_empty() {
            return Err(RecErr::field(content_path, "empty response"));
        }
        out.push(Message::new(role, content));
    }
    Ok(out)
}

/// Messages from a `messages` (chat) or `conversations` (ShareGPT) field, whichever is present.
fn chat_messages(obj: &Obj) -> Option<Result<Vec<Message>, RecErr>> {
    if obj.contains_key("messages") {
        Some(
            req_array(obj, "messages")
                .and_then(|a| parse_messages(a, "messages", "role", "content")),
        )
    } else if obj.contains_key("conversations") {
        Some(
            req_array(obj, "conversations")
                .and_then(|a| parse_messages(a, "conversations", "from", "value")),
        )
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------------
// SFT
// ---------------------------------------------------------------------------------------------

fn parse_sft(obj: &Obj) -> Result<Conversation, RecErr> {
    if let Some(msgs) = chat_messages(obj) {
        let mut messages = msgs?;
        // Turns after the last assistant turn carry no training signal.
        let Some(last) = messages.iter().rposition(|m| m.role == Role::Assistant) else {
            return Err(RecErr::record(if messages.is_empty() {
                "chat with no messages"
            } else {
                "chat with no assistant turn"
            }));
        };
        messages.truncate(last + 1);
        return Ok(Conversation { messages });
    }
    if obj.contains_key("instruction") {
        let instruction = req_str(obj, "instruction", "instruction")?;
        if instruction.trim().is_empty() {
            return Err(RecErr::field("instruction", "empty"));
        }
        let input = opt_str(obj, "input")?;
        let output = req_response(obj, "output")?;
        let system = opt_str(obj, "system")?;
        let mut messages = Vec::with_capacity(3);
        if !system.trim().is_empty() {
            messages.push(Message::system(system));
        }
        messages.push(Message::user(alpaca_prompt(instruction, input)));
        messages.push(Message::assistant(output));
        return Ok(Conversation { messages });
    }
    Err(RecErr::record(
        "unrecognized SFT record: expected Alpaca {\"instruction\", \"input\"?, \"output\"}, \
         chat {\"messages\": [{\"role\", \"content\"}]} or ShareGPT {\"conversations\": [{\"from\", \"value\"}]}",
    ))
}

/// Loads SFT conversations. Per record: Alpaca `{"instruction", "input"?, "output"}` (extra
/// fields ignored; optional `"system"`) becomes `[User(prompt), Assistant(output)]`; chat
/// `{"messages": [{"role", "content"}]}`; ShareGPT `{"conversations": [{"from", "value"}]}`.
/// Turns after the last assistant turn are dropped; a chat without assistant turn and an empty
/// assistant turn are errors.
pub fn load_sft(path: &Path, opts: &LoadOptions) -> Result<Loaded<Conversation>, DataError> {
    load_records(path, opts, parse_sft)
}

// ---------------------------------------------------------------------------------------------
// Preferences
// ---------------------------------------------------------------------------------------------

/// Every ordered pair `(better, worse)` of indices with `ranks[better] < ranks[worse]` (rank 1 is
/// best); ties are never paired. Ordered by `better`, then `worse`.
pub fn expand_pairs(ranks: &[u32]) -> Vec<(usize, usize)> {
    let mut pairs = Vec::new();
    for (i, &ri) in ranks.iter().enumerate() {
        for (j, &rj) in ranks.iter().enumerate() {
            if ri < rj {
                pairs.push((i, j));
            }
        }
    }
    pairs
}

/// Splits an HH-RLHF dialogue string `"\n\nHuman: ...\n\nAssistant: ..."` into turns (contents
/// trimmed). Returns `None` when the string is not in that format.
pub fn split_hh_dialogue(text: &str) -> Option<Vec<Message>> {
    const MARKERS: [(&str, Role); 2] = [
        ("\n\nHuman:", Role::User),
        ("\n\nAssistant:", Role::Assistant),
    ];
    let owned;
    let text = if text.starts_with("Human:") {
        owned = format!("\n\n{text}");
        owned.as_str()
    } else {
        text
    };
    // The earliest marker in `s`: (position, role, marker length).
    let next_marker = |s: &str| {
        MARKERS
            .iter()
            .filter_map(|&(m, role)| s.find(m).map(|pos| (pos, role, m.len())))
            .min_by_key(|&(pos, _, _)| pos)
    };
    let (pos, role, len) = next_marker(text)?;
    if role != Role::User || !text[..pos].trim().is_empty() {
        return None;
    }
    let mut turns = Vec::new();
    let mut role = role;
    let mut rest = &text[pos + len..];
    loop {
        match next_marker(rest) {
            Some((pos, next_role, len)) => {
                turns.push(Message::new(role, rest[..pos].trim()));
                role = next_role;
                rest = &rest[pos + len..];
            }
            None => {
                turns.push(Message::new(role, rest.trim()));
                return Some(turns);
            }
        }
    }
}

/// Merges consecutive turns of the same role (joined by a blank line, empty parts dropped).
fn merge_same_role(messages: Vec<Message>) -> Vec<Message> {
    let mut out: Vec<Message> = Vec::with_capacity(messages.len());
    for m in messages {
        match out.last_mut() {
            Some(last) if last.role == m.role => {
                if !m.content.is_empty() {
                    if !last.content.is_empty() {
                        last.content.push_str("\n\n");
                    }
                    last.content.push_str(&m.content);
                }
            }
            _ => out.push(m),
        }
    }
    out
}

/// A prompt from a string (HH-style dialogue when it starts with a `Human:` turn, else a single
/// user turn) or from a messages array.
fn prompt_value(v: &Value, field: &str) -> Result<(Vec<Message>, String), RecErr> {
    match v {
        Value::String(s) => {
            if s.trim().is_empty() {
                return Err(RecErr::field(field, "empty prompt"));
            }
            if s.trim_start().starts_with("Human:") {
                if let Some(mut turns) = split_hh_dialogue(s.trim_start()) {
                    // "...\n\nAssistant:" at the end opens the response slot.
                    if turns
                        .last()
                        .is_some_and(|m| m.role == Role::Assistant && m.content.is_empty())
                    {
                        turns.pop();
                    }
                    let turns = merge_same_role(turns);
                    let raw = last_user_text(&turns).unwrap_or(s).to_string();
                    return Ok((turns, raw));
                }
            }
            Ok((vec![Message::user(s.as_str())], s.clone()))
        }
        Value::Array(items) => {
            let msgs = parse_messages(items, field, "role", "content")?;
            let raw = last_user_text(&msgs)
                .ok_or_else(|| RecErr::field(field, "prompt has no user turn"))?
                .to_string();
            Ok((msgs, raw))
        }
        Value::Null => Err(RecErr::field(field, "missing")),
        other => Err(RecErr::field(
            field,
            format!(
                "expected a string or an array of messages, found {}",
                kind(other)
            ),
        )),
    }
}

fn last_user_text(msgs: &[Message]) -> Option<&str> {
    msgs.iter()
        .rev()
        .find(|m| m.role == Role::User)
        .map(|m| m.content.as_str())
}

/// The prompt from the first present of `keys`.
fn prompt_field(obj: &Obj, keys: &[&str]) -> Result<Vec<Message>, RecErr> {
    for k in keys {
        if let Some(v) = obj.get(*k) {
            return Ok(prompt_value(v, k)?.0);
        }
    }
    Err(RecErr::field(keys[0], "missing"))
}

/// A positive integer rank (whole floats like `2.0` accepted).
fn parse_rank(v: Option<&Value>, field: &str) -> Result<u32, RecErr> {
    let bad = || RecErr::field(field, "not a positive integer");
    match v {
        None | Some(Value::Null) => Err(RecErr::field(field, "missing")),
        Some(Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                if u >= 1 && u <= u32::MAX as u64 {
                    return Ok(u as u32);
                }
                return Err(bad());
            }
            match n.as_f64() {
                Some(f) if f.fract() == 0.0 && f >= 1.0 && f <= u32::MAX as f64 => Ok(f as u32),
                _ => Err(bad()),
            }
        }
        Some(_) => Err(bad()),
    }
}

fn parse_ranking(obj: &Obj) -> Result<PrefRecord, RecErr> {
    let prompt = prompt_field(obj, &["input", "prompt"])?;
    let items = req_array(obj, "choices")?;
    if items.len() < 2 {
        return Err(RecErr::field(
            "choices",
            format!("a ranking needs at least 2 choices (found {})", items.len()),
        ));
    }
    let mut choices = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::Object(c) = item else {
            return Err(RecErr::field(
                format!("choices[{i}]"),
                format!("expected an object, found {}", kind(item)),
            ));
        };
        let text_path = format!("choices[{i}].text");
        let text = req_str(c, "text", &text_path)?;
        if text.trim().is_empty() {
            return Err(RecErr::field(text_path, "empty response"));
        }
        let rank = parse_rank(c.get("rank"), &format!("choices[{i}].rank"))?;
        choices.push((text.to_string(), rank));
    }
    let ranks: Vec<u32> = choices.iter().map(|c| c.1).collect();
    if expand_pairs(&ranks).is_empty() {
        return Err(RecErr::field(
            "choices",
            "all choices share one rank: no preference to learn",
        ));
    }
    Ok(PrefRecord::Ranked(RankedPrompt { prompt, choices }))
}

/// Dialogue of one side of a chosen/rejected record.
fn side_dialogue(obj: &Obj, key: &str, prompt: Option<&[Message]>) -> Result<Vec<Message>, RecErr> {
    let mut msgs = prompt.map(<[Message]>::to_vec).unwrap_or_default();
    match obj.get(key) {
        None | Some(Value::Null) => return Err(RecErr::field(key, "missing")),
        Some(Value::String(s)) => {
            if prompt.is_some() {
                msgs.push(Message::assistant(s.as_str()));
            } else {
                let turns = split_hh_dialogue(s).ok_or_else(|| {
                    RecErr::field(
                        key,
                        "not an HH-RLHF dialogue (\"\\n\\nHuman: ...\\n\\nAssistant: ...\") \
                         and no \"prompt\" field",
                    )
                })?;
                msgs.extend(turns);
            }
        }
        Some(Value::Array(items)) => {
            // Empty-response checks happen after the prompt is split off.
            let mut parsed = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let Value::Object(m) = item else {
                    return Err(RecErr::field(
                        format!("{key}[{i}]"),
                        format!("expected an object, found {}", kind(item)),
                    ));
                };
                let role_path = format!("{key}[{i}].role");
                let role_name = req_str(m, "role", &role_path)?;
                let role = Role::parse(role_name).ok_or_else(|| {
                    RecErr::field(&role_path, format!("unknown role {role_name:?}"))
                })?;
                let content = req_str(m, "content", &format!("{key}[{i}].content"))?;
                parsed.push(Message::new(role, content));
            }
            msgs.extend(parsed);
        }
        Some(v) => {
            return Err(RecErr::field(
                key,
                format!(
                    "expected a string or an array of messages, found {}",
                    kind(v)
                ),
            ))
        }
    }
    Ok(msgs)
}

/// Splits two dialogues into their shared prompt and the two final assistant responses.
fn split_pair(
    chosen: Vec<Message>,
    rejected: Vec<Message>,
) -> Result<(Vec<Message>, String, String), RecErr> {
    let chosen = merge_same_role(chosen);
    let rejected = merge_same_role(rejected);
    let k = chosen
        .iter()
        .zip(&rejected)
        .take_while(|(a, b)| a == b)
        .count();
    if k == chosen.len() && k == rejected.len() {
        return Err(RecErr::field(
            "rejected",
            "chosen and rejected are identical",
        ));
    }
    if chosen.len() != k + 1 || rejected.len() != k + 1 {
        return Err(RecErr::field(
            "rejected",
            format!(
                "chosen and rejected must share every turn but the final assistant response \
                 (they share {k} turn(s), then have {} and {} more)",
                chosen.len() - k,
                rejected.len() - k
            ),
        ));
    }
    for (side, d) in [("chosen", &chosen), ("rejected", &rejected)] {
        if d[k].role != Role::Assistant {
            return Err(RecErr::field(
                side,
                format!(
                    "the final turn must be an assistant response (found {})",
                    d[k].role
                ),
            ));
        }
        if d[k].content.trim().is_empty() {
            return Err(RecErr::field(side, "empty response"));
        }
    }
    if k == 0 || !chosen[..k].iter().any(|m| m.role == Role::User) {
        return Err(RecErr::field(
            "chosen",
            "no shared prompt (no user turn before the response)",
        ));
    }
    let mut chosen = chosen;
    let mut rejected = rejected;
    let c = chosen.pop().unwrap().content;
    let r = rejected.pop().unwrap().content;
    Ok((chosen, c, r))
}

fn parse_chosen_rejected(obj: &Obj) -> Result<PrefRecord, RecErr> {
    let prompt = match obj.get("prompt") {
        None | Some(Value::Null) => None,
        Some(v) => Some(prompt_value(v, "prompt")?.0),
    };
    let chosen = side_dialogue(obj, "chosen", prompt.as_deref())?;
    let rejected = side_dialogue(obj, "rejected", prompt.as_deref())?;
    let (prompt, c, r) = split_pair(chosen, rejected)?;
    Ok(PrefRecord::Ranked(RankedPrompt {
        prompt,
        choices: vec![(c, 1), (r, 2)],
    }))
}

fn parse_stack_exchange(obj: &Obj) -> Result<PrefRecord, RecErr> {
    let question = req_str(obj, "question", "question")?;
    if question.trim().is_empty() {
        return Err(RecErr::field("question", "empty prompt"));
    }
    let j = req_response(obj, "response_j")?;
    let k = req_response(obj, "response_k")?;
    if j == k {
        return Err(RecErr::field(
            "response_k",
            "response_j and response_k are identical",
        ));
    }
    Ok(PrefRecord::Ranked(RankedPrompt {
        prompt: vec![Message::user(question)],
        choices: vec![(j, 1), (k, 2)],
    }))
}

fn parse_scored(obj: &Obj) -> Result<PrefRecord, RecErr> {
    let prompt = prompt_field(obj, &["input", "prompt"])?;
    let response = req_response(obj, "output")?;
    let score = match obj.get("score") {
        None | Some(Value::Null) => return Err(RecErr::field("score", "missing")),
        Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
        Some(v) => {
            return Err(RecErr::field(
                "score",
                format!("expected a number, found {}", kind(v)),
            ))
        }
    };
    if !score.is_finite() || !(score as f32).is_finite() {
        return Err(RecErr::field("score", "not a finite number"));
    }
    Ok(PrefRecord::Scored {
        prompt,
        response,
        score: score as f32,
    })
}

fn parse_preference(obj: &Obj) -> Result<PrefRecord, RecErr> {
    if obj.contains_key("choices") {
        parse_ranking(obj)
    } else if obj.contains_key("chosen") || obj.contains_key("rejected") {
        parse_chosen_rejected(obj)
    } else if obj.contains_key("response_j") || obj.contains_key("response_k") {
        parse_stack_exchange(obj)
    } else if obj.contains_key("score") {
        parse_scored(obj)
    } else {
        Err(RecErr::record(
            "unrecognized preference record: expected ranking {\"input\", \"choices\"}, pairwise \
             {\"prompt\", \"chosen\", \"rejected\"}, HH-RLHF {\"chosen\", \"rejected\"}, \
             Stack-Exchange {\"question\", \"response_j\", \"response_k\"} or scored \
             {\"input\", \"output\", \"score\"}",
        ))
    }
}

/// Loads preference records. Per record:
/// * ranking `{"input", "choices": [{"text", "rank"}]}` (K >= 2, positive integer ranks, 1 best,
///   ties allowed but not all tied) -> `Ranked`;
/// * pairwise `{"prompt", "chosen", "rejected"}` -> `Ranked` with ranks 1, 2;
/// * HH-RLHF `{"chosen", "rejected"}` as whole dialogue strings or as message lists: consecutive
///   turns of one role are merged, the shared turns are the prompt and the final assistant turns
///   are the two responses -> `Ranked` with ranks 1, 2;
/// * Stack-Exchange `{"question", "response_j", "response_k"}` (j preferred) -> `Ranked`;
/// * scored `{"input", "output", "score"}` -> `Scored`.
///
/// A prompt string (`input`/`prompt`) that starts with `Human:` is split as an HH dialogue; it
/// may also be an array of `{"role", "content"}` messages.
pub fn load_preferences(path: &Path, opts: &LoadOptions) -> Result<Loaded<PrefRecord>, DataError> {
    load_records(path, opts, parse_preference)
}

// ---------------------------------------------------------------------------------------------
// Prompts
// ---------------------------------------------------------------------------------------------

fn parse_prompt(obj: &Obj) -> Result<PromptRecord, RecErr> {
    if let Some(v) = obj.get("prompt") {
        let (prompt, raw) = prompt_value(v, "prompt")?;
        return finish_prompt(prompt, raw);
    }
    if obj.contains_key("instruction") {
        let instruction = req_str(obj, "instruction", "instruction")?;
        if instruction.trim().is_empty() {
            return Err(RecErr::field("instruction", "empty"));
        }
        let input = opt_str(obj, "input")?;
        let raw = alpaca_prompt(instruction, input);
        let system = opt_str(obj, "system")?;
        let mut prompt = Vec::with_capacity(2);
        if !system.trim().is_empty() {
            prompt.push(Message::system(system));
        }
        prompt.push(Message::user(raw.as_str()));
        return Ok(PromptRecord { prompt, raw });
    }
    if let Some(msgs) = chat_messages(obj) {
        let mut msgs = msgs?;
        // A full conversation: the final assistant turn(s) are the reference answer; drop them.
        while msgs.last().is_some_and(|m| m.role == Role::Assistant) {
            msgs.pop();
        }
        let raw = last_user_text(&msgs)
            .ok_or_else(|| RecErr::record("chat with no user turn"))?
            .to_string();
        return finish_prompt(msgs, raw);
    }
    Err(RecErr::record(
        "unrecognized prompt record: expected {\"prompt\"}, Alpaca {\"instruction\", \"input\"?} \
         or chat {\"messages\"} / ShareGPT {\"conversations\"}",
    ))
}

fn finish_prompt(prompt: Vec<Message>, raw: String) -> Result<PromptRecord, RecErr> {
    match prompt.last() {
        Some(m) if m.role == Role::User => Ok(PromptRecord { prompt, raw }),
        Some(m) => Err(RecErr::record(format!(
            "prompt must end with a user turn (ends with {})",
            m.role
        ))),
        None => Err(RecErr::record("empty prompt")),
    }
}

/// Loads prompts for generation: `{"prompt"}` (a string, or an array of messages), Alpaca
/// `{"instruction", "input"?}` (output ignored; prompt text is instruction + `"\n\n"` + input
/// when input is non-empty), or chat `{"messages"}` / ShareGPT `{"conversations"}` (trailing
/// assistant turns are dropped). Every prompt ends with a user turn.
pub fn load_prompts(path: &Path, opts: &LoadOptions) -> Result<Loaded<PromptRecord>, DataError> {
    load_records(path, opts, parse_prompt)
}

/// [`load_prompts`], each with its whole record: extra fields (a reference answer, test cases)
/// travel with the prompt to reward programs.
pub fn load_prompts_with_fields(
    path: &Path,
    opts: &LoadOptions,
) -> Result<Loaded<(PromptRecord, Obj)>, DataError> {
    load_records(path, opts, |o| Ok((parse_prompt(o)?, o.clone())))
}
