//! The pretraining corpus: short documents in simple English about the world, arithmetic and
//! spelling, plus question/answer paragraphs phrased like the tasks.
//!
//! The corpus states every fact of the world, every sum and difference of the `add` and `sub`
//! tasks and every spelling fact of the word list, so pretraining sees all the knowledge the
//! tasks ask for. Its question/answer paragraphs use training questions only: a held-out
//! (PPO or eval) prompt never appears in the corpus, so answering it means turning a stated
//! fact into an answer, not recalling a seen exchange.

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::task::{Question, MAX_COMPARED, MAX_OPERAND};
use crate::world::with_article;
use crate::{Character, World};

/// Story templates: each is 3-5 sentences with `{placeholders}` filled from a [`Cast`].
const STORIES: &[&[&str]] = &[
    &[
        "{name} lives in {place}.",
        "One day {name} found {a_colour} {obj}.",
        "{name} took the {obj} home.",
        "The {obj} is {colour}.",
    ],
    &[
        "{name} has {a_pet}.",
        "The {pet} likes to play with the {fav}.",
        "The {fav} is {fav_colour}.",
        "{name} and the {pet} live in {place}.",
    ],
    &[
        "{name} and {friend} live in {place}.",
        "{name} likes the {fav} best.",
        "{friend} likes the {friend_fav} best.",
        "They play together every day.",
    ],
    &[
        "In {place} there is {a_colour} {obj}.",
        "{name} saw the {obj} and smiled.",
        "{name} lives in {place}.",
    ],
    &[
        "{name} went for a walk with the {pet}.",
        "They walked all the way to {far_place}.",
        "Then they went back home to {place}.",
    ],
    &[
        "{name} lost the {fav}.",
        "{friend} helped {name} look for it.",
        "They found the {fav} under a tree.",
        "The {fav} is {fav_colour}.",
        "{name} was very happy.",
    ],
    &[
        "{name} wrote a letter to {far}.",
        "{far} lives in {far_place}.",
        "{name} lives in {place}.",
        "The letter was about {a_colour} {obj}.",
    ],
    &[
        "It was a sunny day in {place}.",
        "{name} sat in the park with the {pet}.",
        "{name} had {a_colour} {obj}.",
        "It was a good day.",
    ],
    &[
        "{name} has {a_things}.",
        "{friend} gives {name} {b} more.",
        "Now {name} has {sum_things}.",
        "{a} plus {b} is {sum}.",
    ],
    &[
        "{name} had {big_things}.",
        "{name} gave {small} to {friend}.",
        "Now {name} has {diff_things}.",
        "{big} minus {small} is {diff}.",
    ],
    &[
        "{name} likes the {fav} best.",
        "The {fav} is {fav_colour}.",
        "{name} keeps the {fav} at home in {place}.",
    ],
    &[
        "{name} and {far} met at the market.",
        "{name} bought {a_colour} {obj}.",
        "{far} bought {a_colour2} {obj2}.",
        "Then {name} went home to {place} and {far} went home to {far_place}.",
    ],
    &[
        "The {pet} of {name} was hungry.",
        "{name} gave the {pet} some food.",
        "The {pet} went to sleep next to the {fav}.",
        "{name} has {a_pet}.",
    ],
    &[
        "{name} has {x_things} and {friend} has {y_things}.",
        "{max} is bigger than {min}.",
        "So {winner} has more.",
    ],
    &[
        "{name} is learning to spell.",
        "{name} can spell the word {word}.",
        "{word} spelled backwards is {drow}.",
        "The word {word} has {len} letters.",
    ],
    &[
        "Everyone in {place} knows {name}.",
        "{name} has {a_pet} and {a_colour} {obj}.",
        "{friend} lives in {place} too.",
    ],
];

/// Openings sometimes put in front of a story.
const OPENINGS: &[&str] = &[
    "This is a story about {name}.",
    "Once upon a time there was {name}.",
    "Here is a short story.",
];

/// Things counted in the number stories.
const THINGS: &[&str] = &["apple", "sweet", "marble", "stamp", "shell", "cookie"];

/// Builds corpus documents until their JSON lines add up to at least `target_bytes`.
/// `qa_pools` holds the training questions of each task kind.
pub(crate) fn corpus(
    world: &World,
    qa_pools: &[Vec<Question>],
    target_bytes: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<String> {
    let mut docs = coverage(world, rng);
    let mut bytes: usize = docs.iter().map(|d| json_line_len(d)).sum();
    while bytes < target_bytes {
        let doc = match rng.gen_range(0..100) {
            0..=44 => story(world, rng),
            45..=54 => fact_list(world, rng),
            55..=64 => arithmetic_list(rng),
            65..=71 => comparison_list(rng),
            72..=81 => spelling_list(world, rng),
            _ => qa_paragraph(world, qa_pools, rng),
        };
        bytes += json_line_len(&doc);
        docs.push(doc);
    }
    // Mix the coverage documents in, so a reader of any prefix sees a bit of everything.
    docs.shuffle(rng);
    docs
}

/// Length of a document as one `{"text": ...}` line of corpus.jsonl.
pub(crate) fn json_line_len(text: &str) -> usize {
    serde_json::to_string(text).expect("string to json").len() + "{\"text\":}\n".len()
}

/// Documents stating every world fact, every add/sub statement and every spelling fact once.
fn coverage(world: &World, rng: &mut ChaCha8Rng) -> Vec<String> {
    let mut sentences: Vec<Vec<String>> = Vec::new();
    let mut facts = world.facts();
    facts.shuffle(rng);
    sentences.push(facts);
    let mut sums = Vec::new();
    for a in 0..=MAX_OPERAND {
        for b in 0..=MAX_OPERAND {
            sums.push(format!("{a} plus {b} is {}.", a + b));
            if b <= a {
                sums.push(format!("{a} minus {b} is {}.", a - b));
            }
        }
    }
    sums.shuffle(rng);
    sentences.push(sums);
    let mut spellings: Vec<String> = world
        .words
        .iter()
        .flat_map(|w| [backwards(w), letter_count(w), spelled_out(w)])
        .collect();
    spellings.shuffle(rng);
    sentences.push(spellings);

    let mut docs = Vec::new();
    for group in sentences {
        let mut rest = &group[..];
        while !rest.is_empty() {
            let n = rng.gen_range(3..=8).min(rest.len());
            docs.push(rest[..n].join(" "));
            rest = &rest[n..];
        }
    }
    docs
}

/// Who and what a story is about, as placeholder values.
struct Cast {
    values: Vec<(&'static str, String)>,
}

impl Cast {
    fn new(world: &World, rng: &mut ChaCha8Rng) -> Cast {
        let me = world.characters.choose(rng).expect("characters");
        // Two residents per place, so a neighbour always exists; fall back to anyone.
        let neighbours: Vec<&Character> = world
            .residents(&me.place)
            .into_iter()
            .filter(|c| c.name != me.name)
            .collect();
        let friend = neighbours.choose(rng).copied().unwrap_or(me);
        let far_away: Vec<&Character> = world
            .characters
            .iter()
            .filter(|c| c.place != me.place)
            .collect();
        let far = far_away.choose(rng).copied().unwrap_or(friend);
        let obj = world.objects.choose(rng).expect("objects");
        let obj2 = world.objects.choose(rng).expect("objects");
        let fav_colour = colour_of(world, &me.favourite);
        let thing = *THINGS.choose(rng).expect("things");

        let a = rng.gen_range(2..=MAX_OPERAND);
        let b = rng.gen_range(1..=MAX_OPERAND);
        let big = rng.gen_range(2..=MAX_OPERAND);
        let small = rng.gen_range(1..=big);
        let (x, y) = distinct_pair(rng, MAX_OPERAND);
        let winner = if x > y { &me.name } else { &friend.name };
        let word = world.words.choose(rng).expect("words");

        let values = vec![
            ("name", me.name.clone()),
            ("place", me.place.clone()),
            ("pet", me.pet.clone()),
            ("a_pet", with_article(&me.pet)),
            ("fav", me.favourite.clone()),
            ("fav_colour", fav_colour),
            ("friend", friend.name.clone()),
            ("friend_fav", friend.favourite.clone()),
            ("far", far.name.clone()),
            ("far_place", far.place.clone()),
            ("obj", obj.name.clone()),
            ("colour", obj.colour.clone()),
            ("a_colour", with_article(&obj.colour)),
            ("obj2", obj2.name.clone()),
            ("a_colour2", with_article(&obj2.colour)),
            ("a_things", count_of(a, thing)),
            ("a", a.to_string()),
            ("b", b.to_string()),
            ("sum_things", count_of(a + b, thing)),
            ("sum", (a + b).to_string()),
            ("big_things", count_of(big, thing)),
            ("big", big.to_string()),
            ("small", small.to_string()),
            ("diff_things", count_of(big - small, thing)),
            ("diff", (big - small).to_string()),
            ("x_things", count_of(x, thing)),
            ("y_things", count_of(y, thing)),
            ("max", x.max(y).to_string()),
            ("min", x.min(y).to_string()),
            ("winner", winner.clone()),
            ("word", word.clone()),
            ("drow", word.chars().rev().collect()),
            ("len", word.len().to_string()),
        ];
        Cast { values }
    }

    fn fill(&self, template: &str) -> String {
        let mut text = template.to_string();
        for (key, value) in &self.values {
            text = text.replace(&format!("{{{key}}}"), value);
        }
        debug_assert!(!text.contains('{'), "unfilled placeholder in {template}");
        text
    }
}

/// A short story from one template, sometimes with an opening or a closing line.
fn story(world: &World, rng: &mut ChaCha8Rng) -> String {
    let cast = Cast::new(world, rng);
    let template = STORIES.choose(rng).expect("stories");
    let mut sentences: Vec<String> = template.iter().map(|s| cast.fill(s)).collect();
    if sentences.len() < 5 && rng.gen_bool(0.3) {
        sentences.insert(0, cast.fill(OPENINGS.choose(rng).expect("openings")));
    }
    if sentences.len() < 6 && rng.gen_bool(0.2) {
        sentences.push("The end.".to_string());
    }
    sentences.join(" ")
}

/// A few plain world facts.
fn fact_list(world: &World, rng: &mut ChaCha8Rng) -> String {
    let facts = world.facts();
    let n = rng.gen_range(3..=8);
    (0..n)
        .map(|_| facts.choose(rng).expect("facts").as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A few sums and differences.
fn arithmetic_list(rng: &mut ChaCha8Rng) -> String {
    let n = rng.gen_range(3..=8);
    let sentences: Vec<String> = (0..n)
        .map(|_| {
            let a = rng.gen_range(0..=MAX_OPERAND);
            let b = rng.gen_range(0..=MAX_OPERAND);
            if rng.gen_bool(0.5) {
                format!("{a} plus {b} is {}.", a + b)
            } else {
                format!(
                    "{} minus {} is {}.",
                    a.max(b),
                    a.min(b),
                    a.max(b) - a.min(b)
                )
            }
        })
        .collect();
    sentences.join(" ")
}

/// A few comparisons of numbers up to 99.
fn comparison_list(rng: &mut ChaCha8Rng) -> String {
    let n = rng.gen_range(3..=8);
    let sentences: Vec<String> = (0..n)
        .map(|_| {
            let (x, y) = distinct_pair(rng, MAX_COMPARED);
            let (big, small) = (x.max(y), x.min(y));
            if rng.gen_bool(0.8) {
                format!("{big} is bigger than {small}.")
            } else {
                format!("{small} is smaller than {big}.")
            }
        })
        .collect();
    sentences.join(" ")
}

/// Spelling facts about a few words.
fn spelling_list(world: &World, rng: &mut ChaCha8Rng) -> String {
    let n = rng.gen_range(2..=5);
    let sentences: Vec<String> = (0..n)
        .map(|_| {
            let word = world.words.choose(rng).expect("words");
            match rng.gen_range(0..3) {
                0 => backwards(word),
                1 => letter_count(word),
                _ => spelled_out(word),
            }
        })
        .collect();
    sentences.join(" ")
}

/// A few training questions, each followed on the next line by its canonical answer.
fn qa_paragraph(world: &World, qa_pools: &[Vec<Question>], rng: &mut ChaCha8Rng) -> String {
    let n = rng.gen_range(2..=5);
    let pairs: Vec<String> = (0..n)
        .filter_map(|_| {
            let pool = qa_pools.choose(rng)?;
            let task = pool.choose(rng)?.task(world)?;
            Some(format!("{}\n{}", task.prompt(), task.output))
        })
        .collect();
    pairs.join("\n\n")
}

fn backwards(word: &str) -> String {
    let reversed: String = word.chars().rev().collect();
    format!("{word} spelled backwards is {reversed}.")
}

fn letter_count(word: &str) -> String {
    format!("The word {word} has {} letters.", word.len())
}

/// "The word cat is spelled c a t." -- letter by letter, since BPE may hide the letters.
fn spelled_out(word: &str) -> String {
    let letters: Vec<String> = word.chars().map(String::from).collect();
    format!("The word {word} is spelled {}.", letters.join(" "))
}

fn colour_of(world: &World, object: &str) -> String {
    world
        .object(object)
        .map_or_else(String::new, |o| o.colour.clone())
}

/// "1 apple" / "3 apples".
fn count_of(n: u64, thing: &str) -> String {
    let plural = if n == 1 { "" } else { "s" };
    format!("{n} {thing}{plural}")
}

/// Two different numbers in 0..=max.
fn distinct_pair(rng: &mut ChaCha8Rng, max: u64) -> (u64, u64) {
    let x = rng.gen_range(0..=max);
    let y = (x + rng.gen_range(1..=max)) % (max + 1);
    (x, y)
}
