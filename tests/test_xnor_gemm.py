"""lecturelib.xnor_gemm: packing, the XNOR-popcount identity, the numba GEMM vs float32 A @ B."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lecturelib import xnor_gemm as xg

SETTINGS = settings(deadline=None, derandomize=True, max_examples=60)


def pm1(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=shape)


# K values around word boundaries are where a padding bug would show.
K_VALUES = st.one_of(
    st.integers(1, 300), st.sampled_from([63, 64, 65, 127, 128, 129, 191, 255, 256, 257])
)


def test_slide_example() -> None:
    # W = [1, -1, 1, -1] -> 1010, X = [1, 1, -1, 1] -> 1101; xnor = 1000 -> -4 + 2 * 1 = -2
    assert xg.xnor_dot("1010", "1101") == -2
    w = xg.pack_rows(np.array([[1, -1, 1, -1]]))
    x = xg.pack_rows(np.array([[1, 1, -1, 1]]))
    assert xg.xnor_dot_words(w[0], x[0], 4) == -2
    assert int(w[0, 0]) == 0b0101  # first entry is the lowest bit: "1010" read left to right
    assert xg.xnor_matmul(np.array([[1, -1, 1, -1]]), np.array([[1], [1], [-1], [1]]))[0, 0] == -2


@SETTINGS
@given(st.lists(st.booleans(), min_size=1, max_size=200), st.integers(0, 2**32 - 1))
def test_xnor_dot_matches_float_dot(w: list[bool], seed: int) -> None:
    x = np.random.default_rng(seed).integers(0, 2, len(w)).astype(bool).tolist()
    w_pm, x_pm = np.where(w, 1.0, -1.0), np.where(x, 1.0, -1.0)
    s = lambda bits: "".join("1" if b else "0" for b in bits)  # noqa: E731
    assert xg.xnor_dot(s(w), s(x)) == int(w_pm @ x_pm)
    words_w, words_x = xg.pack_rows(w_pm[None]), xg.pack_rows(x_pm[None])
    assert xg.xnor_dot_words(words_w[0], words_x[0], len(w)) == int(w_pm @ x_pm)


def test_padding_correction_is_needed() -> None:
    # Without subtracting the padding bits, XNOR would count them as agreements.
    a = xg.pack_rows(np.ones((1, 65)))
    b = xg.pack_rows(-np.ones((1, 65)))
    assert xg.xnor_dot_words(a[0], b[0], 65) == -65
    raw = -65 + 2 * int(np.bitwise_count(~(a[0] ^ b[0])).sum())
    assert raw == -65 + 2 * 63  # the 63 padding bits of the second word, wrongly counted


@SETTINGS
@given(st.integers(1, 40), K_VALUES, st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_kernel_bit_exact_against_float32(m: int, k: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    A, B = pm1(rng, (m, k)), pm1(rng, (k, n))
    ref = (torch.from_numpy(A) @ torch.from_numpy(B)).numpy()
    Aw, Bw = xg.pack_rows(A), xg.pack_cols(B)
    got = xg.xnor_gemm_packed(Aw, Bw, k)
    assert got.dtype == np.int32 and got.shape == (m, n)
    assert np.array_equal(got, ref.astype(np.int32))
    assert np.array_equal(xg.xnor_gemm_numpy(Aw, Bw, k), got)


@pytest.mark.parametrize(
    "m,k,n", [(4, 4096, 8), (67, 4099, 61), (5, 320, 600), (9, 1000, 257), (1, 1, 1)]
)
def test_kernel_larger_shapes(m: int, k: int, n: int) -> None:
    # N > 256 crosses the kernel's column blocks; K mod 256 != 0 exercises the word remainder.
    rng = np.random.default_rng(m * 1000 + n)
    A, B = pm1(rng, (m, k)), pm1(rng, (k, n))
    assert np.array_equal(xg.xnor_matmul(A, B), (A @ B).astype(np.int32))


def test_against_brute_force_counting() -> None:
    rng = np.random.default_rng(7)
    A, B = pm1(rng, (3, 70)), pm1(rng, (70, 2))
    got = xg.xnor_matmul(A, B)
    for i in range(3):
        for j in range(2):
            agree = sum(1 for t in range(70) if A[i, t] == B[t, j])
            assert got[i, j] == agree - (70 - agree)


@SETTINGS
@given(st.integers(1, 5), K_VALUES, st.integers(0, 2**32 - 1))
def test_pack_roundtrip_and_layout(m: int, k: int, seed: int) -> None:
    A = pm1(np.random.default_rng(seed), (m, k))
    words = xg.pack_rows(A)
    assert words.dtype == np.uint64 and words.shape == (m, xg.n_words(k))
    assert np.array_equal(xg.unpack_rows(words, k), A)
    for i in range(m):  # bit t of the row = entry t; padding bits are 0
        bits = [(int(words[i, t // 64]) >> (t % 64)) & 1 for t in range(64 * words.shape[1])]
        assert bits[:k] == [1 if v > 0 else 0 for v in A[i]] and not any(bits[k:])
    assert np.array_equal(xg.pack_cols(A.T), words.T)


def test_memory() -> None:
    assert xg.packed_nbytes(512, 4096) * 32 == 512 * 4096 * 4
    assert xg.packed_nbytes(1, 65) == 16  # two words
    assert xg.n_words(0) == 0 and xg.n_words(64) == 1 and xg.n_words(65) == 2


def test_torch_input_and_empty() -> None:
    A = torch.tensor([[1.0, -1.0], [-1.0, -1.0]])
    assert np.array_equal(xg.xnor_matmul(A, A.T), (A @ A.T).numpy().astype(np.int32))
    assert xg.xnor_gemm_packed(
        np.zeros((0, 1), np.uint64), np.zeros((1, 3), np.uint64), 5
    ).shape == (0, 3)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: xg.pack_rows(np.array([[1.0, 0.0]])), "only -1 and \\+1"),
        (lambda: xg.pack_rows(np.ones(3)), "2-D"),
        (lambda: xg.pack_rows(np.ones((2, 2), dtype=bool)), "numbers"),
        (lambda: xg.pack_rows([[1, -1]]), "numpy array or torch tensor"),
        (
            lambda: xg.xnor_gemm_packed(
                np.zeros((2, 2), np.uint64), np.zeros((3, 2), np.uint64), 100
            ),
            "word count",
        ),
        (
            lambda: xg.xnor_gemm_packed(
                np.zeros((2, 2), np.uint64), np.zeros((2, 2), np.uint64), 200
            ),
            "k=200 needs",
        ),
        (
            lambda: xg.xnor_gemm_packed(
                np.zeros((2, 2), np.int64), np.zeros((2, 2), np.uint64), 100
            ),
            "A_words",
        ),
        (
            lambda: xg.xnor_gemm_packed(
                np.zeros((1, 1), np.uint64), np.zeros((1, 1), np.uint64), -1
            ),
            "k must",
        ),
        (lambda: xg.xnor_matmul(np.ones((2, 3)), np.ones((2, 3))), "share K"),
        (lambda: xg.xnor_dot("10a", "101"), "w_bits"),
        (lambda: xg.xnor_dot("10", "101"), "same length"),
        (lambda: xg.xnor_dot_words(np.zeros(1, np.uint64), np.zeros(1, np.uint64), 65), "k must"),
        (lambda: xg.unpack_rows(np.zeros((1, 1), np.uint64), 65), "k must"),
        (lambda: xg.packed_nbytes(-1, 3), "rows"),
        (lambda: xg.n_words(-2), "k must"),
        (lambda: xg.time_gemm(0, 1, 1), "m must"),
    ],
)
def test_bad_input(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def _has_vpopcntdq() -> bool:
    try:
        import llvmlite.binding as llb

        return llb.get_host_cpu_features().get("avx512vpopcntdq", False)
    except Exception:  # pragma: no cover
        return False


@pytest.mark.skipif(not _has_vpopcntdq(), reason="CPU without AVX-512 VPOPCNTDQ")
def test_kernel_uses_512_bit_popcount() -> None:
    assert xg.kernel_vector_width() == 512


def test_time_gemm_smoke() -> None:
    threads = torch.get_num_threads()
    t = xg.time_gemm(8, 16, 130, rounds=2, repeats=2, with_numpy=True)
    assert t.fp32_s > 0 and t.binary_s > 0 and t.pack_s > 0 and t.numpy_s is not None
    assert t.speedup_min <= t.speedup <= t.speedup_max
    assert t.fp32_bytes == 4 * (8 * 130 + 130 * 16) and t.packed_bytes == 8 * 3 * (8 + 16)
    assert torch.get_num_threads() == threads  # restored after timing on one thread
