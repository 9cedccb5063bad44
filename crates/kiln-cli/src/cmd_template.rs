//! `kiln template render`: a model directory's chat template applied to messages, as text or token
//! ids (to compare with `transformers`' `apply_chat_template`).

use crate::bundle::{chat_format, load_chat};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use kiln_data::datasets::Message;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum TemplateCmd {
    /// Render messages with a model's chat template (Kiln's JSON template or the Hugging Face
    /// Jinja `chat_template`), as `transformers`' `apply_chat_template` does.
    Render(RenderArgs),
}

#[derive(Args)]
pub struct RenderArgs {
    /// A model directory (only its tokenizer files and template are read).
    #[arg(long)]
    model: PathBuf,
    /// JSON: a list of {"role","content"} messages, or {"messages": [...]}.
    #[arg(long)]
    input: PathBuf,
    /// End with what opens the assistant's reply.
    #[arg(long)]
    add_generation_prompt: bool,
    /// Print {"ids": [...], "loss_mask": [...]} instead of the text.
    #[arg(long)]
    ids: bool,
    /// A Jinja template file to use instead of the model's.
    #[arg(long)]
    template: Option<PathBuf>,
}

pub fn run(c: TemplateCmd) -> Result<()> {
    let TemplateCmd::Render(a) = c;
    let dir = kiln_model::checkpoint::resolve_model_dir(&a.model).unwrap_or(a.model.clone());
    let (tok, meta, chat) = load_chat(&dir)?;
    let jinja = match &a.template {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => meta.chat_template.clone(),
    };
    let chat = match &a.template {
        Some(_) => chat_format(&tok, &meta.template, jinja.as_deref())?,
        None => chat,
    };
    let chat = chat.with_context(|| {
        format!(
            "{}: no chat template (tokenizer_config.json has no \"chat_template\")",
            dir.display()
        )
    })?;
    let text = std::fs::read_to_string(&a.input)
        .with_context(|| format!("reading {}", a.input.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", a.input.display()))?;
    let list = v.get("messages").cloned().unwrap_or(v);
    let messages: Vec<Message> = serde_json::from_value(list).with_context(|| {
        format!(
            "{}: expected a list of {{\"role\",\"content\"}} messages",
            a.input.display()
        )
    })?;
    let r = chat.render(&messages, a.add_generation_prompt)?;
    if a.ids {
        let mask: Vec<u8> = r.loss_mask.iter().map(|&m| u8::from(m)).collect();
        println!(
            "{}",
            serde_json::json!({"ids": r.tokens, "loss_mask": mask})
        );
    } else {
        match &jinja {
            Some(src) => {
                let j = kiln_data::chat_format::JinjaChat::new(src, tok.clone())?;
                print!("{}", j.render_text(&messages, a.add_generation_prompt)?);
            }
            None => print!("{}", tok.decode(&r.tokens)),
        }
    }
    Ok(())
}
