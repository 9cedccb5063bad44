#!/usr/bin/env python3
"""Checks `kiln serve` with the real `openai` Python client (pip install openai).

Starts `kiln serve --port 0` on a chat model, then:
  - a chat completion, non-streaming and streaming, whose text must equal what
    `kiln chat --prompt P --seed S --temperature T --max-new-tokens M` prints;
  - n=2: choice i must equal `kiln chat` with seed S + i;
  - a stop sequence: the text must end just before it, finish_reason "stop";
  - /v1/completions against `kiln generate`;
  - errors through the client: wrong API key, unknown model, negative max_tokens;
  - with --load: C concurrent clients x R requests each (all must succeed and each answer must
    equal the same request sent alone), against the same requests one by one; aggregate
    tokens/s of both, and the server's peak memory against its KV-cache budget
    (--load-endpoint completions: documents that run to the token limit instead of short
    chat answers).

Usage:
  scripts/check_openai_server.py --kiln target/release/kiln --model runs/demo/ppo [--load]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time

import openai
from openai import OpenAI

PROMPTS = [
    "What is 7 plus 5?",
    "Where does Mia live?",
    "What colour is the ball?",
    "Spell the word apple backwards.",
    "Which is bigger, 31 or 13?",
    "What is 9 minus 4?",
    "How many letters are in the word river?",
    "What is 3 plus 11?",
]


def log(*a):
    print(*a, flush=True)


class Server:
    """`kiln serve` on a free port; its stderr is kept (startup lines and the access log)."""

    def __init__(self, kiln, model, extra):
        cmd = [kiln, "--quiet", "serve", "--model", model, "--port", "0"] + extra
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.lines = []
        self.addr = None
        ready = threading.Event()

        def pump():
            for line in self.proc.stderr:
                self.lines.append(line.rstrip("\n"))
                m = re.match(r"listening on (http://\S+)", line)
                if m:
                    self.addr = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(120) or self.addr is None:
            self.stop()
            sys.exit("kiln serve did not start:\n" + "\n".join(self.lines))

    def line(self, prefix):
        return next((l for l in self.lines if l.startswith(prefix)), "")

    def rss_kib(self, field):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for l in f:
                if l.startswith(field + ":"):
                    return int(l.split()[1])
        return 0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def kiln_chat(args, prompt, seed, temperature, max_tokens):
    out = subprocess.run(
        [args.kiln, "--quiet", "chat", "--model", args.model, "--prompt", prompt,
         "--seed", str(seed), "--temperature", str(temperature),
         "--max-new-tokens", str(max_tokens), "--weights", args.weights],
        check=True, capture_output=True, text=True).stdout
    assert out.endswith("\n"), repr(out)
    return out[:-1]


def kiln_generate(args, prompt, seed, temperature, max_tokens):
    out = subprocess.run(
        [args.kiln, "--quiet", "generate", "--model", args.model, "--prompt", prompt,
         "--seed", str(seed), "--temperature", str(temperature),
         "--max-new-tokens", str(max_tokens), "--weights", args.weights],
        check=True, capture_output=True, text=True).stdout
    assert out.startswith(prompt) and out.endswith("\n"), repr(out)
    return out[len(prompt):-1]


def check(cond, what):
    if not cond:
        raise SystemExit("FAIL: " + what)
    log("  ok  " + what)


def functional(args, client, model):
    p, seed, temp, mx = args.prompt, args.seed, args.temperature, args.max_tokens
    want = kiln_chat(args, p, seed, temp, mx)
    log(f"kiln chat --prompt {p!r} --seed {seed} --temperature {temp}: {want!r}")

    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": p}],
        seed=seed, temperature=temp, max_tokens=mx)
    got = r.choices[0].message.content
    log(f"chat.completions (non-streaming): {got!r}  finish={r.choices[0].finish_reason} usage={r.usage}")
    check(got == want, "non-streaming chat completion equals kiln chat")

    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": p}],
        seed=seed, temperature=temp, max_tokens=mx, stream=True,
        stream_options={"include_usage": True})
    parts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                parts.append(c.delta.content)
            finish = c.finish_reason or finish
    got = "".join(parts)
    log(f"chat.completions (streaming, {len(parts)} chunks): {got!r}  finish={finish} usage={usage}")
    check(got == want, "streamed chat completion equals kiln chat")

    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": p}],
        seed=seed, temperature=temp, max_tokens=mx, n=2)
    texts = [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]
    want1 = kiln_chat(args, p, seed + 1, temp, mx)
    log(f"n=2: {texts!r}")
    check(len(texts) == 2 and texts[0] == want and texts[1] == want1,
          f"n=2 gives kiln chat's answers for seeds {seed} and {seed + 1}")

    # A stop sequence from inside the expected answer: a word's last letter, the space and the next
    # word's first letter (two tokens, so the stream has to hold the start back), else any two
    # characters of the answer's second half.
    m = re.search(r"\w \w", want[1:])
    stop = m.group(0) if m else want[len(want) // 2:len(want) // 2 + 2]
    check(len(stop) > 0, f"the answer {want!r} is long enough to hold a stop sequence")
    cut = want.find(stop)
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": p}],
        seed=seed, temperature=temp, max_tokens=mx, stop=[stop])
    got = r.choices[0].message.content
    log(f"stop={stop!r}: {got!r} finish={r.choices[0].finish_reason}")
    check(cut >= 0 and got == want[:cut] and r.choices[0].finish_reason == "stop",
          "the stop sequence ends the text just before it")

    gp = "Mia"
    want_g = kiln_generate(args, gp, seed, temp, 16)
    r = client.completions.create(model=model, prompt=gp, seed=seed, temperature=temp, max_tokens=16)
    log(f"completions {gp!r}: {r.choices[0].text!r}")
    check(r.choices[0].text == want_g, "completion equals kiln generate")

    try:
        OpenAI(base_url=client.base_url, api_key="wrong-key").models.list()
        check(False, "a wrong API key is refused")
    except openai.AuthenticationError as e:
        check(e.status_code == 401, f"a wrong API key is refused (401: {e.message})")
    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": p}])
        check(False, "an unknown model is refused")
    except openai.NotFoundError as e:
        check(e.status_code == 404, f"an unknown model is refused (404: {e.message})")
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": p}], max_tokens=-1)
        check(False, "negative max_tokens is refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400, f"negative max_tokens is refused (400: {e.message})")


def load(args, client, model, server):
    C, R, mx = args.clients, args.requests, args.load_max_tokens
    jobs = [(c, i, PROMPTS[(c * R + i) % len(PROMPTS)], 1000 + c * R + i) for c in range(C) for i in range(R)]

    def one(prompt, seed):
        if args.load_endpoint == "completions":
            r = client.completions.create(
                model=model, prompt=prompt.split()[-1].rstrip("?.") + " went to",
                seed=seed, temperature=args.temperature, max_tokens=mx)
            return r.choices[0].text, r.usage.completion_tokens
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}],
            seed=seed, temperature=args.temperature, max_tokens=mx)
        return r.choices[0].message.content, r.usage.completion_tokens

    peak = {"rss": 0}
    sampling = threading.Event()

    def sample_rss():
        while not sampling.is_set():
            peak["rss"] = max(peak["rss"], server.rss_kib("VmRSS"))
            time.sleep(0.02)

    def sequential():
        t0 = time.time()
        out, tokens = {}, 0
        for (c, i, prompt, seed) in jobs:
            out[(c, i)], n = one(prompt, seed)
            tokens += n
        return out, tokens, time.time() - t0

    def concurrent():
        results, errors, tokens = {}, [], [0]
        lock = threading.Lock()

        def client_loop(c):
            for i in range(R):
                prompt, seed = jobs[c * R + i][2], jobs[c * R + i][3]
                try:
                    text, n = one(prompt, seed)
                    with lock:
                        results[(c, i)] = text
                        tokens[0] += n
                except Exception as e:  # noqa: BLE001 - reported below
                    with lock:
                        errors.append(f"client {c} request {i}: {e!r}")

        threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(C)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results, errors, tokens[0], time.time() - t0

    log(f"load ({args.load_endpoint}, weights {args.weights}): {C} concurrent clients x {R} requests, "
        f"max_tokens {mx}, temperature {args.temperature}, {args.rounds} round(s)")
    rss_thread = threading.Thread(target=sample_rss, daemon=True)
    rss_thread.start()
    seq_rates, conc_rates = [], []
    for k in range(args.rounds):
        alone, seq_tokens, seq_s = sequential()
        results, errors, conc_tokens, conc_s = concurrent()
        check(not errors, f"round {k + 1}: all {C * R} concurrent requests succeed"
              + ("" if not errors else ": " + "; ".join(errors[:5])))
        same = sum(results.get(key) == alone[key] for key in alone)
        check(same == len(alone), f"round {k + 1}: every concurrent answer equals the same request sent alone "
              f"({same}/{len(alone)})")
        seq_rates.append(seq_tokens / seq_s)
        conc_rates.append(conc_tokens / conc_s)
        log(f"  round {k + 1}: sequential {seq_tokens} tokens in {seq_s:.2f} s = {seq_rates[-1]:.0f} tok/s "
            f"({len(jobs) / seq_s:.1f} requests/s); concurrent {conc_tokens} tokens in {conc_s:.2f} s = "
            f"{conc_rates[-1]:.0f} tok/s ({len(jobs) / conc_s:.1f} requests/s)")
    sampling.set()
    rss_thread.join()
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    log(f"  median: sequential {med(seq_rates):.0f} tok/s, concurrent {med(conc_rates):.0f} tok/s, "
        f"{med(conc_rates) / med(seq_rates):.2f}x")
    cache = server.line("kv cache:")
    hwm = server.rss_kib("VmHWM")
    m = re.search(r"= ([0-9.]+) MiB", cache)
    budget = float(m.group(1)) if m else float("nan")
    log(f"  server memory: peak RSS {hwm / 1024:.1f} MiB (sampled during the load: {peak['rss'] / 1024:.1f} MiB); "
        f"{cache}")
    idle = server.idle_rss / 1024
    log(f"  RSS before any request {idle:.1f} MiB; growth under load {hwm / 1024 - idle:.1f} MiB "
        f"against the {budget:.2f} MiB cache allocated at start")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", default="target/release/kiln")
    ap.add_argument("--model", required=True, help="a chat model directory (e.g. runs/demo/ppo)")
    ap.add_argument("--weights", default="f32", choices=["f32", "bf16", "int8"])
    ap.add_argument("--prompt", default="What is 7 plus 5?")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--load", action="store_true", help="also run the load test")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--load-max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=1, help="load rounds (sequential then concurrent); medians")
    ap.add_argument("--load-endpoint", default="chat", choices=["chat", "completions"],
                    help="chat: short answers; completions: documents continued up to the token limit")
    args = ap.parse_args()

    key = "kiln-check-key"
    server = Server(args.kiln, args.model,
                    ["--api-key", key, "--weights", args.weights, "--max-batch", str(args.max_batch)])
    try:
        for l in server.lines[:3]:
            log("server: " + l)
        server.idle_rss = server.rss_kib("VmRSS")
        client = OpenAI(base_url=server.addr + "/v1", api_key=key, max_retries=0, timeout=120)
        models = client.models.list().data
        model = models[0].id
        log(f"openai {openai.__version__}; GET /v1/models: {[m.id for m in models]}")
        functional(args, client, model)
        if args.load:
            load(args, client, model, server)
        log("all checks passed")
    finally:
        server.stop()
        tail = [l for l in server.lines if "shutting down" in l or "stopped" in l]
        for l in tail:
            log("server: " + l)


if __name__ == "__main__":
    main()
