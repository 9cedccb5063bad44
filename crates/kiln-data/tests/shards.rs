//! Shard format: write/read round trips (u16 and u32), multi-shard streams, corrupt files.

mod common;

use kiln_data::shards::{self, HEADER_LEN, MAGIC};
use kiln_data::{write_shard, Error, Shard, ShardSet};
use proptest::prelude::*;

fn pseudo_tokens(n: usize, vocab: u32, seed: u64) -> Vec<u32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as u32
        })
        .collect()
}

#[test]
fn u16_round_trip_and_header_layout() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("train_000.bin");
    let mut tokens = pseudo_tokens(10_000, 65536, 1);
    tokens[0] = 65535;
    tokens[1] = 0;
    write_shard(&p, &tokens, 65536, "0123456789abcdef").unwrap();
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(bytes.len(), HEADER_LEN + 2 * tokens.len());
    assert_eq!(&bytes[0..8], &MAGIC);
    assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 1);
    assert_eq!(u32::from_le_bytes(bytes[12..16].try_into().unwrap()), 2);
    assert_eq!(u32::from_le_bytes(bytes[16..20].try_into().unwrap()), 65536);
    assert_eq!(
        u64::from_le_bytes(bytes[20..28].try_into().unwrap()),
        10_000
    );
    assert_eq!(&bytes[28..44], b"0123456789abcdef");
    assert!(bytes[44..64].iter().all(|&b| b == 0));
    assert_eq!(u16::from_le_bytes([bytes[64], bytes[65]]), 65535);

    let s = Shard::open(&p).unwrap();
    assert_eq!(s.len(), tokens.len());
    assert_eq!(s.token_width(), 2);
    assert_eq!(s.vocab_size(), 65536);
    assert_eq!(s.fingerprint(), "0123456789abcdef");
    assert_eq!(s.to_vec(), tokens);
    assert_eq!(s.get(0), 65535);
    let mut out = vec![0; 100];
    s.read(500, &mut out);
    assert_eq!(out, tokens[500..600]);
    assert_eq!(common::ls(dir.path()), vec!["train_000.bin"]);
}

#[test]
fn u32_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.bin");
    let mut tokens = pseudo_tokens(5_000, 100_000, 2);
    tokens[7] = 99_999;
    tokens[8] = 70_000;
    write_shard(&p, &tokens, 100_000, "abc").unwrap();
    assert_eq!(
        std::fs::metadata(&p).unwrap().len() as usize,
        HEADER_LEN + 4 * tokens.len()
    );
    let s = Shard::open(&p).unwrap();
    assert_eq!(s.token_width(), 4);
    assert_eq!(s.fingerprint(), "abc");
    assert_eq!(s.to_vec(), tokens);
    assert_eq!(s.get(7), 99_999);
}

#[test]
fn empty_shard() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("val_000.bin");
    write_shard(&p, &[], 300, "f").unwrap();
    let s = Shard::open(&p).unwrap();
    assert!(s.is_empty());
    let set = ShardSet::open_dir(dir.path(), "val").unwrap();
    assert!(set.is_empty());
    set.read(0, &mut []);
}

#[test]
fn write_rejects_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.bin");
    let e = write_shard(&p, &[1, 2, 300], 300, "f")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("token 300 at index 2") && e.contains("x.bin"),
        "{e}"
    );
    assert!(write_shard(&p, &[1], 300, "0123456789abcdef0").is_err());
    assert!(write_shard(&p, &[1], 300, "é").is_err());
    assert!(
        common::ls(dir.path()).is_empty(),
        "nothing written on error"
    );
}

#[test]
fn unwritable_path_is_an_error_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("regular");
    std::fs::write(&file, b"x").unwrap();
    let e = write_shard(&file.join("train_000.bin"), &[1, 2], 300, "f").unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert!(e.to_string().contains("regular"), "{e}");
    // A path that is an existing directory.
    let e = write_shard(dir.path(), &[1], 300, "f").unwrap_err();
    assert!(e.to_string().contains("directory"), "{e}");
    assert_eq!(common::ls(dir.path()), vec!["regular"]);
}

#[test]
fn corrupt_shards_are_rejected_with_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.bin");
    write_shard(&good, &[1, 2, 3, 4], 300, "fp").unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let check = |name: &str, data: &[u8], want: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        let e = Shard::open(&p).unwrap_err();
        assert!(matches!(e, Error::Shard { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(name) && msg.contains(want), "{name}: {msg}");
    };
    let mut bad = bytes.clone();
    bad[0] = b'X';
    check("magic.bin", &bad, "bad magic");
    let mut bad = bytes.clone();
    bad[8] = 2;
    check("version.bin", &bad, "unsupported shard format version 2");
    let mut bad = bytes.clone();
    bad[12] = 3;
    check("width.bin", &bad, "token width");
    check("short.bin", &bytes[..bytes.len() - 1], "truncated");
    check(
        "long.bin",
        &[&bytes[..], &[0, 0]].concat(),
        "truncated or corrupt",
    );
    check("tiny.bin", &bytes[..10], "smaller than the 64-byte header");
    let mut bad = bytes.clone();
    bad[20..28].copy_from_slice(&u64::MAX.to_le_bytes());
    check("count.bin", &bad, "truncated or corrupt");
    let e = Shard::open(&dir.path().join("absent.bin")).unwrap_err();
    assert!(e.to_string().contains("absent.bin"));
}

#[test]
fn shard_set_reads_across_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let all = pseudo_tokens(1000, 500, 3);
    let cuts = [0, 300, 300, 650, 1000]; // includes an empty shard
    for i in 0..4 {
        write_shard(
            &dir.path().join(shards::shard_file_name("train", i)),
            &all[cuts[i]..cuts[i + 1]],
            500,
            "fp",
        )
        .unwrap();
    }
    write_shard(&dir.path().join("val_000.bin"), &[9, 9], 500, "fp").unwrap();
    std::fs::write(dir.path().join("train_notes.txt"), b"ignored").unwrap();
    let set = ShardSet::open_dir(dir.path(), "train").unwrap();
    assert_eq!(set.len(), 1000);
    assert_eq!(set.shards().len(), 4);
    assert_eq!(set.vocab_size(), 500);
    assert_eq!(set.fingerprint(), "fp");
    set.check_fingerprint("fp").unwrap();
    let e = set.check_fingerprint("other").unwrap_err().to_string();
    assert!(e.contains("\"fp\"") && e.contains("other"), "{e}");
    for (start, len) in [
        (0, 1000),
        (290, 20),
        (299, 2),
        (300, 350),
        (640, 360),
        (999, 1),
        (1000, 0),
    ] {
        let mut out = vec![0; len];
        set.read(start, &mut out);
        assert_eq!(out, all[start..start + len], "{start}+{len}");
    }
    for i in [0, 299, 300, 649, 650, 999] {
        assert_eq!(set.get(i), all[i]);
    }
    assert_eq!(ShardSet::open_dir(dir.path(), "val").unwrap().len(), 2);
}

#[test]
#[should_panic(expected = "out of range")]
fn shard_set_read_out_of_range_panics() {
    let dir = tempfile::tempdir().unwrap();
    write_shard(&dir.path().join("train_000.bin"), &[1, 2, 3], 300, "fp").unwrap();
    let set = ShardSet::open_dir(dir.path(), "train").unwrap();
    let mut out = [0; 2];
    set.read(2, &mut out);
}

#[test]
fn shard_set_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = ShardSet::open_dir(dir.path(), "train")
        .unwrap_err()
        .to_string();
    assert!(e.contains("no train shards"), "{e}");
    write_shard(&dir.path().join("train_000.bin"), &[1], 300, "fp").unwrap();
    write_shard(&dir.path().join("train_002.bin"), &[1], 300, "fp").unwrap();
    let e = ShardSet::open_dir(dir.path(), "train")
        .unwrap_err()
        .to_string();
    assert!(e.contains("train_001.bin is missing"), "{e}");
    write_shard(&dir.path().join("train_001.bin"), &[1], 300, "other").unwrap();
    let e = ShardSet::open_dir(dir.path(), "train")
        .unwrap_err()
        .to_string();
    assert!(e.contains("train_001.bin") && e.contains("differ"), "{e}");
    let e = ShardSet::open_dir(&dir.path().join("nope"), "train")
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn prop_write_read(vocab in 1usize..200_000, n in 0usize..2000, seed: u64) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("train_000.bin");
        let tokens = pseudo_tokens(n, vocab as u32, seed);
        write_shard(&p, &tokens, vocab, "0f").unwrap();
        let s = Shard::open(&p).unwrap();
        prop_assert_eq!(s.token_width(), if vocab <= 65536 { 2 } else { 4 });
        prop_assert_eq!(s.to_vec(), tokens);
    }
}
