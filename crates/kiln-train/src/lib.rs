//! Kiln's training stages: the shared loop (`trainer`), the optimizer, run directories, and each stage's
//! objective: pretraining (causal and masked LM), SFT, reward model, PPO and DPO.

pub mod dpo;
pub mod optim;
pub mod ppo;
pub mod pretrain;
pub mod rm;
pub mod run;
pub mod sft;
pub mod trainer;

pub use run::RunDir;
pub use trainer::{
    install_ctrlc, Metrics, Objective, StepStats, TrainConfig, TrainSummary, Trainer,
};
