//! The chat template: conversations -> token sequences with loss masks, and batching.
//!
//! A [`ChatTemplate`] holds one template string per role with a `{content}` slot, e.g. the
//! default `"<|user|>{content}<|end|>"`. In a template, `<|name|>` is the single special token of
//! that name (see [`ids`]); any other text is encoded with the [`TextEncoder`]. The message
//! content itself is always encoded as text. The default rendering is
//!
//! ```text
//! [SYSTEM] system text [END]  [USER] user text [END]  [ASSISTANT] response text [END]  ...
//! ```
//!
//! with no EOT appended. The loss falls on every assistant turn's content tokens and on what
//! follows `{content}` in the assistant template (the END token); role tokens, system and user
//! turns carry none. The template is serialised to JSON and stored with checkpoints so later
//! stages render exactly as training did.

use serde::{Deserialize, Serialize};

use crate::datasets::{Conversation, Message, Role};

/// Text -> token ids, with no special-token parsing in `text` (message content is always plain
/// text). The tokenizer is meant to implement it; tests use tiny fakes.
pub trait TextEncoder {
    fn encode(&self, text: &str) -> Vec<u32>;
}

/// The fixed special-token ids (guaranteed by the tokenizer; the constants are those of
/// [`crate::tokenizer::special`]).
pub mod ids {
    pub use crate::tokenizer::special::{ASSISTANT, END, EOT, MASK, PAD, SEP, SYSTEM, USER};

    /// `(name, id)` of every special token; the name is written `<|name|>` in templates.
    pub const ALL: [(&str, u32); 8] = [
        ("endoftext", EOT),
        ("pad", PAD),
        ("system", SYSTEM),
        ("user", USER),
        ("assistant", ASSISTANT),
        ("end", END),
        ("mask", MASK),
        ("sep", SEP),
    ];

    /// The id of the special token `<|name|>`.
    pub fn by_name(name: &str) -> Option<u32> {
        ALL.iter().find(|(n, _)| *n == name).map(|&(_, id)| id)
    }
}

/// The slot that a role template's message content goes into.
pub const CONTENT_SLOT: &str = "{content}";

/// Errors of the chat template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A template field that cannot be used.
    #[error("chat template field \"{field}\": {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// A template JSON that does not parse.
    #[error("chat template JSON: {0}")]
    Json(String),
    /// A conversation that cannot be rendered for training.
    #[error("cannot render conversation: {0}")]
    Conversation(String),
    /// A Jinja chat template that does not compile or render.
    #[error("Jinja chat template: {0}")]
    Jinja(String),
}

/// How conversations are turned into tokens. Each field is a template for one role's turn and
/// must contain `{content}` exactly once; `<|name|>` stands for a special token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatTemplate {
    /// Default `"<|system|>{content}<|end|>"`.
    pub system: String,
    /// Default `"<|user|>{content}<|end|>"`.
    pub user: String,
    /// Default `"<|assistant|>{content}<|end|>"`. The part after `{content}` (the end-of-turn
    /// marker) must not be empty: it is how the model learns to stop, and it carries loss.
    pub assistant: String,
}

impl Default for ChatTemplate {
    fn default() -> Self {
        ChatTemplate {
            system: "<|system|>{content}<|end|>".into(),
            user: "<|user|>{content}<|end|>".into(),
            assistant: "<|assistant|>{content}<|end|>".into(),
        }
    }
}

/// A piece of a compiled template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Special(u32),
    Text(String),
}

/// A role template split at its `{content}` slot.
#[derive(Debug, Clone)]
struct Parts {
    pre: Vec<Seg>,
    post: Vec<Seg>,
}

#[derive(Debug, Clone)]
struct Compiled {
    system: Parts,
    user: Parts,
    assistant: Parts,
}

impl Compiled {
    fn role(&self, role: Role) -> &Parts {
        match role {
            Role::System => &self.system,
            Role::User => &self.user,
            Role::Assistant => &self.assistant,
        }
    }
}

fn parse_segs(field: &'static str, s: &str) -> Result<Vec<Seg>, TemplateError> {
    let mut segs = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("<|") {
        let Some(len) = rest[start + 2..].find("|>") else {
            return Err(TemplateError::Invalid {
                field,
                message: format!("unterminated special token in {s:?} (\"<|\" without \"|>\")"),
            });
        };
        let name = &rest[start + 2..start + 2 + len];
        let id = ids::by_name(name).ok_or_else(|| TemplateError::Invalid {
            field,
            message: format!(
                "unknown special token <|{name}|> (known: {})",
                ids::ALL
                    .iter()
                    .map(|(n, _)| format!("<|{n}|>"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })?;
        if start > 0 {
            segs.push(Seg::Text(rest[..start].to_string()));
        }
        segs.push(Seg::Special(id));
        rest = &rest[start + 2 + len + 2..];
    }
    if !rest.is_empty() {
        segs.push(Seg::Text(rest.to_string()));
    }
    Ok(segs)
}

fn compile_role(field: &'static str, template: &str) -> Result<Parts, TemplateError> {
    let mut split = template.split(CONTENT_SLOT);
    let pre = split.next().unwrap_or_default();
    let Some(post) = split.next() else {
        let what = if field == "assistant" {
            "the response slot"
        } else {
            "the content slot"
        };
        return Err(TemplateError::Invalid {
            field,
            message: format!("{template:?} has no {CONTENT_SLOT} slot ({what} is required)"),
        });
    };
    if split.next().is_some() {
        return Err(TemplateError::Invalid {
            field,
            message: format!("{template:?} has {CONTENT_SLOT} more than once"),
        });
    }
    let parts = Parts {
        pre: parse_segs(field, pre)?,
        post: parse_segs(field, post)?,
    };
    if field == "assistant" && parts.post.is_empty() {
        return Err(TemplateError::Invalid {
            field,
            message: format!(
                "{template:?} has nothing after {CONTENT_SLOT}: an end-of-turn marker such as \
                 <|end|> is needed so the model learns where a response ends"
            ),
        });
    }
    Ok(parts)
}

fn emit(enc: &dyn TextEncoder, segs: &[Seg], out: &mut Vec<u32>) {
    for s in segs {
        match s {
            Seg::Special(id) => out.push(*id),
            Seg::Text(t) => out.extend(enc.encode(t)),
        }
    }
}

/// A rendered example: `loss_mask[j]` is true where token `j` is a target to predict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rendered {
    pub tokens: Vec<u32>,
    pub loss_mask: Vec<bool>,
}

impl Rendered {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    /// Number of target tokens.
    pub fn num_targets(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m).count()
    }
    fn push(&mut self, tokens: &[u32], loss: bool) {
        self.tokens.extend_from_slice(tokens);
        self.loss_mask
            .resize(self.loss_mask.len() + tokens.len(), loss);
    }
}

impl ChatTemplate {
    /// Checks every field: exactly one `{content}` each, known special tokens, and a non-empty
    /// end-of-turn marker after the assistant's `{content}`.
    pub fn validate(&self) -> Result<(), TemplateError> {
        self.compile().map(|_| ())
    }

    fn compile(&self) -> Result<Compiled, TemplateError> {
        Ok(Compiled {
            system: compile_role("system", &self.system)?,
            user: compile_role("user", &self.user)?,
            assistant: compile_role("assistant", &self.assistant)?,
        })
    }

    /// The template as JSON (stored with checkpoints).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a ChatTemplate always serialises")
    }

    /// Parses and validates a template stored as JSON.
    pub fn from_json(json: &str) -> Result<Self, TemplateError> {
        let t: ChatTemplate =
            serde_json::from_str(json).map_err(|e| TemplateError::Json(e.to_string()))?;
        t.validate()?;
        Ok(t)
    }

    fn render_messages(
        &self,
        c: &Compiled,
        enc: &dyn TextEncoder,
        messages: &[Message],
        assistant_loss: bool,
        out: &mut Rendered,
    ) {
        let mut buf = Vec::new();
        for m in messages {
            let parts = c.role(m.role);
            let loss = assistant_loss && m.role == Role::Assistant;
            buf.clear();
            emit(enc, &parts.pre, &mut buf);
            out.push(&buf, false);
            out.push(&enc.encode(&m.content), loss);
            buf.clear();
            emit(enc, &parts.post, &mut buf);
            out.push(&buf, loss);
        }
    }

    /// Renders a whole training conversation. Loss falls on every assistant turn's content and
    /// end-of-turn tokens; role tokens and system/user turns carry none. No EOT is appended.
    /// Errors on an invalid template and on a conversation without an assistant turn.
    pub fn render_conversation(
        &self,
        enc: &dyn TextEncoder,
        conv: &Conversation,
    ) -> Result<Rendered, TemplateError> {
        let c = self.compile()?;
        if !conv.messages.iter().any(|m| m.role == Role::Assistant) {
            return Err(TemplateError::Conversation(
                "no assistant turn: nothing to learn".into(),
            ));
        }
        let mut out = Rendered::default();
        self.render_messages(&c, enc, &conv.messages, true, &mut out);
        Ok(out)
    }

    /// The conversation so far followed by the assistant prefix (`[ASSISTANT]` by default),
    /// ready for generation.
    pub fn render_prompt(
        &self,
        enc: &dyn TextEncoder,
        prompt: &[Message],
    ) -> Result<Vec<u32>, TemplateError> {
        let c = self.compile()?;
        let mut out = Rendered::default();
        self.render_messages(&c, enc, prompt, false, &mut out);
        let mut tokens = out.tokens;
        emit(enc, &c.assistant.pre, &mut tokens);
        Ok(tokens)
    }

    /// A response as it follows [`render_prompt`](Self::render_prompt): its tokens then the
    /// end-of-turn marker (`[END]` by default).
    pub fn render_response(
        &self,
        enc: &dyn TextEncoder,
        response: &str,
    ) -> Result<Vec<u32>, TemplateError> {
        let c = self.compile()?;
        let mut tokens = enc.encode(response);
        emit(enc, &c.assistant.post, &mut tokens);
        Ok(tokens)
    }

    /// `render_prompt(prompt) ++ render_response(response)` with loss only on the response part
    /// (reward-model and PPO examples). Equal in tokens to rendering the conversation
    /// `prompt ++ [Assistant(response)]`.
    pub fn render_prompt_response(
        &self,
        enc: &dyn TextEncoder,
        prompt: &[Message],
        response: &str,
    ) -> Result<Rendered, TemplateError> {
        let p = self.render_prompt(enc, prompt)?;
        let r = self.render_response(enc, response)?;
        let mut out = Rendered::default();
        out.push(&p, false);
        out.push(&r, true);
        Ok(out)
    }

    /// The stop tokens of generation: the special tokens of the assistant's end-of-turn marker,
    /// plus EOT.
    pub fn stop_tokens(&self) -> Result<Vec<u32>, TemplateError> {
        let c = self.compile()?;
        let mut stops: Vec<u32> = c
            .assistant
            .post
            .iter()
            .filter_map(|s| match s {
                Seg::Special(id) => Some(*id),
                Seg::Text(_) => None,
            })
            .collect();
        if !stops.contains(&ids::EOT) {
            stops.push(ids::EOT);
        }
        Ok(stops)
    }
}

/// Builds a training example of at most `max_len` tokens.
///
/// The response is the last run of target tokens (the last assistant turn's content and
/// end-of-turn marker). An example that fits is returned unchanged. Otherwise tokens after the
/// response (no loss) are dropped, then the START of the prompt, keeping the whole response and
/// as much of the prompt's end as fits. Returns `None` (the caller counts it as skipped) when the
/// example has no target token, or when the response alone does not fit with at least one prompt
/// token before it.
pub fn fit_example(r: &Rendered, max_len: usize) -> Option<Rendered> {
    assert_eq!(
        r.tokens.len(),
        r.loss_mask.len(),
        "Rendered tokens and loss_mask differ in length"
    );
    let last = r.loss_mask.iter().rposition(|&m| m)?;
    if r.len() <= max_len {
        return Some(r.clone());
    }
    let end = last + 1;
    let resp_start = r.loss_mask[..end]
        .iter()
        .rposition(|&m| !m)
        .map_or(0, |i| i + 1);
    // At least one prompt token must precede the response.
    if end - resp_start + 1 > max_len || resp_start == 0 {
        return None;
    }
    let start = end.saturating_sub(max_len);
    Some(Rendered {
        tokens: r.tokens[start..end].to_vec(),
        loss_mask: r.loss_mask[start..end].to_vec(),
    })
}

/// A training batch, every field row-major `[b * t]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// Input tokens, right-padded with [`ids::PAD`].
    pub tokens: Vec<u32>,
    /// Next-token targets: `targets[i] = tokens[i + 1]` where that token is a target of the same
    /// example, `u32::MAX` (no loss) elsewhere.
    pub targets: Vec<u32>,
    /// Attention key mask: true for real tokens, false for padding.
    pub valid: Vec<bool>,
    /// Example id within the row; attention never crosses segments. All 0 from [`collate`];
    /// 0, 1, 2, ... per packed example from [`pack`], padding getting the next unused id.
    pub segments: Vec<u32>,
    /// Position ids: 0, 1, 2, ... restarting at each packed segment (padding: 0.. from where it
    /// starts in [`pack`], the row position in [`collate`]; its value is irrelevant).
    pub positions: Vec<u32>,
    pub b: usize,
    pub t: usize,
}

/// The value of `targets` where there is no loss.
pub const IGNORE: u32 = u32::MAX;

impl Batch {
    fn with_rows(b: usize, t: usize) -> Batch {
        Batch {
            tokens: vec![ids::PAD; b * t],
            targets: vec![IGNORE; b * t],
            valid: vec![false; b * t],
            segments: vec![0; b * t],
            positions: vec![0; b * t],
            b,
            t,
        }
    }

    /// Number of positions that carry loss.
    pub fn num_targets(&self) -> usize {
        self.targets.iter().filter(|&&x| x != IGNORE).count()
    }

    /// Rows `start..end` as a batch of their own.
    pub fn slice_rows(&self, start: usize, end: usize) -> Batch {
        assert!(start <= end && end <= self.b, "row range out of bounds");
        let r = start * self.t..end * self.t;
        Batch {
            tokens: self.tokens[r.clone()].to_vec(),
            targets: self.targets[r.clone()].to_vec(),
            valid: self.valid[r.clone()].to_vec(),
            segments: self.segments[r.clone()].to_vec(),
            positions: self.positions[r].to_vec(),
            b: end - start,
            t: self.t,
        }
    }

    /// Writes example `ex` into `row` at offset `off` as segment `seg`.
    fn place(&mut self, row: usize, off: usize, seg: u32, ex: &Rendered) {
        let base = row * self.t + off;
        let n = ex.len();
        for j in 0..n {
            let i = base + j;
            self.tokens[i] = ex.tokens[j];
            self.valid[i] = true;
            self.segments[i] = seg;
            self.positions[i] = j as u32;
            if j + 1 < n && ex.loss_mask[j + 1] {
                self.targets[i] = ex.tokens[j + 1];
            }
        }
    }
}

fn check_example(ex: &Rendered, t: usize) {
    assert_eq!(
        ex.tokens.len(),
        ex.loss_mask.len(),
        "Rendered tokens and loss_mask differ in length"
    );
    assert!(
        ex.len() <= t,
        "example of {} tokens does not fit a row of {t}: call fit_example first",
        ex.len()
    );
}

/// One example per row, right-padded with PAD to length `t`: `targets[i] = tokens[i + 1]` when
/// `loss_mask[i + 1]`, else `u32::MAX`; padding has `valid = false` and no target; segments are
/// all 0; positions are 0..t.
///
/// # Panics
/// When an example is longer than `t` (use [`fit_example`] first).
pub fn collate(examples: &[Rendered], t: usize) -> Batch {
    let mut batch = Batch::with_rows(examples.len(), t);
    for (row, ex) in examples.iter().enumerate() {
        check_example(ex, t);
        batch.place(row, 0, 0, ex);
        for j in ex.len()..t {
            batch.positions[row * t + j] = j as u32;
        }
    }
    batch
}

/// How many of the most recent rows [`pack`] tries before opening a new one.
const PACK_WINDOW: usize = 32;

/// Packs several examples per row of length `t` (first fit among the 32 most recent rows, in
/// input order), returning all rows as one batch (`b` = number of rows; cut it with
/// [`Batch::slice_rows`]). Each example is its own segment (0, 1, ... within the row; padding gets
/// the next unused id) with positions restarting at 0; targets never cross segments. Empty
/// examples are dropped.
///
/// # Panics
/// When an example is longer than `t` (use [`fit_example`] first).
pub fn pack(examples: &[Rendered], t: usize) -> Batch {
    // rows[r] = (used length, example indices)
    let mut rows: Vec<(usize, Vec<usize>)> = Vec::new();
    for (i, ex) in examples.iter().enumerate() {
        check_example(ex, t);
        if ex.is_empty() {
            continue;
        }
        let from = rows.len().saturating_sub(PACK_WINDOW);
        match rows[from..]
            .iter_mut()
            .find(|(used, _)| used + ex.len() <= t)
        {
            Some(row) => {
                row.0 += ex.len();
                row.1.push(i);
            }
            None => rows.push((ex.len(), vec![i])),
        }
    }
    let mut batch = Batch::with_rows(rows.len(), t);
    for (r, (used, members)) in rows.iter().enumerate() {
        let mut off = 0;
        for (seg, &i) in members.iter().enumerate() {
            batch.place(r, off, seg as u32, &examples[i]);
            off += examples[i].len();
        }
        for (p, j) in (*used..t).enumerate() {
            batch.segments[r * t + j] = members.len() as u32;
            batch.positions[r * t + j] = p as u32;
        }
    }
    batch
}
