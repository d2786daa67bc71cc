"""Benchmark: forward latency of notebook 10's two models in every precision variant, and one
linear layer taken apart.

Models (random weights: latency does not depend on their values): the digits CNN at batch 1 and
256, the tiny character LM at batch 1 and 8 (128 characters each). Variants: fp32, fp16, bf16,
torch.ao int8 dynamic (fbgemm), int8 static (CNN only), and torchao int8 dynamic / int8
weight-only / int4 weight-only where they run on this CPU (a failure records its error).

Method: threads pinned to THREADS (2); each variant gets WARMUP untimed calls, then the timed
calls are spread over ROUNDS rounds that visit the variants in turn (so a load change on a
shared machine hits every variant alike). Per variant: p10/p50/p90/p99 over all calls, a second
clock (torch.utils.benchmark.Timer median), and its speed against fp32 as the median (min-max)
over rounds of p50(fp32) / p50(variant), and as p10(fp32) / p10(variant) over all calls (on a
shared machine the p10 is the cost of an undisturbed call), all taken in this run. Then the LM's fc1 layer at
batch 8 x 128 rows: fp32, fbgemm's fused dynamic int8 kernel, and the same int8 layer built
from separate ops (quantize activations, _int_mm, dequantize), each timed on its own.
Writes $BENCH_OUT/latency.json (default build/bench). Run: make bench, or
  OMP_NUM_THREADS=2 .venv/bin/python bench/latency.py
"""

import os

THREADS = 2
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, str(THREADS))  # before torch starts its thread pools

import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import lecturelib as ll  # noqa: E402
from lecturelib import measure as M  # noqa: E402

REPS = int(os.environ.get("BENCH_REPS", "200"))  # timed calls per variant and batch (issue: >= 200)
ROUNDS = 5
WARMUP = 20


def variants(model, static=None):
    """name -> (model, error); the model is None where the variant does not run here."""
    out = {"fp32": (model.eval(), ""), "fp16": (M.cast_variant(model, torch.float16), ""),
           "bf16": (M.cast_variant(model, torch.bfloat16), ""),
           "int8 dynamic (torch.ao)": (M.dynamic_int8(model), "")}
    if static is not None:
        out["int8 static (torch.ao)"] = (static, "")
    for cfg in M.TORCHAO_CONFIGS:
        out[f"torchao {cfg}"] = M.torchao_variant(model, cfg)
    return out


def cast(name, x):
    if x.is_floating_point() and name in ("fp16", "bf16"):
        return x.to(torch.float16 if name == "fp16" else torch.bfloat16)
    return x


def run(model_name, model, inputs, static=None):
    rows = []
    vs = variants(model, static)
    for batch, x in inputs.items():
        fns = {v: (lambda m=m, xx=cast(v, x): m(xx)) for v, (m, _) in vs.items() if m is not None}
        times = {v: [] for v in fns}
        p50s = {v: [] for v in fns}
        for r in range(ROUNDS):
            for v, fn in fns.items():
                s = M.measure_latency(fn, reps=REPS // ROUNDS, warmup=WARMUP if r == 0 else 2, threads=THREADS)
                times[v].append(s.times_ms)
                p50s[v].append(s.p50)
        for v, (m, err) in vs.items():
            row = {"model": model_name, "variant": v, "batch": batch}
            if m is None:
                rows.append(row | {"error": err})
                print(f"{model_name:4s} b={batch:<4d} {v:45s} does not run: {err}")
                continue
            t = np.concatenate(times[v])
            speed = np.array(p50s["fp32"]) / np.array(p50s[v])
            row |= {f"p{q}_ms": float(np.percentile(t, q)) for q in (10, 50, 90, 99)}
            row |= {"timer_median_ms": M.timer_median_ms(fns[v], min_run_time=0.2, threads=THREADS),
                    "calls": int(t.size), "speed_vs_fp32": float(np.median(speed)),
                    "speed_vs_fp32_min": float(speed.min()), "speed_vs_fp32_max": float(speed.max()),
                    "speed_vs_fp32_p10": float(np.percentile(np.concatenate(times["fp32"]), 10) / row["p10_ms"])}
            rows.append(row)
            print(f"{model_name:4s} b={batch:<4d} {v:45s} p50 {row['p50_ms']:8.3f} ms  p90 {row['p90_ms']:8.3f}  "
                  f"Timer {row['timer_median_ms']:8.3f}  fp32/this {row['speed_vs_fp32']:5.2f}x "
                  f"({row['speed_vs_fp32_min']:.2f}-{row['speed_vs_fp32_max']:.2f}), "
                  f"at p10 {row['speed_vs_fp32_p10']:.2f}x")
    return rows


def main():
    t_start = time.perf_counter()
    ll.seed_everything(0)
    torch.set_num_threads(THREADS)
    load_before = os.getloadavg()
    print(f"CPU: {ll.env_report()['cpu_model']}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"{REPS} timed calls per variant in {ROUNDS} rounds after {WARMUP} warm-up calls; load {load_before}")
    cnn = M.DigitsCNN().eval()
    x256 = torch.rand(256, 64)
    rows = run("cnn", cnn, {1: x256[:1], 256: x256}, static=M.static_int8(cnn, x256))
    lm = M.TinyLM(M.LMConfig()).eval()
    t8 = torch.randint(0, 128, (8, 128))
    rows += run("lm", lm, {1: t8[:1], 8: t8})

    fc1 = lm.blocks[0].fc1
    x = torch.randn(8 * 128, fc1.in_features)
    parts = M.int8_linear_parts(fc1, x, reps=REPS, warmup=WARMUP, threads=THREADS)
    layer = {k: {"p50_ms": s.p50, "p90_ms": s.p90} for k, s in parts.samples.items()}
    print(f"LM fc1 ({fc1.in_features}->{fc1.out_features}) on {x.shape[0]} rows; int8 chain max |error| "
          f"{parts.max_abs_error:.4f}")
    for k, v in layer.items():
        print(f"  {k:24s} p50 {v['p50_ms']:7.3f} ms  p90 {v['p90_ms']:7.3f} ms")
    wall = time.perf_counter() - t_start
    report = {"cpu": ll.env_report()["cpu_model"], "platform": platform.platform(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "reps": REPS, "rounds": ROUNDS, "warmup": WARMUP,
              "cpu_flags": M.cpu_flags(), "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "wall_s": wall, "rows": rows, "lm_fc1_parts": layer,
              "lm_fc1_chain_max_abs_error": parts.max_abs_error}
    out = Path(os.environ.get("BENCH_OUT", "build/bench"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "latency.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
