"""Benchmark: latency of the digits CNN and the tiny stdlib LM in every precision variant of notebook 10.

For each model and variant (fp32, fp16, bf16, torch.ao int8 dynamic, int8 static (CNN), torchao
int8 dynamic / int8 weight-only / int4 weight-only where they run on this CPU) and for batch 1 and
a larger batch: warm-up, then REPS timed calls one by one (threads pinned to 2), percentiles
p10/p50/p90/p99, and a second clock (torch.utils.benchmark.Timer median). Weights are random:
latency does not depend on their values. A variant that fails records its error instead.
Writes $BENCH_OUT/latency.json (default build/bench). Run: make bench, or .venv/bin/python bench/latency.py
"""

import json
import os
import platform
from pathlib import Path

import torch

import lecturelib as ll
from lecturelib import measure as M

REPS = int(os.environ.get("BENCH_REPS", "300"))


def variants(model, example, static=None):
    out = {"fp32": (model.eval(), example), "fp16": (M.cast_variant(model, torch.float16), example),
           "bf16": (M.cast_variant(model, torch.bfloat16), example), "int8 dynamic (torch.ao)": (M.dynamic_int8(model), example)}
    if static is not None:
        out["int8 static (torch.ao)"] = (static, example)
    for cfg in M.TORCHAO_CONFIGS:
        m, err = M.torchao_variant(model, cfg)
        out[f"torchao {cfg}"] = (m, example) if m is not None else (None, err)
    return out


def run(name, model, inputs, static=None):
    rows = []
    for batch, x in inputs.items():
        for v, (m, arg) in variants(model, x, static).items():
            if m is None:
                rows.append({"model": name, "variant": v, "batch": batch, "error": arg})
                continue
            xx = x.to(torch.float16) if v == "fp16" and x.is_floating_point() else x
            xx = xx.to(torch.bfloat16) if v == "bf16" and x.is_floating_point() else xx
            fn = lambda m=m, xx=xx: m(xx)  # noqa: E731
            s = M.measure_latency(fn, reps=REPS, warmup=20)
            rows.append({"model": name, "variant": v, "batch": batch,
                         **{f"p{q}_ms": s.percentile(q) for q in (10, 50, 90, 99)},
                         "timer_median_ms": M.timer_median_ms(fn)})
            print(f"{name:4s} b={batch:<4d} {v:45s} p50 {rows[-1]['p50_ms']:8.3f} ms  p90 {rows[-1]['p90_ms']:8.3f}")
    return rows


def main():
    ll.seed_everything(0)
    ll.set_threads(2)
    cnn = M.DigitsCNN().eval()
    x1, x256 = torch.rand(1, 64), torch.rand(256, 64)
    rows = run("cnn", cnn, {1: x1, 256: x256}, static=M.static_int8(cnn, x256))
    lm = M.TinyLM(M.LMConfig()).eval()
    t1 = torch.randint(0, 128, (1, 128))
    t16 = torch.randint(0, 128, (16, 128))
    rows += run("lm", lm, {1: t1, 16: t16})
    out = Path(os.environ.get("BENCH_OUT", "build/bench"))
    out.mkdir(parents=True, exist_ok=True)
    payload = {"reps": REPS, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "machine": platform.machine(), "cpu": ll.env_report().get("cpu", ""), "rows": rows}
    (out / "latency.json").write_text(json.dumps(payload, indent=2) + "\n")
    print("wrote", out / "latency.json")


if __name__ == "__main__":
    main()
