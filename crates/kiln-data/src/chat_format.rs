//! One interface for chat templates: [`ChatFormat::render`] turns messages into token ids with a
//! loss mask. Two implementations: [`KilnChat`], Kiln's JSON template ([`ChatTemplate`]), and
//! [`JinjaChat`], a Hugging Face Jinja `chat_template` rendered with `minijinja` as
//! `transformers`' `apply_chat_template` renders it.
//!
//! The Jinja template's loss mask does not depend on knowing the template's strings: the
//! conversation is rendered prefix by prefix, and the tokens that each assistant message adds
//! (between the rendering of the messages before it with the generation prompt and the rendering
//! that includes it) are the ones trained on, up to and including the last stop token
//! (end-of-turn or end-of-sequence) among them.

use std::sync::Arc;

use crate::datasets::{Conversation, Message, Role};
use crate::template::{ChatTemplate, Rendered, TemplateError, TextEncoder};
use crate::Tokenizer;

impl<T: TextEncoder + ?Sized> TextEncoder for &T {
    fn encode(&self, text: &str) -> Vec<u32> {
        (**self).encode(text)
    }
}

/// A chat template bound to its tokenizer.
pub trait ChatFormat {
    /// Renders `messages` (and, with `add_generation_prompt`, what opens the assistant's reply).
    /// `loss_mask` is true on the tokens every assistant message adds, its end-of-turn token
    /// included.
    fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Rendered, TemplateError>;

    /// Tokens that end a reply (generation stops at any of them).
    fn stop_tokens(&self) -> Result<Vec<u32>, TemplateError>;

    /// A training conversation; an error without an assistant turn.
    fn render_conversation(&self, conv: &Conversation) -> Result<Rendered, TemplateError> {
        if !conv.messages.iter().any(|m| m.role == Role::Assistant) {
            return Err(TemplateError::Conversation(
                "no assistant turn: nothing to learn".into(),
            ));
        }
        self.render(&conv.messages, false)
    }

    /// The conversation so far followed by the assistant prefix, ready for generation.
    fn render_prompt(&self, prompt: &[Message]) -> Result<Vec<u32>, TemplateError> {
        Ok(self.render(prompt, true)?.tokens)
    }

    /// A prompt and one response, loss only on the response (reward-model and PPO examples).
    fn render_prompt_response(
        &self,
        prompt: &[Message],
        response: &str,
    ) -> Result<Rendered, TemplateError>;
}

/// Kiln's JSON template with the encoder of its message text.
#[derive(Clone)]
pub struct KilnChat<E> {
    pub template: ChatTemplate,
    pub enc: E,
}

impl<E: TextEncoder> ChatFormat for KilnChat<E> {
    fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Rendered, TemplateError> {
        if add_generation_prompt {
            let tokens = self.template.render_prompt(&self.enc, messages)?;
            let loss_mask = vec![false; tokens.len()];
            return Ok(Rendered { tokens, loss_mask });
        }
        if messages.iter().any(|m| m.role == Role::Assistant) {
            return self.template.render_conversation(
                &self.enc,
                &Conversation {
                    messages: messages.to_vec(),
                },
            );
        }
        // No assistant turn: the prompt's tokens without the assistant prefix.
        let with = self.template.render_prompt(&self.enc, messages)?;
        let prefix = self.template.render_prompt(&self.enc, &[])?;
        let tokens = with[..with.len() - prefix.len()].to_vec();
        let loss_mask = vec![false; tokens.len()];
        Ok(Rendered { tokens, loss_mask })
    }

    fn stop_tokens(&self) -> Result<Vec<u32>, TemplateError> {
        self.template.stop_tokens()
    }

    fn render_conversation(&self, conv: &Conversation) -> Result<Rendered, TemplateError> {
        self.template.render_conversation(&self.enc, conv)
    }

    fn render_prompt(&self, prompt: &[Message]) -> Result<Vec<u32>, TemplateError> {
        self.template.render_prompt(&self.enc, prompt)
    }

    fn render_prompt_response(
        &self,
        prompt: &[Message],
        response: &str,
    ) -> Result<Rendered, TemplateError> {
        self.template
            .render_prompt_response(&self.enc, prompt, response)
    }
}

/// A Hugging Face Jinja chat template with its tokenizer.
#[derive(Clone)]
pub struct JinjaChat {
    source: String,
    env: Arc<minijinja::Environment<'static>>,
    tok: Tokenizer,
}

const NAME: &str = "chat_template";

fn jinja_err(e: minijinja::Error) -> TemplateError {
    if e.kind() == minijinja::ErrorKind::InvalidOperation {
        if let Some(detail) = e.detail() {
            if let Some(msg) = detail.strip_prefix("raise_exception: ") {
                return TemplateError::Conversation(format!("the chat template raised: {msg}"));
            }
        }
    }
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    TemplateError::Jinja(msg)
}

fn raise_exception(msg: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(
        minijinja::ErrorKind::InvalidOperation,
        format!("raise_exception: {msg}"),
    ))
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent)`
/// (Python's separators, keys in their order).
fn tojson(
    value: minijinja::Value,
    kwargs: minijinja::value::Kwargs,
) -> Result<minijinja::Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<minijinja::Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    python_json(&value, indent, 0, &mut out)?;
    Ok(minijinja::Value::from_safe_string(out))
}

fn python_json(
    v: &minijinja::Value,
    indent: Option<usize>,
    level: usize,
    out: &mut String,
) -> Result<(), minijinja::Error> {
    use minijinja::value::ValueKind;
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            let j = serde_json::to_value(v).unwrap_or(serde_json::Value::Null);
            match j.as_f64() {
                Some(f) if j.is_f64() && f.fract() == 0.0 && f.abs() < 1e16 => {
                    out.push_str(&format!("{f:.1}"))
                }
                _ => out.push_str(&j.to_string()),
            }
        }
        ValueKind::String => out.push_str(
            &serde_json::Value::String(v.as_str().unwrap_or_default().into()).to_string(),
        ),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<minijinja::Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, level + 1);
                python_json(x, indent, level + 1, out)?;
            }
            newline(out, level);
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<minijinja::Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, level + 1);
                let key = k
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| k.to_string());
                out.push_str(&serde_json::Value::String(key).to_string());
                out.push_str(": ");
                python_json(&v.get_item(k)?, indent, level + 1, out)?;
            }
            newline(out, level);
            out.push('}');
        }
        _ => out.push_str(&serde_json::Value::String(v.to_string()).to_string()),
    }
    Ok(())
}

/// The longest common prefix of two token sequences.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl JinjaChat {
    /// Compiles a Jinja chat template (the `chat_template` of `tokenizer_config.json` or a
    /// `chat_template.jinja` file) for `tok`.
    pub fn new(source: &str, tok: Tokenizer) -> Result<JinjaChat, TemplateError> {
        let mut env = minijinja::Environment::new();
        // As transformers' ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", |_fmt: String| -> String {
            "26 Jul 2024".to_string()
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME.to_string(), source.to_string())
            .map_err(jinja_err)?;
        Ok(JinjaChat {
            source: source.to_string(),
            env: Arc::new(env),
            tok,
        })
    }

    /// The template's source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The rendered text, as `apply_chat_template(tokenize=False)` returns it.
    pub fn render_text(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let t = self.env.get_template(NAME).map_err(jinja_err)?;
        use minijinja::Value;
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                let role = match m.role {
                    Role::System => "system",
                    Role::User => "user",
                    Role::Assistant => "assistant",
                };
                Value::from_iter([
                    ("role", Value::from(role)),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        let mut ctx: Vec<(String, Value)> = self
            .tok
            .specials()
            .strings
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        ctx.push(("messages".into(), Value::from(msgs)));
        ctx.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        t.render(Value::from_iter(ctx)).map_err(jinja_err)
    }

    fn tokens(&self, messages: &[Message], gen: bool) -> Result<Vec<u32>, TemplateError> {
        Ok(self.tok.encode_trusted(&self.render_text(messages, gen)?))
    }

    /// Renders `messages` with the loss on the assistant messages selected by `train`.
    fn render_masked(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        train: impl Fn(usize) -> bool,
    ) -> Result<Rendered, TemplateError> {
        let tokens = self.tokens(messages, add_generation_prompt)?;
        let mut loss_mask = vec![false; tokens.len()];
        let stops = self.stop_tokens()?;
        for (i, m) in messages.iter().enumerate() {
            if m.role != Role::Assistant || !train(i) {
                continue;
            }
            let before = self.tokens(&messages[..i], true)?;
            let with = self.tokens(&messages[..=i], false)?;
            let start = common_prefix(&before, &tokens);
            let end = common_prefix(&with, &tokens);
            if end <= start {
                return Err(TemplateError::Conversation(format!(
                    "the chat template renders nothing for assistant message {} (does it render \
                     assistant turns?)",
                    i + 1
                )));
            }
            let Some(last) = tokens[start..end].iter().rposition(|t| stops.contains(t)) else {
                return Err(TemplateError::Conversation(format!(
                    "the chat template puts no end-of-turn or end-of-sequence token (ids {stops:?}) \
                     after assistant message {}: the model could not learn to stop",
                    i + 1
                )));
            };
            for m in &mut loss_mask[start..start + last + 1] {
                *m = true;
            }
        }
        Ok(Rendered { tokens, loss_mask })
    }
}

impl ChatFormat for JinjaChat {
    fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Rendered, TemplateError> {
        self.render_masked(messages, add_generation_prompt, |_| true)
    }

    fn stop_tokens(&self) -> Result<Vec<u32>, TemplateError> {
        Ok(self.tok.specials().stop_tokens())
    }

    fn render_conversation(&self, conv: &Conversation) -> Result<Rendered, TemplateError> {
        if !conv.messages.iter().any(|m| m.role == Role::Assistant) {
            return Err(TemplateError::Conversation(
                "no assistant turn: nothing to learn".into(),
            ));
        }
        let r = self.render(&conv.messages, false)?;
        if r.num_targets() == 0 {
            return Err(TemplateError::Conversation(
                "the chat template renders no assistant tokens".into(),
            ));
        }
        Ok(r)
    }

    fn render_prompt_response(
        &self,
        prompt: &[Message],
        response: &str,
    ) -> Result<Rendered, TemplateError> {
        let mut msgs = prompt.to_vec();
        msgs.push(Message::assistant(response.to_string()));
        let last = msgs.len() - 1;
        self.render_masked(&msgs, false, |i| i == last)
    }
}
