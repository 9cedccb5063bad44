//! The whole plan checked before the first stage (`kiln pipeline check`, and the start of every
//! `kiln pipeline run`): every input file exists and parses (its format detected and named),
//! bad records are counted, the settings fit together (how many records each stage would drop as
//! too long for the model's context, in real tokens), and the output folder is writable. Every
//! problem is listed at once, with its file and field, so a user fixes them in one go instead of
//! meeting them one stage at a time.

use crate::spec::{Method, PipelineConfig};
use anyhow::Result;
use kiln_data::chat_format::ChatFormat;
use kiln_data::datasets::{load_preferences, load_prompts, load_sft, FieldMap, LoadOptions};
use kiln_data::template::ChatTemplate;
use kiln_data::Tokenizer;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What the check found: notes (what will happen) and problems (what must be fixed first).
#[derive(Default)]
pub struct CheckReport {
    pub notes: Vec<String>,
    pub problems: Vec<String>,
    /// The tokenizer the check trained to count tokens (the run reuses it).
    pub tokenizer: Option<Tokenizer>,
}

impl CheckReport {
    fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }
    fn problem(&mut self, s: impl Into<String>) {
        self.problems.push(s.into());
    }

    /// Prints the notes (the problems are the error of [`CheckReport::into_result`]).
    pub fn print(&self) {
        for n in &self.notes {
            eprintln!("[check] {n}");
        }
    }

    /// An error listing every problem, or Ok when there are none.
    pub fn into_result(self) -> Result<()> {
        if self.problems.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = self.problems.iter().map(|p| format!("  - {p}")).collect();
        anyhow::bail!(
            "the pipeline's plan has {} problem{} (nothing was trained):\n{}",
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" },
            list.join("\n")
        )
    }
}

/// The record format of a dataset file, from its first record's fields.
fn describe(path: &Path) -> String {
    let container = match path.extension().and_then(|e| e.to_str()) {
        Some("parquet") => return "Parquet".into(),
        Some("gz") => "gzip-compressed ",
        _ => "",
    };
    let text = match kiln_data::datasets::read_text(path) {
        Ok(t) => t.chars().take(1 << 16).collect::<String>(),
        Err(_) => return format!("{container}file"),
    };
    let t = text.trim_start();
    let (kind, first) = match t.strip_prefix('[') {
        Some(rest) => ("JSON array", rest.trim_start()),
        None => ("JSONL", t),
    };
    // The first record's keys, read leniently (the record may be cut by the prefix).
    let keys: Vec<&str> = [
        "instruction",
        "messages",
        "conversations",
        "chosen",
        "responses",
        "ranks",
        "scores",
        "choices",
        "prompt",
        "text",
        "response_j",
    ]
    .into_iter()
    .filter(|k| {
        let head = &first[..first.len().min(
            first
                .find('}')
                .map_or(first.len(), |i| i + 1)
                .max(400)
                .min(first.len()),
        )];
        head.contains(&format!("\"{k}\""))
    })
    .collect();
    let records = if keys.contains(&"instruction") {
        "Alpaca records"
    } else if keys.contains(&"messages") {
        "chat records"
    } else if keys.contains(&"conversations") {
        "ShareGPT records"
    } else if keys.contains(&"response_j") {
        "Stack Exchange pairs"
    } else if keys.contains(&"chosen") {
        if first.contains("Human:") {
            "HH-RLHF pairs"
        } else {
            "pairwise records"
        }
    } else if keys.contains(&"ranks") || keys.contains(&"choices") {
        "ranking records"
    } else if keys.contains(&"scores") {
        "scored records"
    } else if keys.contains(&"prompt") {
        "prompt records"
    } else if keys.contains(&"text") {
        "text records"
    } else {
        "records"
    };
    format!("{container}{kind} of {records}")
}

/// A dataset loaded twice if need be: strictly (as the stage will) and, when that fails on a
/// record, leniently to count the bad ones.
fn check_data<T>(
    rep: &mut CheckReport,
    key: &str,
    path: &Path,
    skip_bad: bool,
    fields: &FieldMap,
    load: impl Fn(
        &Path,
        &LoadOptions,
    ) -> Result<kiln_data::datasets::Loaded<T>, kiln_data::datasets::DataError>,
) -> Option<Vec<T>> {
    if !path.exists() {
        rep.problem(format!("{key} = {}: no such file", path.display()));
        return None;
    }
    let what = describe(path);
    let opts = |skip_bad| LoadOptions {
        skip_bad,
        fields: fields.clone(),
    };
    match load(path, &opts(skip_bad)) {
        Ok(l) => {
            let bad = if l.skipped > 0 {
                format!(
                    "; {} bad records will be skipped (first: {})",
                    l.skipped,
                    l.first_error.unwrap_or_default()
                )
            } else {
                String::new()
            };
            rep.note(format!(
                "{key} = {}: {what}, {} records{bad}",
                path.display(),
                l.records.len()
            ));
            Some(l.records)
        }
        Err(e) if e.record.is_some() && !skip_bad => {
            let lenient = load(path, &opts(true)).ok();
            let count = lenient
                .map(|l| {
                    format!(
                        " ({} of {} records are bad)",
                        l.skipped,
                        l.skipped + l.records.len()
                    )
                })
                .unwrap_or_default();
            let stage = key.split('.').next().unwrap_or(key);
            rep.problem(format!(
                "{key}: {e}{count}; fix the file or set {stage}.skip_bad_records = true to skip bad records"
            ));
            None
        }
        Err(e) => {
            rep.problem(format!(
                "{key} = {}: {e} (looked like {what})",
                path.display()
            ));
            None
        }
    }
}

/// Reports how many of `n` rendered items exceed the limit; a problem when all do.
fn lengths(rep: &mut CheckReport, key: &str, n: usize, dropped: usize, limit: usize) {
    if n == 0 {
        return;
    }
    if dropped == n {
        rep.problem(format!(
            "{key}: every one of the {n} records is longer than the context ({limit} tokens): raise pretrain.model.n_ctx or shorten the data"
        ));
    } else if dropped > 0 {
        rep.note(format!(
            "{key}: {dropped} of {n} records longer than {limit} tokens will be skipped"
        ));
    }
}

fn writable(rep: &mut CheckReport, out: &Path) {
    let probe = || -> std::io::Result<()> {
        std::fs::create_dir_all(out)?;
        let f = tempfile::NamedTempFile::new_in(out)?;
        drop(f);
        Ok(())
    };
    if let Err(e) = probe() {
        rep.problem(format!(
            "out = {}: not a writable folder ({e})",
            out.display()
        ));
    }
}

/// Checks a pipeline file: its TOML and keys (every unknown key named), then [`check`].
pub fn check_file(path: &Path) -> CheckReport {
    let mut rep = CheckReport::default();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            rep.problem(format!("{}: cannot read ({e})", path.display()));
            return rep;
        }
    };
    let mut table: toml::Table = match toml::from_str(&text) {
        Ok(t) => t,
        Err(e) => {
            rep.problem(format!("{}: invalid TOML: {e}", path.display()));
            return rep;
        }
    };
    // Unknown keys are removed one at a time, so the rest of the file is still checked.
    for _ in 0..32 {
        match PipelineConfig::from_table(table.clone(), path) {
            Ok(cfg) => {
                let mut r = check(&cfg).unwrap_or_else(|e| {
                    let mut r = CheckReport::default();
                    r.problem(format!("{e:#}"));
                    r
                });
                rep.notes.append(&mut r.notes);
                rep.problems.append(&mut r.problems);
                rep.tokenizer = r.tokenizer;
                return rep;
            }
            Err(e) => {
                let msg = format!("{e:#}");
                let unknown = msg
                    .split("unknown field `")
                    .nth(1)
                    .and_then(|s| s.split('`').next())
                    .map(str::to_string);
                let bare =
                    crate::config::from_value::<PipelineConfig>(toml::Value::Table(table.clone()))
                        .err()
                        .map(|e| format!("{e:#}"))
                        .unwrap_or_default();
                match unknown.and_then(|k| remove_key(&mut table, &k, &bare).map(|p| (k, p))) {
                    Some((_, where_)) => {
                        rep.problem(format!("{}: unknown key `{where_}`", path.display()))
                    }
                    None => {
                        rep.problem(msg);
                        return rep;
                    }
                }
            }
        }
    }
    rep
}

/// Dotted paths of every key named `key` in `v`.
fn key_paths(v: &toml::Value, key: &str, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match v {
        toml::Value::Table(t) => {
            for (k, child) in t {
                path.push(k.clone());
                if k == key {
                    out.push(path.clone());
                }
                key_paths(child, key, path, out);
                path.pop();
            }
        }
        toml::Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                path.push(format!("[{i}]"));
                key_paths(child, key, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn remove_at(v: &mut toml::Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for p in parents {
        let next = match cur {
            toml::Value::Table(t) => t.get_mut(p),
            toml::Value::Array(a) => p
                .trim_matches(|c| c == '[' || c == ']')
                .parse::<usize>()
                .ok()
                .and_then(|i| a.get_mut(i)),
            _ => None,
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    if let toml::Value::Table(t) = cur {
        t.remove(last);
    }
}

/// Finds which key named `key` the configuration does not know (the one whose removal changes
/// the error), removes it and returns its dotted path.
fn remove_key(t: &mut toml::Table, key: &str, error: &str) -> Option<String> {
    let v = toml::Value::Table(t.clone());
    let mut paths = Vec::new();
    key_paths(&v, key, &mut Vec::new(), &mut paths);
    for p in paths {
        let mut c = v.clone();
        remove_at(&mut c, &p);
        let changed = match crate::config::from_value::<PipelineConfig>(c.clone()) {
            Ok(_) => true,
            Err(e) => format!("{e:#}") != error,
        };
        if changed {
            if let toml::Value::Table(back) = c {
                *t = back;
            }
            return Some(p.join(".").replace(".[", "["));
        }
    }
    None
}

/// Checks a parsed pipeline configuration.
pub fn check(cfg: &PipelineConfig) -> Result<CheckReport> {
    let mut rep = CheckReport::default();
    writable(&mut rep, &cfg.out);
    // The corpus.
    if cfg.corpus.input.is_empty() {
        rep.problem("corpus.input names no files (the text to pretrain on)");
    }
    let mut corpus_ok = !cfg.corpus.input.is_empty();
    for p in &cfg.corpus.input {
        if !p.exists() {
            rep.problem(format!(
                "corpus.input = {}: no such file or folder",
                p.display()
            ));
            corpus_ok = false;
        }
    }
    if let Some(j) = &cfg.judge {
        for (k, p) in [("judge.world", &j.world), ("judge.prompts", &j.prompts)] {
            if !p.exists() {
                rep.problem(format!("{k} = {}: no such file", p.display()));
            }
        }
    }
    // The plan: which stage gets what (also checks the branches' settings fit together).
    if let Err(e) = cfg.plan() {
        rep.problem(format!("{e:#}"));
    }
    // Data files, parsed as their stage will.
    if cfg.sft.data.is_empty() {
        rep.problem("sft.data names no files (instruction or chat data)");
    }
    let sft_skip = cfg.sft.skip_bad_records;
    let mut convs = Vec::new();
    for (i, p) in cfg.sft.data.iter().enumerate() {
        let key = format!("sft.data[{i}]");
        if let Some(r) = check_data(&mut rep, &key, p, sft_skip, &cfg.sft.fields, load_sft) {
            convs.extend(r);
        }
    }
    if let Some(v) = &cfg.sft.val_data {
        let f = &cfg.sft.fields;
        check_data(&mut rep, "sft.val_data", v, sft_skip, f, load_sft);
    }
    let rm_skip = cfg.rm.skip_bad_records;
    let mut prefs = Vec::new();
    for (i, p) in cfg.rm.data.iter().enumerate() {
        if let Some(r) = check_data(
            &mut rep,
            &format!("rm.data[{i}]"),
            p,
            rm_skip,
            &cfg.rm.fields,
            load_preferences,
        ) {
            prefs.push((format!("rm.data[{i}]"), r));
        }
    }
    for (k, v) in [
        ("rm.val_data", &cfg.rm.val_data),
        ("rm.test_data", &cfg.rm.test_data),
    ] {
        if let Some(v) = v {
            check_data(&mut rep, k, v, rm_skip, &cfg.rm.fields, load_preferences);
        }
    }
    // Prompt files with the column mapping they are read with.
    let mut prompt_files: Vec<(String, PathBuf, FieldMap, bool)> = Vec::new();
    let rl_skip = crate::spec::rl_skip_bad_records(cfg);
    if let Some(p) = &cfg.prompts {
        prompt_files.push(("prompts".into(), p.clone(), FieldMap::NONE, rl_skip));
    }
    if let Some(p) = &cfg.eval.prompts {
        prompt_files.push(("eval.prompts".into(), p.clone(), FieldMap::NONE, false));
    }
    for b in &cfg.branch {
        match &b.method {
            Method::Dpo(d) => {
                for (i, p) in d.data.iter().enumerate() {
                    let key = format!("branch {}: data[{i}]", b.name);
                    let (skip, f) = (d.skip_bad_records, &d.fields);
                    if let Some(r) = check_data(&mut rep, &key, p, skip, f, load_preferences) {
                        prefs.push((key, r));
                    }
                }
            }
            Method::Ppo(c) if c.prompts != crate::stages::PpoStageConfig::default().prompts => {
                let key = format!("branch {}: prompts", b.name);
                prompt_files.push((key, c.prompts.clone(), c.fields.clone(), c.skip_bad_records));
            }
            Method::Grpo(g) if g.prompts != crate::stages::GrpoStageConfig::default().prompts => {
                let key = format!("branch {}: prompts", b.name);
                prompt_files.push((key, g.prompts.clone(), g.fields.clone(), g.skip_bad_records));
            }
            _ => {}
        }
    }
    let mut prompts = Vec::new();
    for (k, p, f, skip) in &prompt_files {
        if let Some(r) = check_data(&mut rep, k, p, *skip, f, load_prompts) {
            prompts.push((k.clone(), r));
        }
    }
    // Lengths in tokens: the tokenizer the run will train (deterministic), trained now if need be.
    let tok_path = cfg.out.join("tokenizer").join("tokenizer.json");
    let tok = if cfg.out.join("tokenizer").join("done.json").exists() {
        Tokenizer::load(&tok_path).ok()
    } else if corpus_ok {
        let t0 = Instant::now();
        match Tokenizer::train_with_stats(
            &cfg.corpus.input,
            &cfg.corpus.field,
            cfg.corpus.vocab_size,
        ) {
            Ok((t, _)) => {
                rep.note(format!(
                    "tokenizer of {} tokens trained in {:.1}s to count the data's tokens",
                    t.vocab_size(),
                    t0.elapsed().as_secs_f64()
                ));
                Some(t)
            }
            Err(e) => {
                rep.problem(format!("corpus: {e:#}"));
                None
            }
        }
    } else {
        None
    };
    if let Some(tok) = &tok {
        let n_ctx = cfg.pretrain.model.n_ctx;
        let template = match &cfg.sft.template {
            Some(p) if p.extension().is_some_and(|e| e == "jinja") => None,
            Some(p) => std::fs::read_to_string(p)
                .ok()
                .and_then(|t| ChatTemplate::from_json(&t).ok()),
            None => Some(ChatTemplate::default()),
        };
        match template.map(|t| crate::bundle::chat_format(tok, &t, None)) {
            Some(Ok(Some(chat))) => {
                let chat: &dyn ChatFormat = chat.as_ref();
                let seq = if cfg.sft.seq_len == 0 {
                    n_ctx
                } else {
                    cfg.sft.seq_len.min(n_ctx)
                };
                if let Ok((kept, dropped)) =
                    kiln_train::sft::render_examples_with(chat, &convs, seq)
                {
                    lengths(&mut rep, "sft.data", kept.len() + dropped, dropped, seq);
                }
                for (key, records) in &prefs {
                    if let Ok((kept, dropped)) =
                        kiln_train::rm::render_groups_with(chat, records, n_ctx)
                    {
                        lengths(&mut rep, key, kept.len() + dropped, dropped, n_ctx);
                    }
                }
                for (key, records) in &prompts {
                    let dropped = records
                        .iter()
                        .filter(|r| {
                            chat.render_prompt(&r.prompt)
                                .map_or(true, |t| t.len() >= n_ctx)
                        })
                        .count();
                    lengths(&mut rep, key, records.len(), dropped, n_ctx);
                }
            }
            Some(Err(e)) => rep.problem(format!("sft.template: {e:#}")),
            _ => rep.note("lengths not checked: a Jinja template is counted when SFT starts"),
        }
    }
    if let Err(e) = cfg
        .pretrain
        .model
        .config(cfg.corpus.vocab_size, kiln_model::Arch::Decoder)
    {
        rep.problem(format!("pretrain.model: {e:#}"));
    }
    rep.tokenizer = tok;
    Ok(rep)
}
