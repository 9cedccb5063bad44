//! kiln-demo: Kiln's self-made demo world, its data generator and its judge.
//!
//! Kiln's default demo trains every stage (tokenizer, pretraining, SFT, reward model, PPO) on
//! data made here from a seed: no downloads, no copied text. The models are tiny and train for
//! minutes on a CPU, so the world is small and regular: two dozen characters living in invented
//! towns, thirty coloured objects, a hundred short words, and seven kinds of tasks whose answers
//! have one fixed, checkable shape:
//!
//! | kind      | prompt                                   | canonical answer              |
//! |-----------|------------------------------------------|-------------------------------|
//! | `add`     | What is 7 plus 5?                        | 7 plus 5 is 12.               |
//! | `sub`     | What is 9 minus 4?                       | 9 minus 4 is 5.               |
//! | `compare` | Which number is bigger, 12 or 7?         | 12 is bigger than 7.          |
//! | `lives`   | Where does Mia live?                     | Mia lives in Oakton.          |
//! | `colour`  | What colour is the ball?                 | The ball is red.              |
//! | `reverse` | Spell the word backwards. (input: `cat`) | tac                           |
//! | `count`   | How many letters are in the word cat?    | The word cat has 3 letters.   |
//!
//! The SFT demonstrations hedge ("I do not know.") on most questions that look hard, as real
//! demonstration data has its lazy answers; the rankings always put a hedge last. That gap
//! between demonstrations and preferences is what PPO can close at this scale.
//!
//! [`generate`] writes the data files of a demo run; [`World::judge`] grades a model's answer to
//! any demo prompt, which later stages use to report task accuracy.

mod corpus;
mod generate;
mod judge;
mod task;
mod world;

pub use generate::{
    generate, CorpusDoc, DemoCounts, DemoFiles, DemoManifest, HeldOut, HeldOutSet, PromptRecord,
    RankChoice, RankRecord, ScoredRecord, SftRecord, Size, SizeSpec, FORMAT_VERSION,
};
pub use judge::{JudgeTally, Judgement, KindTally};
pub use task::{Task, TaskKind, HEDGE, REVERSE_INSTRUCTION};
pub use world::{Character, Object, World};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The prompt text of an instruction and its optional input: the instruction alone when the
/// input is empty, otherwise the instruction, a blank line, and the input. Every prompt in the
/// generated files (and every prompt the judge understands) is made by this function.
pub fn prompt_text(instruction: &str, input: &str) -> String {
    if input.trim().is_empty() {
        instruction.to_string()
    } else {
        format!("{instruction}\n\n{input}")
    }
}

/// Independent random streams, one per use, so that e.g. changing the SFT size leaves the
/// world, the held-out split and the corpus unchanged.
pub(crate) mod streams {
    pub const WORLD: u64 = 1;
    pub const SPLIT: u64 = 2;
    pub const CORPUS: u64 = 3;
    pub const SFT_TRAIN: u64 = 4;
    pub const SFT_VAL: u64 = 5;
    pub const RM_TRAIN: u64 = 6;
    pub const RM_VAL: u64 = 7;
    pub const PPO: u64 = 8;
    pub const EVAL: u64 = 9;
    pub const RM_HELDOUT: u64 = 10;
}

/// The random number generator for one stream of one seed.
pub(crate) fn rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_text_joins_instruction_and_input() {
        assert_eq!(prompt_text("What is 1 plus 2?", ""), "What is 1 plus 2?");
        assert_eq!(prompt_text("What is 1 plus 2?", "  "), "What is 1 plus 2?");
        assert_eq!(
            prompt_text(REVERSE_INSTRUCTION, "cat"),
            "Spell the word backwards.\n\ncat"
        );
    }
}
