# %% [markdown]
# # 10 · Measure one level deeper: size, speed and accuracy of quantized models; GPTQ vs round-to-nearest
#
# The case study of this notebook is a student benchmarking report (seed document 003): it quantized
# detection models to fp16/int8 and a 135M-parameter language model to int8/int4/int2 with GPTQ, then
# admitted in its own conclusion that the measurements were *superficial*: one run, no warm-up,
# numbers it could not explain. Here we redo that study on two models small enough to run on a laptop
# CPU, following J. Ousterhout's *Always Measure One Level Deeper* (CACM 2018):
#
# 1. **questions first**, then the measurements that answer them;
# 2. **size** as bytes on disk *and* in memory, with every byte accounted for;
# 3. **latency** as a distribution (warm-up, ≥ 200 repetitions, pinned threads, batch 1 and a large
#    batch), never a single number;
# 4. every key result measured **two independent ways** that must agree;
# 5. **one level deeper**: the profiler splits a forward pass into quantize / int GEMM / dequantize /
#    float ops, and that explains the surprises;
# 6. **GPTQ** (Frantar et al., ICLR 2023) against round-to-nearest (RTN) at 8/4/3/2 bits.
#
# Every number below is computed when you run the notebook. The CPU this runs on may be shared with
# other jobs: latencies then come out inflated and noisier, which is one more reason to look at
# distributions. Exercises are marked **Exercise**; the cell after each one checks your answer.

# %% tags=["parameters"]
FAST = False  # fast mode: smaller budgets, same story (the env var WORKBOOK_FAST also switches it on)
SEED = 0
RESULTS_DIR = "../build/results"
CHECKPOINT_DIR = "../build/checkpoints"
LM_STEPS = 500  # Adam steps of the tiny stdlib language model
CORPUS_CHARS = 1500000  # characters of stdlib source read (train + held-out)
REPS = 200  # timed repetitions per latency measurement (after the warm-up)
WARMUP = 20  # untimed calls before timing
GROUP_SIZE = 64  # weight-only RTN/GPTQ: input columns per (scale, zero point)
HELDOUT_WINDOWS = 200  # held-out windows of 128 characters for perplexity

# %%
import copy
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import lecturelib as ll
from lecturelib import gptq, measure

FAST = ll.resolve_fast(FAST)
if FAST:
    LM_STEPS, CORPUS_CHARS, REPS, WARMUP, HELDOUT_WINDOWS = 60, 400000, 30, 3, 24
ll.seed_everything(SEED)
THREADS = ll.set_threads()
results = {"fast": FAST}
print(f"FAST={FAST}  LM_STEPS={LM_STEPS}  REPS={REPS}  threads={THREADS}  torch {torch.__version__}")

# %% [markdown]
# ## 1. The questions, before any measurement
#
# A benchmark answers questions; without them it only produces numbers. Ours:
#
# | # | question | measured by (way 1) | cross-check (way 2) |
# |---|---|---|---|
# | Q1 | How many bytes does each variant need on disk and in memory, and where do they go? | `len(torch.save(...))` | sum of tensor bytes in memory, plus a byte-by-byte account of the file |
# | Q2 | How long does one forward pass take, at batch 1 and at a large batch, and how much does it vary? | per-call wall clock (`perf_counter_ns`), ≥ 200 calls after a warm-up | `torch.utils.benchmark.Timer` (blocks of calls), and the profiler's total |
# | Q3 | Why is a variant faster or slower? | the profiler's per-op breakdown | CPU feature flags, the kernels that actually ran |
# | Q4 | How much accuracy does each variant lose? | test accuracy (CNN); held-out perplexity (LM) | next-token accuracy (LM) |
# | Q5 | Does GPTQ beat round-to-nearest at the same bits? | layer output MSE | held-out perplexity of the whole model |
#
# ## 2. Reading the seed report with a calculator
#
# The report gives enough numbers to test some of its own claims. It says "doubling the number of
# bits roughly doubles the memory requirements" for the 2/4/8-bit language model (87.57, 114.53 and
# 168.44 MB). Fit memory = a + b · bits:

# %%
seed_bits = np.array([2, 4, 8])
seed_mb = np.array([87.57, 114.53, 168.44])
b_per_bit, a_fixed = np.polyfit(seed_bits, seed_mb, 1)
resid = seed_mb - (a_fixed + b_per_bit * seed_bits)
ratio_8_4 = seed_mb[2] / seed_mb[1]
print(f"memory ~ {a_fixed:.2f} MB + {b_per_bit:.3f} MB/bit * bits   (max residual {abs(resid).max():.3f} MB)")
print(f"8-bit / 4-bit memory = {ratio_8_4:.2f}, not 2;  weights quantized ~ {b_per_bit * 1e6 * 8 / 1e6:.0f} M")
tok_s = [416476 / 292.74, 416476 / 294.39]
print(f"tokens/s from its own totals: {tok_s[0]:.1f} and {tok_s[1]:.1f}  (spread {100 * (tok_s[0] / tok_s[1] - 1):.2f} %)")
print(f"detection model: fp32/int8 size = {23.72 / 7.21:.2f} (4 expected for int8 weights alone), fp32/fp16 = {23.72 / 12.17:.2f}")
assert abs(resid).max() < 0.05 and ratio_8_4 < 1.5
results["seed_fixed_mb"] = round(float(a_fixed), 2)

# %% [markdown]
# What the calculator says about the report:
#
# * Memory is **affine**, not proportional, in the bit width: about 13.5 MB per bit for ~108 M
#   quantized weights, plus a **fixed ~61 MB** that does not shrink at all. SmolLM-135M has a
#   49152 × 576 ≈ 28 M-parameter embedding; kept in fp16 it is ~57 MB: the embeddings (and norms)
#   are left unquantized. Going from 4 to 8 bits multiplies the footprint by 1.47, not 2.
# * The three "tokens per second" values differ by 0.6 %. With **one run** per configuration and no
#   spread, that difference cannot be told apart from noise; and the time included tokenization and
#   Python overhead, not just the model.
# * Its accuracy metric compared the model's next *token* with the last *word* of a LAMBADA passage
#   (5 % top-1 for a model that does much better on that task): a metric that measured the
#   tokenizer as much as the model. The int8 detection model is 3.3× smaller than fp32, not 4×:
#   something besides weights is stored, and the report never looked.
#
# We now build our own two models and measure them properly.
#
# ## 3. The two models
#
# **A CNN on scikit-learn digits** (8×8 images; two 3×3 convolutions, max-pool, two linear layers) and
# **a tiny decoder-only transformer language model** (GPT-2 layout: 2 blocks, width 128, 4 heads,
# context 128 characters), trained on the source code of Python's own standard library, found with
# `sysconfig.get_paths()["stdlib"]`. Every 5th file (in path order) is held out, so the test text
# comes from files the model never saw.

# %%
digits = ll.load_digits_split(seed=SEED)
cnn = measure.DigitsCNN()
ll.train_classifier(cnn, digits.X_train, digits.y_train, ll.TrainConfig(epochs=8 if FAST else 20, lr=3e-3, seed=SEED))
cnn_acc = ll.accuracy(cnn, digits.X_test, digits.y_test)

corpus = measure.load_corpus(CORPUS_CHARS, heldout_every=5)
lm_cfg = measure.LMConfig(steps=LM_STEPS, batch=16, seed=SEED)
torch.manual_seed(SEED)
lm = measure.TinyLM(lm_cfg)
ckpt = Path(CHECKPOINT_DIR) / f"10_tinylm_{LM_STEPS}_{CORPUS_CHARS}_{SEED}.pt"
if ckpt.exists():
    lm.load_state_dict(torch.load(ckpt))
    lm.eval()
else:
    losses = measure.train_lm(lm, corpus.train, lm_cfg)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save(lm.state_dict(), ckpt)
x_ho, y_ho = measure.lm_windows(corpus.heldout, lm_cfg.ctx, HELDOUT_WINDOWS)
lm_fp32 = measure.evaluate_lm(lm, x_ho, y_ho)
print(f"CNN test accuracy {cnn_acc:.3f}")
print(f"corpus: {len(corpus.train):,} train chars ({corpus.train_files} files), "
      f"{len(corpus.heldout):,} held-out chars ({corpus.heldout_files} files)")
print(f"LM held-out: perplexity {lm_fp32.perplexity:.3f}, next-char accuracy {lm_fp32.accuracy:.3f} "
      f"on {lm_fp32.tokens:,} positions (uniform guess: perplexity 128)")
assert cnn_acc > 0.9 and lm_fp32.perplexity < 40  # uniform guessing over 128 characters: 128

# %% [markdown]
# ## 4. The variants, and the ones that do not run
#
# | variant | what is stored | what runs |
# |---|---|---|
# | fp32 | float32 weights | float32 kernels |
# | fp16, bf16 | 16-bit floats | whatever the CPU kernels do with 16-bit floats (see §7) |
# | int8 dynamic (torch.ao / fbgemm) | int8 `Linear` weights, per-tensor scale | each call: find the activation range, quantize, int8 GEMM, dequantize |
# | int8 static (torch.ao / fbgemm), CNN only | int8 weights *and* activation scales from calibration | int8 end to end, from `QuantStub` to `DeQuantStub` |
# | torchao int8 dynamic / int8 weight-only / int4 weight-only | torchao tensor subclasses | whatever torchao dispatches to on this CPU |
#
# torchao's configs are applied wherever they run; a failure is caught and shown, never raised.

# %%
with measure.quiet():
    cnn_static = measure.static_int8(cnn, digits.X_train[:512])


def build_variants(model, static=None):
    out, errors = {"fp32": copy.deepcopy(model).eval()}, {}
    out["fp16"] = measure.cast_variant(model, torch.float16)
    out["bf16"] = measure.cast_variant(model, torch.bfloat16)
    out["int8 dynamic"] = measure.dynamic_int8(model)
    if static is not None:
        out["int8 static"] = static
    for cfg, short in zip(measure.TORCHAO_CONFIGS, ["torchao int8 dynamic", "torchao int8 weight-only", "torchao int4 weight-only"]):
        m, err = measure.torchao_variant(model, cfg)
        if m is None:
            errors[short] = err
        else:
            out[short] = m
    return out, errors


def cast_input(name, x):
    if x.is_floating_point() and name in ("fp16", "bf16"):
        return x.to(torch.float16 if name == "fp16" else torch.bfloat16)
    return x


cnn_vars, cnn_errs = build_variants(cnn, cnn_static)
lm_vars, lm_errs = build_variants(lm)
ll.show_markdown("Variants that **failed** on this machine (caught, not raised):\n\n" + ll.markdown_table(
    [{"model": mdl, "variant": k, "error": v} for mdl, errs in (("CNN", cnn_errs), ("LM", lm_errs)) for k, v in errs.items()]
    or [{"model": "-", "variant": "none", "error": "-"}]))
cnn_accs = {}
for name, m in cnn_vars.items():
    with torch.no_grad(), measure.quiet():
        cnn_accs[name] = ll.accuracy(m(cast_input(name, digits.X_test)).float(), None, digits.y_test)
print({k: round(v, 4) for k, v in cnn_accs.items()})

# %% [markdown]
# ## 5. Q1 · Size: bytes on disk and bytes in memory
#
# `torch.save` writes a zip archive: one entry per tensor storage (the numbers), `data.pkl` (names,
# shapes, dtypes, and per-tensor scales of quantized tensors) and the zip container itself (headers,
# a central directory, 64-byte alignment padding). `measure.size_account` splits the file into these
# three parts (they add up to the file length exactly), and `measure.memory_bytes` counts the bytes
# of the numbers a model keeps in memory: two independent ways to the same payload.

# %%
def size_rows(variants):
    rows = []
    for name, m in variants.items():
        data = measure.serialize(m.state_dict())
        acc = measure.size_account(data)
        rows.append({"variant": name, "file bytes": acc.total, "storages": acc.storage_bytes,
                     "pickle": acc.pickle_bytes, "container": acc.container_bytes,
                     "in memory": measure.memory_bytes(m)})
    return rows


with measure.quiet():
    cnn_size = size_rows(cnn_vars)
    lm_size = size_rows(lm_vars)
ll.show_markdown("**CNN**\n\n" + ll.markdown_table(cnn_size) + "\n\n**LM**\n\n" + ll.markdown_table(lm_size))
for r in cnn_size + lm_size:
    assert r["storages"] + r["pickle"] + r["container"] == r["file bytes"]
    if r["variant"] in ("fp32", "fp16", "bf16"):
        assert r["storages"] == r["in memory"]  # way 1 == way 2 for plain float tensors
n_cnn_params = sum(p.numel() for p in cnn.parameters())
print(f"CNN: {n_cnn_params:,} parameters -> {4 * n_cnn_params:,} fp32 bytes; "
      f"file / payload = {cnn_size[0]['file bytes'] / cnn_size[0]['storages']:.2f}")

# %% [markdown]
# Reading the table:
#
# * For float variants the storages are *exactly* the in-memory bytes (4 or 2 per parameter). The
#   rest of the file is metadata: for a model this small, the pickle and the zip container are a
#   large fraction of the file (the file/payload ratio above). The report's "int8 is 3.3× smaller,
#   not 4×" has the same cause at a larger scale, plus the layers that stay float.
# * **int8 dynamic** only quantizes `nn.Linear`: the CNN's convolutions stay fp32, so its CNN
#   file shrinks much less than 4×. The LM's embeddings, LayerNorms and biases also stay fp32.
# * **int8 static** quantizes the convolutions too; per-channel weight scales are stored as float64
#   and zero points as int64 (16 bytes per output channel), counted in `memory_bytes`.
#
# ### Weight-only low-bit storage
#
# For the LM's weight-only RTN/GPTQ variants we write what a deployed checkpoint would hold: the
# eight block weight matrices as bit-packed codes, plus one fp16 scale and one 8-bit zero point per
# row and group of `GROUP_SIZE` columns; embeddings, norms, biases and the output head stay fp32.
#
# **Exercise 1.** Write `group_quantized_bytes(rows, cols, num_bits, group_size)`: the bytes of one
# (rows, cols) weight matrix stored as densely packed `num_bits`-bit codes (rounded up to whole bytes)
# plus a 2-byte scale and a 1-byte zero point per row and group.

# %% nbgrader={"solution": true, "grade_id": "ex1_group_bytes"}
def group_quantized_bytes(rows, cols, num_bits, group_size):
    ### BEGIN SOLUTION
    groups = rows * (cols // group_size)
    return (rows * cols * num_bits + 7) // 8 + groups * (2 + 1)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex1_group_bytes_check", "points": 2}
_probe = torch.nn.Sequential(torch.nn.Linear(128, 48))
for _bits in (2, 3, 4, 8):
    _state = measure.weight_only_state(_probe, gptq.GPTQConfig(num_bits=_bits, group_size=32), ["0"])
    _want = measure.memory_bytes({k: v for k, v in _state.items() if k != "0.bias"})
    assert group_quantized_bytes(48, 128, _bits, 32) == _want, (_bits, _want)
### BEGIN HIDDEN TESTS
assert group_quantized_bytes(3, 8, 3, 8) == 9 + 9
### END HIDDEN TESTS

# %% [markdown]
# ## 6. Q2 · Latency, the naive way and the careful way
#
# The seed report timed one run per configuration, with no warm-up. The first call of a PyTorch
# module pays for lazy initialisation (allocations, weight packing, kernel selection, cold caches).
# Below, the naive number (one cold call on a fresh copy) is set against the careful one: `WARMUP`
# untimed calls, then `REPS` timed calls one by one, threads pinned to 2.

# %%
x_cnn = {1: digits.X_test[:1], 256: digits.X_test[:256]}
x_lm = {1: x_ho[:1], 16: x_ho[:16]} if not FAST else {1: x_ho[:1, :64], 16: x_ho[:16, :64]}
naive_rows = []
for name in ("fp32", "int8 dynamic"):
    fresh = measure.dynamic_int8(lm) if name == "int8 dynamic" else copy.deepcopy(lm).eval()
    naive = measure.naive_latency(lambda: fresh(x_lm[1]))
    careful = measure.measure_latency(lambda: fresh(x_lm[1]), reps=REPS, warmup=WARMUP, threads=THREADS)
    naive_rows.append({"LM variant, batch 1": name, "naive: 1 cold call (ms)": round(naive, 3),
                       "careful p50 (ms)": round(careful.p50, 3), "careful p10-p90 (ms)":
                       f"{careful.percentile(10):.3f} - {careful.p90:.3f}"})
ll.show_markdown(ll.markdown_table(naive_rows))

# %% [markdown]
# The cold call is typically several times slower than the median, and it carries no information
# about spread. Now the careful measurement for every variant, both models, batch 1 and a large
# batch. (In fast mode `REPS` is reduced; the full run uses ≥ 200.)

# %%
def time_variants(variants, inputs):
    samples = {}
    for name, m in variants.items():
        for batch, x in inputs.items():
            xx = cast_input(name, x)
            samples[(name, batch)] = measure.measure_latency(lambda: m(xx), reps=REPS, warmup=WARMUP, threads=THREADS)
    return samples


cnn_lat = time_variants(cnn_vars, x_cnn)
lm_lat = time_variants(lm_vars, x_lm)


def violin(ax, samples, batch, title):
    names = [n for (n, b) in samples if b == batch]
    data = [samples[(n, batch)].times_ms for n in names]
    ax.violinplot(data, showmedians=True, widths=0.8)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, max(np.percentile(d, 99) for d in data) * 1.15)
    ax.set_ylabel("ms per forward pass")
    ax.set_title(title, fontsize=10)


fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
violin(axes[0], cnn_lat, 1, "CNN, batch 1")
violin(axes[1], cnn_lat, 256, "CNN, batch 256")
violin(axes[2], lm_lat, 1, f"LM, batch 1 x {x_lm[1].shape[1]} chars")
violin(axes[3], lm_lat, 16, f"LM, batch 16 x {x_lm[16].shape[1]} chars")
fig.suptitle(f"Latency distributions ({REPS} calls each after {WARMUP} warm-up calls, {THREADS} threads; "
             "y axis from 0, clipped at the 99th percentile)", fontsize=10)
fig.tight_layout()
plt.show()

# %% [markdown]
# **Exercise 3** (numbered by the order of the questions; Exercise 2 is in the GPTQ section).
# Reports quote p50 and p90. Write `percentile(times, q)` for q in [0, 100] the way NumPy does by
# default: sort the sample, take the (fractional) position q/100 · (n − 1) and interpolate linearly
# between the two neighbouring sorted values. Do not call `np.percentile`.

# %% nbgrader={"solution": true, "grade_id": "ex3_percentile"}
def percentile(times, q):
    ### BEGIN SOLUTION
    s = sorted(float(t) for t in times)
    pos = q / 100 * (len(s) - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex3_percentile_check", "points": 2}
_s = cnn_lat[("fp32", 1)]
for _q in (0, 10, 50, 90, 99, 100):
    assert abs(percentile(_s.times_ms, _q) - _s.percentile(_q)) < 1e-9, _q
assert percentile([3.0, 1.0, 2.0, 10.0], 50) == 2.5
### BEGIN HIDDEN TESTS
assert abs(percentile([1.0, 2.0], 25) - 1.25) < 1e-12
### END HIDDEN TESTS

# %% [markdown]
# ### Two clocks must agree
#
# Way 2 is `torch.utils.benchmark.Timer.blocked_autorange`: it times *blocks* of calls and picks the
# block size itself, so per-call timer overhead and our loop play no role. If the two medians
# disagree by much, one of the measurements is wrong (or the machine changed under us).

# %%
agree_rows = []
for mdl, variants, samples, inputs in (("CNN", cnn_vars, cnn_lat, x_cnn), ("LM", lm_vars, lm_lat, x_lm)):
    for name in ("fp32", "fp16", "int8 dynamic"):
        b = max(inputs)
        xx = cast_input(name, inputs[b])
        m = variants[name]
        t2 = measure.timer_median_ms(lambda: m(xx), min_run_time=0.1 if FAST else 0.3, threads=THREADS)
        p50 = samples[(name, b)].p50
        agree_rows.append({"model": mdl, "variant": name, "batch": b, "perf_counter p50 (ms)": round(p50, 3),
                           "Timer median (ms)": round(t2, 3), "ratio": round(p50 / t2, 2)})
ll.show_markdown(ll.markdown_table(agree_rows))
assert all(np.isfinite(r["ratio"]) and r["ratio"] > 0 for r in agree_rows)  # not asserted tightly: the CPU may be shared

# %% [markdown]
# On an idle machine the ratios are close to 1. Under load from other processes they spread: the
# two clocks then sample different moments of a changing machine, which is itself worth knowing
# before believing a 0.6 % difference like the seed report's.
#
# ## 7. Q3 · One level deeper: where does the time go?
#
# `measure.profile_breakdown` runs the forward pass under `torch.profiler` and adds each op's *self*
# CPU time into: quantize activations, int GEMM, dequantize, float GEMM/conv, dtype casts, other.

# %%
def breakdowns(variants, x, names):
    return {n: measure.profile_breakdown(lambda: variants[n](cast_input(n, x)), reps=10 if FAST else 30, threads=THREADS)
            for n in names if n in variants}


prof_cnn = breakdowns(cnn_vars, x_cnn[256], ["fp32", "fp16", "bf16", "int8 dynamic", "int8 static", "torchao int8 dynamic"])
prof_lm = breakdowns(lm_vars, x_lm[16], ["fp32", "fp16", "bf16", "int8 dynamic", "torchao int8 dynamic", "torchao int8 weight-only"])

fig, axes = plt.subplots(1, 2, figsize=(14, 4.2))
for ax, prof, title in ((axes[0], prof_cnn, "CNN, batch 256"), (axes[1], prof_lm, f"LM, batch 16 x {x_lm[16].shape[1]}")):
    names = list(prof)
    bottom = np.zeros(len(names))
    for cat in measure.CATEGORIES:
        vals = np.array([prof[n].ms[cat] for n in names])
        ax.bar(names, vals, bottom=bottom, label=cat)
        bottom += vals
    ax.set_ylim(0, bottom.max() * 1.15)
    ax.set_ylabel("profiler self CPU time per call (ms)")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", rotation=30, labelsize=8)
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()
top_rows = [{"model": mdl, "variant": n, "profiler total (ms)": round(b.total_ms, 3),
             "top ops (ms per call)": ", ".join(f"{k} {v:.3f}" for k, v in b.top_ops[:3])}
            for mdl, prof in (("CNN", prof_cnn), ("LM", prof_lm)) for n, b in prof.items()]
ll.show_markdown(ll.markdown_table(top_rows))
print("CPU flags relevant to int8/bf16/fp16 GEMMs:", measure.cpu_flags() or "unknown (no /proc/cpuinfo)")
print("quantized engine:", torch.backends.quantized.engine)

# %% [markdown]
# How to read the bars and the table (your numbers are live; check that they tell this story):
#
# * **fbgemm int8** ops appear as `quantized::linear_dynamic` / `quantized::conv2d`: one fused
#   kernel that quantizes the activations, runs an int8 × int8 → int32 GEMM with AVX2/AVX-512 VNNI
#   dot products, and requantizes or dequantizes, all inside the kernel. The int8 static CNN also
#   pays a `quantize_per_tensor` at the `QuantStub` and a `dequantize` at the end.
# * **fp16 on a CPU**: unless the kernels for this CPU use native fp16 arithmetic, PyTorch converts
#   to fp32 inside the op (or uses a slow generic loop), so fp16 is *not* faster and often much slower
#   than fp32; bf16 has better CPU support (AVX-512 BF16 / oneDNN) but for layers this small the
#   conversions and framework overhead dominate. Look at which aten ops grow for the fp16 bars.
# * **torchao int8** on CPU: its tensor subclass dispatches through Python-level code; where no CPU
#   int8 kernel is wired up it dequantizes the weight and runs a float matmul, so the time goes up,
#   not down. Its weight-only int4 config needs a separate kernel package and fails here (§4).
# * At batch 1 every model here is dominated by per-op overhead (microseconds per op), not by
#   arithmetic: quantization cannot speed up what is not compute.
#
# Way 2 for latency: the profiler's total self time against the wall clock of *the same* profiled
# calls (so both see the same machine at the same moment). The profiler adds a few microseconds per
# op, so its total can exceed the wall time for op-heavy models; work on other threads can make it
# smaller. The column "p50 earlier" is the violin measurement: if it differs a lot from the profiled
# wall time, the machine's load changed between the two.

# %%
prof_rows = []
for mdl, prof, samples, b in (("CNN", prof_cnn, cnn_lat, 256), ("LM", prof_lm, lm_lat, 16)):
    for n, bd in prof.items():
        prof_rows.append({"model": mdl, "variant": n, "p50 earlier (ms)": round(samples[(n, b)].p50, 3),
                          "profiled wall (ms)": round(bd.wall_ms, 3), "profiler total (ms)": round(bd.total_ms, 3),
                          "total / wall": round(bd.total_ms / bd.wall_ms, 2)})
ll.show_markdown(ll.markdown_table(prof_rows))
assert all(r["profiler total (ms)"] > 0 for r in prof_rows)

# ## 8. Q5 · GPTQ against round-to-nearest
#
# Round-to-nearest (RTN) rounds every weight on its grid independently. GPTQ quantizes a layer's
# weight matrix **W** (out × in) one input column at a time and, after rounding column *i*, changes
# the columns not yet quantized so that the layer *output* on calibration inputs X changes as
# little as possible. With the layer Hessian
#
# H = 2 XᵀX / n  (in × in, from n calibration rows of the layer's input),
#
# the Optimal-Brain-Surgeon update after fixing column i to its rounded value q is
#
# err = (w_i − q) / [H⁻¹]_ii,    W[:, j] −= err · [H⁻¹]_ij  for every later column j.
#
# GPTQ's tricks: **dampening** (add λ = 1 % of mean(diag H) to the diagonal so H is safely
# invertible), the **Cholesky form** of H⁻¹ (the rows [H⁻¹]_i,i: needed in turn are exactly the rows
# of the upper Cholesky factor U of H⁻¹, with [H⁻¹]_ii replaced by U_ii: computed once, stable),
# **lazy blocks** (updates inside a block of 128 columns are immediate, the rest of the matrix is
# updated once per block with one matrix product), optional **act-order** (columns with large
# H_ii first) and **groups** (a new scale/zero point every `GROUP_SIZE` columns, chosen from the
# already-corrected weights). The grid itself is `quantizers.choose_qparams`, the same as RTN's.
#
# **Exercise 2.** Implement one column step: given the not-yet-quantized columns `W_rest` (out × k),
# the column `w` and its rounded value `q` (both of length out) and `u_row` = U[i, i:] (length k+1,
# first entry U_ii), return the updated `W_rest`.

# %% nbgrader={"solution": true, "grade_id": "ex2_column_update"}
def my_column_update(W_rest, w, q, u_row):
    ### BEGIN SOLUTION
    err = (w - q) / u_row[0]
    return W_rest - err[:, None] * u_row[None, 1:]
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex2_column_update_check", "points": 2}
_g = torch.Generator().manual_seed(1)
_X = torch.randn(200, 6, generator=_g, dtype=torch.float64) @ torch.randn(6, 6, generator=_g, dtype=torch.float64)
_U = torch.linalg.cholesky(torch.linalg.inv(gptq.hessian(_X) + 0.01 * torch.eye(6, dtype=torch.float64)), upper=True)
_W = torch.randn(4, 6, generator=_g, dtype=torch.float64)
_q = torch.round(_W[:, 0])
_want, _ = gptq.column_update(_W[:, 1:], _W[:, 0], _q, _U[0])
assert torch.allclose(my_column_update(_W[:, 1:], _W[:, 0], _q, _U[0]), _want)
### BEGIN HIDDEN TESTS
_want2, _ = gptq.column_update(_W[:, 3:], _W[:, 2], _q, _U[2, 2:])
assert torch.allclose(my_column_update(_W[:, 3:], _W[:, 2], _q, _U[2, 2:]), _want2)
### END HIDDEN TESTS

# %% [markdown]
# Now the whole LM: each of the 8 block weight matrices is quantized in turn, with its calibration
# inputs captured from 64 training windows *after* the layers before it were quantized (sequential
# GPTQ). For every layer both RTN and GPTQ are computed on the same inputs, so the layer output
# MSEs compare like with like.

# %%
g = torch.Generator().manual_seed(SEED)
x_tr, _ = measure.lm_windows(corpus.train, lm_cfg.ctx)
calib = list(x_tr[torch.randperm(len(x_tr), generator=g)[: 32 if FAST else 64]].split(16))
BITS = (8, 4, 3, 2)
wo_models, reports, lm_evals = {}, {}, {}
for bits in BITS:
    cfg = gptq.GPTQConfig(num_bits=bits, group_size=GROUP_SIZE)
    for method in ("rtn", "gptq"):
        m = copy.deepcopy(lm)
        reports[(method, bits)] = gptq.quantize_model(m, calib, cfg, method, names=lm.block_linears())
        wo_models[(method, bits)] = m
        lm_evals[(method, bits)] = measure.evaluate_lm(m, x_ho, y_ho)

layer_names = lm.block_linears()
fig, ax = plt.subplots(figsize=(10, 3.8))
width = 0.2
for k, bits in enumerate(BITS):
    rep = reports[("gptq", bits)]
    ratios = [lr.mse_rtn / lr.mse_gptq for lr in rep.layers]
    ax.bar(np.arange(len(layer_names)) + (k - 1.5) * width, ratios, width, label=f"{bits} bits")
ax.axhline(1, color="k", lw=0.8)
ax.set_xticks(range(len(layer_names)), [n.replace("blocks.", "b") for n in layer_names], fontsize=8)
ax.set_ylim(0, None)
ax.set_ylabel("RTN MSE / GPTQ MSE (>1: GPTQ better)")
ax.set_title(f"Layer output MSE ratio, group size {GROUP_SIZE}, inputs from the GPTQ-quantized prefix")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
mse_ratio = {}
for bits in BITS:
    r = np.array([lr.mse_rtn / lr.mse_gptq for lr in reports[("gptq", bits)].layers])
    mse_ratio[str(bits)] = float(np.exp(np.log(r).mean()))
    assert (r > 1).all(), (bits, r)  # GPTQ beats RTN on every layer at every bit width
print("geometric-mean RTN/GPTQ layer MSE ratio:", {k: round(v, 2) for k, v in mse_ratio.items()})

# %% [markdown]
# ### Two ways for accuracy: perplexity and next-character accuracy
#
# Perplexity uses the full predicted distribution; next-character accuracy only its argmax. They are
# independent summaries of the same predictions, and should rank the variants alike.

# %%
ppl_rows = [{"variant": "fp32", "bits": 32, "perplexity": round(lm_fp32.perplexity, 4), "next-char acc": round(lm_fp32.accuracy, 4)}]
gap_closed = {}
for bits in BITS:
    r, gq = lm_evals[("rtn", bits)], lm_evals[("gptq", bits)]
    gap = r.perplexity - lm_fp32.perplexity
    gap_closed[bits] = (r.perplexity - gq.perplexity) / gap if gap > 1e-3 else None  # None: RTN lost nothing
    for meth, e in (("rtn", r), ("gptq", gq)):
        ppl_rows.append({"variant": f"{meth} w{bits} g{GROUP_SIZE}", "bits": bits, "perplexity": round(e.perplexity, 4),
                         "next-char acc": round(e.accuracy, 4)})
ll.show_markdown(ll.markdown_table(ppl_rows))
ll.show_markdown("Fraction of RTN's perplexity gap to fp32 closed by GPTQ: " + ", ".join(
    f"{b} bits: " + ("no gap" if gap_closed[b] is None else f"{gap_closed[b]:.2f}") for b in BITS))
worst = max(ppl_rows, key=lambda r: r["perplexity"])
if not FAST:  # the fast-mode LM is barely trained: quantization then hardly changes its predictions
    assert worst["next-char acc"] == min(r["next-char acc"] for r in ppl_rows)  # the two ways agree on the worst
ppls = [r["perplexity"] for r in ppl_rows]
accs = [r["next-char acc"] for r in ppl_rows]
rank_corr = np.corrcoef(np.argsort(np.argsort(ppls)), np.argsort(np.argsort(accs)))[0, 1]
print(f"Spearman rank correlation of perplexity and accuracy over the variants: {rank_corr:.2f} (negative: they agree)")
if not FAST:
    for bits in (4, 3):
        assert gap_closed[bits] is not None and gap_closed[bits] >= 0.5, (bits, gap_closed[bits])

# %% [markdown]
# At 8 bits the gap is tiny (both variants are within noise of fp32), at 4 and 3 bits GPTQ removes
# much of RTN's loss, and at 2 bits both break down but GPTQ far less. On this tiny model the
# numbers are smaller than on a 135M-parameter one, but the ordering is the one the GPTQ paper
# reports. These low-bit variants are stored packed (§5) but *run* as dequantized fp32 here: no CPU
# kernel for 3- or 2-bit weights is available, so their latency is the fp32 latency, which the table
# below says explicitly instead of inventing a speed-up.
#
# ## 9. Summary tables

# %%
def wo_size(bits):
    return len(measure.serialize(measure.weight_only_state(lm, gptq.GPTQConfig(num_bits=bits, group_size=GROUP_SIZE), lm.block_linears())))


size_of = {r["variant"]: r["file bytes"] for r in cnn_size}
results["cnn"] = [{"variant": n, "size_bytes": size_of[n], "latency_ms_p50": cnn_lat[(n, 1)].p50,
                   "latency_ms_p90": cnn_lat[(n, 1)].p90, "accuracy": cnn_accs[n]} for n in cnn_vars]
lm_bits = {"fp32": 32, "fp16": 16, "bf16": 16}
size_of = {r["variant"]: r["file bytes"] for r in lm_size}
lm_rows = []
for n, m in lm_vars.items():
    lm_rows.append({"variant": n, "bits": lm_bits.get(n, 8), "size_bytes": size_of[n],
                    "latency_ms_p50": lm_lat[(n, 1)].p50,
                    "perplexity": measure.evaluate_lm(m, x_ho, y_ho).perplexity})
for bits in BITS:
    nbytes = wo_size(bits)
    for meth in ("rtn", "gptq"):
        lm_rows.append({"variant": f"{meth} weight-only g{GROUP_SIZE}", "bits": bits, "size_bytes": nbytes,
                        "latency_ms_p50": lm_lat[("fp32", 1)].p50, "perplexity": lm_evals[(meth, bits)].perplexity})
results["lm"] = lm_rows
results["gptq_vs_rtn_layer_mse"] = mse_ratio
results["ppl"] = {"fp32": lm_fp32.perplexity, "rtn": {str(b): lm_evals[("rtn", b)].perplexity for b in BITS},
                  "gptq": {str(b): lm_evals[("gptq", b)].perplexity for b in BITS}}
results["gptq_gap_closed"] = {str(b): gap_closed[b] for b in BITS}
ll.show_markdown("**CNN** (latency at batch 1)\n\n" + ll.markdown_table(
    [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in results["cnn"]])
    + "\n\n**LM** (latency at batch 1; weight-only variants run as dequantized fp32)\n\n" + ll.markdown_table(
    [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in lm_rows]))

# %% [markdown]
# ## Takeaways
#
# * Ask the questions first; the seed report's own numbers already contradicted two of its claims
#   (memory is affine in the bit width, and a 0.6 % speed difference from one run means nothing).
# * Count bytes two ways: file storages == in-memory tensors; the rest is pickle and zip container,
#   and the layers that stay float (embeddings, convolutions under dynamic quantization).
# * Time distributions after a warm-up, with pinned threads, and check one clock against another.
# * Go one level deeper: the profiler shows *which kernel* ran. "int8" is only fast where a fused
#   int8 kernel (fbgemm) exists; fp16 and torchao's int8 on this CPU add casts or dequantization.
# * GPTQ's error feedback beats round-to-nearest on every layer, and most clearly at 3–4 bits.
#
# **Further exercises (ungraded).** (a) Set `GROUP_SIZE = 128` (one group per row for the 128-wide
# layers) and watch the gap between RTN and GPTQ grow. (b) Turn on `act_order` in `GPTQConfig`.
# (c) Re-run the latency section while another program loads the CPU and compare the violins.

# %%
ll.save_results(results, RESULTS_DIR, "10_measure_one_level_deeper")
