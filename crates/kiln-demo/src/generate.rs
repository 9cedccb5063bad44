//! Writing a demo data directory: the world, the pretraining corpus, SFT, reward-model, PPO and
//! evaluation files, and a manifest.
//!
//! Every question of every task kind is assigned to one of three disjoint pools: train (used
//! by the SFT and reward-model files and by the corpus's question/answer paragraphs), ppo and
//! eval. The split depends only on the seed, not on the size.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::corpus::corpus;
use crate::task::{Question, HEDGE, MAX_COMPARED, MAX_OPERAND};
use crate::{rng, streams, TaskKind, World};

/// Version of the data written here; bump when its formats or its sizes change (a demo reuses data
/// of the same seed, size and version).
pub const FORMAT_VERSION: u32 = 3;

/// How often SFT demonstrations answer "I do not know." to questions that look hard, and to
/// the others.
const HEDGE_HARD: f64 = 0.6;
const HEDGE_EASY: f64 = 0.03;

/// Percentage of each kind's questions held out for PPO, and again for eval.
const HELD_OUT_PERCENT: usize = 12;

/// How much data to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    /// A few hundred records and a ~100 KB corpus: for tests and CI's end-to-end run.
    Tiny,
    /// The default demo: ~1.5 MB corpus, 4000 SFT examples.
    #[default]
    Small,
    /// ~6 MB corpus, 20000 SFT examples.
    Full,
}

/// Target record counts of one [`Size`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SizeSpec {
    /// corpus.jsonl is at least this many bytes.
    pub corpus_bytes: usize,
    pub sft_train: usize,
    pub sft_val: usize,
    /// Ranking records; the scored files have four records (one per choice) for each.
    pub rm_train: usize,
    pub rm_val: usize,
    pub ppo_prompts: usize,
    pub eval_prompts: usize,
}

impl Size {
    pub const ALL: [Size; 3] = [Size::Tiny, Size::Small, Size::Full];

    pub fn name(self) -> &'static str {
        match self {
            Size::Tiny => "tiny",
            Size::Small => "small",
            Size::Full => "full",
        }
    }

    pub fn spec(self) -> SizeSpec {
        match self {
            Size::Tiny => SizeSpec {
                corpus_bytes: 100_000,
                sft_train: 400,
                sft_val: 50,
                rm_train: 300,
                rm_val: 50,
                ppo_prompts: 64,
                eval_prompts: 56,
            },
            Size::Small => SizeSpec {
                corpus_bytes: 1_500_000,
                sft_train: 4000,
                sft_val: 200,
                rm_train: 6000,
                rm_val: 200,
                ppo_prompts: 512,
                eval_prompts: 200,
            },
            Size::Full => SizeSpec {
                corpus_bytes: 6_000_000,
                sft_train: 20_000,
                sft_val: 500,
                rm_train: 10_000,
                rm_val: 500,
                ppo_prompts: 2048,
                eval_prompts: 500,
            },
        }
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Size {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Size> {
        match Size::ALL.into_iter().find(|size| size.name() == s) {
            Some(size) => Ok(size),
            None => bail!("unknown demo size {s:?} (expected tiny, small or full)"),
        }
    }
}

/// One line of corpus.jsonl.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorpusDoc {
    pub text: String,
}

/// One line of sft_*.jsonl (Alpaca). `input` is absent or "" when the task has none; both
/// forms occur so readers must handle both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SftRecord {
    pub instruction: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    pub output: String,
}

/// One ranked answer; rank 1 is best.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankChoice {
    pub text: String,
    pub rank: u32,
}

/// One line of rm_train.jsonl / rm_val.jsonl: a prompt and four answers ranked 1-4 (in
/// shuffled order): 1 correct and well-formed, 2 correct but sloppy, 3 wrong but well-formed,
/// 4 wrong and sloppy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankRecord {
    /// The prompt text ([`crate::prompt_text`]).
    pub input: String,
    pub choices: Vec<RankChoice>,
}

/// One line of rm_scored_*.jsonl: a prompt, an answer and its judge score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredRecord {
    pub input: String,
    pub output: String,
    pub score: f32,
}

/// One line of ppo_prompts.jsonl / eval_prompts.jsonl. PPO prompts are balanced across task
/// kinds and may repeat; eval prompts are all distinct, so kinds with few held-out questions
/// (lives, colour) have fewer of them: report accuracy per kind (see [`crate::JudgeTally`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptRecord {
    /// `prompt_text(instruction, input)`.
    pub prompt: String,
    pub instruction: String,
    /// "" when the task has no input.
    pub input: String,
}

/// File names, relative to the output directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DemoFiles {
    pub world: String,
    pub corpus: String,
    pub sft_train: String,
    pub sft_val: String,
    pub rm_train: String,
    pub rm_val: String,
    pub rm_scored_train: String,
    pub rm_scored_val: String,
    /// Rankings about the eval units, which no stage trains on: how well the reward model
    /// carries to unseen questions.
    pub rm_heldout: String,
    pub ppo_prompts: String,
    pub eval_prompts: String,
}

impl Default for DemoFiles {
    fn default() -> DemoFiles {
        DemoFiles {
            world: "world.json".into(),
            corpus: "corpus.jsonl".into(),
            sft_train: "sft_train.jsonl".into(),
            sft_val: "sft_val.jsonl".into(),
            rm_train: "rm_train.jsonl".into(),
            rm_val: "rm_val.jsonl".into(),
            rm_scored_train: "rm_scored_train.jsonl".into(),
            rm_scored_val: "rm_scored_val.jsonl".into(),
            rm_heldout: "rm_heldout.jsonl".into(),
            ppo_prompts: "ppo_prompts.jsonl".into(),
            eval_prompts: "eval_prompts.jsonl".into(),
        }
    }
}

/// Records written to each file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DemoCounts {
    pub corpus_documents: usize,
    pub corpus_bytes: usize,
    pub sft_train: usize,
    pub sft_val: usize,
    pub rm_train: usize,
    pub rm_val: usize,
    pub rm_scored_train: usize,
    pub rm_scored_val: usize,
    pub rm_heldout: usize,
    pub ppo_prompts: usize,
    pub eval_prompts: usize,
}

/// The questions of one held-out pool, by what was held out.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HeldOutSet {
    /// Unordered operand pairs [a, b] with a <= b: both "a plus b" and "b plus a".
    pub add: Vec<[u64; 2]>,
    /// Ordered pairs [a, b]: "a minus b".
    pub sub: Vec<[u64; 2]>,
    /// Unordered pairs [a, b] with a < b: both orders of the question.
    pub compare: Vec<[u64; 2]>,
    /// Characters whose `lives` question is held out.
    pub characters: Vec<String>,
    /// Objects whose `colour` question is held out.
    pub objects: Vec<String>,
    /// Words whose `reverse` and `count` questions are held out.
    pub words: Vec<String>,
}

/// What the PPO and eval prompts hold out from training.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldOut {
    pub policy: String,
    pub ppo: HeldOutSet,
    pub eval: HeldOutSet,
}

/// manifest.json: what was generated, from what, and what is held out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DemoManifest {
    pub format_version: u32,
    pub seed: u64,
    pub size: Size,
    pub spec: SizeSpec,
    pub files: DemoFiles,
    pub counts: DemoCounts,
    pub held_out: HeldOut,
}

impl DemoManifest {
    /// Reads `dir/manifest.json`.
    pub fn load(dir: &Path) -> Result<DemoManifest> {
        let path = dir.join("manifest.json");
        let text = fs::read_to_string(&path)
            .with_context(|| format!("reading demo manifest {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// Generates all demo data files for `seed` and `size` into `out_dir` (created if needed) and
/// returns the manifest, which is written last as `manifest.json`. Same seed and size give
/// byte-identical files. Each file is written under a temporary name and then renamed.
pub fn generate(out_dir: &Path, seed: u64, size: Size) -> Result<DemoManifest> {
    fs::create_dir_all(out_dir)
        .with_context(|| format!("creating demo data directory {}", out_dir.display()))?;
    // A directory without a manifest is incomplete: drop the old one until we are done.
    match fs::remove_file(out_dir.join("manifest.json")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).context("removing the old manifest.json");
        }
        _ => {}
    }
    let spec = size.spec();
    let files = DemoFiles::default();
    let world = World::generate(seed);
    let split = Split::new(&world, seed);

    let docs: Vec<CorpusDoc> = corpus(
        &world,
        &split.train,
        spec.corpus_bytes,
        &mut rng(seed, streams::CORPUS),
    )
    .into_iter()
    .map(|text| CorpusDoc { text })
    .collect();

    let sft = |n, stream| sft_records(&world, &split.train, n, &mut rng(seed, stream));
    let sft_train = sft(spec.sft_train, streams::SFT_TRAIN);
    let sft_val = sft(spec.sft_val, streams::SFT_VAL);

    // As in InstructGPT, the reward model's comparisons cover the prompts PPO will see (its
    // units, not its exact prompt list); the eval units stay unseen by every stage.
    let rm_pools: Vec<Vec<Question>> = split
        .train
        .iter()
        .zip(&split.ppo)
        .map(|(train, ppo)| train.iter().chain(ppo).cloned().collect())
        .collect();
    let rm = |n, stream| rank_records(&world, &rm_pools, n, &mut rng(seed, stream));
    let rm_train = rm(spec.rm_train, streams::RM_TRAIN);
    let rm_val = rm(spec.rm_val, streams::RM_VAL);
    let rm_heldout = rank_records(
        &world,
        &split.eval,
        spec.rm_val,
        &mut rng(seed, streams::RM_HELDOUT),
    );
    let rm_scored_train = scored_records(&world, &rm_train);
    let rm_scored_val = scored_records(&world, &rm_val);

    // PPO samples prompts many times anyway, so it gets every kind equally often (repeating
    // the few held-out characters and objects); eval gets distinct prompts only, so that
    // "n prompts evaluated" means n different questions.
    let ppo_prompts = prompt_records(&balanced(
        &split.ppo,
        spec.ppo_prompts,
        &mut rng(seed, streams::PPO),
    ));
    let eval_prompts = prompt_records(&distinct(
        &split.eval,
        spec.eval_prompts,
        &mut rng(seed, streams::EVAL),
    ));

    write_file(out_dir, &files.world, &to_pretty_json(&world)?)?;
    let corpus_bytes = write_file(out_dir, &files.corpus, &to_jsonl(&docs)?)?;
    write_file(out_dir, &files.sft_train, &to_jsonl(&sft_train)?)?;
    write_file(out_dir, &files.sft_val, &to_jsonl(&sft_val)?)?;
    write_file(out_dir, &files.rm_train, &to_jsonl(&rm_train)?)?;
    write_file(out_dir, &files.rm_val, &to_jsonl(&rm_val)?)?;
    write_file(
        out_dir,
        &files.rm_scored_train,
        &to_jsonl(&rm_scored_train)?,
    )?;
    write_file(out_dir, &files.rm_scored_val, &to_jsonl(&rm_scored_val)?)?;
    write_file(out_dir, &files.rm_heldout, &to_jsonl(&rm_heldout)?)?;
    write_file(out_dir, &files.ppo_prompts, &to_jsonl(&ppo_prompts)?)?;
    write_file(out_dir, &files.eval_prompts, &to_jsonl(&eval_prompts)?)?;

    let manifest = DemoManifest {
        format_version: FORMAT_VERSION,
        seed,
        size,
        spec,
        counts: DemoCounts {
            corpus_documents: docs.len(),
            corpus_bytes,
            sft_train: sft_train.len(),
            sft_val: sft_val.len(),
            rm_train: rm_train.len(),
            rm_val: rm_val.len(),
            rm_scored_train: rm_scored_train.len(),
            rm_scored_val: rm_scored_val.len(),
            rm_heldout: rm_heldout.len(),
            ppo_prompts: ppo_prompts.len(),
            eval_prompts: eval_prompts.len(),
        },
        files,
        held_out: split.held_out,
    };
    write_file(out_dir, "manifest.json", &to_pretty_json(&manifest)?)?;
    Ok(manifest)
}

/// Every question, split into disjoint train / ppo / eval pools, one pool per task kind (in
/// [`TaskKind::ALL`] order).
struct Split {
    train: Vec<Vec<Question>>,
    ppo: Vec<Vec<Question>>,
    eval: Vec<Vec<Question>>,
    held_out: HeldOut,
}

impl Split {
    fn new(world: &World, seed: u64) -> Split {
        let mut rng = rng(seed, streams::SPLIT);
        let sub_pairs = pairs(MAX_OPERAND, true).into_iter().map(|[b, a]| [a, b]);
        let [add, sub, compare] = [
            pairs(MAX_OPERAND, true),
            sub_pairs.collect(),
            pairs(MAX_COMPARED, false),
        ]
        .map(|units| three_way(units, &mut rng));
        let [characters, objects, words] = [
            world.characters.iter().map(|c| c.name.clone()).collect(),
            world.objects.iter().map(|o| o.name.clone()).collect(),
            world.words.clone(),
        ]
        .map(|units| three_way(units, &mut rng));

        // units[0] is the train part, units[1] ppo, units[2] eval.
        let units: Vec<HeldOutSet> = (0..3)
            .map(|i| HeldOutSet {
                add: add[i].clone(),
                sub: sub[i].clone(),
                compare: compare[i].clone(),
                characters: characters[i].clone(),
                objects: objects[i].clone(),
                words: words[i].clone(),
            })
            .collect();
        let [train, ppo, eval]: [HeldOutSet; 3] = units.try_into().expect("three parts");
        Split {
            train: questions(&train),
            ppo: questions(&ppo),
            eval: questions(&eval),
            held_out: HeldOut {
                policy: format!(
                    "{HELD_OUT_PERCENT}% of each kind's units (operand pairs, characters, \
                     objects, words) are held out for ppo and another {HELD_OUT_PERCENT}% for \
                     eval. SFT trains on the other units only; the reward model's rankings \
                     cover the SFT and ppo units (never the exact ppo prompts' answers by the \
                     policy); eval units are in no training file (rm_heldout.jsonl ranks \
                     answers about them, to measure the reward model, never to train it). The \
                     corpus states every fact, but its question/answer paragraphs use SFT \
                     questions only."
                ),
                ppo,
                eval,
            },
        }
    }
}

/// Shuffles `units` and splits them into [train, ppo, eval]: HELD_OUT_PERCENT of them (rounded
/// up) for eval, as many for ppo, the rest for training. Each part is sorted for a readable
/// manifest.
fn three_way<T: Ord>(mut units: Vec<T>, rng: &mut ChaCha8Rng) -> [Vec<T>; 3] {
    units.shuffle(rng);
    let held = (units.len() * HELD_OUT_PERCENT).div_ceil(100);
    let train = units.split_off(2 * held);
    let ppo = units.split_off(held);
    let mut parts = [train, ppo, units];
    for part in &mut parts {
        part.sort();
    }
    parts
}

/// The questions about `units`, one list per task kind in [`TaskKind::ALL`] order.
fn questions(units: &HeldOutSet) -> Vec<Vec<Question>> {
    // Commutative kinds hold out a pair with both of its orders.
    let both_orders = |pairs: &[[u64; 2]], make: fn(u64, u64) -> Question| {
        let mut out = Vec::new();
        for &[a, b] in pairs {
            out.push(make(a, b));
            if a != b {
                out.push(make(b, a));
            }
        }
        out
    };
    let pools = vec![
        both_orders(&units.add, |a, b| Question::Add { a, b }),
        units
            .sub
            .iter()
            .map(|&[a, b]| Question::Sub { a, b })
            .collect(),
        both_orders(&units.compare, |a, b| Question::Compare { a, b }),
        units
            .characters
            .iter()
            .map(|name| Question::Lives { name: name.clone() })
            .collect(),
        units
            .objects
            .iter()
            .map(|object| Question::Colour {
                object: object.clone(),
            })
            .collect(),
        units
            .words
            .iter()
            .map(|word| Question::Reverse { word: word.clone() })
            .collect(),
        units
            .words
            .iter()
            .map(|word| Question::Count { word: word.clone() })
            .collect(),
    ];
    debug_assert!(pools
        .iter()
        .zip(TaskKind::ALL)
        .all(|(pool, kind)| pool.iter().all(|q| q.kind() == kind)));
    pools
}

/// Pairs [a, b] with a < b (or a <= b when `with_equal`), both in 0..=max.
fn pairs(max: u64, with_equal: bool) -> Vec<[u64; 2]> {
    let mut out = Vec::new();
    for a in 0..=max {
        for b in a..=max {
            if with_equal || a != b {
                out.push([a, b]);
            }
        }
    }
    out
}

/// `n` questions, an equal share from each kind's pool (the first kinds get one more when `n`
/// does not divide evenly), in random order. Within a kind, every question of the pool is used
/// once before any is used again, so small pools repeat.
fn balanced(pools: &[Vec<Question>], n: usize, rng: &mut ChaCha8Rng) -> Vec<Question> {
    let k = pools.len();
    let quotas: Vec<usize> = (0..k).map(|i| n / k + usize::from(i < n % k)).collect();
    draw(pools, &quotas, rng)
}

/// Up to `n` distinct questions, spread as evenly over the kinds as their pool sizes allow
/// (a kind with a small pool gives all it has, the others share the rest), in random order.
fn distinct(pools: &[Vec<Question>], n: usize, rng: &mut ChaCha8Rng) -> Vec<Question> {
    let mut quotas = vec![0; pools.len()];
    let mut left = n.min(pools.iter().map(Vec::len).sum());
    while left > 0 {
        for (quota, pool) in quotas.iter_mut().zip(pools) {
            if left > 0 && *quota < pool.len() {
                *quota += 1;
                left -= 1;
            }
        }
    }
    draw(pools, &quotas, rng)
}

/// `quotas[i]` questions from `pools[i]`, each pool dealt like a shuffled deck that is
/// reshuffled when it runs out, all shuffled together.
fn draw(pools: &[Vec<Question>], quotas: &[usize], rng: &mut ChaCha8Rng) -> Vec<Question> {
    let mut out = Vec::with_capacity(quotas.iter().sum());
    for (pool, &quota) in pools.iter().zip(quotas) {
        let mut deck: Vec<Question> = Vec::new();
        for _ in 0..quota {
            if deck.is_empty() {
                deck = pool.clone();
                deck.shuffle(rng);
            }
            out.extend(deck.pop());
        }
    }
    out.shuffle(rng);
    out
}

fn sft_records(
    world: &World,
    pools: &[Vec<Question>],
    n: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<SftRecord> {
    balanced(pools, n, rng)
        .iter()
        .map(|q| {
            let mut task = q.task(world).expect("pool questions are demo tasks");
            // Demonstrations are imperfect, as real ones are: demonstrators hedge on questions
            // that look hard. SFT copies the habit; the rankings (which always put a hedge
            // last) are what teach the reward model, and through it PPO, to answer instead.
            let hedge = if q.looks_hard() {
                HEDGE_HARD
            } else {
                HEDGE_EASY
            };
            if rng.gen_bool(hedge) {
                task.output = HEDGE.to_string();
            }
            // Tasks without input get "input": "" or no input key at random.
            let input = if !task.input.is_empty() || rng.gen_bool(0.5) {
                Some(task.input)
            } else {
                None
            };
            SftRecord {
                instruction: task.instruction,
                input,
                output: task.output,
            }
        })
        .collect()
}

fn rank_records(
    world: &World,
    pools: &[Vec<Question>],
    n: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<RankRecord> {
    balanced(pools, n, rng)
        .iter()
        .map(|q| {
            let answers = q
                .ranked_answers(world, rng)
                .expect("pool questions are demo tasks");
            let mut choices: Vec<RankChoice> = answers
                .into_iter()
                .zip(1..)
                .map(|(text, rank)| RankChoice { text, rank })
                .collect();
            // Shuffled so that no reader can rely on position instead of rank.
            choices.shuffle(rng);
            RankRecord {
                input: q.prompt(),
                choices,
            }
        })
        .collect()
}

/// One scored record per ranked choice, scored by the judge.
fn scored_records(world: &World, records: &[RankRecord]) -> Vec<ScoredRecord> {
    records
        .iter()
        .flat_map(|r| {
            r.choices.iter().map(|c| ScoredRecord {
                input: r.input.clone(),
                output: c.text.clone(),
                score: world.judge(&r.input, &c.text).score,
            })
        })
        .collect()
}

fn prompt_records(questions: &[Question]) -> Vec<PromptRecord> {
    questions
        .iter()
        .map(|q| PromptRecord {
            prompt: q.prompt(),
            instruction: q.instruction(),
            input: q.input(),
        })
        .collect()
}

fn to_jsonl<T: Serialize>(records: &[T]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for record in records {
        serde_json::to_writer(&mut out, record)?;
        out.push(b'\n');
    }
    Ok(out)
}

fn to_pretty_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let mut out = serde_json::to_vec_pretty(value)?;
    out.push(b'\n');
    Ok(out)
}

/// Writes `bytes` to `dir/name` via a temporary file and a rename, so a reader never sees a
/// half-written file. Returns the number of bytes written.
fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<usize> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(bytes.len())
}
