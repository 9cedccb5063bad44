//! What a pipeline run produced, as the report reads it: each stage's result (`done.json`) and
//! every model's held-out evaluation. Stages write results; the report only reads them.

use crate::heldout::ModelEval;
use crate::spec::PipelineConfig;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A stage's result, written as `done.json` in its run directory when it completes.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
pub struct StageResult {
    pub stage: String,
    pub seconds: f64,
    pub metrics_start: kiln_train::Metrics,
    pub metrics_end: kiln_train::Metrics,
    pub extra: serde_json::Value,
}

impl StageResult {
    pub fn save(&self, out: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self)?;
        Ok(kiln_data::atomic_write(&out.join("done.json"), |w| {
            w.write_all(&bytes)
        })?)
    }
    pub fn load(out: &Path) -> Option<StageResult> {
        serde_json::from_slice(&std::fs::read(out.join("done.json")).ok()?).ok()
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
