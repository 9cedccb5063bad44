#!/usr/bin/env python3
"""Checks that Kiln and Hugging Face `transformers` agree on logits, both ways.

a) transformers -> Kiln: small models of each supported family (Llama with grouped-query attention,
   rope_theta 1e4 / 5e5 and llama3 rope scaling; Qwen2 with q/k/v biases and a tied head; Mistral
   without a sliding window; GPT-2; a bf16 Llama saved in shards; a Llama config in the layout of
   transformers 4.x) are built from configs with every parameter random, written with
   `save_pretrained`, and read by `kiln logits --model DIR`.
b) Kiln -> transformers: the kiln binary pretrains a tiny GPT-2 and a tiny Llama for a few steps on
   its demo data; each run's latest checkpoint is loaded with `AutoModelForCausalLM.from_pretrained`.

Each case prints one line with the max |logit difference| and OK (below 1e-4) or MISMATCH; the
exit status is 1 if any case mismatched or failed. The bf16 case is compared with the logits of the
bf16 weights cast to float32. Nothing is downloaded.

Needs torch and transformers (python3 -m venv /tmp/torch-venv && /tmp/torch-venv/bin/pip install
torch transformers safetensors). Usage:
    python scripts/check_hf_logits.py [--kiln target/release/kiln] [--workdir DIR] [--cases PATTERN ...]
    python scripts/check_hf_logits.py --list
    python scripts/check_hf_logits.py --checkpoint KILN_CHECKPOINT_DIR   # one existing Kiln checkpoint
--cases takes shell patterns matched against the case names (e.g. --cases '*gpt2*' 'hf:llama_kv*').
The kiln command lines for part b) are constants at the top of this file.
"""
import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

sys.dont_write_bytecode = True  # no scripts/__pycache__ from the import below
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_hf_fixtures import randomize_, save, seeded_tokens, to_v4_config  # noqa: E402

transformers.logging.set_verbosity_error()
try:
    transformers.utils.logging.disable_progress_bar()
except AttributeError:
    pass

THRESHOLD = 1e-4

# ------------------------------------------------------------------------------------------------
# Part b): the kiln command lines ({w}: the work directory, {arch}: gpt2 or llama). Adjust here.

KILN_DATA_DEMO = ["data", "demo", "--size", "tiny", "--out", "{w}/data"]
KILN_CORPUS = "{w}/data/corpus.jsonl"
KILN_TOKENIZER_TRAIN = ["tokenizer", "train", "--input", KILN_CORPUS, "--vocab-size", "512",
                        "--out", "{w}/tokenizer.json"]
KILN_DATA_PREPARE = ["data", "prepare", "--tokenizer", "{w}/tokenizer.json", "--input", KILN_CORPUS,
                     "--out", "{w}/shards", "--val-fraction", "0.05"]
KILN_PRETRAIN = ["--quiet", "pretrain", "--data", "{w}/shards", "--tokenizer", "{w}/tokenizer.json",
                 "--out", "{w}/run_{arch}", "--max-steps", "5", "--batch-size", "4", "--warmup-steps", "1",
                 "--eval-every", "5", "--ckpt-every", "5", "--seed", "1",
                 "--set", "model.n_layer=2", "--set", "model.n_embd=64", "--set", "model.n_head=4",
                 "--set", "model.n_ctx=64", "--set", "eval_batches=1"]
KILN_ARCH_FLAGS = {
    "gpt2": ["--arch", "gpt2"],
    "llama": ["--arch", "llama", "--set", "model.n_kv_head=2", "--set", "model.ffn_hidden=96"],
}
# Without an --arch flag in `kiln pretrain --help` (binaries before the Llama family), the gpt2 run
# drops it (GPT-2 is all such binaries train) and the llama run fails as not supported.
ARCH_FLAG = "--arch"

# ------------------------------------------------------------------------------------------------
# Part a): the transformers models (built fresh, random weights).

SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
N_TOKENS = 48  # past the llama3 cases' original_max_position_embeddings of 16


def llama(**kw):
    c = dict(SHAPE, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
             attention_bias=False, bos_token_id=1, eos_token_id=2)
    c.update(kw)
    return LlamaForCausalLM(LlamaConfig(**c))


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
LLAMA32 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}

# name -> (builder, options: dtype, shard (max_shard_size), v4config)
HF_CASES = {
    "llama_kv1of4_theta1e4": (lambda: llama(num_key_value_heads=1), {}),
    "llama_kv1of4_theta5e5": (lambda: llama(num_key_value_heads=1, rope_theta=500000.0, rms_norm_eps=1e-6), {}),
    "llama_kv2of4_theta1e4": (lambda: llama(num_key_value_heads=2), {}),
    "llama_kv2of4_theta5e5": (lambda: llama(num_key_value_heads=2, rope_theta=500000.0), {}),
    "qwen2_qkv_bias_tied": (lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE, num_key_value_heads=2,
                                                                 tie_word_embeddings=True, use_sliding_window=False,
                                                                 rms_norm_eps=1e-6)), {}),
    "mistral_no_sliding_window": (lambda: MistralForCausalLM(MistralConfig(**SHAPE, num_key_value_heads=2,
                                                                           sliding_window=None,
                                                                           tie_word_embeddings=False)), {}),
    "llama3_rope_scaling": (lambda: llama(rope_theta=500000.0, rope_scaling=LLAMA3, tie_word_embeddings=True), {}),
    "llama3_rope_scaling_llama32": (lambda: llama(rope_theta=500000.0, rope_scaling=LLAMA32), {}),
    "llama_v4config": (lambda: llama(num_key_value_heads=1, rope_theta=500000.0), {"v4config": True}),
    "gpt2": (lambda: GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                                bos_token_id=0, eos_token_id=0)), {}),
    "llama_bf16_sharded": (lambda: llama(), {"dtype": torch.bfloat16, "shard": "60KB"}),
}
KILN_CASES = ["gpt2", "llama"]


# ------------------------------------------------------------------------------------------------

class CaseError(Exception):
    pass


def run_kiln(kiln, args, threads=None):
    cmd = [kiln] + (["--threads", str(threads)] if threads else []) + args
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise CaseError(f"`{' '.join(cmd)}` failed ({r.returncode}): " + " | ".join(tail))
    return r.stdout


def kiln_logits(kiln, model_dir, tokens, threads=None):
    out = run_kiln(kiln, ["logits", "--model", str(model_dir), "--tokens", " ".join(map(str, tokens))], threads)
    got = json.loads(out)
    if got.get("tokens") != tokens:
        raise CaseError(f"kiln logits echoed tokens {got.get('tokens')[:8]}..., not the ones given")
    return torch.tensor(got["logits"], dtype=torch.float32)


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0].float()


def load_hf(d):
    """AutoModelForCausalLM from d in float32, failing on any missing or unexpected weight."""
    model, info = AutoModelForCausalLM.from_pretrained(str(d), output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise CaseError(f"transformers loading {d}: {bad}")
    return model.float().eval()


def compare(ref, got):
    if ref.shape != got.shape:
        raise CaseError(f"logits shape {tuple(got.shape)} from kiln, {tuple(ref.shape)} from transformers")
    return (ref - got).abs().max().item()


def hf_to_kiln(name, kiln, work, threads):
    build, opt = HF_CASES[name]
    seed = 1000 + list(HF_CASES).index(name)
    d = Path(work) / f"hf_{name}"
    if d.exists():
        shutil.rmtree(d)
    torch.manual_seed(seed)
    model = randomize_(build(), seed).eval()
    if opt.get("dtype") is not None:
        model = model.to(opt["dtype"])
    save(model, d, **({"max_shard_size": opt["shard"]} if "shard" in opt else {}))
    note = ""
    if "shard" in opt:
        shards = sorted(f for f in os.listdir(d) if f.startswith("model-") and f.endswith(".safetensors"))
        if len(shards) < 2 or not (d / "model.safetensors.index.json").exists():
            raise CaseError(f"max_shard_size={opt['shard']} wrote {sorted(os.listdir(d))}, not several shards")
        note = f" ({len(shards)} shards)"
    if opt.get("v4config"):
        to_v4_config(d)
    ref_model = load_hf(d)  # the saved weights (bf16 ones cast to float32), as transformers reads them
    vocab = ref_model.config.vocab_size
    tokens = seeded_tokens(seed, N_TOKENS, 0, vocab)
    return compare(hf_logits(ref_model, tokens), kiln_logits(kiln, d, tokens, threads)), note


def kiln_supports_arch(kiln):
    r = subprocess.run([kiln, "pretrain", "--help"], capture_output=True, text=True)
    return ARCH_FLAG in r.stdout


def fmt(args, **kw):
    return [a.format(**kw) for a in args]


_demo_ready = {}


def kiln_to_hf(arch, kiln, work, threads):
    w = str(work)
    if w not in _demo_ready:
        if not Path(w, "shards").exists():
            run_kiln(kiln, fmt(KILN_DATA_DEMO, w=w), threads)
            run_kiln(kiln, fmt(KILN_TOKENIZER_TRAIN, w=w), threads)
            run_kiln(kiln, fmt(KILN_DATA_PREPARE, w=w), threads)
        _demo_ready[w] = kiln_supports_arch(kiln)
    has_arch = _demo_ready[w]
    extra = KILN_ARCH_FLAGS[arch]
    if not has_arch:
        if arch != "gpt2":
            raise CaseError(f"`kiln pretrain` has no {ARCH_FLAG} flag: this binary trains GPT-2 only")
        extra = [a for a in extra if a not in (ARCH_FLAG, "gpt2")]
    run = Path(w, f"run_{arch}")
    if run.exists():
        shutil.rmtree(run)
    run_kiln(kiln, fmt(KILN_PRETRAIN, w=w, arch=arch) + extra, threads)
    latest = run / "latest"
    if not latest.exists():
        raise CaseError(f"{run}: no 'latest' file after pretraining")
    ckpt = run / latest.read_text().strip()
    return compare_checkpoint(ckpt, kiln, threads), f" ({ckpt.relative_to(w)})"


def compare_checkpoint(ckpt, kiln, threads):
    model = load_hf(ckpt)
    cfg = model.config
    n_ctx = getattr(cfg, "n_positions", None) or cfg.max_position_embeddings
    tokens = seeded_tokens(0, min(n_ctx, N_TOKENS), 0, cfg.vocab_size)
    return compare(hf_logits(model, tokens), kiln_logits(kiln, ckpt, tokens, threads))


def old_gpt2_roundtrip(ckpt, kiln, work, threads):
    """The old second check: a GPT-2 of the checkpoint's shape written by transformers, read by Kiln."""
    cfg = load_hf(ckpt).config
    d = Path(work) / "hf_gpt2_like_checkpoint"
    if d.exists():
        shutil.rmtree(d)
    torch.manual_seed(1)
    hf = randomize_(GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions,
                                               n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                               bos_token_id=0, eos_token_id=0)), 1).eval()
    save(hf, d)
    if Path(ckpt, "tokenizer.json").exists():
        shutil.copy(Path(ckpt, "tokenizer.json"), d)
    tokens = seeded_tokens(0, min(cfg.n_positions, N_TOKENS), 0, cfg.vocab_size)
    return compare(hf_logits(load_hf(d), tokens), kiln_logits(kiln, d, tokens, threads)), ""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("legacy_checkpoint", nargs="?", metavar="CHECKPOINT", help="same as --checkpoint")
    p.add_argument("--kiln", default="target/release/kiln")
    p.add_argument("--workdir", help="keep the models and runs here (default: a temporary directory, removed)")
    p.add_argument("--checkpoint", help="compare this one Kiln checkpoint (and a GPT-2 of its shape) instead")
    p.add_argument("--cases", nargs="*", help="shell patterns of case names to run (default: all)")
    p.add_argument("--list", action="store_true", help="print the case names and exit")
    p.add_argument("--threads", type=int, help="pass --threads N to kiln")
    a = p.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    ckpt = a.checkpoint or a.legacy_checkpoint
    if ckpt:
        cases = [("kiln->hf", "checkpoint", lambda w: (compare_checkpoint(ckpt, a.kiln, a.threads), f" ({ckpt})")),
                 ("hf->kiln", "gpt2_like_checkpoint", lambda w: old_gpt2_roundtrip(ckpt, a.kiln, w, a.threads))]
    else:
        cases = [("hf->kiln", n, lambda w, n=n: hf_to_kiln(n, a.kiln, w, a.threads)) for n in HF_CASES]
        cases += [("kiln->hf", f"kiln_{arch}", lambda w, arch=arch: kiln_to_hf(arch, a.kiln, w, a.threads))
                  for arch in KILN_CASES]
    if a.list:
        for d, n, _ in cases:
            print(f"{'hf' if d == 'hf->kiln' else 'kiln'}:{n}")
        return
    if a.cases:
        cases = [c for c in cases if any(fnmatch.fnmatch(f"{'hf' if c[0] == 'hf->kiln' else 'kiln'}:{c[1]}", pat)
                                         or fnmatch.fnmatch(c[1], pat) for pat in a.cases)]
        if not cases:
            sys.exit(f"no case matches {a.cases} (see --list)")
    if not Path(a.kiln).exists() and not shutil.which(a.kiln):
        sys.exit(f"{a.kiln}: no kiln binary (cargo build --release -p kiln-cli, or give --kiln)")

    work = a.workdir or tempfile.mkdtemp(prefix="kiln-hf-check-")
    os.makedirs(work, exist_ok=True)
    work = os.path.abspath(work)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, kiln {a.kiln}, work dir {work}")
    failed = 0
    try:
        for direction, name, fn in cases:
            try:
                diff, note = fn(work)
                ok = diff < THRESHOLD
                print(f"{direction} {name:30s} max |logit difference| = {diff:.2e}  {'OK' if ok else 'MISMATCH'}{note}",
                      flush=True)
            except CaseError as e:
                ok = False
                print(f"{direction} {name:30s} ERROR: {e}", flush=True)
            failed += not ok
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{len(cases) - failed} of {len(cases)} cases OK" + ("" if not failed else f", {failed} failed"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
