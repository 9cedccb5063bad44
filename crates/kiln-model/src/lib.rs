//! Kiln's transformer: GPT-2 or Llama-family decoders (or bidirectional encoders) over the kernels of `kiln-kernels`,
//! its heads, KV-cache inference, sampling, and Hugging Face–compatible checkpoints.

pub mod checkpoint;
pub mod config;
pub mod infer;
pub mod memory;
pub mod model;
pub mod params;

pub use config::{Arch, Family, MlpKind, ModelConfig, NormKind, RopeScaling};
pub use infer::{
    generate, generate_rows_with, generate_with, sample_token, GenerateOptions, KvCache,
    PackedWeights, Sampling, WeightFormat,
};
pub use model::{Activations, Input, Model};
pub use params::{BlockLayout, Linear, Norm, ParamLayout, Role, TensorInfo};
