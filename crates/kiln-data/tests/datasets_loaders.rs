//! Dataset readers on small files written by the tests: formats, detection, errors, skip_bad.

use std::io::Write;
use std::path::PathBuf;

use kiln_data::datasets::{
    expand_pairs, load_preferences, load_prompts, load_sft, split_hh_dialogue, DataError,
    LoadOptions, Message, PrefRecord, RankedPrompt, RecordLoc, Role,
};

const STRICT: LoadOptions = LoadOptions::STRICT;
const SKIP: LoadOptions = LoadOptions::SKIP_BAD;

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn write_gz(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    let f = std::fs::File::create(&p).unwrap();
    let mut w = flate2::write::GzEncoder::new(f, flate2::Compression::default());
    w.write_all(text.as_bytes()).unwrap();
    w.finish().unwrap();
    p
}

fn err_string(e: DataError) -> String {
    e.to_string()
}

#[test]
fn expand_pairs_all_orders_and_ties() {
    let p = expand_pairs(&[1, 2, 3, 4]);
    assert_eq!(p, vec![(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]);
    assert_eq!(expand_pairs(&[1, 1, 2]), vec![(0, 2), (1, 2)]);
    assert_eq!(expand_pairs(&[3, 1, 2]), vec![(1, 0), (1, 2), (2, 0)]);
    assert!(expand_pairs(&[2, 2]).is_empty());
    assert!(expand_pairs(&[]).is_empty());
}

#[test]
fn sft_alpaca_chat_sharegpt_json_and_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = r#"{"instruction": "Add", "input": "1 2", "output": "3", "text": "ignored"}
{"instruction": "Hi", "output": "Hello"}

{"instruction": "Hi", "input": "", "output": "Hello"}
{"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "trailing"}]}
{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
"#;
    let loaded = load_sft(&write(&dir, "d.jsonl", jsonl), &STRICT).unwrap();
    assert_eq!(loaded.skipped, 0);
    let r = &loaded.records;
    assert_eq!(r.len(), 5);
    assert_eq!(
        r[0].messages,
        vec![Message::user("Add\n\n1 2"), Message::assistant("3")]
    );
    assert_eq!(
        r[1].messages,
        vec![Message::user("Hi"), Message::assistant("Hello")]
    );
    assert_eq!(r[2].messages, r[1].messages);
    // Trailing user turn dropped.
    assert_eq!(
        r[3].messages,
        vec![
            Message::system("be nice"),
            Message::user("q"),
            Message::assistant("a")
        ]
    );
    assert_eq!(
        r[4].messages,
        vec![Message::user("q"), Message::assistant("a")]
    );

    // The same records as a JSON array, gzipped.
    let lines: Vec<&str> = jsonl.lines().filter(|l| !l.trim().is_empty()).collect();
    let array = format!("  [\n{}\n]", lines.join(",\n"));
    let gz = load_sft(&write_gz(&dir, "d.json.gz", &array), &STRICT).unwrap();
    assert_eq!(gz.records, loaded.records);
}

#[test]
fn error_names_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let text = "{\"instruction\": \"a\", \"output\": \"b\"}\n\n{\"instruction\": \"a\"}\n";
    let path = write(&dir, "data.jsonl", text);
    let e = load_sft(&path, &STRICT).unwrap_err();
    assert_eq!(e.record, Some(RecordLoc::Line(3)));
    assert_eq!(e.field.as_deref(), Some("output"));
    let msg = err_string(e);
    assert!(
        msg.ends_with("data.jsonl:3: field \"output\": missing"),
        "{msg}"
    );
    assert!(msg.starts_with(&path.display().to_string()), "{msg}");

    // JSON array: 0-based record index.
    let path = write(
        &dir,
        "data.json",
        r#"[{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "  "}]"#,
    );
    let msg = err_string(load_sft(&path, &STRICT).unwrap_err());
    assert!(
        msg.ends_with("data.json: record 1: field \"output\": empty response"),
        "{msg}"
    );
}

#[test]
fn bad_sft_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("empty.jsonl", "", "empty.jsonl: empty dataset"),
        ("blank.jsonl", "\n  \n", "blank.jsonl: empty dataset"),
        ("empty.json", "[]", "empty.json: empty dataset"),
        (
            "noasst.jsonl",
            r#"{"messages": [{"role": "user", "content": "q"}]}"#,
            "noasst.jsonl:1: chat with no assistant turn",
        ),
        (
            "sharegpt.json",
            r#"[{"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}]"#,
            "sharegpt.json: record 0: field \"conversations[1].from\": unknown role \"robot\"",
        ),
        (
            "emptyresp.jsonl",
            r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}"#,
            "emptyresp.jsonl:1: field \"messages[1].content\": empty response",
        ),
        (
            "unknown.jsonl",
            r#"{"foo": 1}"#,
            "unknown.jsonl:1: unrecognized SFT record",
        ),
        (
            "badjson.jsonl",
            "{\"instruction\": \"a\", \"output\": \"b\"}\n{oops}\n",
            "badjson.jsonl:2: invalid JSON",
        ),
        (
            "notobj.json",
            "[1]",
            "notobj.json: record 0: not a JSON object",
        ),
        ("text.txt", "hello", "text.txt: not JSON, JSONL or Parquet"),
        (
            "type.jsonl",
            r#"{"instruction": "a", "output": 3}"#,
            "type.jsonl:1: field \"output\": expected a string, found a number",
        ),
    ];
    for (name, text, want) in cases {
        let msg = err_string(load_sft(&write(&dir, name, text), &STRICT).unwrap_err());
        assert!(msg.contains(want), "{name}: got {msg:?}, want {want:?}");
    }
    let missing = dir.path().join("nope.json");
    let msg = err_string(load_sft(&missing, &STRICT).unwrap_err());
    assert!(msg.contains("nope.json: cannot read"), "{msg}");
}

#[test]
fn skip_bad_counts_and_reports_first_error() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"{"instruction": "a", "output": "b"}
{"instruction": "a"}
{"messages": [{"role": "user", "content": "q"}]}
{"instruction": "c", "output": "d"}
"#;
    let path = write(&dir, "mixed.jsonl", text);
    assert!(load_sft(&path, &STRICT).is_err());
    let l = load_sft(&path, &SKIP).unwrap();
    assert_eq!(l.records.len(), 2);
    assert_eq!(l.skipped, 2);
    let first = l.first_error.unwrap();
    assert!(
        first.ends_with("mixed.jsonl:2: field \"output\": missing"),
        "{first}"
    );

    let all_bad = write(&dir, "bad.jsonl", "{\"instruction\": \"a\"}\n");
    let msg = err_string(load_sft(&all_bad, &SKIP).unwrap_err());
    assert!(msg.contains("no usable records"), "{msg}");
    assert!(msg.contains("field \"output\": missing"), "{msg}");
}

fn ranked(r: &PrefRecord) -> &RankedPrompt {
    match r {
        PrefRecord::Ranked(r) => r,
        other => panic!("expected Ranked, got {other:?}"),
    }
}

#[test]
fn preference_formats() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"{"input": "q", "choices": [{"text": "a", "rank": 2}, {"text": "b", "rank": 1}, {"text": "c", "rank": 2.0}]}
{"prompt": "q", "chosen": "good", "rejected": "bad"}
{"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: funny", "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: no"}
{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}], "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "y"}]}
{"question": "how?", "response_j": "like this", "response_k": "dunno"}
{"input": "q", "output": "r", "score": -1.5}
{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "chosen": "c", "rejected": "r"}
{"prompt": "\n\nHuman: q\n\nAssistant:", "chosen": " c", "rejected": " r"}
"#;
    let l = load_preferences(&write(&dir, "p.jsonl", text), &STRICT).unwrap();
    let r = &l.records;
    assert_eq!(r.len(), 8);
    let r0 = ranked(&r[0]);
    assert_eq!(r0.prompt, vec![Message::user("q")]);
    assert_eq!(
        r0.choices,
        vec![("a".into(), 2), ("b".into(), 1), ("c".into(), 2)]
    );
    assert_eq!(r0.pairs(), vec![(1, 0), (1, 2)]);

    let r1 = ranked(&r[1]);
    assert_eq!(r1.prompt, vec![Message::user("q")]);
    assert_eq!(r1.choices, vec![("good".into(), 1), ("bad".into(), 2)]);

    let r2 = ranked(&r[2]);
    assert_eq!(
        r2.prompt,
        vec![
            Message::user("hi"),
            Message::assistant("hello"),
            Message::user("joke?")
        ]
    );
    assert_eq!(r2.choices, vec![("funny".into(), 1), ("no".into(), 2)]);

    let r3 = ranked(&r[3]);
    assert_eq!(r3.prompt, vec![Message::user("q")]);
    assert_eq!(r3.choices, vec![("x".into(), 1), ("y".into(), 2)]);

    let r4 = ranked(&r[4]);
    assert_eq!(r4.prompt, vec![Message::user("how?")]);
    assert_eq!(
        r4.choices,
        vec![("like this".into(), 1), ("dunno".into(), 2)]
    );

    assert_eq!(
        r[5],
        PrefRecord::Scored {
            prompt: vec![Message::user("q")],
            response: "r".into(),
            score: -1.5
        }
    );
    let r6 = ranked(&r[6]);
    assert_eq!(r6.prompt, vec![Message::system("s"), Message::user("q")]);
    let r7 = ranked(&r[7]);
    assert_eq!(r7.prompt, vec![Message::user("q")]);
    assert_eq!(r7.choices, vec![(" c".into(), 1), (" r".into(), 2)]);
}

#[test]
fn bad_preferences() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            r#"{"input": "q", "choices": [{"text": "a", "rank": 1}]}"#,
            "field \"choices\": a ranking needs at least 2 choices",
        ),
        (
            r#"{"input": "q", "choices": [{"text": "a", "rank": 1}, {"text": "b", "rank": 1.5}]}"#,
            "field \"choices[1].rank\": not a positive integer",
        ),
        (
            r#"{"input": "q", "choices": [{"text": "a", "rank": 1}, {"text": "b", "rank": "2"}]}"#,
            "field \"choices[1].rank\": not a positive integer",
        ),
        (
            r#"{"input": "q", "choices": [{"text": "a", "rank": 0}, {"text": "b", "rank": 1}]}"#,
            "field \"choices[0].rank\": not a positive integer",
        ),
        (
            r#"{"input": "q", "choices": [{"text": "a", "rank": 1}, {"text": "b", "rank": 1}]}"#,
            "field \"choices\": all choices share one rank",
        ),
        (
            r#"{"input": "q", "choices": [{"text": "", "rank": 1}, {"text": "b", "rank": 2}]}"#,
            "field \"choices[0].text\": empty response",
        ),
        (
            r#"{"prompt": "q", "chosen": "a", "rejected": ""}"#,
            "field \"rejected\": empty response",
        ),
        (
            r#"{"prompt": "q", "chosen": "a", "rejected": "a"}"#,
            "chosen and rejected are identical",
        ),
        (
            r#"{"chosen": "just text", "rejected": "other"}"#,
            "field \"chosen\": not an HH-RLHF dialogue",
        ),
        (
            r#"{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: y"}"#,
            "must share every turn but the final assistant response",
        ),
        (
            r#"{"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c", "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: d"}"#,
            "the final turn must be an assistant response",
        ),
        (
            r#"{"question": "q", "response_j": "a"}"#,
            "field \"response_k\": missing",
        ),
        (
            r#"{"input": "q", "output": "r", "score": "high"}"#,
            "field \"score\": expected a number",
        ),
        (
            r#"{"input": "q", "output": "", "score": 1}"#,
            "field \"output\": empty response",
        ),
        (r#"{"text": "q"}"#, "unrecognized preference record"),
    ];
    for (i, (line, want)) in cases.iter().enumerate() {
        let path = write(&dir, &format!("bad{i}.jsonl"), line);
        let msg = err_string(load_preferences(&path, &STRICT).unwrap_err());
        let prefix = format!("bad{i}.jsonl:1: ");
        assert!(msg.contains(&prefix), "{msg}");
        assert!(msg.contains(want), "case {i}: got {msg:?}, want {want:?}");
    }
}

#[test]
fn hh_dialogue_splitting() {
    let turns =
        split_hh_dialogue("\n\nHuman: a b\n\nAssistant: c\n\nHuman: d\n\nAssistant:").unwrap();
    assert_eq!(
        turns,
        vec![
            Message::user("a b"),
            Message::assistant("c"),
            Message::user("d"),
            Message::assistant("")
        ]
    );
    assert_eq!(
        split_hh_dialogue("Human: x\n\nAssistant: y").unwrap(),
        vec![Message::user("x"), Message::assistant("y")]
    );
    assert!(split_hh_dialogue("plain text").is_none());
    assert!(split_hh_dialogue("intro\n\nHuman: x").is_none());
    assert!(split_hh_dialogue("\n\nAssistant: x").is_none());
}

#[test]
fn hh_consecutive_assistant_turns_are_merged() {
    let dir = tempfile::tempdir().unwrap();
    // The chosen side has two assistant turns in a row (as in real HH-RLHF data).
    let line = r#"{"chosen": "\n\nHuman: q\n\nAssistant: part one\n\nAssistant: part two", "rejected": "\n\nHuman: q\n\nAssistant: other"}"#;
    let l = load_preferences(&write(&dir, "m.jsonl", line), &STRICT).unwrap();
    let r = ranked(&l.records[0]);
    assert_eq!(r.prompt, vec![Message::user("q")]);
    assert_eq!(
        r.choices,
        vec![("part one\n\npart two".into(), 1), ("other".into(), 2)]
    );
}

#[test]
fn prompts() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"{"prompt": "tell me"}
{"instruction": "Add", "input": "1 2", "output": "ignored"}
{"instruction": "Hi", "input": ""}
{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]}
{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
"#;
    let l = load_prompts(&write(&dir, "pr.jsonl", text), &STRICT).unwrap();
    let r = &l.records;
    assert_eq!(r[0].prompt, vec![Message::user("tell me")]);
    assert_eq!(r[0].raw, "tell me");
    assert_eq!(r[1].prompt, vec![Message::user("Add\n\n1 2")]);
    assert_eq!(r[1].raw, "Add\n\n1 2");
    assert_eq!(r[2].raw, "Hi");
    assert_eq!(r[3].prompt.len(), 3);
    assert_eq!(r[3].raw, "q2");
    assert_eq!(r[4].prompt, vec![Message::user("q")]);
    for p in r {
        assert_eq!(p.prompt.last().unwrap().role, Role::User);
    }

    let bad = write(
        &dir,
        "bad.jsonl",
        r#"{"messages": [{"role": "system", "content": "s"}]}"#,
    );
    let msg = err_string(load_prompts(&bad, &STRICT).unwrap_err());
    assert!(msg.contains("bad.jsonl:1: chat with no user turn"), "{msg}");
    let bad = write(&dir, "bad2.jsonl", r#"{"instruction": ""}"#);
    let msg = err_string(load_prompts(&bad, &STRICT).unwrap_err());
    assert!(
        msg.contains("bad2.jsonl:1: field \"instruction\": empty"),
        "{msg}"
    );
}
