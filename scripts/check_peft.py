#!/usr/bin/env python3
"""Checks Kiln's LoRA adapters against `peft`: an adapter Kiln trains is a PEFT adapter.

For a transformers-made random Llama (grouped-query attention, untied head) and GPT-2 (Conv1D
layers, fan_in_fan_out), each with a ChatML tokenizer:
  1. `kiln sft --init <model dir> --lora-rank 8 --lora-alpha 16 --lora-targets ...` trains adapters
     a few steps; its checkpoint holds adapter_model.safetensors + adapter_config.json only.
  2. `peft.PeftModel.from_pretrained(<transformers model>, <checkpoint>)` loads it; its logits must
     equal `kiln logits --model <model dir> --adapter <checkpoint>` and `kiln logits --model
     <checkpoint>` (the adapter directory loads onto its base) within 1e-4.
  3. `kiln lora merge` writes a full model; transformers loads it and its logits equal the adapter
     model's (1e-4), and its weights equal peft's `merge_and_unload()` (1e-5).
  4. A LoRA reward model (`kiln rm --lora-rank 4`: the score head trains in full, PEFT's
     modules_to_save) loads as `PeftModel` on LlamaForSequenceClassification with the same scores.

One line per check, OK or MISMATCH; exit status 1 if any failed. Nothing is downloaded. Usage:
    /tmp/torch-venv/bin/python scripts/check_peft.py [--kiln target/release/kiln] [--workdir DIR]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import peft
import torch
import transformers
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM)

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_chat_templates import CHATML, byte_level, save_tokenizer  # noqa: E402

transformers.logging.set_verbosity_error()
THRESHOLD = 1e-4
FAILED = []


def report(name, ok, detail=""):
    print(f"{'OK      ' if ok else 'MISMATCH'} {name}{(': ' + detail) if detail else ''}", flush=True)
    if not ok:
        FAILED.append(name)


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}\n{r.stderr.strip()}")
    return r.stdout


def latest(run_dir):
    return Path(run_dir) / (Path(run_dir) / "latest").read_text().strip()


def kiln_logits(kiln, model, tokens, adapter=None):
    cmd = [kiln, "--quiet", "logits", "--model", str(model), "--tokens", " ".join(map(str, tokens))]
    if adapter:
        cmd += ["--adapter", str(adapter)]
    return torch.tensor(json.loads(run(cmd))["logits"])


def make_base(family, d):
    tok = byte_level(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    fast = save_tokenizer(tok, d, None, "<|im_end|>", CHATML, pad="<|endoftext|>")
    eos, pad = fast.convert_tokens_to_ids("<|im_end|>"), fast.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(0)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=False, eos_token_id=eos, bos_token_id=None, pad_token_id=pad)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=640, n_positions=256, n_embd=64, n_layer=2, n_head=4, eos_token_id=eos,
                         bos_token_id=eos, pad_token_id=pad)
        model = GPT2LMHeadModel(cfg)
    model.float().save_pretrained(d, safe_serialization=True)
    return fast


def data_file(work):
    p = Path("/work/shared/data/alpaca_tiny.json")
    if p.is_file():
        return p
    p = Path(work) / "alpaca.json"
    p.write_text(json.dumps([{"instruction": f"Add {i} and 2.", "output": f"The sum is {i + 2}."}
                             for i in range(64)]))
    return p


def check_causal(kiln, work, family, targets):
    d = Path(work) / f"hf_{family}"
    fast = make_base(family, d)
    out = Path(work) / f"sft_lora_{family}"
    run([kiln, "--quiet", "sft", "--init", str(d), "--data", str(data_file(work)), "--out", str(out),
         "--max-steps", "20", "--batch-size", "8", "--lr", "1e-2", "--warmup-steps", "2", "--eval-every", "1000",
         "--ckpt-every", "20", "--set", "seq_len=128", "--lora-rank", "8", "--lora-alpha", "16",
         "--lora-targets", targets])
    ckpt = latest(out)
    names = sorted(p.name for p in ckpt.iterdir())
    report(f"{family}: the LoRA checkpoint holds adapter files, no full weights",
           "adapter_model.safetensors" in names and "model.safetensors" not in names, ", ".join(names))
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    tensors = load_file(str(ckpt / "adapter_model.safetensors"))
    moved = max(v.abs().max().item() for k, v in tensors.items() if "lora_B" in k)
    report(f"{family}: adapter_config.json and tensor names", cfg["peft_type"] == "LORA" and
           all(k.startswith("base_model.model.") for k in tensors),
           f"r={cfg['r']} alpha={cfg['lora_alpha']} targets={cfg['target_modules']} "
           f"fan_in_fan_out={cfg['fan_in_fan_out']}; {len(tensors)} tensors, e.g. {sorted(tensors)[0]} "
           f"{tuple(tensors[sorted(tensors)[0]].shape)}; max |lora_B| {moved:.3f} (trained)")

    base = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    pm = peft.PeftModel.from_pretrained(base, str(ckpt)).eval()
    ids = fast.apply_chat_template([{"role": "user", "content": "Add 3 and 2."}], tokenize=True,
                                   add_generation_prompt=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    ids = list(ids) + [5, 77, 300, 12]
    with torch.no_grad():
        ref = pm(torch.tensor([ids])).logits[0]
        with pm.disable_adapter():
            plain = pm(torch.tensor([ids])).logits[0]
    k1 = kiln_logits(kiln, d, ids, adapter=ckpt)
    k2 = kiln_logits(kiln, ckpt, ids)
    d1, d2 = (k1 - ref).abs().max().item(), (k2 - ref).abs().max().item()
    effect = (ref - plain).abs().max().item()
    report(f"{family}: peft PeftModel logits vs kiln logits --adapter", d1 <= THRESHOLD,
           f"max |diff| {d1:.2e} over {tuple(ref.shape)} (the adapter moves logits by up to {effect:.3f})")
    report(f"{family}: peft logits vs kiln logits of the adapter directory", d2 <= THRESHOLD, f"max |diff| {d2:.2e}")

    merged_dir = Path(work) / f"merged_{family}"
    run([kiln, "--quiet", "lora", "merge", "--model", str(d), "--adapter", str(ckpt), "--out", str(merged_dir)])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        mref = merged(torch.tensor([ids])).logits[0]
    d3 = (mref - ref).abs().max().item()
    report(f"{family}: transformers on `kiln lora merge` output vs the adapter model", d3 <= THRESHOLD,
           f"max |diff| {d3:.2e}")
    pmerged = pm.merge_and_unload()
    ours = merged.state_dict()
    wdiff = max((ours[k] - v).abs().max().item() for k, v in pmerged.state_dict().items() if k in ours)
    report(f"{family}: merged weights vs peft merge_and_unload()", wdiff <= 1e-5, f"max |diff| {wdiff:.2e}")


def check_reward_model(kiln, work):
    d = Path(work) / "hf_llama"
    out = Path(work) / "rm_lora"
    prefs = Path(work) / "prefs.jsonl"
    with open(prefs, "w") as f:
        for i in range(48):
            f.write(json.dumps({"prompt": f"Add {i} and 2.", "chosen": f"The sum is {i + 2}.",
                                "rejected": f"I think {i * 3 + 1}."}) + "\n")
    run([kiln, "--quiet", "rm", "--init", str(d), "--data", str(prefs), "--out", str(out), "--max-steps", "15",
         "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "2", "--eval-every", "1000", "--ckpt-every", "15",
         "--set", "seq_len=96", "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "q_proj,v_proj"])
    ckpt = latest(out)
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    tensors = load_file(str(ckpt / "adapter_model.safetensors"))
    report("rm: score head saved in full (modules_to_save)", cfg["modules_to_save"] == ["score"] and
           "base_model.model.score.weight" in tensors and cfg["task_type"] == "SEQ_CLS",
           f"task_type={cfg['task_type']}, score {tuple(tensors['base_model.model.score.weight'].shape)}")
    base = AutoModelForSequenceClassification.from_pretrained(d, num_labels=1, dtype=torch.float32)
    base.config.pad_token_id = base.config.pad_token_id or 0
    pm = peft.PeftModel.from_pretrained(base, str(ckpt)).eval()
    seqs = [[7, 8, 9, 10, 11], [30, 31, 32]]
    want = []
    with torch.no_grad():
        for s in seqs:
            want.append(pm(torch.tensor([s])).logits[0, 0].item())
    got = []
    for s in seqs:
        full = kiln_logits_score(kiln, ckpt, s)
        got.append(full)
    diff = max(abs(a - b) for a, b in zip(want, got))
    report("rm: peft SEQ_CLS scores vs Kiln's reward model", diff <= THRESHOLD,
           f"scores {['%.4f' % x for x in want]} vs {['%.4f' % x for x in got]}")


def kiln_logits_score(kiln, ckpt, seq):
    # `kiln logits` of a scored model prints the score head per position: the last is the reward.
    out = json.loads(run([kiln, "--quiet", "logits", "--model", str(ckpt), "--tokens", " ".join(map(str, seq))]))
    return out["scores"][-1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = Path(__file__).resolve().parent.parent
    ap.add_argument("--kiln", default=os.environ.get("KILN", str(root / "target/release/kiln")))
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    print(f"transformers {transformers.__version__}, peft {peft.__version__}, kiln {a.kiln}")
    with tempfile.TemporaryDirectory() as tmp:
        work = a.workdir or tmp
        Path(work).mkdir(parents=True, exist_ok=True)
        for family, targets in [("llama", "all-linear"), ("gpt2", "c_attn,c_proj,c_fc")]:
            try:
                check_causal(a.kiln, work, family, targets)
            except RuntimeError as e:
                report(f"{family}: kiln run", False, str(e))
        try:
            check_reward_model(a.kiln, work)
        except RuntimeError as e:
            report("rm: kiln run", False, str(e))
    print(f"{'FAILED: ' + ', '.join(FAILED) if FAILED else 'all checks passed'}")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
