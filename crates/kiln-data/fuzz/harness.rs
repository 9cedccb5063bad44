//! Shared fuzz harness (included with `#[path]` by the `fuzz_*.rs` tests of kiln-data and
//! kiln-model): a counting allocator for a memory bound, a watchdog for hangs, the seed corpus and
//! input mutations for proptest.
#![allow(dead_code)]

use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Counts live heap bytes and their peak, so every case can assert a memory bound.
pub struct Counting;

pub static LIVE: AtomicUsize = AtomicUsize::new(0);
pub static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            if new_size >= layout.size() {
                let now = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size
                    - layout.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

/// Tests of one binary run one at a time, so each case's memory peak is its own.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Longest a reader may take on one small input.
pub const HANG: Duration = Duration::from_secs(10);

/// Panics seen by the hook (including ones a reader catches itself: they still count as bugs).
pub static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            prev(info)
        }));
    });
}

/// Runs `f` on a watchdog thread: fails on a panic, on a hang (longer than [`HANG`]) and when the
/// heap grows more than `mem_limit` bytes above where it started. Returns what `f` returned.
pub fn guarded<T: Send + 'static>(
    what: &str,
    mem_limit: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    count_panics();
    let panics = PANICS.load(Ordering::SeqCst);
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let (tx, rx) = std::sync::mpsc::channel();
    let t0 = Instant::now();
    let h = std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(());
        r
    });
    if rx.recv_timeout(HANG).is_err() && !h.is_finished() {
        panic!("{what}: no result after {:?} (hang?)", t0.elapsed());
    }
    let r = h.join().expect("watchdog thread");
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    assert!(
        peak <= mem_limit,
        "{what}: used {peak} bytes of heap (limit {mem_limit})"
    );
    match r {
        Ok(v) => {
            let n = PANICS.load(Ordering::SeqCst) - panics;
            assert_eq!(
                n, 0,
                "{what}: {n} panic(s) inside the reader (caught, but a bug)"
            );
            v
        }
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{what}: the reader panicked: {msg}");
        }
    }
}

/// The seed corpus: `crates/kiln-data/fuzz/corpus` (or `$KILN_FUZZ_CORPUS`).
pub fn corpus_root() -> PathBuf {
    std::env::var_os("KILN_FUZZ_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../kiln-data/fuzz/corpus"))
}

/// Every file of `corpus/<reader>/`, sorted, with its name.
pub fn seeds(reader: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_root().join(reader);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().to_string(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "{}: no seed inputs", dir.display());
    out
}

/// One edit of an input.
#[derive(Clone, Debug)]
pub enum Mutation {
    FlipBit(usize, u8),
    SetByte(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
    /// Copies a slice of the input over another place (JSON structure repeated or cut).
    Splice(usize, usize, usize),
    /// Overwrites 4 or 8 little-endian bytes with an extreme integer (header fields).
    Integer(usize, u64, bool),
}

/// Byte sequences that matter to the readers' formats.
const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"\n",
    b"\r\n",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"null",
    b"true",
    b"1e400",
    b"-0",
    b"18446744073709551616",
    b"\"role\"",
    b"\"content\"",
    b"\"messages\"",
    b"\"instruction\"",
    b"\"output\"",
    b"\"choices\"",
    b"\"rank\"",
    b"\"score\"",
    b"\"chosen\"",
    b"\"rejected\"",
    b"\"prompt\"",
    b"\"text\"",
    b"\"input\"",
    b"\"Human: \"",
    b"\n\nAssistant:",
    b"\xEF\xBB\xBF",
    b"\xff\xfe",
    b"\x1f\x8b",
    b"\xc3",
    b"\xe2\x82",
    b"\x00",
    b"KILNTOK\x00",
    b"\"dtype\"",
    b"\"F32\"",
    b"\"BF16\"",
    b"\"shape\"",
    b"\"data_offsets\"",
    b"\"vocab\"",
    b"\"merges\"",
    b"\"n_embd\"",
    b"\"n_head\"",
    b"\"n_layer\"",
    b"\"vocab_size\"",
    b"\"n_positions\"",
    b"<|endoftext|>",
    b"<|user|>",
    b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
];

pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        (
            any::<usize>(),
            prop_oneof![
                prop::sample::select(TOKENS).prop_map(|t| t.to_vec()),
                prop::collection::vec(any::<u8>(), 1..8),
            ]
        )
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        (any::<usize>(), 1usize..64).prop_map(|(i, n)| Mutation::Delete(i, n)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<usize>(), 1usize..256)
            .prop_map(|(a, b, n)| Mutation::Splice(a, b, n)),
        (
            any::<usize>(),
            prop_oneof![
                Just(0u64),
                Just(1),
                Just(u32::MAX as u64),
                Just(u64::MAX),
                Just(1 << 31),
                Just(1 << 40),
                any::<u64>()
            ],
            any::<bool>()
        )
            .prop_map(|(i, v, wide)| Mutation::Integer(i, v, wide)),
    ]
}

pub fn apply(input: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let mut v = input.to_vec();
    for m in muts {
        let n = v.len();
        match m {
            Mutation::FlipBit(i, b) if n > 0 => v[i % n] ^= 1 << b,
            Mutation::SetByte(i, b) if n > 0 => v[i % n] = *b,
            Mutation::Insert(i, bytes) => {
                let at = i % (n + 1);
                v.splice(at..at, bytes.iter().copied());
            }
            Mutation::Delete(i, k) if n > 0 => {
                let at = i % n;
                let end = (at + k).min(n);
                v.drain(at..end);
            }
            Mutation::Truncate(i) => v.truncate(i % (n + 1)),
            Mutation::Splice(a, b, k) if n > 0 => {
                let (a, b) = (a % n, b % n);
                let k = (*k).min(n - a);
                let piece = v[a..a + k].to_vec();
                v.splice(b..(b + k).min(n), piece);
            }
            Mutation::Integer(i, x, wide) => {
                let w = if *wide { 8 } else { 4 };
                if n >= w {
                    let at = i % (n - w + 1);
                    v[at..at + w].copy_from_slice(&x.to_le_bytes()[..w]);
                }
            }
            _ => {}
        }
    }
    v
}

/// An input for a reader: a mutated seed (mostly) or random bytes under a seed's file name.
/// (file name, bytes)
pub fn input(seeds: Vec<(String, Vec<u8>)>) -> impl Strategy<Value = (String, Vec<u8>)> {
    let n = seeds.len();
    let names: Vec<String> = seeds.iter().map(|s| s.0.clone()).collect();
    prop_oneof![
        8 => (0..n, prop::collection::vec(mutation(), 1..8)).prop_map(move |(i, m)| {
            let (name, bytes) = &seeds[i];
            (name.clone(), apply(bytes, &m))
        }),
        1 => (prop::sample::select(names), prop::collection::vec(any::<u8>(), 0..512)),
    ]
}

/// Cases per property: a quick default, or `$PROPTEST_CASES` for the sustained (ignored) runs.
pub fn cases(quick: u32, sustained: bool) -> u32 {
    if sustained {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000)
    } else {
        quick
    }
}

/// Executions run by this process (printed by the sustained tests).
pub static EXECS: AtomicUsize = AtomicUsize::new(0);

/// A proptest config that neither writes regression files for the sustained runs nor forks.
pub fn config(cases: u32) -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        cases,
        max_shrink_iters: 2000,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    }
}

/// Runs `check` on every seed and on `cases` mutated/random inputs (no regression file; failures
/// are shrunk and reported with the input, which goes into the corpus once fixed).
///
/// `check(file_name, bytes)`: the input's file name is its seed's (the extension picks a format).
pub fn fuzz(reader: &str, cases: u32, check: impl Fn(&str, &[u8])) {
    let _g = serial();
    for (name, bytes) in seeds(reader) {
        check(&name, &bytes);
        EXECS.fetch_add(1, Ordering::Relaxed);
    }
    let mut runner = proptest::test_runner::TestRunner::new(config(cases));
    let t0 = Instant::now();
    let result = runner.run(&input(seeds(reader)), |(name, bytes)| {
        check(&name, &bytes);
        EXECS.fetch_add(1, Ordering::Relaxed);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{reader}: {e}");
    }
    if cases > 1000 {
        eprintln!(
            "{reader}: {cases} cases in {:.1}s",
            t0.elapsed().as_secs_f64()
        );
    }
}
