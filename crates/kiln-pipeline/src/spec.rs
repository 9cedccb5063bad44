//! What a pipeline is: its configuration (`PipelineConfig`: the corpus, the stages, the
//! post-training branches, the evaluation), as users write it in TOML, and the plan it resolves to
//! (every stage's config with the paths between stages filled in). The demo's and the example's
//! configurations are built here too.

use crate::evaluate::JudgeConfig;
use crate::stages::{
    DpoConfig, GrpoStageConfig, ModelShape, PpoStageConfig, PretrainConfig, RmConfig, SftConfig,
};
use anyhow::{bail, Context, Result};
use kiln_demo::Size;
use kiln_model::Family;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::path::{Path, PathBuf};

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

/// Whether the pipeline's own `prompts` are read skipping bad records: when any RL branch that
/// reads them says so.
pub fn rl_skip_bad_records(cfg: &PipelineConfig) -> bool {
    cfg.branch.iter().any(|b| match &b.method {
        Method::Ppo(c) => c.skip_bad_records,
        Method::Grpo(g) => g.skip_bad_records,
        Method::Dpo(_) => false,
    })
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
