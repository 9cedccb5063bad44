#!/usr/bin/env python3
"""PyTorch + PEFT yardstick for LoRA training speed, beside `kiln bench train --lora-rank R`.

transformers' LlamaForCausalLM (random weights, sdpa attention, fp32) with PEFT's LoRA on every
linear layer of the blocks (q/k/v/o, gate/up/down; lora_alpha = 2r, no dropout, as `kiln bench`
sets them), the base frozen, AdamW over the adapters, next-token cross-entropy on random tokens:
the same step `kiln bench train --arch llama --lora-rank R` times. Prints one RESULT line as
shared/bench/torch_gpt_bench.py does, so scripts/bench_vs_torch.sh divides the two (BENCHES=lora).

    /tmp/torch-venv/bin/python scripts/torch_lora_bench.py --vocab 49152 --layers 30 --dim 576 \
        --heads 9 --kv-heads 3 --ffn 1536 --ctx 512 --batch 4 --lora-rank 16
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["train"], nargs="?", default="train")
    p.add_argument("--arch", choices=["llama"], default="llama")
    p.add_argument("--kv-heads", type=int, default=0)
    p.add_argument("--ffn", type=int, default=0)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lora-rank", type=int, default=16)
    return p.parse_args()


def main():
    a = parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    ffn = a.ffn or (8 * a.dim // 3 + 63) // 64 * 64
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.dim, intermediate_size=ffn, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads or a.heads,
                      max_position_embeddings=a.ctx, tie_word_embeddings=True, attn_implementation="sdpa")
    base = LlamaForCausalLM(cfg)
    lora = LoraConfig(r=a.lora_rank, lora_alpha=2 * a.lora_rank, lora_dropout=0.0, bias="none",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    print(f"torch {torch.__version__} arch=llama threads={torch.get_num_threads()} vocab={a.vocab} "
          f"layers={a.layers} heads={a.heads} dim={a.dim} ctx={a.ctx} batch={a.batch} lora_rank={a.lora_rank}")
    g = torch.Generator().manual_seed(1234)
    data = torch.randint(0, a.vocab, (a.batch, a.ctx + 1), generator=g)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    times, losses = [], []
    for step in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(input_ids=x, use_cache=False).logits.view(-1, a.vocab), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if step >= a.warmup:
            times.append(dt)
    med = statistics.median(times)
    nparams = sum(p.numel() for p in model.parameters())
    ntrain = sum(p.numel() for p in trainable)
    tok = a.batch * a.ctx
    print(f"RESULT torch-train-lora params={nparams} trainable={ntrain} lora_rank={a.lora_rank} "
          f"tokens_per_step={tok} median_ms={med * 1e3:.1f} tok_per_s={tok / med:.0f} "
          f"loss_first={losses[0]:.4f} loss_last={losses[-1]:.4f}")


if __name__ == "__main__":
    main()
