"""Benchmark: single-thread float32 GEMM against the bit-packed XNOR-popcount GEMM.

Prints, with every thread pool pinned to 1 thread:
  * fp32 time / binary time at M = N = 512, K = 4096 (the issue's reference shape);
  * the same ratio at the +-1 x +-1 layer shapes of notebook 06's binary MLP (test batch);
  * the packing cost of A (float +-1 -> bits; the weights B are packed once, offline);
  * packed bytes against float32 bytes.
Each ratio is measured in several rounds (fp32 and binary back to back in each round, best of
several repeats each) and reported as the median with the min-max spread over rounds.
Writes $BENCH_OUT/xnor_gemm.json (default build/bench). Run: make bench, or
  .venv/bin/python bench/xnor_gemm.py
"""

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy/torch/numba start their thread pools

import json  # noqa: E402
import platform  # noqa: E402
from pathlib import Path  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import lecturelib as ll  # noqa: E402
from lecturelib import binary, xnor_gemm  # noqa: E402

torch.set_num_threads(1)
numba.set_num_threads(1)


def numpy_fp32_s(m: int, n: int, k: int, rounds: int, repeats: int) -> float:
    """numpy (OpenBLAS) float32 A @ B: median over rounds of the best CPU time of ``repeats``."""
    rng = np.random.default_rng(0)
    A = rng.choice(np.array([-1.0, 1.0], np.float32), (m, k))
    B = rng.choice(np.array([-1.0, 1.0], np.float32), (k, n))
    return float(
        np.median([xnor_gemm.best_cpu_time(lambda: A @ B, repeats) for _ in range(rounds)])
    )


def main() -> None:
    out_dir = Path(os.environ.get("BENCH_OUT", "build/bench"))
    cpu = ll.env_report()["cpu_model"]
    compile_s = xnor_gemm.compile_kernel()
    width = xnor_gemm.kernel_vector_width()
    batch = len(ll.load_digits_split().X_test)
    model = binary.BinaryMLP(binary.DIGITS_SIZES, "XNOR-Net")
    shapes = [("reference", 512, 512, 4096)] + binary.binary_layer_shapes(model, batch)
    print(
        f"CPU: {cpu}; numba {numba.__version__}: kernel compiled in {compile_s:.2f} s, "
        f"{width}-bit vectors; torch threads: {torch.get_num_threads()}"
    )
    print(
        "times: CPU time of one thread, best of the repeats; speedup: median (min-max) of 7 rounds"
    )
    header = (
        "shape",
        "fp32 torch",
        "fp32 numpy",
        "binary",
        "speedup",
        "pack A",
        "fp32/packed bytes",
    )
    print("{:<24}{:>12}{:>12}{:>10}{:>22}{:>10}{:>19}".format(*header))
    rows = []
    for name, m, n, k in shapes:
        repeats = 5 if m * n * k >= 1 << 28 else 20
        t = xnor_gemm.time_gemm(
            m, n, k, rounds=7, repeats=repeats, with_numpy=(name == "reference")
        )
        np_s = numpy_fp32_s(m, n, k, rounds=7, repeats=repeats)
        row = t.as_dict() | {
            "name": name,
            "fp32_numpy_s": np_s,
            "speedup_vs_fastest_fp32": min(t.fp32_s, np_s) / t.binary_s,
            "memory_ratio": t.fp32_bytes / t.packed_bytes,
        }
        rows.append(row)
        cells = (
            f"{name} {m}x{n}x{k}",
            f"{t.fp32_s * 1e3:.3f} ms",
            f"{np_s * 1e3:.3f} ms",
            f"{t.binary_s * 1e3:.3f} ms",
            f"{t.speedup:.1f}x ({t.speedup_min:.1f}-{t.speedup_max:.1f})",
            f"{t.pack_s * 1e3:.3f} ms",
            f"{row['memory_ratio']:.1f}x",
        )
        print("{:<24}{:>12}{:>12}{:>10}{:>22}{:>10}{:>19}".format(*cells))
    ref = rows[0]
    slower = ref["numpy_s"] / ref["fp32_s"]
    print(
        f"pure NumPy XOR-popcount at 512x512x4096: {ref['numpy_s'] * 1e3:.1f} ms "
        f"({slower:.1f}x slower than fp32 BLAS)"
    )
    print(
        f"speedup at 512x512x4096 against the faster of torch and numpy fp32: "
        f"{ref['speedup_vs_fastest_fp32']:.1f}x"
    )
    report = {
        "cpu": cpu,
        "platform": platform.platform(),
        "numba": numba.__version__,
        "torch": torch.__version__,
        "kernel_vector_bits": width,
        "kernel_compile_s": compile_s,
        "load_average": os.getloadavg(),
        "shapes": rows,
        "gemm_speedup_512x512x4096": ref["speedup"],
        "gemm_speedup_layers": {
            f"{r['name']}_{r['m']}x{r['n']}x{r['k']}": r["speedup"] for r in rows[1:]
        },
        "packed_memory_ratio": ref["memory_ratio"],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "xnor_gemm.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
