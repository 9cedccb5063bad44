//! The judge: grades a response to a demo prompt for correctness and form.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::task::Question;
use crate::{Task, TaskKind, World};

/// The verdict on one response.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    /// The task kind of the prompt; None when the prompt is not a demo task of this world.
    pub task: Option<TaskKind>,
    /// The first sentence of the response states the right answer (the canonical sentence,
    /// the bare answer such as "12", or "The answer is 12."; case and punctuation ignored).
    pub correct: bool,
    /// The whole response, trimmed, is exactly the canonical shape (one sentence, capital
    /// letter and final period where the canonical answer has them, nothing else); the value
    /// in the answer slot may be wrong.
    pub well_formed: bool,
    /// 1.0 correct and well-formed, 0.6 correct only, 0.2 well-formed but wrong, 0.0 otherwise.
    pub score: f32,
}

impl Judgement {
    fn new(task: Option<TaskKind>, correct: bool, well_formed: bool) -> Judgement {
        let score = match (correct, well_formed) {
            (true, true) => 1.0,
            (true, false) => 0.6,
            (false, true) => 0.2,
            (false, false) => 0.0,
        };
        Judgement {
            task,
            correct,
            well_formed,
            score,
        }
    }
}

impl World {
    /// Grades `response` as an answer to `prompt` (prompt text made by [`crate::prompt_text`]).
    /// A prompt that is not a demo task of this world gets `task: None` and score 0.
    pub fn judge(&self, prompt: &str, response: &str) -> Judgement {
        let not_a_task = Judgement::new(None, false, false);
        let Some(question) = Question::parse(prompt) else {
            return not_a_task;
        };
        let Some(answer) = question.answer(self) else {
            return not_a_task;
        };
        Judgement::new(
            Some(question.kind()),
            question.accepts(&answer, response),
            question.well_formed(response),
        )
    }

    /// The canonical answer to `prompt`, if it is a demo task of this world.
    pub fn canonical_answer(&self, prompt: &str) -> Option<String> {
        self.parse_task(prompt).map(|t| t.output)
    }

    /// The task `prompt` asks, with its canonical answer, if it is a demo task of this world.
    pub fn parse_task(&self, prompt: &str) -> Option<Task> {
        Question::parse(prompt)?.task(self)
    }
}

/// Counts of judged responses for one task kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct KindTally {
    pub n: usize,
    pub correct: usize,
    pub well_formed: usize,
    pub score_sum: f64,
}

impl KindTally {
    pub fn accuracy(&self) -> f64 {
        ratio(self.correct, self.n)
    }

    pub fn well_formed_rate(&self) -> f64 {
        ratio(self.well_formed, self.n)
    }

    pub fn mean_score(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.score_sum / self.n as f64
        }
    }

    fn add(&mut self, other: &KindTally) {
        self.n += other.n;
        self.correct += other.correct;
        self.well_formed += other.well_formed;
        self.score_sum += other.score_sum;
    }
}

/// Running totals of judgements, per task kind, for reporting task accuracy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JudgeTally {
    pub per_kind: BTreeMap<TaskKind, KindTally>,
    /// Responses whose prompt was not a demo task (not counted in `per_kind`).
    pub not_tasks: usize,
}

impl JudgeTally {
    pub fn record(&mut self, judgement: &Judgement) {
        let Some(kind) = judgement.task else {
            self.not_tasks += 1;
            return;
        };
        let tally = self.per_kind.entry(kind).or_default();
        tally.n += 1;
        tally.correct += judgement.correct as usize;
        tally.well_formed += judgement.well_formed as usize;
        tally.score_sum += judgement.score as f64;
    }

    /// All task kinds together.
    pub fn total(&self) -> KindTally {
        let mut total = KindTally::default();
        for tally in self.per_kind.values() {
            total.add(tally);
        }
        total
    }

    /// Mean of the per-kind accuracies: every kind counts the same, however many prompts
    /// it had.
    pub fn macro_accuracy(&self) -> f64 {
        let n = self.per_kind.len();
        let sum: f64 = self.per_kind.values().map(KindTally::accuracy).sum();
        if n == 0 {
            0.0
        } else {
            sum / n as f64
        }
    }

    /// One line: overall and per-kind-averaged accuracy, then accuracy per kind.
    pub fn summary(&self) -> String {
        let total = self.total();
        let mut line = format!(
            "accuracy {:.3} (per-kind mean {:.3}) well-formed {:.3} score {:.3} (n={})",
            total.accuracy(),
            self.macro_accuracy(),
            total.well_formed_rate(),
            total.mean_score(),
            total.n
        );
        for (kind, tally) in &self.per_kind {
            write!(line, " | {kind} {:.2}", tally.accuracy()).expect("write to String");
        }
        line
    }
}

fn ratio(count: usize, n: usize) -> f64 {
    if n == 0 {
        0.0
    } else {
        count as f64 / n as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{prompt_text, REVERSE_INSTRUCTION};

    fn world() -> World {
        World::generate(3)
    }

    /// (correct, well_formed) of a judgement, for compact asserts.
    fn verdict(world: &World, prompt: &str, response: &str) -> (bool, bool) {
        let j = world.judge(prompt, response);
        assert!(j.task.is_some(), "{prompt:?} not parsed");
        (j.correct, j.well_formed)
    }

    #[test]
    fn arithmetic_answers() {
        let w = world();
        let p = "What is 7 plus 5?";
        assert_eq!(w.canonical_answer(p).as_deref(), Some("7 plus 5 is 12."));
        assert_eq!(w.judge(p, "7 plus 5 is 12.").score, 1.0);
        assert_eq!(verdict(&w, p, "  7 plus 5 is 12.\n"), (true, true));
        assert_eq!(verdict(&w, p, "12"), (true, false));
        assert_eq!(verdict(&w, p, "The answer is 12."), (true, false));
        assert_eq!(verdict(&w, p, "7 plus 5 is 12"), (true, false));
        assert_eq!(
            verdict(&w, p, "7 plus 5 is 12. 7 plus 5 is 12."),
            (true, false)
        );
        assert_eq!(verdict(&w, p, "7 plus 5 is 12. ok ok"), (true, false));
        assert_eq!(verdict(&w, p, "7 plus 5 is 13."), (false, true));
        assert_eq!(verdict(&w, p, "7 plus 5 is 12.5."), (false, false));
        assert_eq!(verdict(&w, p, "13"), (false, false));
        assert_eq!(verdict(&w, p, "12 13"), (false, false));
        assert_eq!(verdict(&w, p, ""), (false, false));
        assert_eq!(w.judge(p, "13").score, 0.0);
        assert_eq!(w.judge(p, "7 plus 5 is 13.").score, 0.2);
        assert_eq!(w.judge(p, "12").score, 0.6);

        let p = "What is 9 minus 4?";
        assert_eq!(verdict(&w, p, "9 minus 4 is 5."), (true, true));
        assert_eq!(verdict(&w, p, "9 minus 4 is 6."), (false, true));
        // Negative results are not demo tasks.
        assert_eq!(w.judge("What is 4 minus 9?", "-5").task, None);
    }

    #[test]
    fn compare_answers() {
        let w = world();
        let p = "Which number is bigger, 7 or 12?";
        assert_eq!(verdict(&w, p, "12 is bigger than 7."), (true, true));
        assert_eq!(verdict(&w, p, "12"), (true, false));
        assert_eq!(verdict(&w, p, "7 is bigger than 12."), (false, true));
        assert_eq!(verdict(&w, p, "12 is bigger than 8."), (false, false));
        assert_eq!(w.judge("Which number is bigger, 7 or 7?", "7").task, None);
    }

    #[test]
    fn world_fact_answers() {
        let w = world();
        let mia = &w.characters[0];
        let p = format!("Where does {} live?", mia.name);
        let right = format!("{} lives in {}.", mia.name, mia.place);
        let other = w.places.iter().find(|p| **p != mia.place).unwrap();
        assert_eq!(verdict(&w, &p, &right), (true, true));
        assert_eq!(verdict(&w, &p, &right.to_lowercase()), (true, false));
        assert_eq!(verdict(&w, &p, &mia.place), (true, false));
        let wrong = format!("{} lives in {other}.", mia.name);
        assert_eq!(verdict(&w, &p, &wrong), (false, true));
        assert_eq!(w.judge("Where does Nobody live?", "Oakton").task, None);

        let ball = &w.objects[0];
        let p = format!("What colour is the {}?", ball.name);
        let right = format!("The {} is {}.", ball.name, ball.colour);
        assert_eq!(verdict(&w, &p, &right), (true, true));
        assert_eq!(
            verdict(&w, &p, &format!("The answer is {}.", ball.colour)),
            (true, false)
        );
        assert_eq!(verdict(&w, &p, "The answer is purpleish."), (false, false));
        assert_eq!(w.judge("What colour is the unicorn?", "pink").task, None);
    }

    #[test]
    fn word_answers() {
        let w = world();
        let p = prompt_text(REVERSE_INSTRUCTION, "cat");
        assert_eq!(w.canonical_answer(&p).as_deref(), Some("tac"));
        assert_eq!(verdict(&w, &p, "tac"), (true, true));
        assert_eq!(verdict(&w, &p, " tac\n"), (true, true));
        assert_eq!(verdict(&w, &p, "tac."), (true, false));
        assert_eq!(verdict(&w, &p, "TAC"), (true, false));
        assert_eq!(verdict(&w, &p, "cat"), (false, true));
        assert_eq!(verdict(&w, &p, "tac tac"), (false, false));

        let p = "How many letters are in the word cat?";
        assert_eq!(verdict(&w, p, "The word cat has 3 letters."), (true, true));
        assert_eq!(verdict(&w, p, "3"), (true, false));
        assert_eq!(verdict(&w, p, "The word cat has 4 letters."), (false, true));
        assert_eq!(verdict(&w, p, "The word cat has 1 letter."), (false, true));
        assert_eq!(
            verdict(&w, p, "The word cat has 1 letters."),
            (false, false)
        );
    }

    #[test]
    fn non_tasks_score_zero() {
        let w = world();
        for p in [
            "Tell me a joke.",
            "",
            "What is 7 plus 5? Please.",
            "What is 1e3 plus 2?",
        ] {
            let j = w.judge(p, "7 plus 5 is 12.");
            assert_eq!(
                (j.task, j.correct, j.well_formed, j.score),
                (None, false, false, 0.0)
            );
            assert_eq!(w.canonical_answer(p), None);
        }
    }

    #[test]
    fn tally_counts_per_kind() {
        let w = world();
        let mut tally = JudgeTally::default();
        tally.record(&w.judge("What is 1 plus 1?", "1 plus 1 is 2."));
        tally.record(&w.judge("What is 1 plus 1?", "3"));
        tally.record(&w.judge("Hello?", "hi"));
        let add = tally.per_kind[&TaskKind::Add];
        assert_eq!((add.n, add.correct, add.well_formed), (2, 1, 1));
        assert_eq!(tally.not_tasks, 1);
        tally.record(&w.judge("What is 2 minus 1?", "1"));
        assert!((tally.total().accuracy() - 2.0 / 3.0).abs() < 1e-9);
        assert!((tally.macro_accuracy() - 0.75).abs() < 1e-9);
        assert!(tally.summary().contains("add 0.50"));
    }
}
