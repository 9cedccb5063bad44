//! Parquet files (the format of Hugging Face datasets) as JSON records: each row becomes the
//! object its columns spell, so the dataset loaders parse Parquet and JSON(L) with the same code.
//!
//! Read with the `parquet` crate's row API (no Arrow): strings (`BYTE_ARRAY` with the `STRING`
//! annotation, and unannotated binary that is valid UTF-8, as some writers leave it) become JSON
//! strings, integers and floats numbers, nulls `null`, lists arrays, structs objects (a
//! `messages` column of `{role, content}` structs is a chat), maps objects.

use std::fs::File;
use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::Type;
use serde_json::{Map, Value};

use crate::datasets::{DataError, RecordLoc};

/// The four bytes every Parquet file starts (and ends) with.
pub const MAGIC: &[u8; 4] = b"PAR1";

/// A top-level column: its name and its type as the schema states it (`BYTE_ARRAY (STRING)`,
/// `INT64`, `group (LIST)`), for errors.
#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub type_name: String,
}

/// The rows of a Parquet file, with where each is, and its columns.
pub struct ParquetRows {
    pub rows: Vec<(RecordLoc, Value)>,
    pub columns: Vec<Column>,
}

/// Whether `path` is a Parquet file: named `.parquet`, or starting with the magic bytes.
pub fn is_parquet(path: &Path, head: &[u8]) -> bool {
    path.extension().is_some_and(|e| e == "parquet") || head.starts_with(MAGIC)
}

fn describe(t: &Type) -> String {
    let info = t.get_basic_info();
    let annotation = info
        .logical_type_ref()
        .map(|l| format!("{l:?}"))
        .or_else(|| {
            let c = info.converted_type();
            (c != parquet::basic::ConvertedType::NONE).then(|| c.to_string())
        });
    let base = if t.is_primitive() {
        t.get_physical_type().to_string()
    } else {
        "group".to_string()
    };
    match annotation {
        // `String`, `List`, `Integer { .. }`...: upper-cased as the Parquet spec names them.
        Some(a) => format!(
            "{base} ({})",
            a.split([' ', '{']).next().unwrap_or(&a).to_uppercase()
        ),
        None => base,
    }
}

/// Reads every row of `path`. A file that is not Parquet or is cut short (no footer) fails as a
/// whole; a row that cannot be decoded fails with its row group and row. The `parquet` crate
/// panics on some corrupt files (negative offsets in the footer, ...): such a panic is caught and
/// reported as a corrupt file, without the panic message on stderr.
pub fn read_rows(path: &Path) -> Result<ParquetRows, DataError> {
    quiet_panics::install();
    let _quiet = quiet_panics::Quiet::new();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_rows_unguarded(path))) {
        Ok(r) => r,
        Err(payload) => {
            let why = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "the reader failed".into());
            Err(DataError {
                file: path.to_path_buf(),
                record: None,
                field: None,
                message: format!("corrupt Parquet file: {why}"),
            })
        }
    }
}

/// Silences the panic hook on this thread while a [`Quiet`] guard lives (the panic is caught
/// and reported as an error); other threads' panics print as always.
mod quiet_panics {
    use std::cell::Cell;

    thread_local! {
        static QUIET: Cell<usize> = const { Cell::new(0) };
    }

    pub fn install() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if QUIET.with(|q| q.get()) == 0 {
                    previous(info);
                }
            }));
        });
    }

    pub struct Quiet;

    impl Quiet {
        pub fn new() -> Quiet {
            QUIET.with(|q| q.set(q.get() + 1));
            Quiet
        }
    }

    impl Drop for Quiet {
        fn drop(&mut self) {
            QUIET.with(|q| q.set(q.get() - 1));
        }
    }
}

fn read_rows_unguarded(path: &Path) -> Result<ParquetRows, DataError> {
    let file_err = |message: String| DataError {
        file: path.to_path_buf(),
        record: None,
        field: None,
        message,
    };
    let file = File::open(path).map_err(|e| file_err(format!("cannot read: {e}")))?;
    let reader = SerializedFileReader::new(file).map_err(|e| {
        file_err(format!(
            "not a readable Parquet file (truncated, or not Parquet?): {e}"
        ))
    })?;
    let schema = reader.metadata().file_metadata().schema();
    let columns: Vec<Column> = schema
        .get_fields()
        .iter()
        .map(|f| Column {
            name: f.name().to_string(),
            type_name: describe(f),
        })
        .collect();
    let mut rows = Vec::with_capacity(reader.metadata().file_metadata().num_rows().max(0) as usize);
    for group in 0..reader.num_row_groups() {
        // Row numbers count from the file's first row.
        let first = rows.len();
        let at = |row: usize| RecordLoc::Row {
            group,
            row: first + row,
        };
        let rg = reader.get_row_group(group).map_err(|e| DataError {
            record: Some(at(0)),
            ..file_err(format!("cannot read row group {group}: {e}"))
        })?;
        let iter = rg.get_row_iter(None).map_err(|e| DataError {
            record: Some(at(0)),
            ..file_err(format!("cannot read row group {group}: {e}"))
        })?;
        for (i, row) in iter.enumerate() {
            let row = row.map_err(|e| DataError {
                record: Some(at(i)),
                ..file_err(format!("cannot decode the row: {e}"))
            })?;
            let obj: Map<String, Value> = row
                .get_column_iter()
                .map(|(k, v)| (k.clone(), to_json(v)))
                .collect();
            rows.push((at(i), Value::Object(obj)));
        }
    }
    Ok(ParquetRows { rows, columns })
}

/// One Parquet value as JSON.
fn to_json(f: &Field) -> Value {
    match f {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(x) => (*x).into(),
        Field::Short(x) => (*x).into(),
        Field::Int(x) => (*x).into(),
        Field::Long(x) => (*x).into(),
        Field::UByte(x) => (*x).into(),
        Field::UShort(x) => (*x).into(),
        Field::UInt(x) => (*x).into(),
        Field::ULong(x) => (*x).into(),
        Field::Float16(x) => f64::from(f32::from(*x)).into(),
        Field::Float(x) => f64::from(*x).into(),
        Field::Double(x) => (*x).into(),
        Field::Str(s) => Value::String(s.clone()),
        // Unannotated binary: text when it is UTF-8, else its bytes (a loader then reports
        // "expected a string, found an array").
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => Value::Array(b.data().iter().map(|&x| x.into()).collect()),
        },
        Field::Group(row) => Value::Object(
            row.get_column_iter()
                .map(|(k, v)| (k.clone(), to_json(v)))
                .collect(),
        ),
        Field::ListInternal(list) => Value::Array(list.elements().iter().map(to_json).collect()),
        Field::MapInternal(map) => Value::Object(
            map.entries()
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        Field::Str(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        // Decimals, dates and times: their text.
        other => Value::String(other.to_string()),
    }
}
