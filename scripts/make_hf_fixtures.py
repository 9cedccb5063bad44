#!/usr/bin/env python3
"""Writes the Hugging Face checkpoint fixtures of crates/kiln-model/tests/fixtures/.

Every fixture is a small model built by `transformers` from a config (nothing is downloaded), with
EVERY parameter overwritten by random values (transformers initialises norms to 1 and biases to 0,
which would hide a loader that drops them), saved with `save_pretrained`, plus `expected.json`:

    {"tokens": [ids...], "logits": [[vocab floats] for each position]}     (causal LMs)
    {"tokens": [ids...], "scores": [score at each position], "score_last": ...}   (llama_seqcls)

The expected values are computed by transformers (eval, float32) on the files as saved and loaded
back: for the bf16/fp16 fixtures they are the logits of the half-precision weights cast to float32.
Each fixture is reloaded and checked against the in-memory model before it is kept, so a config
that transformers would read differently from what was meant fails here.

Fixtures whose name ends in `_v4config` have their config.json rewritten in the layout of
transformers 4.x (top-level `rope_theta` and `rope_scaling`, no `rope_parameters`, no `head_dim`,
`torch_dtype`), which is what most checkpoints on the Hub have; the other fixtures keep exactly
what this transformers version writes (5.x: `rope_parameters`, `dtype`, `head_dim`).

Deterministic: seeds are fixed, so rerunning reproduces the files (with the same torch and
transformers versions). Needs torch, transformers, safetensors. Usage:
    /tmp/torch-venv/bin/python scripts/make_hf_fixtures.py [--out crates/kiln-model/tests/fixtures] [--only NAME ...]
"""
import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
import transformers
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          LlamaForSequenceClassification, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

transformers.logging.set_verbosity_error()
try:  # no progress bars ("Writing model shards")
    transformers.utils.logging.disable_progress_bar()
except AttributeError:
    pass

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "crates" / "kiln-model" / "tests" / "fixtures"

# The fixtures' shape.
SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)


# ------------------------------------------------------------------------------------------------
# Helpers shared with check_hf_logits.py

def randomize_(model, seed):
    """Overwrites every parameter: matrices and embeddings N(0, 0.15), 1-D weights (norms)
    1 + 0.2 N(0, 1), biases 0.1 N(0, 1). Tied parameters are one tensor and are drawn once."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("bias"):
                v = 0.1 * r
            elif p.dim() == 1:
                v = 1.0 + 0.2 * r
            else:
                v = 0.15 * r
            p.copy_(v.to(p.dtype))
    return model


def seeded_tokens(seed, n, lo=0, hi=96):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (n,), generator=g).tolist()


def causal_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0].float()


def save(model, d, **kw):
    """save_pretrained as safetensors (`safe_serialization` is the default in transformers 5 and
    only accepted through **kwargs there)."""
    try:
        model.save_pretrained(d, safe_serialization=True, **kw)
    except TypeError:
        model.save_pretrained(d, **kw)


def to_v4_config(d):
    """Rewrites d/config.json in the layout transformers 4.x wrote (top-level rope_theta and
    rope_scaling; no rope_parameters, head_dim, layer_types; torch_dtype instead of dtype)."""
    path = Path(d) / "config.json"
    c = json.loads(path.read_text())
    rp = c.pop("rope_parameters", None) or {}
    rp = dict(rp)
    c["rope_theta"] = rp.pop("rope_theta", 10000.0)
    rt = rp.get("rope_type", "default")
    c["rope_scaling"] = None if rt == "default" else rp
    c.pop("head_dim", None)
    c.pop("layer_types", None)
    if "dtype" in c:
        c["torch_dtype"] = c.pop("dtype")
    c["transformers_version"] = "4.46.0"
    path.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    return c


def round9(rows):
    """float32 values with 9 significant digits (enough to round-trip float32 exactly)."""
    if isinstance(rows, (list, tuple)):
        return [round9(r) for r in rows]
    return float(f"{rows:.9g}")


def files_of(d):
    return sorted((f, os.path.getsize(os.path.join(d, f))) for f in os.listdir(d))


def llama3_branches(theta, head_dim, rs):
    """Which of the llama3 rope-scaling branches (kept / smoothed / divided by factor) the
    frequencies of this head size fall in."""
    lo = rs["original_max_position_embeddings"] / rs["low_freq_factor"]
    hi = rs["original_max_position_embeddings"] / rs["high_freq_factor"]
    out = []
    for i in range(0, head_dim, 2):
        wl = 2 * math.pi * theta ** (i / head_dim)
        out.append("kept" if wl < hi else "scaled" if wl > lo else "smoothed")
    return out


# ------------------------------------------------------------------------------------------------
# The fixtures

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
# Llama 3.2's values: with head_dim 8 and theta 5e5 they reach all three branches.
LLAMA32_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def llama_cfg(**kw):
    base = dict(SMALL, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
                attention_bias=False, bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return LlamaConfig(**base)


# name -> (seed, builder() -> model, options)
FIXTURES = {
    "llama_gqa2": (101, lambda: LlamaForCausalLM(llama_cfg()), {}),
    "llama_mqa_theta5e5": (102, lambda: LlamaForCausalLM(llama_cfg(num_key_value_heads=1, rope_theta=500000.0,
                                                                    rms_norm_eps=1e-6)), {}),
    "llama3_rope_scaling": (103, lambda: LlamaForCausalLM(llama_cfg(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
                                                                     tie_word_embeddings=True)), {"n_tokens": 40}),
    "qwen2_tied": (104, lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True,
                                                             use_sliding_window=False, rms_norm_eps=1e-6)), {}),
    "mistral": (105, lambda: MistralForCausalLM(MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=None,
                                                              tie_word_embeddings=False, rms_norm_eps=1e-5)), {}),
    "llama_bf16_sharded": (106, lambda: LlamaForCausalLM(llama_cfg()), {"dtype": torch.bfloat16, "sharded": True}),
    "llama_fp16": (107, lambda: LlamaForCausalLM(llama_cfg()), {"dtype": torch.float16}),
    "llama_seqcls": (108, lambda: LlamaForSequenceClassification(llama_cfg(num_labels=1, pad_token_id=0)),
                     {"seqcls": True}),
    "gpt2": (109, lambda: GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                                     bos_token_id=0, eos_token_id=0)), {}),
    # transformers 4.x config layouts (what most Hub checkpoints have).
    "llama_v4config": (110, lambda: LlamaForCausalLM(llama_cfg(num_key_value_heads=1, rope_theta=500000.0)),
                       {"v4config": True}),
    "llama3_rope_scaling_v4config": (111, lambda: LlamaForCausalLM(llama_cfg(rope_theta=500000.0,
                                                                             rope_scaling=LLAMA32_ROPE)),
                                     {"v4config": True, "n_tokens": 40}),
    # Qwen2.5-style: rope_theta 1e6, a sliding_window value that use_sliding_window=false switches off.
    # A chat model as the hub ships a Llama 3 instruct one: its own byte-level BPE tokenizer.json
    # (Llama 3's split regex, specials at the end of the vocabulary, embedding padded past them),
    # tokenizer_config.json with bos/eos by name and no pad token, the Llama 3 chat template, and
    # several end-of-sequence ids in config.json and generation_config.json.
    "llama3_chat": (113, lambda: LlamaForCausalLM(llama_cfg(vocab_size=CHAT_MODEL_VOCAB, rope_theta=500000.0,
                                                             bos_token_id=None, eos_token_id=None)),
                    {"chat": True, "n_tokens": 8}),
    "qwen2_v4config": (112, lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, num_key_value_heads=2,
                                                                 tie_word_embeddings=True, use_sliding_window=False,
                                                                 rope_theta=1000000.0, rms_norm_eps=1e-6)),
                       {"v4config": True, "qwen_sliding_window": 32768}),
}

DESCRIPTIONS = {
    "llama_gqa2": "LlamaForCausalLM, 2 of 4 kv heads, rope_theta 1e4, untied lm_head, rms_norm_eps 1e-5",
    "llama_mqa_theta5e5": "LlamaForCausalLM, 1 kv head (MQA), rope_theta 5e5, untied, rms_norm_eps 1e-6",
    "llama3_rope_scaling": "Llama, llama3 rope_scaling (factor 8, original_max_position_embeddings 16), tied head "
                           "(no lm_head.weight in the file), 40 tokens",
    "qwen2_tied": "Qwen2ForCausalLM: q/k/v biases, tied head, use_sliding_window false",
    "mistral": "MistralForCausalLM, sliding_window null, 2 kv heads, untied",
    "llama_bf16_sharded": "Llama in bfloat16, 2 safetensors shards + model.safetensors.index.json; expected = "
                          "float32 logits of the bf16 weights",
    "llama_fp16": "Llama in float16 (one file); expected = float32 logits of the fp16 weights",
    "llama_seqcls": "LlamaForSequenceClassification, num_labels 1, pad_token_id 0: score.weight [1, 32]; "
                    "expected.json has scores at every position (score_last = the sequence's score)",
    "gpt2": "GPT2LMHeadModel (n_embd 32, 2 layers, 4 heads, n_positions 64)",
    "llama_v4config": "Llama, 1 kv head, rope_theta 5e5, config.json in the transformers 4.x layout "
                      "(top-level rope_theta, rope_scaling null, no head_dim)",
    "llama3_rope_scaling_v4config": "Llama, Llama-3.2 rope_scaling values (factor 32, original 8192; all three "
                                    "llama3 branches), 4.x layout (rope_scaling key), untied, 40 tokens",
    "llama3_chat": "Llama 3 instruct layout: tokenizer.json (byte-level BPE, 320 tokens + 5 specials at the end: "
                   "<|begin_of_text|> <|end_of_text|> <|start_header_id|> <|end_header_id|> <|eot_id|>), "
                   "embedding padded to 336, tokenizer_config.json (bos <|begin_of_text|>, eos <|eot_id|>, no pad) "
                   "and chat_template.jinja (Llama 3) as transformers saves them, eos_token_id "
                   "[<|end_of_text|>, <|eot_id|>] in config.json and generation_config.json",
    "qwen2_v4config": "Qwen2, rope_theta 1e6, sliding_window 32768 switched off by use_sliding_window false "
                      "(as Qwen2.5 configs have), 4.x layout",
}


CHAT_MODEL_VOCAB = 336
CHAT_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_TEMPLATE = ("{{- bos_token }}\n{%- for message in messages %}\n{{- '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}\n"
                   "{%- if add_generation_prompt %}\n{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
                   "{%- endif %}\n")


def chat_training_text():
    """Fixed text (no downloads, the same everywhere) for the fixture's BPE merges."""
    words = ["the", "sum", "of", "and", "is", "what", "plus", "minus", "lives", "in", "colour", "answer", "hello",
             "please", "give", "three", "tips", "for", "staying", "healthy", "water", "sleep", "walk", "I", "do",
             "not", "know", "Paris", "capital", "France", "user", "assistant", "system", "be", "brief"]
    lines = []
    for i in range(400):
        w = [words[(i * 7 + j * 3) % len(words)] for j in range(6 + i % 5)]
        lines.append(" ".join(w).capitalize() + f" {i % 50} + {(i * 3) % 20} = {i % 50 + (i * 3) % 20}.")
    return lines


def write_chat_tokenizer(d, model):
    """tokenizer.json, tokenizer_config.json, chat_template.jinja as transformers saves them, and the
    eos ids of Llama 3 instruct (end of text and end of turn) in config.json and generation_config.json."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, min_frequency=0, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(chat_training_text(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True) for t in CHAT_SPECIALS])
    n = tok.get_vocab_size(with_added_tokens=True)
    assert n <= CHAT_MODEL_VOCAB, n
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    fast.chat_template = LLAMA3_TEMPLATE
    fast.save_pretrained(d)
    ids = {t: tok.token_to_id(t) for t in CHAT_SPECIALS}
    eos = [ids["<|end_of_text|>"], ids["<|eot_id|>"]]
    cfg = json.loads(Path(d, "config.json").read_text())
    cfg["bos_token_id"] = ids["<|begin_of_text|>"]
    cfg["eos_token_id"] = eos
    Path(d, "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    GenerationConfig(bos_token_id=ids["<|begin_of_text|>"], eos_token_id=eos).save_pretrained(d)
    # The template renders as transformers renders it (ids checked by the Rust tests against these).
    msgs = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "The sum is 5."}]
    rendered = {"messages": msgs,
                "text": fast.apply_chat_template(msgs, tokenize=False),
                "ids": list(fast.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]),
                "prompt_ids": list(fast.apply_chat_template(msgs[:1], tokenize=True, add_generation_prompt=True,
                                                            return_dict=True)["input_ids"]),
                "specials": ids, "tokenizer_size": n}
    Path(d, "chat_expected.json").write_text(json.dumps(rendered, ensure_ascii=False, indent=1) + "\n")
    return f"tokenizer {n} tokens, eos ids {eos}"


def write_readme(out):
    lines = ["# Hugging Face checkpoint fixtures", "",
             "Written by `scripts/make_hf_fixtures.py` (do not edit by hand; rerun it). Small models built by",
             "`transformers` from configs with every parameter random (vocab 96, hidden 32, intermediate 48,",
             "2 layers, 4 heads), saved with `save_pretrained`; `expected.json` holds the token ids and",
             "transformers' float32 logits (`logits[position][vocab]`), or `scores` for `llama_seqcls`.",
             "Fixtures without `_v4config` keep the config.json this transformers version writes",
             f"({transformers.__version__}: `rope_parameters` instead of top-level `rope_theta`/`rope_scaling`).",
             ""]
    lines += [f"- `{n}` (seed {FIXTURES[n][0]}): {DESCRIPTIONS[n]}" for n in FIXTURES]
    Path(out, "README.md").write_text("\n".join(lines) + "\n")


# Sizes that save_pretrained's max_shard_size is tried with, first one giving 2 or 3 shards wins.
SHARD_SIZES = ["60KB", "30KB", "25KB", "20KB", "15KB"]


def sharded_save(model, d):
    for s in SHARD_SIZES:
        if os.path.exists(d):
            shutil.rmtree(d)
        save(model, d, max_shard_size=s)
        shards = [f for f in os.listdir(d) if f.startswith("model-") and f.endswith(".safetensors")]
        if 2 <= len(shards) <= 3 and os.path.exists(os.path.join(d, "model.safetensors.index.json")):
            return s, sorted(shards)
    raise SystemExit(f"{d}: no max_shard_size in {SHARD_SIZES} gives 2 or 3 shards")


def make(name, out):
    seed, build, opt = FIXTURES[name]
    d = os.path.join(out, name)
    if os.path.exists(d):
        shutil.rmtree(d)
    torch.manual_seed(seed)
    model = randomize_(build(), seed).eval()
    n = opt.get("n_tokens", 16)
    dtype = opt.get("dtype")
    note = ""
    # The reference: the float32 model with its weights rounded to the saved precision. (Not
    # `model.to(dtype).float()`: that would also round buffers such as rope's inv_freq, which
    # transformers recomputes in float32 when it loads the files.)
    ref = copy.deepcopy(model)
    if dtype is not None:
        with torch.no_grad():
            for q in ref.parameters():
                q.copy_(q.to(dtype).float())
        model = model.to(dtype)
    if opt.get("sharded"):
        s, shards = sharded_save(model, d)
        note = f"max_shard_size={s}: {len(shards)} shards"
    else:
        save(model, d)
    if opt.get("chat"):
        note = write_chat_tokenizer(d, model)
    if opt.get("v4config"):
        c = to_v4_config(d)
        if "qwen_sliding_window" in opt:
            c["sliding_window"] = opt["qwen_sliding_window"]
            c["max_window_layers"] = 28
            Path(d, "config.json").write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
        note = "config.json in transformers 4.x layout"

    # Expected values from the files as saved, loaded back and cast to float32.
    cls = type(model)
    loaded, info = cls.from_pretrained(d, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k != "error_msgs"} | ({"error_msgs": info["error_msgs"]}
                                                                      if info.get("error_msgs") else {})
    if bad:
        raise SystemExit(f"{name}: reloading gives {bad}")
    loaded = loaded.float().eval()

    if opt.get("seqcls"):
        tokens = seeded_tokens(seed, n, lo=1, hi=96)  # no pad (0) token
        with torch.no_grad():
            ids = torch.tensor([tokens])
            h = loaded.model(input_ids=ids).last_hidden_state[0]
            scores = (h @ loaded.score.weight.T)[:, 0]
            pooled = loaded(input_ids=ids).logits[0, 0]
            h_ref = ref.model(input_ids=ids).last_hidden_state[0]
            ref_scores = (h_ref @ ref.score.weight.T)[:, 0]
        assert (scores - ref_scores).abs().max().item() < 1e-5, name
        assert abs(pooled.item() - scores[-1].item()) < 1e-5, (pooled, scores[-1])
        expected = {"tokens": tokens, "scores": round9(scores.tolist()), "score_last": round9(scores[-1].item())}
        stats = f"scores std {scores.std().item():.3f}"
    else:
        tokens = seeded_tokens(seed, n)
        logits = causal_logits(loaded, tokens)
        diff = (logits - causal_logits(ref, tokens)).abs().max().item()
        if diff > 1e-5:
            raise SystemExit(f"{name}: the reloaded model differs from the one saved by {diff:.2e} "
                             "(the config was read differently)")
        expected = {"tokens": tokens, "logits": round9(logits.tolist())}
        stats = f"logits std {logits.std().item():.3f}, max |logit| {logits.abs().max().item():.2f}"
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(expected, f, separators=(",", ":"))
        f.write("\n")

    cfg = json.loads(Path(d, "config.json").read_text())
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if rs.get("rope_type") == "llama3":
        theta = cfg.get("rope_theta") or rs.get("rope_theta")
        note += f" llama3 rope branches per frequency: {llama3_branches(theta, 8, rs)}"
    files = files_of(d)
    total = sum(s for _, s in files)
    print(f"{name}: transformers {transformers.__version__}, torch {torch.__version__}, {len(tokens)} tokens, "
          f"{stats}, {total / 1024:.1f} KiB {note}")
    for f, s in files:
        sha = hashlib.sha256(Path(d, f).read_bytes()).hexdigest()[:12]
        print(f"    {f:40s} {s:8d} B  sha256 {sha}")
    if total > 200 * 1024:
        raise SystemExit(f"{name}: {total} bytes, over the 200 KiB budget")
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--only", nargs="*", help="fixture names (default: all)")
    a = p.parse_args()
    torch.set_num_threads(1)
    names = a.only or list(FIXTURES)
    unknown = [n for n in names if n not in FIXTURES]
    if unknown:
        sys.exit(f"unknown fixtures {unknown}; known: {list(FIXTURES)}")
    os.makedirs(a.out, exist_ok=True)
    total = sum(make(n, a.out) for n in names)
    write_readme(a.out)
    print(f"{len(names)} fixtures, {total / 1024:.1f} KiB in all, in {a.out}")


if __name__ == "__main__":
    main()
