//! The pipeline driven from Rust, without the `kiln` binary: the tiny demo through every branch,
//! the plan check on a file with several mistakes, and a run on the real samples in
//! `../shared/data` with no judge.

use kiln_demo::Size;
use kiln_model::Family;
use kiln_pipeline::check::check_file;
use kiln_pipeline::pipeline::{
    demo_config, demo_data, run_pipeline_config, Branch, Method, PipelineConfig,
};
use kiln_pipeline::stages::{DpoConfig, GrpoStageConfig, ModelShape, PpoStageConfig};
use std::path::{Path, PathBuf};

#[test]
fn tiny_demo_runs_every_branch_from_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let data = demo_data(&out, 7, Size::Tiny).unwrap();
    let cfg = demo_config(&data, &out, Size::Tiny, 7, Family::Llama);
    let run = run_pipeline_config(&cfg, false).unwrap();
    let names: Vec<&str> = run.branches.iter().map(|b| b.0.as_str()).collect();
    assert_eq!(names, ["ppo", "dpo", "grpo"]);
    // Every model answered the same held-out prompts, judged and scored by the reward model.
    let models: Vec<&str> = run.evals.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(models, ["pretrained", "SFT", "ppo", "dpo", "grpo"]);
    let n = run.evals[0].answers.len();
    assert!(n > 0);
    for e in &run.evals {
        assert_eq!(e.answers.len(), n, "{}", e.name);
        assert!(e.metrics.contains_key("accuracy") && e.metrics.contains_key("rm_score"));
        assert!(e
            .answers
            .iter()
            .all(|a| a.correct.is_some() && a.rm_score.is_some()));
        assert_eq!(
            e.name != "pretrained" && e.name != "SFT",
            e.metrics.contains_key("kl_sft"),
            "{}",
            e.name
        );
    }
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    for b in ["ppo", "dpo", "grpo"] {
        for k in [
            "accuracy",
            "accuracy_ci95",
            "rm_score",
            "kl_heldout",
            "seconds",
            "tokens_trained",
        ] {
            assert!(
                summary[b][k].is_number(),
                "summary.json lacks {b}.{k}: {}",
                summary[b]
            );
        }
    }
    assert!(summary["ppo"]["tokens_sampled"].as_f64().unwrap() > 0.0);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for row in [
        "| ppo | RM + PPO |",
        "| dpo | DPO |",
        "| grpo | GRPO |",
        "| SFT | SFT |",
    ] {
        assert!(report.contains(row), "report lacks {row}:\n{report}");
    }
    assert!(report.contains("Answers side by side") && report.contains("Accuracy per task kind"));
    for png in [
        "pretrain_loss.png",
        "ppo_reward.png",
        "dpo_pairs.png",
        "grpo_reward.png",
        "rm_scores.png",
        "accuracy_vs_kl.png",
    ] {
        assert!(out.join(png).exists(), "{png}");
        assert!(
            report.contains(&format!("]({png})")),
            "{png} not in the report"
        );
    }
    // A second run reuses everything, evaluations included (same files, same figures).
    let again = run_pipeline_config(&cfg, false).unwrap();
    for (a, b) in run.evals.iter().zip(&again.evals) {
        assert_eq!(a.metrics, b.metrics);
    }
    // A new branch runs alone: every finished stage is reused.
    let mut more = cfg.clone();
    let mut ipo = DpoConfig {
        loss: kiln_train::dpo::DpoLoss::Ipo,
        ..DpoConfig::default()
    };
    ipo.train.max_steps = 4;
    ipo.train.batch_size = 2;
    more.branch.push(Branch {
        name: "ipo".into(),
        method: Method::Dpo(ipo),
    });
    let grown = run_pipeline_config(&more, false).unwrap();
    assert_eq!(grown.evals.len(), 6);
    for stage in ["pretrain", "sft", "rm", "ppo", "dpo", "grpo"] {
        assert_eq!(
            grown.results[stage].seconds, run.results[stage].seconds,
            "{stage} was rerun"
        );
    }
    assert_eq!(grown.evals[1].metrics, run.evals[1].metrics);
    assert!(std::fs::read_to_string(out.join("report.md"))
        .unwrap()
        .contains("| ipo | DPO |"));
    // A branch whose settings changed is refused, naming it; nothing is deleted.
    let mut changed = more.clone();
    if let Method::Grpo(g) = &mut changed.branch[2].method {
        g.grpo.iterations += 1;
    }
    let Err(err) = run_pipeline_config(&changed, false) else {
        panic!("a changed branch was reused")
    };
    let err = format!("{err:#}");
    assert!(
        err.contains("another configuration of the grpo stage"),
        "{err}"
    );
    assert!(out.join("grpo").join("done.json").exists());
}

/// A user's pipeline file with five different mistakes: all are reported by one check, before
/// anything is trained.
#[test]
fn check_lists_every_problem_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let corpus = d.join("corpus.txt");
    std::fs::write(&corpus, "the cat sat on the mat. ".repeat(400)).unwrap();
    // Wrong format: not JSON at all.
    let prefs = d.join("prefs.jsonl");
    std::fs::write(&prefs, "chosen: yes\nrejected: no\n").unwrap();
    // Fine records, each far longer than an 8-token context.
    let sft = d.join("sft.jsonl");
    let long = "the cat sat on the mat ".repeat(20);
    let line = serde_json::json!({"instruction": long, "output": long}).to_string();
    std::fs::write(&sft, format!("{line}\n{line}\n")).unwrap();
    // Unwritable output: a folder below a plain file.
    let blocker = d.join("blocker");
    std::fs::write(&blocker, "").unwrap();
    let out = blocker.join("run");
    let cfg = format!(
        r#"out = "{out}"
[corpus]
input = ["{corpus}"]
vocab_size = 300
[pretrain.model]
n_ctx = 8
[sft]
data = ["{sft}", "{missing}"]
learning_rate = 0.1
[rm]
data = ["{prefs}"]
"#,
        out = out.display(),
        corpus = corpus.display(),
        sft = sft.display(),
        missing = d.join("nowhere.jsonl").display(),
        prefs = prefs.display(),
    );
    let file = d.join("mine.toml");
    std::fs::write(&file, cfg).unwrap();
    let rep = check_file(&file);
    let all = rep.problems.join("\n");
    for want in [
        "unknown key `sft.learning_rate`",
        "nowhere.jsonl: no such file",
        "prefs.jsonl",
        "every one of the 2 records is longer than the context (8 tokens)",
        "not a writable folder",
    ] {
        assert!(all.contains(want), "missing {want:?} in:\n{all}");
    }
    assert!(
        rep.problems
            .iter()
            .any(|p| p.contains("prefs.jsonl") && p.contains("not JSON")),
        "{all}"
    );
    assert!(!out.exists());
    // `run` refuses the same plan before the first stage, naming every problem.
    let err = format!("{:#}", PipelineConfig::load(&file).unwrap_err());
    assert!(err.contains("learning_rate"), "{err}");
}

fn shared_data() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    if p.join("alpaca_tiny.json").exists() {
        Some(p)
    } else {
        eprintln!("skipping: ../shared/data is absent");
        None
    }
}

/// A user's own data, as the README's "Your own data" tells: tinyshakespeare to pretrain on,
/// Alpaca to fine-tune on, HH-RLHF preferences (with a bad record, skipped) and Alpaca prompts;
/// no judge. Every stage and branch runs, and the report compares the models on held-out prompts.
#[test]
fn real_samples_end_to_end_without_a_judge() {
    let Some(data) = shared_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = PipelineConfig {
        out: dir.path().join("mine"),
        prompts: Some(data.join("alpaca_tiny.json")),
        ..Default::default()
    };
    cfg.corpus.input = vec![data.join("tinyshakespeare.txt")];
    cfg.corpus.vocab_size = 512;
    cfg.pretrain.model = ModelShape {
        arch: Family::Llama,
        n_layer: 2,
        n_head: 2,
        n_kv_head: 1,
        n_embd: 64,
        n_ctx: 256,
        ..ModelShape::default()
    };
    cfg.pretrain.train.max_steps = 20;
    cfg.pretrain.train.batch_size = 4;
    cfg.sft.data = vec![data.join("alpaca_tiny.json")];
    cfg.sft.train.max_steps = 10;
    cfg.sft.train.batch_size = 4;
    cfg.rm.data = vec![data.join("hh_rlhf_harmless_base_test.jsonl.gz")];
    cfg.rm.skip_bad_records = true;
    cfg.rm.train.max_steps = 6;
    cfg.rm.train.batch_size = 2;
    cfg.eval.limit = 6;
    cfg.eval.max_new_tokens = 12;
    let mut ppo = PpoStageConfig::default();
    ppo.ppo.iterations = 2;
    ppo.ppo.rollout_batch = 8;
    ppo.ppo.minibatch = 4;
    ppo.ppo.max_new_tokens = 12;
    let mut dpo = DpoConfig::default();
    dpo.train.max_steps = 4;
    dpo.train.batch_size = 2;
    dpo.skip_bad_records = true;
    let mut grpo = GrpoStageConfig::default();
    grpo.grpo.iterations = 2;
    grpo.grpo.prompts_per_iter = 2;
    grpo.grpo.group_size = 4;
    grpo.grpo.minibatch = 8;
    grpo.grpo.max_new_tokens = 12;
    cfg.branch = vec![
        Branch::new(Method::Ppo(ppo)),
        Branch::new(Method::Dpo(dpo)),
        Branch::new(Method::Grpo(grpo)),
    ];
    let run = run_pipeline_config(&cfg, false).unwrap();
    assert_eq!(run.evals.len(), 5);
    let report = std::fs::read_to_string(cfg.out.join("report.md")).unwrap();
    for want in [
        "| ppo | RM + PPO |",
        "| dpo | DPO |",
        "| grpo | GRPO |",
        "Answers side by side",
        "Reward-model scores of the answers",
        "held out of RL training",
    ] {
        assert!(report.contains(want), "report lacks {want:?}:\n{report}");
    }
    // The held-out prompts were kept out of RL training, and every model answered all of them.
    let held = std::fs::read_to_string(cfg.out.join("eval/prompts_heldout.jsonl")).unwrap();
    let train = std::fs::read_to_string(cfg.out.join("eval/prompts_train.jsonl")).unwrap();
    assert!(held.lines().all(|l| !train.lines().any(|t| t == l)));
    assert!(run
        .evals
        .iter()
        .all(|e| e.answers.iter().all(|a| a.rm_score.is_some())));
}
