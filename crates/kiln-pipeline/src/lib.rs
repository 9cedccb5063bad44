//! Kiln's pipeline as a library: each stage a function of its config (`stages`), the pipeline
//! runner over them (`pipeline`), model bundles (`bundle`), evaluation (`evaluate`), and the
//! report with its plots (`report`, `plot`). The `kiln` binary only parses flags and prints.

pub mod bundle;
pub mod check;
pub mod config;
pub mod evaluate;
pub mod example;
pub mod heldout;
pub mod pipeline;
pub mod plot;
pub mod report;
pub mod results;
pub mod spec;
pub mod stages;
