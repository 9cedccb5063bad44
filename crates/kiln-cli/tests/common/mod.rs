//! Helpers shared by the CLI tests: run the `kiln` binary quietly with a fixed thread count (results
//! are reproducible per thread count), and check how it ended.
#![allow(dead_code)] // each test binary uses its own subset

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

/// `kiln --quiet --threads N`, ready for arguments.
pub fn kiln(threads: usize) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.args(["--quiet", "--threads", &threads.to_string()]);
    c
}

/// Runs kiln and asserts success; returns its output.
pub fn ok<S: AsRef<OsStr> + std::fmt::Debug>(threads: usize, args: &[S]) -> Output {
    let o = kiln(threads).args(args).output().expect("running kiln");
    assert!(
        o.status.success(),
        "kiln {args:?} failed:\n{}",
        text(&o.stderr)
    );
    o
}

/// Runs kiln expecting a clean failure: exit code 1, no panic, and every one of `needles` in
/// stderr, which it returns.
pub fn fails(threads: usize, args: &[&str], needles: &[&str]) -> String {
    let o = kiln(threads).args(args).output().expect("running kiln");
    let err = text(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(1),
        "kiln {args:?} should fail with exit 1:\n{err}"
    );
    assert!(!err.contains("panicked"), "kiln {args:?} panicked:\n{err}");
    for n in needles {
        assert!(err.contains(n), "kiln {args:?}: expected {n:?} in:\n{err}");
    }
    err
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Copies the files (not the subdirectories) of `from` into `to`.
pub fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}
