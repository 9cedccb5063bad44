//! Parquet datasets: the same rows as JSONL and as Parquet load identically (Parquet written here
//! with the `parquet` crate's writer, and by pyarrow: `scripts/make_parquet_fixtures.py`), column
//! mapping (`FieldMap`), and clear errors for a missing column, a wrong type, a truncated footer.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_data::datasets::{
    load_preferences, load_prompts, load_prompts_with_fields, load_sft, DataError, FieldMap,
    LoadOptions, Message, RecordLoc,
};
use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

const STRICT: LoadOptions = LoadOptions::STRICT;

/// A column of a Parquet file written by [`write_parquet`].
enum Col {
    /// `OPTIONAL BYTE_ARRAY (UTF8)`: `None` is null.
    Str(&'static str, Vec<Option<&'static str>>),
    /// `REQUIRED INT64`.
    I64(&'static str, Vec<i64>),
    /// A list of structs of two strings, as `messages: [{role, content}]`, in the standard
    /// three-level LIST layout (`list` / `element`).
    Structs(&'static str, [&'static str; 2], Vec<Vec<[&'static str; 2]>>),
}

impl Col {
    fn rows(&self) -> usize {
        match self {
            Col::Str(_, v) => v.len(),
            Col::I64(_, v) => v.len(),
            Col::Structs(_, _, v) => v.len(),
        }
    }
    fn schema(&self) -> String {
        match self {
            Col::Str(n, _) => format!("OPTIONAL BYTE_ARRAY {n} (UTF8);"),
            Col::I64(n, _) => format!("REQUIRED INT64 {n};"),
            Col::Structs(n, [a, b], _) => format!(
                "REQUIRED group {n} (LIST) {{ REPEATED group list {{ REQUIRED group element {{ \
                 REQUIRED BYTE_ARRAY {a} (UTF8); REQUIRED BYTE_ARRAY {b} (UTF8); }} }} }}"
            ),
        }
    }
}

/// Writes `cols` (equal lengths) as a Parquet file with `rows_per_group` rows per row group.
fn write_parquet(path: &Path, cols: &[Col], rows_per_group: usize) {
    let schema = format!(
        "message schema {{ {} }}",
        cols.iter().map(Col::schema).collect::<Vec<_>>().join(" ")
    );
    let schema = Arc::new(parse_message_type(&schema).unwrap());
    let props = Arc::new(WriterProperties::builder().build());
    let file = std::fs::File::create(path).unwrap();
    let mut w = SerializedFileWriter::new(file, schema, props).unwrap();
    let n = cols[0].rows();
    assert!(cols.iter().all(|c| c.rows() == n));
    for lo in (0..n).step_by(rows_per_group) {
        let hi = (lo + rows_per_group).min(n);
        let mut rg = w.next_row_group().unwrap();
        for c in cols {
            match c {
                Col::Str(_, v) => {
                    let mut cw = rg.next_column().unwrap().unwrap();
                    let vals: Vec<ByteArray> =
                        v[lo..hi].iter().flatten().map(|s| (*s).into()).collect();
                    let defs: Vec<i16> = v[lo..hi].iter().map(|s| s.is_some() as i16).collect();
                    cw.typed::<ByteArrayType>()
                        .write_batch(&vals, Some(&defs), None)
                        .unwrap();
                    cw.close().unwrap();
                }
                Col::I64(_, v) => {
                    let mut cw = rg.next_column().unwrap().unwrap();
                    cw.typed::<Int64Type>()
                        .write_batch(&v[lo..hi], None, None)
                        .unwrap();
                    cw.close().unwrap();
                }
                Col::Structs(_, _, rows) => {
                    for k in 0..2 {
                        let mut cw = rg.next_column().unwrap().unwrap();
                        let (mut vals, mut defs, mut reps) = (Vec::new(), Vec::new(), Vec::new());
                        for row in &rows[lo..hi] {
                            if row.is_empty() {
                                defs.push(0);
                                reps.push(0);
                            }
                            for (j, item) in row.iter().enumerate() {
                                vals.push(ByteArray::from(item[k]));
                                defs.push(1);
                                reps.push(i16::from(j > 0));
                            }
                        }
                        cw.typed::<ByteArrayType>()
                            .write_batch(&vals, Some(&defs), Some(&reps))
                            .unwrap();
                        cw.close().unwrap();
                    }
                }
            }
        }
        rg.close().unwrap();
    }
    w.close().unwrap();
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn alpaca_cols() -> Vec<Col> {
    vec![
        Col::Str(
            "instruction",
            vec![
                Some("Add 2 and 3."),
                Some("Say hi."),
                Some("Name a colour."),
                Some("Spell cat backwards."),
                Some("Translate: eau"),
            ],
        ),
        Col::Str(
            "input",
            vec![Some(""), None, Some("any"), None, Some("français ✓")],
        ),
        Col::Str(
            "output",
            vec![
                Some("5"),
                Some("Hi!"),
                Some("Blue."),
                Some("tac"),
                Some("water"),
            ],
        ),
    ]
}

const ALPACA_JSONL: &str = r#"{"instruction": "Add 2 and 3.", "input": "", "output": "5"}
{"instruction": "Say hi.", "input": null, "output": "Hi!"}
{"instruction": "Name a colour.", "input": "any", "output": "Blue."}
{"instruction": "Spell cat backwards.", "output": "tac"}
{"instruction": "Translate: eau", "input": "français ✓", "output": "water"}
"#;

#[test]
fn sft_rows_load_the_same_from_parquet_and_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    // Alpaca, in row groups of 2 (so rows 2..4 come from later groups).
    let pq = dir.path().join("alpaca.parquet");
    write_parquet(&pq, &alpaca_cols(), 2);
    let from_pq = load_sft(&pq, &STRICT).unwrap();
    let from_jsonl = load_sft(&write(dir.path(), "alpaca.jsonl", ALPACA_JSONL), &STRICT).unwrap();
    assert_eq!(from_pq.records, from_jsonl.records);
    assert_eq!(from_pq.records.len(), 5);
    assert_eq!(
        from_pq.locations,
        vec![
            RecordLoc::Row { group: 0, row: 0 },
            RecordLoc::Row { group: 0, row: 1 },
            RecordLoc::Row { group: 1, row: 2 },
            RecordLoc::Row { group: 1, row: 3 },
            RecordLoc::Row { group: 2, row: 4 },
        ]
    );
    assert_eq!(
        from_pq.records[2].messages,
        vec![
            Message::user("Name a colour.\n\nany"),
            Message::assistant("Blue.")
        ]
    );

    // A chat column: a list of {role, content} structs.
    let chat = dir.path().join("chat.parquet");
    write_parquet(
        &chat,
        &[Col::Structs(
            "messages",
            ["role", "content"],
            vec![
                vec![["user", "Hi"], ["assistant", "Hello!"]],
                vec![
                    ["system", "Be brief."],
                    ["user", "2+2?"],
                    ["assistant", "4"],
                    ["user", "3+3?"],
                    ["assistant", "6"],
                ],
                vec![
                    ["user", "日本語 🙂"],
                    ["assistant", "はい"],
                    ["user", "trailing"],
                ],
            ],
        )],
        2,
    );
    let jsonl = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]}
{"messages": [{"role": "user", "content": "日本語 🙂"}, {"role": "assistant", "content": "はい"}, {"role": "user", "content": "trailing"}]}
"#;
    let a = load_sft(&chat, &STRICT).unwrap();
    let b = load_sft(&write(dir.path(), "chat.jsonl", jsonl), &STRICT).unwrap();
    assert_eq!(a.records, b.records);
    assert_eq!(a.records[1].messages.len(), 5);
    assert_eq!(
        a.records[2].messages.len(),
        2,
        "the trailing user turn is dropped"
    );
}

#[test]
fn preference_and_prompt_rows_load_the_same_from_parquet_and_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let pq = dir.path().join("prefs.parquet");
    write_parquet(
        &pq,
        &[
            Col::Str(
                "prompt",
                vec![Some("What is 2 plus 3?"), Some("Where is Ada?")],
            ),
            Col::Str("chosen", vec![Some("5."), Some("In Oakvale.")]),
            Col::Str("rejected", vec![Some("I do not know."), Some("oakvale")]),
        ],
        8,
    );
    let jsonl = r#"{"prompt": "What is 2 plus 3?", "chosen": "5.", "rejected": "I do not know."}
{"prompt": "Where is Ada?", "chosen": "In Oakvale.", "rejected": "oakvale"}
"#;
    let a = load_preferences(&pq, &STRICT).unwrap();
    let b = load_preferences(&write(dir.path(), "p.jsonl", jsonl), &STRICT).unwrap();
    assert_eq!(a.records, b.records);
    assert_eq!(a.records.len(), 2);

    // Prompts with an extra column, which travels with the record (for reward programs).
    let pq = dir.path().join("prompts.parquet");
    write_parquet(
        &pq,
        &[
            Col::Str("prompt", vec![Some("What is 6 plus 7?"), Some("Is 9 odd?")]),
            Col::I64("answer", vec![13, 1]),
        ],
        1,
    );
    let jsonl = "{\"prompt\": \"What is 6 plus 7?\", \"answer\": 13}\n{\"prompt\": \"Is 9 odd?\", \"answer\": 1}\n";
    let jl = write(dir.path(), "prompts.jsonl", jsonl);
    assert_eq!(
        load_prompts(&pq, &STRICT).unwrap().records,
        load_prompts(&jl, &STRICT).unwrap().records
    );
    let a = load_prompts_with_fields(&pq, &STRICT).unwrap();
    let b = load_prompts_with_fields(&jl, &STRICT).unwrap();
    assert_eq!(a.records, b.records);
    assert_eq!(a.records[0].1["answer"], 13);
}

#[test]
fn columns_map_to_kiln_fields() {
    let dir = tempfile::tempdir().unwrap();
    let pq = dir.path().join("qa.parquet");
    write_parquet(
        &pq,
        &[
            Col::Str(
                "question",
                vec![Some("Capital of France?"), Some("10 minus 3?")],
            ),
            Col::Str("answer", vec![Some("Paris."), Some("7.")]),
            // A column named like a Kiln field but not the one meant: the mapping wins.
            Col::Str("output", vec![Some("wrong"), Some("wrong")]),
        ],
        8,
    );
    let opts = LoadOptions {
        fields: FieldMap::parse(&["instruction=question", "output=answer"]).unwrap(),
        ..LoadOptions::STRICT
    };
    let a = load_sft(&pq, &opts).unwrap();
    let jsonl = "{\"instruction\": \"Capital of France?\", \"output\": \"Paris.\"}\n{\"instruction\": \"10 minus 3?\", \"output\": \"7.\"}\n";
    let b = load_sft(&write(dir.path(), "qa.jsonl", jsonl), &STRICT).unwrap();
    assert_eq!(a.records, b.records);

    // The same mapping on JSON; an error names the dataset's column and the mapping.
    let bad = write(
        dir.path(),
        "bad.jsonl",
        "{\"question\": \"q\", \"answer\": 5}\n",
    );
    let e = load_sft(&bad, &opts).unwrap_err().to_string();
    assert!(
        e.ends_with("bad.jsonl:1: field \"answer\": expected a string, found a number (--field output=answer)"),
        "{e}"
    );
    // Bad mappings.
    let e = FieldMap::parse(&["answer=output"]).unwrap_err();
    assert!(e.contains("\"answer\" is not a field Kiln reads"), "{e}");
    assert!(FieldMap::parse(&["output"])
        .unwrap_err()
        .contains("KILN_FIELD=COLUMN"));
    let e = FieldMap::parse(&["output=a", "instruction=a"]).unwrap_err();
    assert!(e.contains("mapped to both"), "{e}");
}

fn err(r: Result<impl Sized, DataError>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_parquet_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // A missing column: the error lists the columns there are.
    let p = dir.path().join("missing.parquet");
    let mut cols = alpaca_cols();
    cols.pop();
    write_parquet(&p, &cols, 8);
    let e = err(load_sft(&p, &STRICT));
    assert!(
        e.ends_with(
            "missing.parquet: row 0 (row group 0): column \"output\": missing: the file has no \
             column \"output\" (its columns: instruction, input; map one with --field)"
        ),
        "{e}"
    );
    // A mapped column that is not there.
    let opts = LoadOptions {
        fields: FieldMap::parse(&["output=response"]).unwrap(),
        ..LoadOptions::STRICT
    };
    let e = err(load_sft(&p, &opts));
    assert!(
        e.contains("column \"response\": missing (--field output=response): the file has no column \"response\""),
        "{e}"
    );
    // No column of any known format.
    let p = dir.path().join("unknown.parquet");
    write_parquet(&p, &[Col::Str("text", vec![Some("a")])], 8);
    let e = err(load_sft(&p, &STRICT));
    assert!(e.contains("unrecognized SFT record"), "{e}");
    assert!(e.contains("(the file's columns: text)"), "{e}");
    // A wrong type: the error names the column's Parquet type.
    let p = dir.path().join("int.parquet");
    let mut cols = alpaca_cols();
    cols[2] = Col::I64("output", vec![1, 2, 3, 4, 5]);
    write_parquet(&p, &cols, 8);
    let e = err(load_sft(&p, &STRICT));
    assert!(
        e.ends_with(
            "int.parquet: row 0 (row group 0): column \"output\": expected a string, found a \
             number (the Parquet column is INT64)"
        ),
        "{e}"
    );
    // A bad value in a later row group names its row and group; skip_bad skips just it.
    let p = dir.path().join("empty_answer.parquet");
    let mut cols = alpaca_cols();
    cols[2] = Col::Str(
        "output",
        vec![Some("5"), Some("Hi"), Some("x"), Some(" "), Some("y")],
    );
    write_parquet(&p, &cols, 2);
    let e = err(load_sft(&p, &STRICT));
    assert!(
        e.ends_with("row 3 (row group 1): column \"output\": empty response"),
        "{e}"
    );
    let l = load_sft(&p, &LoadOptions::SKIP_BAD).unwrap();
    assert_eq!((l.records.len(), l.skipped), (4, 1));
    // A bad role inside a chat column names the nested path.
    let p = dir.path().join("role.parquet");
    write_parquet(
        &p,
        &[Col::Structs(
            "messages",
            ["role", "content"],
            vec![vec![["user", "q"], ["robot", "a"]]],
        )],
        8,
    );
    let e = err(load_sft(&p, &STRICT));
    assert!(
        e.contains("row 0 (row group 0): column \"messages[1].role\": unknown role \"robot\""),
        "{e}"
    );
    // A truncated footer (the file cut short, as by an interrupted download).
    let good = dir.path().join("good.parquet");
    write_parquet(&good, &alpaca_cols(), 8);
    let bytes = std::fs::read(&good).unwrap();
    for cut in [4, 12, bytes.len() / 2] {
        let p = dir.path().join("cut.parquet");
        std::fs::write(&p, &bytes[..bytes.len() - cut]).unwrap();
        let e = err(load_sft(&p, &STRICT));
        assert!(
            e.contains("cut.parquet: not a readable Parquet file"),
            "{e}"
        );
    }
    // Parquet's magic bytes without a .parquet name are still read as Parquet.
    let p = dir.path().join("data.bin");
    std::fs::write(&p, &bytes).unwrap();
    assert_eq!(load_sft(&p, &STRICT).unwrap().records.len(), 5);
    // A file of zero rows.
    let p = dir.path().join("zero.parquet");
    write_parquet(&p, &[Col::Str("prompt", vec![])], 8);
    assert!(err(load_prompts(&p, &STRICT)).contains("empty dataset"));
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parquet")
        .join(name)
}

/// Files written by pyarrow (`scripts/make_parquet_fixtures.py`): large_string and string
/// columns, nulls, `list<struct>` chat and ranking columns, several row groups, snappy, zstd and
/// uncompressed pages.
#[test]
fn pyarrow_files_load_the_same_as_their_jsonl() {
    for name in ["sft_alpaca", "sft_chat"] {
        let a = load_sft(&fixture(&format!("{name}.parquet")), &STRICT).unwrap();
        let b = load_sft(&fixture(&format!("{name}.jsonl")), &STRICT).unwrap();
        assert_eq!(a.records, b.records, "{name}");
        assert!(a.records.len() >= 3);
    }
    let a = load_sft(&fixture("sft_alpaca.parquet"), &STRICT).unwrap();
    assert_eq!(a.locations[4], RecordLoc::Row { group: 2, row: 4 });
    assert_eq!(a.records[3].messages[1].content, "eau — l'eau ✓");
    let c = load_sft(&fixture("sft_chat.parquet"), &STRICT).unwrap();
    assert_eq!(c.records[2].messages[1].content, "はい 🙂");
    for name in ["prefs", "ranked"] {
        let a = load_preferences(&fixture(&format!("{name}.parquet")), &STRICT).unwrap();
        let b = load_preferences(&fixture(&format!("{name}.jsonl")), &STRICT).unwrap();
        assert_eq!(a.records, b.records, "{name}");
    }
    let r = load_preferences(&fixture("ranked.parquet"), &STRICT).unwrap();
    match &r.records[0] {
        kiln_data::datasets::PrefRecord::Ranked(k) => assert_eq!(k.choices.len(), 3),
        other => panic!("{other:?}"),
    }
    let a = load_prompts_with_fields(&fixture("prompts.parquet"), &STRICT).unwrap();
    let b = load_prompts_with_fields(&fixture("prompts.jsonl"), &STRICT).unwrap();
    assert_eq!(a.records, b.records);
    let opts = LoadOptions {
        fields: FieldMap::parse(&["instruction=question", "output=response"]).unwrap(),
        ..LoadOptions::STRICT
    };
    let a = load_sft(&fixture("renamed.parquet"), &opts).unwrap();
    let b = load_sft(&fixture("renamed.jsonl"), &opts).unwrap();
    assert_eq!(a.records, b.records);
    assert_eq!(a.records[0].messages[1].content, "Paris.");
}

/// A corrupted file (any byte changed, any length cut) gives an error or, where the damage
/// misses what is read, the rows: never a panic.
#[test]
fn corrupted_parquet_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.parquet");
    write_parquet(&good, &alpaca_cols(), 2);
    let bytes = std::fs::read(&good).unwrap();
    let p = dir.path().join("bad.parquet");
    let mut errors = 0;
    // Every third byte (every byte takes ~20 s on 2 cores and has found nothing more).
    for i in (0..bytes.len()).step_by(3) {
        for flip in [0x01u8, 0xff] {
            let mut b = bytes.clone();
            b[i] ^= flip;
            std::fs::write(&p, &b).unwrap();
            errors += usize::from(load_sft(&p, &STRICT).is_err());
        }
        std::fs::write(&p, &bytes[..i]).unwrap();
        assert!(load_sft(&p, &STRICT).is_err(), "cut at {i}");
    }
    assert!(errors > 0);
}
