#!/usr/bin/env python3
"""Checks that Kiln checkpoints and Hugging Face `transformers` agree, both ways.

1. A Kiln checkpoint loads with `transformers.GPT2LMHeadModel.from_pretrained(dir)` and gives the same
   logits as `kiln logits` (max abs difference below 1e-4).
2. A GPT-2 directory written by `transformers`' `save_pretrained` loads in Kiln with the same logits.

Needs torch and transformers (e.g. python3 -m venv /tmp/torch-venv && /tmp/torch-venv/bin/pip install
torch transformers safetensors). Usage:
    python scripts/check_hf_logits.py KILN_CHECKPOINT_DIR [--kiln target/release/kiln]
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def kiln_logits(kiln, model_dir, tokens):
    out = subprocess.run([kiln, "logits", "--model", model_dir, "--tokens", " ".join(map(str, tokens))],
                         check=True, capture_output=True, text=True).stdout
    return torch.tensor(json.loads(out)["logits"])


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--kiln", default="target/release/kiln")
    a = p.parse_args()
    ok = True

    model = GPT2LMHeadModel.from_pretrained(a.checkpoint).eval()
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (min(cfg.n_positions, 48),), generator=g).tolist()
    diff = (hf_logits(model, tokens) - kiln_logits(a.kiln, a.checkpoint, tokens)).abs().max().item()
    print(f"kiln checkpoint -> transformers: max |logit difference| = {diff:.2e}")
    ok &= diff < 1e-4

    # The other way: a model written by transformers, read by Kiln.
    tmp = tempfile.mkdtemp()
    try:
        torch.manual_seed(1)
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                                        n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=0, eos_token_id=0)).eval()
        hf.save_pretrained(tmp, safe_serialization=True)
        shutil.copy(f"{a.checkpoint}/tokenizer.json", tmp)
        diff2 = (hf_logits(hf, tokens) - kiln_logits(a.kiln, tmp, tokens)).abs().max().item()
        print(f"transformers save_pretrained -> kiln: max |logit difference| = {diff2:.2e}")
        ok &= diff2 < 1e-4
    finally:
        shutil.rmtree(tmp)
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
