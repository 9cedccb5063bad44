//! End-to-end checks of the generated demo data: determinism, judge agreement, held-out
//! disjointness and corpus coverage.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use kiln_demo::{
    generate, prompt_text, CorpusDoc, DemoManifest, PromptRecord, RankRecord, ScoredRecord,
    SftRecord, Size, TaskKind, World, HEDGE,
};
use serde::de::DeserializeOwned;

fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Vec<T> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}")))
        .collect()
}

/// All files of a directory, by name.
/// The generator's notion of a hard question, restated: any number of 12 or more in a sum or
/// difference, two numbers of 50 or more to compare, a word of five letters or more.
fn looks_hard(prompt: &str) -> bool {
    let numbers: Vec<u64> = prompt
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    if prompt.starts_with("Which number") {
        return numbers.iter().all(|&n| n >= 50);
    }
    if prompt.starts_with("What is") {
        return numbers.iter().any(|&n| n >= 12);
    }
    let word = prompt
        .rsplit(|c: char| !c.is_ascii_lowercase())
        .find(|w| !w.is_empty())
        .unwrap_or("");
    (prompt.starts_with("Spell") || prompt.starts_with("How many")) && word.len() >= 5
}

fn dir_contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            (name, fs::read(entry.path()).unwrap())
        })
        .collect()
}

#[test]
fn same_seed_same_bytes_other_seed_other_data() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    generate(a.path(), 11, Size::Tiny).unwrap();
    generate(b.path(), 11, Size::Tiny).unwrap();
    generate(c.path(), 12, Size::Tiny).unwrap();
    let (a, b, c) = (
        dir_contents(a.path()),
        dir_contents(b.path()),
        dir_contents(c.path()),
    );
    assert_eq!(a.len(), 12, "files: {:?}", a.keys().collect::<Vec<_>>());
    assert!(a.keys().all(|name| !name.ends_with(".tmp")));
    assert_eq!(a, b);
    for name in [
        "world.json",
        "corpus.jsonl",
        "sft_train.jsonl",
        "rm_train.jsonl",
        "eval_prompts.jsonl",
    ] {
        assert_ne!(a[name], c[name], "{name} does not depend on the seed");
    }
}

#[test]
fn size_names_round_trip() {
    for size in Size::ALL {
        assert_eq!(size.name().parse::<Size>().unwrap(), size);
    }
    assert!("huge".parse::<Size>().is_err());
}

#[test]
fn tiny_data_is_consistent() {
    let dir = tempfile::tempdir().unwrap();
    check(dir.path(), 1, Size::Tiny);
}

#[test]
fn small_data_is_consistent() {
    let dir = tempfile::tempdir().unwrap();
    check(dir.path(), 2, Size::Small);
}

/// Generates `size` data for `seed` into `dir` and checks everything the later stages rely on.
fn check(dir: &Path, seed: u64, size: Size) {
    let manifest = generate(dir, seed, size).unwrap();
    let spec = size.spec();
    assert_eq!(DemoManifest::load(dir).unwrap(), manifest);
    let files = &manifest.files;
    let world = World::load(&dir.join(&files.world)).unwrap();
    assert_eq!(world, World::generate(seed));

    // --- SFT: every output is the canonical answer or a hedge ("I do not know."), hedges far
    // more often on questions that look hard; both input shapes appear.
    let sft_train: Vec<SftRecord> = read_jsonl(&dir.join(&files.sft_train));
    let sft_val: Vec<SftRecord> = read_jsonl(&dir.join(&files.sft_val));
    assert_eq!(
        (sft_train.len(), sft_val.len()),
        (spec.sft_train, spec.sft_val)
    );
    let mut kinds = BTreeMap::new();
    let mut hedges = BTreeMap::new();
    for r in sft_train.iter().chain(&sft_val) {
        let prompt = prompt_text(&r.instruction, r.input.as_deref().unwrap_or(""));
        let entry = hedges.entry(looks_hard(&prompt)).or_insert([0usize; 2]);
        entry[1] += 1;
        if r.output == HEDGE {
            entry[0] += 1;
            continue;
        }
        let j = world.judge(&prompt, &r.output);
        assert!(
            j.correct && j.well_formed && j.score == 1.0,
            "{prompt:?} -> {:?}: {j:?}",
            r.output
        );
        assert_eq!(
            world.canonical_answer(&prompt).as_deref(),
            Some(r.output.as_str())
        );
        *kinds.entry(j.task.unwrap()).or_insert(0usize) += 1;
    }
    assert_eq!(
        kinds.keys().copied().collect::<Vec<_>>(),
        TaskKind::ALL.to_vec()
    );
    let rate = |hard: bool| hedges[&hard][0] as f64 / hedges[&hard][1] as f64;
    assert!(rate(true) > 0.45 && rate(true) < 0.75, "{hedges:?}");
    assert!(rate(false) < 0.1, "{hedges:?}");
    assert!(
        sft_train.iter().any(|r| r.input.is_none()),
        "no record without input"
    );
    assert!(
        sft_train.iter().any(|r| r.input.as_deref() == Some("")),
        "no empty input"
    );
    assert!(sft_train
        .iter()
        .any(|r| r.input.as_deref().is_some_and(|i| !i.is_empty())));

    // --- Ranking: ranks 1-4, judged as intended, scores strictly decreasing with rank.
    let rm_train: Vec<RankRecord> = read_jsonl(&dir.join(&files.rm_train));
    let rm_val: Vec<RankRecord> = read_jsonl(&dir.join(&files.rm_val));
    let rm_heldout: Vec<RankRecord> = read_jsonl(&dir.join(&files.rm_heldout));
    assert_eq!((rm_train.len(), rm_val.len()), (spec.rm_train, spec.rm_val));
    assert_eq!(rm_heldout.len(), spec.rm_val);
    assert_eq!(manifest.counts.rm_heldout, spec.rm_val);
    let mut first_ranked_first = 0;
    for r in rm_train.iter().chain(&rm_val).chain(&rm_heldout) {
        let mut choices = r.choices.clone();
        first_ranked_first += usize::from(choices[0].rank == 1);
        choices.sort_by_key(|c| c.rank);
        assert_eq!(
            choices.iter().map(|c| c.rank).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        let verdicts: Vec<_> = choices
            .iter()
            .map(|c| world.judge(&r.input, &c.text))
            .collect();
        let shapes: Vec<_> = verdicts
            .iter()
            .map(|j| (j.correct, j.well_formed))
            .collect();
        assert_eq!(
            shapes,
            [(true, true), (true, false), (false, true), (false, false)],
            "{:?}: {choices:?}",
            r.input
        );
        assert!(verdicts.windows(2).all(|w| w[0].score > w[1].score));
    }
    let n = rm_train.len() + rm_val.len() + rm_heldout.len();
    assert!(first_ranked_first < n / 2, "choices are not shuffled");

    // --- Scored: four per ranking record, scores are the judge's.
    for (name, ranked) in [
        (&files.rm_scored_train, &rm_train),
        (&files.rm_scored_val, &rm_val),
    ] {
        let scored: Vec<ScoredRecord> = read_jsonl(&dir.join(name));
        assert_eq!(scored.len(), 4 * ranked.len());
        let mut seen = BTreeSet::new();
        for s in &scored {
            assert_eq!(s.score, world.judge(&s.input, &s.output).score, "{s:?}");
            seen.insert((s.score * 10.0).round() as u32);
        }
        assert_eq!(seen, BTreeSet::from([0, 2, 6, 10]));
    }

    // --- Held out: ppo prompts are never SFT prompts; eval prompts (and the held-out rankings)
    // are in no training file at all.
    let sft_prompts: BTreeSet<String> = sft_train
        .iter()
        .chain(&sft_val)
        .map(|r| prompt_text(&r.instruction, r.input.as_deref().unwrap_or("")))
        .collect();
    let rm_prompts: BTreeSet<String> = rm_train
        .iter()
        .chain(&rm_val)
        .map(|r| r.input.clone())
        .collect();
    let train_prompts: BTreeSet<String> = sft_prompts.union(&rm_prompts).cloned().collect();
    let ppo: Vec<PromptRecord> = read_jsonl(&dir.join(&files.ppo_prompts));
    let eval: Vec<PromptRecord> = read_jsonl(&dir.join(&files.eval_prompts));
    assert_eq!(
        (ppo.len(), eval.len()),
        (spec.ppo_prompts, spec.eval_prompts)
    );
    let distinct_eval: BTreeSet<&String> = eval.iter().map(|r| &r.prompt).collect();
    assert_eq!(distinct_eval.len(), eval.len(), "eval prompts repeat");
    let corpus: Vec<CorpusDoc> = read_jsonl(&dir.join(&files.corpus));
    let corpus_text: String = corpus
        .iter()
        .map(|d| d.text.as_str())
        .collect::<Vec<_>>()
        .join("\n\n");
    for (records, other, seen) in [(&ppo, &eval, &sft_prompts), (&eval, &ppo, &train_prompts)] {
        let mut kinds = BTreeSet::new();
        for r in records {
            assert_eq!(r.prompt, prompt_text(&r.instruction, &r.input));
            kinds.insert(world.judge(&r.prompt, "").task.expect("a demo task"));
            assert!(
                !seen.contains(&r.prompt),
                "{:?} is also a training prompt",
                r.prompt
            );
            assert!(
                other.iter().all(|o| o.prompt != r.prompt),
                "{:?} in ppo and eval",
                r.prompt
            );
            assert!(
                !corpus_text.contains(&r.prompt),
                "{:?} asked in the corpus",
                r.prompt
            );
        }
        assert_eq!(kinds.len(), TaskKind::ALL.len());
    }
    for r in &rm_heldout {
        assert!(
            !train_prompts.contains(&r.input),
            "{:?} trained on",
            r.input
        );
        assert!(
            ppo.iter().all(|p| p.prompt != r.input),
            "{:?} in ppo",
            r.input
        );
    }
    // The reward model does rank answers to PPO's questions, so the checks above can fail.
    assert!(ppo.iter().any(|p| rm_prompts.contains(&p.prompt)));
    // The training side does use questions in the corpus, so the check above can fail.
    assert!(train_prompts
        .iter()
        .any(|p| corpus_text.contains(p.as_str())));
    for name in &manifest.held_out.eval.characters {
        let prompt = format!("Where does {name} live?");
        assert!(
            eval.iter().any(|r| r.prompt == prompt),
            "held-out {name} not evaluated"
        );
    }

    // --- Corpus: big enough, well-formed, states every fact.
    let corpus_bytes = fs::metadata(dir.join(&files.corpus)).unwrap().len() as usize;
    assert!(
        corpus_bytes >= spec.corpus_bytes,
        "{corpus_bytes} < {}",
        spec.corpus_bytes
    );
    assert!(corpus_bytes < spec.corpus_bytes + spec.corpus_bytes / 10 + 50_000);
    assert_eq!(corpus_bytes, manifest.counts.corpus_bytes);
    assert_eq!(corpus.len(), manifest.counts.corpus_documents);
    assert!(corpus.iter().all(|d| !d.text.trim().is_empty()));
    // Spelled out here rather than taken from World::facts, so that dropping a fact there fails.
    let mut facts = Vec::new();
    for c in &world.characters {
        facts.push(format!("{} lives in {}.", c.name, c.place));
        let article = if c.pet.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        facts.push(format!("{} has {article} {}.", c.name, c.pet));
        facts.push(format!("{} likes the {} best.", c.name, c.favourite));
    }
    for o in &world.objects {
        facts.push(format!("The {} is {}.", o.name, o.colour));
    }
    assert_eq!(facts.len(), world.facts().len());
    for fact in facts {
        assert!(corpus_text.contains(&fact), "corpus lacks {fact:?}");
    }
    for a in 0..=20 {
        for b in 0..=20 {
            assert!(corpus_text.contains(&format!("{a} plus {b} is {}.", a + b)));
        }
    }
    for word in &world.words {
        let reversed: String = word.chars().rev().collect();
        assert!(corpus_text.contains(&format!("{word} spelled backwards is {reversed}.")));
        assert!(corpus_text.contains(&format!("The word {word} has {} letters.", word.len())));
    }
    println!(
        "{size}: {} corpus docs, {corpus_bytes} bytes; counts {:?}",
        corpus.len(),
        manifest.counts
    );
}
