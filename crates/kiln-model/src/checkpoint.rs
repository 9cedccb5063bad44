//! Checkpoints: Hugging Face–compatible `model.safetensors` + `config.json`, written atomically.
//!
//! A checkpoint is a directory. It is first written under a temporary name, every file fsynced, a
//! `checksums.json` (SHA-256 of each file) added, then renamed into place, so a crash never leaves a
//! half-written checkpoint that looks complete, and a damaged file is detected on load.

use crate::config::ModelConfig;
use crate::model::Model;
use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MODEL_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "config.json";
pub const CHECKSUMS_FILE: &str = "checksums.json";

fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Serialises named f32 tensors (name, shape, data) to safetensors bytes.
pub fn tensors_to_bytes(tensors: &[(String, Vec<usize>, &[f32])]) -> Result<Vec<u8>> {
    let raw: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, d)| d.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&raw)
        .map(|((name, shape, _), bytes)| {
            Ok((
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), bytes)?,
            ))
        })
        .collect::<Result<_>>()?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    Ok(safetensors::serialize(views, Some(meta))?)
}

/// Named tensors read from a file: name → (shape, values).
pub type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Reads every tensor of a safetensors buffer as f32 (F32, BF16 and F16 accepted: half-precision
/// checkpoints become f32 master weights).
pub fn bytes_to_tensors(bytes: &[u8], what: &str) -> Result<Tensors> {
    let mut out = BTreeMap::new();
    add_tensors(&mut out, bytes, what)?;
    Ok(out)
}

fn add_tensors(out: &mut Tensors, bytes: &[u8], what: &str) -> Result<()> {
    let st = SafeTensors::deserialize(bytes)
        .with_context(|| format!("{what}: not a valid safetensors file (truncated or corrupt?)"))?;
    for (name, view) in st.tensors() {
        let d = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => d
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F16 => d
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                bail!("{what}: tensor {name} has dtype {other:?}; Kiln reads F32, BF16 and F16")
            }
        };
        out.insert(name, (view.shape().to_vec(), data));
    }
    Ok(())
}

/// The model's parameters as the family's own checkpoint tensors (name, shape, values): GPT-2's
/// Conv1D tensors as they are, the Llama family's `nn.Linear` tensors split out of Kiln's fused
/// ones and transposed to `[out, in]`.
pub fn hf_tensors(model: &Model) -> Vec<(String, Vec<usize>, Cow<'_, [f32]>)> {
    let mut out = Vec::new();
    for t in &model.layout.tensors {
        let data = &model.params[t.range()];
        let cols_total = *t.shape.last().unwrap_or(&1);
        let rows = t.len / cols_total.max(1);
        if let [part] = t.hf.as_slice() {
            if !part.transposed {
                out.push((part.name.clone(), t.shape.clone(), Cow::Borrowed(data)));
                continue;
            }
        }
        let mut col = 0;
        for part in &t.hf {
            let w = part.cols;
            let (shape, vals) = if t.shape.len() == 1 {
                (vec![w], data[col..col + w].to_vec())
            } else if part.transposed {
                let mut v = vec![0.0f32; w * rows];
                for r in 0..rows {
                    for a in 0..w {
                        v[a * rows + r] = data[r * cols_total + col + a];
                    }
                }
                (vec![w, rows], v)
            } else {
                let mut v = Vec::with_capacity(w * rows);
                for r in 0..rows {
                    v.extend_from_slice(&data[r * cols_total + col..r * cols_total + col + w]);
                }
                (vec![rows, w], v)
            };
            out.push((part.name.clone(), shape, Cow::Owned(vals)));
            col += w;
        }
    }
    out
}

/// The model's parameters under the family's Hugging Face names, as safetensors bytes.
pub fn model_to_bytes(model: &Model) -> Result<Vec<u8>> {
    if model.base.is_some() {
        bail!("the model's frozen base is packed ({:?}): save its adapters, or merge them onto an f32 copy", model.base.as_ref().map(|b| b.format));
    }
    let tensors = hf_tensors(model);
    let refs: Vec<(String, Vec<usize>, &[f32])> = tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), s.clone(), d.as_ref()))
        .collect();
    tensors_to_bytes(&refs)
}

/// The tensor a checkpoint may store under `name`, or under it without the model class's prefix
/// (`transformer.` of GPT2LMHeadModel, `model.` of LlamaForCausalLM: the bare GPT2Model/LlamaModel).
fn lookup<'a>(tensors: &'a Tensors, name: &str) -> Option<&'a (Vec<usize>, Vec<f32>)> {
    tensors.get(name).or_else(|| {
        let bare = name
            .strip_prefix("transformer.")
            .or_else(|| name.strip_prefix("model."))?;
        tensors.get(bare)
    })
}

/// Fills a flat buffer in `cfg`'s layout from the family's checkpoint tensors (see [`hf_tensors`]).
/// Ignores what Kiln does not use (attention-mask buffers, a tied `lm_head.weight`, rotary caches).
pub fn params_from_tensors(cfg: &ModelConfig, tensors: &Tensors, what: &str) -> Result<Vec<f32>> {
    // A config read from a damaged or foreign file can imply any size: check it against what the
    // file holds before laying it out (which allocates and loops per layer).
    let held: usize = tensors.values().map(|(_, d)| d.len()).sum();
    match crate::memory::checked_num_params(cfg) {
        Some(n) if n <= held => {}
        n => bail!(
            "{what}: config.json implies {} parameters ({} layers, width {}, vocab {}, context {}), but the \
             file holds {held} values (checkpoint of another architecture, or a damaged config.json?)",
            n.map_or("too many".to_string(), |n| n.to_string()),
            cfg.n_layer,
            cfg.n_embd,
            cfg.vocab_size,
            cfg.n_ctx
        ),
    }
    let layout = crate::params::ParamLayout::new(cfg);
    let mut params = vec![0.0f32; layout.total];
    for t in &layout.tensors {
        let dst = &mut params[t.range()];
        let cols_total = *t.shape.last().unwrap_or(&1);
        let rows = t.len / cols_total.max(1);
        let mut col = 0;
        for part in &t.hf {
            let w = part.cols;
            let (shape, data) = lookup(tensors, &part.name)
                .with_context(|| format!("{what}: tensor {} is missing", part.name))?;
            let want = if t.shape.len() == 1 {
                vec![w]
            } else if part.transposed {
                vec![w, rows]
            } else {
                vec![rows, w]
            };
            if shape != &want {
                bail!(
                    "{what}: tensor {} has shape {:?}, but config.json implies {:?} (checkpoint of another architecture?)",
                    part.name,
                    shape,
                    want
                );
            }
            if t.shape.len() == 1 {
                dst[col..col + w].copy_from_slice(data);
            } else if part.transposed {
                for a in 0..w {
                    for r in 0..rows {
                        dst[r * cols_total + col + a] = data[a * rows + r];
                    }
                }
            } else {
                for r in 0..rows {
                    dst[r * cols_total + col..r * cols_total + col + w]
                        .copy_from_slice(&data[r * w..(r + 1) * w]);
                }
            }
            col += w;
        }
    }
    Ok(params)
}

/// Writes a checkpoint directory atomically: `files` (name, bytes) plus `checksums.json`.
///
/// The files go to `.NAME.tmp-PID`, each fsynced, `checksums.json` last (so a temporary directory
/// with a checksums file is complete), then the directory is renamed to `NAME`. An existing `NAME`
/// is first moved aside to `.NAME.old-PID`; a crash between the two renames is repaired by
/// [`recover_interrupted`]. A failed write (a full disk) removes its temporary directory and leaves
/// every existing checkpoint as it was.
pub fn write_checkpoint_dir(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = dir
        .file_name()
        .with_context(|| format!("{}: not a directory name", dir.display()))?
        .to_string_lossy()
        .to_string();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    let written = write_files(&tmp, files);
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e.context(format!(
            "writing checkpoint {} failed (disk full?); the previous checkpoints are intact",
            dir.display()
        )));
    }
    // Replace an existing directory of the same name: move it aside first, so at every moment one
    // complete copy exists.
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if old.exists() {
        fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    if dir.exists() {
        fs::rename(dir, &old).with_context(|| format!("moving aside {}", dir.display()))?;
    }
    fs::rename(&tmp, dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    sync_dir(parent);
    if old.exists() {
        fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(())
}

fn write_files(tmp: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    fs::create_dir_all(tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut sums = BTreeMap::new();
    let write = |path: &Path, bytes: &[u8]| -> Result<()> {
        let mut f =
            fs::File::create(path).with_context(|| format!("writing {}", path.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", path.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", path.display()))?;
        Ok(())
    };
    for (fname, bytes) in files {
        write(&tmp.join(fname), bytes)?;
        sums.insert(fname.clone(), sha256_hex(bytes));
    }
    write(
        &tmp.join(CHECKSUMS_FILE),
        &serde_json::to_vec_pretty(&sums)?,
    )?;
    sync_dir(tmp);
    Ok(())
}

/// Makes a directory's entries durable (best effort: not every platform can open a directory).
fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The parts of a leftover hidden name `.NAME.KIND-PID` (KIND: `tmp`, `old` or `del`).
fn leftover(fname: &str) -> Option<(&str, &str, u32)> {
    let rest = fname.strip_prefix('.')?;
    let (head, pid) = rest.rsplit_once('-')?;
    let pid: u32 = pid.parse().ok()?;
    let (name, kind) = head.rsplit_once('.')?;
    if name.is_empty() || !matches!(kind, "tmp" | "old" | "del") {
        return None;
    }
    Some((name, kind, pid))
}

/// Repairs what a process killed inside [`write_checkpoint_dir`] (or while deleting a checkpoint)
/// left in `parent`: a checkpoint moved aside to `.NAME.old-PID` whose replacement never got its
/// name is put back (or replaced by the complete `.NAME.tmp-PID` that was about to take its
/// place); incomplete temporary directories and half-deleted checkpoints of other processes are
/// removed, and so are the temporary files of killed atomic writes of small files. Returns the
/// names of the checkpoints it restored.
pub fn recover_interrupted(parent: &Path) -> Result<Vec<String>> {
    let mut restored = Vec::new();
    let Ok(entries) = fs::read_dir(parent) else {
        return Ok(restored);
    };
    let me = std::process::id();
    let mut found: Vec<(String, String, u32)> = entries
        .flatten()
        .filter_map(|e| {
            let f = e.file_name().to_string_lossy().to_string();
            let (name, kind, pid) = leftover(&f)?;
            Some((name.to_string(), kind.to_string(), pid))
        })
        .filter(|(_, _, pid)| *pid != me)
        .collect();
    // `old` first: it decides what NAME becomes.
    found.sort_by_key(|(_, kind, _)| kind != "old");
    for (name, kind, pid) in found {
        let path = parent.join(format!(".{name}.{kind}-{pid}"));
        if !path.exists() {
            continue;
        }
        let target = parent.join(&name);
        if !path.is_dir() {
            // A small file a killed process was writing atomically (its temporary name).
            if kind == "tmp" {
                fs::remove_file(&path)
                    .with_context(|| format!("removing the leftover {}", path.display()))?;
            }
            continue;
        }
        if kind == "old" && !target.exists() {
            let tmp = parent.join(format!(".{name}.tmp-{pid}"));
            let from = if tmp.join(CHECKSUMS_FILE).exists() {
                tmp
            } else {
                path.clone()
            };
            fs::rename(&from, &target).with_context(|| {
                format!("restoring {} from {}", target.display(), from.display())
            })?;
            restored.push(name.clone());
            if !path.exists() {
                continue;
            }
        }
        fs::remove_dir_all(&path)
            .with_context(|| format!("removing the leftover {}", path.display()))?;
    }
    if !restored.is_empty() {
        sync_dir(parent);
    }
    Ok(restored)
}

/// Reads one file of a checkpoint directory, checking it against `checksums.json` when present.
pub fn read_checked(dir: &Path, fname: &str) -> Result<Vec<u8>> {
    let path = dir.join(fname);
    let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let sums_path = dir.join(CHECKSUMS_FILE);
    if sums_path.exists() {
        let sums: BTreeMap<String, String> = serde_json::from_slice(&fs::read(&sums_path)?)
            .with_context(|| format!("{}: not valid JSON", sums_path.display()))?;
        if let Some(expected) = sums.get(fname) {
            if &sha256_hex(&bytes) != expected {
                bail!(
                    "{}: checksum mismatch (the file is corrupt or was changed after the checkpoint was written)",
                    path.display()
                );
            }
        }
    }
    Ok(bytes)
}

/// Loads a model directory (written by Kiln or by `transformers`' `save_pretrained`): one
/// `model.safetensors`, or shards listed by `model.safetensors.index.json`; or a PEFT adapter
/// directory, whose base (`base_model_name_or_path`) is loaded and the adapters merged into it.
pub fn load_model(dir: &Path) -> Result<Model> {
    let mut m = load_model_unmerged(dir)?;
    m.merge_lora();
    Ok(m)
}

/// True when `dir` holds a PEFT adapter and no full weights.
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(crate::lora::ADAPTER_CONFIG_FILE).exists()
        && !dir.join(MODEL_FILE).exists()
        && !dir.join(INDEX_FILE).exists()
}

/// [`load_model`], keeping an adapter directory's adapters attached (the base frozen, in the format
/// it was trained over): to continue training them, or to resume.
pub fn load_model_unmerged(dir: &Path) -> Result<Model> {
    if is_adapter_dir(dir) {
        let cfg_path = dir.join(crate::lora::ADAPTER_CONFIG_FILE);
        let (_, base) = crate::lora::read_peft_config(&cfg_path)?;
        let base = base.with_context(|| {
            format!(
                "{}: no base_model_name_or_path to load the adapter onto",
                cfg_path.display()
            )
        })?;
        let mut model = load_adapter_base(dir, &base)?;
        attach_peft(&mut model, dir)?;
        return Ok(model);
    }
    let cfg = ModelConfig::load(&dir.join(CONFIG_FILE))?;
    let (tensors, what) = read_weights(dir)?;
    let params = params_from_tensors(&cfg, &tensors, &what)?;
    Ok(Model::from_params(cfg, params))
}

/// The base an adapter directory names (a path as written, or relative to the adapter), with the
/// score head its own config.json asks for (a LoRA reward model's base is a language model).
fn load_adapter_base(dir: &Path, base: &str) -> Result<Model> {
    let p = Path::new(base);
    let p = if p.exists() {
        p.to_path_buf()
    } else {
        dir.join(p)
    };
    let base_dir = resolve_model_dir(&p).with_context(|| {
        format!(
            "loading the base model {base:?} of the adapter in {}",
            dir.display()
        )
    })?;
    let model = load_model(&base_dir)?;
    let own = dir.join(CONFIG_FILE);
    let score = if own.exists() {
        ModelConfig::load(&own)?.score_head
    } else {
        model.cfg.score_head
    };
    Ok(model.with_score_head(score))
}

/// Attaches the PEFT adapter in `dir` to `model` (freezing its base).
pub fn attach_peft(model: &mut Model, dir: &Path) -> Result<()> {
    let set = crate::lora::LoraSet::load_peft(dir, &model.cfg, &model.layout)?;
    model.attach_adapters(set)
}

pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Every tensor of a model directory's weights, and a name for them in messages.
pub fn read_weights(dir: &Path) -> Result<(Tensors, String)> {
    let single = dir.join(MODEL_FILE);
    let index = dir.join(INDEX_FILE);
    if single.exists() || !index.exists() {
        let bytes = read_checked(dir, MODEL_FILE)?;
        let what = single.display().to_string();
        return Ok((bytes_to_tensors(&bytes, &what)?, what));
    }
    let what = index.display().to_string();
    let v: serde_json::Value = serde_json::from_slice(&read_checked(dir, INDEX_FILE)?)
        .with_context(|| format!("{what}: not valid JSON"))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{what}: no \"weight_map\" object"))?;
    let mut files: Vec<&str> = Vec::new();
    for (name, f) in map {
        let f = f
            .as_str()
            .with_context(|| format!("{what}: weight_map entry {name:?} is not a file name"))?;
        if f.contains('/') || f.contains('\\') || f.starts_with('.') {
            bail!("{what}: weight_map entry {name:?} names {f:?}, not a file in this directory");
        }
        if !files.contains(&f) {
            files.push(f);
        }
    }
    files.sort_unstable();
    let mut tensors = Tensors::new();
    for f in &files {
        let path = dir.join(f);
        if !path.exists() {
            bail!(
                "{what} names the shard {f}, which is not in {} (an incomplete download?)",
                dir.display()
            );
        }
        let bytes = read_checked(dir, f)?;
        add_tensors(&mut tensors, &bytes, &path.display().to_string())?;
    }
    for (name, f) in map {
        if !tensors.contains_key(name) {
            bail!(
                "{what}: tensor {name} should be in {} but is not",
                f.as_str().unwrap_or("?")
            );
        }
    }
    Ok((tensors, what))
}

/// The files of a model-only checkpoint: weights and config; for a model with adapters, PEFT's
/// adapter files (and the config, so the directory loads as a model: see [`load_model`]).
pub fn model_files(model: &Model) -> Result<Vec<(String, Vec<u8>)>> {
    if let Some(set) = &model.lora {
        let base = set.base_model.clone().unwrap_or_default();
        return Ok(vec![
            (
                crate::lora::ADAPTER_FILE.to_string(),
                tensors_to_bytes(&set.peft_tensors())?,
            ),
            (
                crate::lora::ADAPTER_CONFIG_FILE.to_string(),
                serde_json::to_vec_pretty(&set.peft_config(&model.cfg, &base))?,
            ),
            (
                CONFIG_FILE.to_string(),
                serde_json::to_vec_pretty(&model.cfg.to_hf_json())?,
            ),
            (
                crate::lora::KILN_LORA_FILE.to_string(),
                serde_json::to_vec_pretty(
                    &serde_json::json!({"base_weights": set.cfg.base_weights.to_string()}),
                )?,
            ),
        ]);
    }
    Ok(vec![
        (MODEL_FILE.to_string(), model_to_bytes(model)?),
        (
            CONFIG_FILE.to_string(),
            serde_json::to_vec_pretty(&model.cfg.to_hf_json())?,
        ),
    ])
}

/// Resolves a user's `--model` path: a checkpoint directory, or a run directory whose `latest` file
/// names its newest checkpoint.
pub fn resolve_model_dir(path: &Path) -> Result<PathBuf> {
    if path.join(CONFIG_FILE).exists() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join("latest");
    if latest.exists() {
        let name = fs::read_to_string(&latest)?.trim().to_string();
        let p = path.join(name);
        if p.join(CONFIG_FILE).exists() && p.join(CHECKSUMS_FILE).exists() {
            return Ok(p);
        }
    }
    // No usable `latest`: the newest complete numbered checkpoint.
    if let Ok(entries) = fs::read_dir(path) {
        let newest = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let step: u64 = name.strip_prefix("ckpt-")?.parse().ok()?;
                let p = e.path();
                (p.join(CONFIG_FILE).exists() && p.join(CHECKSUMS_FILE).exists())
                    .then_some((step, p))
            })
            .max();
        if let Some((_, p)) = newest {
            return Ok(p);
        }
    }
    if !path.exists() {
        bail!("{}: no such model directory", path.display());
    }
    bail!(
        "{}: not a model directory (no config.json, and no 'latest' file naming a checkpoint)",
        path.display()
    )
}

impl Model {
    /// The same model with a scalar head added (zero-initialised) or removed, keeping every other tensor.
    pub fn with_score_head(self, score_head: bool) -> Model {
        if self.cfg.score_head == score_head {
            return self;
        }
        assert!(
            self.lora.is_none(),
            "add or remove the score head before attaching adapters"
        );
        let mut cfg = self.cfg.clone();
        cfg.score_head = score_head;
        let layout = crate::params::ParamLayout::new(&cfg);
        let mut params = vec![0.0f32; layout.total];
        for t in &layout.tensors {
            if let Some(old) = self.layout.get(&t.name) {
                params[t.range()].copy_from_slice(&self.params[old.range()]);
            }
        }
        let mut model = Model::from_params(cfg, params);
        model.precision = self.precision;
        model
    }
}
