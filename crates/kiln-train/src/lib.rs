//! Kiln's training stages: the shared loop (`trainer`), the optimizer, run directories, and each stage's
//! objective: pretraining (causal and masked LM), SFT, reward model, DPO, PPO and GRPO/RLOO (with
//! reward sources: a judge, a reward model, an external program, a format check).

pub mod dist;
pub mod dpo;
pub mod grpo;
pub mod optim;
pub mod ppo;
pub mod pretrain;
pub mod reward;
pub mod rm;
pub mod rollout;
pub mod run;
pub mod sft;
pub mod trainer;

pub use run::RunDir;
pub use trainer::{
    install_ctrlc, Metrics, Objective, StepStats, TrainConfig, TrainSummary, Trainer,
};
