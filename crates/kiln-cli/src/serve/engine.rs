//! The model thread of `kiln serve`: the one owner of the model and its KV cache, scheduling
//! sequences onto cache slots between decoding steps (continuous batching).
//!
//! Each step it admits waiting sequences into free slots (prefilling each prompt into its slot),
//! then samples one token for every active sequence from that sequence's own logits with its own
//! RNG, sends the new text through the sequence's channel, and decodes the tokens of the sequences
//! that go on in one batched forward pass. A sequence leaves its slot when it ends (end-of-turn
//! token, stop string, `max_tokens`, full context) or when its client has gone (its channel is
//! closed), and the slot is free for the next waiting sequence at the next step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use kiln_data::{TextStream, Tokenizer};
use kiln_model::{sample_token, Activations, KvCache, Model, PackedWeights, Sampling};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::sync::{mpsc::UnboundedSender, oneshot};

/// Rows per forward call when decoding. The kernels compute every row of a product with at most
/// 16 rows on its own (one dot product per output, summed in a fixed order), so with these chunks
/// a sequence's logits, and with its own RNG its tokens, do not depend on which other sequences
/// share the step.
pub const DECODE_ROWS: usize = 16;

/// How a sequence's tokens are chosen and when it ends.
pub struct GenParams {
    pub sampling: Sampling,
    /// Tokens to generate at most (the end-of-turn token counts).
    pub max_tokens: usize,
    /// Tokens that end the sequence (not part of its text): the template's end of turn, EOT.
    pub stop_tokens: Vec<u32>,
    /// Strings that end the sequence; the text stops before the first one.
    pub stop_strings: Vec<String>,
}

/// One sequence of a request: its place among the request's choices, its prompt and its seed.
pub struct SeqSpec {
    pub index: usize,
    pub prompt: Arc<Vec<u32>>,
    pub seed: u64,
}

/// A generation request: its sequences share the settings and the channel of events.
pub struct GenJob {
    pub seqs: Vec<SeqSpec>,
    pub params: Arc<GenParams>,
    pub events: UnboundedSender<Event>,
}

/// Reward-model scores of rendered (prompt, response) sequences.
pub struct ScoreJob {
    pub seqs: Vec<Vec<u32>>,
    pub reply: oneshot::Sender<Vec<f32>>,
}

pub enum Job {
    Generate(GenJob),
    Score(ScoreJob),
}

/// Why a sequence ended, as OpenAI's `finish_reason` says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-turn token or a stop string.
    Stop,
    /// `max_tokens`, or the model's context is full.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What the model thread tells a request, per sequence (`index`).
#[derive(Debug)]
pub enum Event {
    /// More text of the sequence (never split inside a character, never part of a stop string).
    Text { index: usize, text: String },
    /// The sequence ended after `tokens` generated tokens.
    Done {
        index: usize,
        finish: Finish,
        tokens: usize,
    },
    /// The server stopped before the sequence ended.
    Aborted(String),
}

/// Counters and flags shared by the model thread and the HTTP side.
#[derive(Default)]
pub struct Shared {
    /// Sequences waiting for a slot. The HTTP side adds a request's sequences before sending the
    /// job (so that the queue's bound holds under concurrency); the model thread takes them off.
    pub queued: AtomicUsize,
    /// Sequences in a slot.
    pub active: AtomicUsize,
    pub completed: AtomicU64,
    /// Sequences dropped because their client went away.
    pub cancelled: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Shutdown has begun: new requests are refused.
    pub draining: AtomicBool,
    /// The shutdown timeout passed: fail what is left.
    pub abort: AtomicBool,
    /// The HTTP server has finished: the model thread exits once it is idle.
    pub closed: AtomicBool,
}

/// Bytes of a KV cache of `slots` sequences of the model's full context (keys and values, f32).
pub fn cache_bytes(model: &Model, slots: usize) -> usize {
    let cfg = &model.cfg;
    2 * cfg.n_layer * slots * cfg.n_ctx * cfg.kv_heads() * cfg.head_size() * 4
}

struct Pending {
    spec: SeqSpec,
    params: Arc<GenParams>,
    events: UnboundedSender<Event>,
}

/// A sequence in a slot.
struct Seq {
    slot: usize,
    index: usize,
    params: Arc<GenParams>,
    events: UnboundedSender<Event>,
    rng: ChaCha8Rng,
    /// Logits of the next token.
    logits: Vec<f32>,
    /// The text of the generated tokens (stop tokens excluded), decoded as they come.
    text: TextStream,
    /// Tokens generated, stop tokens included.
    generated: usize,
    /// Bytes of the text already sent.
    sent: usize,
    done: bool,
}

pub struct Engine {
    model: Model,
    /// The packed copy every product multiplies by (`--weights bf16|int8`).
    packed: Option<PackedWeights>,
    /// With the model's f32 weights, the block matrices in f32 panels that decoding steps multiply
    /// by ([`PackedWeights::f32_blocks`]): the bits of each row decoded alone on the model's weights
    /// (prefill stays on them, as in `kiln chat`).
    panels: Option<PackedWeights>,
    tokenizer: Arc<Tokenizer>,
    /// The cache (none for a model that only scores).
    cache: Option<KvCache>,
    free: Vec<usize>,
    queue: VecDeque<Pending>,
    active: Vec<Seq>,
    shared: Arc<Shared>,
    step_delay: Duration,
}

impl Engine {
    /// An engine with `slots` cache slots (0: scoring only).
    pub fn new(
        model: Model,
        (packed, panels): (Option<PackedWeights>, Option<PackedWeights>),
        tokenizer: Arc<Tokenizer>,
        slots: usize,
        shared: Arc<Shared>,
        step_delay: Duration,
    ) -> Self {
        let cache = (slots > 0).then(|| KvCache::new(&model, slots));
        Engine {
            model,
            packed,
            panels,
            tokenizer,
            cache,
            free: (0..slots).rev().collect(),
            queue: VecDeque::new(),
            active: Vec::new(),
            shared,
            step_delay,
        }
    }

    /// Serves jobs until the HTTP side has finished (`Shared::closed`, or every sender dropped)
    /// and no sequence is left.
    pub fn run(mut self, jobs: Receiver<Job>) {
        let mut open = true;
        loop {
            if self.shared.abort.load(Ordering::SeqCst) {
                self.abort_all("the server is shutting down and stopped this request");
            }
            if self.active.is_empty() && self.queue.is_empty() {
                if !open || self.shared.closed.load(Ordering::SeqCst) {
                    break;
                }
                match jobs.recv_timeout(Duration::from_millis(100)) {
                    Ok(job) => self.accept(job),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => open = false,
                }
            }
            while open {
                match jobs.try_recv() {
                    Ok(job) => self.accept(job),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            if self.shared.abort.load(Ordering::SeqCst) {
                continue;
            }
            self.admit();
            self.step();
            if !self.step_delay.is_zero() && !self.active.is_empty() {
                std::thread::sleep(self.step_delay);
            }
        }
    }

    fn accept(&mut self, job: Job) {
        match job {
            Job::Score(j) => {
                // Between steps; dropping the reply (when aborting) tells the handler.
                if !self.shared.abort.load(Ordering::SeqCst) {
                    let scores = self.score(&j.seqs);
                    let _ = j.reply.send(scores);
                }
            }
            Job::Generate(j) => {
                for spec in j.seqs {
                    self.queue.push_back(Pending {
                        spec,
                        params: j.params.clone(),
                        events: j.events.clone(),
                    });
                }
            }
        }
    }

    /// Moves waiting sequences into free slots, oldest first, prefilling each prompt.
    fn admit(&mut self) {
        let Some(cache) = self.cache.as_mut() else {
            return;
        };
        while !self.free.is_empty() {
            let Some(p) = self.queue.pop_front() else {
                break;
            };
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            if p.events.is_closed() {
                self.shared.cancelled.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            let slot = self.free.pop().expect("a free slot");
            cache.len[slot] = 0;
            let prompt = &p.spec.prompt;
            let logits = self.model.forward_cached_with(
                self.packed.as_ref(),
                cache,
                &[slot],
                prompt,
                prompt.len(),
            );
            self.active.push(Seq {
                slot,
                index: p.spec.index,
                params: p.params,
                events: p.events,
                rng: ChaCha8Rng::seed_from_u64(p.spec.seed),
                logits,
                text: TextStream::new(),
                generated: 0,
                sent: 0,
                done: false,
            });
            self.shared.active.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// One token for every active sequence, then one batched forward pass for those that go on.
    fn step(&mut self) {
        let Some(cache) = self.cache.as_mut() else {
            return;
        };
        if self.active.is_empty() {
            return;
        }
        let n_ctx = self.model.cfg.n_ctx;
        let mut feed = Vec::with_capacity(self.active.len());
        let mut feed_tokens = Vec::with_capacity(self.active.len());
        let mut sampled = 0;
        for (i, s) in self.active.iter_mut().enumerate() {
            if s.events.is_closed() {
                s.done = true;
                self.shared.cancelled.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            // The same order as `kiln chat` (`generate_with`): sample, then end at a stop token,
            // at max_tokens, or when the context is full.
            let tok = sample_token(&s.logits, &s.params.sampling, &mut s.rng);
            s.generated += 1;
            sampled += 1;
            let mut finish = None;
            let before = s.text.text().len();
            if s.params.stop_tokens.contains(&tok) {
                finish = Some(Finish::Stop);
            } else {
                s.text.push(&self.tokenizer, tok);
            }
            let at_length = s.generated >= s.params.max_tokens || cache.len[s.slot] >= n_ctx;
            if finish.is_some() || at_length {
                // No token follows: a last incomplete character too.
                s.text.finish(&self.tokenizer);
            }
            let text = s.text.text();
            let mut end = None;
            if finish.is_none() {
                if let Some(at) = find_stop_from(text, before, &s.params.stop_strings) {
                    finish = Some(Finish::Stop);
                    end = Some(at);
                }
            }
            if finish.is_none() && at_length {
                finish = Some(Finish::Length);
            }
            let end = match (finish, end) {
                (_, Some(at)) => at,
                (Some(_), None) => text.len(),
                (None, None) => sendable_end(text, s.sent, &s.params.stop_strings),
            };
            if end > s.sent {
                if let Some(delta) = text.get(s.sent..end) {
                    let ev = Event::Text {
                        index: s.index,
                        text: delta.to_string(),
                    };
                    if s.events.send(ev).is_err() {
                        s.done = true;
                        self.shared.cancelled.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                    s.sent = end;
                }
            }
            if let Some(finish) = finish {
                let _ = s.events.send(Event::Done {
                    index: s.index,
                    finish,
                    tokens: s.generated,
                });
                s.done = true;
                self.shared.completed.fetch_add(1, Ordering::SeqCst);
            } else {
                feed.push(i);
                feed_tokens.push(tok);
            }
        }
        self.shared
            .generated_tokens
            .fetch_add(sampled, Ordering::Relaxed);
        let v = self.model.cfg.vocab_size;
        let weights = self.packed.as_ref().or(self.panels.as_ref());
        for (rows, toks) in feed
            .chunks(DECODE_ROWS)
            .zip(feed_tokens.chunks(DECODE_ROWS))
        {
            let slots: Vec<usize> = rows.iter().map(|&i| self.active[i].slot).collect();
            let logits = self
                .model
                .forward_cached_with(weights, cache, &slots, toks, 1);
            for (r, &i) in rows.iter().enumerate() {
                self.active[i]
                    .logits
                    .copy_from_slice(&logits[r * v..(r + 1) * v]);
            }
        }
        let free = &mut self.free;
        let before = self.active.len();
        self.active.retain(|s| {
            if s.done {
                free.push(s.slot);
            }
            !s.done
        });
        self.shared
            .active
            .fetch_sub(before - self.active.len(), Ordering::SeqCst);
    }

    /// Fails every sequence, active or waiting, with `why`.
    fn abort_all(&mut self, why: &str) {
        for s in self.active.drain(..) {
            let _ = s.events.send(Event::Aborted(why.to_string()));
            self.free.push(s.slot);
            self.shared.active.fetch_sub(1, Ordering::SeqCst);
        }
        for p in self.queue.drain(..) {
            let _ = p.events.send(Event::Aborted(why.to_string()));
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Reward-model scores, computed as `kiln rm score` computes them.
    fn score(&self, seqs: &[Vec<u32>]) -> Vec<f32> {
        let cfg = &self.model.cfg;
        let mut acts = Activations::new(cfg, 16.min(seqs.len()).max(1), cfg.n_ctx, false);
        let mut scores = Vec::with_capacity(seqs.len());
        for chunk in seqs.chunks(acts.b) {
            scores.extend(kiln_train::rm::score_rows(&self.model, &mut acts, chunk));
        }
        scores
    }
}

/// Where the first stop string starts in `text`.
pub fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// [`find_stop`] when `text[..old]` is known to hold none: only a stop string that ends after
/// `old` can be new, so the search starts its longest length before it (linear time over a
/// sequence, not quadratic).
pub fn find_stop_from(text: &str, old: usize, stops: &[String]) -> Option<usize> {
    let longest = stops.iter().map(|s| s.len()).max()?;
    let mut from = old
        .saturating_sub(longest.saturating_sub(1))
        .min(text.len());
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    find_stop(&text[from..], stops).map(|at| from + at)
}

/// How much of `text` can be sent now: not an incomplete character (the decoder's U+FFFD at the
/// end, held back as `kiln chat` holds it), and not a tail that could be the start of a stop
/// string.
pub fn sendable_end(text: &str, sent: usize, stops: &[String]) -> usize {
    if text.ends_with('\u{fffd}') {
        return sent;
    }
    let mut hold = 0;
    for s in stops {
        for l in (1..s.len()).rev() {
            if l <= hold {
                break;
            }
            if s.is_char_boundary(l) && text.ends_with(&s[..l]) {
                hold = l;
                break;
            }
        }
    }
    text.len() - hold
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    /// Decodes `rows` sequences for a few steps, all together in chunks of [`DECODE_ROWS`], or
    /// each in a cache of its own, prefilling on `prefill`'s weights and decoding on `step`'s (as
    /// the engine does); returns every step's logits per row.
    fn decode(
        model: &Model,
        (prefill, step_w): (Option<&PackedWeights>, Option<&PackedWeights>),
        rows: usize,
        together: bool,
    ) -> Vec<Vec<f32>> {
        let v = model.cfg.vocab_size;
        let prompt = |r: usize| -> Vec<u32> {
            (0..3 + r % 5)
                .map(|i| ((r * 31 + i * 7) % v) as u32)
                .collect()
        };
        let step_token = |r: usize, step: usize| ((r * 13 + step * 101) % v) as u32;
        let mut out = vec![Vec::new(); rows];
        if together {
            let mut cache = KvCache::new(model, rows);
            for (r, o) in out.iter_mut().enumerate() {
                let p = prompt(r);
                o.extend(model.forward_cached_with(prefill, &mut cache, &[r], &p, p.len()));
            }
            for step in 0..3 {
                let all: Vec<usize> = (0..rows).collect();
                for chunk in all.chunks(DECODE_ROWS) {
                    let toks: Vec<u32> = chunk.iter().map(|&r| step_token(r, step)).collect();
                    let l = model.forward_cached_with(step_w, &mut cache, chunk, &toks, 1);
                    for (i, &r) in chunk.iter().enumerate() {
                        out[r].extend_from_slice(&l[i * v..(i + 1) * v]);
                    }
                }
            }
        } else {
            for (r, o) in out.iter_mut().enumerate() {
                let mut cache = KvCache::new(model, 1);
                let p = prompt(r);
                o.extend(model.forward_cached_with(prefill, &mut cache, &[0], &p, p.len()));
                for step in 0..3 {
                    o.extend(model.forward_cached_with(
                        step_w,
                        &mut cache,
                        &[0],
                        &[step_token(r, step)],
                        1,
                    ));
                }
            }
        }
        out
    }

    /// What makes results independent of the batch: a row's logits have the same bits whether it
    /// decodes alone or beside 19 others (two forward calls of 16 and 4 rows), with every weight
    /// format; and with f32 weights, decoding batches on the f32 panels of the block matrices
    /// gives each row the bits it gets decoding alone on the model's own weights (`kiln chat`).
    #[test]
    fn a_row_decodes_to_the_same_bits_in_any_batch() {
        use kiln_kernels::PackedFormat;
        use kiln_model::{Family, ModelConfig};
        let same = |a: &[Vec<f32>], b: &[Vec<f32>], what: &str| {
            for (r, (x, y)) in a.iter().zip(b).enumerate() {
                let eq = x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
                assert!(eq, "{what}: row {r} differs");
            }
        };
        for family in [Family::Gpt2, Family::Llama] {
            let cfg = ModelConfig {
                vocab_size: 300,
                n_ctx: 32,
                n_layer: 2,
                n_head: 4,
                n_kv_head: if family == Family::Llama { 2 } else { 0 },
                n_embd: 64,
                family,
                ..Default::default()
            };
            let model = Model::new(cfg, 5);
            for format in [None, Some(PackedFormat::Int8), Some(PackedFormat::Bf16)] {
                let packed = format.map(|f| PackedWeights::new(&model, f));
                let w = (packed.as_ref(), packed.as_ref());
                let alone = decode(&model, w, 20, false);
                let together = decode(&model, w, 20, true);
                same(&alone, &together, &format!("{family:?} {format:?}"));
            }
            // The vector paths run both products as the same chains of fused multiply-adds.
            if kiln_kernels::simd_level_name() != "base" {
                let panels = PackedWeights::f32_blocks(&model);
                let alone = decode(&model, (None, None), 20, false);
                let together = decode(&model, (None, Some(&panels)), 20, true);
                same(&alone, &together, &format!("{family:?} f32 panels"));
            }
        }
    }

    #[test]
    fn stop_strings_are_found_and_their_starts_held_back() {
        let st = stops(&["\n\n", "END"]);
        assert_eq!(find_stop("abc END x\n\n", &st), Some(4));
        assert_eq!(find_stop("abc", &st), None);
        // A tail that may begin a stop string waits; anything else goes.
        assert_eq!(sendable_end("hello E", 0, &st), 6);
        assert_eq!(sendable_end("hello EN", 0, &st), 6);
        assert_eq!(sendable_end("hello\n", 0, &st), 5);
        assert_eq!(sendable_end("hello EX", 0, &st), 8);
        assert_eq!(sendable_end("hello", 0, &[]), 5);
        // An incomplete character at the end is held back whole.
        assert_eq!(sendable_end("ab\u{fffd}", 1, &[]), 1);
        // Multi-byte stop strings are cut at character boundaries only.
        let st = stops(&["é!"]);
        assert_eq!(sendable_end("café", 0, &st), 3);
    }

    /// Searching only the new tail finds what searching the whole text finds, as the text grows
    /// a character at a time, multi-byte stop strings and characters included.
    #[test]
    fn the_tail_search_finds_the_whole_texts_stop() {
        let st = stops(&["ab", "é!", "bcé", "x"]);
        let alphabet = ['a', 'b', 'c', 'é', '!', 'x'];
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for _ in 0..300 {
            let mut text = String::new();
            let mut old = 0;
            for _ in 0..12 {
                // Grow by one to three characters (a token's piece), then search.
                for _ in 0..rand::Rng::gen_range(&mut rng, 1..4) {
                    text.push(alphabet[rand::Rng::gen_range(&mut rng, 0..alphabet.len())]);
                }
                let whole = find_stop(&text, &st);
                assert_eq!(
                    find_stop_from(&text, old, &st),
                    whole,
                    "{text:?} from {old}"
                );
                if whole.is_some() {
                    break;
                }
                old = text.len();
            }
        }
        assert_eq!(find_stop_from("abc", 3, &[]), None);
    }
}
