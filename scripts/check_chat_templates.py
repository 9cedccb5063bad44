#!/usr/bin/env python3
"""Checks Kiln's Hugging Face tokenizers and chat templates against `transformers`, and fine-tunes a
transformers-made model with `kiln sft`.

a) Templates: tokenizers in the GPT-2 layout (byte-level BPE, specials at the end of the vocabulary),
   the Llama 3 layout (Llama 3's split regex) and the Llama 2 layout (sentencepiece-style pieces with
   byte fallback) are built with the `tokenizers` library, wrapped in `PreTrainedTokenizerFast` with a
   ChatML, Llama 3, Llama 2 [INST], Zephyr or Alpaca chat template and written with
   `save_pretrained`. For several conversations, `kiln template render --ids` must give the ids of
   `apply_chat_template(tokenize=True)` and `kiln template render` its text.
b) Fine-tuning: transformers makes a tiny random LlamaForCausalLM with the ChatML tokenizer;
   `kiln sft --init` trains it a few steps on alpaca_tiny.json and chat_tiny.json; transformers loads
   the result (AutoModelForCausalLM and AutoTokenizer), whose template gives Kiln's ids and whose
   logits equal `kiln logits` (<= 1e-4).
c) DPO: `kiln dpo --init` continues from (b) with the model's Jinja template: the loss falls from
   log 2; its response log-probabilities at step 0 equal transformers' sums over the response tokens
   of apply_chat_template's ids (so the prompt/response boundary is where transformers puts it); and
   transformers loads the result with Kiln's logits.

One line per check with OK or MISMATCH; the exit status is 1 if any check failed. Nothing is
downloaded. Usage:
    /tmp/torch-venv/bin/python scripts/check_chat_templates.py [--kiln target/release/kiln] [--workdir DIR]
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers, AddedToken, Regex
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

transformers.logging.set_verbosity_error()
try:
    transformers.utils.logging.disable_progress_bar()
except AttributeError:
    pass

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{- bos_token }}\n{%- for message in messages %}\n{{- '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}\n"
          "{%- if add_generation_prompt %}\n{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
          "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
          "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
          "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
          "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
ALPACA = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
          "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
          "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
          "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")

SHARED = Path("/work/shared/data")
FAILED = []


def report(name, ok, detail=""):
    print(f"{'OK      ' if ok else 'MISMATCH'} {name}{(': ' + detail) if detail else ''}", flush=True)
    if not ok:
        FAILED.append(name)


def training_text():
    p = SHARED / "tinyshakespeare.txt"
    if p.is_file():
        return p.read_text()[:200_000]
    return "".join(f"Line {i}: the quick brown fox jumps over the lazy dog; café {i * 7}.\n" for i in range(300))


def byte_level(split_regex=None, vocab=600, specials=()):
    tok = Tokenizer(models.BPE())
    if split_regex:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=0, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_text().split("\n\n"), trainer)
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    return tok


def llama2_layout():
    vocab = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    vocab += list("▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'-\n")
    merges = []
    for m in ["▁ t", "h e", "▁t he", "i n", "a n", "e r", "▁ a", "o u", "r e", "o n", "▁ s", "e n", "▁ w", "▁ o",
              "▁ m", "▁ b", "i s", "a t", "o r", "e s", "▁a n", "▁an d", "▁ I", "l l", "▁ h", "▁ f", "in g", "▁ y",
              "ou r", "▁y our", "▁ d", "▁ c", "▁ l", "▁o f", "▁t o"]:
        a, b = m.split(" ")
        merges.append((a, b))
        if a + b not in vocab:
            vocab.append(a + b)
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(s, special=True) for s in ["<unk>", "<s>", "</s>"]])
    return tok


def save_tokenizer(tok, d, bos, eos, template, pad=None):
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    fast.chat_template = template
    fast.save_pretrained(d)
    # Kiln reads the template from tokenizer_config.json or chat_template.jinja (transformers 5 writes the latter).
    return fast


def hf_ids(fast, msgs, gen):
    out = fast.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    return list(out)


def kiln_render(kiln, d, msgs, gen, ids, work):
    f = Path(work) / "messages.json"
    f.write_text(json.dumps(msgs))
    cmd = [kiln, "--quiet", "template", "render", "--model", str(d), "--input", str(f)]
    if gen:
        cmd.append("--add-generation-prompt")
    if ids:
        cmd.append("--ids")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return json.loads(r.stdout) if ids else r.stdout


CONVERSATIONS = [
    ("1 turn", [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital is Paris."}]),
    ("system + 2 turns", [{"role": "system", "content": "You are a helpful assistant."},
                          {"role": "user", "content": "hello there"},
                          {"role": "assistant", "content": "Hi! How can I help?"},
                          {"role": "user", "content": "Tell me a joke, please.\nA short one."},
                          {"role": "assistant", "content": " Why did the chicken cross the road? "}]),
    ("unicode", [{"role": "user", "content": "Ünïcödé: naïve café, 日本語 🦀"},
                 {"role": "assistant", "content": "Très bien — ça marche ✓"}]),
]


def check_templates(kiln, work):
    gpt2 = byte_level(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    llama3 = byte_level(LLAMA3_PATTERN, specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                  "<|end_header_id|>", "<|eot_id|>"])
    llama2 = llama2_layout()
    cases = [("chatml", gpt2, None, "<|im_end|>", CHATML),
             ("llama3", llama3, "<|begin_of_text|>", "<|eot_id|>", LLAMA3),
             ("llama2", llama2, "<s>", "</s>", LLAMA2),
             ("zephyr", llama2, "<s>", "</s>", ZEPHYR),
             ("alpaca", gpt2, None, "<|endoftext|>", ALPACA)]
    for name, tok, bos, eos, template in cases:
        d = Path(work) / f"tok_{name}"
        fast = save_tokenizer(tok, d, bos, eos, template)
        for cname, msgs in CONVERSATIONS:
            if name == "alpaca" and cname != "1 turn":
                msgs = [m for m in msgs if m["role"] != "system"]
            for gen, upto in [(False, len(msgs)), (True, len(msgs) - 1)]:
                m = msgs[:upto]
                want = hf_ids(fast, m, gen)
                got = kiln_render(kiln, d, m, gen, True, work)
                text_want = fast.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)
                text_got = kiln_render(kiln, d, m, gen, False, work)
                trained = fast.decode([t for t, k in zip(got["ids"], got["loss_mask"]) if k])
                ok = got["ids"] == want and text_got == text_want
                detail = f"{len(want)} ids" + ("" if gen else f", trained {trained!r}")
                if not ok:
                    detail += f"\n    kiln ids {got['ids']}\n    hf   ids {want}\n    kiln text {text_got!r}\n    hf   text {text_want!r}"
                report(f"{name:7} {cname:17} {'gen-prompt' if gen else 'full':10}", ok, detail)


def latest(run):
    return Path(run) / (Path(run) / "latest").read_text().strip()


def check_sft(kiln, work):
    tok = byte_level(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    d = Path(work) / "hf_llama"
    fast = save_tokenizer(tok, d, None, "<|im_end|>", CHATML, pad="<|endoftext|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
                      bos_token_id=None, pad_token_id=fast.convert_tokens_to_ids("<|endoftext|>"))
    model = LlamaForCausalLM(cfg).float()
    model.save_pretrained(d, safe_serialization=True)
    data = SHARED / "alpaca_tiny.json"
    if not data.is_file():
        data = Path(work) / "alpaca.json"
        data.write_text(json.dumps([{"instruction": f"Add {i} and 2.", "output": f"The sum is {i + 2}."}
                                    for i in range(64)]))
    out = Path(work) / "sft"
    # Alpaca and ShareGPT chat rows together (chat_tiny.json, where it exists).
    extra = ["--data", str(SHARED / "chat_tiny.json")] if (SHARED / "chat_tiny.json").is_file() else []
    cmd = [kiln, "--quiet", "sft", "--init", str(d), "--data", str(data), *extra, "--out", str(out),
           "--max-steps", "30",
           "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "1000", "--ckpt-every", "30",
           "--set", "seq_len=128"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        report("sft on a transformers model", False, r.stderr.strip())
        return
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r and "step" in r]
    report("kiln sft --init <transformers Llama dir>", losses[-1] < losses[0],
           f"{len(losses)} logged losses, {losses[0]:.3f} -> {losses[-1]:.3f}")
    ckpt = latest(out)
    back_tok = AutoTokenizer.from_pretrained(ckpt)
    msgs = CONVERSATIONS[1][1]
    want = hf_ids(back_tok, msgs[:-1], True)
    got = kiln_render(kiln, ckpt, msgs[:-1], True, True, work)["ids"]
    report("AutoTokenizer on Kiln's checkpoint: template ids", want == got, f"{len(want)} ids")
    back = AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32)
    back.eval()
    with torch.no_grad():
        ref = back(torch.tensor([want])).logits[0]
    r = subprocess.run([kiln, "--quiet", "logits", "--model", str(ckpt), "--tokens", " ".join(map(str, want))],
                       capture_output=True, text=True, check=True)
    kl = torch.tensor(json.loads(r.stdout)["logits"])
    diff = (kl - ref).abs().max().item()
    moved = (back.lm_head.weight - model.lm_head.weight).abs().max().item()
    report("transformers logits of the fine-tuned model vs kiln logits", diff <= 1e-4,
           f"max |diff| {diff:.2e} over {tuple(ref.shape)} (weights moved by up to {moved:.3f})")
    check_dpo(kiln, work, out, want)


def check_dpo(kiln, work, sft, ids):
    """DPO from the SFT model with its Jinja template: the loss falls from log 2, and transformers
    loads the result with Kiln's logits; the response log-probabilities Kiln logs at step 0 equal
    transformers' sums over the response tokens of apply_chat_template's rendering."""
    prefs = Path(work) / "prefs.jsonl"
    pairs = [("What is 2 plus 3?", "2 plus 3 is 5.", "I do not know."),
             ("Name a colour.", "Blue.", "A colour."),
             ("Say hello.", "Hello!", "No.")]
    prefs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in pairs))
    out = Path(work) / "dpo"
    r = subprocess.run([kiln, "--quiet", "dpo", "--init", str(sft), "--data", str(prefs), "--val-data", str(prefs),
                        "--out", str(out), "--max-steps", "20", "--batch-size", "3", "--lr", "1e-3",
                        "--eval-every", "20", "--ckpt-every", "20", "--set", "seq_len=128"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        report("kiln dpo on the transformers-derived model", False, r.stderr.strip())
        return
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "val_loss" in r]
    first, last = evals[0], evals[-1]
    report("kiln dpo --init <transformers-derived dir>: val loss falls from log 2",
           abs(first["val_loss"] - math.log(2)) < 1e-4 and last["val_loss"] < first["val_loss"],
           f"{first['val_loss']:.4f} -> {last['val_loss']:.4f}")
    # Step 0: the policy is the reference, so logps/chosen is the mean summed log-probability of
    # the chosen responses under the SFT model; recompute it with transformers.
    sft_ckpt = latest(sft)
    tok = AutoTokenizer.from_pretrained(sft_ckpt)
    ref = AutoModelForCausalLM.from_pretrained(sft_ckpt, torch_dtype=torch.float32).eval()
    total = 0.0
    for p, c, _ in pairs:
        prompt = hf_ids(tok, [{"role": "user", "content": p}], True)
        full = hf_ids(tok, [{"role": "user", "content": p}, {"role": "assistant", "content": c}], False)
        assert full[:len(prompt)] == prompt
        # The response and its <|im_end|>; ChatML's newline after it is not part of the response.
        end = len(full) - full[::-1].index(tok.convert_tokens_to_ids("<|im_end|>"))
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([full[:end]])).logits[0], -1)
        total += sum(logp[i - 1, full[i]].item() for i in range(len(prompt), end))
    want = total / len(pairs)
    got = first["val_logps/chosen"]
    report("DPO's response log-probabilities (step 0) vs transformers on apply_chat_template's ids",
           abs(got - want) < 1e-3, f"kiln {got:.5f}, transformers {want:.5f}")
    ckpt = latest(out)
    back = AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        hf = back(torch.tensor([ids])).logits[0]
    r = subprocess.run([kiln, "--quiet", "logits", "--model", str(ckpt), "--tokens", " ".join(map(str, ids))],
                       capture_output=True, text=True, check=True)
    diff = (torch.tensor(json.loads(r.stdout)["logits"]) - hf).abs().max().item()
    report("transformers logits of the DPO model vs kiln logits", diff <= 1e-4, f"max |diff| {diff:.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = Path(__file__).resolve().parent.parent
    ap.add_argument("--kiln", default=os.environ.get("KILN", str(root / "target/release/kiln")))
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    print(f"transformers {transformers.__version__}, kiln {a.kiln}")
    with tempfile.TemporaryDirectory() as tmp:
        work = a.workdir or tmp
        Path(work).mkdir(parents=True, exist_ok=True)
        check_templates(a.kiln, work)
        check_sft(a.kiln, work)
    print(f"{'FAILED: ' + ', '.join(FAILED) if FAILED else 'all checks passed'}")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
