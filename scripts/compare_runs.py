#!/usr/bin/env python3
"""Compares two Kiln run directories: the per-step losses of metrics.jsonl (max relative difference)
and the final checkpoints' weights (max absolute difference), for the data-parallel checks of
`mpirun -np N` against one process. Needs only numpy and safetensors.

usage: compare_runs.py RUN_A RUN_B [--key loss]"""
import json, sys, pathlib
import numpy as np
from safetensors.numpy import load_file

def metrics(run, key):
    out = {}
    for line in (pathlib.Path(run) / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if key in m:
            out[m["step"]] = m[key]
    return out

def final_weights(run):
    run = pathlib.Path(run)
    return load_file(str(run / (run / "latest").read_text().strip() / "model.safetensors"))

def main():
    a, b = sys.argv[1], sys.argv[2]
    key = sys.argv[sys.argv.index("--key") + 1] if "--key" in sys.argv else "loss"
    ma, mb = metrics(a, key), metrics(b, key)
    steps = sorted(set(ma) & set(mb))
    if not steps or set(ma) != set(mb):
        sys.exit(f"the runs logged {key} at different steps: {sorted(ma)} vs {sorted(mb)}")
    rel = max(abs(ma[s] - mb[s]) / max(abs(mb[s]), 1e-12) for s in steps)
    wa, wb = final_weights(a), final_weights(b)
    if wa.keys() != wb.keys():
        sys.exit("the final checkpoints hold different tensors")
    wmax = max(float(np.max(np.abs(wa[k].astype(np.float64) - wb[k]))) for k in wa)
    scale = max(float(np.max(np.abs(wb[k]))) for k in wb)
    print(f"RESULT steps={len(steps)} last_step={steps[-1]} {key}_a={ma[steps[-1]]:.8f} {key}_b={mb[steps[-1]]:.8f} "
          f"max_rel_{key}_diff={rel:.3e} max_abs_weight_diff={wmax:.3e} (largest weight {scale:.3f})")

main()
