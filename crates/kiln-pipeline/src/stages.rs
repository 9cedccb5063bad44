//! The pipeline's stages as functions of a config (TOML-loadable, flag-overridable): each reads its
//! inputs, trains, and leaves a run directory whose latest checkpoint is the next stage's input.

use crate::bundle::{load_bundle, KilnMeta, META_FILE};
use crate::evaluate::{Judge, JudgeConfig};
use anyhow::{bail, Context, Result};
use kiln_data::datasets::{load_preferences, load_sft, FieldMap, LoadOptions, PrefRecord, Role};
use kiln_data::template::ChatTemplate;
use kiln_data::Tokenizer;
use kiln_model::lora::LoraConfig;
use kiln_model::memory::{activation_bytes, check_memory, training_bytes, training_bytes_with};
use kiln_model::{Arch, Family, Model, ModelConfig};
use kiln_train::dpo::{
    load_or_compute_reference, model_fingerprint, render_dpo_groups, DpoLoss, DpoObjective,
    DpoOptions, DpoSettings, Origin, RefSource, KEY_FILE, REFERENCE_FILE,
};
use kiln_train::grpo::{Grpo, GrpoConfig, GrpoSummary};
use kiln_train::ppo::{Ppo, PpoConfig, PpoSummary, RewardModel};
use kiln_train::pretrain::{LmObjective, PretrainKind};
use kiln_train::reward::{
    CommandReward, FnReward, FormatReward, ModelReward, RewardSource, Weighted,
};
use kiln_train::rm::{render_groups_with, RmLoss, RmObjective};
use kiln_train::sft::{render_examples_with, ExtraEval, SftObjective};
use kiln_train::{RunDir, TrainConfig, TrainSummary, Trainer};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The shape of a new model (its vocabulary comes from the tokenizer).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelShape {
    /// The model family: "gpt2", or "llama" (RMSNorm, rotary positions, SwiGLU, grouped-query
    /// attention; "mistral" and "qwen2" are the same block under those names).
    pub arch: Family,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub n_ctx: usize,
    /// Llama family: key/value heads (0: as many as n_head).
    pub n_kv_head: usize,
    /// Llama family: SwiGLU hidden size (0: 8/3 of n_embd rounded up to 64).
    pub ffn_hidden: usize,
    /// Llama family: RoPE base frequency.
    pub rope_theta: f64,
    /// The LM head shares the token embedding (GPT-2 always does).
    pub tie_embeddings: bool,
}

impl Default for ModelShape {
    fn default() -> Self {
        ModelShape {
            arch: Family::Gpt2,
            n_layer: 4,
            n_head: 4,
            n_embd: 128,
            n_ctx: 128,
            n_kv_head: 0,
            ffn_hidden: 0,
            rope_theta: 10_000.0,
            tie_embeddings: true,
        }
    }
}

impl ModelShape {
    /// The model spec of a new model of this shape.
    pub fn config(&self, vocab_size: usize, arch: Arch) -> Result<ModelConfig> {
        let cfg = ModelConfig {
            vocab_size,
            n_ctx: self.n_ctx,
            n_layer: self.n_layer,
            n_head: self.n_head,
            n_embd: self.n_embd,
            arch,
            score_head: false,
            family: self.arch,
            n_kv_head: self.n_kv_head,
            ffn_hidden: self.ffn_hidden,
            rope_theta: self.rope_theta as f32,
            tie_embeddings: self.tie_embeddings,
            ..ModelConfig::default()
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Opens a stage's run directory. Without `resume`, a directory that already holds checkpoints is
/// refused (a fresh run would mix with them, and a later --resume would pick them up).
fn open_run(out: &Path, resume: bool) -> Result<RunDir> {
    let run = RunDir::create(out)?;
    if !resume && !run.checkpoints()?.is_empty() {
        bail!(
            "{} already holds checkpoints of an earlier run: add --resume to continue it, or choose another --out",
            out.display()
        );
    }
    if !resume && run.writes() {
        // Metrics of an earlier run that never reached a checkpoint.
        let _ = std::fs::remove_file(out.join("metrics.jsonl"));
    }
    Ok(run)
}

fn write_run_config<T: Serialize>(out: &Path, cfg: &T) -> Result<()> {
    if !kiln_train::dist::is_root() {
        return Ok(());
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let text = crate::config::to_toml(cfg)?;
    Ok(kiln_data::atomic_write(
        &out.join("run_config.toml"),
        |w| w.write_all(text.as_bytes()),
    )?)
}

/// A stage's run folder, opened the one way every stage opens it: the memory estimate checked
/// against the machine, the folder locked (and refused when it holds another run's checkpoints,
/// unless resuming), the stage's configuration recorded beside its checkpoints.
pub struct StageRun {
    pub run: RunDir,
    label: &'static str,
    resume: bool,
    progress: bool,
}

impl StageRun {
    pub fn open<C: Serialize>(
        label: &'static str,
        out: &Path,
        cfg: &C,
        memory_bytes: usize,
        resume: bool,
        progress: bool,
    ) -> Result<StageRun> {
        check_memory(memory_bytes, label)?;
        let run = open_run(out, resume)?;
        write_run_config(out, cfg)?;
        Ok(StageRun {
            run,
            label,
            resume,
            progress,
        })
    }

    /// Trains `model` on a supervised objective in this folder (the shared training loop:
    /// progress, metrics, checkpoints, exact resume, Ctrl-C, the non-finite guard).
    pub fn train(
        &self,
        train: &TrainConfig,
        model: &mut Model,
        obj: &mut dyn kiln_train::Objective,
        extra_files: Vec<(String, Vec<u8>)>,
        final_files: Option<kiln_train::trainer::FinalFiles<'_>>,
    ) -> Result<TrainSummary> {
        let mut train = train.clone();
        let (precision, why) = train.precision.for_this_cpu();
        if let Some(why) = why {
            eprintln!("[{}] {why}", self.label);
        }
        train.precision = precision;
        Trainer {
            cfg: train,
            run: &self.run,
            extra_files,
            progress: self.progress,
            label: self.label.into(),
            final_files,
        }
        .train(model, obj, self.resume)
    }
}

// ---------------------------------------------------------------------------------------------
// Pretraining

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
    /// Shards from `kiln data prepare`.
    pub data: PathBuf,
    pub tokenizer: PathBuf,
    pub out: PathBuf,
    pub objective: PretrainKind,
    pub model: ModelShape,
    /// Tokens per training row (default: the model's context).
    pub seq_len: usize,
    /// Validation batches per evaluation.
    pub eval_batches: usize,
    pub train: TrainConfig,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            data: PathBuf::from("data"),
            tokenizer: PathBuf::from("tokenizer.json"),
            out: PathBuf::from("runs/pretrain"),
            objective: PretrainKind::Causal,
            model: ModelShape::default(),
            seq_len: 0,
            eval_batches: 8,
            train: TrainConfig {
                lr: 3e-3,
                min_lr: 3e-4,
                warmup_steps: 50,
                max_steps: 1000,
                batch_size: 16,
                ..TrainConfig::default()
            },
        }
    }
}

pub fn pretrain(cfg: &PretrainConfig, resume: bool, progress: bool) -> Result<TrainSummary> {
    let tok = Tokenizer::load(&cfg.tokenizer)?;
    let mcfg = cfg.model.config(
        tok.vocab_size(),
        match cfg.objective {
            PretrainKind::Causal => Arch::Decoder,
            PretrainKind::Mlm => Arch::Encoder,
        },
    )?;
    let seq_len = if cfg.seq_len == 0 {
        cfg.model.n_ctx
    } else {
        cfg.seq_len
    };
    let memory = training_bytes(
        &mcfg,
        cfg.train.batch_size,
        seq_len,
        true,
        cfg.train.precision,
    );
    check_memory(memory, "pretraining")?;
    let mut model = Model::new(mcfg, cfg.train.seed);
    let mut obj = LmObjective::new(
        cfg.objective,
        &cfg.data,
        &model,
        cfg.train.batch_size,
        seq_len,
        cfg.eval_batches,
        cfg.train.seed,
        Some(tok.clone()),
    )?;
    let run = StageRun::open("pretrain", &cfg.out, cfg, memory, resume, progress)?;
    let meta = KilnMeta::new("pretrain", ChatTemplate::default(), &tok, cfg.train.seed);
    eprintln!(
        "[pretrain] {:?} model: {} ({:.2}M parameters)",
        cfg.objective,
        model.cfg.describe(),
        model.params.len() as f64 / 1e6
    );
    run.train(
        &cfg.train,
        &mut model,
        &mut obj,
        meta.files(&cfg.tokenizer)?,
        None,
    )
}

// ---------------------------------------------------------------------------------------------
// Supervised fine-tuning

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    /// The pretrained model (a checkpoint or run directory).
    pub init: PathBuf,
    /// Alpaca, chat or ShareGPT files (JSON array or JSONL).
    pub data: Vec<PathBuf>,
    /// Held-out data; without it `val_fraction` of `data` is held out.
    pub val_data: Option<PathBuf>,
    pub val_fraction: f64,
    pub out: PathBuf,
    /// Tokens per row (default: the model's context).
    pub seq_len: usize,
    /// A chat template: Kiln's JSON, or a Hugging Face Jinja file (`.jinja`). Default: the model's.
    pub template: Option<PathBuf>,
    pub skip_bad_records: bool,
    /// The dataset's column names for Kiln's fields (`--field output=answer`: TOML
    /// `fields = { output = "answer" }`), for JSON, JSONL and Parquet files alike.
    #[serde(skip_serializing_if = "FieldMap::is_empty")]
    pub fields: FieldMap,
    /// Pack several short examples into each row (attention never crosses examples).
    pub packing: bool,
    /// Task accuracy by the demo judge during evaluation.
    pub judge: Option<JudgeConfig>,
    /// Special-token roles of a Hugging Face tokenizer, by token string, overriding its files
    /// (carried on into the checkpoints' tokenizer_config.json / generation_config.json).
    pub bos_token: Option<String>,
    /// One end-of-sequence token or several (`["<|end_of_text|>", "<|eot_id|>"]`, as Llama 3).
    #[serde(
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub eos_token: Vec<String>,
    pub pad_token: Option<String>,
    pub end_of_turn_token: Option<String>,
    pub train: TrainConfig,
    /// LoRA: train adapters on a frozen base (`[lora]`; `--lora-rank` ...) instead of every weight.
    pub lora: Option<LoraConfig>,
    /// Continue training this PEFT adapter directory (on `init`'s model).
    pub adapter: Option<PathBuf>,
}

/// A string or a list of strings.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// The roles a stage's flags give a Hugging Face tokenizer (`--eos-token` ...).
fn token_roles(
    bos: &Option<String>,
    eos: &[String],
    pad: &Option<String>,
    end_of_turn: &Option<String>,
) -> kiln_data::SpecialOverrides {
    kiln_data::SpecialOverrides {
        bos: bos.clone(),
        eos: eos.to_vec(),
        pad: pad.clone(),
        end_of_turn: end_of_turn.clone(),
    }
}

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig {
            lora: None,
            adapter: None,
            init: PathBuf::from("runs/pretrain"),
            data: Vec::new(),
            val_data: None,
            val_fraction: 0.05,
            out: PathBuf::from("runs/sft"),
            seq_len: 0,
            template: None,
            skip_bad_records: false,
            fields: FieldMap::NONE,
            packing: false,
            judge: None,
            bos_token: None,
            eos_token: Vec::new(),
            pad_token: None,
            end_of_turn_token: None,
            train: TrainConfig {
                lr: 1e-3,
                min_lr: 1e-4,
                warmup_steps: 20,
                max_steps: 300,
                batch_size: 16,
                eval_every: 100,
                weight_decay: 0.0,
                ..TrainConfig::default()
            },
        }
    }
}

fn report_skipped<T>(stage: &str, path: &Path, l: kiln_data::datasets::Loaded<T>) -> Vec<T> {
    if l.skipped > 0 {
        eprintln!(
            "[{stage}] {}: skipped {} bad records (first: {})",
            path.display(),
            l.skipped,
            l.first_error.unwrap_or_default()
        );
    }
    l.records
}

/// Splits records into (train, val) deterministically by index.
fn split_val<T: Clone>(records: Vec<T>, fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    if fraction <= 0.0 || records.len() < 2 {
        return (records, Vec::new());
    }
    let mut train = Vec::new();
    let mut val = Vec::new();
    for (i, r) in records.into_iter().enumerate() {
        if kiln_data::prepare::split_hash(seed, i as u64) < fraction {
            val.push(r);
        } else {
            train.push(r);
        }
    }
    if val.is_empty() && train.len() > 1 {
        val.push(train.pop().unwrap());
    }
    (train, val)
}

pub fn sft(cfg: &SftConfig, resume: bool, progress: bool) -> Result<TrainSummary> {
    if cfg.data.is_empty() {
        bail!("sft: no --data given");
    }
    let roles = token_roles(
        &cfg.bos_token,
        &cfg.eos_token,
        &cfg.pad_token,
        &cfg.end_of_turn_token,
    );
    let b = crate::bundle::load_bundle_with(&cfg.init, &roles)?;
    if b.model.cfg.arch != Arch::Decoder {
        bail!(
            "sft needs a decoder (GPT) model; {} is an encoder",
            b.dir.display()
        );
    }
    let (template, jinja, chat) = crate::bundle::stage_template(&b, &cfg.template)?;
    let mut meta = KilnMeta::new("sft", template.clone(), &b.tokenizer, cfg.train.seed);
    meta.chat_template = jinja;
    let extra_files = b.stage_files(&meta)?;
    let opts = LoadOptions {
        skip_bad: cfg.skip_bad_records,
        fields: checked_fields(&cfg.fields)?,
    };
    let mut convs = Vec::new();
    for p in &cfg.data {
        convs.extend(report_skipped("sft", p, load_sft(p, &opts)?));
    }
    let (train_c, val_c) = match &cfg.val_data {
        Some(v) => (convs, report_skipped("sft", v, load_sft(v, &opts)?)),
        None => split_val(convs, cfg.val_fraction, cfg.train.seed),
    };
    let seq_len = if cfg.seq_len == 0 {
        b.model.cfg.n_ctx
    } else {
        cfg.seq_len.min(b.model.cfg.n_ctx)
    };
    let (train, skipped) = render_examples_with(chat.as_ref(), &train_c, seq_len)?;
    let (val, vskipped) = render_examples_with(chat.as_ref(), &val_c, seq_len)?;
    eprintln!(
        "[sft] {} train / {} val examples ({} + {} skipped: response longer than {seq_len} tokens)",
        train.len(),
        val.len(),
        skipped,
        vskipped
    );
    let judge = cfg.judge.as_ref().map(Judge::load).transpose()?;
    let tok = b.tokenizer.clone();
    let judge_chat = chat.clone();
    let extra: Option<ExtraEval> = judge.map(|j| {
        Box::new(move |m: &Model| Ok(j.evaluate(m, &tok, judge_chat.as_ref())?.0)) as ExtraEval
    });
    let lora = kiln_train::adapters::settings(cfg.lora.as_ref(), cfg.adapter.as_deref())?;
    let memory = training_bytes_with(
        &b.model.cfg,
        cfg.train.batch_size,
        seq_len,
        true,
        lora.as_ref(),
        cfg.train.precision,
    );
    check_memory(memory, "SFT")?;
    let mut model = b.model;
    kiln_train::adapters::attach(
        &mut model,
        cfg.lora.as_ref(),
        cfg.adapter.as_deref(),
        &b.dir,
        cfg.train.seed,
    )?;
    let mut obj = SftObjective::new(
        &model,
        train,
        val,
        cfg.train.batch_size,
        seq_len,
        cfg.train.seed,
        cfg.packing,
        extra,
    )?;
    let run = StageRun::open("sft", &cfg.out, cfg, memory, resume, progress)?;
    run.train(&cfg.train, &mut model, &mut obj, extra_files, None)
}

// ---------------------------------------------------------------------------------------------
// Reward model

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RmConfig {
    /// An SFT or pretrained decoder, or an MLM encoder.
    pub init: PathBuf,
    /// Ranking, pairwise, HH-RLHF or scored files.
    pub data: Vec<PathBuf>,
    pub val_data: Option<PathBuf>,
    pub val_fraction: f64,
    /// Rankings evaluated once at the end and reported as `test_acc` etc., e.g. prompts about
    /// topics absent from the training data, to see how far the reward model carries.
    pub test_data: Option<PathBuf>,
    pub out: PathBuf,
    pub seq_len: usize,
    pub loss: RmLoss,
    pub margin: f32,
    /// λ of the centring penalty λ·r².
    pub center: f32,
    pub skip_bad_records: bool,
    /// The dataset's column names for Kiln's fields (`--field output=answer`: TOML
    /// `fields = { output = "answer" }`), for JSON, JSONL and Parquet files alike.
    #[serde(skip_serializing_if = "FieldMap::is_empty")]
    pub fields: FieldMap,
    /// Special-token roles of a Hugging Face tokenizer (a reward model started from a hub
    /// model), as in [`SftConfig`].
    pub bos_token: Option<String>,
    #[serde(
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub eos_token: Vec<String>,
    pub pad_token: Option<String>,
    pub end_of_turn_token: Option<String>,
    pub train: TrainConfig,
    /// LoRA: train adapters on a frozen base (`[lora]`; `--lora-rank` ...) instead of every weight.
    pub lora: Option<LoraConfig>,
    /// Continue training this PEFT adapter directory (on `init`'s model).
    pub adapter: Option<PathBuf>,
}

impl Default for RmConfig {
    fn default() -> Self {
        RmConfig {
            lora: None,
            adapter: None,
            init: PathBuf::from("runs/sft"),
            data: Vec::new(),
            val_data: None,
            val_fraction: 0.05,
            test_data: None,
            out: PathBuf::from("runs/rm"),
            seq_len: 0,
            loss: RmLoss::Pairwise,
            margin: 0.0,
            center: 0.01,
            skip_bad_records: false,
            fields: FieldMap::NONE,
            bos_token: None,
            eos_token: Vec::new(),
            pad_token: None,
            end_of_turn_token: None,
            train: TrainConfig {
                lr: 3e-4,
                min_lr: 3e-5,
                warmup_steps: 20,
                max_steps: 300,
                batch_size: 4,
                eval_every: 100,
                weight_decay: 0.0,
                ..TrainConfig::default()
            },
        }
    }
}

pub fn reward_model(cfg: &RmConfig, resume: bool, progress: bool) -> Result<TrainSummary> {
    if cfg.data.is_empty() {
        bail!("rm: no --data given");
    }
    let roles = token_roles(
        &cfg.bos_token,
        &cfg.eos_token,
        &cfg.pad_token,
        &cfg.end_of_turn_token,
    );
    let b = crate::bundle::load_bundle_with(&cfg.init, &roles)?;
    let template = b.meta.template.clone();
    let chat = b.chat()?;
    let mut meta = KilnMeta::new("rm", template.clone(), &b.tokenizer, cfg.train.seed);
    meta.chat_template = b.meta.chat_template.clone();
    let extra_files = b.stage_files(&meta)?;
    let opts = LoadOptions {
        skip_bad: cfg.skip_bad_records,
        fields: checked_fields(&cfg.fields)?,
    };
    let mut records = Vec::new();
    for p in &cfg.data {
        records.extend(report_skipped("rm", p, load_preferences(p, &opts)?));
    }
    let (train_r, val_r) = match &cfg.val_data {
        Some(v) => (
            records,
            report_skipped("rm", v, load_preferences(v, &opts)?),
        ),
        None => split_val(records, cfg.val_fraction, cfg.train.seed),
    };
    let seq_len = if cfg.seq_len == 0 {
        b.model.cfg.n_ctx
    } else {
        cfg.seq_len.min(b.model.cfg.n_ctx)
    };
    // The encoder spends one position on its [CLS] token.
    let fit = if b.model.cfg.arch == Arch::Encoder {
        seq_len - 1
    } else {
        seq_len
    };
    let (train, skipped) = render_groups_with(chat, &train_r, fit)?;
    let (val, vskipped) = render_groups_with(chat, &val_r, fit)?;
    let chat = b.chat.clone().expect("checked above");
    let pairs: usize = train
        .iter()
        .map(|g| kiln_data::datasets::expand_pairs(&g.ranks).len())
        .sum();
    eprintln!(
        "[rm] {} train prompts ({pairs} comparisons) / {} val ({} + {} skipped: too long)",
        train.len(),
        val.len(),
        skipped,
        vskipped
    );
    let mut model = b.model.with_score_head(true);
    let max_k = train.iter().map(|g| g.seqs.len()).max().unwrap_or(1);
    let lora = kiln_train::adapters::settings(cfg.lora.as_ref(), cfg.adapter.as_deref())?;
    let rows = cfg.train.batch_size * max_k;
    let memory = training_bytes_with(
        &model.cfg,
        rows,
        seq_len,
        false,
        lora.as_ref(),
        cfg.train.precision,
    );
    check_memory(memory, "reward-model training")?;
    // The score head trains in full beside the adapters (PEFT's modules_to_save).
    kiln_train::adapters::attach(
        &mut model,
        cfg.lora.as_ref(),
        cfg.adapter.as_deref(),
        &b.dir,
        cfg.train.seed,
    )?;
    let mut obj = RmObjective::new(
        &model,
        train,
        val,
        cfg.loss,
        cfg.margin,
        cfg.center,
        cfg.train.batch_size,
        seq_len,
        cfg.train.seed,
    )?;
    let run = StageRun::open("rm", &cfg.out, cfg, memory, resume, progress)?;
    // The reward statistics PPO normalises with go into the final checkpoint's kiln.json.
    let final_meta = meta.clone();
    let final_files: kiln_train::trainer::FinalFiles = Box::new(move |stats| {
        let mut m = final_meta.clone();
        m.reward_mean = stats.get("reward_mean").map(|&x| x as f32);
        m.reward_std = stats.get("reward_std").map(|&x| x as f32);
        Ok(vec![(
            META_FILE.to_string(),
            serde_json::to_vec_pretty(&m)?,
        )])
    });
    let mut summary = run.train(
        &cfg.train,
        &mut model,
        &mut obj,
        extra_files,
        Some(final_files),
    )?;
    if let Some(path) = &cfg.test_data {
        let records = report_skipped("rm", path, load_preferences(path, &opts)?);
        let (test, _) = render_groups_with(chat.as_ref(), &records, fit)?;
        let m = obj.evaluate_groups(&model, &test);
        eprintln!(
            "[rm] test ({}): {}",
            path.display(),
            kiln_train::trainer::fmt_metrics(&m)
        );
        summary
            .eval
            .extend(m.into_iter().map(|(k, v)| (format!("test_{k}"), v)));
    }
    if let (Some(mean), Some(std)) = (
        summary.final_stats.get("reward_mean"),
        summary.final_stats.get("reward_std"),
    ) {
        eprintln!("[rm] reward statistics over training responses: mean {mean:.4}, std {std:.4}");
    }
    Ok(summary)
}

/// Indices of the prompts that leave room for a response in a context of `n_ctx`; the others are
/// counted and reported. An error only when no prompt fits.
pub fn fitting_prompts(stage: &str, prompts: &[Vec<u32>], n_ctx: usize) -> Result<Vec<usize>> {
    let keep: Vec<usize> = (0..prompts.len())
        .filter(|&i| prompts[i].len() < n_ctx)
        .collect();
    if keep.is_empty() && !prompts.is_empty() {
        bail!(
            "{stage}: every one of the {} prompts is at least as long as the model's context ({n_ctx} tokens)",
            prompts.len()
        );
    }
    if keep.len() < prompts.len() {
        eprintln!(
            "[{stage}] {} of {} prompts skipped: no room for a response in the context of {n_ctx} tokens",
            prompts.len() - keep.len(),
            prompts.len()
        );
    }
    Ok(keep)
}

// ---------------------------------------------------------------------------------------------
// PPO

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoStageConfig {
    /// The SFT model: the actor starts here and it is the frozen reference.
    pub actor: PathBuf,
    pub reward_model: PathBuf,
    /// The critic's starting point (default: the reward model).
    pub critic: Option<PathBuf>,
    /// Prompts: `{"prompt"}`, Alpaca or chat records.
    pub prompts: PathBuf,
    /// The dataset's column names for Kiln's fields (`--field output=answer`: TOML
    /// `fields = { output = "answer" }`), for JSON, JSONL and Parquet files alike.
    #[serde(skip_serializing_if = "FieldMap::is_empty")]
    pub fields: FieldMap,
    /// Skip malformed prompt records (counted, the first error shown) instead of stopping.
    pub skip_bad_records: bool,
    pub out: PathBuf,
    pub judge: Option<JudgeConfig>,
    /// Pretraining shards for PPO-ptx (used when `ppo.ptx_coef` > 0).
    pub ptx_data: Option<PathBuf>,
    pub ppo: PpoConfig,
    /// LoRA: train adapters on a frozen base (`[lora]`; `--lora-rank` ...) instead of every weight.
    pub lora: Option<LoraConfig>,
    /// Continue training this PEFT adapter directory (on `init`'s model).
    pub adapter: Option<PathBuf>,
}

impl Default for PpoStageConfig {
    fn default() -> Self {
        PpoStageConfig {
            lora: None,
            adapter: None,
            actor: PathBuf::from("runs/sft"),
            reward_model: PathBuf::from("runs/rm"),
            critic: None,
            prompts: PathBuf::from("prompts.jsonl"),
            fields: FieldMap::NONE,
            skip_bad_records: false,
            out: PathBuf::from("runs/ppo"),
            judge: None,
            ptx_data: None,
            ppo: PpoConfig::default(),
        }
    }
}

pub fn ppo(cfg: &PpoStageConfig, resume: bool, progress: bool) -> Result<PpoSummary> {
    let actor = load_bundle(&cfg.actor)?;
    let rm = load_bundle(&cfg.reward_model)?;
    if rm.tokenizer.fingerprint() != actor.tokenizer.fingerprint() {
        bail!(
            "the reward model {} uses another tokenizer than the actor {} (they must share one)",
            rm.dir.display(),
            actor.dir.display()
        );
    }
    if !rm.model.cfg.score_head {
        bail!("{}: not a reward model (no score head)", rm.dir.display());
    }
    if rm.model.cfg.arch != Arch::Decoder {
        bail!(
            "{}: PPO's critic starts from the reward model and must be a decoder",
            rm.dir.display()
        );
    }
    let (mut critic, critic_dir) = match &cfg.critic {
        Some(p) => {
            let b = load_bundle(p)?;
            (b.model.with_score_head(true), b.dir)
        }
        None => (rm.model.clone(), rm.dir.clone()),
    };
    let (mean, std) = (
        rm.meta.reward_mean.unwrap_or(0.0),
        rm.meta.reward_std.unwrap_or(1.0),
    );
    let template = actor.meta.template.clone();
    let chat = actor.chat_format()?;
    let mut loaded = report_skipped_loaded(
        "ppo",
        &cfg.prompts,
        kiln_data::datasets::load_prompts(
            &cfg.prompts,
            &prompt_opts(&cfg.fields, cfg.skip_bad_records)?,
        )?,
    );
    let mut prompts: Vec<Vec<u32>> = loaded
        .records
        .iter()
        .map(|r| chat.render_prompt(&r.prompt))
        .collect::<Result<_, _>>()?;
    // Over-long prompts are skipped with a count, as every stage skips over-long records.
    let keep = fitting_prompts("ppo", &prompts, actor.model.cfg.n_ctx)?;
    if keep.len() < prompts.len() {
        loaded.records = keep.iter().map(|&i| loaded.records[i].clone()).collect();
        prompts = keep.iter().map(|&i| prompts[i].clone()).collect();
    }
    let stop_tokens = chat.stop_tokens()?;
    eprintln!(
        "[ppo] {} prompts; reward normalisation mean {mean:.3} std {std:.3}",
        prompts.len()
    );
    let judge = cfg.judge.as_ref().map(Judge::load).transpose()?;
    // The judge also grades every rollout answer, to show whether the RM agrees with it.
    let grader = judge.as_ref().map(|j| {
        let world = j.world.clone();
        // The question is the last user turn.
        let texts: Vec<String> = loaded
            .records
            .iter()
            .map(|r| {
                let user = r.prompt.iter().rev().find(|m| m.role == Role::User);
                user.map(|m| m.content.clone()).unwrap_or_default()
            })
            .collect();
        let tok = actor.tokenizer.clone();
        Box::new(move |i: usize, resp: &[u32]| {
            let v = world.judge(&texts[i], &tok.decode_skip_special(resp));
            v.task.map(|_| f64::from(u8::from(v.correct)))
        }) as kiln_train::ppo::Grader
    });
    let tok = actor.tokenizer.clone();
    let judge_chat = chat.clone();
    let eval = judge.map(|j| {
        Box::new(move |m: &Model| Ok(j.evaluate(m, &tok, judge_chat.as_ref())?.0))
            as kiln_train::ppo::PolicyEval
    });
    // Trainable actor and critic, frozen reference and reward model, and rollout scoring.
    let row_len = kiln_train::ppo::row_len(&prompts, cfg.ppo.max_new_tokens, actor.model.cfg.n_ctx);
    // With LoRA the actor's base (adapters off) is the reference: no copy of it is held.
    let lora = kiln_train::adapters::settings(cfg.lora.as_ref(), cfg.adapter.as_deref())?;
    // Activations for one micro-batch (the whole minibatch when `micro_batch` is 0).
    let mb = cfg.ppo.micro_rows(kiln_train::dist::world().size());
    let reference_bytes = match lora {
        Some(_) => 0,
        None => {
            4 * actor.model.params.len() + activation_bytes(&actor.model.cfg, mb, row_len, true)
        }
    };
    // PPO trains in f32.
    let f32 = kiln_kernels::Precision::F32;
    let memory = training_bytes_with(&actor.model.cfg, mb, row_len, true, lora.as_ref(), f32)
        + training_bytes_with(&critic.cfg, mb, row_len, false, lora.as_ref(), f32)
        + 4 * rm.model.params.len()
        + reference_bytes;
    let mut actor = actor;
    kiln_train::adapters::attach(
        &mut actor.model,
        cfg.lora.as_ref(),
        cfg.adapter.as_deref(),
        &actor.dir,
        cfg.ppo.seed,
    )?;
    // The critic gets fresh adapters of the same settings (and trains its score head in full).
    kiln_train::adapters::attach(
        &mut critic,
        lora.as_ref(),
        None,
        &critic_dir,
        cfg.ppo.seed ^ 1,
    )?;
    let run = StageRun::open("PPO", &cfg.out, cfg, memory, resume, progress)?;
    let mut meta = KilnMeta::new("ppo", template.clone(), &actor.tokenizer, cfg.ppo.seed);
    meta.chat_template = actor.meta.chat_template.clone();
    let extra_files = actor.stage_files(&meta)?;
    let ptx: Option<Box<dyn kiln_train::Objective>> = match (&cfg.ptx_data, cfg.ppo.ptx_coef > 0.0)
    {
        (Some(dir), true) => Some(Box::new(LmObjective::new(
            PretrainKind::Causal,
            dir,
            &actor.model,
            cfg.ppo.minibatch,
            actor.model.cfg.n_ctx,
            1,
            cfg.ppo.seed,
            Some(actor.tokenizer.clone()),
        )?)),
        (None, true) => bail!("ppo.ptx_coef > 0 needs ptx_data (pretraining shards)"),
        _ => None,
    };
    let tok2 = actor.tokenizer.clone();
    let mut ppo = Ppo {
        cfg: cfg.ppo.clone(),
        reference: actor.model.lora.is_none().then(|| actor.model.clone()),
        actor: actor.model,
        critic,
        reward: RewardModel {
            model: rm.model,
            mean,
            std,
        },
        prompts,
        stop_tokens,
        run: &run.run,
        extra_files,
        eval,
        decode: Box::new(move |t| tok2.decode_skip_special(t)),
        progress,
        ptx,
        grader,
        grad_hook: None,
    };
    ppo.train(resume)
}

/// A stage's column mapping, checked (a typo'd Kiln field fails before any model loads data).
fn checked_fields(fields: &FieldMap) -> Result<FieldMap> {
    fields.validate().map_err(anyhow::Error::msg)?;
    Ok(fields.clone())
}

/// How prompt files are read: every record must be good, under the stage's column mapping.
fn prompt_opts(fields: &FieldMap, skip_bad: bool) -> Result<LoadOptions> {
    Ok(LoadOptions {
        fields: checked_fields(fields)?,
        skip_bad,
    })
}

/// A load with its skipped records reported (as [`report_skipped`], keeping the `Loaded`).
fn report_skipped_loaded<T>(
    stage: &str,
    path: &Path,
    l: kiln_data::datasets::Loaded<T>,
) -> kiln_data::datasets::Loaded<T> {
    if l.skipped > 0 {
        eprintln!(
            "[{stage}] {}: skipped {} bad records (first: {})",
            path.display(),
            l.skipped,
            l.first_error.clone().unwrap_or_default()
        );
    }
    l
}

// ---------------------------------------------------------------------------------------------
// Direct preference optimisation

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoConfig {
    /// The SFT model: the policy starts here and, without `reference`, it is the frozen reference.
    pub init: PathBuf,
    /// Another reference model (same tokenizer); default: `init`.
    pub reference: Option<PathBuf>,
    /// Rankings (every ordered pair), pairs, HH-RLHF or Stack Exchange files.
    pub data: Vec<PathBuf>,
    /// Held-out preferences; without them `val_fraction` of `data` is held out.
    pub val_data: Option<PathBuf>,
    pub val_fraction: f64,
    pub out: PathBuf,
    /// Tokens per sequence (default: the model's context).
    pub seq_len: usize,
    /// `sigmoid` (DPO), `ipo` or `hinge` (SLiC).
    pub loss: DpoLoss,
    pub beta: f64,
    /// Conservative DPO's ε (sigmoid loss only).
    pub label_smoothing: f64,
    /// RPO: weight of the NLL term on the preferred responses.
    pub sft_coef: f64,
    /// Pack several sequences into each row.
    pub packing: bool,
    /// Reference tokens kept per position for the validation KL (0: the whole vocabulary).
    pub kl_top_k: usize,
    /// Validation prompts the KL is measured on (0: all).
    pub kl_max_prompts: usize,
    pub skip_bad_records: bool,
    /// The dataset's column names for Kiln's fields (`--field output=answer`: TOML
    /// `fields = { output = "answer" }`), for JSON, JSONL and Parquet files alike.
    #[serde(skip_serializing_if = "FieldMap::is_empty")]
    pub fields: FieldMap,
    /// Task accuracy by the demo judge during evaluation.
    pub judge: Option<JudgeConfig>,
    /// `train.batch_size` counts prompts, each with all its responses.
    pub train: TrainConfig,
    /// LoRA: train adapters on a frozen base (`[lora]`; `--lora-rank` ...) instead of every weight.
    pub lora: Option<LoraConfig>,
    /// Continue training this PEFT adapter directory (on `init`'s model).
    pub adapter: Option<PathBuf>,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig {
            lora: None,
            adapter: None,
            init: PathBuf::from("runs/sft"),
            reference: None,
            data: Vec::new(),
            val_data: None,
            val_fraction: 0.05,
            out: PathBuf::from("runs/dpo"),
            seq_len: 0,
            loss: DpoLoss::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
            sft_coef: 0.0,
            packing: true,
            kl_top_k: 64,
            kl_max_prompts: 256,
            skip_bad_records: false,
            fields: FieldMap::NONE,
            judge: None,
            train: TrainConfig {
                lr: 5e-5,
                min_lr: 5e-6,
                warmup_steps: 20,
                max_steps: 300,
                batch_size: 8,
                eval_every: 100,
                weight_decay: 0.0,
                ..TrainConfig::default()
            },
        }
    }
}

/// Preference records of `paths` with where each came from; bad records fail the load or, with
/// `skip_bad`, are counted (and reported).
fn load_pref_records(
    paths: &[PathBuf],
    opts: &LoadOptions,
) -> Result<(Vec<PrefRecord>, Vec<Origin>, usize)> {
    let (mut records, mut origins, mut skipped) = (Vec::new(), Vec::new(), 0);
    for p in paths {
        let l = load_preferences(p, opts)?;
        if l.skipped > 0 {
            eprintln!(
                "[dpo] {}: skipped {} bad records (first: {})",
                p.display(),
                l.skipped,
                l.first_error.as_deref().unwrap_or_default()
            );
        }
        skipped += l.skipped;
        origins.extend(l.locations.iter().map(|&loc| Origin {
            file: p.clone(),
            loc: Some(loc),
        }));
        records.extend(l.records);
    }
    Ok((records, origins, skipped))
}

/// What `kiln dpo` reports besides the trainer's summary.
pub struct DpoOutcome {
    pub summary: TrainSummary,
    /// Bad records skipped (reader and renderer together).
    pub skipped: usize,
}

pub fn dpo(cfg: &DpoConfig, resume: bool, progress: bool) -> Result<DpoOutcome> {
    if cfg.data.is_empty() {
        bail!("dpo: no --data given");
    }
    let settings = DpoSettings {
        loss: cfg.loss,
        beta: cfg.beta,
        label_smoothing: cfg.label_smoothing,
        sft_coef: cfg.sft_coef,
    };
    settings.validate()?;
    let b = load_bundle(&cfg.init)?;
    let chat = b.chat_format()?;
    if b.model.cfg.arch != Arch::Decoder || b.model.cfg.score_head {
        bail!(
            "{}: DPO starts from a decoder language model (an SFT model), not an encoder or a reward model",
            b.dir.display()
        );
    }
    let template = b.meta.template.clone();
    let opts = LoadOptions {
        skip_bad: cfg.skip_bad_records,
        fields: checked_fields(&cfg.fields)?,
    };
    let (records, origins, mut skipped) = load_pref_records(&cfg.data, &opts)?;
    let paired: Vec<(PrefRecord, Origin)> = records.into_iter().zip(origins).collect();
    let (train_r, val_r) = match &cfg.val_data {
        Some(v) => {
            let (r, o, s) = load_pref_records(std::slice::from_ref(v), &opts)?;
            skipped += s;
            (paired, r.into_iter().zip(o).collect())
        }
        None => split_val(paired, cfg.val_fraction, cfg.train.seed),
    };
    let seq_len = if cfg.seq_len == 0 {
        b.model.cfg.n_ctx
    } else {
        cfg.seq_len.min(b.model.cfg.n_ctx)
    };
    let render = |rs: Vec<(PrefRecord, Origin)>| {
        let (r, o): (Vec<_>, Vec<_>) = rs.into_iter().unzip();
        render_dpo_groups(chat.as_ref(), &r, &o, seq_len, cfg.skip_bad_records)
    };
    let (train, tr) = render(train_r)?;
    let (val, vr) = render(val_r)?;
    for r in [&tr, &vr] {
        if let Some(first) = &r.first_error {
            let by: Vec<String> = r.skipped.iter().map(|(k, n)| format!("{n} {k}")).collect();
            eprintln!(
                "[dpo] skipped {} bad records ({}; first: {first})",
                r.total_skipped(),
                by.join(", ")
            );
        }
    }
    skipped += tr.total_skipped() + vr.total_skipped();
    let cut = tr.truncated_prompts + vr.truncated_prompts;
    if cut > 0 {
        eprintln!("[dpo] {cut} prompts cut at the start to fit the context of {seq_len} tokens");
    }
    let mut meta = KilnMeta::new("dpo", template.clone(), &b.tokenizer, cfg.train.seed);
    meta.chat_template = b.meta.chat_template.clone();
    let stage_files = b.stage_files(&meta)?;
    let mut model = b.model;
    // The reference passes through the arithmetic training will use.
    model.precision = cfg.train.precision.for_this_cpu().0;
    // Without another reference, the policy's base is it (adapters off): fingerprinted before the
    // adapters freeze (and maybe pack) it, with the base's format.
    let lora = kiln_train::adapters::settings(cfg.lora.as_ref(), cfg.adapter.as_deref())?;
    let base_fingerprint = lora.as_ref().map(|l| {
        let adapter = cfg.adapter.as_ref().map(|a| a.display().to_string());
        let fp = model_fingerprint(&model);
        format!("{fp}-{}-{}", l.base_weights, adapter.unwrap_or_default())
    });
    kiln_train::adapters::attach(
        &mut model,
        cfg.lora.as_ref(),
        cfg.adapter.as_deref(),
        &b.dir,
        cfg.train.seed,
    )?;
    let judge = cfg.judge.as_ref().map(Judge::load).transpose()?;
    let tok = b.tokenizer.clone();
    let judge_chat = chat.clone();
    let extra: Option<ExtraEval> = judge.map(|j| {
        Box::new(move |m: &Model| Ok(j.evaluate(m, &tok, judge_chat.as_ref())?.0)) as ExtraEval
    });
    let mut obj = DpoObjective::new(
        &model,
        train,
        val,
        DpoOptions {
            settings,
            groups_per_batch: cfg.train.batch_size,
            seq_len,
            packing: cfg.packing,
            seed: cfg.train.seed,
            kl_top_k: cfg.kl_top_k,
            kl_max_groups: cfg.kl_max_prompts,
        },
        extra,
    )?;
    let (prompts, pairs, seqs) = obj.counts();
    eprintln!(
        "[dpo] {prompts} train prompts ({pairs} pairs, {seqs} responses) / {} val prompts; loss {}, β {}",
        obj.val_prompts(),
        cfg.loss.name(),
        cfg.beta
    );
    let max_rows = obj.activation_rows();
    let memory = training_bytes_with(
        &model.cfg,
        max_rows,
        seq_len,
        true,
        lora.as_ref(),
        cfg.train.precision,
    ) + obj.reference_bytes();
    let stage = StageRun::open("DPO", &cfg.out, cfg, memory, resume, progress)?;
    let run = &stage.run;
    let resuming = resume && run.latest_checkpoint()?.is_some();
    // The reference: computed once (then the run holds one model), or read back from the run.
    let t0 = std::time::Instant::now();
    let (reference, source, key) = match &cfg.reference {
        None => {
            let fp = base_fingerprint.unwrap_or_else(|| model_fingerprint(&model));
            let key = obj.cache_key(&fp, model.precision);
            model.set_adapters_enabled(false);
            let got =
                load_or_compute_reference(run, &key, resuming, || obj.compute_reference(&model));
            model.set_adapters_enabled(true);
            let (r, src) = got?;
            (r, src, key)
        }
        Some(path) => {
            let rb = load_bundle(path)?;
            if rb.tokenizer.fingerprint() != b.tokenizer.fingerprint() {
                bail!(
                    "the reference {} uses another tokenizer than the policy {} (they must share one)",
                    rb.dir.display(),
                    b.dir.display()
                );
            }
            if rb.model.cfg.arch != Arch::Decoder || rb.model.cfg.score_head {
                bail!(
                    "{}: the reference must be a decoder language model",
                    rb.dir.display()
                );
            }
            let mut rm = rb.model;
            rm.precision = cfg.train.precision.for_this_cpu().0;
            let key = obj.cache_key(&model_fingerprint(&rm), rm.precision);
            let (r, src) =
                load_or_compute_reference(run, &key, resuming, || obj.compute_reference(&rm))?;
            // The reference model is dropped here: training holds the policy alone.
            (r, src, key)
        }
    };
    match &source {
        RefSource::Loaded => eprintln!(
            "[dpo] reference log-probabilities read from {} (not recomputed)",
            cfg.out.join(REFERENCE_FILE).display()
        ),
        RefSource::Computed(why) => eprintln!(
            "[dpo] reference log-probabilities of {seqs} train and {} val responses computed in {:.1}s ({why}); cached in {}",
            obj.val_responses(),
            t0.elapsed().as_secs_f64(),
            cfg.out.join(REFERENCE_FILE).display()
        ),
    }
    obj.use_reference(reference)?;
    let mut extra_files = stage_files;
    extra_files.push((KEY_FILE.into(), serde_json::to_vec_pretty(&key)?));
    let summary = stage.train(&cfg.train, &mut model, &mut obj, extra_files, None)?;
    Ok(DpoOutcome { summary, skipped })
}

/// GRPO/RLOO with verifiable rewards (`kiln grpo`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoStageConfig {
    /// The SFT model: the policy starts here (and it is the reference when `grpo.beta` > 0).
    pub actor: PathBuf,
    /// Prompts: `{"prompt", ...}`, Alpaca or chat records; extra fields go to reward programs.
    pub prompts: PathBuf,
    /// The dataset's column names for Kiln's fields (`--field output=answer`: TOML
    /// `fields = { output = "answer" }`), for JSON, JSONL and Parquet files alike.
    #[serde(skip_serializing_if = "FieldMap::is_empty")]
    pub fields: FieldMap,
    /// Skip malformed prompt records (counted, the first error shown) instead of stopping.
    pub skip_bad_records: bool,
    pub out: PathBuf,
    /// The demo world's judge: evaluation, and the `judge` reward.
    pub judge: Option<JudgeConfig>,
    /// Reward sources, summed with `reward_weights`: `judge` (1 when the demo judge says the
    /// answer is right), `format` (1 when the answer ends its turn), `rm:DIR` (a reward model's
    /// normalised score), `cmd:PROGRAM` (a program reading JSON lines and printing one number each).
    pub rewards: Vec<String>,
    /// One weight per reward source (default 1 each).
    pub reward_weights: Vec<f32>,
    /// Seconds a reward program may take per answer before the run stops with an error.
    pub reward_timeout_s: f64,
    pub grpo: GrpoConfig,
    /// LoRA: train adapters on a frozen base (`[lora]`; `--lora-rank` ...) instead of every weight.
    pub lora: Option<LoraConfig>,
    /// Continue training this PEFT adapter directory (on `init`'s model).
    pub adapter: Option<PathBuf>,
}

impl Default for GrpoStageConfig {
    fn default() -> Self {
        GrpoStageConfig {
            lora: None,
            adapter: None,
            actor: PathBuf::from("runs/sft"),
            prompts: PathBuf::from("prompts.jsonl"),
            fields: FieldMap::NONE,
            skip_bad_records: false,
            out: PathBuf::from("runs/grpo"),
            judge: None,
            rewards: vec!["judge".into()],
            reward_weights: Vec::new(),
            reward_timeout_s: 30.0,
            grpo: GrpoConfig::default(),
        }
    }
}

pub fn grpo(cfg: &GrpoStageConfig, resume: bool, progress: bool) -> Result<GrpoSummary> {
    let actor = load_bundle(&cfg.actor)?;
    if actor.model.cfg.arch != Arch::Decoder {
        bail!(
            "{}: GRPO trains a decoder (chat model)",
            actor.dir.display()
        );
    }
    let template = actor.meta.template.clone();
    let chat = actor.chat_format()?;
    let loaded = report_skipped_loaded(
        "grpo",
        &cfg.prompts,
        kiln_data::datasets::load_prompts_with_fields(
            &cfg.prompts,
            &prompt_opts(&cfg.fields, cfg.skip_bad_records)?,
        )?,
    );
    let prompts: Vec<Vec<u32>> = loaded
        .records
        .iter()
        .map(|(r, _)| chat.render_prompt(&r.prompt))
        .collect::<Result<_, _>>()?;
    // The question of each prompt (its last user turn), for the judge.
    let questions: Vec<String> = loaded
        .records
        .iter()
        .map(|(r, _)| {
            let user = r.prompt.iter().rev().find(|m| m.role == Role::User);
            user.map(|m| m.content.clone()).unwrap_or_default()
        })
        .collect();
    if !cfg.reward_weights.is_empty() && cfg.reward_weights.len() != cfg.rewards.len() {
        bail!(
            "{} reward weights for {} reward sources (give one weight per --reward, or none)",
            cfg.reward_weights.len(),
            cfg.rewards.len()
        );
    }
    let stop_tokens = chat.stop_tokens()?;
    let judge = cfg.judge.as_ref().map(Judge::load).transpose()?;
    let rewards = reward_sources(
        &cfg.rewards,
        &cfg.reward_weights,
        &RewardContext {
            actor: &actor,
            loaded: &loaded.records,
            prompts: &prompts,
            questions: &questions,
            judge: judge.as_ref(),
            stop_tokens: &stop_tokens,
            timeout_s: cfg.reward_timeout_s,
            batch: cfg.grpo.minibatch,
        },
    )?;
    eprintln!(
        "[grpo] {} prompts × {} samples per iteration; rewards: {}",
        cfg.grpo.prompts_per_iter,
        cfg.grpo.group_size,
        cfg.rewards
            .iter()
            .enumerate()
            .map(|(i, r)| format!("{r} ×{}", cfg.reward_weights.get(i).copied().unwrap_or(1.0)))
            .collect::<Vec<_>>()
            .join(" + ")
    );
    let tok = actor.tokenizer.clone();
    let judge_chat = chat.clone();
    let eval = judge.map(|j| {
        Box::new(move |m: &Model| Ok(j.evaluate(m, &tok, judge_chat.as_ref())?.0))
            as kiln_train::ppo::PolicyEval
    });
    let row_len =
        kiln_train::ppo::row_len(&prompts, cfg.grpo.max_new_tokens, actor.model.cfg.n_ctx);
    let lora = kiln_train::adapters::settings(cfg.lora.as_ref(), cfg.adapter.as_deref())?;
    // With LoRA the actor's base (adapters off) is the reference: no copy of it is held.
    let reference = (cfg.grpo.beta > 0.0 && lora.is_none()).then(|| actor.model.clone());
    // GRPO, like PPO, trains in f32.
    // Activations for one micro-batch (the whole minibatch unless `micro_batch` is set).
    let rows = cfg.grpo.micro_rows(kiln_train::dist::world().size());
    let memory = training_bytes_with(
        &actor.model.cfg,
        rows,
        row_len,
        true,
        lora.as_ref(),
        kiln_kernels::Precision::F32,
    ) + reference.as_ref().map_or(0, |r| {
        4 * r.params.len() + activation_bytes(&r.cfg, rows, row_len, true)
    });
    let mut actor = actor;
    kiln_train::adapters::attach(
        &mut actor.model,
        cfg.lora.as_ref(),
        cfg.adapter.as_deref(),
        &actor.dir,
        cfg.grpo.seed,
    )?;
    let run = StageRun::open("GRPO", &cfg.out, cfg, memory, resume, progress)?;
    let mut meta = KilnMeta::new("grpo", template.clone(), &actor.tokenizer, cfg.grpo.seed);
    meta.chat_template = actor.meta.chat_template.clone();
    let tok2 = actor.tokenizer.clone();
    let mut g = Grpo {
        cfg: cfg.grpo.clone(),
        reference,
        extra_files: actor.stage_files(&meta)?,
        actor: actor.model,
        rewards,
        prompts,
        stop_tokens,
        run: &run.run,
        eval,
        decode: Box::new(move |t| tok2.decode_skip_special(t)),
        progress,
        grad_hook: None,
    };
    g.train(resume)
}

/// What reward sources are built from: the policy's bundle and the rendered prompts.
pub struct RewardContext<'a> {
    pub actor: &'a crate::bundle::Bundle,
    /// Each prompt's record and its whole JSON object.
    pub loaded: &'a [(kiln_data::datasets::PromptRecord, kiln_data::datasets::Obj)],
    pub prompts: &'a [Vec<u32>],
    /// Each prompt's question (its last user turn), for the judge.
    pub questions: &'a [String],
    pub judge: Option<&'a Judge>,
    pub stop_tokens: &'a [u32],
    pub timeout_s: f64,
    pub batch: usize,
}

/// An answer matches a reference when they are equal up to case, surrounding whitespace and
/// punctuation, and runs of whitespace (`" The answer is 5. "` ≠ `"5"`; `"Paris."` = `"paris"`).
pub fn exact_match(answer: &str, reference: &str) -> bool {
    let norm = |s: &str| {
        s.trim()
            .trim_matches(|c: char| c.is_ascii_punctuation() && c != '-')
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
    };
    let a = norm(answer);
    !a.is_empty() && a == norm(reference)
}

/// The reward sources `specs` name (`judge`, `format`, `rm:DIR`, `cmd:PROGRAM`), with `weights`
/// (one per source, or none for 1 each): shared by `kiln grpo` and `kiln eval`.
pub fn reward_sources(
    specs: &[String],
    weights: &[f32],
    ctx: &RewardContext,
) -> Result<Vec<Weighted<'static>>> {
    let mut rewards: Vec<Weighted> = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let weight = weights.get(i).copied().unwrap_or(1.0);
        let source: Box<dyn RewardSource> = match spec.split_once(':') {
            None if spec == "judge" => {
                let j = ctx.judge.context(
                    "the judge reward needs a judge (the demo world: --world and --judge-prompts)",
                )?;
                let world = j.world.clone();
                let tok = ctx.actor.tokenizer.clone();
                let questions = ctx.questions.to_vec();
                Box::new(FnReward {
                    name: "judge".into(),
                    f: Box::new(move |p, resp| {
                        let v = world.judge(&questions[p], &tok.decode_skip_special(resp));
                        f32::from(u8::from(v.correct))
                    }),
                })
            }
            None | Some(("exact", _)) if spec == "exact" || spec.starts_with("exact:") => {
                let field = spec.strip_prefix("exact:").unwrap_or("answer").to_string();
                let answers: Vec<Option<String>> = ctx
                    .loaded
                    .iter()
                    .map(|(_, o)| match o.get(&field) {
                        Some(serde_json::Value::String(s)) => Some(s.clone()),
                        Some(serde_json::Value::Null) | None => None,
                        Some(v) => Some(v.to_string()),
                    })
                    .collect();
                if let Some(i) = answers.iter().position(|a| a.is_none()) {
                    bail!("reward {spec}: prompt record {} has no \"{field}\" field to compare with", i + 1);
                }
                let tok = ctx.actor.tokenizer.clone();
                Box::new(FnReward {
                    name: spec.clone(),
                    f: Box::new(move |p, resp| {
                        let want = answers[p].as_deref().unwrap_or_default();
                        f32::from(u8::from(exact_match(&tok.decode_skip_special(resp), want)))
                    }),
                })
            }
            None if spec == "format" => Box::new(FormatReward {
                stop_tokens: ctx.stop_tokens.to_vec(),
            }),
            Some(("rm", dir)) => {
                let rm = load_bundle(Path::new(dir))?;
                if !rm.model.cfg.score_head {
                    bail!("{}: not a reward model (no score head)", rm.dir.display());
                }
                if rm.tokenizer.fingerprint() != ctx.actor.tokenizer.fingerprint() {
                    bail!("the reward model {dir} uses another tokenizer than the actor");
                }
                Box::new(ModelReward {
                    rm: RewardModel {
                        mean: rm.meta.reward_mean.unwrap_or(0.0),
                        std: rm.meta.reward_std.unwrap_or(1.0),
                        model: rm.model,
                    },
                    prompts: ctx.prompts.to_vec(),
                    batch: ctx.batch,
                })
            }
            Some(("cmd", program)) => {
                let records = ctx
                    .loaded
                    .iter()
                    .map(|(r, obj)| {
                        let mut o = obj.clone();
                        o.entry("prompt").or_insert_with(|| r.raw.clone().into());
                        o
                    })
                    .collect();
                let tok = ctx.actor.tokenizer.clone();
                Box::new(CommandReward::start(
                    program,
                    records,
                    Box::new(move |t: &[u32]| tok.decode_skip_special(t)),
                    std::time::Duration::from_secs_f64(ctx.timeout_s.max(0.001)),
                )?)
            }
            _ => bail!(
                "unknown reward source {spec:?} (expected judge, format, exact[:FIELD], rm:DIR or cmd:PROGRAM)"
            ),
        };
        rewards.push(Weighted { source, weight });
    }
    Ok(rewards)
}
