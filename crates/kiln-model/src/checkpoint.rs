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

use rayon::prelude::*;

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

/// A tensor's values where they lie: f32 already, or a safetensors file's little-endian F32,
/// BF16 or F16 bytes (read in place from a memory-mapped file, converted as they are copied).
#[derive(Clone, Copy)]
pub enum Values<'a> {
    F32(&'a [f32]),
    Le(Dtype, &'a [u8]),
}

impl Values<'_> {
    fn of<'a>(view: &TensorView<'a>, name: &str, what: &str) -> Result<Values<'a>> {
        match view.dtype() {
            d @ (Dtype::F32 | Dtype::BF16 | Dtype::F16) => Ok(Values::Le(d, view.data())),
            other => {
                bail!("{what}: tensor {name} has dtype {other:?}; Kiln reads F32, BF16 and F16")
            }
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::Le(Dtype::F32, b) => b.len() / 4,
            Values::Le(_, b) => b.len() / 2,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All the values as f32, into `dst` (of the same length).
    pub fn copy_to(&self, dst: &mut [f32]) {
        assert_eq!(dst.len(), self.len(), "Values::copy_to: length mismatch");
        self.copy_into(0, dst);
    }

    /// Values `start..start + dst.len()` as f32, into `dst`.
    fn copy_into(&self, start: usize, dst: &mut [f32]) {
        let n = dst.len();
        match *self {
            Values::F32(v) => dst.copy_from_slice(&v[start..start + n]),
            Values::Le(Dtype::F32, b) => {
                for (d, c) in dst
                    .iter_mut()
                    .zip(b[4 * start..4 * (start + n)].chunks_exact(4))
                {
                    *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Values::Le(Dtype::BF16, b) => {
                for (d, c) in dst
                    .iter_mut()
                    .zip(b[2 * start..2 * (start + n)].chunks_exact(2))
                {
                    *d = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            Values::Le(_, b) => {
                for (d, c) in dst
                    .iter_mut()
                    .zip(b[2 * start..2 * (start + n)].chunks_exact(2))
                {
                    *d = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        }
    }

    fn to_vec(self) -> Vec<f32> {
        let mut v = vec![0.0; self.len()];
        self.copy_into(0, &mut v);
        v
    }
}

/// Named tensors read in place from safetensors buffers: name → (shape, values).
pub type TensorViews<'a> = BTreeMap<String, (Vec<usize>, Values<'a>)>;

/// Where [`params_from_tensors`] finds tensors: values already read, or views of mapped files.
pub trait TensorSource {
    fn tensor(&self, name: &str) -> Option<(&[usize], Values<'_>)>;
    /// Values held in all (checked against the size a config implies before laying it out).
    fn total_values(&self) -> usize;
    /// Every tensor's name.
    fn names(&self) -> Vec<String>;
}

impl TensorSource for Tensors {
    fn tensor(&self, name: &str) -> Option<(&[usize], Values<'_>)> {
        self.get(name).map(|(s, d)| (s.as_slice(), Values::F32(d)))
    }
    fn total_values(&self) -> usize {
        self.values().map(|(_, d)| d.len()).sum()
    }
    fn names(&self) -> Vec<String> {
        self.keys().cloned().collect()
    }
}

impl TensorSource for TensorViews<'_> {
    fn tensor(&self, name: &str) -> Option<(&[usize], Values<'_>)> {
        self.get(name).map(|(s, d)| (s.as_slice(), *d))
    }
    fn total_values(&self) -> usize {
        self.values().map(|(_, d)| d.len()).sum()
    }
    fn names(&self) -> Vec<String> {
        self.keys().cloned().collect()
    }
}

/// Views of every tensor of a safetensors buffer (F32, BF16 or F16), nothing copied.
pub fn bytes_to_views<'a>(bytes: &'a [u8], what: &str) -> Result<TensorViews<'a>> {
    let mut out = TensorViews::new();
    add_views(&mut out, bytes, what)?;
    Ok(out)
}

/// Views of every tensor of a safetensors buffer, added to `out` (nothing is copied).
fn add_views<'a>(out: &mut TensorViews<'a>, bytes: &'a [u8], what: &str) -> Result<()> {
    let st = SafeTensors::deserialize(bytes)
        .with_context(|| format!("{what}: not a valid safetensors file (truncated or corrupt?)"))?;
    for (name, view) in st.tensors() {
        let values = Values::of(&view, &name, what)?;
        out.insert(name, (view.shape().to_vec(), values));
    }
    Ok(())
}

/// Reads every tensor of a safetensors buffer as f32 (F32, BF16 and F16 accepted: half-precision
/// checkpoints become f32 master weights).
pub fn bytes_to_tensors(bytes: &[u8], what: &str) -> Result<Tensors> {
    let mut out = BTreeMap::new();
    add_tensors(&mut out, bytes, what)?;
    Ok(out)
}

fn add_tensors(out: &mut Tensors, bytes: &[u8], what: &str) -> Result<()> {
    let mut views = TensorViews::new();
    add_views(&mut views, bytes, what)?;
    for (name, (shape, values)) in views {
        out.insert(name, (shape, values.to_vec()));
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
fn lookup<'a, S: TensorSource>(tensors: &'a S, name: &str) -> Option<(&'a [usize], Values<'a>)> {
    tensors.tensor(name).or_else(|| {
        let bare = name
            .strip_prefix("transformer.")
            .or_else(|| name.strip_prefix("model."))?;
        tensors.tensor(bare)
    })
}

/// Fills a flat buffer in `cfg`'s layout from the family's checkpoint tensors (see [`hf_tensors`]).
/// Ignores what Kiln does not use (attention-mask buffers, a tied `lm_head.weight`, rotary caches).
pub fn params_from_tensors<S: TensorSource>(
    cfg: &ModelConfig,
    tensors: &S,
    what: &str,
) -> Result<Vec<f32>> {
    // A config read from a damaged or foreign file can imply any size: check it against what the
    // file holds before laying it out (which allocates and loops per layer).
    let held = tensors.total_values();
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
            if shape != want.as_slice() {
                bail!(
                    "{what}: tensor {} has shape {:?}, but config.json implies {:?} (checkpoint of another architecture?)",
                    part.name,
                    shape,
                    want
                );
            }
            if t.shape.len() == 1 {
                data.copy_into(0, &mut dst[col..col + w]);
            } else if part.transposed {
                copy_transposed(dst, cols_total, col, data, w, rows);
            } else {
                dst.par_chunks_mut(cols_total)
                    .enumerate()
                    .for_each(|(r, row)| data.copy_into(r * w, &mut row[col..col + w]));
            }
            col += w;
        }
    }
    Ok(params)
}

/// Columns `col..col + w` of `dst` (`rows` rows of `cols_total`) from `src` stored transposed
/// (`w` rows of `rows`: a Hugging Face `[out, in]` Linear weight into Kiln's `[in, out]`), in tiles
/// of [`TILE`] x [`TILE`] so that both sides move in whole cache lines, a band of rows per task.
fn copy_transposed(
    dst: &mut [f32],
    cols_total: usize,
    col: usize,
    src: Values,
    w: usize,
    rows: usize,
) {
    dst[..rows * cols_total]
        .par_chunks_mut(TILE * cols_total)
        .enumerate()
        .for_each(|(band, out)| {
            let (r0, nr) = (band * TILE, out.len() / cols_total);
            let mut tile = [0.0f32; TILE * TILE];
            for a0 in (0..w).step_by(TILE) {
                let na = (w - a0).min(TILE);
                for a in 0..na {
                    src.copy_into((a0 + a) * rows + r0, &mut tile[a * TILE..a * TILE + nr]);
                }
                for r in 0..nr {
                    let row = &mut out[r * cols_total + col + a0..][..na];
                    for (a, d) in row.iter_mut().enumerate() {
                        *d = tile[a * TILE + r];
                    }
                }
            }
        });
}

/// Side of [`copy_transposed`]'s tiles.
const TILE: usize = 32;

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
    verify_checksum(dir, fname, &bytes)?;
    Ok(bytes)
}

/// Checks a checkpoint file's bytes against `checksums.json` when the directory has one.
fn verify_checksum(dir: &Path, fname: &str, bytes: &[u8]) -> Result<()> {
    let sums_path = dir.join(CHECKSUMS_FILE);
    if sums_path.exists() {
        let sums: BTreeMap<String, String> = serde_json::from_slice(&fs::read(&sums_path)?)
            .with_context(|| format!("{}: not valid JSON", sums_path.display()))?;
        if let Some(expected) = sums.get(fname) {
            if &sha256_hex(bytes) != expected {
                bail!(
                    "{}: checksum mismatch (the file is corrupt or was changed after the checkpoint was written)",
                    dir.join(fname).display()
                );
            }
        }
    }
    Ok(())
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
    let files = WeightFiles::map(dir)?;
    let params = params_from_tensors(&cfg, &files.views()?, &files.what)?;
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

/// One file of a checkpoint directory, memory-mapped, checked against `checksums.json` when
/// present: its bytes are read in place, from the page cache, never copied onto the heap.
pub fn map_checked(dir: &Path, fname: &str) -> Result<memmap2::Mmap> {
    let path = dir.join(fname);
    let file = fs::File::open(&path).with_context(|| format!("reading {}", path.display()))?;
    // SAFETY: the file must not change while it is mapped. Kiln replaces checkpoints by renaming
    // a new directory into place, never rewriting a file, and a model directory is read-only
    // input otherwise (the mapping ends when the weights are copied out).
    let map = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("reading {}", path.display()))?;
    verify_checksum(dir, fname, &map)?;
    Ok(map)
}

/// A model directory's weight files, memory-mapped: one `model.safetensors`, or the shards that
/// `model.safetensors.index.json` lists. Loading copies each tensor from them straight into the
/// model's layout (converting BF16 / F16, transposing), so the weights are held once on the heap
/// while loading, not three times (file bytes, f32 tensors, layout).
pub struct WeightFiles {
    /// Each file with its path (for messages).
    files: Vec<(memmap2::Mmap, String)>,
    /// The index's tensor → shard entries (none for a single file).
    index: Vec<(String, String)>,
    /// The weights' name in messages: the file, or the index.
    pub what: String,
}

impl WeightFiles {
    pub fn map(dir: &Path) -> Result<Self> {
        let single = dir.join(MODEL_FILE);
        let index_path = dir.join(INDEX_FILE);
        if single.exists() || !index_path.exists() {
            let what = single.display().to_string();
            let files = vec![(map_checked(dir, MODEL_FILE)?, what.clone())];
            return Ok(Self {
                files,
                index: Vec::new(),
                what,
            });
        }
        let what = index_path.display().to_string();
        let v: serde_json::Value = serde_json::from_slice(&read_checked(dir, INDEX_FILE)?)
            .with_context(|| format!("{what}: not valid JSON"))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{what}: no \"weight_map\" object"))?;
        let mut names: Vec<&str> = Vec::new();
        let mut index = Vec::new();
        for (name, f) in map {
            let f = f
                .as_str()
                .with_context(|| format!("{what}: weight_map entry {name:?} is not a file name"))?;
            if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                bail!(
                    "{what}: weight_map entry {name:?} names {f:?}, not a file in this directory"
                );
            }
            if !names.contains(&f) {
                names.push(f);
            }
            index.push((name.clone(), f.to_string()));
        }
        names.sort_unstable();
        let mut files = Vec::new();
        for f in &names {
            let path = dir.join(f);
            if !path.exists() {
                bail!(
                    "{what} names the shard {f}, which is not in {} (an incomplete download?)",
                    dir.display()
                );
            }
            files.push((map_checked(dir, f)?, path.display().to_string()));
        }
        Ok(Self { files, index, what })
    }

    /// Every tensor of every file, in place; each tensor the index lists must be there.
    pub fn views(&self) -> Result<TensorViews<'_>> {
        let mut views = TensorViews::new();
        for (map, what) in &self.files {
            add_views(&mut views, map, what)?;
        }
        for (name, f) in &self.index {
            if !views.contains_key(name) {
                bail!("{}: tensor {name} should be in {f} but is not", self.what);
            }
        }
        Ok(views)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiled, threaded transpose out of each stored dtype equals the plain element loop, on
    /// shapes that leave partial tiles at every edge, into a block of columns of a wider matrix.
    #[test]
    fn transposed_copies_equal_the_element_loop() {
        let mut state = 7u32;
        let mut next = || {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for &(rows, w, col, extra) in &[(1, 1, 0, 0), (37, 5, 2, 3), (64, 96, 0, 0), (70, 45, 7, 1)]
        {
            let cols_total = col + w + extra;
            let src: Vec<f32> = (0..w * rows).map(|_| next()).collect();
            let bf: Vec<u8> = src
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect();
            let hf: Vec<u8> = src
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect();
            let f: Vec<u8> = src.iter().flat_map(|x| x.to_le_bytes()).collect();
            let sources = [
                Values::F32(&src),
                Values::Le(Dtype::F32, &f),
                Values::Le(Dtype::BF16, &bf),
                Values::Le(Dtype::F16, &hf),
            ];
            for v in sources {
                let values = v.to_vec();
                let mut want = vec![-1.0f32; rows * cols_total];
                for a in 0..w {
                    for r in 0..rows {
                        want[r * cols_total + col + a] = values[a * rows + r];
                    }
                }
                let mut got = vec![-1.0f32; rows * cols_total];
                copy_transposed(&mut got, cols_total, col, v, w, rows);
                assert_eq!(got, want, "{rows} x {w} at column {col} of {cols_total}");
            }
        }
    }
}
