//! Using models: `generate`, `chat`, `fill-mask` and `rm score`.

use crate::bundle::load_bundle;
use anyhow::{bail, Context, Result};
use clap::Args;
use kiln_data::datasets::Message;
use kiln_data::{special, TextStream, Tokenizer};
use kiln_model::{
    generate_with, Activations, Arch, GenerateOptions, Input, Model, PackedWeights, Sampling,
    WeightFormat,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Sample from the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling: the smallest set of tokens with this much probability (1: all).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Weights of the matrix products: f32 (the model's own), or an inference-only bf16 or int8
    /// copy (faster, slightly different logits).
    #[arg(long, default_value_t = WeightFormat::F32)]
    weights: WeightFormat,
}

impl SamplingArgs {
    fn sampling(&self) -> Result<Sampling> {
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1]");
        }
        if self.temperature < 0.0 {
            bail!("--temperature must be >= 0");
        }
        Ok(Sampling {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
        })
    }

    /// The packed copy of the model's matrices that `--weights` asks for (none for f32).
    fn packed(&self, model: &Model) -> Option<PackedWeights> {
        self.weights.packed().map(|f| PackedWeights::new(model, f))
    }
}

#[derive(Args)]
pub struct GenerateArgs {
    /// Model directory (a checkpoint or a run directory).
    #[arg(long)]
    model: PathBuf,
    /// A PEFT adapter directory to merge into the model first.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Prompt text (repeat for a batch). Without --chat the text is continued as a document.
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// Render each prompt as a user turn with the model's chat template.
    #[arg(long)]
    chat: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// Prints generated text as its tokens come (a piece per token, incomplete characters held back
/// until complete), decoding in time linear in the length, as `kiln serve` streams it.
struct Streamer<'a> {
    tokenizer: &'a Tokenizer,
    text: TextStream,
}

impl<'a> Streamer<'a> {
    fn new(tokenizer: &'a Tokenizer) -> Self {
        Self {
            tokenizer,
            text: TextStream::new(),
        }
    }

    fn push(&mut self, token: u32) {
        let piece = self.text.push(self.tokenizer, token);
        if !piece.is_empty() {
            print!("{piece}");
            let _ = std::io::stdout().flush();
        }
    }

    /// The end of the text, once generation has stopped: also a last character that the tokens
    /// left incomplete (U+FFFD), which no later token will complete, as `kiln serve` sends it.
    fn finish(&mut self) {
        print!("{}", self.text.finish(self.tokenizer));
    }
}

pub fn run_generate(a: GenerateArgs) -> Result<()> {
    let b = crate::cmd_lora::load_bundle_adapted(&a.model, a.adapter.as_deref())?;
    if b.model.cfg.arch != Arch::Decoder {
        bail!(
            "{}: an encoder cannot generate; use `kiln fill-mask`",
            b.dir.display()
        );
    }
    let prompts: Vec<Vec<u32>> = a
        .prompt
        .iter()
        .map(|p| -> Result<Vec<u32>> {
            if a.chat {
                Ok(b.chat()?.render_prompt(&[Message::user(p.clone())])?)
            } else {
                // A document starts after the beginning-of-sequence token (Kiln: <|endoftext|>).
                Ok(b.tokenizer
                    .specials()
                    .bos
                    .into_iter()
                    .chain(b.tokenizer.encode(p))
                    .collect())
            }
        })
        .collect::<Result<_>>()?;
    let stops = if a.chat {
        b.chat()?.stop_tokens()?
    } else {
        b.tokenizer.specials().eos.clone()
    };
    let opts = GenerateOptions {
        max_new_tokens: a.sampling.max_new_tokens,
        sampling: a.sampling.sampling()?,
        stop_tokens: stops,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(a.sampling.seed);
    let single = prompts.len() == 1;
    let mut st = Streamer::new(&b.tokenizer);
    if single {
        print!("{}", a.prompt[0]);
    }
    let packed = a.sampling.packed(&b.model);
    let start = std::time::Instant::now();
    let outs = generate_with(
        &b.model,
        packed.as_ref(),
        &prompts,
        &opts,
        &mut rng,
        |_, tok| {
            if single {
                st.push(tok);
            }
        },
    )?;
    let secs = start.elapsed().as_secs_f64();
    if single {
        st.finish();
        println!();
    } else {
        for (p, o) in a.prompt.iter().zip(&outs) {
            println!("=== {p}\n{}{}\n", p, b.tokenizer.decode_skip_special(o));
        }
    }
    let n: usize = outs.iter().map(|o| o.len()).sum();
    eprintln!(
        "[{n} tokens in {secs:.2}s, {:.0} tok/s]",
        n as f64 / secs.max(1e-9)
    );
    Ok(())
}

#[derive(Args)]
pub struct ChatArgs {
    #[arg(long)]
    model: PathBuf,
    /// A PEFT adapter directory to merge into the model first.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Answer this one message and exit (for scripts). Without it, and with stdin not a terminal,
    /// each stdin line is a user turn.
    #[arg(long)]
    prompt: Option<String>,
    /// A system message at the start of the conversation.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

pub fn run_chat(a: ChatArgs) -> Result<()> {
    let b = crate::cmd_lora::load_bundle_adapted(&a.model, a.adapter.as_deref())?;
    if b.model.cfg.arch != Arch::Decoder {
        bail!("{}: an encoder cannot chat", b.dir.display());
    }
    let template = b.chat()?;
    let stops = template.stop_tokens()?;
    let opts = GenerateOptions {
        max_new_tokens: a.sampling.max_new_tokens,
        sampling: a.sampling.sampling()?,
        stop_tokens: stops.clone(),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(a.sampling.seed);
    let packed = a.sampling.packed(&b.model);
    let start: Vec<Message> = a
        .system
        .iter()
        .map(|s| Message::system(s.clone()))
        .collect();
    let mut conv = start.clone();
    let interactive = a.prompt.is_none() && std::io::stdin().is_terminal();
    let mut reply = |conv: &mut Vec<Message>, user: String| -> Result<()> {
        conv.push(Message::user(user));
        // Drop the oldest turns when the conversation outgrows the context.
        let n_ctx = b.model.cfg.n_ctx;
        let mut tokens = template.render_prompt(conv)?;
        while tokens.len() + 8 > n_ctx && conv.len() > 1 + start.len() {
            conv.remove(start.len());
            tokens = template.render_prompt(conv)?;
        }
        if tokens.len() >= n_ctx {
            conv.pop();
            bail!(
                "the message is {} tokens; the model's context is {n_ctx}",
                tokens.len()
            );
        }
        let mut st = Streamer::new(&b.tokenizer);
        let out = generate_with(
            &b.model,
            packed.as_ref(),
            &[tokens],
            &opts,
            &mut rng,
            |_, tok| {
                if !stops.contains(&tok) {
                    st.push(tok);
                }
            },
        )?;
        st.finish();
        println!();
        let text: Vec<u32> = out[0]
            .iter()
            .copied()
            .filter(|t| !stops.contains(t))
            .collect();
        conv.push(Message::assistant(
            b.tokenizer.decode_skip_special(&text).trim().to_string(),
        ));
        Ok(())
    };
    if let Some(p) = a.prompt {
        return reply(&mut conv, p);
    }
    if interactive {
        eprintln!(
            "kiln chat — {} ({} model). /reset starts over, /quit exits.",
            b.dir.display(),
            if b.meta.stage.is_empty() {
                "unknown"
            } else {
                &b.meta.stage
            }
        );
    }
    let stdin = std::io::stdin();
    loop {
        if interactive {
            print!("you> ");
            std::io::stdout().flush()?;
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim().to_string();
        match line.as_str() {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                conv = start.clone();
                eprintln!("(conversation reset)");
                continue;
            }
            _ => {}
        }
        if interactive {
            print!("kiln> ");
        }
        if let Err(e) = reply(&mut conv, line) {
            eprintln!("error: {e:#}");
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct FillMaskArgs {
    /// An MLM encoder directory.
    #[arg(long)]
    model: PathBuf,
    /// Text with one or more `<|mask|>` tokens.
    text: String,
    #[arg(long, default_value_t = 5)]
    top_k: usize,
}

pub fn run_fill_mask(a: FillMaskArgs) -> Result<()> {
    let b = load_bundle(&a.model)?;
    if b.model.cfg.arch != Arch::Encoder {
        bail!(
            "{}: fill-mask needs an encoder trained with --objective mlm",
            b.dir.display()
        );
    }
    // Byte-level BPE words carry their leading space (" brown"), so the space before a mask belongs
    // to the masked word.
    let text = a.text.replace(" <|mask|>", "<|mask|>");
    let tokens: Vec<u32> = std::iter::once(special::EOT)
        .chain(b.tokenizer.encode_with_specials(&text))
        .collect();
    let masks: Vec<usize> = (0..tokens.len())
        .filter(|&i| tokens[i] == special::MASK)
        .collect();
    if masks.is_empty() {
        bail!("the text has no <|mask|> token");
    }
    let t = tokens.len();
    if t > b.model.cfg.n_ctx {
        bail!(
            "the text is {t} tokens; the model's context is {}",
            b.model.cfg.n_ctx
        );
    }
    let mut acts = Activations::new(&b.model.cfg, 1, t, true);
    let positions: Vec<u32> = (0..t as u32).collect();
    b.model.forward(
        &mut acts,
        &Input {
            tokens: &tokens,
            positions: &positions,
            valid: None,
            segments: None,
            b: 1,
            t,
        },
    );
    b.model
        .lm_head(&mut acts, &vec![kiln_kernels::IGNORE; t], 1.0);
    let v = b.model.cfg.vocab_size;
    for (n, &m) in masks.iter().enumerate() {
        let probs = &acts.logits[m * v..(m + 1) * v];
        let mut idx: Vec<usize> = (special::COUNT as usize..v).collect();
        idx.sort_by(|&x, &y| probs[y].partial_cmp(&probs[x]).unwrap());
        println!("mask {}:", n + 1);
        for &i in idx.iter().take(a.top_k) {
            println!(
                "  {:>6.2}%  {:?}",
                probs[i] * 100.0,
                b.tokenizer.decode(&[i as u32])
            );
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct ScoreArgs {
    /// A reward model directory.
    #[arg(long)]
    model: PathBuf,
    /// A PEFT adapter directory to merge into the model first.
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long)]
    prompt: Option<String>,
    #[arg(long)]
    response: Option<String>,
    /// JSONL of {"prompt","response"} (or {"input","output"}): prints each with its score.
    #[arg(long)]
    input: Option<PathBuf>,
}

pub fn run_score(a: ScoreArgs) -> Result<()> {
    let b = crate::cmd_lora::load_bundle_adapted(&a.model, a.adapter.as_deref())?;
    if !b.model.cfg.score_head {
        bail!("{}: not a reward model (no score head)", b.dir.display());
    }
    let mut pairs: Vec<(String, String)> = Vec::new();
    if let Some(path) = &a.input {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))?;
            let get = |keys: [&str; 2]| {
                keys.iter()
                    .find_map(|k| v.get(*k).and_then(|x| x.as_str()).map(str::to_string))
            };
            let p = get(["prompt", "input"]).with_context(|| {
                format!("{}:{}: field \"prompt\": missing", path.display(), i + 1)
            })?;
            let r = get(["response", "output"]).with_context(|| {
                format!("{}:{}: field \"response\": missing", path.display(), i + 1)
            })?;
            pairs.push((p, r));
        }
    } else {
        match (a.prompt, a.response) {
            (Some(p), Some(r)) => pairs.push((p, r)),
            _ => bail!("give --prompt and --response, or --input FILE"),
        }
    }
    let n_ctx = b.model.cfg.n_ctx;
    let seqs: Vec<Vec<u32>> = pairs
        .iter()
        .map(|(p, r)| -> Result<Vec<u32>> {
            let rendered = b
                .chat()?
                .render_prompt_response(&[Message::user(p.clone())], r)?;
            let fit = kiln_data::template::fit_example(&rendered, n_ctx - 1)
                .context("the response does not fit the model's context")?;
            Ok(fit.tokens)
        })
        .collect::<Result<_>>()?;
    let mut acts = Activations::new(&b.model.cfg, 16.min(seqs.len()).max(1), n_ctx, false);
    let mut scores = Vec::new();
    for chunk in seqs.chunks(acts.b) {
        scores.extend(kiln_train::rm::score_rows(&b.model, &mut acts, chunk));
    }
    for ((p, r), s) in pairs.iter().zip(scores) {
        let norm = match (b.meta.reward_mean, b.meta.reward_std) {
            (Some(m), Some(sd)) => Some((s - m) / sd),
            _ => None,
        };
        if a.input.is_some() {
            println!(
                "{}",
                serde_json::json!({"prompt": p, "response": r, "score": s, "normalized": norm})
            );
        } else {
            println!(
                "score {s:.4}{}",
                norm.map(|z| format!(" (normalised {z:.3})"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}
