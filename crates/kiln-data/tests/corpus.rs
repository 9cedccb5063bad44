//! Corpus reading: formats, directory walking, and errors that name file and line.

mod common;

use std::io::Write;
use std::path::PathBuf;

use kiln_data::{expand_inputs, read_documents, Error, Tokenizer};

fn write(dir: &std::path::Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn plain_text_splits_at_blank_lines() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "a.txt",
        b"\xEF\xBB\xBFfirst line\r\nsecond line\n\n  \n\nthird\n  indented\n\n\nlast",
    );
    let docs = read_documents(&p, "text").unwrap();
    assert_eq!(
        docs,
        vec!["first line\nsecond line", "third\n  indented", "last"]
    );
    let empty = write(dir.path(), "empty.txt", b"\n\n");
    assert!(read_documents(&empty, "text").unwrap().is_empty());
}

#[test]
fn jsonl_reads_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "d.jsonl",
        b"{\"text\": \"one\", \"id\": 1}\n\n{\"text\": \"two\\nlines\", \"body\": \"b\"}\n{\"text\": \"\"}\n",
    );
    assert_eq!(
        read_documents(&p, "text").unwrap(),
        vec!["one", "two\nlines"]
    );
    let e = read_documents(&p, "body").unwrap_err();
    assert!(matches!(e, Error::Jsonl { line: 1, .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("d.jsonl:1") && msg.contains("\"body\""),
        "{msg}"
    );
}

#[test]
fn gzip_inputs_are_decompressed() {
    let dir = tempfile::tempdir().unwrap();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(b"{\"text\": \"zipped\"}\n{\"text\": \"again\"}\n")
        .unwrap();
    let p = write(dir.path(), "d.jsonl.gz", &enc.finish().unwrap());
    assert_eq!(read_documents(&p, "text").unwrap(), vec!["zipped", "again"]);
}

#[test]
fn directories_are_walked_recursively_and_sorted() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "b.txt", b"b");
    write(dir.path(), "a/z.md", b"z");
    write(dir.path(), "a/y.jsonl", b"{\"text\":\"y\"}");
    write(dir.path(), "a/ignored.bin", b"\xff");
    write(dir.path(), ".hidden/x.txt", b"x");
    write(dir.path(), "noext", b"n");
    let files = expand_inputs(&[dir.path().to_path_buf()]).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.strip_prefix(dir.path()).unwrap().display().to_string())
        .collect();
    assert_eq!(names, vec!["a/y.jsonl", "a/z.md", "b.txt"]);
    // Explicit files are kept whatever their name; duplicates dropped.
    let noext = dir.path().join("noext");
    let files = expand_inputs(&[noext.clone(), noext.clone()]).unwrap();
    assert_eq!(files, vec![noext]);
}

#[test]
fn missing_input_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.txt");
    let e = expand_inputs(std::slice::from_ref(&missing)).unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }));
    assert!(e.to_string().contains("missing.txt"), "{e}");
    let e = read_documents(&missing, "text").unwrap_err();
    assert!(e.to_string().contains("missing.txt"), "{e}");
    assert!(expand_inputs(&[]).is_err());
}

#[test]
fn directory_without_text_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "data.bin", b"\x00\x01");
    let e = expand_inputs(&[dir.path().to_path_buf()]).unwrap_err();
    assert!(matches!(e, Error::NoText { .. }), "{e}");
    assert!(
        e.to_string().contains(&dir.path().display().to_string()),
        "{e}"
    );
    // A directory of empty text files: training finds no text.
    let empty = tempfile::tempdir().unwrap();
    write(empty.path(), "e.txt", b"\n\n");
    let e = Tokenizer::train(&[empty.path().to_path_buf()], "text", 300).unwrap_err();
    assert!(matches!(e, Error::NoText { .. }), "{e}");
    assert!(e.to_string().contains("e.txt"), "{e}");
}

#[test]
fn invalid_utf8_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "bad.txt", b"ok\nfine\n\nbro\xC3\x28ken\nmore");
    let e = read_documents(&p, "text").unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidUtf8 {
                line: 4,
                offset: 3,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("bad.txt:4"), "{e}");
    // Also through training.
    let e = Tokenizer::train(&[p], "text", 300).unwrap_err();
    assert!(e.to_string().contains("bad.txt:4"), "{e}");
}

#[test]
fn malformed_jsonl_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "bad.jsonl",
        b"{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"text\": \"c\"\n",
    );
    let e = read_documents(&p, "text").unwrap_err();
    assert!(matches!(e, Error::Jsonl { line: 3, .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("bad.jsonl:3") && msg.contains("malformed JSON"),
        "{msg}"
    );

    let p = write(dir.path(), "arr.jsonl", b"[1, 2]\n");
    assert!(read_documents(&p, "text")
        .unwrap_err()
        .to_string()
        .contains("arr.jsonl:1: expected a JSON object"));
    let p = write(
        dir.path(),
        "num.jsonl",
        b"{\"text\": \"a\"}\n{\"text\": 5}\n",
    );
    let msg = read_documents(&p, "text").unwrap_err().to_string();
    assert!(
        msg.contains("num.jsonl:2") && msg.contains("not a string"),
        "{msg}"
    );
}

#[test]
fn train_from_files_and_dirs() {
    let dir = tempfile::tempdir().unwrap();
    let body: String = common::corpus().join("\n\n");
    write(dir.path(), "c/part1.txt", body.as_bytes());
    write(
        dir.path(),
        "c/part2.jsonl",
        b"{\"content\": \"json document about the fox\"}\n",
    );
    let e = Tokenizer::train(&[dir.path().join("c")], "text", 300).unwrap_err();
    assert!(e.to_string().contains("part2.jsonl:1"), "{e}");
    let (tok, stats) =
        Tokenizer::train_with_stats(&[dir.path().join("c")], "content", 320).unwrap();
    assert_eq!(stats.documents, common::corpus().len() as u64 + 1);
    assert_eq!(tok.vocab_size(), 320);
    assert_eq!(tok.decode(&tok.encode("the fox")), "the fox");
}

#[test]
fn json_documents_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "rows.json", b"[{\"text\": \"a\"}]");
    let e = read_documents(&p, "text").unwrap_err().to_string();
    assert!(e.contains("rows.json") && e.contains(".jsonl"), "{e}");
}
