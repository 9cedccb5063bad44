#!/usr/bin/env python3
"""Writes the Parquet fixtures of crates/kiln-data/tests/fixtures/parquet/ with pyarrow, beside the
same rows as JSONL, so the Rust test `datasets_parquet.rs` proves that Kiln's reader (the `parquet`
crate) reads what another implementation wrote exactly as it reads the JSONL.

The files are laid out as Hugging Face datasets ship them (`datasets` writes through pyarrow):
strings as `large_string` / `string`, nulls where a field is absent, chat columns as
`list<struct<content, role>>`, several row groups, snappy (pyarrow's default) and zstd compression.

    sft_alpaca.parquet   instruction / input (null in some rows) / output   [snappy, row groups of 2]
    sft_chat.parquet     messages: list<struct<role, content>>              [zstd]
    prefs.parquet        prompt / chosen / rejected                         [snappy]
    ranked.parquet       prompt / choices: list<struct<text, rank int64>>   [uncompressed]
    prompts.parquet      prompt / answer (an extra column for reward programs)
    renamed.parquet      question / response (read with --field instruction=question --field output=response)

Deterministic (no randomness). Usage:
    /tmp/torch-venv/bin/python scripts/make_parquet_fixtures.py [--out crates/kiln-data/tests/fixtures/parquet]
"""
import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 plus 3 is 5."},
    {"instruction": "Say hello.", "input": None, "output": "Hello!"},
    {"instruction": "Spell 'cat' backwards.", "input": "", "output": "tac"},
    {"instruction": "Translate to French: water", "input": None, "output": "eau — l'eau ✓"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
]

CHAT = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
                  {"role": "assistant", "content": "6"}]},
    {"messages": [{"role": "user", "content": "Unicode: 日本語 🙂"}, {"role": "assistant", "content": "はい 🙂"}]},
]

PREFS = [
    {"prompt": "What is 2 plus 3?", "chosen": "2 plus 3 is 5.", "rejected": "I do not know."},
    {"prompt": "Where does Ada live?", "chosen": "Ada lives in Oakvale.", "rejected": "ada oakvale"},
    {"prompt": "Spell 'dog' backwards.", "chosen": "god", "rejected": "dgo"},
]

RANKED = [
    {"prompt": "What is 1 plus 1?", "choices": [{"text": "2.", "rank": 1}, {"text": "3.", "rank": 2}, {"text": "I do not know.", "rank": 3}]},
    {"prompt": "Is 7 more than 4?", "choices": [{"text": "Yes.", "rank": 1}, {"text": "No.", "rank": 2}]},
]

PROMPTS = [
    {"prompt": "What is 6 plus 7?", "answer": "13"},
    {"prompt": "What is 9 minus 4?", "answer": "5"},
]

RENAMED = [
    {"question": "What is the capital of France?", "response": "Paris."},
    {"question": "What is 10 minus 3?", "response": "7."},
]


def write(out: Path, name: str, rows, schema, row_group_size=None, compression="snappy"):
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, out / f"{name}.parquet", row_group_size=row_group_size, compression=compression)
    with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    back = pq.read_table(out / f"{name}.parquet").to_pylist()
    assert back == rows, name
    meta = pq.ParquetFile(out / f"{name}.parquet").metadata
    print(f"{name}.parquet: {meta.num_rows} rows in {meta.num_row_groups} row groups, {compression}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="crates/kiln-data/tests/fixtures/parquet")
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    msg = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    write(out, "sft_alpaca", ALPACA,
          pa.schema([("instruction", pa.large_string()), ("input", pa.large_string()), ("output", pa.large_string())]),
          row_group_size=2)
    write(out, "sft_chat", CHAT, pa.schema([("messages", msg)]), compression="zstd")
    write(out, "prefs", PREFS, pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string())]))
    choice = pa.list_(pa.struct([("text", pa.string()), ("rank", pa.int64())]))
    write(out, "ranked", RANKED, pa.schema([("prompt", pa.string()), ("choices", choice)]), compression="none")
    write(out, "prompts", PROMPTS, pa.schema([("prompt", pa.string()), ("answer", pa.string())]))
    write(out, "renamed", RENAMED, pa.schema([("question", pa.string()), ("response", pa.string())]))
    print(f"pyarrow {pa.__version__}")


if __name__ == "__main__":
    main()
