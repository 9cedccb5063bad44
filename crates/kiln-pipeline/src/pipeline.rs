//! The whole pipeline: corpus → tokenizer → shards → pretraining → SFT → reward model, then every
//! post-training branch from the SFT model (PPO, DPO, GRPO, each with its own settings), then the
//! held-out evaluation of every model and the report. `kiln demo` runs it on self-generated data,
//! `kiln pipeline run` on a user's TOML file. The plan is checked whole before the first stage
//! (`check`); stages whose output is complete are reused; an interrupted stage resumes from its
//! last checkpoint.

use crate::evaluate::JudgeConfig;
use crate::heldout::{self, EvalPlan, ModelEval};
use crate::stages::{
    self, DpoConfig, GrpoStageConfig, ModelShape, PpoStageConfig, PretrainConfig, RmConfig,
    SftConfig, StageResult,
};
use anyhow::{bail, Context, Result};
use kiln_demo::Size;
use kiln_model::Family;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Settings of the tokenizer and shard stages.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorpusConfig {
    /// Corpus files or directories (.txt, .md, .jsonl).
    pub input: Vec<PathBuf>,
    pub field: String,
    pub vocab_size: usize,
    pub val_fraction: f64,
}

impl Default for CorpusConfig {
    fn default() -> Self {
        CorpusConfig {
            input: Vec::new(),
            field: "text".into(),
            vocab_size: 2048,
            val_fraction: 0.02,
        }
    }
}

/// The held-out evaluation of every model (TOML `[eval]`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Prompts every model answers. Default: the judge's prompts with a judge, otherwise
    /// `heldout_fraction` of `prompts`, held out of RL training.
    pub prompts: Option<PathBuf>,
    pub heldout_fraction: f64,
    /// At most this many held-out prompts (0: all).
    pub limit: usize,
    pub max_new_tokens: usize,
    /// Reward sources scoring the answers, as `kiln eval --reward`: `exact` (the answer equals the
    /// record's `answer` field), `cmd:PROGRAM`, `format`. Default: `exact` when the records carry
    /// an `answer`.
    pub rewards: Vec<String>,
    pub reward_weights: Vec<f32>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            prompts: None,
            heldout_fraction: 0.1,
            limit: 200,
            max_new_tokens: 64,
            rewards: Vec::new(),
            reward_weights: Vec::new(),
        }
    }
}

/// What a post-training branch runs.
#[derive(Clone, Debug)]
pub enum Method {
    /// RM + PPO: the pipeline's reward model is the reward and the critic's start.
    Ppo(PpoStageConfig),
    /// DPO (or IPO, hinge) on the reward model's preference data unless `data` names other files.
    Dpo(DpoConfig),
    /// GRPO/RLOO with verifiable rewards (`judge` with a judge; otherwise `rm`, the pipeline's
    /// reward model, unless `rewards` names others).
    Grpo(GrpoStageConfig),
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Ppo(_) => "ppo",
            Method::Dpo(_) => "dpo",
            Method::Grpo(_) => "grpo",
        }
    }

    /// Keys the pipeline derives (models and run folders between stages): never written by users.
    fn derived_keys(&self) -> &'static [&'static str] {
        match self {
            Method::Ppo(_) => &["actor", "reward_model", "out", "judge"],
            Method::Dpo(_) => &["init", "out", "judge"],
            Method::Grpo(_) => &["actor", "out", "judge"],
        }
    }
}

/// One post-training branch from the SFT model (TOML `[[branch]]`: `name`, `method`, then the
/// method's settings as `kiln ppo|dpo|grpo --config` takes them, less the paths the pipeline
/// derives).
#[derive(Clone, Debug)]
pub struct Branch {
    /// Its run folder under `out` and its label in the report (default: the method).
    pub name: String,
    pub method: Method,
}

impl Branch {
    pub fn new(method: Method) -> Branch {
        Branch {
            name: method.name().into(),
            method,
        }
    }
}

fn table_of<T: Serialize>(v: &T) -> Result<toml::Table, String> {
    match toml::Value::try_from(v).map_err(|e| e.to_string())? {
        toml::Value::Table(t) => Ok(t),
        _ => Err("expected a table".into()),
    }
}

impl Serialize for Branch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error;
        let mut t = toml::Table::new();
        t.insert("name".into(), self.name.clone().into());
        t.insert("method".into(), self.method.name().into());
        let body = match &self.method {
            Method::Ppo(c) => table_of(c),
            Method::Dpo(c) => table_of(c),
            Method::Grpo(c) => table_of(c),
        }
        .map_err(S::Error::custom)?;
        // The prompts a branch names itself; the placeholder default means the pipeline's.
        let default_prompts = match &self.method {
            Method::Ppo(_) => Some(PpoStageConfig::default().prompts),
            Method::Grpo(_) => Some(GrpoStageConfig::default().prompts),
            Method::Dpo(_) => None,
        };
        for (k, v) in body {
            let placeholder = k == "prompts"
                && default_prompts
                    .as_ref()
                    .is_some_and(|p| v.as_str() == Some(&p.display().to_string()));
            if !self.method.derived_keys().contains(&k.as_str()) && !placeholder {
                t.insert(k, v);
            }
        }
        t.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Branch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Branch, D::Error> {
        use serde::de::Error;
        let mut t = toml::Table::deserialize(d)?;
        let method = match t.remove("method") {
            Some(toml::Value::String(m)) => m,
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "branch method: expected a string, got {other}"
                )))
            }
            None => {
                return Err(D::Error::custom(
                    "a [[branch]] needs `method` (ppo, dpo or grpo)",
                ))
            }
        };
        let name = match t.remove("name") {
            Some(toml::Value::String(n)) => n,
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "branch name: expected a string, got {other}"
                )))
            }
            None => method.clone(),
        };
        let ctx =
            |e: toml::de::Error| D::Error::custom(format!("branch {name:?}: {}", e.message()));
        let body = toml::Value::Table(t.clone());
        let method = match method.as_str() {
            "ppo" => Method::Ppo(body.try_into().map_err(ctx)?),
            "dpo" => Method::Dpo(body.try_into().map_err(ctx)?),
            "grpo" => Method::Grpo(body.try_into().map_err(ctx)?),
            m => {
                return Err(D::Error::custom(format!(
                    "branch {name:?}: unknown method {m:?} (expected ppo, dpo or grpo)"
                )))
            }
        };
        if let Some(k) = method.derived_keys().iter().find(|k| t.contains_key(**k)) {
            return Err(D::Error::custom(format!(
                "branch {name:?}: `{k}` is derived by the pipeline (the SFT model, the reward model, out/{name}); remove it"
            )));
        }
        Ok(Branch { name, method })
    }
}

/// A whole pipeline. Paths between stages are derived from `out`; the user names the data.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    pub out: PathBuf,
    pub seed: u64,
    pub corpus: CorpusConfig,
    /// Prompts of the RL branches (PPO, GRPO) that name none: `{"prompt", ...}`, Alpaca or chat
    /// records.
    pub prompts: Option<PathBuf>,
    /// The demo world's judge (judged task accuracy during training and in the report).
    pub judge: Option<JudgeConfig>,
    pub eval: EvalConfig,
    pub pretrain: PretrainConfig,
    pub sft: SftConfig,
    /// The reward model (skipped when `rm.data` is empty; PPO needs it).
    pub rm: RmConfig,
    /// Post-training branches from the SFT model, run in order.
    pub branch: Vec<Branch>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            out: PathBuf::from("runs/pipeline"),
            seed: 1337,
            corpus: CorpusConfig::default(),
            prompts: None,
            judge: None,
            eval: EvalConfig::default(),
            pretrain: PretrainConfig::default(),
            sft: SftConfig::default(),
            rm: RmConfig::default(),
            branch: vec![
                Branch::new(Method::Ppo(PpoStageConfig::default())),
                Branch::new(Method::Dpo(DpoConfig::default())),
                Branch::new(Method::Grpo(GrpoStageConfig::default())),
            ],
        }
    }
}

/// Keys of the top-level stages the pipeline derives.
pub const DERIVED_KEYS: [(&str, &[&str]); 3] = [
    ("pretrain", &["data", "tokenizer", "out"]),
    ("sft", &["init", "out", "judge"]),
    ("rm", &["init", "out"]),
];

impl PipelineConfig {
    /// Reads a pipeline file (unknown keys and derived paths are errors naming them).
    pub fn load(path: &Path) -> Result<PipelineConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let t: toml::Table =
            toml::from_str(&text).with_context(|| format!("{}: invalid TOML", path.display()))?;
        Self::from_table(t, path)
    }

    /// The configuration a pipeline file's table describes (`path` names it in errors).
    pub fn from_table(t: toml::Table, path: &Path) -> Result<PipelineConfig> {
        for (table, keys) in DERIVED_KEYS {
            if let Some(toml::Value::Table(s)) = t.get(table) {
                if let Some(k) = keys.iter().find(|k| s.contains_key(**k)) {
                    bail!(
                        "{}: {table}.{k} is derived by the pipeline from `out`; remove it",
                        path.display()
                    );
                }
            }
        }
        crate::config::from_value(toml::Value::Table(t))
            .with_context(|| format!("{}: invalid pipeline configuration", path.display()))
    }

    /// The configuration as TOML, without the paths the pipeline derives.
    pub fn to_toml(&self) -> Result<String> {
        let mut v = toml::Value::try_from(self)?;
        if let toml::Value::Table(t) = &mut v {
            for (table, keys) in DERIVED_KEYS {
                if let Some(toml::Value::Table(s)) = t.get_mut(table) {
                    for k in keys {
                        s.remove(*k);
                    }
                }
            }
        }
        crate::config::to_toml(&v)
    }
}

/// The demo's settings per size, tuned for a 2-core CPU.
pub fn demo_config(data: &Path, out: &Path, size: Size, seed: u64, arch: Family) -> PipelineConfig {
    let mut c = PipelineConfig {
        out: out.to_path_buf(),
        seed,
        ..Default::default()
    };
    let d = |f: &str| data.join(f);
    c.corpus.input = vec![d("corpus.jsonl")];
    c.judge = Some(JudgeConfig {
        world: d("world.json"),
        prompts: d("eval_prompts.jsonl"),
        limit: 0,
        max_new_tokens: 24,
    });
    c.sft.data = vec![d("sft_train.jsonl")];
    c.sft.val_data = Some(d("sft_val.jsonl"));
    c.rm.data = vec![d("rm_train.jsonl")];
    c.rm.val_data = Some(d("rm_val.jsonl"));
    c.rm.test_data = Some(d("rm_heldout.jsonl"));
    c.prompts = Some(d("ppo_prompts.jsonl"));
    let (shape, vocab, pre_steps, sft_steps, rm_steps, ppo_iters, dpo_steps) = match size {
        Size::Tiny => (
            ModelShape {
                n_layer: 2,
                n_head: 2,
                n_embd: 64,
                n_ctx: 64,
                ..ModelShape::default()
            },
            512,
            60,
            40,
            30,
            4,
            20,
        ),
        Size::Small => (
            ModelShape {
                n_layer: 4,
                n_head: 4,
                n_embd: 128,
                n_ctx: 64,
                ..ModelShape::default()
            },
            1024,
            3000,
            800,
            8000,
            40,
            600,
        ),
        // Demo documents and answers are short: a 64-token context loses little and halves the cost.
        Size::Full => (
            ModelShape {
                n_layer: 6,
                n_head: 6,
                n_embd: 192,
                n_ctx: 64,
                ..ModelShape::default()
            },
            2048,
            3500,
            1500,
            8000,
            40,
            600,
        ),
    };
    c.corpus.vocab_size = vocab;
    c.pretrain.model = ModelShape {
        arch,
        n_kv_head: if arch == Family::Gpt2 {
            0
        } else {
            (shape.n_head / 2).max(1)
        },
        ..shape
    };
    c.pretrain.train.max_steps = pre_steps;
    c.pretrain.train.batch_size = 16;
    c.pretrain.train.eval_every = (pre_steps / 6).max(1);
    c.pretrain.train.ckpt_every = (pre_steps / 4).max(1);
    c.pretrain.train.warmup_steps = (pre_steps / 20).max(1);
    // Demo answers are short: packing several per row makes each step see more of them.
    c.sft.packing = true;
    c.sft.train.lr = 2e-3;
    c.sft.train.max_steps = sft_steps;
    c.sft.train.eval_every = (sft_steps / 2).max(1);
    c.sft.train.ckpt_every = (sft_steps / 2).max(1);
    c.sft.train.warmup_steps = (sft_steps / 10).max(1);
    c.rm.train.lr = 2e-3;
    c.rm.train.batch_size = 8;
    c.rm.train.max_steps = rm_steps;
    c.rm.train.eval_every = (rm_steps / 3).max(1);
    c.rm.train.ckpt_every = (rm_steps / 2).max(1);
    c.rm.train.warmup_steps = (rm_steps / 10).max(1);
    // A model this small moves little at the 1e-5 that suits large ones.
    let mut ppo = PpoStageConfig::default();
    ppo.ppo.actor_lr = 5e-5;
    ppo.ppo.kl_coef = 0.1;
    ppo.ppo.critic_lr = 1e-4;
    ppo.ppo.iterations = ppo_iters;
    ppo.ppo.eval_every = (ppo_iters / 3).max(1);
    ppo.ppo.ckpt_every = (ppo_iters / 3).max(1);
    // DPO from the same SFT model on the same rankings (every ordered pair of each prompt's four
    // answers), against the SFT model as its reference.
    let mut dpo = DpoConfig::default();
    dpo.train.lr = 1e-4;
    dpo.train.min_lr = 1e-5;
    dpo.train.batch_size = 8;
    dpo.train.max_steps = dpo_steps;
    dpo.train.eval_every = (dpo_steps / 3).max(1);
    dpo.train.ckpt_every = (dpo_steps / 3).max(1);
    dpo.train.warmup_steps = (dpo_steps / 10).max(1);
    if size == Size::Tiny {
        dpo.train.batch_size = 2;
    }

    // GRPO from the same SFT model on PPO's prompts, rewarded by the judge (1 for a right answer):
    // as many iterations as PPO, 8 prompts × 16 answers each. The SFT policy answers these short
    // questions almost deterministically, so most groups of 8 are all right or all wrong and teach
    // nothing; groups of 16 (the same 128 samples) found more mixed ones: 53.0 → 58.5 % held out.
    let mut grpo = GrpoStageConfig::default();
    grpo.grpo.iterations = ppo_iters;
    grpo.grpo.group_size = 16;
    grpo.grpo.prompts_per_iter = 8;
    grpo.grpo.eval_every = (ppo_iters / 3).max(1);
    grpo.grpo.ckpt_every = (ppo_iters / 3).max(1);
    if size == Size::Tiny {
        grpo.grpo.prompts_per_iter = 4;
        grpo.grpo.group_size = 4;
        grpo.grpo.minibatch = 8;
    }
    if size == Size::Tiny {
        ppo.ppo.rollout_batch = 16;
        ppo.ppo.minibatch = 8;
        c.pretrain.train.batch_size = 8;
        c.sft.train.batch_size = 8;
        c.rm.train.batch_size = 2;
        if let Some(j) = c.judge.as_mut() {
            j.limit = 24;
        }
    }
    c.branch = vec![
        Branch::new(Method::Ppo(ppo)),
        Branch::new(Method::Dpo(dpo)),
        Branch::new(Method::Grpo(grpo)),
    ];
    c
}

/// A configuration to start one's own from: the demo's settings for `size`, with the user's data
/// to name (placeholder paths) and no judge (that is the demo world's).
pub fn example_config(size: Size, arch: Family) -> PipelineConfig {
    let mut c = demo_config(Path::new("data"), Path::new("runs/mine"), size, 1337, arch);
    c.judge = None;
    c.corpus.input = vec![PathBuf::from("my_corpus.txt")];
    c.sft.data = vec![PathBuf::from("my_instructions.jsonl")];
    c.sft.val_data = None;
    c.rm.data = vec![PathBuf::from("my_preferences.jsonl")];
    c.rm.val_data = None;
    c.rm.test_data = None;
    c.prompts = Some(PathBuf::from("my_prompts.jsonl"));
    c
}

/// The demo's data in `out/data`: reused when it was generated with the same seed, size and
/// format, generated otherwise. Returns the data folder.
pub fn demo_data(out: &Path, seed: u64, size: Size) -> Result<PathBuf> {
    let data = out.join("data");
    if kiln_demo::DemoManifest::load(&data)
        .map(|m| m.seed == seed && m.size == size && m.format_version == kiln_demo::FORMAT_VERSION)
        .unwrap_or(false)
    {
        eprintln!("[data] reusing the demo data in {}", data.display());
    } else {
        let t0 = Instant::now();
        let m = kiln_demo::generate(&data, seed, size)?;
        eprintln!(
            "[data] demo world ({}) generated in {:.1}s: corpus {:.2} MB, {} SFT, {} rankings, {} PPO prompts, {} eval prompts",
            size.name(),
            t0.elapsed().as_secs_f64(),
            m.counts.corpus_bytes as f64 / 1e6,
            m.counts.sft_train,
            m.counts.rm_train,
            m.counts.ppo_prompts,
            m.counts.eval_prompts
        );
    }
    Ok(data)
}

/// Runs `f` unless the stage's `done.json` says it finished; records its time.
fn stage<F: FnOnce() -> Result<StageResult>>(
    name: &str,
    dir: &Path,
    results: &mut BTreeMap<String, StageResult>,
    f: F,
) -> Result<()> {
    if let Some(r) = StageResult::load(dir) {
        eprintln!(
            "[{name}] finished earlier ({:.0}s); reusing {}",
            r.seconds,
            dir.display()
        );
        results.insert(name.into(), r);
        return Ok(());
    }
    let t0 = Instant::now();
    let mut r = f()?;
    r.stage = name.into();
    r.seconds = t0.elapsed().as_secs_f64();
    if kiln_train::trainer::STOP.load(std::sync::atomic::Ordering::SeqCst) {
        bail!("interrupted during {name}; run the same command again to resume");
    }
    r.save(dir)?;
    eprintln!("[{name}] done in {:.1}s", r.seconds);
    results.insert(name.into(), r);
    Ok(())
}

fn summary_result(s: &kiln_train::TrainSummary) -> StageResult {
    StageResult {
        metrics_start: s.eval_start.clone(),
        metrics_end: s.eval.clone(),
        extra: serde_json::json!({"steps": s.steps, "tokens_per_sec": s.tokens_per_sec, "final_loss": s.final_loss}),
        ..Default::default()
    }
}

fn rl_result(
    eval_start: &kiln_train::Metrics,
    eval_end: &kiln_train::Metrics,
    history: &[kiln_train::Metrics],
    iterations: u64,
) -> StageResult {
    StageResult {
        metrics_start: eval_start.clone(),
        metrics_end: eval_end.clone(),
        extra: serde_json::json!({"history": history, "iterations": iterations}),
        ..Default::default()
    }
}

/// Where a finished pipeline's pieces are: what the report reads.
pub struct PipelineRun {
    pub cfg: PipelineConfig,
    pub results: BTreeMap<String, StageResult>,
    /// (name, run folder) of every model, in the report's order: pretrained, SFT, the branches.
    pub models: Vec<(String, PathBuf)>,
    /// The branches that ran: (name, method, run folder).
    pub branches: Vec<(String, &'static str, PathBuf)>,
    pub rm: Option<PathBuf>,
    pub evals: Vec<ModelEval>,
    /// Where the held-out prompts came from, for the report.
    pub eval_source: String,
}

/// The stage configs of a pipeline with every derived path filled in: what will run.
pub struct Plan {
    pub pretrain: PretrainConfig,
    pub sft: SftConfig,
    pub rm: Option<RmConfig>,
    pub branches: Vec<Branch>,
    /// The RL branches' prompt file (the training split when prompts are held out).
    pub rl_prompts: Option<PathBuf>,
    /// Held-out prompts to split off `prompts` before any RL branch trains: (source, fraction).
    pub heldout_split: Option<(PathBuf, f64)>,
}

impl PipelineConfig {
    pub fn plan(&self) -> Result<Plan> {
        let out = &self.out;
        let mut pre = self.pretrain.clone();
        pre.data = out.join("shards");
        pre.tokenizer = out.join("tokenizer").join("tokenizer.json");
        pre.out = out.join("pretrain");
        pre.train.seed = self.seed;
        let mut sft = self.sft.clone();
        sft.init = pre.out.clone();
        sft.out = out.join("sft");
        sft.judge = self.judge.clone();
        sft.train.seed = self.seed;
        let rm = (!self.rm.data.is_empty()).then(|| {
            let mut rm = self.rm.clone();
            rm.init = sft.out.clone();
            rm.out = out.join("rm");
            rm.train.seed = self.seed;
            rm
        });
        // Without a judge and without eval.prompts, part of the RL prompts is held out.
        let heldout_split = match (&self.judge, &self.eval.prompts, &self.prompts) {
            (None, None, Some(p)) if self.eval.heldout_fraction > 0.0 => {
                Some((p.clone(), self.eval.heldout_fraction))
            }
            _ => None,
        };
        let rl_prompts = match &heldout_split {
            Some(_) => Some(out.join("eval").join("prompts_train.jsonl")),
            None => self.prompts.clone(),
        };
        let mut names = std::collections::BTreeSet::new();
        let mut branches = Vec::new();
        for b in &self.branch {
            let name = &b.name;
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                || [
                    "data",
                    "tokenizer",
                    "shards",
                    "pretrain",
                    "sft",
                    "rm",
                    "eval",
                ]
                .contains(&name.as_str())
            {
                bail!("branch name {name:?}: use letters, digits, '-', '_' or '.', and not a stage's name");
            }
            if !names.insert(name.clone()) {
                bail!("two branches are named {name:?}; give each its own `name`");
            }
            let dir = out.join(name);
            let method = match &b.method {
                Method::Ppo(c) => {
                    let mut c = c.clone();
                    c.actor = sft.out.clone();
                    c.reward_model = rm.as_ref().map(|r| r.out.clone()).with_context(|| {
                        format!("branch {name:?} (ppo) needs a reward model: name preference data in rm.data")
                    })?;
                    c.out = dir;
                    c.judge = self.judge.clone();
                    c.ppo.seed = self.seed;
                    if c.prompts == PpoStageConfig::default().prompts {
                        c.prompts = rl_prompts.clone().with_context(|| {
                            format!("branch {name:?} (ppo) has no prompts: set `prompts` (top level) or the branch's `prompts`")
                        })?;
                    }
                    if c.ppo.ptx_coef > 0.0 && c.ptx_data.is_none() {
                        c.ptx_data = Some(pre.data.clone());
                    }
                    Method::Ppo(c)
                }
                Method::Dpo(d) => {
                    let mut d = d.clone();
                    d.init = sft.out.clone();
                    if d.data.is_empty() {
                        let r = rm.as_ref().with_context(|| {
                            format!("branch {name:?} (dpo) has no preference data: set its `data` or rm.data")
                        })?;
                        d.data = r.data.clone();
                        if d.val_data.is_none() {
                            d.val_data = r.val_data.clone();
                        }
                    }
                    d.out = dir;
                    d.judge = self.judge.clone();
                    d.train.seed = self.seed;
                    Method::Dpo(d)
                }
                Method::Grpo(g) => {
                    let mut g = g.clone();
                    g.actor = sft.out.clone();
                    if g.prompts == GrpoStageConfig::default().prompts {
                        g.prompts = rl_prompts.clone().with_context(|| {
                            format!("branch {name:?} (grpo) has no prompts: set `prompts` (top level) or the branch's `prompts`")
                        })?;
                    }
                    g.out = dir;
                    g.judge = self.judge.clone();
                    // The default reward is the judge; without one, the pipeline's reward model.
                    let default_rewards = g.rewards == GrpoStageConfig::default().rewards;
                    if self.judge.is_none() && default_rewards {
                        g.rewards = vec!["rm".into()];
                    }
                    for r in g.rewards.iter_mut() {
                        if r == "rm" {
                            let dir = rm.as_ref().map(|r| r.out.clone()).with_context(|| {
                                format!("branch {name:?} (grpo): reward `rm` needs a reward model (rm.data)")
                            })?;
                            *r = format!("rm:{}", dir.display());
                        }
                    }
                    g.grpo.seed = self.seed;
                    Method::Grpo(g)
                }
            };
            branches.push(Branch {
                name: name.clone(),
                method,
            });
        }
        Ok(Plan {
            pretrain: pre,
            sft,
            rm,
            branches,
            rl_prompts,
            heldout_split,
        })
    }
}

/// Splits `src` into a training and a held-out prompt file in `dir` (deterministic for a seed),
/// unless both exist already.
fn split_prompts(src: &Path, fraction: f64, seed: u64, dir: &Path) -> Result<()> {
    let (train, held) = (
        dir.join("prompts_train.jsonl"),
        dir.join("prompts_heldout.jsonl"),
    );
    if train.exists() && held.exists() {
        return Ok(());
    }
    let loaded = kiln_data::datasets::load_prompts_with_fields(src, &Default::default())?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for (i, (r, o)) in loaded.records.into_iter().enumerate() {
        let mut o = o;
        o.entry("prompt").or_insert_with(|| r.raw.clone().into());
        let line = serde_json::to_string(&o)?;
        if kiln_data::prepare::split_hash(seed ^ 0x5eed, i as u64) < fraction {
            b.push(line);
        } else {
            a.push(line);
        }
    }
    if a.is_empty() || b.is_empty() {
        bail!(
            "{}: {} prompts are too few to hold out {:.0} % (set eval.prompts, or eval.heldout_fraction = 0)",
            src.display(),
            a.len() + b.len(),
            fraction * 100.0
        );
    }
    for (path, lines) in [(&train, &a), (&held, &b)] {
        kiln_data::atomic_write(path, |w| {
            for l in lines.iter() {
                writeln!(w, "{l}")?;
            }
            Ok(())
        })?;
    }
    eprintln!(
        "[eval] {}: {} prompts for RL training, {} held out for evaluation",
        src.display(),
        a.len(),
        b.len()
    );
    Ok(())
}

pub fn run_pipeline_config(cfg: &PipelineConfig, progress: bool) -> Result<PipelineRun> {
    kiln_train::install_ctrlc();
    let total = Instant::now();
    let out = &cfg.out;
    let report = crate::check::check(cfg)?;
    report.print();
    report.into_result()?;
    let plan = cfg.plan()?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let text = cfg.to_toml()?;
    // Finished stages are reused only for the configuration that made them.
    if let Ok(old) = std::fs::read_to_string(out.join("pipeline.toml")) {
        let old = crate::config::normalize_toml(&old).unwrap_or(old);
        if old != text {
            let line = old
                .lines()
                .zip(text.lines())
                .find(|(a, b)| a != b)
                .map(|(a, b)| format!(" (first difference: {a:?} then, {b:?} now)"))
                .unwrap_or_default();
            bail!(
                "{} holds a run of another configuration{line}: add --fresh to start over, or choose another --out",
                out.display()
            );
        }
    }
    kiln_data::atomic_write(&out.join("pipeline.toml"), |w| w.write_all(text.as_bytes()))?;
    let mut results = BTreeMap::new();
    // Tokenizer.
    let tok_dir = out.join("tokenizer");
    let tok_path = plan.pretrain.tokenizer.clone();
    stage("tokenizer", &tok_dir, &mut results, || {
        let t0 = Instant::now();
        let (tok, _stats) = kiln_data::Tokenizer::train_with_stats(
            &cfg.corpus.input,
            &cfg.corpus.field,
            cfg.corpus.vocab_size,
        )?;
        tok.save(&tok_path)?;
        eprintln!(
            "[tokenizer] vocabulary of {} trained in {:.1}s",
            tok.vocab_size(),
            t0.elapsed().as_secs_f64()
        );
        Ok(StageResult {
            extra: serde_json::json!({"vocab_size": tok.vocab_size()}),
            ..Default::default()
        })
    })?;
    // Shards.
    let shards = plan.pretrain.data.clone();
    stage("prepare", &shards, &mut results, || {
        let tok = kiln_data::Tokenizer::load(&tok_path)?;
        let s = kiln_data::prepare(
            &tok,
            &cfg.corpus.input,
            &cfg.corpus.field,
            &shards,
            cfg.corpus.val_fraction,
            cfg.seed,
            kiln_data::prepare::DEFAULT_SHARD_TOKENS,
            progress,
        )?;
        Ok(StageResult {
            extra: serde_json::json!({"train_tokens": s.train_tokens, "val_tokens": s.val_tokens, "documents": s.documents}),
            ..Default::default()
        })
    })?;
    let pre = &plan.pretrain;
    stage("pretrain", &pre.out, &mut results, || {
        Ok(summary_result(&stages::pretrain(pre, true, progress)?))
    })?;
    let sft = &plan.sft;
    stage("sft", &sft.out, &mut results, || {
        Ok(summary_result(&stages::sft(sft, true, progress)?))
    })?;
    if let Some(rm) = &plan.rm {
        stage("rm", &rm.out, &mut results, || {
            Ok(summary_result(&stages::reward_model(rm, true, progress)?))
        })?;
    }
    if let Some((src, fraction)) = &plan.heldout_split {
        split_prompts(src, *fraction, cfg.seed, &out.join("eval"))?;
    }
    let mut branches = Vec::new();
    for b in &plan.branches {
        let name = b.name.as_str();
        let (dir, method) = match &b.method {
            Method::Ppo(c) => (c.out.clone(), "ppo"),
            Method::Dpo(c) => (c.out.clone(), "dpo"),
            Method::Grpo(c) => (c.out.clone(), "grpo"),
        };
        stage(name, &dir, &mut results, || match &b.method {
            Method::Ppo(c) => {
                let s = stages::ppo(c, true, progress)?;
                Ok(rl_result(
                    &s.eval_start,
                    &s.eval_end,
                    &s.history,
                    s.iterations,
                ))
            }
            Method::Dpo(c) => {
                let r = stages::dpo(c, true, progress)?;
                let mut res = summary_result(&r.summary);
                res.extra["skipped_records"] = serde_json::json!(r.skipped);
                Ok(res)
            }
            Method::Grpo(c) => {
                let s = stages::grpo(c, true, progress)?;
                Ok(rl_result(
                    &s.eval_start,
                    &s.eval_end,
                    &s.history,
                    s.iterations,
                ))
            }
        })?;
        results.get_mut(name).expect("just run").extra["method"] = method.into();
        branches.push((name.to_string(), method, dir));
    }
    // Held-out evaluation of every model.
    let t0 = Instant::now();
    let mut models = vec![
        ("pretrained".to_string(), pre.out.clone()),
        ("SFT".to_string(), sft.out.clone()),
    ];
    models.extend(branches.iter().map(|(n, _, d)| (n.clone(), d.clone())));
    let (prompts, eval_source) = eval_prompts(cfg, &plan)?;
    let mut evals = Vec::new();
    if prompts.is_empty() {
        eprintln!(
            "[eval] no held-out prompts (set `prompts` or eval.prompts): models not evaluated"
        );
    } else {
        let has_answers = prompts.iter().all(|(_, o)| o.contains_key("answer"));
        let rewards = if cfg.eval.rewards.is_empty() && has_answers && cfg.judge.is_none() {
            vec!["exact".to_string()]
        } else {
            cfg.eval.rewards.clone()
        };
        let eval_plan = EvalPlan {
            prompts,
            judge: cfg.judge.clone(),
            reward_model: plan.rm.as_ref().map(|r| r.out.clone()),
            rewards,
            reward_weights: cfg.eval.reward_weights.clone(),
            max_new_tokens: cfg
                .judge
                .as_ref()
                .map_or(cfg.eval.max_new_tokens, |j| j.max_new_tokens),
        };
        for (i, (name, dir)) in models.iter().enumerate() {
            // The drift from SFT, for the post-training branches.
            let kl_ref = (i >= 2).then_some(sft.out.as_path());
            let cache = out.join("eval").join(format!("{name}.json"));
            let e = heldout::evaluate_model(name, dir, &eval_plan, kl_ref, &cache)
                .with_context(|| format!("evaluating {name} ({})", dir.display()))?;
            eprintln!(
                "[eval] {name}: {}",
                kiln_train::trainer::fmt_metrics(&e.metrics)
            );
            evals.push(e);
        }
        eprintln!(
            "[eval] {} models × {} held-out prompts in {:.1}s",
            evals.len(),
            evals[0].answers.len(),
            t0.elapsed().as_secs_f64()
        );
    }
    let run = PipelineRun {
        cfg: cfg.clone(),
        results,
        models,
        branches,
        rm: plan.rm.as_ref().map(|r| r.out.clone()),
        evals,
        eval_source,
    };
    let t0 = Instant::now();
    crate::report::write_report(&run)?;
    eprintln!(
        "[report] written in {:.1}s: {}",
        t0.elapsed().as_secs_f64(),
        out.join("report.md").display()
    );
    eprintln!("pipeline finished in {:.1}s", total.elapsed().as_secs_f64());
    Ok(run)
}

/// The held-out prompts every model answers, and where they came from.
fn eval_prompts(
    cfg: &PipelineConfig,
    plan: &Plan,
) -> Result<(
    Vec<(kiln_data::datasets::PromptRecord, kiln_data::datasets::Obj)>,
    String,
)> {
    let (mut prompts, source) = if let Some(j) = &cfg.judge {
        (
            heldout::judge_prompts(j)?,
            format!("the judge's prompts ({})", j.prompts.display()),
        )
    } else if let Some(p) = &cfg.eval.prompts {
        (
            kiln_data::datasets::load_prompts_with_fields(p, &Default::default())?.records,
            format!("eval.prompts ({})", p.display()),
        )
    } else if let Some((src, f)) = &plan.heldout_split {
        let held = cfg.out.join("eval").join("prompts_heldout.jsonl");
        (
            kiln_data::datasets::load_prompts_with_fields(&held, &Default::default())?.records,
            format!(
                "{:.0} % of {} held out of RL training",
                f * 100.0,
                src.display()
            ),
        )
    } else {
        (Vec::new(), String::new())
    };
    let limit = if cfg.judge.is_some() {
        0
    } else {
        cfg.eval.limit
    };
    if limit > 0 {
        prompts.truncate(limit);
    }
    Ok((prompts, source))
}
