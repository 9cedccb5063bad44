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

/// Defaults ← `user` (a TOML tree), checked against the config's fields.
pub fn from_value<T: Serialize + DeserializeOwned + Default>(user: Value) -> Result<T> {
    let mut v = Value::try_from(T::default())?;
    merge(&mut v, user);
    Ok(T::deserialize(v)?)
}

/// A config as TOML for people to read: f32 settings printed as the f32 they are (`lr = 0.003`,
/// not the f64 widening `0.003000000026077032`).
pub fn to_toml<T: Serialize>(cfg: &T) -> Result<String> {
    let mut v = Value::try_from(cfg)?;
    shorten_floats(&mut v);
    Ok(toml::to_string_pretty(&v)?)
}

/// TOML text in the form [`to_toml`] writes (so a file written before that form compares equal).
pub fn normalize_toml(text: &str) -> Option<String> {
    let mut v: Value = Value::Table(toml::from_str(text).ok()?);
    shorten_floats(&mut v);
    toml::to_string_pretty(&v).ok()
}

fn shorten_floats(v: &mut Value) {
    match v {
        Value::Float(x) => {
            let f = *x as f32;
            // Only values that are exactly an f32 came from one; others stay as they are.
            if f as f64 == *x && f.is_finite() {
                if let Ok(short) = f.to_string().parse::<f64>() {
                    *x = short;
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(shorten_floats),
        Value::Table(t) => t.iter_mut().for_each(|(_, v)| shorten_floats(v)),
        _ => {}
    }
}

#[cfg(test)]
mod float_tests {
    #[derive(serde::Serialize)]
    struct C {
        lr: f32,
        beta1: f32,
        exact: f64,
        n: u32,
    }

    #[test]
    fn f32_settings_print_as_written() {
        let t = super::to_toml(&C {
            lr: 3e-3,
            beta1: 0.9,
            exact: 0.1,
            n: 3,
        })
        .unwrap();
        assert!(t.contains("lr = 0.003\n"), "{t}");
        assert!(t.contains("beta1 = 0.9\n"), "{t}");
        assert!(t.contains("exact = 0.1\n"), "{t}");
        // And it reads back to the same f32.
        let v: toml::Table = toml::from_str(&t).unwrap();
        assert_eq!(v["lr"].as_float().unwrap() as f32, 3e-3f32);
    }
}
