//! The seven task kinds: how a question is phrased, what its canonical answer looks like, how a
//! prompt is parsed back into a question, and how right/wrong, tidy/sloppy answers are made.

use std::fmt;

use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::{prompt_text, World};

/// The instruction of the `reverse` task; the word itself goes in the input field.
pub const REVERSE_INSTRUCTION: &str = "Spell the word backwards.";

/// Largest operand of the `add` and `sub` tasks.
pub(crate) const MAX_OPERAND: u64 = 20;

/// Largest number of the `compare` task.
pub(crate) const MAX_COMPARED: u64 = 99;

/// What a hedging demonstrator writes instead of an answer.
pub const HEDGE: &str = "I do not know.";

/// Trailing words appended to otherwise correct answers to make them sloppy.
const JUNK: &[&str] = &[
    "I hope that helps.",
    "yes yes yes",
    "ok ok",
    "and that is all",
    "the end",
    "Thank you!",
];

/// The kinds of demo tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// "What is 7 plus 5?" -> "7 plus 5 is 12."
    Add,
    /// "What is 9 minus 4?" -> "9 minus 4 is 5."
    Sub,
    /// "Which number is bigger, 12 or 7?" -> "12 is bigger than 7."
    Compare,
    /// "Where does Mia live?" -> "Mia lives in Oakton."
    Lives,
    /// "What colour is the ball?" -> "The ball is red."
    Colour,
    /// "Spell the word backwards." with input "cat" -> "tac"
    Reverse,
    /// "How many letters are in the word cat?" -> "The word cat has 3 letters."
    Count,
}

impl TaskKind {
    pub const ALL: [TaskKind; 7] = [
        TaskKind::Add,
        TaskKind::Sub,
        TaskKind::Compare,
        TaskKind::Lives,
        TaskKind::Colour,
        TaskKind::Reverse,
        TaskKind::Count,
    ];

    /// Lowercase name, as used in JSON.
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Add => "add",
            TaskKind::Sub => "sub",
            TaskKind::Compare => "compare",
            TaskKind::Lives => "lives",
            TaskKind::Colour => "colour",
            TaskKind::Reverse => "reverse",
            TaskKind::Count => "count",
        }
    }
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One demo task with its canonical answer, in Alpaca shape (`input` is "" when unused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub kind: TaskKind,
    pub instruction: String,
    pub input: String,
    pub output: String,
}

impl Task {
    /// The prompt text of this task (see [`prompt_text`]).
    pub fn prompt(&self) -> String {
        prompt_text(&self.instruction, &self.input)
    }
}

/// A question with its parameters, independent of any answer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Question {
    Add { a: u64, b: u64 },
    Sub { a: u64, b: u64 },
    Compare { a: u64, b: u64 },
    Lives { name: String },
    Colour { object: String },
    Reverse { word: String },
    Count { word: String },
}

/// What fills the answer slot of a question: a number, a place, a colour or a word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    Num(u64),
    Word(String),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Num(n) => write!(f, "{n}"),
            Value::Word(w) => f.write_str(w),
        }
    }
}

impl Question {
    pub fn kind(&self) -> TaskKind {
        match self {
            Question::Add { .. } => TaskKind::Add,
            Question::Sub { .. } => TaskKind::Sub,
            Question::Compare { .. } => TaskKind::Compare,
            Question::Lives { .. } => TaskKind::Lives,
            Question::Colour { .. } => TaskKind::Colour,
            Question::Reverse { .. } => TaskKind::Reverse,
            Question::Count { .. } => TaskKind::Count,
        }
    }

    pub fn instruction(&self) -> String {
        match self {
            Question::Add { a, b } => format!("What is {a} plus {b}?"),
            Question::Sub { a, b } => format!("What is {a} minus {b}?"),
            Question::Compare { a, b } => format!("Which number is bigger, {a} or {b}?"),
            Question::Lives { name } => format!("Where does {name} live?"),
            Question::Colour { object } => format!("What colour is the {object}?"),
            Question::Reverse { .. } => REVERSE_INSTRUCTION.to_string(),
            Question::Count { word } => format!("How many letters are in the word {word}?"),
        }
    }

    /// The Alpaca input field: only `reverse` uses it.
    pub fn input(&self) -> String {
        match self {
            Question::Reverse { word } => word.clone(),
            _ => String::new(),
        }
    }

    pub fn prompt(&self) -> String {
        prompt_text(&self.instruction(), &self.input())
    }

    /// Parses prompt text made by [`Question::prompt`] back into a question. Only the exact
    /// rendering is accepted (up to surrounding whitespace), so parse and prompt round-trip.
    pub fn parse(prompt: &str) -> Option<Question> {
        let p = prompt.trim();
        let q = if let Some((instruction, input)) = p.split_once("\n\n") {
            if instruction != REVERSE_INSTRUCTION || !is_lower_word(input) {
                return None;
            }
            Question::Reverse {
                word: input.to_string(),
            }
        } else if let Some(rest) = slot(p, "What is ", "?") {
            if let Some((a, b)) = rest.split_once(" plus ") {
                Question::Add {
                    a: number(a)?,
                    b: number(b)?,
                }
            } else {
                let (a, b) = rest.split_once(" minus ")?;
                Question::Sub {
                    a: number(a)?,
                    b: number(b)?,
                }
            }
        } else if let Some(rest) = slot(p, "Which number is bigger, ", "?") {
            let (a, b) = rest.split_once(" or ")?;
            Question::Compare {
                a: number(a)?,
                b: number(b)?,
            }
        } else if let Some(name) = slot(p, "Where does ", " live?") {
            is_capitalized(name).then(|| Question::Lives {
                name: name.to_string(),
            })?
        } else if let Some(object) = slot(p, "What colour is the ", "?") {
            is_lower_word(object).then(|| Question::Colour {
                object: object.to_string(),
            })?
        } else if let Some(word) = slot(p, "How many letters are in the word ", "?") {
            is_lower_word(word).then(|| Question::Count {
                word: word.to_string(),
            })?
        } else {
            return None;
        };
        (q.prompt() == p).then_some(q)
    }

    /// The right answer, or None when the question is not a demo task of `world` (unknown
    /// character or object, a negative difference, two equal numbers to compare).
    pub fn answer(&self, world: &World) -> Option<Value> {
        Some(match self {
            Question::Add { a, b } => Value::Num(a + b),
            Question::Sub { a, b } => Value::Num(a.checked_sub(*b)?),
            Question::Compare { a, b } if a != b => Value::Num(*a.max(b)),
            Question::Compare { .. } => return None,
            Question::Lives { name } => Value::Word(world.character(name)?.place.clone()),
            Question::Colour { object } => Value::Word(world.object(object)?.colour.clone()),
            Question::Reverse { word } => Value::Word(word.chars().rev().collect()),
            Question::Count { word } => Value::Num(word.chars().count() as u64),
        })
    }

    /// The canonical answer sentence with `value` in the answer slot. With the right value
    /// this is the canonical answer; with a wrong one it is a well-formed wrong answer.
    pub fn render(&self, value: &Value) -> String {
        match self {
            Question::Add { a, b } => format!("{a} plus {b} is {value}."),
            Question::Sub { a, b } => format!("{a} minus {b} is {value}."),
            Question::Compare { a, b } => {
                // The answer slot is the number claimed to be bigger; the other one follows.
                let other = if *value == Value::Num(*a) { b } else { a };
                format!("{value} is bigger than {other}.")
            }
            Question::Lives { name } => format!("{name} lives in {value}."),
            Question::Colour { object } => format!("The {object} is {value}."),
            Question::Reverse { .. } => value.to_string(),
            Question::Count { word } => {
                let plural = if *value == Value::Num(1) { "" } else { "s" };
                format!("The word {word} has {value} letter{plural}.")
            }
        }
    }

    /// The task with its canonical answer, if this is a demo task of `world`.
    pub fn task(&self, world: &World) -> Option<Task> {
        let answer = self.answer(world)?;
        Some(Task {
            kind: self.kind(),
            instruction: self.instruction(),
            input: self.input(),
            output: self.render(&answer),
        })
    }

    /// Whether `response` has exactly the canonical shape: the canonical sentence with some
    /// value of the right type in the answer slot, and nothing else but surrounding whitespace.
    pub fn well_formed(&self, response: &str) -> bool {
        let r = response.trim();
        match self {
            Question::Add { a, b } => {
                slot(r, &format!("{a} plus {b} is "), ".").is_some_and(|n| number(n).is_some())
            }
            Question::Sub { a, b } => {
                slot(r, &format!("{a} minus {b} is "), ".").is_some_and(|n| number(n).is_some())
            }
            Question::Compare { a, b } => {
                r == self.render(&Value::Num(*a)) || r == self.render(&Value::Num(*b))
            }
            Question::Lives { name } => {
                slot(r, &format!("{name} lives in "), ".").is_some_and(is_capitalized)
            }
            Question::Colour { object } => {
                slot(r, &format!("The {object} is "), ".").is_some_and(is_lower_word)
            }
            Question::Reverse { .. } => is_lower_word(r),
            Question::Count { word } => {
                let plural = slot(r, &format!("The word {word} has "), " letters.")
                    .and_then(number)
                    .is_some_and(|n| n != 1);
                plural || r == format!("The word {word} has 1 letter.")
            }
        }
    }

    /// Whether a reader would accept `response` as stating `answer`: its first sentence is,
    /// ignoring case, punctuation and spacing, the canonical sentence, the bare answer
    /// ("12", "Oakton") or "The answer is ...". Anything after the first sentence is ignored.
    pub fn accepts(&self, answer: &Value, response: &str) -> bool {
        let said = normalize(first_sentence(response));
        let bare = answer.to_string();
        [
            self.render(answer),
            bare.clone(),
            format!("The answer is {bare}."),
        ]
        .iter()
        .any(|form| normalize(form) == said)
    }

    /// A plausible wrong value: off by one or two, another town or colour, the word not
    /// reversed, its letters shuffled, or another word reversed.
    pub fn wrong_value(&self, world: &World, right: &Value, rng: &mut impl Rng) -> Value {
        match (self, right) {
            (Question::Compare { a, b }, _) => Value::Num(*a.min(b)),
            (Question::Count { .. }, Value::Num(n)) => {
                off_by(*n, &[-1, 1], 1, rng).map_or(Value::Num(n + 1), Value::Num)
            }
            (_, Value::Num(n)) => {
                off_by(*n, &[-2, -1, 1, 2], 0, rng).map_or(Value::Num(n + 1), Value::Num)
            }
            (Question::Lives { .. }, Value::Word(place)) => {
                other_than(place, &world.places, "Nowhere", rng)
            }
            (Question::Colour { .. }, Value::Word(colour)) => {
                other_than(colour, &world.colours, "grey", rng)
            }
            (_, Value::Word(reversed)) => {
                let original: String = reversed.chars().rev().collect();
                // Another word spelled backwards: what a model that copies badly writes.
                if rng.gen_bool(0.3) {
                    if let Some(other) = other_word(&original, &world.words, rng) {
                        return Value::Word(other.chars().rev().collect());
                    }
                }
                if original != *reversed && rng.gen_bool(0.5) {
                    return Value::Word(original);
                }
                let mut letters: Vec<char> = reversed.chars().collect();
                for _ in 0..10 {
                    letters.shuffle(rng);
                    let shuffled: String = letters.iter().collect();
                    if shuffled != *reversed {
                        return Value::Word(shuffled);
                    }
                }
                Value::Word(format!("{reversed}s"))
            }
        }
    }

    /// A sloppy rendering of `value`: bare, lowercase without the period, repeated, with junk
    /// words after it, or "The answer is ...". It states `value` as well as the canonical
    /// sentence does, but is never well-formed.
    pub fn sloppy(&self, value: &Value, rng: &mut impl Rng) -> String {
        let reverse = matches!(self, Question::Reverse { .. });
        let shape = self.render(value);
        let bare = value.to_string();
        let sentence = if shape.ends_with('.') {
            shape.clone()
        } else {
            format!("{shape}.")
        };
        match rng.gen_range(0..5) {
            // The bare reversed word is the canonical shape, so add a period to spoil it.
            0 if reverse => format!("{bare}."),
            0 => bare,
            1 if reverse => shape.to_uppercase(),
            1 => shape.trim_end_matches('.').to_lowercase(),
            2 => format!("{sentence} {sentence}"),
            3 => format!("{sentence} {}", JUNK.choose(rng).expect("junk")),
            _ => format!("The answer is {bare}."),
        }
    }

    /// Whether a human demonstrator would find this question hard enough to hedge: a number of
    /// 12 or more in a sum or difference, two numbers of 50 or more to compare, a word of five
    /// letters or more to reverse or count. Facts about characters and objects are never hard.
    pub fn looks_hard(&self) -> bool {
        match self {
            Question::Add { a, b } | Question::Sub { a, b } => *a.max(b) >= 12,
            Question::Compare { a, b } => *a.min(b) >= 50,
            Question::Reverse { word } | Question::Count { word } => word.chars().count() >= 5,
            Question::Lives { .. } | Question::Colour { .. } => false,
        }
    }

    /// A question of the same kind about another unit (another operand pair, character,
    /// object or word), or None when `world` has no other.
    pub fn other_unit(&self, world: &World, rng: &mut impl Rng) -> Option<Question> {
        let names: Vec<String> = world.characters.iter().map(|c| c.name.clone()).collect();
        let objects: Vec<String> = world.objects.iter().map(|o| o.name.clone()).collect();
        Some(match self {
            Question::Add { a, b } => Question::Add {
                a: *a,
                b: off_by(*b, &[-2, -1, 1, 2], 0, rng)?,
            },
            Question::Sub { a, b } => Question::Sub {
                a: *a,
                b: off_by(*b, &[-2, -1, 1, 2], 0, rng).filter(|b| b <= a)?,
            },
            Question::Compare { a, b } => Question::Compare {
                a: *a,
                b: off_by(*b, &[-3, -2, -1, 1, 2, 3], 0, rng).filter(|b| b != a)?,
            },
            Question::Lives { name } => Question::Lives {
                name: other_word(name, &names, rng)?,
            },
            Question::Colour { object } => Question::Colour {
                object: other_word(object, &objects, rng)?,
            },
            Question::Reverse { word } => Question::Reverse {
                word: other_word(word, &world.words, rng)?,
            },
            Question::Count { word } => Question::Count {
                word: other_word(word, &world.words, rng)?,
            },
        })
    }

    /// A right answer to the wrong question: the canonical answer about another unit ("The
    /// word lake has 4 letters." asked about "arm"). Small models make this mistake on units
    /// they never saw answered; a reward model shown only wrong values would not penalise it.
    pub fn wrong_echo(&self, world: &World, rng: &mut impl Rng) -> Option<String> {
        let other = self.other_unit(world, rng)?;
        Some(other.render(&other.answer(world)?))
    }

    /// Four answers ranked 1 (best) to 4: canonical; right but sloppy; wrong but well-formed;
    /// wrong and not well-formed ("I do not know.", a sloppy wrong value, or a right answer
    /// about another unit). None when this is not a demo task of `world`.
    pub fn ranked_answers(&self, world: &World, rng: &mut impl Rng) -> Option<[String; 4]> {
        let right = self.answer(world)?;
        let wrong = self.wrong_value(world, &right, rng);
        let roll: f64 = rng.gen();
        let echo = if (0.15..0.55).contains(&roll) {
            // Only where it is not well-formed: a backwards word about another word is, and
            // `wrong_value` already makes those.
            self.wrong_echo(world, rng).filter(|e| !self.well_formed(e))
        } else {
            None
        };
        let worst = match echo {
            Some(echo) => echo,
            None if roll < 0.15 => HEDGE.to_string(),
            None => {
                let wrong = self.wrong_value(world, &right, rng);
                self.sloppy(&wrong, rng)
            }
        };
        Some([
            self.render(&right),
            self.sloppy(&right, rng),
            self.render(&wrong),
            worst,
        ])
    }
}

/// `text` without `prefix` and `suffix`, if it has both.
fn slot<'a>(text: &'a str, prefix: &str, suffix: &str) -> Option<&'a str> {
    text.strip_prefix(prefix)?.strip_suffix(suffix)
}

/// A number written the canonical way (digits, no sign, no leading zero), small enough that
/// sums cannot overflow.
fn number(s: &str) -> Option<u64> {
    let canonical = !s.is_empty()
        && s.len() <= 9
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'));
    canonical.then(|| s.parse().expect("digits"))
}

/// One lowercase ASCII word ("cat").
fn is_lower_word(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase())
}

/// One capitalized ASCII word ("Oakton").
fn is_capitalized(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_uppercase()) && bytes.all(|b| b.is_ascii_lowercase())
}

/// `n` moved by one of `offsets`, staying at least `min` (None if no offset works).
fn off_by(n: u64, offsets: &[i64], min: u64, rng: &mut impl Rng) -> Option<u64> {
    let candidates: Vec<u64> = offsets
        .iter()
        .filter_map(|&d| n.checked_add_signed(d))
        .filter(|&m| m >= min && m != n)
        .collect();
    candidates.choose(rng).copied()
}

/// A random entry of `options` other than `word`, if there is one.
fn other_word(word: &str, options: &[String], rng: &mut impl Rng) -> Option<String> {
    let others: Vec<&String> = options.iter().filter(|o| *o != word).collect();
    others.choose(rng).map(|o| o.to_string())
}

/// A random entry of `options` other than `right` (or `fallback` if there is none).
fn other_than(right: &str, options: &[String], fallback: &str, rng: &mut impl Rng) -> Value {
    let others: Vec<&String> = options.iter().filter(|o| *o != right).collect();
    Value::Word(
        others
            .choose(rng)
            .map_or(fallback.to_string(), |o| o.to_string()),
    )
}

/// The first sentence of `text`: up to the first newline, or the first '.', '!' or '?' that
/// ends a sentence (followed by whitespace or the end, so "12.5" is not cut).
pub(crate) fn first_sentence(text: &str) -> &str {
    let t = text.trim_start();
    for (i, c) in t.char_indices() {
        if c == '\n' {
            return &t[..i];
        }
        if matches!(c, '.' | '!' | '?') {
            let rest = &t[i + c.len_utf8()..];
            if rest.is_empty() || rest.starts_with(char::is_whitespace) {
                return &t[..i];
            }
        }
    }
    t
}

/// Lowercase words and numbers of `text`, single-spaced, punctuation dropped.
fn normalize(text: &str) -> String {
    let cleaned: String = text
        .chars()
        .map(|c| {
            if c.is_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                ' '
            }
        })
        .collect();
    cleaned.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_sentence_cuts_at_sentence_ends_only() {
        assert_eq!(first_sentence("  7 plus 5 is 12. yes"), "7 plus 5 is 12");
        assert_eq!(first_sentence("12.5 is it"), "12.5 is it");
        assert_eq!(first_sentence("tac\ntac"), "tac");
        assert_eq!(first_sentence("Thank you!"), "Thank you");
        assert_eq!(first_sentence(""), "");
    }

    #[test]
    fn parse_round_trips_and_rejects_near_misses() {
        let questions = [
            Question::Add { a: 7, b: 5 },
            Question::Sub { a: 9, b: 4 },
            Question::Compare { a: 12, b: 7 },
            Question::Lives { name: "Mia".into() },
            Question::Colour {
                object: "ball".into(),
            },
            Question::Reverse { word: "cat".into() },
            Question::Count { word: "cat".into() },
        ];
        for q in questions {
            assert_eq!(Question::parse(&q.prompt()), Some(q.clone()));
            assert_eq!(Question::parse(&format!("  {}\n", q.prompt())), Some(q));
        }
        for bad in [
            "What is 7 plus 05?",
            "What is 7 plus 5 plus 1?",
            "What is 7 times 5?",
            "what is 7 plus 5?",
            "What is 7 plus 5",
            "Where does mia live?",
            "What colour is the red ball?",
            "Spell the word backwards.\n\nCat",
            "Spell the word backwards.",
            "How many letters are in the word cat dog?",
            "Tell me a story.",
            "",
        ] {
            assert_eq!(Question::parse(bad), None, "{bad:?}");
        }
    }
}
