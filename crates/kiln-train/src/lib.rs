//! Kiln's training stages: the supervised loop (`trainer`), the run session it shares with PPO and
//! GRPO (`session`: resume, progress, metrics, checkpoints, Ctrl-C, the non-finite policy), the
//! optimizer, run directories, and each stage's objective: pretraining (causal and masked LM), SFT,
//! reward model, DPO, PPO and GRPO/RLOO (with reward sources: a judge, a reward model, an external
//! program, a format check).

pub mod adapters;
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
pub mod session;
pub mod sft;
pub mod trainer;

pub use run::RunDir;
pub use session::{install_ctrlc, RunSession};
pub use trainer::{Metrics, Objective, StepStats, TrainConfig, TrainSummary, Trainer};
