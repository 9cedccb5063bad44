//! Stage configs from layers: the defaults, then a TOML file, then `--set key.path=value` and the
//! command's own flags, all through one mechanism (dotted paths into the TOML tree).

use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;
use toml::Value;

/// Overrides collected from flags: (dotted path, value).
#[derive(Default)]
pub struct Overrides(pub Vec<(String, Value)>);

impl Overrides {
    pub fn set(&mut self, key: &str, v: impl Into<Value>) {
        self.0.push((key.to_string(), v.into()));
    }
    pub fn opt<T: Into<Value>>(&mut self, key: &str, v: Option<T>) {
        if let Some(v) = v {
            self.set(key, v);
        }
    }
    pub fn path(&mut self, key: &str, v: &Option<std::path::PathBuf>) {
        if let Some(p) = v {
            self.set(key, p.display().to_string());
        }
    }
    pub fn paths(&mut self, key: &str, v: &[std::path::PathBuf]) {
        if !v.is_empty() {
            self.set(
                key,
                Value::Array(
                    v.iter()
                        .map(|p| Value::String(p.display().to_string()))
                        .collect(),
                ),
            );
        }
    }
    /// `--set a.b=value`: the value is read as a TOML literal (number, bool, array...), else a string.
    pub fn parse_sets(&mut self, sets: &[String]) -> Result<()> {
        for s in sets {
            let Some((k, v)) = s.split_once('=') else {
                bail!("--set {s}: expected key=value (for example train.lr=3e-4)");
            };
            let value = toml::from_str::<toml::Table>(&format!("x = {v}"))
                .ok()
                .and_then(|mut t| t.remove("x"))
                .unwrap_or_else(|| Value::String(v.to_string()));
            self.set(k.trim(), value);
        }
        Ok(())
    }
}

fn merge(base: &mut Value, top: Value) {
    match (base, top) {
        (Value::Table(b), Value::Table(t)) => {
            for (k, v) in t {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

fn set_path(root: &mut Value, key: &str, v: Value) -> Result<()> {
    let mut cur = root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        let Value::Table(t) = cur else {
            bail!("setting {key}: {} is not a table", parts[..i].join("."))
        };
        if i + 1 == parts.len() {
            t.insert(p.to_string(), v);
            return Ok(());
        }
        cur = t
            .entry(p.to_string())
            .or_insert_with(|| Value::Table(Default::default()));
    }
    Ok(())
}

/// Defaults ← TOML file ← overrides, checked against the config's fields (unknown keys are errors).
pub fn build<T: Serialize + DeserializeOwned + Default>(
    file: Option<&Path>,
    overrides: Overrides,
) -> Result<T> {
    let mut v = Value::try_from(T::default())?;
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("reading config {}", f.display()))?;
        let t: toml::Table =
            toml::from_str(&text).with_context(|| format!("{}: invalid TOML", f.display()))?;
        merge(&mut v, Value::Table(t));
    }
    for (k, val) in overrides.0 {
        set_path(&mut v, &k, val)?;
    }
    let what = file
        .map(|f| f.display().to_string())
        .unwrap_or_else(|| "flags".into());
    T::deserialize(v).with_context(|| format!("invalid configuration ({what})"))
}
