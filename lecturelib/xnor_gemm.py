"""A bit-packed binary GEMM: XNOR (here XOR) plus popcount over uint64 words, compiled with numba.

For A (M, K) and B (K, N) with every entry in {-1, +1}, store one bit per entry (1 for +1, 0 for
-1), 64 entries to a uint64 word, and compute the matrix product with bit operations:

    (A @ B)[i, j] = sum_k A[i, k] B[k, j] = (#agreements) - (#disagreements)
                  = K - 2 * popcount(a_i XOR b_j)          (a_i: packed row i, b_j: packed column j)
                  = -K + 2 * popcount(a_i XNOR b_j)        (the lecture's form)

The two forms are the same identity, popcount(XNOR) = K - popcount(XOR) over the K real bits.
Padding: K is rounded up to a whole number of 64-bit words and the padding bits are 0 in both
operands. Padding bits agree, so the XOR form needs no correction as long as it uses the true K;
the XNOR form counts every padding bit as an agreement and must subtract them (``xnor_dot``).

The kernel works on row-packed A (M, ceil(K/64)) and column-packed B (ceil(K/64), N): B's words
for one k-word are contiguous over j, so the inner loop over j vectorises (8 columns per AVX-512
register, one VPOPCNTQ per register); 4 rows of A and 4 words of K are kept in registers. numba
(LLVM) compiles it the first time it is called (a few seconds); there is no on-disk cache.
The result is bit-exact against ``float32 A @ B`` on +-1 inputs for every shape, because float32
sums of +-1 are exact integers while |partial sum| < 2^24 (K <= 16,777,216).

Papers: Rastegari, Ordonez, Redmon & Farhadi, "XNOR-Net: ImageNet classification using binary
convolutional neural networks", ECCV 2016 (XNOR + popcount); Courbariaux, Hubara, Soudry,
El-Yaniv & Bengio, "Binarized neural networks", arXiv:1602.02830, 2016.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

if sys.byteorder != "little":  # pragma: no cover - the packing views 8 bytes as one uint64
    raise ImportError("lecturelib.xnor_gemm assumes a little-endian CPU")

WORD_BITS = 64
"""Bits per packed word (uint64)."""
MAX_K = 2**24
"""Largest K for which float32 A @ B on +-1 inputs is exact (and so the comparison is fair)."""
_J_BLOCK = 256
"""Columns of B per block: 4 accumulator rows + 4 B rows of 256 uint64 stay in the L1 cache."""


# ----------------------------------------------------------------------------- packing
def _as_pm1(X: Any, name: str, check: bool = True) -> np.ndarray:
    """X (numpy array or torch tensor) as a 2-D numpy array, checked to hold only -1 and +1."""
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    if not isinstance(X, np.ndarray):
        raise ValueError(
            f"{name} must be a numpy array or torch tensor of -1/+1, got {type(X).__name__}"
        )
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, cols), got shape {X.shape}")
    if X.dtype == np.bool_ or not (np.issubdtype(X.dtype, np.number)):
        raise ValueError(f"{name} must hold the numbers -1 and +1, got dtype {X.dtype}")
    if check and X.size and not np.all((X == 1) | (X == -1)):
        bad = X[(X != 1) & (X != -1)].flat[0]
        raise ValueError(f"{name} must contain only -1 and +1 (binarize first), found {bad!r}")
    return X


def n_words(k: int) -> int:
    """Words needed for k bits: ceil(k / 64).

    Used in: 06_binary_xnor.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    return (int(k) + WORD_BITS - 1) // WORD_BITS


def pack_rows(X: Any, check: bool = True) -> np.ndarray:
    """Pack a +-1 matrix X (M, K) along its rows into uint64 words (M, ceil(K/64)).

    bit (k mod 64) of word k // 64 in row i is 1 where X[i, k] = +1 and 0 where X[i, k] = -1;
    the padding bits after K are 0. The lecture's bit strings read the same way left to right
    (first entry = lowest bit). ``check=False`` skips the test that every entry is -1 or +1
    (for the output of a sign function; any value > 0 then packs as 1, anything else as 0).
    Paper: Rastegari et al. 2016 (XNOR-Net).
    Used in: 06_binary_xnor.
    """
    X = _as_pm1(X, "X", check)
    M, K = X.shape
    bytes_ = np.packbits(X > 0, axis=1, bitorder="little")  # (M, ceil(K/8)) uint8
    padded = np.zeros((M, n_words(K) * 8), dtype=np.uint8)
    padded[:, : bytes_.shape[1]] = bytes_
    return padded.view(np.dtype("<u8")).astype(np.uint64, copy=False)


def pack_cols(X: Any, check: bool = True) -> np.ndarray:
    """Pack a +-1 matrix X (K, N) along its columns into uint64 words (ceil(K/64), N).

    pack_cols(X) = pack_rows(X^T)^T, stored C-contiguous so that one k-word of all N columns
    is contiguous (what the kernel's inner loop reads). Paper: Rastegari et al. 2016.
    Used in: 06_binary_xnor.
    """
    X = _as_pm1(X, "X", check)
    return np.ascontiguousarray(pack_rows(X.T, check=False).T)


def unpack_rows(words: np.ndarray, k: int) -> np.ndarray:
    """Inverse of pack_rows: uint64 words (M, ceil(k/64)) -> float32 +-1 matrix (M, k).

    Used in: 06_binary_xnor (tests).
    """
    words = _check_words(words, "words")
    if n_words(k) != words.shape[1]:
        raise ValueError(f"k must need exactly {words.shape[1]} words, got k={k}")
    bits = np.unpackbits(words.astype("<u8").view(np.uint8), axis=1, bitorder="little")[:, :k]
    return np.where(bits == 1, 1.0, -1.0).astype(np.float32)


def packed_nbytes(rows: int, k: int) -> int:
    """Bytes of a packed +-1 matrix with ``rows`` rows of k entries: rows * ceil(k/64) * 8.

    Compare with rows * k * 4 bytes in float32: 32x less when k is a multiple of 64.
    Used in: 06_binary_xnor.
    """
    if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 0:
        raise ValueError(f"rows must be a non-negative int, got {rows!r}")
    return int(rows) * n_words(k) * 8


def _check_words(words: Any, name: str) -> np.ndarray:
    if not isinstance(words, np.ndarray) or words.dtype != np.uint64 or words.ndim != 2:
        got = (
            f"{words.dtype} array of shape {words.shape}"
            if isinstance(words, np.ndarray)
            else type(words).__name__
        )
        raise ValueError(
            f"{name} must be a 2-D uint64 numpy array (from pack_rows/pack_cols), got {got}"
        )
    return words


def _check_gemm_args(A_words: Any, B_words: Any, k: Any) -> tuple[np.ndarray, np.ndarray, int]:
    A_words = _check_words(A_words, "A_words")
    B_words = _check_words(B_words, "B_words")
    if A_words.shape[1] != B_words.shape[0]:
        raise ValueError(
            f"A_words (M, words) and B_words (words, N) must share the word count, "
            f"got {A_words.shape} and {B_words.shape}"
        )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= MAX_K:
        raise ValueError(f"k must be an int in 0..{MAX_K}, got {k!r}")
    if n_words(k) != A_words.shape[1]:
        raise ValueError(
            f"k={k} needs {n_words(k)} words, but the packed operands have {A_words.shape[1]}"
        )
    return A_words, B_words, int(k)


# ----------------------------------------------------------------------------- the identity
def xnor_dot(w_bits: str, x_bits: str) -> int:
    """The lecture's XNOR-popcount dot product of two +-1 vectors given as bit strings.

    y = -n + 2 * popcount(w XNOR x)   (n = len(w_bits); "1" means +1, "0" means -1).
    Example (the slide): xnor_dot("1010", "1101") = -4 + 2 * popcount("1000") = -2.
    Paper: Rastegari et al. 2016 (XNOR-Net). Used in: 06_binary_xnor.
    """
    for name, s in (("w_bits", w_bits), ("x_bits", x_bits)):
        if not isinstance(s, str) or not s or set(s) - {"0", "1"}:
            raise ValueError(f"{name} must be a non-empty string of '0' and '1', got {s!r}")
    if len(w_bits) != len(x_bits):
        raise ValueError(
            f"w_bits and x_bits must have the same length, got {len(w_bits)} and {len(x_bits)}"
        )
    n = len(w_bits)
    xnor = "".join("1" if a == b else "0" for a, b in zip(w_bits, x_bits, strict=True))
    return -n + 2 * xnor.count("1")


def xnor_dot_words(a: np.ndarray, b: np.ndarray, k: int) -> int:
    """XNOR-popcount dot product of two packed +-1 vectors of k entries (uint64 word arrays).

    y = -k + 2 * (popcount(NOT(a XOR b)) - pad),  pad = 64 * len(a) - k
    The padding bits are 0 in both words, so XNOR counts each of them as an agreement: the
    correction subtracts them. (The XOR form k - 2 * popcount(a XOR b) needs no correction.)
    Paper: Rastegari et al. 2016. Used in: 06_binary_xnor.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.dtype != np.uint64 or b.dtype != np.uint64 or a.ndim != 1 or a.shape != b.shape:
        raise ValueError(
            f"a and b must be 1-D uint64 arrays of equal length, "
            f"got {a.dtype}{a.shape} and {b.dtype}{b.shape}"
        )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or n_words(k) != a.shape[0]:
        raise ValueError(f"k must be an int with ceil(k/64) == {a.shape[0]}, got {k!r}")
    pad = WORD_BITS * a.shape[0] - int(k)
    matches = int(np.bitwise_count(~(a ^ b)).sum())
    return -int(k) + 2 * (matches - pad)


# ----------------------------------------------------------------------------- pure NumPy (slow)
def xnor_gemm_numpy(
    A_words: np.ndarray, B_words: np.ndarray, k: int, chunk_bytes: int = 1 << 24
) -> np.ndarray:
    """Binary GEMM in pure NumPy, int32 (M, N): y[i, j] = k - 2 sum_w popcount(A[i, w] XOR B[w, j]).

    Broadcasts A (m, W, 1) against B (1, W, N) a few rows at a time and sums np.bitwise_count
    over W. Every step writes a temporary array to memory, so it is slower than float32 BLAS:
    bit tricks pay off only in a kernel that keeps the words in registers.
    Paper: Rastegari et al. 2016. Used in: 06_binary_xnor.
    """
    A_words, B_words, k = _check_gemm_args(A_words, B_words, k)
    M, W = A_words.shape
    N = B_words.shape[1]
    out = np.empty((M, N), dtype=np.int32)
    rows = max(1, chunk_bytes // max(1, W * N * 8))
    for i0 in range(0, M, rows):
        x = A_words[i0 : i0 + rows, :, None] ^ B_words[None, :, :]  # (m, W, N)
        out[i0 : i0 + rows] = k - 2 * np.bitwise_count(x).sum(axis=1, dtype=np.int64)
    return out


# ----------------------------------------------------------------------------- the numba kernel
_kernel = None


def _build_kernel() -> Any:
    """Compile-on-first-use: import numba only when the kernel is needed."""
    import numba
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def pc(typingctx: Any, x: Any) -> Any:
        """popcount of a uint64, lowered to llvm.ctpop.i64 (vectorised to VPOPCNTQ)."""
        if x != types.uint64:
            return None

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            fn = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
            return builder.call(fn, [args[0]])

        return types.uint64(types.uint64), codegen

    @intrinsic
    def prefer_512_bit_vectors(typingctx: Any) -> Any:
        """Mark the calling function so LLVM vectorises with 512-bit registers where available.

        LLVM's tuning for recent Intel CPUs prefers 256-bit vectors; the kernel is pure integer
        ALU work where 512-bit wins. The function attributes are LLVM's own (per function, no
        global setting changes); on CPUs without AVX-512 they are ignored.
        """

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            attrs = builder.function.attributes
            # llvmlite only accepts a fixed list of attribute names; string attributes are
            # valid LLVM IR, so add them to the underlying set directly. Should a future
            # llvmlite store attributes differently, the kernel still compiles (narrower vectors).
            try:
                set.add(attrs, '"prefer-vector-width"="512"')
                set.add(attrs, '"min-legal-vector-width"="512"')
            except (TypeError, AttributeError):  # pragma: no cover
                pass
            return context.get_dummy_value()

        return types.none(), codegen

    JB = _J_BLOCK

    @numba.njit(nogil=True, cache=False)
    def xor_popcount_gemm(A: Any, B: Any, k: int, out: Any) -> Any:  # pragma: no cover - compiled
        prefer_512_bit_vectors()
        M, KW = A.shape
        N = B.shape[1]
        acc = np.empty((4, JB), np.uint64)  # popcount(A XOR B) for 4 rows x JB columns
        for j0 in range(0, N, JB):
            nj = min(JB, N - j0)
            for i0 in range(0, M, 4):
                nr = min(4, M - i0)
                acc[:, :nj] = 0
                if nr == 4:  # 4 rows of A at a time, 4 words of K per step
                    c0, c1, c2, c3 = acc[0, :nj], acc[1, :nj], acc[2, :nj], acc[3, :nj]
                    r0, r1, r2, r3 = A[i0], A[i0 + 1], A[i0 + 2], A[i0 + 3]
                    w = 0
                    while w + 4 <= KW:
                        b0 = B[w, j0 : j0 + nj]  # word w of columns j0 .. j0 + nj
                        b1 = B[w + 1, j0 : j0 + nj]
                        b2 = B[w + 2, j0 : j0 + nj]
                        b3 = B[w + 3, j0 : j0 + nj]
                        a00, a01, a02, a03 = r0[w], r0[w + 1], r0[w + 2], r0[w + 3]
                        a10, a11, a12, a13 = r1[w], r1[w + 1], r1[w + 2], r1[w + 3]
                        a20, a21, a22, a23 = r2[w], r2[w + 1], r2[w + 2], r2[w + 3]
                        a30, a31, a32, a33 = r3[w], r3[w + 1], r3[w + 2], r3[w + 3]
                        for j in range(nj):  # vectorised over j: 8 columns per 512-bit register
                            y0, y1, y2, y3 = b0[j], b1[j], b2[j], b3[j]
                            c0[j] += pc(a00 ^ y0) + pc(a01 ^ y1) + pc(a02 ^ y2) + pc(a03 ^ y3)
                            c1[j] += pc(a10 ^ y0) + pc(a11 ^ y1) + pc(a12 ^ y2) + pc(a13 ^ y3)
                            c2[j] += pc(a20 ^ y0) + pc(a21 ^ y1) + pc(a22 ^ y2) + pc(a23 ^ y3)
                            c3[j] += pc(a30 ^ y0) + pc(a31 ^ y1) + pc(a32 ^ y2) + pc(a33 ^ y3)
                        w += 4
                    while w < KW:  # the last KW mod 4 words
                        b0 = B[w, j0 : j0 + nj]
                        a00, a10, a20, a30 = r0[w], r1[w], r2[w], r3[w]
                        for j in range(nj):
                            y0 = b0[j]
                            c0[j] += pc(a00 ^ y0)
                            c1[j] += pc(a10 ^ y0)
                            c2[j] += pc(a20 ^ y0)
                            c3[j] += pc(a30 ^ y0)
                        w += 1
                else:  # the last M mod 4 rows, one at a time
                    for r in range(nr):
                        c = acc[r, :nj]
                        for w in range(KW):
                            a = A[i0 + r, w]
                            b = B[w, j0 : j0 + nj]
                            for j in range(nj):
                                c[j] += pc(a ^ b[j])
                for r in range(nr):  # y = K - 2 * (#disagreements)
                    o = out[i0 + r, j0 : j0 + nj]
                    c = acc[r, :nj]
                    for j in range(nj):
                        o[j] = np.int32(k - 2 * np.int64(c[j]))
        return out

    return xor_popcount_gemm


def _get_kernel() -> Any:
    global _kernel
    if _kernel is None:
        _kernel = _build_kernel()
    return _kernel


def compile_kernel() -> float:
    """Compile the numba kernel now (once per process) and return the seconds it took (0 if done).

    Used in: 06_binary_xnor.
    """
    kern = _get_kernel()
    if kern.signatures:
        return 0.0
    t0 = time.perf_counter()
    A = np.zeros((1, 1), np.uint64)
    kern(A, np.zeros((1, 1), np.uint64), 1, np.empty((1, 1), np.int32))
    return time.perf_counter() - t0


def kernel_vector_width() -> int:
    """Widest SIMD register (bits) in the compiled kernel's machine code: 512 (zmm), 256 (ymm),
    128 (xmm), or 0 when the assembly names none of them (not x86).

    Used in: 06_binary_xnor.
    """
    import re

    compile_kernel()
    kern = _get_kernel()
    asm = kern.inspect_asm(kern.signatures[0])
    for reg, bits in (("zmm", 512), ("ymm", 256), ("xmm", 128)):
        if re.search(rf"%{reg}\d", asm):
            return bits
    return 0


def xnor_gemm_packed(A_words: np.ndarray, B_words: np.ndarray, k: int) -> np.ndarray:
    """Binary GEMM on packed operands with the numba kernel: int32 (M, N).

    y[i, j] = k - 2 * sum_w popcount(A_words[i, w] XOR B_words[w, j])
            = (A @ B)[i, j] for the +-1 matrices A (M, k), B (k, N) that were packed.
    A_words from pack_rows(A), B_words from pack_cols(B). Single-threaded.
    Paper: Rastegari et al. 2016 (XNOR-Net). Used in: 06_binary_xnor.
    """
    A_words, B_words, k = _check_gemm_args(A_words, B_words, k)
    out = np.empty((A_words.shape[0], B_words.shape[1]), dtype=np.int32)
    if out.size == 0:
        return out
    if k == 0:
        out[:] = 0
        return out
    return _get_kernel()(np.ascontiguousarray(A_words), np.ascontiguousarray(B_words), k, out)


def xnor_matmul(A: Any, B: Any) -> np.ndarray:
    """A @ B for +-1 matrices A (M, K) and B (K, N), computed by packing and the XNOR kernel.

    Returns int32 (M, N), equal entry for entry to float32 A @ B (K <= 2^24).
    Used in: 06_binary_xnor.
    """
    A = _as_pm1(A, "A")
    B = _as_pm1(B, "B")
    if A.shape[1] != B.shape[0]:
        raise ValueError(f"A (M, K) and B (K, N) must share K, got {A.shape} and {B.shape}")
    return xnor_gemm_packed(pack_rows(A), pack_cols(B), A.shape[1])


# ----------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class GemmTiming:
    """Single-thread timings of one GEMM shape (seconds of CPU time, best of a round's repeats).

    Used in: 06_binary_xnor, bench/xnor_gemm.py.
    """

    m: int
    """Rows of A (batch)."""
    n: int
    """Columns of B (output features)."""
    k: int
    """Inner dimension (input features)."""
    fp32_s: float
    """torch float32 A @ B, median over rounds of the per-round minimum."""
    binary_s: float
    """XNOR-popcount kernel on packed operands, median over rounds of the per-round minimum."""
    pack_s: float
    """Packing A (M, K) float +-1 -> bits, without the +-1 check (the per-inference cost of
    activations that come out of a sign; B's weights are packed once, offline)."""
    speedup: float
    """Median over rounds of (fp32 time / binary time) within the round."""
    speedup_min: float
    """Smallest per-round speedup."""
    speedup_max: float
    """Largest per-round speedup."""
    numpy_s: float | None
    """Pure-NumPy XOR-popcount GEMM (None when not measured)."""
    fp32_bytes: int
    """Bytes of A and B in float32."""
    packed_bytes: int
    """Bytes of A and B packed into uint64 words."""

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON)."""
        return asdict(self)


def best_cpu_time(fn: Any, repeats: int, min_sample_s: float = 2e-3) -> float:
    """Best (smallest) CPU time per call of ``fn`` over ``repeats`` samples.

    CPU time of the calling thread (time.thread_time): on a shared machine, the time the OS
    gives to other processes is not counted, so a long fp32 call that gets preempted is not
    penalised against a short binary call that is not. Each sample runs ``fn`` enough times
    to last about ``min_sample_s``, so short calls are not lost in clock resolution.
    Used in: 06_binary_xnor (through time_gemm), bench/xnor_gemm.py.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    t0 = time.thread_time()
    fn()
    once = max(time.thread_time() - t0, 1e-7)
    inner = max(1, int(min_sample_s / once))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        for _ in range(inner):
            fn()
        best = min(best, (time.thread_time() - t0) / inner)
    return best


def time_gemm(
    m: int,
    n: int,
    k: int,
    rounds: int = 5,
    repeats: int = 5,
    with_numpy: bool = False,
    seed: int = 0,
) -> GemmTiming:
    """Time float32 A @ B (torch, 1 thread) against the packed XNOR kernel on random +-1 operands.

    speedup = fp32_time / binary_time, measured in each of ``rounds`` rounds (both back to back,
    so they share the machine's state) and reported as the median with its min and max. Times
    are CPU time of the calling thread (time.thread_time), best of ``repeats``. The two results
    are checked equal before timing; torch's thread count is 1 while timing, then restored.
    Used in: 06_binary_xnor (and bench/xnor_gemm.py).
    """
    for name, v in (("m", m), ("n", n), ("k", k), ("rounds", rounds), ("repeats", repeats)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if k > MAX_K:
        raise ValueError(f"k must be at most {MAX_K}, got {k}")
    g = torch.Generator().manual_seed(seed)
    A = (torch.randint(0, 2, (m, k), generator=g) * 2 - 1).float()
    B = (torch.randint(0, 2, (k, n), generator=g) * 2 - 1).float()
    A_np = A.numpy()
    Aw, Bw = pack_rows(A), pack_cols(B)
    compile_kernel()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = A @ B
        if not np.array_equal(xnor_gemm_packed(Aw, Bw, k), ref.numpy().astype(np.int32)):
            raise AssertionError("XNOR kernel disagrees with float32 A @ B")  # never expected
        fp32, binary, ratios = [], [], []
        for _ in range(rounds):
            f = best_cpu_time(lambda: torch.mm(A, B), repeats)
            b = best_cpu_time(lambda: xnor_gemm_packed(Aw, Bw, k), repeats)
            fp32.append(f)
            binary.append(b)
            ratios.append(f / b)
        pack_s = best_cpu_time(lambda: pack_rows(A_np, check=False), repeats)
        numpy_s = best_cpu_time(lambda: xnor_gemm_numpy(Aw, Bw, k), 1) if with_numpy else None
    finally:
        torch.set_num_threads(threads)
    return GemmTiming(
        m=m,
        n=n,
        k=k,
        fp32_s=float(np.median(fp32)),
        binary_s=float(np.median(binary)),
        pack_s=pack_s,
        speedup=float(np.median(ratios)),
        speedup_min=float(min(ratios)),
        speedup_max=float(max(ratios)),
        numpy_s=numpy_s,
        fp32_bytes=4 * (m * k + k * n),
        packed_bytes=packed_nbytes(m, k) + packed_nbytes(n, k),
    )
