//! The demo world: a few characters living in invented towns, coloured objects, pets and a
//! list of short words. Everything is drawn from fixed lists below by a seeded RNG, so a seed
//! fully determines the world.

use std::path::Path;

use anyhow::{Context, Result};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{rng, streams};

/// Number of characters, places and objects in a world. Two characters per place keeps the
/// "who lives where" facts balanced.
pub const NUM_CHARACTERS: usize = 24;
pub const NUM_PLACES: usize = 12;
pub const NUM_OBJECTS: usize = 30;

/// First names; short so that a small BPE vocabulary gives most of them a single token.
const NAMES: &[&str] = &[
    "Mia", "Tom", "Ava", "Leo", "Zoe", "Max", "Ivy", "Sam", "Ben", "Amy", "Eli", "Ada", "Noah",
    "Emma", "Liam", "Lily", "Jack", "Ruby", "Owen", "Nora", "Finn", "Rosa", "Hugo", "Ella", "Theo",
    "Isla", "Jude", "Maya", "Luke", "Anna", "Otis", "Cora", "Ezra", "Lena", "Milo", "Tess",
];

/// Invented town names (no real places, so facts cannot clash with anything else).
const PLACES: &[&str] = &[
    "Oakton",
    "Ashford",
    "Millbrook",
    "Fernvale",
    "Stonehill",
    "Brookside",
    "Pinecrest",
    "Redwater",
    "Elmwood",
    "Foxley",
    "Marshby",
    "Windmere",
    "Larkfield",
    "Greystone",
    "Birchley",
    "Rosemoor",
    "Thornbury",
    "Clearwell",
];

/// Objects, one word each (the colour question and the judge rely on that).
const OBJECTS: &[&str] = &[
    "ball", "cup", "hat", "kite", "book", "box", "bag", "bike", "boat", "drum", "lamp", "coat",
    "sock", "shoe", "bell", "key", "pen", "mug", "bowl", "chair", "clock", "spoon", "brush",
    "train", "doll", "fan", "rope", "tent", "sled", "flag", "jar", "vase", "scarf", "shell",
];

/// Exactly eight colours, each used by at least one object.
pub const COLOURS: &[&str] = &[
    "red", "blue", "green", "yellow", "pink", "purple", "orange", "brown",
];

/// Pet animals.
const ANIMALS: &[&str] = &[
    "dog", "cat", "rabbit", "fish", "bird", "mouse", "frog", "duck", "goat", "pony",
];

/// Words for the spelling tasks: 3-5 lowercase letters, no palindromes (a palindrome spelled
/// backwards is itself, which would make "wrong" answers right).
const WORDS: &[&str] = &[
    "cat", "dog", "sun", "hat", "cup", "map", "pen", "box", "fox", "bus", "bed", "pig", "cow",
    "hen", "egg", "jam", "leg", "arm", "toy", "van", "car", "bat", "rat", "log", "net", "pot",
    "web", "ant", "bee", "owl", "yak", "fig", "nut", "ice", "sky", "frog", "fish", "bird", "milk",
    "tree", "book", "cake", "rain", "snow", "star", "moon", "ship", "shoe", "sock", "ring", "bell",
    "door", "lamp", "kite", "nest", "leaf", "rock", "sand", "hill", "lake", "wind", "corn", "duck",
    "goat", "lion", "bear", "wolf", "seed", "coat", "soup", "apple", "bread", "chair", "cloud",
    "grass", "house", "horse", "mouse", "plant", "river", "stone", "table", "tiger", "train",
    "water", "zebra", "light", "smile", "candy", "lemon", "melon", "robot", "sheep", "snake",
    "spoon", "truck", "watch", "queen", "piano", "clock",
];

/// One character and the facts about them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Character {
    pub name: String,
    /// The town the character lives in (one of `World::places`).
    pub place: String,
    /// The character's favourite object (one of `World::objects`).
    pub favourite: String,
    /// The character's pet animal.
    pub pet: String,
}

/// One object and its colour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    pub name: String,
    pub colour: String,
}

/// The whole demo world. Serialized as `world.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct World {
    pub seed: u64,
    pub characters: Vec<Character>,
    pub places: Vec<String>,
    pub objects: Vec<Object>,
    pub colours: Vec<String>,
    /// Words used by the "reverse" and "count" tasks.
    pub words: Vec<String>,
}

impl World {
    /// Builds the world for `seed`. Deterministic: same seed, same world.
    pub fn generate(seed: u64) -> World {
        let mut rng = rng(seed, streams::WORLD);
        let names = pick(&mut rng, NAMES, NUM_CHARACTERS);
        let places = pick(&mut rng, PLACES, NUM_PLACES);
        let object_names = pick(&mut rng, OBJECTS, NUM_OBJECTS);
        let colours: Vec<String> = COLOURS.iter().map(|c| c.to_string()).collect();

        // Colours are dealt round-robin over the (already shuffled) objects so that every
        // colour is used and no colour dominates.
        let colour_offset = rng.gen_range(0..colours.len());
        let objects: Vec<Object> = object_names
            .iter()
            .enumerate()
            .map(|(i, name)| Object {
                name: name.clone(),
                colour: colours[(i + colour_offset) % colours.len()].clone(),
            })
            .collect();

        // Exactly NUM_CHARACTERS / NUM_PLACES residents per place, in a random arrangement.
        let mut slots: Vec<usize> = (0..NUM_CHARACTERS).map(|i| i % NUM_PLACES).collect();
        slots.shuffle(&mut rng);
        let characters = names
            .iter()
            .zip(slots)
            .map(|(name, slot)| Character {
                name: name.clone(),
                place: places[slot].clone(),
                favourite: objects[rng.gen_range(0..objects.len())].name.clone(),
                pet: ANIMALS[rng.gen_range(0..ANIMALS.len())].to_string(),
            })
            .collect();

        let words = WORDS.iter().map(|w| w.to_string()).collect();
        World {
            seed,
            characters,
            places,
            objects,
            colours,
            words,
        }
    }

    /// Reads a `world.json` written by [`crate::generate`].
    pub fn load(path: &Path) -> Result<World> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading world file {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// The character called `name`, if any.
    pub fn character(&self, name: &str) -> Option<&Character> {
        self.characters.iter().find(|c| c.name == name)
    }

    /// The object called `name`, if any.
    pub fn object(&self, name: &str) -> Option<&Object> {
        self.objects.iter().find(|o| o.name == name)
    }

    /// The characters living in `place`.
    pub fn residents(&self, place: &str) -> Vec<&Character> {
        self.characters
            .iter()
            .filter(|c| c.place == place)
            .collect()
    }

    /// Every fact of the world as one plain sentence each, in a fixed order. The corpus
    /// contains each of these sentences verbatim.
    pub fn facts(&self) -> Vec<String> {
        let mut facts = Vec::new();
        for c in &self.characters {
            facts.push(format!("{} lives in {}.", c.name, c.place));
            facts.push(format!("{} has {}.", c.name, with_article(&c.pet)));
            facts.push(format!("{} likes the {} best.", c.name, c.favourite));
        }
        for o in &self.objects {
            facts.push(format!("The {} is {}.", o.name, o.colour));
        }
        facts
    }
}

/// "a dog" / "an owl".
pub(crate) fn with_article(noun: &str) -> String {
    let vowel = noun.starts_with(['a', 'e', 'i', 'o', 'u']);
    format!("{} {noun}", if vowel { "an" } else { "a" })
}

/// `n` distinct entries of `list` in random order.
fn pick(rng: &mut ChaCha8Rng, list: &[&str], n: usize) -> Vec<String> {
    list.choose_multiple(rng, n)
        .map(|s| s.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_lists_are_sane() {
        for list in [NAMES, PLACES, OBJECTS, COLOURS, ANIMALS, WORDS] {
            let mut sorted = list.to_vec();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), list.len(), "duplicate entry in {list:?}");
        }
        assert!(NAMES.len() >= NUM_CHARACTERS);
        assert!(PLACES.len() >= NUM_PLACES);
        assert!(OBJECTS.len() >= NUM_OBJECTS);
        assert_eq!(NUM_CHARACTERS % NUM_PLACES, 0);
        for w in WORDS {
            assert!((3..=5).contains(&w.len()), "{w} is not 3-5 letters");
            assert!(w.bytes().all(|b| b.is_ascii_lowercase()), "{w}");
            let reversed: String = w.chars().rev().collect();
            assert_ne!(&reversed, w, "{w} is a palindrome");
        }
        for o in OBJECTS {
            assert!(o.bytes().all(|b| b.is_ascii_lowercase()), "{o}");
        }
    }

    #[test]
    fn world_is_deterministic_and_complete() {
        let a = World::generate(7);
        assert_eq!(a, World::generate(7));
        assert_ne!(a, World::generate(8));
        assert_eq!(a.characters.len(), NUM_CHARACTERS);
        assert_eq!(a.objects.len(), NUM_OBJECTS);
        for p in &a.places {
            assert_eq!(a.residents(p).len(), NUM_CHARACTERS / NUM_PLACES, "{p}");
        }
        for colour in &a.colours {
            assert!(a.objects.iter().any(|o| &o.colour == colour), "{colour}");
        }
        for c in &a.characters {
            assert!(a.object(&c.favourite).is_some());
        }
    }
}
